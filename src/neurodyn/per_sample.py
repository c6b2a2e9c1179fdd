"""Per-sample stepping (``solve(..., per_sample_steps=True)``).

The leading dimension of the state holds independent problems. Each row has its own time, step size,
accept/reject decision, output times, status and statistics, so an easy sample takes large steps while
a hard one takes small ones, instead of the whole batch sharing the step size of the hardest. Every
step still evaluates the vector field once per stage on the whole batch (rows that have finished are
frozen), so it pays off when the rows' difficulties differ.

This is the vectorised form of the loop in ``integrate.py``, over the same stepper and tableau data:
``ExplicitRungeKutta.step_rows`` / ``interpolate_rows`` do the arithmetic; the controller and the error
norm are the same formulas, evaluated per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import solution as _sol
from .errors import InputError, MaxStepsReached, NonFiniteError, StepSizeUnderflow
from .integrate import LoopConfig, real_dtype
from .solution import Solution
from .solvers.explicit_rk import ExplicitRungeKutta

_STATUS_CODES = [_sol.SUCCESS, _sol.MAX_STEPS_REACHED, _sol.STEP_SIZE_UNDERFLOW, _sol.NON_FINITE]


def _row_ratio(err: Tensor, y0: Tensor, y1: Tensor, h: Tensor, rtol, atol) -> Tensor:
    """Per-row error ratio (RMS, or DOP853's combination for two estimates); ``(B,)``, detached."""
    with torch.no_grad():
        scale = torch.maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol)
        sq = (err / scale).abs().pow_(2).sum(dim=2)  # (r, B)
        n = err.shape[2]
        ha = h.abs().to(sq.dtype)
        if sq.shape[0] == 1:
            return ha * torch.sqrt(sq[0] / n)
        deno = sq[0] + 0.01 * sq[1]
        return torch.where(deno > 0, ha * sq[0] / torch.sqrt(n * deno.clamp_min(1e-300)), torch.zeros_like(deno))


