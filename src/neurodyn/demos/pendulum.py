"""Learn a damped pendulum from noisy observations at irregular times, then extrapolate.

The system, with state ``z = (theta, omega)``::

    d theta / dt = omega,    d omega / dt = -(g/L) sin(theta) - gamma omega,
    g/L = 4 s^-2,  gamma = 0.2 s^-1,  theta(0) = 2 rad (a large, strongly nonlinear swing),  omega(0) = 0.

The clean truth is solved with neurodyn at rtol 1e-10 (and checked against scipy's DOP853 when scipy is
installed).  It is observed at ``n_obs + n_heldout`` random times, uniform in the training window
``[0, T_train]`` (``T_train = 10`` s, about 2.5 swings), with Gaussian noise of ``noise`` times each
component's standard deviation.  ``n_heldout`` of those times are set aside.

A Neural ODE ``dz/dt = MLP(z)`` (a generic 2-layer tanh MLP on the standardised state: no physics built in)
is fitted to the remaining observations, solved from a learned initial state at ``t = 0`` with the
irregular observation times used directly as the solver's output times (dense output, no resampling).  The
window grows from the first quarter to the whole of ``[0, T_train]`` over the first ``curriculum`` fraction
of the iterations (fitting a long oscillation from scratch otherwise stalls in a local minimum).

Reported against the clean truth: interpolation RMSE at the held-out times (and on a dense grid of the
window) and extrapolation RMSE on ``[T_train, 2 T_train]``, with two baselines: the noise level, and for
extrapolation the pendulum at rest (predicting 0).

Outputs (in ``--out``, default ``runs/pendulum``): ``metrics.json``, ``pendulum_fit.png`` (observations,
fit, extrapolation), ``pendulum_phase.png`` (phase portrait with the learned vector field) and
``loss_curve.png``.

A learned field can blow up (or stiffen) beyond the times it was trained on: an evaluation solve that stops
early keeps its partial result (NaN past the failure), training goes on, and ``metrics.json`` records the
status in ``eval_status`` / ``final_eval_status`` and ``notes``; RMSEs that need the missing times are null.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurodyn import NeuralODE, solve
from neurodyn.demos._common import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    DemoError,
    add_out_and_seed,
    failure_note,
    failures_returned,
    int_at_least,
    json_safe,
    training_failure,
)
from neurodyn.demos._common import config_from_args as _config_from_args
from neurodyn.errors import SolveFailure
from neurodyn.progress import Progress
from neurodyn.solvers import available_methods

NAME = "pendulum"
DESCRIPTION = "fit a Neural ODE to a damped pendulum observed noisily at irregular times; extrapolate"

COMPONENTS = ("theta", "omega")


# ----------------------------------------------------------------------------------------------- config
@dataclass
class PendulumConfig:
    iters: int = 1000
    seed: int = 0
    out: str = "runs/pendulum"
    quick: bool = False
    g_over_l: float = 4.0
    gamma: float = 0.2
    theta0: float = 2.0
    omega0: float = 0.0
    t_train: float = 10.0
    n_obs: int = 100
    n_heldout: int = 25
    noise: float = 0.05
    hidden: int = 64
    lr: float = 1e-2
    eta_min: float = 0.05
    window_start: float = 0.25
    curriculum: float = 0.3
    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-4
    eval_rtol: float = 1e-7
    eval_atol: float = 1e-9
    true_rtol: float = 1e-10
    true_atol: float = 1e-12
    grid: int = 801
    evals: int = 10
    threads: int = 1
    plots: bool = True


QUICK = dict(iters=40, n_obs=30, n_heldout=10, grid=201, evals=2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PendulumConfig()
    add_out_and_seed(parser, d.out, d.seed)
    parser.add_argument("--iters", type=POSITIVE_INT, default=None, metavar="N",
                        help=f"training iterations (default: {d.iters}; --quick: {QUICK['iters']})")
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds' smoke run (fewer iterations and observations; numbers not meaningful)")
    parser.add_argument("--noise", type=NON_NEGATIVE, default=d.noise,
                        help=f"noise std as a fraction of each component's std (default: {d.noise:g})")
    parser.add_argument("--n-obs", type=int_at_least(2), default=None,
                        help=f"training observations in [0, T_train] (default: {d.n_obs})")
    parser.add_argument("--t-train", type=POSITIVE, default=d.t_train,
                        help=f"end of the training window, seconds (default: {d.t_train:g})")
    parser.add_argument("--hidden", type=POSITIVE_INT, default=d.hidden, help=f"MLP hidden width (default: {d.hidden})")
    parser.add_argument("--lr", type=POSITIVE, default=d.lr, help=f"Adam learning rate (default: {d.lr:g})")
    parser.add_argument("--method", default=d.method, choices=available_methods(), metavar="METHOD",
                        help=f"ODE solver (default: {d.method})")
    parser.add_argument("--rtol", type=POSITIVE, default=d.rtol, help=f"training rtol (default: {d.rtol:g})")
    parser.add_argument("--atol", type=POSITIVE, default=d.atol, help=f"training atol (default: {d.atol:g})")
    parser.add_argument("--threads", type=POSITIVE_INT, default=d.threads,
                        help=f"torch CPU threads (default: {d.threads}: the problem is tiny)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")


def config_from_args(args: argparse.Namespace) -> PendulumConfig:
    return _config_from_args(PendulumConfig, args, QUICK)


# ----------------------------------------------------------------------------------------------- models
class DampedPendulum(nn.Module):
    """The true vector field on ``(..., 2)`` states ``(theta, omega)``."""

    def __init__(self, g_over_l: float, gamma: float):
        super().__init__()
        self.g_over_l, self.gamma = g_over_l, gamma

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        theta, omega = z[..., 0], z[..., 1]
        return torch.stack([omega, -self.g_over_l * torch.sin(theta) - self.gamma * omega], -1)


class ScaledMLPField(nn.Module):
    """``dz/dt = MLP(z)`` in standardised coordinates ``u = z / scale`` (the ODE is solved in ``u``)."""

    def __init__(self, hidden: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 2)).to(dtype)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.net(u)


# ------------------------------------------------------------------------------------------------- data
def make_data(cfg: PendulumConfig, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """Observation times (irregular), noisy observations, held-out split, clean truth on a dense grid."""
    n = cfg.n_obs + cfg.n_heldout
    t_all = torch.sort(torch.rand(n, generator=gen, dtype=dtype) * cfg.t_train).values
    if not bool((t_all[1:] > t_all[:-1]).all()) or float(t_all[0]) <= 0.0:  # pragma: no cover - measure zero
        raise RuntimeError("repeated observation times; use another --seed")
    perm = torch.randperm(n, generator=gen)
    held = torch.sort(perm[: cfg.n_heldout]).values
    train = torch.sort(perm[cfg.n_heldout:]).values

    field = DampedPendulum(cfg.g_over_l, cfg.gamma)
    z0 = torch.tensor([cfg.theta0, cfg.omega0], dtype=dtype)
    t_grid = torch.linspace(0.0, 2 * cfg.t_train, cfg.grid, dtype=dtype)

    def truth(ts: torch.Tensor) -> torch.Tensor:
        ts0 = torch.cat([torch.zeros(1, dtype=dtype), ts]) if float(ts[0]) > 0 else ts
        with torch.no_grad():
            sol = solve(field, z0, ts0, method="dopri5", rtol=cfg.true_rtol, atol=cfg.true_atol)
        return sol.ys[-ts.shape[0]:]

    clean_all = truth(t_all)
    clean_grid = truth(t_grid)
    noise_std = cfg.noise * clean_all.std(0)
    obs = clean_all + noise_std * torch.randn(clean_all.shape, generator=gen, dtype=dtype)
    return {
        "t_train": t_all[train], "y_train": obs[train], "clean_train": clean_all[train],
        "t_held": t_all[held], "y_held": obs[held], "clean_held": clean_all[held],
        "t_grid": t_grid, "clean_grid": clean_grid, "noise_std": noise_std, "z0": z0,
        "truth_check_scipy": _scipy_check(cfg, t_grid, clean_grid),
    }


def _scipy_check(cfg: PendulumConfig, t_grid: torch.Tensor, clean_grid: torch.Tensor) -> float | None:
    """Max abs difference between the neurodyn truth and scipy's DOP853 at rtol 1e-12 (None without scipy)."""
    try:
        import numpy as np
        from scipy.integrate import solve_ivp
    except ImportError:  # pragma: no cover - scipy is optional
        return None

    def f(t, z):
        return [z[1], -cfg.g_over_l * math.sin(z[0]) - cfg.gamma * z[1]]

    ts = t_grid.numpy()
    ref = solve_ivp(f, (0.0, float(ts[-1])), [cfg.theta0, cfg.omega0], method="DOP853", t_eval=ts, rtol=1e-12,
                    atol=1e-12)
    return float(np.max(np.abs(ref.y.T - clean_grid.numpy())))


