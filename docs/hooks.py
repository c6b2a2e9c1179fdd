"""mkdocs hooks: files that live outside docs/.

* ``benchmarks/out/`` (plots and raw numbers) is published under the site's ``benchmarks/out/``: the benchmarks
  page includes ``benchmarks/README.md`` (one source for both), whose links point at ``out/...``.

The examples gallery (``docs/examples.md``) is written by hand, with the figures of the full runs committed under
``docs/examples/``; ``tests/test_examples_gallery.py`` checks that every script is on it with its figure.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = {"benchmarks/out": (".png", ".csv", ".json")}  # raw tables (.md) are not pages


def on_files(files, config):
    for folder, suffixes in PUBLISHED.items():
        if not (ROOT / folder).is_dir():
            continue
        for path in sorted((ROOT / folder).iterdir()):
            if path.suffix in suffixes and path.is_file():
                files.append(File.generated(config, f"{folder}/{path.name}", abs_src_path=str(path)))
    return files

