"""mkdocs hook: publish benchmarks/out/ (plots and raw numbers) under the site's benchmarks/out/.

The benchmarks page includes ``benchmarks/README.md`` (one source for both), whose links point at ``out/...``;
the files stay where the benchmark scripts write them.
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
                uri = f"{folder}/{path.name}"
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
