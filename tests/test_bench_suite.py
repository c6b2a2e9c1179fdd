"""Smoke test of benchmarks/bench_suite.py: one tiny run, every row accounted for, a missing peer is a row.

Runs the small protocol case only (neurodyn eager, torchdiffeq, a torchdyn made to look uninstalled), one
timed repeat, no plots, into a temporary folder; a few seconds. Skips without torchdiffeq or scipy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchdiffeq")
pytest.importorskip("scipy")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_suite_quick_small(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_suite

    real_find_spec = bench_suite.importlib.util.find_spec
    monkeypatch.setattr(bench_suite.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchdyn" else real_find_spec(name, *a))
    rc = bench_suite.main(["--quick", "--cases", "small", "--sections", "table", "--no-vdp", "--train-cases", "",
                           "--libs", "neurodyn,torchdiffeq,torchdyn", "--no-plots",
                           "--out-dir", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "suite.json").read_text())
    rows = {j["label"]: j for j in payload["table"][0]["jobs"]}
    assert set(rows) == {"neurodyn eager", "torchdiffeq", "torchdyn"}
    assert rows["torchdyn"]["note"].startswith("not installed") and rows["torchdyn"]["wall_s"] is None
    for label in ("neurodyn eager", "torchdiffeq"):
        r = rows[label]
        # dopri5 at rtol 1e-6 against DOP853 at rtol 1e-12: errors of order 1e-7 (see benchmarks/README.md)
        assert r["err"] < 1e-5 and r["nfe"] > 50 and r["wall_s"] > 0, r
    assert "| small | torchdyn |" in (tmp_path / "suite.md").read_text()
    sys.modules.pop("bench_suite", None)
