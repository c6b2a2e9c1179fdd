"""The demos at their users' edges: evaluation solves that fail, bad numeric options, an unwritable --out."""

from __future__ import annotations

import json
import math

import pytest
import torch

from neurodyn import NeuralODE
from neurodyn.cli import main
from neurodyn.demos import digits, pendulum, spiral
from neurodyn.demos._common import DemoError
from neurodyn.errors import StepSizeUnderflow

F64 = torch.float64


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# ------------------------------------------------------------------------------ failed evaluation solves
def test_evaluate_trajectory_keeps_the_part_before_a_blow_up():
    """dz/dt = z**2 from z0 = (1, 0.5): z = z0 / (1 - t z0) blows up at t = 1 (first component)."""
    t = torch.linspace(0.0, 2.0, 201, dtype=F64)
    z0 = torch.tensor([1.0, 0.5], dtype=F64)
    tt = t[:, None]
    truth = torch.where(tt < 1, z0 / (1 - tt * z0), torch.zeros((), dtype=F64))
    sol, rec = spiral.evaluate_trajectory(lambda t, z: z**2, z0, t, truth, method="dopri5", rtol=1e-10,
                                          atol=1e-12)
    assert rec["status"] == sol.status == "step_size_underflow"
    assert abs(rec["t_reached"] - 1.0) < 1e-6
    assert rec["valid_rows"] == int((t < 1).sum()) == 100
    assert rec["mse"] is None and "step_size_underflow" in rec["note"]
    assert rec["mse_reached"] < 1e-12  # the rows reached match the closed form
    assert bool(sol.ys[100:].isnan().all())

    decay = z0 * torch.exp(-tt)
    _, rec = spiral.evaluate_trajectory(lambda t, z: -z, z0, t, decay, method="dopri5", rtol=1e-10, atol=1e-12)
    assert rec["status"] == "success" and rec["note"] is None and rec["t_reached"] == 2.0
    assert rec["mse"] < 1e-20 and rec["mse"] == rec["mse_reached"]


@pytest.mark.parametrize("iters", [2, 5])
def test_spiral_short_run_records_failed_evaluations(tmp_path, capsys, iters):
    """Issue 12: an untrained field blows up in the full-trajectory evaluation (seed 0 does, at iteration 1);
    the run finishes, metrics.json records each evaluation's status and time reached."""
    out = tmp_path / "spiral"
    assert main(["demo", "spiral", "--iters", str(iters), "--out", str(out), "--no-plots"]) == 0
    m = _strict_json(out / "metrics.json")
    assert m["seed"] == 0 and m["iterations"] == iters
    assert len(m["eval_status"]) == len(m["eval_full_traj_mse"]) == len(m["eval_t_reached"]) == len(m["eval_iters"])
    assert m["eval_status"][0] == "step_size_underflow"
    for status, mse, t_reached in zip(m["eval_status"], m["eval_full_traj_mse"], m["eval_t_reached"]):
        if status == "success":
            assert mse is not None and mse >= 0 and t_reached == 25.0
        else:
            assert mse is None and 0 < t_reached < 25.0
    failed_evals = sum(s != "success" for s in m["eval_status"])
    assert sum("full-trajectory solve stopped" in n for n in m["notes"]) == failed_evals + (
        m["full_traj_status"] != "success")
    if m["full_traj_status"] == "success":
        assert m["full_traj_mse"] >= 0 and m["full_traj_t_reached"] == 25.0
    else:
        assert m["full_traj_mse"] is None and m["full_traj_t_reached"] < 25.0
        assert m["full_traj_mse_reached"] >= 0
    assert math.isfinite(m["final_train_loss"])
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err and "note: iteration 1: full-trajectory solve stopped" in printed.out


def test_pendulum_extrapolation_blow_up_is_recorded(tmp_path, monkeypatch):
    """A field d(theta)/dt = 0.1 (1 + theta**2) (standardised) trains on [0, 2.5] and blows up at
    t* = (pi/2 - atan(u0)) / 0.1 inside the extrapolation window: the demo finishes, records the failure and
    the time reached (= t*), keeps the interpolation RMSE and nulls the extrapolation RMSE."""
    def blow_up(self, u):
        return torch.stack([0.1 * (1 + u[..., 0] ** 2), 0.0 * u[..., 1]], -1) + 0.0 * self.net(u)

    monkeypatch.setattr(pendulum.ScaledMLPField, "forward", blow_up)
    out = tmp_path / "pendulum"
    assert main(["demo", "pendulum", "--quick", "--iters", "1", "--out", str(out), "--no-plots"]) == 0
    m = _strict_json(out / "metrics.json")
    assert m["eval_status"] == ["failed"] and m["final_eval_status"] == "failed"
    cfg = pendulum.config_from_args(pendulum.argparse.Namespace(quick=True, iters=1))
    scale = pendulum.make_data(cfg, torch.Generator().manual_seed(0))["y_train"].std(0)
    u0 = m["learned_initial_state"][0] / float(scale[0])
    t_star = (math.pi / 2 - math.atan(u0)) / 0.1
    assert 10.0 < t_star < 20.0
    assert abs(m["final_eval_t_reached"] - t_star) < 1e-4
    assert m["extrapolation_rmse"] == {"theta": None, "omega": None}
    assert all(math.isfinite(v) for v in m["interpolation_rmse"].values())
    assert any("step_size_underflow" in n for n in m["notes"])


