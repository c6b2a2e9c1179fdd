"""Learn a 2-d cubic spiral with a Neural ODE.

The system (the classic torchdiffeq ``ode_demo``, written as a column-vector ODE)::

    dz/dt = A z**3   (elementwise cube),   A = [[-0.1, 2.0], [-2.0, -0.1]],   z(0) = [2, 0],   t in [0, 25]

A "true" trajectory is sampled at ``data_size`` (1000) evenly spaced times by solving that ODE with
neurodyn at tight tolerance (rtol 1e-10).  A Neural ODE ``dz/dt = MLP(z**3)`` is fitted to it from random
windows of the trajectory (minibatches of ``batch_size`` windows of ``batch_time`` consecutive samples,
each solved from its first sample), by backpropagating through the solver (``neurodyn.solve``) with Adam.
Short windows alone fit the field only roughly: over t in [0, 25] a 1% error in the small damping term
already shifts the phase visibly.  So for the last 20% of the run the windows grow linearly to the whole
trajectory.  At the end the learned ODE is solved from z(0) over the whole interval and compared with the
data: that full-trajectory MSE is the number to look at.

An untrained (or badly trained) field can blow up before t = 25: such an evaluation solve stops with a
status (e.g. ``step_size_underflow``) instead of reaching the end. Training goes on; ``metrics.json`` records
the status, the time reached and the MSE over the times reached, and the full-trajectory MSE is null.
A training solve that fails (a long window late in a short run) skips that step, noted likewise;
``MAX_SKIPPED_IN_A_ROW`` failures in a row stop the run with a one-line error.

Outputs (in ``--out``, default ``runs/spiral``): ``metrics.json``, ``trajectories.png`` (x(t), y(t)),
``phase_portrait.png`` and ``loss_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurodyn import solve
from neurodyn.demos._common import (
    POSITIVE,
    POSITIVE_INT,
    DemoError,
    add_out_and_seed,
    failure_note,
    float_in,
    int_at_least,
    training_failure,
)
from neurodyn.errors import SolveFailure
from neurodyn.progress import Progress
from neurodyn.solution import Solution
from neurodyn.solvers import available_methods

NAME = "spiral"
DESCRIPTION = "fit a Neural ODE to the 2-d cubic spiral dz/dt = A z^3 (plots + metrics.json)"

TRUE_A = ((-0.1, 2.0), (-2.0, -0.1))
#: Stop (DemoError) when this many consecutive training solves fail: the field is not coming back.
MAX_SKIPPED_IN_A_ROW = 20
TRUE_Z0 = (2.0, 0.0)


# ----------------------------------------------------------------------------------------------- models
class CubicSpiral(nn.Module):
    """The ground-truth vector field ``dz/dt = A z**3`` (acts on the last dimension)."""

    def __init__(self, A: Any = TRUE_A, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.register_buffer("A", torch.as_tensor(A, dtype=dtype))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (z**3) @ self.A.T


class ODEFunc(nn.Module):
    """The learned vector field: a one-hidden-layer MLP (SiLU) on the features ``z**3``."""

    def __init__(self, dim: int = 2, hidden: int = 50):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.1)
                nn.init.zeros_(m.bias)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(z**3)


# ----------------------------------------------------------------------------------------------- config
@dataclass
class SpiralConfig:
    iters: int = 1000
    seed: int = 0
    out: str = "runs/spiral"
    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-7
    lr: float = 1e-2  # Adam; cosine-annealed to lr * lr_final_frac
    lr_final_frac: float = 0.01
    batch_size: int = 64
    batch_time: int = 20  # samples per training window (t spacing 25/999)
    grow_from: float = 0.8  # from this fraction of the run on, windows grow linearly to the whole trajectory
    data_size: int = 1000
    t_end: float = 25.0
    hidden: int = 50
    true_rtol: float = 1e-10
    true_atol: float = 1e-12
    threads: int = 1
    evals: int = 10  # full-trajectory evaluations during training
    plots: bool = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SpiralConfig()
    add_out_and_seed(parser, d.out, d.seed)
    parser.add_argument("--iters", type=POSITIVE_INT, default=d.iters, metavar="N",
                        help=f"training iterations (default: {d.iters})")
    parser.add_argument("--method", default=d.method, choices=available_methods(), metavar="METHOD",
                        help=f"ODE solver for training (default: {d.method})")
    parser.add_argument("--rtol", type=POSITIVE, default=d.rtol, help=f"training rtol (default: {d.rtol:g})")
    parser.add_argument("--atol", type=POSITIVE, default=d.atol, help=f"training atol (default: {d.atol:g})")
    parser.add_argument("--lr", type=POSITIVE, default=d.lr, help=f"Adam learning rate (default: {d.lr:g})")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=d.batch_size,
                        help=f"sub-trajectories per minibatch (default: {d.batch_size})")
    parser.add_argument("--batch-time", type=int_at_least(2), default=d.batch_time,
                        help=f"samples per sub-trajectory at the start (default: {d.batch_time})")
    parser.add_argument("--grow-from", type=float_in(0.0, 1.0), default=d.grow_from, metavar="FRAC",
                        help="fraction of the run after which the windows grow linearly to the whole "
                             f"trajectory; 1 disables growing (default: {d.grow_from})")
    parser.add_argument("--threads", type=POSITIVE_INT, default=d.threads,
                        help=f"torch CPU threads (default: {d.threads}; the work is many tiny ops, "
                             "for which more threads are slower)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")


def validate(cfg: SpiralConfig) -> None:
    """Raise ``ValueError`` saying what is wrong with ``cfg``, if anything."""
    if cfg.iters < 1:
        raise ValueError(f"--iters must be >= 1, got {cfg.iters}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if not 2 <= cfg.batch_time <= cfg.data_size:
        raise ValueError(f"--batch-time must be in [2, {cfg.data_size}], got {cfg.batch_time}")
    if not 0.0 <= cfg.grow_from <= 1.0:
        raise ValueError(f"--grow-from must be in [0, 1], got {cfg.grow_from}")
    for name in ("rtol", "atol", "lr"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(cfg, name)}")


def config_from_args(args: argparse.Namespace) -> SpiralConfig:
    names = {f.name for f in fields(SpiralConfig)}
    return SpiralConfig(**{k: v for k, v in vars(args).items() if k in names})


# -------------------------------------------------------------------------------------------------- run
def make_data(cfg: SpiralConfig, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the true trajectory: ``t`` of shape (data_size,), ``z`` of shape (data_size, 2)."""
    t = torch.linspace(0.0, cfg.t_end, cfg.data_size, dtype=dtype)
    z0 = torch.tensor(TRUE_Z0, dtype=dtype)
    with torch.no_grad():
        sol = solve(CubicSpiral(dtype=dtype), z0, t, method="dopri5", rtol=cfg.true_rtol, atol=cfg.true_atol)
    if sol.status != "success":
        raise RuntimeError(f"generating the true spiral failed: status={sol.status!r}")
    return t, sol.ys


