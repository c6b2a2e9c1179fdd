"""Work-precision of step-size controllers: why neurodyn's default is PI(p=0.1, i=0.7).

For dopri5 and tsit5 on three problems (the core protocol's small MLP field, a Kepler orbit with
eccentricity 0.6, Van der Pol mu = 1), solves at rtol 1e-4, 1e-6, 1e-8, 1e-10 (atol = rtol / 100) with
several controllers and reports NFE and the max error at the output times against a tight reference
(scipy DOP853 / neurodyn dopri8 at 1e-12..1e-13). The score sums NFE * err^(1/5) over the tolerances:
lower is better, the 5th root putting NFE and error on the footing of a 5th-order method.

    .venv/bin/python benchmarks/controller_study.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from scipy.integrate import solve_ivp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CASES, make_problem  # noqa: E402

import neurodyn  # noqa: E402

F64 = torch.float64
CONTROLLERS = {
    "I (p=0, i=1)": neurodyn.PIDController(pcoeff=0.0, icoeff=1.0),
    "PI (p=0.1, i=0.7) [default]": neurodyn.PIDController(pcoeff=0.1, icoeff=0.7),
    "PI (p=0.2, i=0.4)": neurodyn.PIDController(pcoeff=0.2, icoeff=0.4),
    "PI (p=0.3, i=0.3)": neurodyn.PIDController(pcoeff=0.3, icoeff=0.3),
}
RTOLS = (1e-4, 1e-6, 1e-8, 1e-10)


def _kepler(t, y):
    q, p = y[..., :2], y[..., 2:]
    r3 = (q * q).sum(-1, keepdim=True) ** 1.5
    return torch.cat([p, -q / r3], -1)


def _vdp(t, y):
    return torch.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


def _scipy_ref(f, y0, t):
    sol = solve_ivp(lambda tt, yy: f(tt, torch.tensor(yy)).numpy(), (float(t[0]), float(t[-1])), y0.numpy(),
                    method="DOP853", rtol=1e-13, atol=1e-14, t_eval=t.numpy())
    return torch.tensor(sol.y.T)


def problems():
    prob = make_problem(CASES["small"])
    with torch.no_grad():
        ref = neurodyn.solve(prob.field, prob.y0, prob.t, method="dopri8", rtol=1e-12, atol=1e-14).ys
    yield "MLP (protocol small)", prob.field, prob.y0, prob.t, ref
    e = 0.6
    y0 = torch.tensor([1 - e, 0.0, 0.0, math.sqrt((1 + e) / (1 - e))], dtype=F64)
    t = torch.linspace(0, 20, 11, dtype=F64)
    yield "Kepler e=0.6", _kepler, y0, t, _scipy_ref(_kepler, y0, t)
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0, 20, 11, dtype=F64)
    yield "Van der Pol mu=1", _vdp, y0, t, _scipy_ref(_vdp, y0, t)


def main() -> int:
    torch.set_num_threads(1)
    lines = ["| problem | method | " + " | ".join(CONTROLLERS) + " |", "|---|---|" + "---|" * len(CONTROLLERS)]
    for name, f, y0, t, ref in problems():
        for method in ("dopri5", "tsit5"):
            cells = []
            for ctrl in CONTROLLERS.values():
                score, parts = 0.0, []
                for rtol in RTOLS:
                    with torch.no_grad():
                        sol = neurodyn.solve(f, y0, t, method=method, rtol=rtol, atol=rtol / 100, controller=ctrl)
                    err = float((sol.ys - ref).abs().max())
                    score += sol.stats["nfe"] * err ** 0.2
                    parts.append(f"{sol.stats['nfe']}/{err:.0e}")
                cells.append(f"**{score:.0f}** ({', '.join(parts)})")
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    print("Score = sum over rtol in 1e-4, 1e-6, 1e-8, 1e-10 of NFE * err^(1/5) (lower is better); "
          "in brackets NFE/max error per tolerance.\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
