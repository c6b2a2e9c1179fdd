"""Stiff test problems with published (or independently computed) reference values.

Every problem is a :class:`StiffProblem`: a torch vector field ``f(t, y)`` (``y`` 1-d, or ``(B, n)`` for the
batched versions), its numpy twin and analytic Jacobian (for scipy), ``y0``, the end time, the tolerances
the tests use, and the reference value at the end time with its source.

References
----------
* Robertson (ROBER), k1 = 0.04, k2 = 3e7, k3 = 1e4, y0 = (1, 0, 0), t_end = 1e11: reference values of the
  IVP Test Set (F. Mazzia & F. Iavernaro / C. Magherini, "Test Set for IVP Solvers", release 2.4, problem
  ROBER, computed there with RADAU5 at tight tolerances); scipy Radau at rtol=1e-12, atol=(1e-16, 1e-20,
  1e-16) agrees to 4e-10 relative (checked in the slow test ``test_references_against_scipy``).
* HIRES (Schaefer 1975; Hairer & Wanner II, IV.10), t_end = 321.8122: reference values of the IVP Test Set
  (problem HIRES); scipy Radau at rtol=1e-13, atol=1e-16 agrees to 2e-13 relative.
* Van der Pol, y1' = y2, y2' = mu (1 - y1^2) y2 - y1, mu = 1e3, y0 = (2, 0) (MATLAB's vdp1000): reference at
  t = 1000 and t = 2000 computed with scipy's Radau at rtol=1e-13, atol=1e-14 and the analytic Jacobian
  (rtol=1e-12 agrees to 5e-13 relative).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------
# Robertson
# ----------------------------------------------------------------------------------------------------
ROBER_K = (0.04, 3e7, 1e4)


def rober(t, y):
    """Robertson's chemical kinetics; ``y`` of shape ``(3,)`` or ``(B, 3)`` (then rows are independent)."""
    k1, k2, k3 = ROBER_K
    y1, y2, y3 = y.unbind(-1)
    r1, r2, r3 = k1 * y1, k2 * y2 * y2, k3 * y2 * y3
    return torch.stack([-r1 + r3, r1 - r2 - r3, r2], -1)


def rober_np(t, y):
    k1, k2, k3 = ROBER_K
    return np.array([-k1 * y[0] + k3 * y[1] * y[2], k1 * y[0] - k3 * y[1] * y[2] - k2 * y[1] ** 2, k2 * y[1] ** 2])


def rober_jac_np(t, y):
    k1, k2, k3 = ROBER_K
    return np.array([[-k1, k3 * y[2], k3 * y[1]],
                     [k1, -k3 * y[2] - 2 * k2 * y[1], -k3 * y[1]],
                     [0.0, 2 * k2 * y[1], 0.0]])


# ----------------------------------------------------------------------------------------------------
# HIRES
# ----------------------------------------------------------------------------------------------------
def hires(t, y):
    """The HIRES photomorphogenesis model (8 components); ``y`` of shape ``(8,)`` or ``(B, 8)``."""
    y1, y2, y3, y4, y5, y6, y7, y8 = y.unbind(-1)
    r = 280.0 * y6 * y8
    return torch.stack([
        -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
        1.71 * y1 - 8.75 * y2,
        -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
        8.32 * y2 + 1.71 * y3 - 1.12 * y4,
        -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
        -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
        r - 1.81 * y7,
        -r + 1.81 * y7,
    ], -1)


def hires_np(t, y):
    y1, y2, y3, y4, y5, y6, y7, y8 = y
    r = 280.0 * y6 * y8
    return np.array([-1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007, 1.71 * y1 - 8.75 * y2,
                     -10.03 * y3 + 0.43 * y4 + 0.035 * y5, 8.32 * y2 + 1.71 * y3 - 1.12 * y4,
                     -1.745 * y5 + 0.43 * y6 + 0.43 * y7, -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
                     r - 1.81 * y7, -r + 1.81 * y7])


