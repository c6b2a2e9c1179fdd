"""The ``circles`` and ``pendulum`` demos through the CLI: quick smoke runs (metrics.json keys, finite values,
plots), and a short seeded rings run in which the Augmented Neural ODE must beat the plain one.

Budgets (not asserted: wall time on a shared machine is noise): each quick run well under 30 s, the short
rings run under 40 s (measured ~7-13 s each on 2 busy CPU cores).
"""

from __future__ import annotations

import json
import math

import pytest

from neurodyn import cli, demos


def _run(args: list[str], out) -> dict:
    rc = cli.main(["demo", *args, "--out", str(out)])
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_registered():
    assert {"circles", "pendulum"} <= set(demos.DEMOS)
    for name in ("circles", "pendulum"):
        module = demos.load(name)
        assert module.NAME == name and module.DESCRIPTION


def test_circles_quick(tmp_path, capsys):
    m = _run(["circles", "--quick", "--seed", "0"], tmp_path)
    for model in ("node", "anode"):
        assert 0.0 <= m[model]["accuracy"] <= 1.0
        assert _finite(m[model]["nfe"]) and m[model]["nfe"] > 0
        assert _finite(m[model]["test_mse"])
        assert m[model]["state_dim"] == (2 if model == "node" else 7)
        assert m["map1d"][model]["state_dim"] == (1 if model == "node" else 2)
        assert _finite(m["map1d"][model]["final_loss"])
    assert len(m["history"]["node"]["nfe_history"]) == m["iterations"] == 60
    assert set(m["targets"]) >= {"anode_accuracy_ge_0.99", "anode_fewer_nfe_than_node"}
    assert _finite(m["wall_seconds"]) and _finite(m["cpu_seconds"])
    for png in ("rings_flows.png", "rings_training.png", "map1d.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "rings NODE" in capsys.readouterr().out


def test_pendulum_quick(tmp_path):
    m = _run(["pendulum", "--quick", "--seed", "0"], tmp_path)
    for key in ("interpolation_rmse", "interpolation_rmse_dense", "extrapolation_rmse", "noise_std",
                "baseline_rest_extrapolation_rmse", "baseline_linear_interpolation_rmse"):
        assert set(m[key]) == {"theta", "omega"}
        assert all(_finite(v) and v >= 0 for v in m[key].values()), key
    assert _finite(m["nfe_forward_per_iter"]) and m["nfe_forward_per_iter"] > 0
    assert m["iterations"] == 40
    if m["truth_max_abs_diff_vs_scipy_dop853"] is not None:  # the clean truth is really the pendulum
        assert m["truth_max_abs_diff_vs_scipy_dop853"] < 1e-7
    for png in ("pendulum_fit.png", "pendulum_phase.png", "loss_curve.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_circles_anode_beats_node(tmp_path):
    """300 iterations each on the full rings data, seed 0: the plain NODE cannot separate the disk from the
    ring as well as the ANODE (higher accuracy, or the same accuracy with fewer NFE); and on the 1-d map the
    NODE's loss stays at its lower bound 1 while the ANODE goes below it."""
    m = _run(["circles", "--iters", "300", "--iters-1d", "60", "--no-plots", "--seed", "0"], tmp_path)
    node, anode = m["node"], m["anode"]
    assert anode["accuracy"] > node["accuracy"] or (
        anode["accuracy"] == node["accuracy"] and anode["nfe"] < node["nfe"]
    ), (node, anode)
    assert anode["accuracy"] >= 0.99
    assert m["map1d"]["node"]["min_loss"] > 0.95
    assert m["map1d"]["anode"]["final_loss"] < 0.5


@pytest.mark.parametrize("name", ["circles", "pendulum"])
def test_help_lists_options(name, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", name, "--help"])
    text = capsys.readouterr().out
    for option in ("--out", "--seed", "--iters", "--quick"):
        assert option in text
