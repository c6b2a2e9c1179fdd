"""``neurodyn demo cde``: the batched per-series spline (against the per-length reference it replaced, to the bit),
the per-batch re-drop of the NeuralCDE's training series (``--redrop``) and the EMA of the weights
(``--ema-decay``, ``--ema-models``)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread")
needs_aeon = pytest.mark.skipif(importlib.util.find_spec("aeon") is None,
                                reason="aeon (the wheel with the UEA files) is not installed")


def _reference_series_coeffs(x, t, lengths):
    """The demo's earlier ``series_coeffs``: one ``natural_cubic_coeffs`` call per distinct length (without
    ``lengths``; its missing-value path is checked against the per-row loop in ``tests/test_cubic_missing.py``), then
    the constant pieces after each series' end."""
    from neurodyn.paths.cubic import natural_cubic_coeffs
    from neurodyn.paths.fill import fill_missing

    B, T, C = x.shape
    out = torch.zeros(B, T - 1, 4 * C, dtype=x.dtype)
    for L in sorted(set(lengths.tolist())):
        rows = (lengths == L).nonzero().squeeze(-1)
        xs = x[rows, :L]
        out[rows, :L - 1] = natural_cubic_coeffs(xs, t[:L])
        if L < T:
            end = fill_missing(xs, t[:L])[:, -1]
            slope = out[rows, L - 2, C]
            a = end[:, None, :].repeat(1, T - L, 1)
            a[..., 0] = end[:, None, 0] + slope[:, None] * (t[L - 1:T - 1] - t[L - 1])
            b = torch.zeros_like(a)
            b[..., 0] = slope[:, None]
            out[rows, L - 1:] = torch.cat([a, b, torch.zeros_like(a), torch.zeros_like(a)], -1)
    return out


def test_series_coeffs_batched_equals_the_per_length_reference_bitwise_on_random_holes():
    import neurodyn.demos.cde as demo

    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        B, T, C = 40, 11, 4
        t = torch.arange(T, dtype=dtype) - 1.0
        lengths = torch.randint(2, T + 1, (B,), generator=g)
        x = torch.randn(B, T, C, generator=g, dtype=dtype)
        x[..., 0] = 0.5 * t  # the complete time channel
        holes = torch.rand(B, T, C, generator=g) < 0.5  # per channel, leading / trailing / interior holes alike
        holes[..., 0] = False
        holes[:3, :, 2] = True  # a few channels never observed
        x = x.masked_fill(holes | (torch.arange(T)[:, None] >= lengths[:, None, None]), float("nan"))
        x[..., 0] = 0.5 * t
        got = demo.series_coeffs(x, t, lengths)
        want = _reference_series_coeffs(x, t, lengths)
        assert torch.equal(got, want)


@needs_aeon
def test_series_coeffs_batched_equals_the_reference_on_the_demo_paths():
    import neurodyn.demos.cde as demo

    cfg = demo.CDEConfig(subset=60)
    data = demo._data(cfg)
    for rate in (0.0, 0.5, 0.7):
        d = demo._with_drop(data["train"], rate, 11, cfg, "GRUD")  # the dropped data, no path yet
        grid, lengths = demo.cde_grid(d, cfg.augment)
        v = demo.cde_input(d, cfg.time_scale, False, cfg.augment)
        assert torch.equal(demo.series_coeffs(v, grid, lengths), _reference_series_coeffs(v, grid, lengths))


def test_redrop_drops_whole_observed_time_points_and_keeps_at_least_two():
    import neurodyn.demos.cde as demo

    g = torch.Generator().manual_seed(0)
    B, T, C = 200, 12, 3
    mask = (torch.rand(B, T, 1, generator=g) < 0.6).to(torch.float32).expand(B, T, C).clone()
    mask[:5] = 0
    mask[:5, :3] = 1  # 3 observed points: often fewer than 2 left
    x = torch.randn(B, T, C, generator=g) * mask
    d = {"mask": mask, "x": x, "y": torch.arange(B)}
    r = demo.redrop(d, 0.2, torch.Generator().manual_seed(5))
    assert r["y"] is d["y"]
    kept = r["mask"][..., 0]
    assert bool((r["mask"] == kept[..., None]).all())  # whole time points
    assert bool((r["mask"] <= mask).all()) and torch.equal(r["x"], x * r["mask"])  # only observed points go
    n_before, n_after = mask[..., 0].sum(-1), kept.sum(-1)
    assert bool(((n_after >= 2) | (n_after == n_before)).all())
    dropped = float((n_before - n_after).sum() / n_before.sum())
    assert 0.12 < dropped < 0.28  # about the probability (the fallback keeps a few)
    # deterministic in the generator; p close to 1 leaves fewer than 2 points, so every series is kept whole
    assert torch.equal(demo.redrop(d, 0.2, torch.Generator().manual_seed(5))["mask"], r["mask"])
    assert torch.equal(demo.redrop(d, 0.999, torch.Generator().manual_seed(5))["mask"], mask)


