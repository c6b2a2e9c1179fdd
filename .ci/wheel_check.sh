#!/usr/bin/env bash
# What a new user does, with the built wheel: build neurodyn's wheel, install it with torch (the tested version,
# no extras) into a clean virtual environment in a temporary folder, check `import neurodyn` and the command
# line there, then run the README's quickstart (the python blocks between <!-- quickstart and
# <!-- /quickstart -->) unchanged, from a folder outside the source tree.  Any failure stops the script with a
# non-zero status and says which step failed.
#
#   bash .ci/wheel_check.sh            (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}  # makes the clean venv (as the Makefile makes .venv)
# builds the wheel: the project's venv when `make test` has made it (it has pip), else PYTHON
BUILD_PYTHON=${BUILD_PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo "$PYTHON")}
TORCH_VERSION=${TORCH_VERSION:-$(sed -n 's/^TORCH_VERSION := //p' Makefile)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/neurodyn-wheel-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
step() { echo "== wheel check: $*"; }
fail() { echo "wheel check FAILED: $*" >&2; exit 1; }

step "build the wheel (torch $TORCH_VERSION)"
"$BUILD_PYTHON" -m pip wheel --no-deps --quiet . -w "$WORK/dist" || fail "the wheel did not build"
rm -rf build  # setuptools' build folder inside the source tree
WHEEL=$(ls "$WORK"/dist/neurodyn-*.whl) || fail "no neurodyn wheel in $WORK/dist"
echo "$WHEEL"
"$BUILD_PYTHON" - "$WHEEL" <<'PY' || fail "the wheel misses files"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["neurodyn/__init__.py", "neurodyn/py.typed", "neurodyn/viz.py", "neurodyn/demos/__init__.py"]
missing = [n for n in need if n not in names]
lic = [n for n in names if n.endswith(".dist-info/LICENSE") or "/licenses/LICENSE" in n]
if missing or not lic:
    sys.exit(f"missing from the wheel: {missing + ([] if lic else ['LICENSE'])}")
print(len(names), "files, py.typed and LICENSE included")
PY

step "clean virtual environment"
"$PYTHON" -m venv "$WORK/venv" || fail "venv creation"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet "torch==$TORCH_VERSION" || fail "pip install torch==$TORCH_VERSION"
"$VPY" -m pip install --quiet "$WHEEL" "torch==$TORCH_VERSION" || fail "pip install of the wheel"

cd "$WORK"  # away from the source tree: only the installed wheel can be imported
step "import neurodyn without the demo extras"
"$VPY" - <<'PY' || fail "import neurodyn in the clean venv"
import importlib.util, sys
for extra in ("matplotlib", "sklearn", "scipy"):
    if importlib.util.find_spec(extra) is not None:
        sys.exit(f"{extra} is installed in the clean venv: the check would not show that neurodyn works without it")
import neurodyn
assert "torch" not in sys.modules, "import neurodyn imported torch"
assert neurodyn.__file__.startswith(sys.prefix), f"neurodyn imported from {neurodyn.__file__}, not the venv"
missing = [name for name in neurodyn.__all__ if getattr(neurodyn, name, None) is None]
assert not missing, f"public names that do not load: {missing}"
from importlib.metadata import version
assert version("neurodyn") == neurodyn.__version__, (version("neurodyn"), neurodyn.__version__)
try:
    neurodyn.viz.plot_solution
    import neurodyn.viz as viz
    viz.new_figure((2.0, 2.0))
except ImportError as exc:
    assert "neurodyn[demo]" in str(exc), f"the missing-matplotlib message names no extra: {exc}"
else:
    sys.exit("a figure was made without matplotlib")
print("neurodyn", neurodyn.__version__, "from", neurodyn.__file__, "-", len(neurodyn.__all__), "public names")
PY
"$WORK/venv/bin/neurodyn" --version || fail "the neurodyn command"
"$WORK/venv/bin/neurodyn" demo --help > /dev/null || fail "neurodyn demo --help"

step "the README's quickstart, unchanged"
awk '/<!-- quickstart/{f=1; next} /<!-- \/quickstart -->/{f=0} f && /^```python/{c=1; next} f && /^```/{c=0} c' \
    "$ROOT/README.md" > "$WORK/quickstart.py"
[ "$(grep -c . "$WORK/quickstart.py")" -ge 5 ] || fail "no quickstart code found between the README's markers"
"$VPY" "$WORK/quickstart.py" || fail "the README's quickstart (extracted to $WORK/quickstart.py)"
step "passed"
