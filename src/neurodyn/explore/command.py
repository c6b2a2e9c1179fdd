"""``neurodyn explore``: load (or train and cache) the models, then serve the page on ``--host``:``--port``."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys


def port_number(text: str) -> int:
    """argparse type: an integer port in 1..65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (an integer in 1..65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range; choose one in 1..65535")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``neurodyn explore``."""
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="where the trained weights are cached (default: $NEURODYN_CACHE_DIR, else "
                             "$XDG_CACHE_HOME/neurodyn, else ~/.cache/neurodyn)")
    parser.add_argument("--runs", default="runs", metavar="DIR",
                        help="load the models the demos saved under DIR/circles and DIR/latent when present "
                             "(`neurodyn demo circles`, `neurodyn demo latent`; default: runs)")
    parser.add_argument("--retrain", action="store_true", help="train the models again, ignoring the cache")
    parser.add_argument("--quick", action="store_true",
                        help="small, briefly trained models (seconds; for smoke tests, the figures are rough)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port_problem(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or --host"
    return None


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status (2 for a missing extra or an unusable address)."""
    prefix = "neurodyn explore: error:"
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        print(f"{prefix} needs FastAPI and uvicorn ({exc.name} is missing): pip install 'neurodyn[explore]'",
              file=sys.stderr)
        return 2
    problem = _port_problem(args.host, args.port)
    if problem is not None:
        print(f"{prefix} {problem}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host):
        print(f"neurodyn explore: warning: binding {args.host}, reachable from other machines; the server has no "
              f"authentication", file=sys.stderr)

    from .app import serve
    from .models import QUICK, ExploreConfig, load_or_train

    def say(line: str) -> None:
        print(f"neurodyn explore: {line}", flush=True)

    models = load_or_train(QUICK if args.quick else ExploreConfig(), cache_dir=args.cache_dir,
                           runs_dir=None if args.quick else args.runs, retrain=args.retrain, log=say)
    for note in models.source.split("; "):
        say(note)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    say(f"serving on http://{shown}:{args.port}/  (Ctrl-C to stop)")
    try:
        serve(models, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0