def rmse(pred: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Per-component RMSE of ``(N, 2)`` arrays."""
    r = torch.sqrt(torch.mean((pred - ref) ** 2, 0))
    return {name: float(v) for name, v in zip(COMPONENTS, r)}


# -------------------------------------------------------------------------------------------------- run
def train(cfg: PendulumConfig, *, stream: Any = None) -> dict[str, Any]:
    """Run the whole demo; return the metrics dict (also written to ``<out>/metrics.json``)."""
    stream = stream if stream is not None else sys.stdout
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        dtype = torch.float64
        gen = torch.Generator().manual_seed(cfg.seed)
        d = make_data(cfg, gen, dtype)
        t_tr, y_tr = d["t_train"], d["y_train"]
        scale = y_tr.std(0)  # standardisation of the state (from the noisy training data only)
        zero = torch.zeros(1, dtype=dtype)

        torch.manual_seed(cfg.seed)
        model = NeuralODE(ScaledMLPField(cfg.hidden, dtype), output="trajectory", method=cfg.method, rtol=cfg.rtol,
                          atol=cfg.atol, autonomous=True)
        u0 = nn.Parameter((y_tr[0] / scale).clone())  # learned initial state at t = 0 (standardised)
        opt = torch.optim.Adam([*model.parameters(), u0], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.iters, 1), eta_min=cfg.lr * cfg.eta_min)

        def predict(ts: torch.Tensor) -> tuple[torch.Tensor, int, str | None]:
            """Learned states at ``ts`` (> 0, increasing) at the evaluation tolerance, the NFE, and None or
            a note on where the solve stopped (the states are then NaN past that time)."""
            model.rtol, model.atol = cfg.eval_rtol, cfg.eval_atol
            try:
                with torch.no_grad(), failures_returned(model) as failed:
                    ts0 = torch.cat([zero, ts]) if float(ts[0]) > 0 else ts
                    u = model(u0, ts0)[-ts.shape[0]:]
                    sol = failed()
            finally:
                model.rtol, model.atol = cfg.rtol, cfg.atol
            return u * scale, model.nfe_forward, None if sol is None else failure_note(sol)

        in_window = d["t_grid"] <= cfg.t_train

        def evaluate() -> dict[str, Any]:
            pred_held, _, note_held = predict(d["t_held"])
            pred_grid, nfe, note_grid = predict(d["t_grid"])
            t_reached = float(model.last_solution.t_final)  # the grid solve's: 2 * t_train unless it failed
            return {
                "interp": rmse(pred_held, d["clean_held"]),
                "interp_dense": rmse(pred_grid[in_window], d["clean_grid"][in_window]),
                "extrap": rmse(pred_grid[~in_window], d["clean_grid"][~in_window]),
                "pred_grid": pred_grid,
                "nfe": nfe,
                "t_reached": t_reached,
                "notes": [f"{what} solve stopped: {n}" for what, n in
                          (("held-out", note_held), (f"grid [0, {2 * cfg.t_train:g}]", note_grid)) if n],
            }

        print(f"neurodyn demo pendulum: {cfg.n_obs} noisy observations (+{cfg.n_heldout} held out) at irregular "
              f"times in [0, {cfg.t_train:g}], noise {cfg.noise:g} x std, {cfg.iters} iterations, {cfg.method} "
              f"rtol={cfg.rtol:g} atol={cfg.atol:g}, seed={cfg.seed}, out={out}", file=stream)
        losses: list[float] = []
        nfes: list[int] = []
        windows: list[float] = []
        eval_iters: list[int] = []
        eval_interp: list[float] = []
        eval_extrap: list[float] = []
        eval_status: list[str] = []
        notes: list[str] = []
        eval_every = max(cfg.iters // max(cfg.evals, 1), 1)
        grow = max(cfg.curriculum * cfg.iters, 1.0)
        y_tr_u = y_tr / scale
        t0 = time.perf_counter()
        bar = Progress(cfg.iters, desc="pendulum", stream=stream)
        for it in range(1, cfg.iters + 1):
            frac = min(1.0, cfg.window_start + (1.0 - cfg.window_start) * (it - 1) / grow)
            k = max(int((t_tr <= frac * cfg.t_train).sum()), min(5, t_tr.shape[0]))
            windows.append(frac * cfg.t_train)
            opt.zero_grad(set_to_none=True)
            try:
                pred = model(u0, torch.cat([zero, t_tr[:k]]))[1:]
            except SolveFailure as exc:
                bar.close()
                raise training_failure(f"iteration {it}", exc) from exc
            nfes.append(model.nfe_forward)
            loss = torch.mean((pred - y_tr_u[:k]) ** 2)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                bar.close()
                raise DemoError(f"training diverged at iteration {it} (loss={losses[-1]}); try a lower --lr")
            if it % eval_every == 0 or it == cfg.iters:
                ev = evaluate()
                eval_iters.append(it)
                eval_interp.append(ev["interp"]["theta"])
                eval_extrap.append(ev["extrap"]["theta"])
                eval_status.append("success" if not ev["notes"] else "failed")
                notes.extend(f"iteration {it}: {n}" for n in ev["notes"])  # noted; training goes on
                bar.update(loss=losses[-1], nfe=nfes[-1], interp_theta=ev["interp"]["theta"],
                           extrap_theta=ev["extrap"]["theta"])
            else:
                bar.update(loss=losses[-1], nfe=nfes[-1])
        bar.close()
        train_seconds = time.perf_counter() - t0

        ev = evaluate()
        fit_train, _, note_train = predict(t_tr)
        notes.extend(f"final: {n}" for n in ev["notes"])
        if note_train:
            notes.append(f"final: training-times solve stopped: {note_train}")
        pred_grid = ev["pred_grid"]
        extrap_mask = ~in_window
        half = d["t_grid"] <= 1.5 * cfg.t_train
        tail = max(len(nfes) // 10, 1)
        noise_std = {name: float(v) for name, v in zip(COMPONENTS, d["noise_std"])}
        interp_linear = _linear_interp(t_tr, y_tr, d["t_held"])
        metrics: dict[str, Any] = {
            "demo": NAME,
            "interpolation_rmse": ev["interp"],
            "interpolation_rmse_kind": f"learned ODE vs clean truth at the {cfg.n_heldout} held-out observation "
                                       f"times in [0, {cfg.t_train:g}]",
            "interpolation_rmse_dense": ev["interp_dense"],
            "extrapolation_rmse": ev["extrap"],
            "extrapolation_rmse_kind": f"learned ODE vs clean truth on the dense grid of ({cfg.t_train:g}, "
                                       f"{2 * cfg.t_train:g}]",
            "extrapolation_rmse_first_half": rmse(pred_grid[extrap_mask & half], d["clean_grid"][extrap_mask & half]),
            "extrapolation_rmse_second_half": rmse(pred_grid[extrap_mask & ~half],
                                                   d["clean_grid"][extrap_mask & ~half]),
            "fit_rmse_vs_clean_at_train_times": rmse(fit_train, d["clean_train"]),
            "fit_rmse_vs_noisy_observations": rmse(fit_train, y_tr),
            "noise_std": noise_std,
            "baseline_rest_extrapolation_rmse": rmse(torch.zeros_like(d["clean_grid"][extrap_mask]),
                                                     d["clean_grid"][extrap_mask]),
            "baseline_linear_interpolation_rmse": rmse(interp_linear, d["clean_held"]),
            "baseline_kinds": "rest: predict theta = omega = 0 on the extrapolation window; linear: piecewise-linear "
                              "interpolation of the noisy training observations at the held-out times",
            "learned_initial_state": (u0.detach() * scale).tolist(),
            "true_initial_state": d["z0"].tolist(),
            "truth_max_abs_diff_vs_scipy_dop853": d["truth_check_scipy"],
            "final_train_loss": losses[-1] if losses else float("nan"),
            "train_loss_kind": "MSE of the standardised state at the training observation times (growing window)",
            "nfe_forward_per_iter": sum(nfes[-tail:]) / tail,
            "nfe_forward_per_iter_kind": f"training solves (rtol {cfg.rtol:g}) over the last {tail} iterations",
            "nfe_eval_full_grid": ev["nfe"],
            "iterations": cfg.iters,
            "train_seconds": train_seconds,
            "wall_seconds": None,  # filled in below, just before writing
            "cpu_seconds": None,  # process CPU time (user + sys): steadier than wall time on a busy machine
            "seed": cfg.seed,
            "system": {"g_over_l": cfg.g_over_l, "gamma": cfg.gamma, "theta0": cfg.theta0, "omega0": cfg.omega0,
                       "t_train": cfg.t_train},
            "eval_iters": eval_iters,
            "eval_interpolation_rmse_theta": eval_interp,
            "eval_extrapolation_rmse_theta": eval_extrap,
            "eval_status": eval_status,
            "final_eval_status": "success" if not ev["notes"] and not note_train else "failed",
            "final_eval_t_reached": ev["t_reached"],
            "notes": notes,
            "dtype": str(dtype).replace("torch.", ""),
            "config": asdict(cfg),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python_version": platform.python_version(),
            "machine": platform.machine(),
        }
        plots: list[str] = []
        if cfg.plots:
            plots = _make_plots(cfg, out, d, pred_grid, model, scale, losses, eval_iters, eval_interp, stream)
        metrics["plots"] = plots
    finally:
        torch.set_num_threads(old_threads)

    metrics["wall_seconds"] = time.perf_counter() - wall0
    metrics["cpu_seconds"] = time.process_time() - cpu0
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n")
    i, e, b, n = (metrics["interpolation_rmse"], metrics["extrapolation_rmse"],
                  metrics["baseline_rest_extrapolation_rmse"], metrics["noise_std"])
    print(f"done in {metrics['wall_seconds']:.1f}s (CPU {metrics['cpu_seconds']:.1f}s): RMSE vs clean truth "
          f"(theta [rad], omega [rad/s])\n"
          f"  interpolation (held-out times): {i['theta']:.4f}, {i['omega']:.4f}   (noise std {n['theta']:.4f}, "
          f"{n['omega']:.4f})\n"
          f"  extrapolation ({cfg.t_train:g}, {2 * cfg.t_train:g}]: {e['theta']:.4f}, {e['omega']:.4f}   "
          f"(pendulum-at-rest baseline {b['theta']:.4f}, {b['omega']:.4f})\n"
          f"  {metrics['nfe_forward_per_iter']:.1f} NFE/iter forward", file=stream)
    for note in notes:
        print(f"note: {note}", file=stream)
    print(f"wrote {out / 'metrics.json'}" + "".join(f", {p}" for p in plots), file=stream)
    return metrics


def _linear_interp(t: torch.Tensor, y: torch.Tensor, tq: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``y`` (N, 2) at ``t`` to ``tq`` (constant beyond the ends)."""
    idx = torch.searchsorted(t, tq).clamp(1, t.shape[0] - 1)
    t_lo, t_hi = t[idx - 1], t[idx]
    w = ((tq - t_lo) / (t_hi - t_lo)).clamp(0.0, 1.0)[:, None]
    return y[idx - 1] * (1 - w) + y[idx] * w


# ------------------------------------------------------------------------------------------------ plots
def _make_plots(cfg, out, d, pred_grid, model, scale, losses, eval_iters, eval_interp, stream) -> list[str]:
    try:
        from neurodyn import viz

        paths = [
            _plot_fit(cfg, out / "pendulum_fit.png", d, pred_grid, viz),
            _plot_phase(cfg, out / "pendulum_phase.png", d, pred_grid, model, scale, viz),
            viz.plot_loss_curve(losses, out / "loss_curve.png", eval_iters=eval_iters, eval_values=eval_interp,
                                train_label="training loss (standardised MSE, growing window)",
                                eval_label="interpolation RMSE of theta (held-out)",
                                title=f"neurodyn pendulum demo ({cfg.iters} iters)"),
        ]
    except ImportError as exc:  # viz.MissingMatplotlib is an ImportError
        print(f"skipping plots: {exc}", file=stream)
        return []
    return [str(p) for p in paths]


def _plot_fit(cfg, path, d, pred_grid, viz) -> Any:
    fig = viz.new_figure((10.0, 6.5))
    axes = fig.subplots(2, 1, sharex=True)
    tg = d["t_grid"].numpy()
    for i, (ax, name) in enumerate(zip(axes, ("theta [rad]", "omega [rad/s]"))):
        ax.axvspan(cfg.t_train, 2 * cfg.t_train, color="0.92", label="extrapolation")
        ax.plot(tg, d["clean_grid"][:, i].numpy(), color="C0", lw=1.5, label="truth")
        ax.plot(tg, pred_grid[:, i].numpy(), color="C1", lw=1.4, ls="--", label="Neural ODE")
        ax.plot(d["t_train"].numpy(), d["y_train"][:, i].numpy(), "k.", ms=4, label="training observations")
        ax.plot(d["t_held"].numpy(), d["y_held"][:, i].numpy(), "o", mfc="none", mec="C2", ms=5,
                label="held-out observations")
        ax.axvline(cfg.t_train, color="k", lw=0.8)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=7, ncol=3)
    axes[1].set_xlabel("t [s]")
    fig.suptitle(f"damped pendulum: fit on [0, {cfg.t_train:g}] from {cfg.n_obs} noisy irregular samples, "
                 f"extrapolation to {2 * cfg.t_train:g}")
    return viz.save_figure(fig, path)


