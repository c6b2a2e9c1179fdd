# neurodyn developer tasks.  Needs only python3 (>= 3.10) on the machine; everything else goes into .venv.
#
#   make demo    learn a 2-d spiral with a Neural ODE (writes runs/spiral/)
#   make test    run the test suite (two processes; TEST_WORKERS=0: one)
#   make test-browser  only the browser test of `neurodyn explore` (needs chromium: apt-get install chromium)
#   make examples  run every example in examples/ in quick mode (CI; figures to examples/_out/)
#   make lint    ruff
#   make bench   benchmarks against torchdiffeq / torchode
#   make bench-suite  all peers (torchdiffeq, torchode, torchdyn, diffrax on JAX-CPU), tables + plots
#   make docs    the documentation site (mkdocs, strict: any warning or broken reference fails) into site/
#
# Installs are recorded in stamp files inside .venv, so repeated runs skip pip entirely.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
DEMO_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
TORCHDYN_VERSION := 1.0.6
TORCHCFM_VERSION := 1.0.7
AEON_VERSION := 1.6.0

STAMP_VENV := $(VENV)/.stamp-venv-torch-$(TORCH_VERSION)
STAMP_DEMO := $(VENV)/.stamp-demo
STAMP_TEST := $(VENV)/.stamp-test
STAMP_BENCH := $(VENV)/.stamp-bench
STAMP_DOCS := $(VENV)/.stamp-docs

.PHONY: venv demo test test-browser examples lint bench bench-suite docs clean

venv: $(STAMP_VENV)

# torch is pinned and installed first, on its own: the CPU wheel of this version is what the package
# extras are then resolved against (they ask for torch>=2.13, so pip pulls nothing more).
$(STAMP_VENV):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==$(TORCH_VERSION)
	touch $@

$(STAMP_DEMO): $(STAMP_VENV) pyproject.toml
	$(PIP) install -e ".[demo]"
	touch $@

# torchcfm (the peer of neurodyn.compat.torchcfm) goes in with --no-deps: its metadata pulls another (CUDA)
# torch; what its conditional_flow_matching / optimal_transport modules import (numpy, POT, torch) is already here.
# aeon goes in with --no-deps too: neurodyn only reads the UEA .ts files its wheel ships (neurodyn.data.load_uea),
# never imports it, so its dependencies (numba, pandas, ...) are not needed.
$(STAMP_TEST): $(STAMP_VENV) pyproject.toml
	$(PIP) install -e ".[test,explore,browser]" torchdiffeq==0.2.5 torchode==1.0.1 torchsde==0.2.6 torchcde==0.2.5 torch==$(TORCH_VERSION)
	$(PIP) install --no-deps torchcfm==$(TORCHCFM_VERSION)
	$(PIP) install --no-deps aeon==$(AEON_VERSION)
	touch $@

# The bench extra holds the peers (jax/diffrax CPU wheels, torchdyn's real import dependencies); torch is
# named with its pinned version so that nothing can replace the CPU wheel. torchdyn goes in with --no-deps:
# its metadata asks for torchvision, ipykernel, ipywidgets, poethepoet, ... (and through them another torch).
$(STAMP_BENCH): $(STAMP_VENV) pyproject.toml
	$(PIP) install -e ".[bench]" torch==$(TORCH_VERSION)
	$(PIP) install --no-deps torchdyn==$(TORCHDYN_VERSION)
	touch $@

# The docs extra: mkdocs-material and mkdocstrings (the API reference is read from src/ by static analysis).
$(STAMP_DOCS): $(STAMP_VENV) pyproject.toml
	$(PIP) install -e ".[docs]" torch==$(TORCH_VERSION)
	touch $@

demo: $(STAMP_DEMO)
	$(VENV)/bin/neurodyn demo spiral $(DEMO_ARGS)

# Two test processes (pytest-xdist, whole files per process: the files' compiled programs are shared by their tests),
# then the tests marked `serial` alone (exit status 5, "no tests selected", is not a failure: PYTEST_ARGS may name
# files without serial tests). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: $(STAMP_TEST)
ifeq ($(TEST_WORKERS),0)
	$(PY) -m pytest $(PYTEST_ARGS)
else
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow and not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -m "serial and not slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]
endif

# The browser test is also part of `make test`; this runs it alone, printing the click-to-redraw latency.
test-browser: $(STAMP_TEST)
	$(PY) -m pytest tests/test_explore_browser.py -s $(PYTEST_ARGS)

# Every example in quick mode, each in its own process with a time limit (examples/run_all.py); the test venv has
# what they import (matplotlib, scikit-learn). EXAMPLES_ARGS: e.g. "--only digits" or drop --quick for full runs.
EXAMPLES_ARGS ?= --quick
examples: $(STAMP_TEST)
	MPLBACKEND=Agg $(PY) examples/run_all.py $(EXAMPLES_ARGS)

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check src tests benchmarks examples

# --strict: a docstring griffe cannot parse, a broken link or cross-reference, a page missing from the nav all
# fail the build. Then the built inventory (site/objects.inv) must list every public name, and the docstring
# markup extension (docs/griffe_roles.py, needs the docs extra) is tested (tests/test_docs.py).
docs: $(STAMP_DOCS) $(STAMP_TEST)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict
	NEURODYN_DOCS_INVENTORY=site/objects.inv $(PY) -m pytest tests/test_docs.py -q -p no:cacheprovider -k "inventory or markup"

bench: $(STAMP_BENCH)
	$(PY) benchmarks/bench_core.py

bench-suite: $(STAMP_BENCH)
	$(PY) benchmarks/bench_suite.py $(BENCH_ARGS)

clean:
	rm -rf build dist site src/*.egg-info .pytest_cache .ruff_cache
