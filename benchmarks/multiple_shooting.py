"""Single vs multiple shooting on a long-horizon fit: the frequency and damping of an oscillator.

Truth: ``x'' = -w^2 x - 2 z w x'``, ``w = 2``, ``z = 0.02``, from ``(1, 0)``, observed at 161 uniform times on
``[0, 40]`` (about 13 periods) with Gaussian noise 0.05. Both fits start from ``w = W0`` (argument, default 1.2),
``z = 0.1`` and the first observation, use the same discretisation (``rk4``, step 0.05) and L-BFGS; multiple
shooting uses ``K = 20``
segments of 8 intervals, continuity weights 1, 10, 100, 1000 (one L-BFGS run each). Reported: the parameters found,
their errors and the data RMSE of the final single-shooting trajectory.

    PYTHONPATH=src python benchmarks/multiple_shooting.py [W0]
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

import neurodyn
from neurodyn.models import MultipleShooting, penalty_schedule

F64 = torch.float64
W0 = float(sys.argv[1]) if len(sys.argv) > 1 else 1.2  # initial guess of w


def field_of(w: torch.Tensor, z: torch.Tensor):
    def f(t, y):
        return torch.stack([y[..., 1], -w * w * y[..., 0] - 2 * z * w * y[..., 1]], -1)
    return f


def lbfgs(params, closure, iters):
    opt = torch.optim.LBFGS(params, max_iter=iters, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def step():
        opt.zero_grad()
        loss = closure()
        loss.backward()
        return loss

    opt.step(step)


def main() -> dict:
    torch.set_num_threads(1)
    w_true, z_true = 2.0, 0.02
    t = torch.linspace(0, 40, 161, dtype=F64)
    opts = {"method": "rk4", "step_size": 0.05}
    truth = neurodyn.solve(field_of(torch.tensor(w_true, dtype=F64), torch.tensor(z_true, dtype=F64)),
                           torch.tensor([1.0, 0.0], dtype=F64), t, rtol=1e-11, atol=1e-12).ys
    obs = truth + 0.05 * torch.randn(truth.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = {}
    # single shooting
    w = torch.nn.Parameter(torch.tensor(W0, dtype=F64))
    z = torch.nn.Parameter(torch.tensor(0.1, dtype=F64))
    s0 = torch.nn.Parameter(obs[0].clone())
    t0 = time.perf_counter()
    try:
        lbfgs([w, z, s0], lambda: (neurodyn.solve(field_of(w, z), s0, t, params=[w, z], **opts).ys - obs)
              .pow(2).mean(), 400)
        with torch.no_grad():
            rmse = float((neurodyn.solve(field_of(w, z), s0, t, **opts).ys - truth).pow(2).mean().sqrt())
        out["single"] = {"w": float(w), "z": float(z), "w_error": abs(float(w) - w_true),
                         "z_error": abs(float(z) - z_true), "rmse_vs_truth": rmse,
                         "seconds": round(time.perf_counter() - t0, 1)}
    except neurodyn.NeurodynError as exc:  # the line search left the region where the fit is defined
        out["single"] = {"failed": " ".join(str(exc).split()), "seconds": round(time.perf_counter() - t0, 1)}
    # multiple shooting
    w = torch.nn.Parameter(torch.tensor(W0, dtype=F64))
    z = torch.nn.Parameter(torch.tensor(0.1, dtype=F64))
    ms = MultipleShooting(field_of(w, z), t, 20, y_obs=obs, params=[w, z], **opts)
    t0 = time.perf_counter()
    for weight in penalty_schedule(1.0, 10.0, 4):
        lbfgs([w, z, ms.starts], lambda wt=weight: ms.loss(obs, weight=wt), 100)
    with torch.no_grad():
        rmse = float((ms.single_shooting() - truth).pow(2).mean().sqrt())
        defect = float(ms()[1].abs().max())
    out["multiple_K20"] = {"w": float(w), "z": float(z), "w_error": abs(float(w) - w_true),
                           "z_error": abs(float(z) - z_true), "rmse_vs_truth": rmse, "max_defect": defect,
                           "seconds": round(time.perf_counter() - t0, 1)}
    out["noise_std"] = 0.05
    return out


if __name__ == "__main__":
    res = main()
    print(json.dumps(res, indent=2))
    assert math.isfinite(res["multiple_K20"]["w"])