def solve_per_sample(func: Callable, y0: Tensor, t: Tensor, solver: ExplicitRungeKutta, cfg: LoopConfig,
                     on_failure: str) -> Solution:
    """Integrate each row of ``y0`` (shape ``(B, ...)``) independently; ``t`` is ``(T,)`` or ``(B, T)``."""
    if y0.dim() < 1 or y0.shape[0] < 1:
        raise InputError("per_sample_steps needs a leading batch dimension in y0.")
    if not solver.adaptive or cfg.step_size is not None:
        raise InputError("per_sample_steps needs an adaptive method without step_size (a fixed step is shared).")
    if cfg.event_fn is not None or cfg.step_t or cfg.jump_t or cfg.norm is not None or cfg.perturb:
        raise InputError("per_sample_steps does not support event_fn, step_t, jump_t, norm or perturb yet.")
    b_rows = y0.shape[0]
    rest = tuple(y0.shape[1:])
    n = max(1, math.prod(rest))
    tdt = real_dtype(y0.dtype)
    dev = y0.device
    times = t.detach().to(torch.float64)
    if times.dim() == 1:
        times = times.unsqueeze(0).expand(b_rows, -1)
    n_out = times.shape[1]
    t0 = times[:, 0].clone()
    t_end = times[:, -1].clone()
    direction = torch.sign(t_end - t0)
    co = solver.coefficients(y0.dtype, dev)
    rtol = cfg.rtol.view(1, n) if isinstance(cfg.rtol, Tensor) else cfg.rtol
    atol = cfg.atol.view(1, n) if isinstance(cfg.atol, Tensor) else cfg.atol
    calls = [0]

    def term_rows(t_rows: Tensor, y_rows: Tensor) -> Tensor:
        calls[0] += 1
        return func(t_rows.to(tdt), y_rows.view(b_rows, *rest)).reshape(b_rows, n)

    y = y0.reshape(b_rows, n)
    k1 = term_rows(t0, y)
    if k1.shape != (b_rows, n) or k1.dtype != y.dtype:
        raise InputError(f"func(t, y) must return the state's shape {tuple(y0.shape)} and dtype {y0.dtype}.")

    # Hairer's initial step, per row.
    with torch.no_grad():
        yd, kd = y.detach(), k1.detach()
        scale = yd.abs().mul(rtol).add(atol)
        inv = 1.0 / math.sqrt(n)
        d0 = torch.linalg.vector_norm(yd / scale, dim=1) * inv
        d1 = torch.linalg.vector_norm(kd / scale, dim=1) * inv
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
        h0 = h0.clamp(max=cfg.max_step).to(torch.float64)
        f1 = term_rows(t0 + direction * h0, yd + (direction * h0).to(yd.dtype).view(-1, 1) * kd)
        d2 = (torch.linalg.vector_norm((f1 - kd) / scale, dim=1) * inv).to(torch.float64) / h0
        big = torch.maximum(d1.to(torch.float64), d2)
        order = solver.order
        h1 = torch.where(big <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6),
                         (0.01 / big.clamp_min(1e-300)) ** (1.0 / (order + 1)))
        h_abs = torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h0, cfg.max_step))
        h_abs = torch.where(torch.isfinite(h_abs), h_abs, torch.full_like(h_abs, 1e-6))
    first_step = h_abs.clone()

    c = cfg.controller
    k_exp = solver.controller_order + 1
    b1 = (c.pcoeff + c.icoeff + c.dcoeff) / k_exp
    b2 = (c.pcoeff + 2 * c.dcoeff) / k_exp
    b3 = c.dcoeff / k_exp
    prev = torch.ones(b_rows, dtype=torch.float64, device=dev)
    prev2 = torch.ones_like(prev)

    ys = y.new_full((n_out, b_rows, n), float("nan"))
    ys[0] = y
    out_idx = torch.ones(b_rows, dtype=torch.long, device=dev)
    rows = torch.arange(b_rows, device=dev)
    # Output times padded with one time beyond the end, so "next output" never runs out.
    times_pad = torch.cat([times, (t_end + direction).unsqueeze(1)], 1)
    next_out = times_pad[rows, out_idx]
    t_cur = t0.clone()
    steps = torch.zeros(b_rows, dtype=torch.long, device=dev)
    rejected = torch.zeros_like(steps)
    attempts = torch.zeros_like(steps)
    status = torch.zeros_like(steps)  # index into _STATUS_CODES
    active = t_cur != t_end
    nonfinite_streak = torch.zeros(b_rows, dtype=torch.bool, device=dev)
    fsal = solver.fsal

    while bool(active.any()):
        remaining = (t_end - t_cur).abs()
        landing = remaining <= h_abs * (1.0 + 1e-7)
        h = torch.where(landing, t_end - t_cur, direction * torch.minimum(h_abs, remaining))
        h = torch.where(active, h, torch.zeros_like(h))
        t1 = torch.where(landing, t_end, t_cur + h)
        y1, k, err = solver.step_rows(term_rows, t_cur, y, h, k1, co)
        ratio = _row_ratio(err, y, y1, h, rtol, atol)
        finite = torch.isfinite(ratio)
        accept = active & finite & (ratio <= 1.0)
        attempts += active.long()

        # Outputs inside (t, t1] for accepted rows, with the method's dense output.
        f_end = None
        if not fsal:
            f_end = term_rows(t1, y1)
        while True:
            need = accept & ((next_out - t1) * direction <= 0)
            if not bool(need.any()):
                break
            idx = out_idx.clamp(max=n_out - 1)
            t_out = next_out
            safe_h = torch.where(h == 0, torch.ones_like(h), h)
            theta = torch.where(need, (t_out - t_cur) / safe_h, torch.zeros_like(h))
            vals = solver.interpolate_rows(term_rows, t_cur, h, y, y1, k, k[-1] if fsal else f_end, theta, co)
            vals = torch.where((t_out == t1).view(-1, 1), y1, vals)
            ys[idx[need], rows[need]] = vals[need]
            out_idx = out_idx + need.long()
            next_out = times_pad[rows, out_idx]

        acc_col = accept.view(-1, 1)
        y = torch.where(acc_col, y1, y)
        k1 = torch.where(acc_col, k[-1] if fsal else f_end, k1)
        t_cur = torch.where(accept, t1, t_cur)
        steps += accept.long()
        rejected += (active & ~accept).long()

        # Controller, per row (same formula as control.PIDController).
        with torch.no_grad():
            r = ratio.clamp_min(1e-10).to(torch.float64)
            fac_acc = c.safety * r.pow(-b1) * prev.pow(b2) * prev2.pow(-b3)
            fac_acc = fac_acc.clamp(c.dfactor, c.ifactor)
            fac_rej = (c.safety * r.pow(-1.0 / k_exp)).clamp(c.dfactor, 1.0)
            fac = torch.where(accept, fac_acc, fac_rej)
            fac = torch.where(finite, fac, torch.full_like(fac, c.dfactor))
            prev2 = torch.where(accept, prev, prev2)
            prev = torch.where(accept, r, prev)
            h_used = h.abs()
            h_abs = torch.where(active, (h_used * fac).clamp(max=cfg.max_step), h_abs)
            nonfinite_streak = torch.where(active, ~finite, nonfinite_streak)
        done = t_cur == t_end
        too_small = active & ~done & ((h_abs < max(cfg.min_step, 0.0)) | (t_cur + direction * h_abs == t_cur)
                                      | (h_abs <= 0))
        status = torch.where(too_small & nonfinite_streak, torch.full_like(status, 3), status)
        status = torch.where(too_small & ~nonfinite_streak, torch.full_like(status, 2), status)
        out_of_steps = active & ~done & ~too_small & (attempts >= cfg.max_steps)
        status = torch.where(out_of_steps, torch.full_like(status, 1), status)
        active = active & ~done & ~too_small & ~out_of_steps

    ys_out = ys.view(n_out, b_rows, *rest)
    codes = [_STATUS_CODES[i] for i in status.tolist()]
    failed = [i for i, s_ in enumerate(codes) if s_ != _sol.SUCCESS]
    overall = codes[failed[0]] if failed else _sol.SUCCESS
    stats = {
        "nfe": calls[0],
        "steps": int(steps.max()),
        "rejected": int(rejected.sum()),
        "steps_per_sample": steps,
        "rejected_per_sample": rejected,
        "initial_step": first_step,
        "method": solver.name,
        "per_sample": True,
        "gradient": "direct",
    }
    message = "success" if not failed else (
        f"{len(failed)} of {b_rows} samples failed (first: sample {failed[0]}, {codes[failed[0]]} at "
        f"t={float(t_cur[failed[0]]):.6g}); see sol.sample_status and sol.t_final_per_sample. Loosen rtol/atol, "
        f"raise max_steps, or check the vector field for those samples.")
    sol = Solution(ts=t, ys=ys_out, stats=stats, status=overall, message=message,
                   t_final=float(t_cur.max() if float(direction[0]) > 0 else t_cur.min()),
                   y_final=y.view(b_rows, *rest), n_valid=int(out_idx.min()), sample_status=codes,
                   t_final_per_sample=t_cur)
    if failed and on_failure == "raise":
        cls = {_sol.MAX_STEPS_REACHED: MaxStepsReached, _sol.STEP_SIZE_UNDERFLOW: StepSizeUnderflow,
               _sol.NON_FINITE: NonFiniteError}[overall]
        raise cls(message + " (pass on_failure='return' to get the partial solution)", status=overall,
                  t=float(t_cur[failed[0]]), solution=sol)
    return sol
