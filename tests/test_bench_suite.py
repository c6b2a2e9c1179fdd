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


def test_at_error_interpolates_log_log(monkeypatch):
    """common.at_error on a power law NFE = 100 (err / 1e-6)^(-1/5) (exact in log-log), unsorted, with a
    non-monotone tail: exact inside the range, the sweep point on a hit, None outside."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    def law(e):
        return 100.0 * (e / 1e-6) ** -0.2

    pts = [(rtol, err, law(err), 2 * law(err)) for rtol, err in
           ((1e-6, 2e-7), (1e-4, 3e-5), (1e-5, 1e-6), (1e-7, 5e-8), (1e-8, 6e-8))]
    for e in (3e-5, 1e-5, 4e-7, 5e-8):
        assert common.at_error(pts, e) == pytest.approx(law(e), rel=1e-12)
        assert common.at_error(pts, e, index=3) == pytest.approx(2 * law(e), rel=1e-12)
    assert common.at_error(pts, 1e-4) is None and common.at_error(pts, 1e-9) is None
    assert common.at_error(pts, 0.0) is None
    sys.modules.pop("common", None)


def test_suite_equal_error_section(tmp_path, monkeypatch):
    """The ee section: a 3-point sweep of the small case; the reference library (torchdiffeq without diffrax) is
    1.00 against itself at equal error, and neurodyn's interpolated NFE lies between its bracketing sweep points."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_suite

    rc = bench_suite.main(["--quick", "--cases", "small", "--sections", "ee", "--no-vdp", "--train-cases", "",
                           "--libs", "neurodyn,torchdiffeq", "--no-plots", "--out-dir", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "suite.json").read_text())
    jobs = payload["equal_error"][0]["jobs"]
    assert len(jobs) == 6 and {j["extra"]["factor"] for j in jobs} == set(bench_suite.EE_FACTORS_QUICK)
    table = bench_suite.render(tmp_path / "suite.json")[1]  # the rows re-read from the JSON, as --render does
    rows = {r["library"]: r for r in bench_suite.equal_error_rows({"groups": table["equal_error"]})}
    ref = rows["torchdiffeq"]
    assert ref["ref_library"] == "torchdiffeq" and ref["nfe_ee_vs_ref"] == pytest.approx(1.0)
    nd = rows["neurodyn eager"]
    nd_pts = sorted((j["err"], j["nfe"]) for j in jobs if j["label"] == "neurodyn eager")
    # neurodyn's error at 3.16 x rtol is above torchdiffeq's at rtol, at 1 x rtol below: bracketed
    assert nd["nfe_ee"] is not None and min(n for _, n in nd_pts) <= nd["nfe_ee"] <= max(n for _, n in nd_pts)
    assert "| small | neurodyn eager |" in (tmp_path / "suite.md").read_text()
    sys.modules.pop("bench_suite", None)
