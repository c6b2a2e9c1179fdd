"""Events: locating a root of ``event_fn`` inside an accepted step, and its differentiable time and state."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import LoopConfig
from .stepper import Step, Stepper
from .term import ODETerm


def locate_event(term: ODETerm, solver: Stepper, st: Step, co, cfg: LoopConfig,
                  g0: Tensor, changed: Tensor) -> tuple[Step, float, int]:
    """Earliest root in the step of any component of ``event_fn`` that changed sign (Illinois)."""
    best_theta, best_comp = 2.0, -1
    with torch.no_grad():
        def g_at(theta: float, comp: int) -> float:
            th = torch.tensor([theta], dtype=term.t_dtype, device=st.y0.device)
            yv = solver.interpolate(term, st, th, co, cfg.interp)
            tt = torch.scalar_tensor(st.t0 + theta * st.h, dtype=term.t_dtype, device=term.device)
            return float(cfg.event_fn(tt, yv.view(term.shape)).reshape(-1)[comp])

        for comp in torch.nonzero(changed).view(-1).tolist():
            a, b = 0.0, 1.0
            fa, fb = float(g0[comp]), g_at(1.0, comp)
            side = 0
            for _ in range(200):
                if fb == fa:
                    m = 0.5 * (a + b)
                else:
                    m = (a * fb - b * fa) / (fb - fa)
                    if not (a < m < b):
                        m = 0.5 * (a + b)
                fm = g_at(m, comp)
                if fm == 0 or abs(b - a) * abs(st.h) <= 4 * math.ulp(max(abs(st.t0), abs(st.t0 + st.h), 1e-300)):
                    a = b = m
                    break
                if (fm > 0) == (fb > 0):
                    b, fb = m, fm
                    if side == -1:
                        fa *= 0.5
                    side = -1
                else:
                    a, fa = m, fm
                    if side == 1:
                        fb *= 0.5
                    side = 1
            theta = 0.5 * (a + b)
            if theta < best_theta:
                best_theta, best_comp = theta, comp
    return st, best_theta, best_comp


def differentiable_event(term: ODETerm, solver: Stepper, cfg: LoopConfig,
                          event: tuple[Step, float, int]) -> tuple[Tensor, Tensor]:
    """Event time and state, with gradients by the implicit function theorem.

    With the root ``t*`` of ``g(t, y(t))`` found numerically, ``t_e = t* - (g - g.detach()) / (dg/dt)``
    has the value ``t*`` and the gradient ``-dg/dtheta / (dg/dt)``; the state is moved along ``f``.
    """
    st, theta, comp = event
    co = solver.coefficients(st.y0.dtype, st.y0.device)
    t_star = st.t0 + theta * st.h
    th = torch.tensor([theta], dtype=term.t_dtype, device=st.y0.device)
    y_star = solver.interpolate(term, st, th, co, cfg.interp)  # (1, n), in the graph
    tt = torch.scalar_tensor(t_star, dtype=term.t_dtype, device=term.device)
    g = cfg.event_fn(tt, y_star.view(term.shape)).reshape(-1)[comp]
    with torch.enable_grad():
        td = tt.detach().requires_grad_(True)
        yd = y_star.detach().view(term.shape).requires_grad_(True)
        gd = cfg.event_fn(td, yd).reshape(-1)[comp]
        if gd.requires_grad:
            gt, gy = torch.autograd.grad(gd, (td, yd), allow_unused=True)
        else:
            gt, gy = None, None
    f_star = term(t_star, y_star.detach()).view(term.shape)
    dgdt = (gt if gt is not None else 0.0) + ((gy * f_star).sum() if gy is not None else 0.0)
    dgdt = torch.as_tensor(dgdt, dtype=term.t_dtype, device=term.device).detach()
    if float(dgdt.abs()) == 0.0:
        t_e = tt
    else:
        t_e = tt - (g - g.detach()) / dgdt
    y_e = y_star.view(term.shape) + f_star.detach() * (t_e - tt).to(f_star.dtype)
    return t_e, y_e.reshape(1, -1)
