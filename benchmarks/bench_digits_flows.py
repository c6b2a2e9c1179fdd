"""Issue 15 target "Digits (8x8)": test bits/dim of a full-covariance Gaussian, an FFJORD CNF, an OT-CFM model and
a VP-SDE diffusion model on scikit-learn's 8x8 digits, all in one process, with a PNG of samples of each.

Data (identical for every model: the split and the test set's dequantisation noise are those of
``neurodyn.demos.ffjord.ffjord_digits_experiment``): 1797 images of levels 0..16, random split 1438 train / 359
test (seed 0); each pixel dequantised ``x = (v + u) / 17`` with ``u ~ U[0, 1)`` (fresh noise for every training
batch, one fixed draw for the test set), mapped to logit space ``y = logit(0.05 + 0.9 x)`` and standardised with the
training set's per-pixel mean and std. Every model is a density on the standardised logits; the log-determinants of
the standardisation and of the logit map (``dequantise_logit``) are added, so the figures are bits/dim of the
discrete pixels, ``-mean log p(v + u) / (64 ln 2)`` (the uniform-dequantisation bound: it is >= the true
``-log2 P(v) / 64``).

* Gaussian: the maximum-likelihood full-covariance Gaussian of the training set's logits (exact).
* CNF: ``ffjord_digits_experiment`` (one ``ODEnet(64, (256, 256), "softplus")`` block, Hutchinson Rademacher
  probe, dopri5 1e-4, adjoint, Adam 1e-3, batch 128, ``--cnf-iters``); test log-density with the exact trace.
* OT-CFM: ``VelocityMLP(64, width, depth)`` (SELU) trained by exact-minibatch-OT conditional flow matching from
  ``N(0, I)`` (sigma ``--sigma``, batch ``--batch``, Adam 1e-3, ``--fm-iters``); test log-density by
  ``flow_log_likelihood`` (the CNF machinery on the learnt field, exact trace, dopri5 1e-5).
* Diffusion: VP-SDE score model (``ScoreModel`` over a SiLU ``VelocityMLP``), denoising score matching
  (``--dm-iters``); test log-density of ``p_eps`` (eps 1e-5) by the probability-flow ODE as a CNF, exact trace
  (and Hutchinson's estimate, Gaussian probe, for comparison).

    taskset -c 1 python benchmarks/bench_digits_flows.py --out runs/digits_flows [--cnf-iters 300] [--fm-iters 3000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neurodyn.demos._common import json_safe
from neurodyn.demos.ffjord import (
    bits_per_dim,
    dequantise_logit,
    digits_data,
    ffjord_digits_experiment,
    fit_gaussian,
    logit_to_pixels,
)
from neurodyn.demos.flows import train_flow_matching
from neurodyn.models.diffusion import (
    VPSDE,
    ScoreModel,
    denoising_score_matching_loss,
    probability_flow_log_likelihood,
    probability_flow_sample,
)
from neurodyn.models.flow_matching import VelocityMLP, flow_log_likelihood, sample_flow


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/digits_flows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cnf-iters", type=int, default=300)
    p.add_argument("--fm-iters", type=int, default=3000)
    p.add_argument("--dm-iters", type=int, default=3000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sigma", type=float, default=0.0)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=["cnf", "otcfm", "diffusion"])
    a = p.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seed = a.seed

    # the data pipeline of ffjord_digits_experiment (same seeds: same split, same test dequantisation)
    train, test = digits_data(seed)
    d = train.shape[1]
    y_train, _ = dequantise_logit(train, torch.Generator().manual_seed(seed + 1))
    mean, std = y_train.mean(0), y_train.std(0)
    y_test, ld_test = dequantise_logit(test, torch.Generator().manual_seed(seed + 2))
    std_logdet = -torch.log(std).sum()
    test_std = ((y_test - mean) / std).float()
    gen = torch.Generator().manual_seed(seed + 10)

    def train_batch(n: int) -> torch.Tensor:
        idx = torch.randint(0, train.shape[0], (n,), generator=gen)
        y, _ = dequantise_logit(train[idx], gen)
        return ((y - mean) / std).float()

    def bpd_of(logp_std: torch.Tensor) -> float:
        return bits_per_dim(logp_std.double() + std_logdet + ld_test, d)

    def to_pixels(y_std: torch.Tensor) -> torch.Tensor:
        return logit_to_pixels(y_std.double() * std + mean)

    results: dict[str, dict] = {}
    samples: dict[str, torch.Tensor] = {"test digits": test[:64] / 16}
    gauss = fit_gaussian(y_train)
    results["gaussian"] = {"test_bpd": bits_per_dim(gauss.log_prob(y_test) + ld_test, d)}
    samples["Gaussian"] = logit_to_pixels(gauss.sample((64,)))
    print(f"gaussian: {results['gaussian']['test_bpd']:.4f} bits/dim", flush=True)

    if "cnf" not in a.skip:
        m = ffjord_digits_experiment(out / "cnf", iters=a.cnf_iters, seed=seed, log_every=max(a.cnf_iters // 3, 1),
                                     plots=False)
        assert abs(m["gaussian_bits_per_dim"] - results["gaussian"]["test_bpd"]) < 1e-9  # same data, same test set
        results["cnf"] = {"test_bpd": m["cnf_bits_per_dim"], "train_seconds": m["train_seconds"],
                          "iters": a.cnf_iters, "history": m["history"], "sample_nfe": m["sample_nfe"]}
        with torch.no_grad():
            samples["CNF (FFJORD)"] = to_pixels(m["flow"].sample(64))
        print(f"cnf: {m['cnf_bits_per_dim']:.4f} bits/dim, {m['train_seconds']:.0f} s", flush=True)

    if "otcfm" not in a.skip:
        np.random.seed(seed)
        r = train_flow_matching("otcfm", lambda n: torch.randn(n, d, generator=gen), train_batch, iters=a.fm_iters,
                                batch=a.batch, sigma=a.sigma, width=a.width, depth=a.depth, seed=seed)
        t0 = time.perf_counter()
        logp, nfe = flow_log_likelihood(r["net"], test_std)
        ll_s = time.perf_counter() - t0
        smp = sample_flow(r["net"], torch.randn(64, d, generator=gen))
        results["otcfm"] = {"test_bpd": bpd_of(logp), "train_seconds": r["train_seconds"], "iters": r["iters"],
                            "likelihood_nfe": nfe, "likelihood_seconds": ll_s, "sample_nfe": smp.nfe,
                            "final_loss": r["final_loss"], "sigma": a.sigma}
        samples["OT-CFM"] = to_pixels(smp.samples)
        print(f"otcfm: {results['otcfm']['test_bpd']:.4f} bits/dim, train {r['train_seconds']:.0f} s, "
              f"likelihood NFE {nfe}", flush=True)

    if "diffusion" not in a.skip:
        torch.manual_seed(seed)
        sde = VPSDE()
        score = ScoreModel(VelocityMLP(d, width=a.width, depth=a.depth, activation=nn.SiLU), sde)
        opt = torch.optim.Adam(score.parameters(), 1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.dm_iters)
        t0 = time.perf_counter()
        for _ in range(a.dm_iters):
            loss = denoising_score_matching_loss(score, train_batch(a.batch), sde)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        train_s = time.perf_counter() - t0
        logp, nfe = probability_flow_log_likelihood(score, sde, test_std, eps=1e-5)
        logp_h, nfe_h = probability_flow_log_likelihood(score, sde, test_std, eps=1e-5, trace="hutchinson",
                                                        generator=torch.Generator().manual_seed(seed + 20))
        smp = probability_flow_sample(score, sde, torch.randn(64, d, generator=gen))
        results["diffusion"] = {"test_bpd": bpd_of(logp), "test_bpd_hutchinson": bpd_of(logp_h),
                                "train_seconds": train_s, "iters": a.dm_iters, "likelihood_nfe": nfe,
                                "likelihood_nfe_hutchinson": nfe_h, "sample_nfe": smp.nfe}
        samples["VP-SDE (PF-ODE)"] = to_pixels(smp.samples)
        print(f"diffusion: {results['diffusion']['test_bpd']:.4f} bits/dim (Hutchinson "
              f"{results['diffusion']['test_bpd_hutchinson']:.4f}), train {train_s:.0f} s", flush=True)

    settings = {k: v for k, v in vars(a).items()}
    (out / "metrics.json").write_text(json.dumps(json_safe({"settings": settings, **results}), indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 4.0))
    for ax, (name, img) in zip(axes, samples.items()):
        ax.imshow(img.reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64).numpy(), cmap="gray_r", vmin=0,
                  vmax=1)
        bpd = {"Gaussian": "gaussian", "CNF (FFJORD)": "cnf", "OT-CFM": "otcfm", "VP-SDE (PF-ODE)": "diffusion"}
        key = bpd.get(name)
        ax.set_title(name if key is None else f"{name}\n{results[key]['test_bpd']:.3f} bits/dim")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "digits_samples.png", dpi=100)
    plt.close(fig)
    print(f"wrote {out / 'metrics.json'} and {out / 'digits_samples.png'}")


if __name__ == "__main__":
    main()
