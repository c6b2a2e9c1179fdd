"""A bouncing ball through events with a jump map: bounce times against the closed form, and gravity and the
restitution coefficient learned from observed heights.

The ball: ``y = (height, velocity)``, ``y'' = -g``; a bounce is the height crossing 0 downward (an
:class:`~neurodyn.Event` with ``direction=-1``) with the jump ``v -> -e v``. From ``h0`` at rest the bounces are at
``t_1 = sqrt(2 h0 / g)``, ``t_{k+1} = t_k + 2 e^k v_1 / g`` (``v_1 = g t_1``).

1. Ten bounces located with ``dopri5`` at ``rtol=1e-10`` in float64, against ``t_k``.
2. Heights observed at ``--n-obs`` times in ``[0, --t-obs]`` (the closed form plus Gaussian noise of std ``--noise``)
   are fitted by ``g`` and ``e`` (started at ``--g0``, ``--e0``) with L-BFGS: each loss is a solve with the bounce
   event, whose gradient runs through the event times and the jumps (implicit function theorem).

Outputs (in ``--out``, default ``runs/bouncing_ball``): ``metrics.json``, and with matplotlib ``bouncing_ball.png``
(observations, the fitted and the true trajectories, the bounce-time errors).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

import neurodyn
from neurodyn.demos._common import POSITIVE, POSITIVE_INT, add_out_and_seed, float_in, int_at_least, json_safe

NAME = "bouncing-ball"
DESCRIPTION = "a bouncing ball through events with a jump: bounce times vs closed form; learn g and e from heights"

F64 = torch.float64


def closed_form_bounces(g: float, e: float, h0: float, k: int) -> list[float]:
    """The first ``k`` bounce times of a ball dropped from rest at height ``h0``.

    >>> [round(t, 6) for t in closed_form_bounces(9.81, 0.5, 1.0, 2)]
    [0.451524, 0.903047]
    """
    t1 = math.sqrt(2.0 * h0 / g)
    v1 = g * t1
    out = [t1]
    for j in range(1, k):
        out.append(out[-1] + 2.0 * e ** j * v1 / g)
    return out


def closed_form_height(t: float, g: float, e: float, h0: float) -> float:
    """The height at time ``t`` (floats).

    >>> round(closed_form_height(0.1, 9.81, 0.8, 1.0), 6)
    0.95095
    """
    ts = closed_form_bounces(g, e, h0, 200)
    if t < ts[0]:
        return h0 - 0.5 * g * t * t
    k = max(i for i in range(len(ts)) if ts[i] <= t)
    v = e ** (k + 1) * g * ts[0]
    s = t - ts[k]
    return v * s - 0.5 * g * s * s


def ball_solve(g: torch.Tensor | float, e: torch.Tensor | float, h0: float, t: torch.Tensor, *, rtol: float = 1e-10,
               atol: float = 1e-12, gradient: str = "direct", on_failure: str = "raise") -> neurodyn.Solution:
    """Solve the bouncing ball (gravity ``g``, restitution ``e``, from rest at ``h0``) at the times ``t`` (``(T,)``).

    Returns the :class:`~neurodyn.Solution`: ``sol.ys`` ``(T, 2)`` (height, velocity), ``sol.events.t`` the bounce
    times, ``sol.events.y`` the states just before each bounce. The bounces accumulate at
    ``t_1 (1 + 2 e / (1 - e))``: there the solve stops with status ``"zeno"`` (raised, or returned with
    ``on_failure="return"``: the rows after it NaN).

    >>> sol = ball_solve(9.81, 0.8, 1.0, torch.tensor([0.0, 1.0], dtype=torch.float64))
    >>> len(sol.events), round(float(sol.events.t[0]), 6)
    (1, 0.451524)
    """
    def field(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[1], -g * torch.ones_like(y[1])])

    bounce = neurodyn.Event(lambda tt, y: y[0], direction=-1, terminal=False,
                            jump=lambda tt, y: torch.stack([y[0], -e * y[1]]))
    params = [p for p in (g, e) if isinstance(p, torch.Tensor) and p.requires_grad]
    y0 = torch.tensor([h0, 0.0], dtype=F64)
    return neurodyn.solve(field, y0, t, events=[bounce], rtol=rtol, atol=atol, gradient=gradient,
                          params=params if gradient != "direct" else None, on_failure=on_failure)


def experiment(out_dir: str | Path = "runs/bouncing_ball", *, g_true: float = 9.81, e_true: float = 0.8,
               h0: float = 1.0, n_obs: int = 80, t_obs: float = 3.0, noise: float = 1e-4, g0: float = 9.0,
               e0: float = 0.75, iters: int = 60, seed: int = 0, plots: bool = True,
               stream: Any = None) -> dict[str, Any]:
    """Run the demo (see the module docstring) and return its metrics (also written to ``<out_dir>/metrics.json``).

    Returns
    -------
    dict
        ``bounce_time_max_error`` (10 bounces, float64, against the closed form), ``g_learned``, ``e_learned``,
        their absolute errors, the loss history, ``zeno_trials`` (trial parameters of the line search whose bounces
        accumulate inside the window: the ball is at rest after the Zeno time), NFE and timings.

    Examples
    --------
    >>> m = experiment("/tmp/nd_ball", iters=5, plots=False, stream=open("/dev/null", "w"))  # doctest: +SKIP
    >>> m["bounce_time_max_error"] < 1e-9                                                 # doctest: +SKIP
    True
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    metrics: dict[str, Any] = {"g_true": g_true, "e_true": e_true, "h0": h0}

    # 1. bounce times against the closed form
    exact = closed_form_bounces(g_true, e_true, h0, 10)
    with torch.no_grad():
        sol = ball_solve(g_true, e_true, h0, torch.tensor([0.0, exact[-1] + 0.01], dtype=F64))
    found = sol.events.t.tolist()
    errors = [abs(a - b) for a, b in zip(found, exact)]
    metrics.update(bounces_found=len(found), bounce_times=found, bounce_times_exact=exact,
                   bounce_time_errors=errors, bounce_time_max_error=max(errors) if len(found) == 10 else math.inf,
                   bounce_solve_nfe=sol.stats["nfe"], bounce_solve_steps=sol.stats["steps"])
    print(f"10 bounces: max |t_k - closed form| = {metrics['bounce_time_max_error']:.2e} "
          f"({sol.stats['steps']} steps, {sol.stats['nfe']} NFE)", file=stream)

    # 2. learn g and e from noisy heights
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.0, t_obs, n_obs + 1, dtype=F64)
    clean = torch.tensor([closed_form_height(float(x), g_true, e_true, h0) for x in t], dtype=F64)
    obs = clean + noise * torch.randn(clean.shape, generator=gen, dtype=F64)
    g = torch.tensor(g0, dtype=F64, requires_grad=True)
    e = torch.tensor(e0, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([g, e], lr=1.0, max_iter=iters, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=20, line_search_fn="strong_wolfe")
    losses: list[float] = []
    nfe = [0]

    zeno = [0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        s = ball_solve(g, e, h0, t, rtol=1e-9, atol=1e-11, on_failure="return")
        nfe[0] += s.stats["nfe"]
        heights = s.ys[:, 0]
        if s.status == "zeno":  # trial parameters whose bounces accumulate inside the window: at rest after it
            zeno[0] += 1
            heights = torch.where(torch.isnan(heights), torch.zeros((), dtype=F64), heights)
        elif s.status != "success":
            raise RuntimeError(f"the ball's solve failed: {s.message}")
        loss = (heights - obs).pow(2).mean()
        loss.backward()
        losses.append(float(loss.detach()))
        return loss

    fit0 = time.perf_counter()
    opt.step(closure)
    fit_s = time.perf_counter() - fit0
    g_hat, e_hat = float(g.detach()), float(e.detach())
    metrics.update(n_obs=n_obs + 1, t_obs=t_obs, noise_std=noise, g_init=g0, e_init=e0, g_learned=g_hat,
                   e_learned=e_hat, g_abs_error=abs(g_hat - g_true), e_abs_error=abs(e_hat - e_true),
                   recovered_within_1e_3=abs(g_hat - g_true) <= 1e-3 and abs(e_hat - e_true) <= 1e-3,
                   loss_evaluations=len(losses), zeno_trials=zeno[0], losses=losses,
                   final_loss=losses[-1] if losses else math.nan,
                   fit_nfe=nfe[0], fit_seconds=fit_s)
    print(f"learned from {n_obs + 1} heights (noise std {noise:g}): g = {g_hat:.6f} (true {g_true}, error "
          f"{abs(g_hat - g_true):.1e}), e = {e_hat:.6f} (true {e_true}, error {abs(e_hat - e_true):.1e}) in "
          f"{len(losses)} solves, {fit_s:.1f}s", file=stream)

    files = []
    if plots:
        try:
            files.append(str(_plot(out / "bouncing_ball.png", t, obs, g_hat, e_hat, g_true, e_true, h0, t_obs,
                                   exact, errors)))
        except ImportError as exc:  # matplotlib is optional
            print(f"note: no plot ({exc})", file=stream)
    metrics["plots"] = files
    metrics["wall_seconds"] = time.perf_counter() - wall0
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n")
    print(f"wrote {out / 'metrics.json'}" + "".join(f", {p}" for p in files), file=stream)
    return metrics


def _plot(path: Path, t: torch.Tensor, obs: torch.Tensor, g_hat: float, e_hat: float, g_true: float,
          e_true: float, h0: float, t_obs: float, exact: list[float], errors: list[float]) -> Path:
    from neurodyn.viz import new_figure, save_figure

    grid = torch.linspace(0.0, t_obs, 600, dtype=F64)
    with torch.no_grad():
        fit = ball_solve(g_hat, e_hat, h0, grid).ys[:, 0]
    true = [closed_form_height(float(x), g_true, e_true, h0) for x in grid]
    fig = new_figure((10, 3.6))
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[2.2, 1])
    ax1.plot(grid.numpy(), true, color="0.6", lw=3, label="true")
    ax1.plot(grid.numpy(), fit.numpy(), color="C1", lw=1.2, label=f"fitted (g={g_hat:.4f}, e={e_hat:.4f})")
    ax1.plot(t.numpy(), obs.numpy(), ".", color="C0", ms=3, label="observed heights")
    ax1.set(xlabel="t", ylabel="height", title="bouncing ball: heights and the fitted solve")
    ax1.legend(fontsize=8)
    ax2.semilogy(range(1, len(errors) + 1), [max(x, 1e-17) for x in errors], "o-")
    ax2.axhline(1e-9, color="r", ls="--", lw=0.8, label="target 1e-9")
    ax2.set(xlabel="bounce k", ylabel="|t_k - closed form|", title="bounce times (float64)")
    ax2.legend(fontsize=8)
    return save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_out_and_seed(parser, "runs/bouncing_ball", 0)
    parser.add_argument("--noise", type=float_in(0.0), default=1e-4, help="std of the height noise (default: 1e-4)")
    parser.add_argument("--n-obs", type=int_at_least(2), default=80, help="observation intervals (default: 80)")
    parser.add_argument("--t-obs", type=POSITIVE, default=3.0, help="observation window end (default: 3)")
    parser.add_argument("--g0", type=POSITIVE, default=9.0, help="initial gravity (default: 9)")
    parser.add_argument("--e0", type=float_in(0.0, 1.0, low_open=True), default=0.75,
                        help="initial restitution (default: 0.75)")
    parser.add_argument("--iters", type=POSITIVE_INT, default=60, help="L-BFGS iterations (default: 60)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plot")


def run(args: argparse.Namespace) -> int:
    experiment(args.out, noise=args.noise, n_obs=args.n_obs, t_obs=args.t_obs, g0=args.g0, e0=args.e0,
               iters=args.iters, seed=args.seed, plots=args.plots)
    return 0
