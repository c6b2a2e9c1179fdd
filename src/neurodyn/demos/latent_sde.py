"""Latent SDE on the stochastic Lorenz attractor (Li et al. 2020): posterior samples vs data, ELBO, KL.

Data (``neurodyn.data.stochastic_lorenz``): ``--n-series`` paths of the stochastic Lorenz system (Ito, multiplicative
noise 0.15) on ``[0, 1]`` at ``--n-points`` equally spaced times, normalised per channel, observation noise 0.01;
80% train, 20% test.

Model (``neurodyn.models.LatentSDE``): GRU encoder run from the last observation to the first, 4 latent dims,
posterior drift conditioned on the context, prior drift ``h``, diagonal diffusion shared by both, Gaussian (or
``--likelihood laplace``) decoder of scale 0.01; Euler--Maruyama steps of ``--dt`` (``--method``), the KL term
``logqp`` integrated as an extra channel of the posterior solve. Adam (``--lr``), KL weight annealed linearly from 0
to 1 over the first ``--kl-anneal`` iterations.

Outputs (``--out``, default ``runs/latent-sde``): ``metrics.json`` (train ELBO / log-likelihood / KL per iteration
logged, test ELBO pieces, test MSE of the posterior mean of ``--samples`` samples, wall time, drift evaluations), and
with matplotlib ``posterior.png`` (posterior samples vs the data for three test series, each channel) and
``prior.png`` (prior samples).
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

from neurodyn.data import stochastic_lorenz
from neurodyn.demos._common import (
    POSITIVE,
    POSITIVE_INT,
    DemoError,
    add_out_and_seed,
    config_from_args,
    json_safe,
)
from neurodyn.errors import SolveFailure
from neurodyn.models import LatentSDE

NAME = "latent-sde"
DESCRIPTION = "latent SDE on the stochastic Lorenz attractor: ELBO, KL, posterior samples vs data (metrics.json)"


@dataclass
class LatentSDEConfig:
    out: str = "runs/latent-sde"
    seed: int = 0
    n_series: int = 1024
    n_points: int = 50
    t_max: float = 1.0
    iters: int = 1000
    budget: float = 600.0  # seconds of training at most
    batch_size: int = 256
    lr: float = 1e-2
    kl_anneal: int = 300
    latent_size: int = 4
    context_size: int = 64
    hidden_size: int = 64
    method: str = "euler"
    dt: float = 0.02
    likelihood: str = "gaussian"
    samples: int = 10
    log_every: int = 25
    threads: int = 1
    plots: bool = True
    quick: bool = False


QUICK = {"n_series": 128, "n_points": 20, "iters": 30, "budget": 15.0, "batch_size": 64, "kl_anneal": 20,
         "context_size": 16, "hidden_size": 32, "dt": 0.05, "samples": 4, "log_every": 10}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LatentSDEConfig()
    add_out_and_seed(parser, d.out, d.seed)
    parser.add_argument("--n-series", type=POSITIVE_INT, default=None, help=f"series (default: {d.n_series})")
    parser.add_argument("--n-points", type=POSITIVE_INT, default=None, help=f"times per series ({d.n_points})")
    parser.add_argument("--iters", type=POSITIVE_INT, default=None, help=f"training iterations ({d.iters})")
    parser.add_argument("--budget", type=POSITIVE, default=None, help=f"training seconds at most ({d.budget:g})")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=None, help=f"series per batch ({d.batch_size})")
    parser.add_argument("--lr", type=POSITIVE, default=None, help=f"Adam learning rate ({d.lr:g})")
    parser.add_argument("--kl-anneal", type=POSITIVE_INT, default=None, help=f"KL warm-up iterations ({d.kl_anneal})")
    parser.add_argument("--method", choices=("euler", "milstein", "srk"), default=None, help=f"SDE method ({d.method})")
    parser.add_argument("--dt", type=POSITIVE, default=None, help=f"SDE step size ({d.dt:g})")
    parser.add_argument("--likelihood", choices=("gaussian", "laplace"), default=None,
                        help=f"observation likelihood ({d.likelihood})")
    parser.add_argument("--samples", type=POSITIVE_INT, default=None, help=f"posterior samples at test ({d.samples})")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help=f"torch threads ({d.threads})")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (128 series, 30 iterations, < 30 s)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", default=None, help="skip the PNG plots")


def _evaluate(model: LatentSDE, ts: torch.Tensor, xs: torch.Tensor, samples: int, seed: int) -> dict[str, float]:
    """Test ELBO pieces (one posterior sample per series, averaged) and the MSE of the posterior mean."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.elbo(xs, ts)
        recon = torch.stack([model(xs, ts) for _ in range(samples)]).mean(0)
    return {"elbo": float(out["elbo"].mean()), "log_lik": float(out["log_lik"].mean()),
            "kl": float(out["kl"].mean()), "kl0": float(out["kl0"].mean()), "logqp": float(out["logqp"].mean()),
            "mse_posterior_mean": float(((recon - xs) ** 2).mean())}


