"""mkdocs hooks: files that live outside docs/, and the examples gallery.

* ``benchmarks/out/`` (plots and raw numbers) is published under the site's ``benchmarks/out/``: the benchmarks
  page includes ``benchmarks/README.md`` (one source for both), whose links point at ``out/...``.
* The examples gallery: ``examples.md`` gets one section per script ``examples/NN_name.py`` (its docstring, the
  command, the source folded, and its figure ``examples/_out/NN_name.png`` when ``make examples`` has drawn it;
  the figures are published under the site's ``examples/``). Nothing to edit when an example is added.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = {"benchmarks/out": (".png", ".csv", ".json")}  # raw tables (.md) are not pages
EXAMPLES = ROOT / "examples"
FIGURES = EXAMPLES / "_out"
EXAMPLE = re.compile(r"^\d\d_\w+\.py$")


def example_scripts(folder: Path = EXAMPLES) -> list[Path]:
    return sorted(p for p in folder.glob("*.py") if EXAMPLE.match(p.name)) if folder.is_dir() else []


def on_files(files, config):
    for folder, suffixes in PUBLISHED.items():
        if not (ROOT / folder).is_dir():
            continue
        for path in sorted((ROOT / folder).iterdir()):
            if path.suffix in suffixes and path.is_file():
                files.append(File.generated(config, f"{folder}/{path.name}", abs_src_path=str(path)))
    for script in example_scripts():
        figure = FIGURES / f"{script.stem}.png"
        if figure.is_file():
            files.append(File.generated(config, f"examples/{figure.name}", abs_src_path=str(figure)))
    return files


def gallery(scripts: list[Path], figures: Path) -> str:
    """The gallery's Markdown: per script its docstring's title and text, the command, the figure, the source."""
    parts = ["## Gallery", "",
             "Each example is a short script that checks its own numbers and draws one figure; `make examples` runs "
             "them all in quick mode (as CI does), `python examples/NAME.py` one of them in full."]
    for script in scripts:
        source = script.read_text()
        doc = ast.get_docstring(ast.parse(source)) or script.stem
        title, _, body = doc.partition("\n")
        # the usage line ("python examples/NAME.py [--quick] ...") is given as a command block below
        body = "\n".join(line for line in body.split("\n") if not line.strip().startswith("python examples/"))
        parts += ["", f"### {title.strip().rstrip('.')}", "", body.strip(), "",
                  "```bash", f"python examples/{script.name}            # --quick: the short CI run", "```", ""]
        figure = figures / f"{script.stem}.png"
        if figure.is_file():
            parts += [f"![{title.strip()}](examples/{figure.name})", ""]
        else:
            parts += ["*(no figure in this build: `make examples` draws it, into `examples/_out/`)*", ""]
        parts += [f'??? example "examples/{script.name}"', "", "    ```python",
                  *("    " + line if line else "" for line in source.rstrip("\n").split("\n")), "    ```"]
    return "\n".join(parts) + "\n"


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "examples.md":
        scripts = example_scripts()
        if scripts:
            return markdown.rstrip("\n") + "\n\n" + gallery(scripts, FIGURES)
    return markdown
