"""Cost of one LNN training step and one LNN field evaluation on the two-body setup of ``neurodyn demo physics``
(issue 16): 8-d states ``(q, qdot)``, ``mlp(8, 200, 1, "softplus")``, batch 200, float32, Adam step on the
``qddot`` loss; the field evaluation: 15 states in float64 under ``torch.no_grad`` (the rollouts' cost).

Three ways to get the Euler--Lagrange accelerations, interleaved in one process:

* ``full_hessian``: the previous implementation, the full ``2d x 2d`` Hessian per row (``vmap(jacfwd(jacrev))``);
* ``func_qdot``: :class:`neurodyn.models.LNN` on a wrapped ``L`` (no closed form): ``torch.func`` with forward
  tangents along ``qdot`` only;
* ``closed_form``: :class:`neurodyn.models.LNN` on the ``mlp`` itself (batched closed-form gradient and ``qdot``
  Hessian columns).

    taskset -c 1 python benchmarks/bench_lnn_hessian.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from neurodyn.models.physics import LNN, mlp


def full_hessian_accelerations(lnn: LNN, x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2

    def grad_twice(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.func.jacrev(lambda r: lnn.lagrangian(r.unsqueeze(0)).squeeze())(z)
        return g, g

    H, g = torch.func.vmap(torch.func.jacfwd(grad_twice, has_aux=True))(x)
    b = g[:, :d] - (H[:, d:, :d] @ x[:, d:].unsqueeze(-1)).squeeze(-1)
    return lnn.regularized_solve(H[:, d:, d:], b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = mlp(8, 200, 1, "softplus")
    fast = LNN(lagrangian=net, warn=False)
    generic = LNN(lagrangian=lambda z: net(z), warn=False)
    variants = {"full_hessian": lambda x: full_hessian_accelerations(fast, x), "func_qdot": generic.accelerations,
                "closed_form": fast.accelerations}
    x, tgt = torch.randn(200, 8), torch.randn(200, 4)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    ref = variants["full_hessian"](x).detach()
    diffs = {k: float((f(x).detach() - ref).abs().max() / ref.abs().max()) for k, f in variants.items()}
    step: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):
        for k, f in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = (f(x) - tgt).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            step[k].append((time.perf_counter() - t0) / args.steps)
    net.double()
    xs = torch.randn(15, 8, dtype=torch.float64)
    field: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(args.reps):
            for k, f in variants.items():
                t0 = time.perf_counter()
                for _ in range(20):
                    f(xs)
                field[k].append((time.perf_counter() - t0) / 20)
    res = {k: {"train_step_s_median": sorted(step[k])[len(step[k]) // 2],
               "field_eval_s_median": sorted(field[k])[len(field[k]) // 2],
               "rel_diff_vs_full_hessian_float32": diffs[k]} for k in variants}
    for k in variants:
        res[k]["train_step_speedup"] = res["full_hessian"]["train_step_s_median"] / res[k]["train_step_s_median"]
        res[k]["field_eval_speedup"] = res["full_hessian"]["field_eval_s_median"] / res[k]["field_eval_s_median"]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
