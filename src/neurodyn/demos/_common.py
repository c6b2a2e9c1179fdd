"""Helpers the demos share."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from typing import Any, TypeVar

C = TypeVar("C")


def config_from_args(cls: type[C], args: argparse.Namespace, quick: dict[str, Any] | None = None) -> C:
    """Build the demo's config dataclass ``cls`` from parsed arguments (options left at None keep the
    dataclass default); with ``--quick``, the ``quick`` overrides apply to every option not given."""
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = cls(**given)
    if getattr(cfg, "quick", False) and quick:
        cfg = replace(cfg, **{k: v for k, v in quick.items() if given.get(k) is None})
    return cfg


def add_out_and_seed(parser: argparse.ArgumentParser, out: str, seed: int) -> None:
    """The ``--out DIR`` and ``--seed`` options every demo has."""
    parser.add_argument("--out", default=out, metavar="DIR", help=f"output directory (default: {out})")
    parser.add_argument("--seed", type=int, default=seed, help=f"random seed (default: {seed})")
