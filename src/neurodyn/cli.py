"""The ``neurodyn`` command line.

    neurodyn demo --help            list the demos
    neurodyn demo spiral [--out DIR] [--iters N] [--seed S] ...
    neurodyn explore [--port N] [--host 127.0.0.1]   the interactive figures as a local web page
    python -m neurodyn demo spiral  (same thing)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import neurodyn
from neurodyn import demos
from neurodyn.errors import SolveFailure

# Nothing above imports torch (``neurodyn`` loads its public names on first use, ``neurodyn.demos`` only
# lists the demos), so ``neurodyn --help`` and ``neurodyn demo --help`` answer at once; a demo's own module
# (and torch) is imported only when that demo is named.


def _version() -> str:
    return neurodyn.__version__


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser.  Only the demo named in ``argv`` (if any) is imported, to add its options:
    listing the demos stays fast and does not depend on any one demo's imports."""
    argv = list(argv) if argv is not None else []
    selected = argv[1] if argv[:1] == ["demo"] and len(argv) > 1 else None

    parser = argparse.ArgumentParser(
        prog="neurodyn",
        description="neurodyn: neural differential equations in PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"neurodyn {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run a demo (see `neurodyn demo --help`)",
        description="Run a demo (each is listed once below, with what it shows).",
        epilog="`neurodyn demo NAME --help` shows the options of one demo.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.set_defaults(demo_parser=demo)
    which = demo.add_subparsers(dest="demo", metavar="NAME", title="demos")
    for name, (_, desc) in sorted(demos.DEMOS.items()):
        if name == selected:
            module = demos.load(name)
            sub = which.add_parser(name, help=desc, description=module.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
            module.add_arguments(sub)
        else:
            which.add_parser(name, help=desc, description=desc)

    # -- neurodyn explore (issue 17 item 7): the options live in neurodyn.explore.command (no torch import) --
    from neurodyn.explore.command import add_arguments as add_explore_arguments

    explore = commands.add_parser(
        "explore", help="the interactive figures as a local web page (needs the explore extra)",
        description="Serve the interactive figures (nested rings through a NODE and an ANODE; a latent ODE's "
                    "posterior on clicked points) on a local web page. The models come from the demos' saved "
                    "runs (--runs), else built-in ones are trained the first time (about three minutes on one "
                    "core, fixed seed) and cached in the user cache directory; --quick trains small ones in "
                    "seconds.")
    add_explore_arguments(explore)
    return parser


def check_out_dir(out: str) -> str | None:
    """Create ``out`` (and its parents) and check a file can be written in it; returns None when it can,
    else a one-line reason naming the directory."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".neurodyn-write-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if path.exists() and not path.is_dir():
            reason = "it exists and is not a directory"
        elif isinstance(exc, (FileExistsError, NotADirectoryError)):
            reason = "a part of the path is a file, not a directory"
        return f"cannot write to --out {out!r}: {reason}; choose another directory"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neurodyn`` console script; returns the exit status."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        if args.demo is None:
            args.demo_parser.print_help()
            return 2
        prefix = f"neurodyn demo {args.demo}: error:"
        problem = check_out_dir(args.out) if getattr(args, "out", None) is not None else None
        if problem is not None:
            print(f"{prefix} {problem}", file=sys.stderr)
            return 2
        from neurodyn.demos._common import DemoError  # imports torch: only once a demo runs

        try:
            return int(demos.load(args.demo).run(args) or 0)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        except (DemoError, SolveFailure) as exc:  # a run that cannot go on: one line, no traceback
            print(f"{prefix} {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
    if args.command == "explore":  # issue 17 item 7
        from neurodyn.explore.command import run as run_explore

        return run_explore(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
