"""Randomized reliability run (benchmarks/reliability.py): seeded random problems against scipy at rtol=1e-12.

Default: the first 60 problems of stream 0 (under a minute), asserting no crash, no hang, no refusal of a valid
problem and no silent wrong result (status success, out of tolerance). ``-m slow``: the full 300-problem run whose
figures are in docs/reliability.md. Three checks of the harness itself make sure it can tell a wrong result, a
hang and a crash from an ok one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("scipy")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reliability  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _check(results):
    bad = [r for r in results if r.outcome in ("crash", "hang", "wrong", "refused", "no_reference")]
    assert not bad, "\n".join(f"{r.outcome}: {r.description}: {r.detail}" for r in bad)
    counts = {o: sum(r.outcome == o for r in results) for o in reliability.OUTCOMES}
    # Most problems must really be checked against the reference (not merely fail with a status).
    assert counts["ok"] >= 0.9 * len(results), counts


def test_reliability_fast_subset():
    results = reliability.run_suite(30, seed=0, timeout=30.0)  # 300 in the slow run below
    _check(results)
    # The subset covers every family and both dtypes.
    assert {r.family for r in results} == set(reliability.FAMILY.values())
    assert {r.dtype for r in results} == {"float32", "float64"}


@pytest.mark.slow
def test_reliability_full_run():
    _check(reliability.run_suite(300, seed=0, timeout=60.0))


def _a_problem():
    p = reliability.make_problem(7, seed=0)  # rk4, float64, MLP field
    assert p.method == "rk4" and p.dtype == "float64"
    return p


def test_harness_flags_a_wrong_result(monkeypatch):
    p = _a_problem()
    assert reliability.run_problem(p).outcome == "ok"
    real = reliability.neurodyn.solve

    def off_by_a_little(*args, **kwargs):
        sol = real(*args, **kwargs)
        sol.ys = sol.ys + 1e-4  # far below plotting accuracy, far above the allowed error
        return sol

    monkeypatch.setattr(reliability.neurodyn, "solve", off_by_a_little)
    r = reliability.run_problem(p)
    assert r.outcome == "wrong" and r.ratio > 1


@pytest.mark.serial  # a wall-clock bound: `make test` runs it after the parallel part, alone
def test_harness_flags_hangs_and_crashes(monkeypatch):
    p = _a_problem()
    monkeypatch.setattr(reliability.neurodyn, "solve", lambda *a, **k: time.sleep(5))
    t0 = time.perf_counter()
    r = reliability.run_problem(p, timeout=0.5)
    assert r.outcome == "hang" and time.perf_counter() - t0 < 4

    def boom(*a, **k):
        raise IndexError("index 3 is out of bounds")

    monkeypatch.setattr(reliability.neurodyn, "solve", boom)
    r = reliability.run_problem(p)
    assert r.outcome == "crash" and "IndexError" in r.detail


def test_harness_gradient_reference():
    """The variational-equation gradient matches central finite differences of the scipy reference."""
    p = next(reliability.make_problem(k) for k in range(100) if reliability.make_problem(k).gradient)
    ref = reliability.reference(p)
    import numpy as np

    w = np.asarray(p.weights)
    fd = np.zeros(len(p.y0))
    for i in range(len(p.y0)):
        for sgn in (1, -1):
            q = reliability.make_problem(p.index, p.seed)
            q.y0 = list(p.y0)
            q.y0[i] += sgn * 1e-5
            q.gradient = None
            fd[i] += sgn * float(w @ reliability.reference(q).ys[-1]) / 2e-5
    assert np.abs(fd - ref.grad[0]).max() <= 1e-6 * max(1.0, np.abs(ref.grad[0]).max())
    assert torch.get_num_threads() == 1