def _plot(model: LatentSDE, ts: torch.Tensor, xs: torch.Tensor, out: Path, seed: int) -> list[str]:
    from neurodyn import viz

    torch.manual_seed(seed)
    with torch.no_grad():
        post = torch.stack([model(xs[:, :3], ts) for _ in range(20)])  # (20, T, 3, D)
        prior = model.sample_prior(ts, 20)  # (T, 20, D)
    t = ts.numpy()
    fig = viz.new_figure((10.0, 7.0))
    axes = fig.subplots(3, 3, sharex=True)
    for i in range(3):
        for c in range(3):
            ax = axes[i][c]
            for s in range(post.shape[0]):
                ax.plot(t, post[s, :, i, c].numpy(), color="C1", lw=0.6, alpha=0.4)
            ax.plot(t, post[:, :, i, c].mean(0).numpy(), color="C1", lw=1.5, label="posterior mean")
            ax.plot(t, xs[:, i, c].numpy(), "k.", ms=3, label="data")
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"channel {'xyz'[c]}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("latent SDE: posterior samples (20) vs data, three test series")
    paths = [str(viz.save_figure(fig, out / "posterior.png"))]
    fig = viz.new_figure((6.0, 5.0))
    ax = fig.add_subplot(projection="3d")
    for s in range(prior.shape[1]):
        ax.plot(*[prior[:, s, c].numpy() for c in range(3)], lw=0.8)
    ax.set_title("latent SDE: prior samples")
    paths.append(str(viz.save_figure(fig, out / "prior.png")))
    return paths


def train(cfg: LatentSDEConfig) -> dict[str, Any]:
    """Train, evaluate, write ``metrics.json`` (and plots); returns the metrics."""
    torch.set_num_threads(cfg.threads)
    if cfg.n_series < 10:
        raise DemoError("need --n-series >= 10 (80% train, 20% test)")
    if cfg.n_points < 2:
        raise DemoError("need --n-points >= 2")
    torch.manual_seed(cfg.seed)
    ts, xs = stochastic_lorenz(cfg.n_series, cfg.n_points, cfg.t_max, seed=cfg.seed,
                               dt=min(1e-3 if not cfg.quick else 5e-3, cfg.t_max / (cfg.n_points - 1)))
    n_train = int(0.8 * cfg.n_series)
    x_train, x_test = xs[:, :n_train], xs[:, n_train:]
    model = LatentSDE(3, cfg.latent_size, cfg.context_size, cfg.hidden_size, likelihood=cfg.likelihood,
                      method=cfg.method, step_size=cfg.dt)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.999)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    curve: list[dict[str, float]] = []
    nfe = steps_taken = 0
    start = time.perf_counter()
    it = 0
    first_loss = last_loss = math.nan
    for it in range(1, cfg.iters + 1):
        idx = torch.randperm(n_train, generator=g)[: cfg.batch_size]
        kl_weight = min(1.0, it / cfg.kl_anneal)
        try:
            out = model.elbo(x_train[:, idx], ts, kl_weight=kl_weight)
        except SolveFailure as exc:
            raise DemoError(f"the posterior solve failed at iteration {it}: {exc}; try a smaller --dt or --lr") \
                from exc
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise DemoError(f"the loss is not finite at iteration {it}: try a smaller --lr or --dt")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        sol = model.last_solution
        nfe += int(sol.stats["nfe"])
        steps_taken += int(sol.stats.get("steps", 0))
        last_loss = float(loss.detach())
        if it == 1:
            first_loss = last_loss
        if it % cfg.log_every == 0 or it == 1:
            curve.append({"iter": it, "loss": last_loss, "elbo": float(out["elbo"].detach().mean()),
                          "log_lik": float(out["log_lik"].detach().mean()), "kl": float(out["kl"].detach().mean()),
                          "kl_weight": kl_weight, "seconds": time.perf_counter() - start})
        if time.perf_counter() - start > cfg.budget:
            break
    wall = time.perf_counter() - start
    test = _evaluate(model, ts, x_test, cfg.samples, cfg.seed + 2)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {
        "config": asdict(cfg),
        "iterations": it,
        "train": {"first_loss": first_loss, "last_loss": last_loss, "curve": curve},
        "test": test,
        "wall_seconds": wall,
        "seconds_per_iter": wall / max(it, 1),
        "nfe_drift_forward": nfe,
        "steps": steps_taken,
        "data_variance": float(x_test.var()),
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "threads": cfg.threads},
    }
    plots: list[str] = []
    if cfg.plots:
        try:
            plots = _plot(model, ts, x_test, out_dir, cfg.seed + 3)
        except ImportError as exc:
            print(f"skipping plots: {exc}", file=sys.stderr)
    metrics["plots"] = plots
    (out_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1, allow_nan=False))
    print(f"latent SDE: {it} iterations in {wall:.1f} s; test ELBO {test['elbo']:.1f} (log-lik {test['log_lik']:.1f}, "
          f"KL {test['kl']:.2f}), posterior-mean MSE {test['mse_posterior_mean']:.4f} (data variance "
          f"{metrics['data_variance']:.3f}); wrote {out_dir / 'metrics.json'}")
    return metrics


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(LatentSDEConfig, args, QUICK)
    if not math.isfinite(cfg.budget):
        raise DemoError("--budget must be finite")
    train(cfg)
    return 0
