"""FFJORD on a 2-d toy density: train a CNF by maximum likelihood, report test NLL, plot density/samples/flow.

:func:`ffjord_experiment` is the FFJORD half of ``neurodyn demo flows``; it can also be run alone:
``python -m neurodyn.demos.ffjord OUT_DIR [--dataset 8gaussians] [--iters 500] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from neurodyn.data.toy2d import TOY_2D, eight_gaussian_centers, sample_2d
from neurodyn.demos._common import json_safe
from neurodyn.errors import InputError
from neurodyn.models.cnf import CNF, ODEnet

__all__ = ["eight_gaussians_log_density", "ffjord_experiment"]


def eight_gaussians_log_density(x: Tensor) -> Tensor:
    """The exact log-density of ``"8gaussians"`` (``(B, 2)`` -> ``(B,)``): equal mixture of 8 isotropic
    Gaussians of std ``0.5/1.414`` at :func:`~neurodyn.data.toy2d.eight_gaussian_centers`.

    >>> float(eight_gaussians_log_density(torch.zeros(1, 2))) < -10
    True
    """
    c = eight_gaussian_centers(x.dtype).to(x.device)
    s = 0.5 / 1.414
    d2 = (x[:, None, :] - c[None]).pow(2).sum(-1)
    comp = -0.5 * d2 / s**2 - math.log(2 * math.pi * s**2)
    return torch.logsumexp(comp, 1) - math.log(8)


@torch.no_grad()
def _exact_log_prob(flow: CNF, x: Tensor, chunk: int = 5000) -> Tensor:
    """``log p(x)`` with the exact trace (the honest figure for a Hutchinson-trained model)."""
    old = flow.field.trace
    flow.field.trace = "exact"
    try:
        return torch.cat([flow.log_prob(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])
    finally:
        flow.field.trace = old


def ffjord_experiment(out_dir: str | Path, dataset: str = "8gaussians", iters: int = 500, quick: bool = False, *,
                      batch: int = 100, lr: float = 1e-3, weight_decay: float = 1e-5,
                      hidden: tuple[int, ...] = (64, 64, 64), activation: str = "tanh", trace: str = "hutchinson",
                      noise: str = "gaussian", gradient: str = "adjoint", rtol: float = 1e-5, atol: float = 1e-5,
                      t1: float = 0.5, train_t1: bool = True, test_n: int = 5000, log_every: int = 50,
                      seed: int = 0, plots: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Train FFJORD's toy CNF on ``dataset`` and evaluate it; writes ``log.txt``, ``metrics.json`` and plots.

    The setup is FFJORD's toy experiment: :class:`~neurodyn.models.ODEnet` (concatsquash layers, ``hidden``
    widths, ``activation``), one CNF block with trainable end time (initial ``t1``), dopri5 at ``rtol``/``atol``,
    the adjoint gradient, Adam (``lr``, ``weight_decay``), fresh batches of ``batch`` samples per iteration,
    Hutchinson trace (``noise`` probes) for training. Test NLL (nats) is on ``test_n`` fresh samples with the
    exact trace, every ``log_every`` iterations and at the end.

    Parameters
    ----------
    out_dir : str or Path
        Where ``log.txt`` (one line per evaluation, flushed), ``metrics.json``, ``density.png``, ``samples.png``,
        ``trajectories.png`` go (created).
    dataset : str
        A density of :func:`neurodyn.data.toy2d.sample_2d`.
    iters : int
        Training iterations. ``quick=True`` caps them at 30 and the test set at 1000 samples.

    Returns
    -------
    dict
        ``test_nll`` (nats, final), ``history`` (list of ``(iteration, test NLL)``), ``train_seconds``,
        ``seconds_per_iter``, ``nfe_forward_mean`` / ``nfe_backward_mean`` (per training iteration),
        ``sample_nfe`` (drawing the plot samples), ``end_time``, ``bits_per_dim``, ``data_entropy`` (8gaussians:
        Monte-Carlo entropy of the true density, the lowest achievable NLL), the settings.

    Examples
    --------
    >>> m = ffjord_experiment("/tmp/ffjord_doc", iters=2, quick=True, plots=False)   # doctest: +SKIP
    >>> sorted(m)[:3]                                                                # doctest: +SKIP
    ['activation', 'batch', 'bits_per_dim']
    """
    if dataset not in TOY_2D:
        raise InputError(f"ffjord_experiment: unknown dataset {dataset!r}; choose one of {sorted(TOY_2D)}.")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise InputError(f"ffjord_experiment: iters must be a positive integer, got {iters!r}.")
    if quick:
        iters, test_n = min(iters, 30), min(test_n, 1000)
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "a")

    def note(msg: str) -> None:
        log.write(msg + "\n")
        log.flush()

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    test = sample_2d(dataset, test_n, torch.Generator().manual_seed(seed + 2))
    flow = CNF(ODEnet(2, hidden, activation), dim=2, trace=trace, noise=noise, t1=t1, train_t1=train_t1,
               method="dopri5", rtol=rtol, atol=atol, gradient=gradient, generator=g)
    opt = torch.optim.Adam(flow.parameters(), lr=lr, weight_decay=weight_decay)
    history: list[tuple[int, float]] = []
    nfe_f, nfe_b = [], []
    train_time = 0.0
    note(f"# ffjord {dataset}: iters={iters} batch={batch} trace={trace} gradient={gradient} rtol={rtol} atol={atol}")
    for it in range(1, iters + 1):
        t0 = time.perf_counter()
        x = sample_2d(dataset, batch, g)
        opt.zero_grad()
        loss = -flow.log_prob(x).mean()
        sol = flow.last_solution
        loss.backward()
        opt.step()
        train_time += time.perf_counter() - t0
        nfe_f.append(int(sol.stats["nfe"]))
        nfe_b.append(int(sol.stats.get("nfe_backward", 0)))
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"ffjord_experiment: the training loss became {float(loss)} at iteration {it}; "
                               f"lower lr or tighten rtol/atol.")
        if it % log_every == 0 or it == iters:
            nll = -float(_exact_log_prob(flow, test).mean())
            history.append((it, nll))
            note(f"iter {it} train_loss {float(loss.detach()):.4f} test_nll {nll:.4f} t1 {float(flow.end_time.detach()):.4f} "
                 f"nfe_f {nfe_f[-1]} nfe_b {nfe_b[-1]} train_s {train_time:.1f}")
    test_nll = history[-1][1]
    metrics: dict[str, Any] = dict(
        dataset=dataset, iters=iters, batch=batch, lr=lr, weight_decay=weight_decay, hidden=list(hidden),
        activation=activation, trace=trace, noise=noise, gradient=gradient, rtol=rtol, atol=atol,
        test_n=test_n, test_nll=test_nll, bits_per_dim=test_nll / (2 * math.log(2)), history=history,
        train_seconds=train_time, seconds_per_iter=train_time / iters,
        nfe_forward_mean=sum(nfe_f) / len(nfe_f), nfe_backward_mean=sum(nfe_b) / len(nfe_b),
        end_time=float(flow.end_time.detach()), threads=torch.get_num_threads(),
    )
    if dataset == "8gaussians":
        ref = sample_2d(dataset, 200_000, torch.Generator().manual_seed(seed + 3), dtype=torch.float64)
        metrics["data_entropy"] = -float(eight_gaussians_log_density(ref).mean())
    with torch.no_grad():
        samples = flow.sample(2000)
        metrics["sample_nfe"] = int(flow.last_solution.stats["nfe"])
    if plots:
        _plots(flow, test, samples, out)
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    note(f"# done: test_nll {test_nll:.4f} seconds_per_iter {metrics['seconds_per_iter']:.3f}")
    log.close()
    return metrics


