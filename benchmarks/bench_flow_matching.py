"""Flow-matching targets of issue 15, in one process (taskset -c 1, one thread):

A. 8gaussians -> moons (torchcfm's toy pair: 8 Gaussians at radius 5 with covariance sqrt(0.1) I; scikit-learn's
   moons with noise 0.2, scaled x3 and shifted by -1), 3x64 SELU MLP, sigma 0.1, batch 256, Adam 1e-3, 2,000
   iterations: exact W2 between generated and fresh target samples, path straightness (kinetic energy over
   squared displacement, >= 1), adaptive dopri5 sampling NFE, training wall time; I-CFM vs OT-CFM, per seed.
B. N(0, I) -> FFJORD's 8gaussians: training wall time of I-CFM / OT-CFM until their exact test NLL reaches the
   test NLL of FFJORD (neurodyn.demos.ffjord.ffjord_experiment, 500 iterations, run in the same process first).

    taskset -c 1 python benchmarks/bench_flow_matching.py [--seeds 0 1 2] [--out runs/bench_fm]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from neurodyn.data.toy2d import sample_2d
from neurodyn.demos._common import json_safe
from neurodyn.demos.flows import evaluate_flow, train_flow_matching
from neurodyn.models.flow_matching import flow_log_likelihood
from neurodyn.transport import wasserstein


def eight_gaussians_tcfm(n: int, g: torch.Generator) -> torch.Tensor:
    c = 1 / math.sqrt(2)
    centers = torch.tensor([(1, 0), (-1, 0), (0, 1), (0, -1), (c, c), (c, -c), (-c, c), (-c, -c)]) * 5.0
    idx = torch.randint(0, 8, (n,), generator=g)
    return centers[idx] + torch.randn(n, 2, generator=g) * 0.1**0.25   # covariance sqrt(0.1) I, as torchcfm


def moons_tcfm(n: int, g: torch.Generator) -> torch.Tensor:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=0.2, random_state=int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    return torch.as_tensor(x, dtype=torch.float32) * 3 - 1


def part_a(seeds: list[int], iters: int, n_eval: int) -> dict:
    rows = []
    ge = torch.Generator().manual_seed(10_000)
    x0_eval, x1_eval = eight_gaussians_tcfm(n_eval, ge), moons_tcfm(n_eval, ge)
    floor = wasserstein(moons_tcfm(n_eval, ge), x1_eval)   # W2 between two independent target samples
    for seed in seeds:
        for kind in ("icfm", "otcfm"):
            g = torch.Generator().manual_seed(seed)
            r = train_flow_matching(kind, lambda n, g=g: eight_gaussians_tcfm(n, g), lambda n, g=g: moons_tcfm(n, g),
                                    iters=iters, batch=256, sigma=0.1, lr=1e-3, seed=seed)
            ev = evaluate_flow(r["net"], x0_eval, x1_eval, nll=False)
            ev.pop("samples")
            row = {"seed": seed, "model": kind, "train_seconds": r["train_seconds"], **ev}
            rows.append(row)
            print(json.dumps(json_safe(row)), flush=True)
    return {"rows": rows, "w2_floor_two_target_samples": floor, "n_eval": n_eval, "iters": iters}


def part_b(seed: int, max_iters: int, eval_every: int, test_n: int, out: Path, ffjord_iters: int) -> dict:
    from neurodyn.demos.ffjord import ffjord_experiment

    fj = ffjord_experiment(out / "ffjord_8gaussians", dataset="8gaussians", iters=ffjord_iters, plots=False,
                           seed=seed, threads=1)
    target, ffjord_s = fj["test_nll"], fj["train_seconds"]
    print(f"ffjord: test_nll {target:.4f} train {ffjord_s:.1f}s", flush=True)
    test = sample_2d("8gaussians", test_n, generator=torch.Generator().manual_seed(seed + 2))
    res = {"ffjord_test_nll": target, "ffjord_train_seconds": ffjord_s, "ffjord_iters": ffjord_iters,
           "data_entropy": fj.get("data_entropy"), "models": {}}
    for kind in ("icfm", "otcfm"):
        g = torch.Generator().manual_seed(seed + 1)
        hist: list[tuple[int, float, float]] = []

        def on_eval(it: int, net, hist=hist) -> bool:
            logp, _ = flow_log_likelihood(net, test)
            nll = float(-logp.mean())
            hist.append((it, nll))
            return nll <= target

        r = train_flow_matching(kind, lambda n, g=g: torch.randn(n, 2, generator=g),
                                lambda n, g=g: sample_2d("8gaussians", n, generator=g), iters=max_iters,
                                batch=256, sigma=0.1, seed=seed, on_eval=on_eval, eval_every=eval_every)
        reached = bool(hist) and hist[-1][1] <= target
        res["models"][kind] = {"reached": reached, "iters": r["iters"], "train_seconds": r["train_seconds"],
                               "final_nll": hist[-1][1] if hist else None, "history": hist,
                               "speedup_vs_ffjord": ffjord_s / r["train_seconds"] if reached else None}
        print(json.dumps(json_safe({kind: res["models"][kind]})), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--ffjord-iters", type=int, default=500)
    ap.add_argument("--max-fm-iters", type=int, default=4000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--parts", default="ab")
    ap.add_argument("--out", default="runs/bench_fm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    np.random.seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"torch_threads": 1, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "a" in args.parts:
        results["a_8gaussians_to_moons"] = part_a(args.seeds, args.iters, args.n_eval)
    if "b" in args.parts:
        results["b_time_to_ffjord_nll"] = part_b(args.seeds[0], args.max_fm_iters, args.eval_every, 5000, out,
                                                 args.ffjord_iters)
    (out / "results.json").write_text(json.dumps(json_safe(results), indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
