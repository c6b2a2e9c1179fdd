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

__all__ = ["bits_per_dim", "dequantise_logit", "digits_data", "eight_gaussians_log_density", "ffjord_digits_experiment",
           "ffjord_experiment", "fit_gaussian", "logit_to_pixels"]


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
        Monte-Carlo entropy of the true density, the lowest achievable NLL), the settings (all of these are also
        written to ``metrics.json``), and ``samples`` (``(2000, 2)``, the flow's samples; not in the file).

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
            t1_now = float(flow.end_time.detach())
            note(f"iter {it} train_loss {float(loss.detach()):.4f} test_nll {nll:.4f} t1 {t1_now:.4f} "
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
    return {**metrics, "samples": samples}  # the samples are returned, not written to metrics.json


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


LOGIT_ALPHA = 0.05
DIGIT_LEVELS = 17  # scikit-learn's 8x8 digits hold integers 0..16


def digits_data(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits as integer pixel levels ``0..16``, float64, split at random into train and test:
    ``(train (N_train, 64), test (N_test, 64))``.

    >>> tr, te = digits_data()                       # doctest: +SKIP
    >>> tr.shape, te.shape                           # doctest: +SKIP
    (torch.Size([1438, 64]), torch.Size([359, 64]))
    """
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().data, dtype=torch.float64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * x.shape[0]))
    return x[perm[n_test:]], x[perm[:n_test]]


def dequantise_logit(levels: Tensor, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Dequantise pixel levels ``v`` ``(B, D)`` (``x = (v + u) / 17``, ``u ~ U[0, 1)``), then
    ``y = logit(a + (1 - 2a) x)`` with ``a = 0.05``; returns ``y`` ``(B, D)`` and ``log|det dy/dv|`` ``(B,)`` (so
    ``log p(v + u) = log p(y) + logdet``).

    Example: ``y, logdet = dequantise_logit(digits_data()[0], torch.Generator().manual_seed(0))``.
    """
    u = torch.rand(levels.shape, generator=g, dtype=levels.dtype)
    x = (levels + u) / DIGIT_LEVELS
    s = LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * x
    y = torch.log(s) - torch.log1p(-s)
    logdet = (math.log(1 - 2 * LOGIT_ALPHA) - math.log(DIGIT_LEVELS) - torch.log(s) - torch.log1p(-s)).sum(1)
    return y, logdet


def bits_per_dim(log_p_dequantised: Tensor, dim: int) -> float:
    """Bits per dimension ``-mean(log p) / (dim ln 2)`` of the discrete pixels from the dequantised log-density
    ``(B,)`` in nats (its negative mean bounds ``-log P`` of the pixels from above).

    Example: ``bits_per_dim(torch.full((4,), -64 * math.log(2)), 64) == 1.0``.
    """
    return float(-log_p_dequantised.mean()) / (dim * math.log(2))


def logit_to_pixels(y: Tensor) -> Tensor:
    """Inverse of :func:`dequantise_logit`'s logit map: ``(sigmoid(y) - a) / (1 - 2a)`` clipped to ``[0, 1]``
    (pixel intensity over 17 levels), same shape as ``y``.

    Example: ``logit_to_pixels(torch.zeros(2, 64))  # 0.5 everywhere``.
    """
    return ((torch.sigmoid(y) - LOGIT_ALPHA) / (1 - 2 * LOGIT_ALPHA)).clamp(0, 1)


def fit_gaussian(y: Tensor, jitter: float = 1e-6) -> torch.distributions.MultivariateNormal:
    """The maximum-likelihood full-covariance Gaussian of the rows of ``y`` ``(N, D)`` (``jitter`` added to the
    covariance's diagonal).

    Example: ``fit_gaussian(torch.randn(500, 3)).log_prob(torch.zeros(1, 3))``.
    """
    d = y.shape[1]
    cov = torch.cov(y.T, correction=0) + jitter * torch.eye(d, dtype=y.dtype)
    return torch.distributions.MultivariateNormal(y.mean(0), covariance_matrix=cov)


def ffjord_digits_experiment(out_dir: str | Path, iters: int = 1000, quick: bool = False, *, batch: int = 128,
                             hidden: tuple[int, ...] = (256, 256), activation: str = "softplus", lr: float = 1e-3,
                             rtol: float = 1e-4, atol: float = 1e-4, gradient: str = "adjoint",
                             noise: str = "rademacher", t1: float = 1.0, log_every: int = 100, seed: int = 0,
                             threads: int | None = None, plots: bool = True) -> dict[str, Any]:
    """FFJORD on scikit-learn's 8x8 digits (64 dimensions) in bits/dim, against a full-covariance Gaussian.

    Pixels (levels ``0..16``) are dequantised with uniform noise, mapped to logit space (``alpha = 0.05``) and
    standardised with the training mean and std; both models are densities there and every transform's
    log-determinant is counted, so bits/dim are those of the discrete pixels (a dequantisation lower bound on
    ``log P``). The CNF (one block, :class:`~neurodyn.models.ODEnet` with ``hidden`` widths) trains with a
    Hutchinson ``noise`` probe; the test figure uses the exact trace. The Gaussian baseline is the maximum
    likelihood Gaussian (full covariance) of the training set in logit space.

    Returns
    -------
    dict
        ``cnf_bits_per_dim``, ``gaussian_bits_per_dim`` (test), ``history`` (iteration, test bits/dim),
        ``train_seconds``, ``seconds_per_iter``, ``sample_nfe``, settings; and, not written to the JSON, ``flow``
        (the trained CNF, on standardised logits) with ``logit_mean``, ``logit_std`` ``(64,)``. ``quick`` caps
        ``iters`` at 20.
    """
    if quick:
        iters = min(iters, 20)
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "digits_log.txt", "a")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    train, test = digits_data(seed)
    d = train.shape[1]
    y_train, _ = dequantise_logit(train, g)
    mean, std = y_train.mean(0), y_train.std(0)
    y_test, ld_test = dequantise_logit(test, torch.Generator().manual_seed(seed + 2))
    # Gaussian baseline (logit space, full covariance, MLE)
    gauss = fit_gaussian(y_train)
    gauss_bpd = bits_per_dim(gauss.log_prob(y_test) + ld_test, d)
    flow = CNF(ODEnet(d, hidden, activation), dim=d, trace="hutchinson", noise=noise, t1=t1, method="dopri5",
               rtol=rtol, atol=atol, gradient=gradient, generator=g)
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    std_logdet = -torch.log(std).sum()

    def std_of(y: Tensor) -> Tensor:
        return ((y - mean) / std).float()

    def test_bpd() -> float:
        lp = _exact_log_prob(flow, std_of(y_test), chunk=400).double()
        return bits_per_dim(lp + std_logdet + ld_test, d)

    history: list[tuple[int, float]] = []
    train_time = 0.0
    log.write(f"# digits: gaussian test bits/dim {gauss_bpd:.4f}\n")
    log.flush()
    for it in range(1, iters + 1):
        t0 = time.perf_counter()
        idx = torch.randint(0, train.shape[0], (batch,), generator=g)
        y, _ = dequantise_logit(train[idx], g)
        opt.zero_grad()
        loss = -flow.log_prob(std_of(y)).mean()
        loss.backward()
        opt.step()
        train_time += time.perf_counter() - t0
        if it % log_every == 0 or it == iters:
            history.append((it, test_bpd()))
            log.write(f"iter {it} loss {float(loss.detach()):.3f} test_bpd {history[-1][1]:.4f} "
                      f"nfe {flow.last_solution.stats['nfe']} train_s {train_time:.1f}\n")
            log.flush()
    with torch.no_grad():
        zs = flow.sample(64)
        sample_nfe = int(flow.last_solution.stats["nfe"])
    metrics = dict(cnf_bits_per_dim=history[-1][1], gaussian_bits_per_dim=gauss_bpd, history=history,
                   iters=iters, batch=batch, hidden=list(hidden), activation=activation, rtol=rtol, atol=atol,
                   noise=noise, train_seconds=train_time, seconds_per_iter=train_time / iters,
                   sample_nfe=sample_nfe, n_train=train.shape[0], n_test=test.shape[0])
    if plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ys = zs.double() * std + mean
        img = logit_to_pixels(ys).reshape(8, 8, 8, 8)
        fig, ax = plt.subplots(1, 2, figsize=(8, 4))
        ax[0].imshow(img.permute(0, 2, 1, 3).reshape(64, 64).numpy(), cmap="gray_r")
        ax[0].set_title("FFJORD samples")
        real = (test[:64] / 16).reshape(8, 8, 8, 8)
        ax[1].imshow(real.permute(0, 2, 1, 3).reshape(64, 64).numpy(), cmap="gray_r")
        ax[1].set_title("test digits")
        for a in ax:
            a.axis("off")
        fig.savefig(out / "digits_samples.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
    (out / "digits_metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    log.close()
    metrics.update(flow=flow, logit_mean=mean, logit_std=std)  # not in the JSON: the trained model and its scaling
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="FFJORD on a 2-d toy density")
    p.add_argument("out")
    p.add_argument("--dataset", default="8gaussians", choices=sorted(TOY_2D))
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--trace", default="hutchinson", choices=["hutchinson", "exact"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits", action="store_true", help="the 8x8 digits experiment (bits/dim) instead")
    a = p.parse_args(argv)
    if a.digits:
        m = ffjord_digits_experiment(a.out, a.iters, a.quick, threads=a.threads, seed=a.seed)
        print(json.dumps({k: m[k] for k in ("cnf_bits_per_dim", "gaussian_bits_per_dim", "seconds_per_iter")}))
        return 0
    m = ffjord_experiment(a.out, a.dataset, a.iters, a.quick, trace=a.trace, threads=a.threads, seed=a.seed)
    print(json.dumps({k: m[k] for k in ("test_nll", "seconds_per_iter", "end_time", "sample_nfe")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