def _plots(flow: CNF, data: Tensor, samples: Tensor, out: Path, lim: float = 4.0, n: int = 120) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = torch.linspace(-lim, lim, n)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    dens = _exact_log_prob(flow, grid).exp().reshape(n, n)
    fig, ax = plt.subplots(1, 2, figsize=(8, 4))
    ax[0].hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=n, range=[[-lim, lim], [-lim, lim]])
    ax[0].set_title("data")
    ax[1].imshow(dens.numpy(), extent=(-lim, lim, -lim, lim), origin="lower")
    ax[1].set_title("FFJORD density")
    for a in ax:
        a.set_aspect("equal")
        a.axis("off")
    fig.savefig(out / "density.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(samples[:, 0].numpy(), samples[:, 1].numpy(), s=1)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_title("FFJORD samples")
    fig.savefig(out / "samples.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    with torch.no_grad():
        z0 = flow.base_sample(300)
        t1 = float(flow.end_time.detach())
        paths, _ = flow.transport(z0, torch.linspace(t1, 0.0, 21, dtype=z0.dtype))
    fig, ax = plt.subplots(figsize=(4, 4))
    for i in range(paths.shape[1]):
        ax.plot(paths[:, i, 0].numpy(), paths[:, i, 1].numpy(), lw=0.4, alpha=0.6, color="C0")
    ax.scatter(paths[-1, :, 0].numpy(), paths[-1, :, 1].numpy(), s=2, color="C3")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_title("base -> data trajectories")
    fig.savefig(out / "trajectories.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="FFJORD on a 2-d toy density")
    p.add_argument("out")
    p.add_argument("--dataset", default="8gaussians", choices=sorted(TOY_2D))
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--trace", default="hutchinson", choices=["hutchinson", "exact"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    m = ffjord_experiment(a.out, a.dataset, a.iters, a.quick, trace=a.trace, threads=a.threads, seed=a.seed)
    print(json.dumps({k: m[k] for k in ("test_nll", "seconds_per_iter", "end_time", "sample_nfe")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
