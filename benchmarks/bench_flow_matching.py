"""Flow-matching targets of issue 15, in one process (taskset -c 1, one thread):

A. 8gaussians -> moons, torchcfm's 2-D example protocol: torchcfm's ``sample_8gaussians`` (8 Gaussians at radius
   5, covariance sqrt(0.1) I; torch's global stream, torchcfm's draw order) -> moons, 3x64 SELU MLP, sigma 0.1,
   batch 256, Adam 1e-3, 2,000 iterations, seeded as torchcfm's loop (``torch.manual_seed(seed)``,
   ``np.random.seed(seed)``, nothing drawn before the MLP's initialisation). Moons (``--moons``): ``torchcfm``
   (default; torchcfm's ``sample_moons`` = torchdyn's ``generate_moons(n, noise=0.2) * 3 - 1``: the two arcs at
   evenly spaced angles, each point shifted by one uniform [0, 0.2) draw on both coordinates) or ``sklearn``
   (scikit-learn's ``make_moons(n, noise=0.2) * 3 - 1``, Gaussian noise: the target of the earlier runs).
   Exact W2 (POT ``emd2`` on squared distances, then sqrt) between ``n`` generated points and ``n`` fresh target
   points, ``n`` = 1,000 and 4,000, with the estimator's floor (two independent target samples of the same size);
   straightness; adaptive dopri5 sampling NFE; training wall time; I-CFM vs OT-CFM, per seed. ``--peer`` also
   runs torchcfm's own training loop (its ``MLP``, its matchers) on the same seed and reports its W2 and the
   largest difference between its trained weights and neurodyn's.
   ``--ema-decay D`` trains with an exponential moving average of the weights (``train_flow_matching(...,
   ema_decay=D)``) and evaluates both the last iterate and the average of the same run; ``--lr-schedules none
   cosine`` trains once per schedule (constant lr / cosine decay to 0). The plain torchcfm recipe is the
   constant-lr last iterate.
S. Recipe sweep (seeds not reported in part A; default 10 11 12): per seed, kind and lr schedule one run, with
   the EMA of the weights for several decays (``--sweep-decays``) tracked beside it by
   :class:`torch.optim.swa_utils.AveragedModel` (the average ``train_flow_matching`` keeps), W2 (n = 1,000 and
   4,000, evaluation sets drawn from other seeds than part A's) of the last iterate and of every average.
B. N(0, I) -> FFJORD's 8gaussians: training wall time of I-CFM / OT-CFM until their exact test NLL reaches the
   test NLL of FFJORD (neurodyn.demos.ffjord.ffjord_experiment, 500 iterations, run in the same process first).

    taskset -c 1 python benchmarks/bench_flow_matching.py --parts a [--seeds 0 1 2] [--moons torchcfm] [--peer]
    taskset -c 1 python benchmarks/bench_flow_matching.py --parts s --sweep-seeds 10 11 12 --lr-schedules none cosine
    taskset -c 1 python benchmarks/bench_flow_matching.py --parts a --seeds 0 1 2 3 4 --ema-decay D \
        --lr-schedules none cosine
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
from neurodyn.models.flow_matching import flow_log_likelihood, sample_flow
from neurodyn.transport import wasserstein


def eight_gaussians_tcfm(n: int) -> torch.Tensor:
    """torchcfm's ``sample_8gaussians(n)``: the noise (covariance sqrt(0.1) I) first, then the centres, both from
    torch's global stream."""
    c = 1 / math.sqrt(2)
    centers = torch.tensor([(1, 0), (-1, 0), (0, 1), (0, -1), (c, c), (c, -c), (-c, c), (-c, -c)],
                           dtype=torch.float64) * 5.0   # float64 as torchcfm's (its centres hold numpy floats)
    noise = torch.distributions.MultivariateNormal(torch.zeros(2), math.sqrt(0.1) * torch.eye(2)).sample((n,))
    idx = torch.multinomial(torch.ones(8), n, replacement=True)
    return (centers[idx] + noise).float()