def test_ema_of_starts_at_the_weights_and_takes_the_running_average():
    """Hand-computed: after two updates with weights ``w0 + 1`` then ``w0 + 3``, the average is
    ``0.9 (0.9 w0 + 0.1 (w0 + 1)) + 0.1 (w0 + 3)``; floating buffers are averaged too (``use_buffers=True``).
    ``ema_of`` lives in ``demos._common`` (the cde and latent demos use it)."""
    import neurodyn.demos._common as demo

    model = torch.nn.Linear(3, 2)
    model.register_buffer("level", torch.tensor([2.0]))
    w0 = model.weight.detach().clone()
    ema = demo.ema_of(model, 0.9)
    assert torch.equal(ema.module.weight, w0) and int(ema.n_averaged) == 1  # started at the current weights
    with torch.no_grad():
        model.weight.add_(1.0)
        model.level.fill_(12.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, w0 + 0.1, rtol=0, atol=1e-6)
    assert torch.allclose(ema.module.level, torch.tensor([3.0]), rtol=0, atol=1e-6)  # 0.9 * 2 + 0.1 * 12
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update_parameters(model)
    want = 0.9 * (0.9 * w0 + 0.1 * (w0 + 1.0)) + 0.1 * (w0 + 3.0)
    assert torch.allclose(ema.module.weight, want, rtol=0, atol=1e-6)
    assert not torch.allclose(ema.module.weight, model.weight)  # not the raw weights


@needs_aeon
def test_train_one_validates_an_ema_started_at_the_initial_weights_two_steps(monkeypatch):
    """19 training series in batches of 10: two optimizer steps in the one epoch; the weights validated are
    ``d (d w0 + (1 - d) w1) + (1 - d) w2`` with ``w0`` the initial weights, ``w1, w2`` the raw ones after each step
    (the EMA's first ``update_parameters`` is made on ``w0`` before training)."""
    from torch.optim.swa_utils import AveragedModel

    import neurodyn.demos.cde as demo

    d = 0.8
    cfg = demo.CDEConfig(subset=24, epochs=1, cde_epochs=1, batch_size=10,
                         ema_decay=d, ema_models=["NeuralCDE", "GRUD"],
                         cde_layers=1, redrop=0.3)
    data = demo._data(cfg)
    update, accuracy = AveragedModel.update_parameters, demo._accuracy
    for name in ("NeuralCDE", "GRUD"):
        raw, seen = [], []

        def record_update(self, model, raw=raw):
            raw.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            update(self, model)

        def record_accuracy(model, split, batch=128, seen=seen):
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return accuracy(model, split, batch)

        monkeypatch.setattr(AveragedModel, "update_parameters", record_update)
        monkeypatch.setattr(demo, "_accuracy", record_accuracy)
        res = demo.train_one(name, cfg, data, 0.5, seed=3)
        assert res["ema"] is True and res["best_epoch"] == 0
        torch.manual_seed(3)
        w0 = demo.make_model(name, data["channels"], data["classes"], cfg).state_dict()
        assert len(raw) == 3  # the initial weights, then one per optimizer step
        for k, v in seen[0].items():  # seen[0]: the validation after the epoch
            assert torch.equal(raw[0][k], w0[k]), (name, k)
            want = d * (d * w0[k] + (1 - d) * raw[1][k]) + (1 - d) * raw[2][k]
            assert torch.allclose(v, want, rtol=1e-6, atol=1e-7), (name, k)
        assert any(not torch.allclose(seen[0][k], raw[2][k]) for k in w0)  # not the raw weights
    # a model not among ema_models trains and is evaluated on its raw weights
    monkeypatch.undo()
    res = demo.train_one("ODERNN", cfg, data, 0.5, seed=3)
    assert res["ema"] is False


@needs_aeon
def test_cde_demo_cli_redrop_and_ema(tmp_path, capsys):
    from neurodyn.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "cde", "--help"])
    help_text = capsys.readouterr().out
    assert "--redrop" in help_text and "--ema-decay" in help_text and "--ema-models" in help_text
    out = tmp_path / "cde"
    assert main(["demo", "cde", "--epochs", "1", "--cde-epochs", "1",
                 "--subset", "24", "--seeds", "1", "--rates", "0.5",
                 "--models", "NeuralCDE", "GRUD", "--cde-layers", "1", "--redrop", "0.2", "--ema-decay", "0.9",
                 "--ema-models", "NeuralCDE", "--out", str(out), "--no-plots"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["redrop"] == 0.2 and metrics["config"]["ema_decay"] == 0.9
    assert metrics["runs"]["NeuralCDE"]["0.5"][0]["ema"] is True
    assert metrics["runs"]["GRUD"]["0.5"][0]["ema"] is False
    with pytest.raises(SystemExit):
        main(["demo", "cde", "--redrop", "1.0"])