def hires_jac_np(t, y):
    J = np.zeros((8, 8))
    J[0, :3] = [-1.71, 0.43, 8.32]
    J[1, :2] = [1.71, -8.75]
    J[2, 2:5] = [-10.03, 0.43, 0.035]
    J[3, [1, 2, 3]] = [8.32, 1.71, -1.12]
    J[4, 4:7] = [-1.745, 0.43, 0.43]
    J[5, 3:8] = [0.69, 1.71, -0.43 - 280 * y[7], 0.69, -280 * y[5]]
    J[6, [5, 6, 7]] = [280 * y[7], -1.81, 280 * y[5]]
    J[7, [5, 6, 7]] = [-280 * y[7], 1.81, -280 * y[5]]
    return J


# ----------------------------------------------------------------------------------------------------
# Van der Pol, mu = 1e3
# ----------------------------------------------------------------------------------------------------
VDP_MU = 1e3


def vdp(t, y):
    """Van der Pol with mu = 1e3; ``y`` of shape ``(2,)`` or ``(B, 2)``."""
    y1, y2 = y.unbind(-1)
    return torch.stack([y2, VDP_MU * (1 - y1 * y1) * y2 - y1], -1)


def vdp_np(t, y):
    return np.array([y[1], VDP_MU * (1 - y[0] ** 2) * y[1] - y[0]])


def vdp_jac_np(t, y):
    return np.array([[0.0, 1.0], [-2 * VDP_MU * y[0] * y[1] - 1.0, VDP_MU * (1 - y[0] ** 2)]])


# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StiffProblem:
    name: str
    f: Callable
    f_np: Callable
    jac_np: Callable
    y0: tuple
    t_end: float
    reference: tuple
    atol: tuple | float  # the absolute tolerance the tests use (per component where given)
    source: str

    def y0_tensor(self, dtype=torch.float64) -> torch.Tensor:
        return torch.tensor(self.y0, dtype=dtype)

    def atol_tensor(self, dtype=torch.float64):
        return torch.tensor(self.atol, dtype=dtype) if isinstance(self.atol, tuple) else self.atol

    def rel_error(self, y) -> float:
        """Largest componentwise relative error against the reference."""
        ref = np.asarray(self.reference)
        return float(np.max(np.abs(np.asarray(y, dtype=np.float64) - ref) / np.abs(ref)))


ROBER = StiffProblem(
    "robertson", rober, rober_np, rober_jac_np, (1.0, 0.0, 0.0), 1e11,
    (0.2083340149701255e-07, 0.8333360770334713e-13, 0.9999999791665050e+00),
    (1e-14, 1e-20, 1e-14), "IVP Test Set 2.4, ROBER",
)
HIRES = StiffProblem(
    "hires", hires, hires_np, hires_jac_np, (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057), 321.8122,
    (0.7371312573325668e-3, 0.1442485726316185e-3, 0.5888729740967575e-4, 0.1175651343283149e-2,
     0.2386356198831331e-2, 0.6238968252742796e-2, 0.2849998395185769e-2, 0.2850001604814231e-2),
    1e-10, "IVP Test Set 2.4, HIRES",
)
VDP = StiffProblem(
    "vdp1000", vdp, vdp_np, vdp_jac_np, (2.0, 0.0), 2000.0,
    (1.7061677321708346, -0.0008928097010244188), 1e-8, "scipy Radau rtol=1e-13, atol=1e-14",
)
# The same orbit to t = 1000 (one relaxation jump, at t ~ 807): the default suite's shorter Van der Pol.
VDP_SHORT = StiffProblem(
    "vdp1000_t1000", vdp, vdp_np, vdp_jac_np, (2.0, 0.0), 1000.0,
    (-1.86364625480832, 0.0007535430865429592), 1e-8, "scipy Radau rtol=1e-13, atol=1e-14",
)
PROBLEMS = {p.name: p for p in (ROBER, HIRES, VDP, VDP_SHORT)}