def evaluate_trajectory(func: Any, z0: torch.Tensor, t: torch.Tensor, z_true: torch.Tensor, *, method: str,
                        rtol: float, atol: float) -> tuple[Solution, dict[str, Any]]:
    """Solve the learned ODE from ``z0`` at the times ``t`` (T,) without gradients, keeping a partial result
    when the solve fails (``on_failure="return"``: NaN rows past the failure), and compare it with ``z_true``
    (T, 2).

    Returns the :class:`~neurodyn.solution.Solution` and a record: ``status``, ``t_reached``, ``valid_rows``,
    ``mse`` (over all T times; None unless the solve succeeded), ``mse_reached`` (over the rows reached) and
    ``note`` (None on success, else one line saying where the solve stopped).

    Example::

        sol, rec = evaluate_trajectory(func, z_true[0], t, z_true, method="dopri5", rtol=1e-5, atol=1e-7)
        rec["status"], rec["mse"]      # ('success', 0.012) or ('step_size_underflow', None)
    """
    with torch.no_grad():
        sol = solve(func, z0, t, method=method, rtol=rtol, atol=atol, on_failure="return")
    n = sol.n_valid if not sol.success else t.shape[0]
    err = (sol.ys[:n] - z_true[:n]) ** 2
    record = {
        "status": sol.status,
        "t_reached": float(sol.t_final),
        "valid_rows": int(n),
        "mse": float(torch.mean(err)) if sol.success else None,
        "mse_reached": float(torch.mean(err)) if n else None,
        "note": None if sol.success else failure_note(sol),
    }
    return sol, record


def window_length(cfg: SpiralConfig, it: int) -> int:
    """Samples per training window at iteration ``it`` (1-based): ``batch_time``, then growing linearly
    to the whole trajectory over the last ``1 - grow_from`` of the run."""
    if cfg.grow_from >= 1.0 or cfg.iters <= 0:
        return min(cfg.batch_time, cfg.data_size)
    frac = min(max((it / cfg.iters - cfg.grow_from) / (1.0 - cfg.grow_from), 0.0), 1.0)
    return min(int(round(cfg.batch_time + (cfg.data_size - cfg.batch_time) * frac)), cfg.data_size)