def _plot_phase(cfg, path, d, pred_grid, model, scale, viz) -> Any:
    import numpy as np

    true = d["clean_grid"].numpy()
    pred = pred_grid.numpy()
    fig = viz.new_figure((7.0, 6.0))
    ax = fig.subplots()
    reached = pred[np.isfinite(pred).all(1)]  # rows before a failed solve stopped
    lo = np.minimum(true.min(0), reached.min(0)) if len(reached) else true.min(0)
    hi = np.maximum(true.max(0), reached.max(0)) if len(reached) else true.max(0)
    pad = 0.1 * (hi - lo)
    X, Y = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], 23), np.linspace(lo[1] - pad[1], hi[1] + pad[1], 23))
    pts = torch.tensor(np.stack([X.ravel(), Y.ravel()], -1), dtype=scale.dtype)
    with torch.no_grad():
        V = (model.func(pts / scale) * scale).numpy().reshape(X.shape + (2,))
    ax.quiver(X, Y, V[..., 0], V[..., 1], color="0.75", width=0.003, angles="xy")
    ax.plot(true[:, 0], true[:, 1], color="C0", lw=1.4, label="truth [0, 2T]")
    ax.plot(pred[:, 0], pred[:, 1], color="C1", lw=1.2, ls="--", label="Neural ODE [0, 2T]")
    ax.plot(d["y_train"][:, 0].numpy(), d["y_train"][:, 1].numpy(), "k.", ms=3, label="observations")
    ax.plot(true[0, 0], true[0, 1], "ko", ms=5)
    ax.set_xlabel("theta [rad]")
    ax.set_ylabel("omega [rad/s]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("phase portrait (arrows: learned vector field)")
    return viz.save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    train(config_from_args(args))
    return 0
