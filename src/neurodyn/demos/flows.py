"""``neurodyn demo flows``: FFJORD vs I-CFM vs OT-CFM on 2-d toy densities (8gaussians, checkerboard).

For each density: FFJORD (:func:`neurodyn.demos.ffjord.ffjord_experiment`, maximum likelihood with an adjoint
CNF) and two flow-matching models from ``N(0, I)`` (I-CFM and OT-CFM, a 3x64 SELU MLP trained by regression).
Reported per model: test NLL in nats (exact trace through :class:`neurodyn.models.CNF`), exact W2 between
generated and test samples, adaptive sampling NFE (dopri5), path straightness (flow-matching models), training
wall time. Writes ``metrics.json`` and, with matplotlib, ``flows_<dataset>.png`` (density, samples,
trajectories of the FM models; FFJORD's own plots are in ``ffjord_<dataset>/``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from neurodyn.data.toy2d import TOY_2D, sample_2d
from neurodyn.demos._common import DemoError, add_out_and_seed, float_in, int_at_least, json_safe
from neurodyn.errors import InputError
from neurodyn.models.flow_matching import (
    ConditionalFlowMatcher,
    ExactOptimalTransportConditionalFlowMatcher,
    VelocityMLP,
    cfm_loss,
    flow_log_likelihood,
    path_straightness,
    sample_flow,
)
from neurodyn.transport import wasserstein

NAME = "flows"
DESCRIPTION = "FFJORD vs I-CFM vs OT-CFM on 8gaussians and checkerboard: NLL, W2, sampling NFE, wall time, plots"

MATCHERS: dict[str, Callable[[float], ConditionalFlowMatcher]] = {
    "icfm": ConditionalFlowMatcher,
    "otcfm": ExactOptimalTransportConditionalFlowMatcher,
}
"""The flow matchers the demo trains, by name: ``icfm`` (independent coupling), ``otcfm`` (minibatch OT)."""

__all__ = ["LR_SCHEDULES", "MATCHERS", "cosine_lr_factor", "evaluate_flow", "flows_experiment", "train_flow_matching"]


def cosine_lr_factor(k: int, iters: int) -> float:
    """The cosine decay's learning-rate factor at iteration ``k`` (0-based) of ``iters``:
    ``(1 + cos(pi k / iters)) / 2``, from 1 at ``k=0`` down towards 0 at ``k=iters``.

    Example: ``cosine_lr_factor(500, 1000) == 0.5``.
    """
    return 0.5 * (1.0 + math.cos(math.pi * k / iters))


LR_SCHEDULES = (None, "cosine")
"""Learning-rate schedules of :func:`train_flow_matching`: ``None`` (constant) or ``"cosine"`` (decay to 0)."""


def train_flow_matching(kind: str, sample_x0: Callable[[int], Tensor], sample_x1: Callable[[int], Tensor], *,
                        iters: int, batch: int = 256, sigma: float = 0.1, lr: float = 1e-3, width: int = 64,
                        depth: int = 3, seed: int = 0,
                        on_eval: Callable[[int, VelocityMLP], bool] | None = None,
                        eval_every: int = 0, dim: int | None = None, ema_decay: float | None = None,
                        lr_schedule: str | None = None) -> dict[str, Any]:
    """Train a :class:`~neurodyn.models.flow_matching.VelocityMLP` (``depth`` x ``width``, SELU) by flow matching
    (``kind``: ``"icfm"`` or ``"otcfm"``) on batches ``sample_x0(batch)`` -> ``sample_x1(batch)`` ``(batch, d)``,
    Adam(``lr``).

    ``lr_schedule``: ``None`` keeps ``lr`` constant; ``"cosine"`` uses ``lr * cosine_lr_factor(k, iters)`` at
    iteration ``k`` (0-based), from ``lr`` at the first step towards 0 at ``iters``.
    ``ema_decay``: when given (in (0, 1)), an exponential moving average of the weights is kept beside the
    trained ones, updated after every optimiser step: ``ema = p_1`` after the first step, then
    ``ema <- ema_decay * ema + (1 - ema_decay) * p_k`` (:class:`torch.optim.swa_utils.AveragedModel`); it is
    returned as ``ema_net`` and is the network that ``on_eval`` receives. The average does not feed back into
    training, and neither option draws random numbers: with both left at None the run is the plain constant-lr,
    last-iterate recipe (torchcfm's).

    ``on_eval(iteration, net) -> stop`` runs every ``eval_every`` iterations, outside the timed training; returning
    True stops training. Returns ``net`` (the last iterate), ``ema_net`` (the averaged network, or None),
    ``train_seconds`` (training only, the average's updates included), ``iters`` (done), ``final_loss``, ``lrs``
    (the learning rate of each iteration done).
    ``dim``: the data dimension; when omitted it is read from a probe batch ``sample_x0(2)`` drawn after seeding.
    Given, nothing is drawn before the network's initialisation, so with torchcfm's samplers on the global random
    streams the run is the one of torchcfm's own training loop (same ``seed``, same MLP, same draws).

    Example: ``r = train_flow_matching("otcfm", lambda n: torch.randn(n, 2), moons, iters=2000, ema_decay=0.99)``.
    """
    if kind not in MATCHERS:
        raise InputError(f"kind must be one of {sorted(MATCHERS)}, got {kind!r}.")
    if lr_schedule not in LR_SCHEDULES:
        raise InputError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}.")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise InputError(f"ema_decay must be in (0, 1) (e.g. 0.99) or None for no average, got {ema_decay!r}.")
    if iters < 1:
        raise InputError(f"iters must be >= 1, got {iters}.")
    torch.manual_seed(seed)
    np.random.seed(seed)
    if dim is None:
        dim = sample_x0(2).shape[1]
    net = VelocityMLP(dim, width=width, depth=depth)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda k: cosine_lr_factor(k, iters))
             if lr_schedule == "cosine" else None)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay)) if ema_decay is not None else None
    matcher = MATCHERS[kind](sigma)
    seconds, loss, it, lrs = 0.0, torch.tensor(float("nan")), 0, []
    for it in range(1, iters + 1):
        start = time.perf_counter()
        loss = cfm_loss(net, matcher, sample_x0(batch), sample_x1(batch))
        opt.zero_grad()
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
        if ema is not None:
            ema.update_parameters(net)
        seconds += time.perf_counter() - start
        if on_eval is not None and eval_every and it % eval_every == 0 \
                and on_eval(it, ema.module if ema is not None else net):
            break
    return {"net": net, "ema_net": ema.module if ema is not None else None, "train_seconds": seconds,
            "iters": it, "final_loss": float(loss.detach()), "lrs": lrs}


def evaluate_flow(net: Callable[..., Tensor], x0: Tensor, x1_test: Tensor, *, nll: bool = True,
                  rtol: float = 1e-5, atol: float = 1e-5) -> dict[str, Any]:
    """Metrics of a flow-matching model: ``w2`` (exact, generated from ``x0`` ``(n, d)`` vs ``x1_test``),
    ``sample_nfe`` (dopri5 at ``rtol``/``atol``), ``straightness`` (kinetic energy / squared displacement),
    ``test_nll`` (nats, exact trace; when ``nll``) and ``nll_nfe``; ``samples`` ``(n, d)``.

    Example: ``evaluate_flow(net, torch.randn(1000, 2), test)["w2"]``.
    """
    out = sample_flow(net, x0, rtol=rtol, atol=atol)
    res: dict[str, Any] = {
        "w2": wasserstein(out.samples, x1_test),
        "sample_nfe": out.nfe,
        "straightness": path_straightness(net, x0, rtol=rtol, atol=atol),
        "samples": out.samples,
    }
    if nll:
        logp, nfe = flow_log_likelihood(net, x1_test, rtol=rtol, atol=atol)
        res["test_nll"], res["nll_nfe"] = float(-logp.mean()), nfe
    return res


def _plot(path: Path, dataset: str, models: dict[str, Any], test: Tensor, seed: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lim = 4.5
    g = torch.linspace(-lim, lim, 80)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    fig, axes = plt.subplots(len(models), 3, figsize=(10, 3.3 * len(models)), squeeze=False)
    for row, (name, net) in enumerate(models.items()):
        logp, _ = flow_log_likelihood(net, grid)
        ax = axes[row]
        ax[0].imshow(logp.exp().reshape(80, 80).numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma")
        ax[0].set_title(f"{name}: density")
        torch.manual_seed(seed)
        samples = sample_flow(net, torch.randn(2000, 2)).samples
        ax[1].scatter(test[:2000, 0], test[:2000, 1], s=1, c="0.7", label="data")
        ax[1].scatter(samples[:, 0], samples[:, 1], s=1, c="C0", label="model")
        ax[1].set_title(f"{name}: samples")
        traj = sample_flow(net, torch.randn(300, 2), n_times=30).trajectory
        ax[2].plot(traj[:, :, 0].numpy(), traj[:, :, 1].numpy(), c="olive", lw=0.4, alpha=0.5)
        ax[2].scatter(traj[0, :, 0], traj[0, :, 1], s=2, c="k")
        ax[2].scatter(traj[-1, :, 0], traj[-1, :, 1], s=2, c="C0")
        ax[2].set_title(f"{name}: trajectories")
        for a in ax:
            a.set_xlim(-lim, lim)
            a.set_ylim(-lim, lim)
            a.set_aspect("equal")
    fig.suptitle(dataset)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def flows_experiment(out_dir: str | Path, datasets: tuple[str, ...] = ("8gaussians", "checkerboard"), *,
                     iters: int = 2000, ffjord_iters: int = 500, quick: bool = False, batch: int = 256,
                     sigma: float = 0.1, lr: float = 1e-3, test_n: int = 2000, seed: int = 0, plots: bool = True,
                     ffjord: bool = True, ema_decay: float | None = None) -> dict[str, Any]:
    """Run FFJORD, I-CFM and OT-CFM on each density of ``datasets`` (from ``N(0, I)``); write ``metrics.json``
    (and plots) in ``out_dir``; return the metrics (``{dataset: {model: {...}}}``).

    ``quick``: 150 FM iterations, 30 FFJORD iterations, 500 test points (a smoke run of about a minute).
    ``ema_decay``: the flow-matching models are evaluated (and plotted) with the moving average of their weights
    (:func:`train_flow_matching`); None: the last iterate (torchcfm's recipe).

    Example: ``m = flows_experiment("runs/flows", quick=True); m["8gaussians"]["otcfm"]["w2"]``.
    """
    unknown = [d for d in datasets if d not in TOY_2D]
    if unknown:
        raise InputError(f"unknown densities {unknown}; choose from {sorted(TOY_2D)}.")
    if quick:
        iters, ffjord_iters, test_n = min(iters, 150), min(ffjord_iters, 30), min(test_n, 500)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"settings": {"iters": iters, "ffjord_iters": ffjord_iters, "batch": batch,
                                            "sigma": sigma, "lr": lr, "test_n": test_n, "seed": seed,
                                            "quick": quick, "ema_decay": ema_decay}}
    for ds in datasets:
        test = sample_2d(ds, test_n, generator=torch.Generator().manual_seed(seed + 2))
        x0_eval = torch.randn(test_n, 2, generator=torch.Generator().manual_seed(seed + 3))
        res: dict[str, Any] = {}
        nets: dict[str, Any] = {}
        for kind in MATCHERS:
            gen = torch.Generator().manual_seed(seed + 1)   # both models see the same batches

            def x0_batch(n: int, gen: torch.Generator = gen) -> Tensor:
                return torch.randn(n, 2, generator=gen)

            def x1_batch(n: int, gen: torch.Generator = gen, ds: str = ds) -> Tensor:
                return sample_2d(ds, n, generator=gen)

            r = train_flow_matching(kind, x0_batch, x1_batch, iters=iters, batch=batch, sigma=sigma, lr=lr,
                                    seed=seed, ema_decay=ema_decay)
            net = r["net"] if ema_decay is None else r["ema_net"]
            ev = evaluate_flow(net, x0_eval, test)
            ev.pop("samples")
            res[kind] = {"train_seconds": r["train_seconds"], "iters": r["iters"], **ev}
            nets[kind] = net
            print(f"[flows] {ds} {kind}: nll {ev['test_nll']:.3f} w2 {ev['w2']:.3f} nfe {ev['sample_nfe']} "
                  f"straightness {ev['straightness']:.3f} train {r['train_seconds']:.1f}s", flush=True)
        if ffjord:
            from neurodyn.demos.ffjord import ffjord_experiment

            fj = ffjord_experiment(out / f"ffjord_{ds}", dataset=ds, iters=ffjord_iters, quick=quick, seed=seed,
                                   plots=plots)
            res["ffjord"] = {k: fj[k] for k in ("test_nll", "train_seconds", "sample_nfe") if k in fj}
            if "samples" in fj:
                res["ffjord"]["w2"] = wasserstein(torch.as_tensor(fj["samples"])[:test_n], test)
            print(f"[flows] {ds} ffjord: nll {fj['test_nll']:.3f} train {fj['train_seconds']:.1f}s", flush=True)
        if plots:
            res["plot"] = str(out / f"flows_{ds}.png") if _plot(out / f"flows_{ds}.png", ds, nets, test, seed) \
                else None
        metrics[ds] = res
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_out_and_seed(parser, "runs/flows", 0)
    parser.add_argument("--iters", type=int_at_least(1), default=2000, help="flow-matching iterations (2000)")
    parser.add_argument("--ffjord-iters", type=int_at_least(1), default=500, help="FFJORD iterations (500)")
    parser.add_argument("--datasets", nargs="+", default=["8gaussians", "checkerboard"],
                        help="toy densities (neurodyn.data.toy2d names; default: 8gaussians checkerboard)")
    parser.add_argument("--sigma", type=float_in(0.0), default=0.1, help="flow-matching path noise (0.1)")
    parser.add_argument("--no-ffjord", dest="ffjord", action="store_false", help="skip FFJORD")
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run (numbers not meaningful)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument("--ema-decay", type=float, default=None, metavar="D",
                        help="evaluate the flow-matching models with a moving average of their weights (e.g. 0.99); "
                             "default: the last iterate, as torchcfm")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    try:
        flows_experiment(args.out, tuple(args.datasets), iters=args.iters, ffjord_iters=args.ffjord_iters,
                         quick=args.quick, sigma=args.sigma, seed=args.seed, plots=args.plots, ffjord=args.ffjord,
                         ema_decay=args.ema_decay)
    except InputError as exc:
        raise DemoError(str(exc)) from exc
    return 0
