"""``neurodyn demo diffusion``: a score-based diffusion model (VP-SDE) on a 2-d toy density.

A score network (:class:`~neurodyn.models.diffusion.ScoreModel` over a ``depth`` x ``width`` SiLU
:class:`~neurodyn.models.flow_matching.VelocityMLP`, noise-predicting) is trained by denoising score matching
(``lambda(t) = sigma_t^2``, ``t ~ U[1e-5, 1]``) on fresh batches of the density, VP-SDE with ``beta`` linear from
0.1 to 20. Reported (``metrics.json``): exact W2 between 2,000 test points and 2,000 samples of

* the reverse-time SDE (Euler--Maruyama from ``t = 1`` down to ``eps = 1e-3``, ``--sde-steps`` steps), and
* the probability-flow ODE (dopri5 at rtol = atol = 1e-5, NFE reported),

the test NLL in nats of ``p_eps`` (``eps = 1e-5``) from the probability-flow ODE as a CNF with the exact trace, and
the training wall time (and, on 8gaussians, the exact density's NLL on the same test points). With matplotlib,
``diffusion_<dataset>.png``: model density ``exp(log p)`` on a grid, reverse-SDE samples,
probability-flow samples and trajectories.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurodyn.data.toy2d import TOY_2D, sample_2d
from neurodyn.demos._common import DemoError, add_out_and_seed, float_in, int_at_least, json_safe
from neurodyn.demos.ffjord import eight_gaussians_log_density
from neurodyn.errors import InputError
from neurodyn.models.diffusion import (
    VPSDE,
    ScoreModel,
    denoising_score_matching_loss,
    probability_flow_log_likelihood,
    probability_flow_sample,
    reverse_sde_sample,
)
from neurodyn.models.flow_matching import VelocityMLP
from neurodyn.transport import wasserstein

NAME = "diffusion"
DESCRIPTION = "score-based diffusion (VP-SDE) on a 2-d density: reverse-SDE and probability-flow samples, W2, NLL"

__all__ = ["diffusion_experiment", "train_score_model"]


def train_score_model(dataset: str, *, iters: int, batch: int = 512, lr: float = 1e-3, width: int = 128,
                      depth: int = 3, seed: int = 0, sde: VPSDE | None = None) -> dict[str, Any]:
    """Train a :class:`~neurodyn.models.diffusion.ScoreModel` on fresh ``batch`` draws of ``dataset`` by denoising
    score matching, Adam(``lr``) with a cosine decay to 0. Returns ``score``, ``sde``, ``train_seconds``,
    ``final_loss`` (mean of the last 100 losses).

    Example: ``r = train_score_model("8gaussians", iters=3000); r["score"](torch.tensor(0.5), x)``.
    """
    if dataset not in TOY_2D:
        raise InputError(f"unknown density {dataset!r}; choose from {sorted(TOY_2D)}.")
    torch.manual_seed(seed)
    sde = sde or VPSDE()
    score = ScoreModel(VelocityMLP(2, width=width, depth=depth, activation=nn.SiLU), sde)
    opt = torch.optim.Adam(score.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    gen = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(iters):
        loss = denoising_score_matching_loss(score, sample_2d(dataset, batch, generator=gen), sde)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    tail = losses[-100:]
    return {"score": score, "sde": sde, "train_seconds": seconds, "final_loss": sum(tail) / len(tail)}


def _plot(path: Path, dataset: str, score: ScoreModel, sde: VPSDE, test: torch.Tensor, sde_x: torch.Tensor,
          ode_x: torch.Tensor, seed: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lim, n = 4.5, 80
    g = torch.linspace(-lim, lim, n)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    logp, _ = probability_flow_log_likelihood(score, sde, grid, rtol=1e-4, atol=1e-4)
    traj = probability_flow_sample(score, sde, torch.randn(300, 2, generator=torch.Generator().manual_seed(seed)),
                                   n_times=30).trajectory
    fig, ax = plt.subplots(1, 4, figsize=(14, 3.6))
    ax[0].imshow(logp.exp().reshape(n, n).numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma")
    ax[0].set_title("density (probability flow)")
    for a, xs, title in ((ax[1], sde_x, "reverse-SDE samples"), (ax[2], ode_x, "probability-flow samples")):
        a.scatter(test[:, 0], test[:, 1], s=1, c="0.75")
        a.scatter(xs[:, 0], xs[:, 1], s=1, c="C0")
        a.set_title(title)
    ax[3].plot(traj[:, :, 0].numpy(), traj[:, :, 1].numpy(), c="olive", lw=0.4, alpha=0.5)
    ax[3].scatter(traj[0, :, 0], traj[0, :, 1], s=2, c="k")
    ax[3].scatter(traj[-1, :, 0], traj[-1, :, 1], s=2, c="C0")
    ax[3].set_title("probability-flow trajectories")
    for a in ax:
        a.set_xlim(-lim, lim)
        a.set_ylim(-lim, lim)
        a.set_aspect("equal")
    fig.suptitle(f"VP-SDE diffusion on {dataset}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def diffusion_experiment(out_dir: str | Path, dataset: str = "8gaussians", *, iters: int = 5000, batch: int = 512,
                         lr: float = 1e-3, width: int = 128, depth: int = 3, sde_steps: int = 1000,
                         test_n: int = 2000, seed: int = 0, quick: bool = False, plots: bool = True) -> dict[str, Any]:
    """Train a VP-SDE score model on ``dataset`` and evaluate both samplers and the likelihood; writes
    ``metrics.json`` (and the plot) in ``out_dir`` and returns the metrics. ``quick``: 200 iterations, 200 SDE
    steps, 500 test points.

    Example: ``m = diffusion_experiment("runs/diffusion", quick=True); m["w2_reverse_sde"]``.
    """
    if quick:
        iters, sde_steps, test_n = min(iters, 200), min(sde_steps, 200), min(test_n, 500)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = train_score_model(dataset, iters=iters, batch=batch, lr=lr, width=width, depth=depth, seed=seed)
    score, sde = r["score"], r["sde"]
    test = sample_2d(dataset, test_n, generator=torch.Generator().manual_seed(seed + 2))
    z = torch.randn(test_n, 2, generator=torch.Generator().manual_seed(seed + 3))
    eps_sample = 1e-3
    t0 = time.perf_counter()
    rev = reverse_sde_sample(score, sde, z, eps=eps_sample, step_size=(1 - eps_sample) / sde_steps,
                             entropy=seed + 4)
    rev_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    ode = probability_flow_sample(score, sde, z, eps=eps_sample, rtol=1e-5, atol=1e-5)
    ode_seconds = time.perf_counter() - t0
    logp, nll_nfe = probability_flow_log_likelihood(score, sde, test, eps=1e-5, rtol=1e-5, atol=1e-5)
    ref = sample_2d(dataset, test_n, generator=torch.Generator().manual_seed(seed + 5))
    metrics: dict[str, Any] = {
        "dataset": dataset,
        "settings": {"iters": iters, "batch": batch, "lr": lr, "width": width, "depth": depth,
                     "sde_steps": sde_steps, "test_n": test_n, "seed": seed, "quick": quick,
                     "beta_min": sde.beta_min, "beta_max": sde.beta_max, "eps_sample": eps_sample,
                     "eps_likelihood": 1e-5},
        "train_seconds": r["train_seconds"],
        "final_loss": r["final_loss"],
        "w2_reverse_sde": wasserstein(rev.samples, test),
        "reverse_sde_nfe": rev.nfe,
        "reverse_sde_seconds": rev_seconds,
        "w2_probability_flow": wasserstein(ode.samples, test),
        "probability_flow_nfe": ode.nfe,
        "probability_flow_seconds": ode_seconds,
        "test_nll": float(-logp.mean()),
        "nll_nfe": nll_nfe,
        "w2_data_vs_data": wasserstein(ref, test),
    }
    if dataset == "8gaussians":  # the exact density's NLL on the same test points (the floor, up to sampling)
        metrics["true_nll"] = float(-eight_gaussians_log_density(test).mean())
    print(f"[diffusion] {dataset}: nll {metrics['test_nll']:.3f} W2 reverse-SDE {metrics['w2_reverse_sde']:.3f} "
          f"W2 PF-ODE {metrics['w2_probability_flow']:.3f} (data vs data {metrics['w2_data_vs_data']:.3f}) "
          f"PF NFE {ode.nfe} train {r['train_seconds']:.1f}s", flush=True)
    if plots:
        png = out / f"diffusion_{dataset}.png"
        metrics["plot"] = str(png) if _plot(png, dataset, score, sde, test, rev.samples, ode.samples, seed) else None
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_out_and_seed(parser, "runs/diffusion", 0)
    parser.add_argument("--dataset", default="8gaussians", choices=sorted(TOY_2D), help="toy density (8gaussians)")
    parser.add_argument("--iters", type=int_at_least(1), default=5000, help="training iterations (5000)")
    parser.add_argument("--batch", type=int_at_least(1), default=512, help="batch size (512)")
    parser.add_argument("--lr", type=float_in(0.0, low_open=True), default=1e-3, help="Adam learning rate (1e-3)")
    parser.add_argument("--sde-steps", type=int_at_least(1), default=1000,
                        help="Euler-Maruyama steps of the reverse SDE (1000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (numbers not meaningful)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plot")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    try:
        diffusion_experiment(args.out, args.dataset, iters=args.iters, batch=args.batch, lr=args.lr,
                             sde_steps=args.sde_steps, seed=args.seed, quick=args.quick, plots=args.plots)
    except InputError as exc:
        raise DemoError(str(exc)) from exc
    return 0
