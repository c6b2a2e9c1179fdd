"""``neurodyn demo cde``: a smoke run on a subset of JapaneseVowels (all four models, two drop rates), its metrics
against what the setup fixes (solver NFE, accuracies on the test subset, drops), and the CDE path it builds."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(importlib.util.find_spec("aeon") is None,
                                 reason="aeon (the wheel with the UEA files) is not installed")]


def test_cde_demo_help_lists_its_options(capsys):
    from neurodyn.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "cde", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--rates" in out and "--seeds" in out and "--quick" in out


def test_cde_demo_smoke(tmp_path):
    from neurodyn.cli import main

    out = tmp_path / "cde"
    assert main(["demo", "cde", "--quick", "--epochs", "1", "--cde-epochs", "1",
                 "--subset", "24", "--rates", "0", "0.5",
                 "--cde-layers", "1", "--out", str(out), "--no-plots"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    table, runs = metrics["table"], metrics["runs"]
    assert set(table) == {"NeuralCDE", "ODERNN", "GRUD", "SSM"}
    from neurodyn.data import load_uea

    T = int(max(load_uea("JapaneseVowels", s).lengths[:24].max() for s in ("train", "test")))
    for name, row in table.items():
        for rate in ("0.0", "0.5"):
            (run,) = runs[name][rate]
            assert run["seed"] == 0 and row[rate]["seeds"] == [run["accuracy"]] == [row[rate]["mean"]]
            assert math.isclose(run["accuracy"] * 24, round(run["accuracy"] * 24))  # a count over 24 test series
            assert run["params"] == row[rate]["params"] > 0
    # rk4 with step 1 on the sample grid -1, 0..T-1 (the default basepoint adds t = -1): 4 evaluations per step;
    # ODE-RNN: one Euler step per interval
    assert table["NeuralCDE"]["0.0"]["nfe_per_forward"] == 4 * T
    assert table["ODERNN"]["0.5"]["nfe_per_forward"] == T - 1
    assert table["GRUD"]["0.0"]["nfe_per_forward"] is None
    assert metrics["plots"] == []


@pytest.mark.slow
def test_cde_demo_plot_and_linear_path(tmp_path):
    from neurodyn.cli import main

    out = tmp_path / "cde"
    assert main(["demo", "cde", "--epochs", "1", "--cde-epochs", "1",
                 "--subset", "12", "--seeds", "2", "--rates", "0.3",
                 "--models", "NeuralCDE", "GRUD", "--path", "linear", "--readout", "mean", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    row = metrics["table"]["NeuralCDE"]["0.3"]
    assert [r["seed"] for r in metrics["runs"]["NeuralCDE"]["0.3"]] == [0, 1]
    assert math.isclose(row["mean"], sum(row["seeds"]) / 2)
    assert (out / "accuracy.png").stat().st_size > 0


def test_cde_demo_data_drops_whole_time_points_and_the_path_keeps_the_time_channel():
    import neurodyn.demos.cde as demo
    from neurodyn.paths.cubic import CubicPath

    cfg = demo.CDEConfig(subset=20, augment=[])  # the plain path (augmentations: a test below)
    data = demo._data(cfg)
    d = demo._with_drop(data["train"], 0.5, 7, cfg, "NeuralCDE")
    kept = d["mask"][..., 0].sum(-1)
    assert kept.tolist() == [n - math.floor(0.5 * n) for n in d["lengths"].tolist()]
    assert bool((d["mask"] == d["mask"][..., :1]).all()) and float(d["x"][d["mask"] == 0].abs().sum()) == 0
    path = CubicPath(d["t"][0], d["coeffs"])
    grid = d["t"][0]
    # the time channel is the (never dropped) scaled time; the value channels pass through each observed point
    on_grid = torch.stack([path.evaluate(s) for s in grid], 1)  # (B, T, 1 + C)
    assert torch.allclose(on_grid[..., 0], cfg.time_scale * d["t"], atol=1e-5)
    vals = on_grid[..., 1:]
    seen = d["mask"] > 0
    assert torch.allclose(vals[seen], d["x"][seen], atol=1e-5)


def test_cde_demo_merge_combines_seeds_and_refuses_other_settings(tmp_path):
    import neurodyn.demos.cde as demo
    from neurodyn.demos._common import DemoError

    def part(seed, acc, epochs=30, rates=("0.0", "0.5")):
        cfg = demo.CDEConfig(out=str(tmp_path / f"s{seed}"), seed=seed, seeds=1, rates=[float(r) for r in rates],
                             models=["NeuralCDE", "GRUD"], epochs=epochs, plots=False)
        runs = {m: {r: [{"seed": seed, "accuracy": acc[m][r], "params": 10, "nfe_per_forward": None,
                         "train_seconds": 1.0}] for r in rates} for m in cfg.models}
        demo.summarise(cfg, runs, 2.0)
        return cfg.out

    accs = [{"NeuralCDE": {"0.0": 0.9, "0.5": 0.8}, "GRUD": {"0.0": 0.95, "0.5": 0.7}},
            {"NeuralCDE": {"0.0": 0.7, "0.5": 0.9}, "GRUD": {"0.0": 0.85, "0.5": 0.8}}]
    dirs = [part(0, accs[0]), part(1, accs[1])]
    m = demo.merge(demo.CDEConfig(out=str(tmp_path / "all"), plots=False), dirs)
    assert m["config"]["seeds"] == 2 and m["config"]["epochs"] == 30 and m["seconds_total"] == 4.0
    row = m["table"]["NeuralCDE"]["0.5"]
    assert row["seeds"] == [0.8, 0.9] and math.isclose(row["mean"], 0.85)
    assert math.isclose(row["std"], math.sqrt(((0.8 - 0.85) ** 2 + (0.9 - 0.85) ** 2) / 1))
    assert m["target"] == {"within_1_point_of_best_at_0": False, "ahead_of_odernn_grud_at_0.5": True}
    with pytest.raises(DemoError, match="has seeds \\[0, 1\\], the merged runs \\[0, 1, 2\\]"):
        demo.merge(demo.CDEConfig(out=str(tmp_path / "bad"), plots=False), [*dirs, part(2, accs[0], rates=("0.0",))])
    with pytest.raises(DemoError, match="other settings \\(epochs\\)"):
        demo.merge(demo.CDEConfig(out=str(tmp_path / "bad"), plots=False), [dirs[0], part(2, accs[0], epochs=5)])


def test_cde_demo_validation_split_partitions_the_training_series():
    import neurodyn.demos.cde as demo

    split = {"y": torch.arange(30), "x": torch.arange(30.0).view(30, 1, 1)}
    tr, va = demo.split_validation(split, 0.2, seed=3)
    assert len(va["y"]) == 6 and len(tr["y"]) == 24
    assert sorted(tr["y"].tolist() + va["y"].tolist()) == list(range(30))
    assert torch.equal(va["x"].view(-1), va["y"].to(torch.float32))  # rows stay together
    tr2, va2 = demo.split_validation(split, 0.2, seed=3)
    assert torch.equal(va2["y"], va["y"])  # the same for every model and rate of a seed
    assert not torch.equal(demo.split_validation(split, 0.2, seed=4)[1]["y"], va["y"])


def test_cde_demo_selects_by_validation_and_adds_the_intensity_channel(tmp_path):
    from neurodyn.cli import main

    out = tmp_path / "cde"
    assert main(["demo", "cde", "--epochs", "2", "--cde-epochs", "2",
                 "--subset", "24", "--seeds", "1", "--rates", "0.5",
                 "--models", "NeuralCDE", "GRUD", "--val-fraction", "0.25", "--intensity", "--out", str(out),
                 "--no-plots"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("NeuralCDE", "GRUD"):
        (run,) = metrics["runs"][name]["0.5"]
        assert run["best_epoch"] in (0, 1)
        assert math.isclose(run["val_accuracy"] * 6, round(run["val_accuracy"] * 6))  # a count over 6 series
        assert math.isclose(run["accuracy"] * 24, round(run["accuracy"] * 24))
        if run["best_epoch"] == 1:  # the last epoch selected: the reported accuracy is the last epoch's
            assert run["accuracy"] == run["accuracy_last_epoch"]
    # the intensity channel: 1 + 12 + 1 channels into the CDE's vector field
    import neurodyn.demos.cde as demo

    cfg = demo.CDEConfig(subset=10, intensity=True)
    data = demo._data(cfg)
    d = demo._with_drop(data["train"], 0.5, 7, cfg, "NeuralCDE")
    x = demo.cde_input(d, cfg.time_scale, True)
    assert x.shape[-1] == data["channels"] + 2
    counts = d["mask"][..., 0].cumsum(-1)
    assert torch.allclose(x[..., 1], cfg.time_scale * counts)
    assert not bool(torch.isnan(x[..., :2]).any())


def test_cde_demo_series_path_is_each_series_own_spline_then_constant():
    import numpy as np
    import scipy.interpolate

    import neurodyn.demos.cde as demo
    from neurodyn.demos._common import DemoError
    from neurodyn.paths.cubic import CubicPath

    g = torch.Generator().manual_seed(0)
    T, lengths = 9, torch.tensor([9, 4, 6, 4, 2])
    t = torch.arange(T, dtype=torch.float64)
    vals = torch.randn(5, T, 2, generator=g, dtype=torch.float64)
    x = torch.cat([0.5 * t.expand(5, T)[..., None], vals], -1)
    x[..., 1:] = x[..., 1:].masked_fill((torch.arange(T) >= lengths[:, None])[..., None], float("nan"))  # padding
    path = CubicPath(t, demo.series_coeffs(x, t, lengths))
    for b, L in enumerate(lengths.tolist()):
        # on [0, L - 1]: scipy's natural spline of the series' own points; after: held values, the time going on
        inside = np.linspace(0.0, L - 1.0, 17)
        want = scipy.interpolate.CubicSpline(np.arange(L), vals[b, :L].numpy(), bc_type="natural")(inside)
        got = torch.stack([path.evaluate(float(s))[b, 1:] for s in inside]).numpy()
        assert np.allclose(got, want, rtol=0, atol=1e-12), b
        for s in np.linspace(L - 1.0, T - 1.0, 7):
            assert torch.allclose(path.evaluate(float(s))[b], torch.cat([torch.tensor([0.5 * s], dtype=t.dtype),
                                                                         vals[b, L - 1]]), rtol=0, atol=1e-12)
            if s > L - 1:  # (at t[L - 1] itself the derivative is the spline's, from the left)
                assert float(path.derivative(float(s))[b, 1:].abs().max()) == 0.0
    with pytest.raises(DemoError, match="every length must be in \\[2, 9\\]"):
        demo.series_coeffs(x, t, torch.tensor([9, 1, 6, 4, 2]))


def test_cde_demo_path_augmentations_cumsum_and_basepoint(tmp_path, capsys):
    import numpy as np
    import scipy.integrate

    import neurodyn.demos.cde as demo
    from neurodyn.cli import main
    from neurodyn.demos._common import DemoError

    cfg = demo.CDEConfig(subset=10, augment=["cumsum", "basepoint"], augment_channels=3, cde_hidden=32)
    data = demo._data(cfg)
    C = data["channels"]
    d = demo._with_drop(data["train"], 0.5, 7, cfg, "NeuralCDE")
    x = demo.cde_input(d, cfg.time_scale, False, cfg.augment)
    grid, lengths = demo.cde_grid(d, cfg.augment)
    T = d["t"].shape[1]
    assert x.shape == (10, T + 1, 1 + 2 * C) and torch.equal(grid, torch.arange(-1.0, T))
    assert torch.equal(lengths, d["lengths"] + 1)
    assert torch.equal(x[:, 0], torch.cat([-torch.ones(10, 1), torch.zeros(10, 2 * C)], -1))  # the basepoint
    for b in range(10):  # the integral channels: the trapezoid over each series' observed points
        seen = d["mask"][b, :, 0] > 0
        want = scipy.integrate.cumulative_trapezoid(d["x"][b, seen].numpy(), grid[1:][seen].numpy(), axis=0,
                                                    initial=0)
        assert np.allclose(x[b, 1:][seen][:, 1 + C:].numpy(), want, rtol=0, atol=1e-5)
        assert bool(torch.isnan(x[b, 1:][~seen][:, 1:]).all())
    # the learned map of the integral channels acts on the spline's coefficients as on the data (linear spline)
    torch.manual_seed(0)
    model = demo.make_model("NeuralCDE", C, data["classes"], cfg)
    with torch.no_grad():
        mapped = model._summarise(x, 1)
        assert mapped.shape[-1] == 1 + C + 3
        assert torch.allclose(model._summarise(d["coeffs"], 4), demo.series_coeffs(mapped, grid, lengths), atol=1e-5)
    fields = 32 * 32 + 32 + 2 * (32 * 32 + 32) + 32 * 32 * (1 + C + 3) + 32 * (1 + C + 3)
    assert sum(p.numel() for p in model.parameters()) == fields + (1 + C + 3) * 32 + 32 + 33 * data["classes"] + 3 * C
    assert {id(p) for p in demo.penalised_parameters(model)} == {id(p) for p in model.cde.func.parameters()} | {
        id(model.summary.weight)}
    with pytest.raises(DemoError, match="augment_channels >= 0, > 0 only with 'cumsum'"):
        demo.make_model("NeuralCDE", C, 9, demo.CDEConfig(augment=["basepoint"], augment_channels=2))
    assert main(["demo", "cde", "--augment", "basepoint", "--augment-channels", "2", "--out",
                 str(tmp_path / "bad")]) == 1  # before any work
    assert "--augment-channels 2: must be >= 0, and > 0 only with --augment cumsum" in capsys.readouterr().err
    assert main(["demo", "cde", "--augment", "none", "cumsum", "--out", str(tmp_path / "bad")]) == 1
    assert "'none' cannot be combined with an augmentation" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "metrics.json").exists()
    assert demo.CDEConfig().augment == ["cumsum", "basepoint"]  # the demo's default
    # --augment none: the plain path (time and data channels); rk4 on 0..T-1
    plain = tmp_path / "plain"
    assert main(["demo", "cde", "--epochs", "1", "--cde-epochs", "1",
                 "--subset", "12", "--seeds", "1", "--rates", "0.3", "--models",
                 "NeuralCDE", "--augment", "none", "--cde-layers", "1", "--out", str(plain), "--no-plots"]) == 0
    (run,) = json.loads((plain / "metrics.json").read_text())["runs"]["NeuralCDE"]["0.3"]
    assert json.loads((plain / "metrics.json").read_text())["config"]["augment"] == []
    T12 = int(max(demo._data(demo.CDEConfig(subset=12))[s]["lengths"].max() for s in ("train", "test")))
    assert run["nfe_per_forward"] == 4 * (T12 - 1)
    # the CLI: one epoch, both augmentations, every integral channel; rk4 takes one more step for the basepoint
    out = tmp_path / "aug"
    assert main(["demo", "cde", "--epochs", "1", "--cde-epochs", "1",
                 "--subset", "12", "--seeds", "1", "--rates", "0.3", "--models",
                 "NeuralCDE", "--augment", "cumsum", "basepoint", "--cde-layers", "1", "--cde-hidden", "32",
                 "--out", str(out), "--no-plots"]) == 0
    (run,) = json.loads((out / "metrics.json").read_text())["runs"]["NeuralCDE"]["0.3"]
    assert run["nfe_per_forward"] == 4 * T12
    assert run["params"] == (32 * 32 + 32) + 32 * 32 * (1 + 2 * C) + 32 * (1 + 2 * C) + (1 + 2 * C) * 32 + 32 \
        + 33 * data["classes"]


def test_cde_demo_extra_channels_locf_and_delta_are_linear_between_the_samples(tmp_path):
    import neurodyn.demos.cde as demo
    from neurodyn.cli import main
    from neurodyn.paths.cubic import CubicPath

    nan = float("nan")
    x = torch.tensor([[[nan, 1.0], [2.0, nan], [nan, nan], [4.0, 3.0], [nan, nan]]])
    locf, delta = demo.last_observed(x, torch.tensor([0.0, 0.5, 2.0, 3.0, 5.0]))
    assert torch.equal(locf[0], torch.tensor([[2.0, 1.0], [2.0, 1.0], [2.0, 1.0], [4.0, 3.0], [4.0, 3.0]]))
    assert torch.equal(delta[0, :, 0], torch.tensor([0.0, 0.0, 1.5, 0.0, 2.0]))  # since any channel was seen
    cfg = demo.CDEConfig(subset=10, extra=["locf", "delta"])
    data = demo._data(cfg)
    C = data["channels"]
    d = demo._with_drop(data["train"], 0.7, 3, cfg, "NeuralCDE")
    v = demo.cde_input(d, cfg.time_scale, False, cfg.augment, cfg.extra)
    grid, lengths = demo.cde_grid(d, cfg.augment)
    cols = demo.linear_columns(C, False, cfg.extra)
    assert v.shape[-1] == 1 + 3 * C + 1 and cols == list(range(1 + C, 2 + 2 * C))
    assert not bool(torch.isnan(v[..., cols]).any())
    path = CubicPath(grid, d["coeffs"])
    for b in range(10):  # the path of the extra channels: the linear interpolant of their values, then constant
        L = int(lengths[b])
        for s in (grid[0] + 0.25, grid[L // 2] + 0.5, grid[L - 1] + 0.75):
            k = min(int(torch.searchsorted(grid, s, right=True)) - 1, L - 2)
            w = min(float(s - grid[k]), 1.0)
            want = v[b, k, cols] + w * (v[b, k + 1, cols] - v[b, k, cols])
            assert torch.allclose(path.evaluate(s)[b, cols], want, atol=1e-6)
    # the CLI: both channels, the readout from the final state and path value, rk4 with half steps
    out = tmp_path / "extra"
    assert main(["demo", "cde", "--epochs", "1", "--cde-epochs", "1",
                 "--subset", "12", "--seeds", "1", "--rates", "0.5", "--models",
                 "NeuralCDE", "--extra", "locf", "delta", "--readout", "final-path", "--cde-step", "0.5",
                 "--cde-layers", "1", "--cde-hidden", "32", "--out", str(out), "--no-plots"]) == 0
    (run,) = json.loads((out / "metrics.json").read_text())["runs"]["NeuralCDE"]["0.5"]
    T12 = int(max(demo._data(demo.CDEConfig(subset=12))[s]["lengths"].max() for s in ("train", "test")))
    assert run["nfe_per_forward"] == 8 * T12
    c = 1 + 3 * C + 1  # time, data, locf, delta, integrals
    assert run["params"] == (32 * 32 + 32) + 32 * 32 * c + 32 * c + c * 32 + 32 + (32 + c + 1) * data["classes"]


def test_cde_demo_epochs_per_model(tmp_path):
    """``--cde-epochs`` sets the NeuralCDE's epochs, ``--epochs`` the other models'; ``--quick`` sets both to 6 unless
    given."""
    import argparse

    from neurodyn.cli import main
    from neurodyn.demos import cde as demo

    assert (demo.CDEConfig().cde_epochs, demo.CDEConfig().epochs) == (100, 60)  # validation's choices
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    quick = demo.config_from_args(demo.CDEConfig, parser.parse_args(["--quick"]), demo.QUICK)
    assert (quick.cde_epochs, quick.epochs) == (6, 6)
    quick = demo.config_from_args(demo.CDEConfig, parser.parse_args(["--quick", "--cde-epochs", "2"]), demo.QUICK)
    assert (quick.cde_epochs, quick.epochs) == (2, 6)
    out = tmp_path / "cde"
    assert main(["demo", "cde", "--epochs", "2", "--cde-epochs", "3", "--subset", "12", "--seeds", "1", "--rates",
                 "0.5", "--models", "NeuralCDE", "GRUD", "ODERNN", "--cde-layers", "1", "--cde-hidden", "8",
                 "--out", str(out), "--no-plots"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["cde_epochs"] == 3 and metrics["config"]["epochs"] == 2
    curves = {name: len(metrics["runs"][name]["0.5"][0]["val_curve"]) for name in ("NeuralCDE", "GRUD", "ODERNN")}
    assert curves == {"NeuralCDE": 3, "GRUD": 2, "ODERNN": 2}
