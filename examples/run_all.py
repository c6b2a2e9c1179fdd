"""Run every example (``examples/[0-9][0-9]_*.py``), each in its own process with a time limit; fail if any fails.

    python examples/run_all.py [--quick] [--out DIR] [--timeout SECONDS] [--only NAME ...]

Prints each example's wall and CPU time (user + system: steadier than wall time on a shared machine) and its last
output line (its measured number), then the totals. Exit status 1 if an example exits non-zero (a failed check
included) or runs past ``--timeout``. ``make examples`` runs it with ``--quick`` (CI).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run each example with --quick")
    parser.add_argument("--out", default=str(HERE / "_out"), help="figure folder passed to every example")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per example (default 180)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only the examples whose name contains one of these")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("[0-9][0-9]_*.py"))
    if args.only:
        scripts = [s for s in scripts if any(k in s.stem for k in args.only)]
    if not scripts:
        print("no example matched", file=sys.stderr)
        return 2
    env = dict(os.environ, MPLBACKEND="Agg")
    src = HERE.parent / "src"
    if src.is_dir():  # run against this checkout's package even when it is not installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
    failures, total, total_cpu = [], 0.0, 0.0
    for script in scripts:
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cmd = [sys.executable, str(script), "--out", args.out] + (["--quick"] if args.quick else [])
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            status = f"FAILED (over {args.timeout:g} s)"
            output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        seconds = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        total += seconds
        total_cpu += cpu
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith("wrote ")] \
            if status == "ok" else []
        print(f"{script.stem:<30} {seconds:6.1f} s wall {cpu:6.1f} s CPU  {status}  {lines[-1] if lines else ''}",
              flush=True)
        if status != "ok":
            failures.append(script.stem)
            print("\n".join("    " + ln for ln in output.splitlines()[-25:]), flush=True)
    print(f"{len(scripts)} examples, {total:.1f} s wall, {total_cpu:.1f} s CPU in total"
          f"{' (quick mode)' if args.quick else ''}; "
          f"{len(failures)} failed{': ' + ', '.join(failures) if failures else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