def moons_torchcfm(n: int) -> torch.Tensor:
    """torchcfm's ``sample_moons(n)`` (torchdyn's moons, noise 0.2, x3 - 1): numpy's global stream."""
    a = np.linspace(0, np.pi, n // 2)
    b = np.linspace(0, np.pi, n - n // 2)
    x = np.stack([np.concatenate([np.cos(a), 1 - np.cos(b)]), np.concatenate([np.sin(a), 0.5 - np.sin(b)])], 1)
    x = x + np.random.rand(n, 1) * 0.2
    return torch.tensor(x, dtype=torch.float32) * 3 - 1


def moons_sklearn(n: int) -> torch.Tensor:
    """scikit-learn's moons with Gaussian noise 0.2, x3 - 1 (its seed from numpy's global stream)."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=0.2, random_state=int(np.random.randint(0, 2**31 - 1)))
    return torch.as_tensor(x, dtype=torch.float32) * 3 - 1


MOONS = {"torchcfm": moons_torchcfm, "sklearn": moons_sklearn}


def train_torchcfm(kind: str, seed: int, moons, iters: int) -> torch.nn.Module:
    """torchcfm's own 2-D training loop (its README / example script), seeded as :func:`train_flow_matching`."""
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )
    from torchcfm.models.models import MLP

    torch.manual_seed(seed)
    np.random.seed(seed)
    model = MLP(dim=2, time_varying=True)
    opt = torch.optim.Adam(model.parameters())
    fm = (ConditionalFlowMatcher if kind == "icfm" else ExactOptimalTransportConditionalFlowMatcher)(sigma=0.1)
    for _ in range(iters):
        opt.zero_grad()
        x0, x1 = eight_gaussians_tcfm(256), moons(256)
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        loss = torch.mean((model(torch.cat([xt, t[:, None]], dim=-1)) - ut) ** 2)
        loss.backward()
        opt.step()
    return model


def torchcfm_field(model: torch.nn.Module):
    """torchcfm's ``MLP`` on ``[x, t]`` as a field ``v(t, x)``."""
    return lambda t, x: model(torch.cat([x, torch.as_tensor(t).expand(x.shape[0])[:, None]], 1))


def eval_sets(moons, n_eval: int, base: int) -> tuple[dict, dict]:
    """Fixed evaluation sets of ``n_eval`` and ``4 n_eval`` points (source, target), drawn from seeds ``base + n``
    before (and independently of) training, and the W2 floor (two independent target samples)."""
    evals, floors = {}, {}
    for n in (n_eval, 4 * n_eval):
        torch.manual_seed(base + n)
        np.random.seed(base + n)
        evals[n] = (eight_gaussians_tcfm(n), moons(n))
        floors[n] = wasserstein(moons(n), evals[n][1])
    return evals, floors


def part_a(seeds: list[int], iters: int, n_eval: int, moons_name: str, peer: bool, kinds: list[str],
           ema_decay: float | None = None, schedules: tuple = (None,)) -> dict:
    moons = MOONS[moons_name]
    evals, floors = eval_sets(moons, n_eval, 10_000)
    sizes = tuple(evals)
    print(json.dumps({"moons": moons_name, "w2_floor": floors}), flush=True)
    rows = []
    for seed in seeds:
        for kind in kinds:
            for sched in schedules:
                r = train_flow_matching(kind, eight_gaussians_tcfm, moons, iters=iters, batch=256, sigma=0.1,
                                        lr=1e-3, seed=seed, dim=2, ema_decay=ema_decay, lr_schedule=sched)
                nets = {"last": r["net"]} if r["ema_net"] is None else {"last": r["net"], "ema": r["ema_net"]}
                for weights, net in nets.items():
                    row = {"seed": seed, "model": kind, "moons": moons_name, "lr_schedule": sched or "constant",
                           "weights": weights, "ema_decay": ema_decay if weights == "ema" else None,
                           "train_seconds": r["train_seconds"]}
                    for n in sizes:
                        ev = evaluate_flow(net, *evals[n], nll=False)
                        ev.pop("samples")
                        row.update({f"{k}_n{n}": v for k, v in ev.items()})
                    if peer and weights == "last" and sched is None:
                        model = train_torchcfm(kind, seed, moons, iters)
                        ours = torch.cat([p.detach().flatten() for p in r["net"].parameters()])
                        theirs = torch.cat([p.detach().flatten() for p in model.parameters()])
                        row["torchcfm_max_weight_diff"] = float((ours - theirs).abs().max())
                        row["torchcfm_w2_n1000"] = evaluate_flow(torchcfm_field(model), *evals[n_eval],
                                                                 nll=False)["w2"]
                    rows.append(row)
                    print(json.dumps(json_safe(row)), flush=True)
    summary = summarise(rows, [f"w2_n{n}" for n in sizes] + [f"sample_nfe_n{n_eval}", f"straightness_n{n_eval}"])
    for line in summary:
        print(json.dumps(json_safe(line)), flush=True)
    return {"rows": rows, "summary": summary, "w2_floor_two_target_samples": floors, "n_eval": list(sizes),
            "iters": iters, "moons": moons_name, "ema_decay": ema_decay}


def summarise(rows: list[dict], keys: list[str]) -> list[dict]:
    """Mean, min and max of ``keys`` over seeds, per (model, lr schedule, weights)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["lr_schedule"], r["weights"]), []).append(r)
    out = []
    for (model, sched, weights), rs in groups.items():
        line = {"model": model, "lr_schedule": sched, "weights": weights, "seeds": [r["seed"] for r in rs]}
        for k in keys:
            v = np.array([r[k] for r in rs], dtype=float)
            line[k] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
        out.append(line)
    return out


def part_s(seeds: list[int], iters: int, n_eval: int, moons_name: str, kinds: list[str], decays: list[float],
           schedules: tuple = (None, "cosine")) -> dict:
    """The recipe sweep: W2 of the last iterate and of EMAs with several decays, per lr schedule."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    moons = MOONS[moons_name]
    evals, floors = eval_sets(moons, n_eval, 20_000)   # not part A's evaluation sets
    print(json.dumps({"sweep": True, "moons": moons_name, "w2_floor": floors}), flush=True)
    rows = []
    for seed in seeds:
        for kind in kinds:
            for sched in schedules:
                emas: dict[float, AveragedModel] = {}

                def track(it: int, net, emas=emas) -> bool:
                    if not emas:
                        emas.update({d: AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(d)) for d in decays})
                    for ema in emas.values():
                        ema.update_parameters(net)
                    return False

                r = train_flow_matching(kind, eight_gaussians_tcfm, moons, iters=iters, batch=256, sigma=0.1,
                                        lr=1e-3, seed=seed, dim=2, lr_schedule=sched, on_eval=track, eval_every=1)
                nets = {"last": r["net"], **{f"ema{d}": e.module for d, e in emas.items()}}
                for weights, net in nets.items():
                    row = {"seed": seed, "model": kind, "lr_schedule": sched or "constant", "weights": weights}
                    for n, (x0, x1) in evals.items():
                        row[f"w2_n{n}"] = wasserstein(sample_flow(net, x0).samples, x1)
                    rows.append(row)
                    print(json.dumps(json_safe(row)), flush=True)
    summary = summarise(rows, [f"w2_n{n}" for n in evals])
    for line in summary:
        print(json.dumps(json_safe(line)), flush=True)
    return {"rows": rows, "summary": summary, "w2_floor_two_target_samples": floors, "iters": iters,
            "moons": moons_name, "decays": decays}


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
    ap.add_argument("--moons", choices=sorted(MOONS), default="torchcfm")
    ap.add_argument("--kinds", nargs="+", default=["icfm", "otcfm"])
    ap.add_argument("--peer", action="store_true", help="also train torchcfm's own loop (part a) and compare")
    ap.add_argument("--ema-decay", type=float, default=None, help="part a: also keep an EMA of the weights")
    ap.add_argument("--lr-schedules", nargs="+", default=["none"], choices=["none", "cosine"],
                    help="parts a and s: one run per lr schedule")
    ap.add_argument("--sweep-seeds", type=int, nargs="+", default=[10, 11, 12])
    ap.add_argument("--sweep-decays", type=float, nargs="+", default=[0.99, 0.995, 0.998])
    ap.add_argument("--out", default="runs/bench_fm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    np.random.seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"torch_threads": 1, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "a" in args.parts:
        scheds = tuple(None if x == "none" else x for x in args.lr_schedules)
        results["a_8gaussians_to_moons"] = part_a(args.seeds, args.iters, args.n_eval, args.moons, args.peer,
                                                  args.kinds, args.ema_decay, scheds)
    if "s" in args.parts:
        scheds = tuple(None if x == "none" else x for x in args.lr_schedules)
        results["s_recipe_sweep"] = part_s(args.sweep_seeds, args.iters, args.n_eval, args.moons, args.kinds,
                                           args.sweep_decays, scheds)
    if "b" in args.parts:
        results["b_time_to_ffjord_nll"] = part_b(args.seeds[0], args.max_fm_iters, args.eval_every, 5000, out,
                                                 args.ffjord_iters)
    (out / "results.json").write_text(json.dumps(json_safe(results), indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
