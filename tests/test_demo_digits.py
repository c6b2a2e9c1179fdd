"""The digits demo (``neurodyn demo digits``): a smoke run through the CLI, and its blocks against
independent truths (the ODE solution of the same vector field; a hand-written RK4)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import neurodyn

pytest.importorskip("sklearn")

from neurodyn import cli  # noqa: E402
from neurodyn.demos import digits  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions: a second intra-op thread only adds OpenMP contention on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(kind: str, **kw) -> digits.Classifier:
    torch.manual_seed(0)
    cfg = digits.DigitsConfig(width=8, groups=4, **kw)
    return digits.build_model(kind, cfg)


def _stem_output(model: digits.Classifier, n: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model.stem(torch.rand(n, 1, 8, 8, generator=gen).to(dtype))


def test_quick_run_writes_metrics(tmp_path):
    out = tmp_path / "digits"
    assert cli.main(["demo", "digits", "--quick", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"odenet", "resnet", "rknet", "extras"}
    for kind in digits.MODELS:
        m = metrics[kind]
        assert set(m) == set(digits.METRIC_KEYS) | {"extras"}, kind
        for key in digits.METRIC_KEYS:
            assert isinstance(m[key], (int, float)) and math.isfinite(m[key]), (kind, key, m[key])
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert isinstance(m["params"], int) and m["params"] > 0
        assert m["nfe_forward"] > 0 and m["nfe_backward"] >= 0
        assert m["peak_memory_mb"] >= 0 and m["train_seconds"] > 0
    assert metrics["resnet"]["nfe_forward"] == 6
    assert metrics["rknet"]["nfe_forward"] == 16  # 4 steps of RK4 at step 0.25
    assert metrics["odenet"]["params"] == metrics["rknet"]["params"] < metrics["resnet"]["params"]
    extras = metrics["extras"]
    for key in ("adaptive", "adaptive_tight"):
        adaptive = extras[key]
        assert len(adaptive["nfe"]) == len(adaptive["margin"]) == adaptive["n_inputs"] > 0
        assert all(n > 0 for n in adaptive["nfe"]) and all(m >= 0 for m in adaptive["margin"])
    assert extras["adaptive"]["rtol"] == 1e-3 and extras["adaptive_tight"]["rtol"] == 1e-5
    assert extras["adaptive_tight"]["nfe_mean"] > extras["adaptive"]["nfe_mean"]
    sweep = extras["tolerance_sweep"]
    assert [r["rtol"] for r in sweep] == sorted((r["rtol"] for r in sweep), reverse=True)
    assert sweep[0]["nfe_per_batch"] <= sweep[-1]["nfe_per_batch"]  # looser tolerance, no more work
    for name in ("nfe_vs_margin.png", "tolerance_sweep.png", "training_curves.png"):
        assert (out / name).stat().st_size > 1000, name


def test_odenet_block_is_the_ode_solution():
    """The ODE-Net block returns h(1) of dh/dt = f(t, h): compare it with an independent solve of the same
    field (float64, another method, 1e4x tighter tolerance).

    The field (ReLU, GroupNorm) is only piecewise smooth, so the global error of an adaptive solve is a few
    times its tolerance, and tight solves are expensive: one input keeps the reference at ~2000 NFE.
    """
    model = _model("odenet")
    block = model.block
    h0 = _stem_output(model, n=1)
    t01 = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad():
        out = block(h0)
        f64 = copy.deepcopy(block.func).to(F64)
        truth = neurodyn.solve(f64, h0.to(F64), t01, method="tsit5", rtol=1e-7, atol=1e-9).ys[-1]
    assert out.shape == h0.shape and out.dtype == torch.float32
    assert block.nfe_forward > 0
    rms = lambda x: float(x.pow(2).mean().sqrt())
    assert rms(truth - h0.to(F64)) > 0.3  # the field really moves the state
    err = out.to(F64) - truth
    assert rms(err) < 2e-2 * rms(truth) and float(err.abs().max()) < 0.05, (rms(err), float(err.abs().max()))
    # the same block at a tighter tolerance (in float64) converges to the truth
    tight = copy.deepcopy(block).to(F64)
    tight.rtol = tight.atol = 1e-5
    with torch.no_grad():
        err_tight = tight(h0.to(F64)) - truth
    assert tight.nfe_forward > block.nfe_forward
    assert float(err_tight.abs().max()) < min(5e-3, 0.3 * float(err.abs().max())), float(err_tight.abs().max())


def test_rknet_block_is_four_rk4_steps():
    """The RK-Net block is four RK4 steps of 0.25 on [0, 1], written out by hand here.  neurodyn's ``rk4``
    is Kutta's 3/8 rule (as torchdiffeq's), not the classical tableau."""
    model = _model("rknet").to(F64)
    f = model.block.func
    h = _stem_output(model).to(F64)
    with torch.no_grad():
        out = model.block(h)
        t, dt = torch.tensor(0.0, dtype=F64), 0.25
        for _ in range(4):
            k1 = f(t, h)
            k2 = f(t + dt / 3, h + dt * k1 / 3)
            k3 = f(t + 2 * dt / 3, h + dt * (k2 - k1 / 3))
            k4 = f(t + dt, h + dt * (k1 - k2 + k3))
            h = h + dt * (k1 + 3 * k2 + 3 * k3 + k4) / 8
            t = t + dt
    assert model.block.nfe_forward == 16
    torch.testing.assert_close(out, h, rtol=1e-12, atol=1e-12)


def test_resnet_is_six_separate_blocks():
    ode, res = _model("odenet"), _model("resnet")
    n_block = digits.n_params(ode.block)
    assert digits.n_params(res.block) == 6 * n_block
    assert digits.n_params(res) - digits.n_params(ode) == 5 * n_block
    h = _stem_output(res)
    with torch.no_grad():
        expected = h
        for k, f in enumerate(res.block.blocks):
            expected = expected + f(torch.tensor(k / 6), expected)
        torch.testing.assert_close(res.block(h), expected)


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(20, 30, (200,), generator=gen).tolist()  # many ties, like NFE counts
    b = torch.randn(200, generator=gen).tolist()
    b = [x - 0.05 * y for x, y in zip(b, a)]
    assert digits.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert math.isnan(digits.spearman([3, 3, 3], [1.0, 2.0, 3.0]))


@pytest.mark.slow  # 17 s on one core: three retrained variants; the regularizers have unit tests of their own
def test_quick_run_with_regularizers(tmp_path):
    """``--regularizers``: the ODE-Net retrained with RNODE, STEER and TayNODE; every variant reports finite
    accuracy and NFE under ``extras.regularizers`` (one tiny epoch; the numbers mean nothing)."""
    out = tmp_path / "digits"
    # one epoch of 7 steps (batch 48 of 320 images): the one-cycle schedule needs >= 6 steps
    argv = ["demo", "digits", "--quick", "--epochs", "1", "--batch-size", "48", "--regularizers", "--no-plots",
            "--out", str(out)]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    reg = metrics["extras"]["regularizers"]
    assert set(reg["variants"]) == {"plain", *digits.REG_VARIANTS}
    for name, v in reg["variants"].items():
        for key in digits.REG_KEYS:
            assert isinstance(v[key], (int, float)) and math.isfinite(v[key]), (name, key, v[key])
        assert 0.0 <= v["test_accuracy"] <= 1.0 and 0.0 <= v["test_accuracy_tight"] <= 1.0
        assert v["nfe_forward_end"] > 0 and v["nfe_test_batch"] > 0
        assert v["nfe_test_batch_tight"] >= v["nfe_test_batch"]  # tighter tolerance, no less work
    assert reg["variants"]["plain"]["test_accuracy"] == metrics["odenet"]["test_accuracy"]
    assert set(reg["variants"]["rnode"]["penalties_last_batch"]) == {"kinetic", "jacobian"}
    assert set(reg["variants"]["taynode"]["penalties_last_batch"]) == {"taylor"}
    assert reg["eval_rtol"] == 1e-3 and reg["eval_rtol_tight"] == 1e-5