def test_digits_accuracy_counts_failed_batches_as_wrong():
    """Logits z(2) of dz/dt = z**2: a batch with a positive entry x blows up (at t = 1/x < 2) and counts as
    misclassified; the others decay monotonically (z(2) = x / (1 - 2x) increases with x), so argmax(x) is
    their prediction."""
    gen = torch.Generator().manual_seed(0)
    x = -torch.rand(12, 10, generator=gen, dtype=F64)
    y = x.argmax(1)
    y[1] = (y[1] + 1) % 10  # one wrong label in the first batch
    x[7, 3] = 0.9  # the second batch (rows 4..7) blows up at t = 1/0.9
    model = NeuralODE(lambda z: z**2, t=(0.0, 2.0), autonomous=True, rtol=1e-8, atol=1e-10)
    failures: list[str] = []
    acc = digits.accuracy(model, x, y, 4, failures)
    assert acc == pytest.approx(7 / 12)  # 3 right in batch 1, 0 in batch 2 (failed), 4 in batch 3
    assert len(failures) == 1 and failures[0].startswith("images 4..7: step_size_underflow")
    assert "on_failure" not in model.solve_options  # restored
    with pytest.raises(StepSizeUnderflow):  # outside the evaluation a failure still raises
        model(x[4:8])


# --------------------------------------------------------------------------------------- bad options
BAD_OPTIONS = [
    ("spiral", ["--iters", "0"], "--iters"),
    ("spiral", ["--iters", "-5"], "--iters"),
    ("spiral", ["--rtol", "0"], "--rtol"),
    ("spiral", ["--lr", "-1e-3"], "--lr"),
    ("spiral", ["--batch-size", "0"], "--batch-size"),
    ("spiral", ["--batch-time", "1"], "--batch-time"),
    ("spiral", ["--grow-from", "1.5"], "--grow-from"),
    ("spiral", ["--method", "nope"], "--method"),
    ("circles", ["--iters", "0"], "--iters"),
    ("circles", ["--iters-1d", "-1"], "--iters-1d"),
    ("circles", ["--hidden", "0"], "--hidden"),
    ("circles", ["--atol", "nan"], "--atol"),
    ("pendulum", ["--iters", "-2"], "--iters"),
    ("pendulum", ["--noise", "-0.1"], "--noise"),
    ("pendulum", ["--n-obs", "1"], "--n-obs"),
    ("pendulum", ["--t-train", "0"], "--t-train"),
    ("digits", ["--epochs", "0"], "--epochs"),
    ("digits", ["--epochs", "-1"], "--epochs"),
    ("digits", ["--width", "0"], "--width"),
    ("digits", ["--batch-size", "-8"], "--batch-size"),
    ("digits", ["--steer-b", "1"], "--steer-b"),
    ("digits", ["--reg-kinetic", "-1"], "--reg-kinetic"),
]


@pytest.mark.parametrize(("demo", "args", "option"), BAD_OPTIONS)
def test_bad_numeric_options_are_one_line_errors(tmp_path, capsys, demo, args, option):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["demo", demo, "--out", str(out), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"neurodyn demo {demo}: error: argument {option}")
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()  # rejected before any work


def test_digits_width_must_fit_the_groups(tmp_path, capsys):
    assert main(["demo", "digits", "--width", "12", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("neurodyn demo digits: error: --width must be a multiple of 8 "
                                               "(the GroupNorm groups), got 12")


def test_zero_noise_is_accepted():
    """--noise 0 (fit the clean trajectory) is a valid setting, unlike a negative one."""
    parser = pendulum.argparse.ArgumentParser()
    pendulum.add_arguments(parser)
    assert parser.parse_args(["--noise", "0"]).noise == 0.0


@pytest.mark.parametrize("demo", ["spiral", "circles", "pendulum", "digits"])
def test_unwritable_out_is_a_one_line_error(tmp_path, capsys, demo):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for out, reason in ((blocker, "it exists and is not a directory"),
                        (blocker / "sub", "a part of the path is a file, not a directory")):
        assert main(["demo", demo, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == (f"neurodyn demo {demo}: error: cannot write to --out {str(out)!r}: {reason}; "
                       "choose another directory\n")


@pytest.mark.parametrize("exc", [DemoError("training diverged at iteration 3 (loss=nan); try a lower --lr"),
                                 StepSizeUnderflow("step size underflow at t=1.5:\n the step fell",
                                                   status="step_size_underflow", t=1.5)])
def test_a_run_that_cannot_go_on_is_a_one_line_error(tmp_path, capsys, monkeypatch, exc):
    def fail(cfg, **kw):
        raise exc

    monkeypatch.setattr(spiral, "train", fail)
    assert main(["demo", "spiral", "--iters", "3", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("neurodyn demo spiral: error: ")
    assert " ".join(str(exc).split()) in err