def get_batch(t: torch.Tensor, z: torch.Tensor, batch_size: int, length: int, gen: torch.Generator):
    """Random windows of ``length`` samples: initial states (B, 2), window times (T,), targets (T, B, 2)."""
    starts = torch.randint(0, len(t) - length + 1, (batch_size,), generator=gen)
    idx = starts[None, :] + torch.arange(length)[:, None]  # (T, B)
    return z[starts], t[:length] - t[0], z[idx]


def train(cfg: SpiralConfig, *, stream: Any = None) -> dict[str, Any]:
    """Run the whole demo; return the metrics dict (also written to ``<out>/metrics.json``)."""
    stream = stream if stream is not None else sys.stdout
    validate(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()

    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        dtype = torch.float64

        t, z_true = make_data(cfg, dtype)
        z0 = z_true[0]

        func = ODEFunc(hidden=cfg.hidden).to(dtype)
        opt = torch.optim.Adam(func.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.iters, 1),
                                                           eta_min=cfg.lr * cfg.lr_final_frac)

        def full_trajectory() -> tuple[Solution, dict[str, Any]]:
            return evaluate_trajectory(func, z0, t, z_true, method=cfg.method, rtol=cfg.rtol, atol=cfg.atol)

        print(
            f"neurodyn demo spiral: {cfg.iters} iterations, method={cfg.method}, rtol={cfg.rtol:g}, "
            f"atol={cfg.atol:g}, {cfg.batch_size} windows of {cfg.batch_time} samples"
            + (f" growing to {cfg.data_size} after {cfg.grow_from:.0%} of the run" if cfg.grow_from < 1 else "")
            + f", seed={cfg.seed}, out={out}",
            file=stream,
        )
        losses: list[float] = []
        nfes: list[int] = []
        eval_iters: list[int] = []
        eval_mse: list[float | None] = []
        eval_status: list[str] = []
        eval_t_reached: list[float] = []
        eval_notes: list[str] = []
        skipped: list[int] = []  # iterations whose training solve failed (no optimizer step)
        train_notes: list[str] = []
        in_a_row = 0
        eval_every = max(cfg.iters // max(cfg.evals, 1), 1)
        train0 = time.perf_counter()
        bar = Progress(cfg.iters, desc="spiral", stream=stream)
        for it in range(1, cfg.iters + 1):
            length = window_length(cfg, it)
            batch_z0, batch_t, batch_z = get_batch(t, z_true, cfg.batch_size, length, gen)
            opt.zero_grad(set_to_none=True)
            try:
                sol = solve(func, batch_z0, batch_t, rtol=cfg.rtol, atol=cfg.atol, method=cfg.method)
            except SolveFailure as exc:
                # a long window can outlast a still-untrained field: skip this step (noted), keep training
                nfes.append(int(exc.solution.stats["nfe"]) if exc.solution is not None else 0)
                losses.append(math.nan)
                sched.step()
                skipped.append(it)
                train_notes.append(f"iteration {it}: training solve stopped ({exc.status} at t={exc.t:.6g} of "
                                   f"a {length}-sample window), step skipped")
                in_a_row += 1
                if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    bar.close()
                    raise training_failure(f"{in_a_row} iterations in a row (the last: {it})", exc) from exc
            else:
                in_a_row = 0
                nfes.append(int(sol.stats["nfe"]))  # the solver's count of vector-field evaluations
                loss = torch.mean((sol.ys - batch_z) ** 2)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                if not math.isfinite(losses[-1]):
                    bar.close()
                    raise DemoError(f"training diverged at iteration {it} (loss={losses[-1]}); try a lower --lr")
            shown = {"loss": losses[-1] if in_a_row == 0 else "skipped", "nfe": nfes[-1], "window": length}
            if it % eval_every == 0 or it == cfg.iters:
                _, rec = full_trajectory()
                eval_iters.append(it)
                eval_mse.append(rec["mse"])
                eval_status.append(rec["status"])
                eval_t_reached.append(rec["t_reached"])
                if rec["note"] is not None:  # an untrained field can blow up: note it, keep training
                    eval_notes.append(f"iteration {it}: full-trajectory solve stopped: {rec['note']}")
                shown["full_mse"] = rec["mse"] if rec["mse"] is not None else f"failed@t={rec['t_reached']:.3g}"
            bar.update(**shown)
        bar.close()
        train_seconds = time.perf_counter() - train0

        sol_full, final = full_trajectory()
        nfe_full = int(sol_full.stats["nfe"])
        z_pred = sol_full.ys
        mse = final["mse"]
        n_ok = final["valid_rows"]
        mae = float(torch.mean(torch.abs(z_pred - z_true))) if sol_full.success else None
        # the learned field again, solved far more accurately than in training
        _, tight = evaluate_trajectory(func, z0, t, z_true, method="dopri5", rtol=cfg.true_rtol,
                                       atol=cfg.true_atol)
        notes = train_notes + eval_notes
        if final["note"] is not None:
            notes.append(f"final full-trajectory solve stopped: {final['note']}; full_traj_mse is null, "
                         "full_traj_mse_reached covers the times reached (train longer: more --iters)")
        if tight["note"] is not None:
            notes.append(f"final tight solve stopped: {tight['note']}")
        taken = [v for v in losses if math.isfinite(v)]
        if not taken:
            raise DemoError(f"every training solve failed ({len(skipped)} of {cfg.iters} iterations), so nothing "
                            "was trained; try more --iters (the windows start short), a lower --lr or looser "
                            "--rtol/--atol")
        tail = taken[-max(len(taken) // 20, 1):]

        plots: list[str] = []
        if cfg.plots:
            ok = [(i, v) for i, v in zip(eval_iters, eval_mse) if v is not None]
            plots = _make_plots(cfg, out, t, z_true, z_pred, n_ok, func, losses, [i for i, _ in ok],
                                [v for _, v in ok], stream)

        metrics: dict[str, Any] = {
            "demo": NAME,
            "final_train_loss": taken[-1],
            "final_train_loss_tail_mean": sum(tail) / len(tail),
            "train_loss_kind": "MSE on random windows of the trajectory (last window length below)",
            "final_window": window_length(cfg, cfg.iters),
            "full_traj_mse": mse,
            "full_traj_mae": mae,
            "full_traj_status": final["status"],
            "full_traj_t_reached": final["t_reached"],
            "full_traj_mse_reached": final["mse_reached"],
            "full_traj_mse_tight_solve": tight["mse"],
            "full_traj_tight_solve_status": tight["status"],
            "nfe_forward_per_iter": sum(nfes) / len(nfes),
            "nfe_forward_per_iter_max": max(nfes),
            "nfe_full_trajectory": nfe_full,
            "iterations": cfg.iters,
            "iterations_skipped": skipped,
            "train_seconds": train_seconds,
            "wall_seconds": None,  # filled in below, just before writing
            "seed": cfg.seed,
            "method": cfg.method,
            "rtol": cfg.rtol,
            "atol": cfg.atol,
            "true_rtol": cfg.true_rtol,
            "true_atol": cfg.true_atol,
            "dtype": str(dtype).replace("torch.", ""),
            "eval_iters": eval_iters,
            "eval_full_traj_mse": eval_mse,
            "eval_status": eval_status,
            "eval_t_reached": eval_t_reached,
            "notes": notes,
            "config": asdict(cfg),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python_version": platform.python_version(),
            "plots": plots,
        }
    finally:
        torch.set_num_threads(old_threads)

    metrics["wall_seconds"] = time.perf_counter() - wall0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    full = (f"full-trajectory MSE {mse:.3e} (MAE {mae:.3e})" if mse is not None else
            f"full-trajectory solve failed ({final['note']})")
    print(
        f"done in {metrics['wall_seconds']:.1f}s: final train loss {metrics['final_train_loss']:.3e}, {full}, "
        f"{metrics['nfe_forward_per_iter']:.1f} NFE/iter forward",
        file=stream,
    )
    for note in notes:
        print(f"note: {note}", file=stream)
    print(f"wrote {out / 'metrics.json'}" + "".join(f", {p}" for p in plots), file=stream)
    return metrics


def _make_plots(cfg, out, t, z_true, z_pred, n_ok, func, losses, eval_iters, eval_mse, stream) -> list[str]:
    try:
        from neurodyn import viz
    except ImportError as exc:  # pragma: no cover
        print(f"skipping plots: {exc}", file=stream)
        return []

    title = f"neurodyn spiral demo ({cfg.iters} iters, {cfg.method})"
    vlines = []
    if cfg.grow_from < 1.0 and cfg.iters > 0:
        vlines.append((cfg.grow_from * cfg.iters, "windows start growing to the whole trajectory"))
    try:
        paths = [
            viz.plot_trajectories(t, z_true, z_pred, out / "trajectories.png", title=title),
            viz.plot_phase_portrait(z_true, z_pred[:n_ok], out / "phase_portrait.png", field=func,
                                    title=title),
            viz.plot_loss_curve(losses, out / "loss_curve.png", eval_iters=eval_iters, eval_values=eval_mse,
                                vlines=vlines, title=title),
        ]
    except viz.MissingMatplotlib as exc:
        print(f"skipping plots: {exc}", file=sys.stderr)
        return []
    return [str(p) for p in paths]


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        validate(cfg)
    except ValueError as exc:
        print(f"neurodyn demo spiral: error: {exc}", file=sys.stderr)
        return 2
    train(cfg)
    return 0
