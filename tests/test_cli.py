"""Smoke tests of the ``neurodyn`` command line and the spiral demo (tiny budget, in-process)."""

from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys

import pytest

from neurodyn.cli import main
from neurodyn.progress import Progress

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

METRIC_NUMBERS = [
    "final_train_loss",
    "full_traj_mse",
    "full_traj_mae",
    "nfe_forward_per_iter",
    "iterations",
    "wall_seconds",
    "train_seconds",
    "seed",
    "rtol",
    "atol",
]


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    assert data[-8:-4] == b"IEND"


def test_spiral_demo_smoke(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "spiral"
    rc = main(["demo", "spiral", "--iters", "20", "--out", str(out)])  # seed 0: an evaluation fails (issue 12)
    assert rc == 0

    metrics = json.loads((out / "metrics.json").read_text())
    for key in METRIC_NUMBERS:
        assert key in metrics, key
        assert isinstance(metrics[key], (int, float)), key
        assert math.isfinite(metrics[key]), (key, metrics[key])
    assert metrics["iterations"] == 20
    assert metrics["seed"] == 0
    assert metrics["eval_status"][0] == "step_size_underflow" and metrics["full_traj_status"] == "success"
    assert metrics["method"] == "dopri5"
    assert metrics["nfe_forward_per_iter"] > 0
    assert metrics["full_traj_mse"] >= 0

    for name in ("trajectories.png", "phase_portrait.png", "loss_curve.png"):
        _assert_png(out / name)
    assert sorted(metrics["plots"]) == sorted(str(out / n) for n in
                                              ("trajectories.png", "phase_portrait.png", "loss_curve.png"))

    printed = capsys.readouterr().out
    assert "full-trajectory MSE" in printed
    assert "nfe=" in printed and "loss=" in printed


def test_demo_help_lists_demos(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "spiral" in capsys.readouterr().out

    assert main(["demo"]) == 2  # no demo named: prints the list, non-zero status
    assert "spiral" in capsys.readouterr().out


def test_spiral_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "spiral", "--help"])
    text = capsys.readouterr().out
    for option in ("--out", "--iters", "--seed"):
        assert option in text


def test_unknown_demo_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "no-such-demo"])
    assert exc.value.code == 2


def test_python_dash_m(tmp_path):
    res = subprocess.run([sys.executable, "-m", "neurodyn", "demo", "--help"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "spiral" in res.stdout


def test_progress_non_tty_prints_every_tenth():
    stream = io.StringIO()
    bar = Progress(100, desc="x", stream=stream, tty=False)
    for i in range(100):
        bar.update(loss=1.0 / (i + 1), nfe=14)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[-1].startswith("x  100/100") and "loss=0.0100" in lines[-1] and "nfe=14" in lines[-1]
    assert "it/s" in lines[-1]


def test_progress_tty_redraws_one_line():
    stream = io.StringIO()
    with Progress(5, desc="y", stream=stream, tty=True, refresh_hz=0) as bar:
        for _ in range(5):
            bar.update(loss=0.5)
    text = stream.getvalue()
    assert text.count("\r") >= 5 and text.endswith("\n") and text.count("\n") == 1
    assert "5/5" in text


_NO_TORCH_PROBE = """
import sys, time
t0 = time.perf_counter()
from neurodyn.cli import main
try:
    main({argv!r})
except SystemExit as exc:
    code = exc.code
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH", code, time.perf_counter() - t0, file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["--version"]])
def test_help_does_not_import_torch(argv, tmp_path):
    """`neurodyn --help`, `neurodyn demo --help` and `--version` answer without importing torch."""
    res = subprocess.run([sys.executable, "-c", _NO_TORCH_PROBE.format(argv=argv)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    marker, code, seconds = res.stderr.strip().splitlines()[-1].split()
    assert marker == "NO_TORCH" and code == "0", res.stderr
    assert float(seconds) < 2.0, f"the help took {seconds} s"  # measured 0.06-0.11 s; importing torch takes 1.5-4 s
    assert res.stdout.strip()


def test_demo_help_lists_each_demo_once():
    from neurodyn import demos

    res = subprocess.run([sys.executable, "-m", "neurodyn", "demo", "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    # argparse's list of sub-commands: one entry per line at an indent of 4 (wrapped help lines are deeper)
    listed = [line.split()[0] for line in res.stdout.splitlines() if line[:4] == "    " and line[4:5].strip()]
    assert listed == sorted(demos.DEMOS)  # every demo, each once
    text = " ".join(res.stdout.split())
    for _, desc in demos.DEMOS.values():
        assert text.count(desc) == 1, desc
