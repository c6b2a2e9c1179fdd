"""One generic explicit Runge--Kutta stepper for every tableau.

States travel through the engine flattened to shape ``(1, n)``; stage derivatives are stacked into an
``(s, n)`` tensor so that every stage combination is one ``addmm`` over the stacked stages (one pass over
memory, whatever the number of stages); a combination with one nonzero coefficient is one ``add``. Without
autograd, where no step is kept, they are written into a buffer reused between steps. Under autograd
(``gradient="direct"``, checkpoint replays) and where steps are kept for dense output, the stages are kept in a
list and concatenated out of place for each combination (in-place writes into a buffer would add copy nodes per
stage to the backward pass), with the same operations, so both paths give the same values bit for bit.

Under ``torch.func.vmap`` (e.g. an ensemble of fields evaluated with ``functional_call`` over stacked
parameters) a stage may be batched while the state is not, and a batched value cannot be written into an
unbatched buffer: there too the stages are built out of place (:func:`~neurodyn.core.tensors.vmapped`).

Precision below float64 (float32, complex64, half types)
--------------------------------------------------------
``torch.addmm(y, a, k, alpha=h)`` adds the products ``h a_j k_j`` into ``y`` one by one on the CPU, so a stage
combination is rounded at the magnitude of ``y`` once per stage. In float64 that is invisible; in float32 it is
the dominant rounding error of a small step (on ``y' = (y2, -y1)`` with ``h = 2^-10``, ``rk4`` drifted 18x
further than torchdiffeq's over 1e5 steps). There every combination is ``y + h (a @ k)``: the stage sum at the
magnitude of the increment, then one rounding at the magnitude of ``y``, as torchdiffeq's ``y0 + dy``
(per-sample steps: ``y + (a @ kh)``). And the ``h`` of that arithmetic is :func:`float32_step`, the distance
between the float32 times the step spans: ``h`` cast to float32 would shorten (or lengthen) every step by the
same rounding (``h = 0.01``: 2.2e-8 relative, a phase drift ``T`` times that). One more kernel per combination
than float64's single ``addmm``.

Below float64, for a tableau without an error estimate (the fixed-step methods), without a stage buffer (an autograd
graph is recorded, dense output is kept, or ``torch.func.vmap``) the stages stay in the bound term's state shape and
every combination is elementwise,
``y + (h a_1) (k_1 + sum_j (a_j / a_1) k_j)`` over the row's nonzero entries (:func:`_combine`): the same two
roundings (the stage sum at the increment's magnitude, then one at ``y``'s), in another order than the buffered
path's matrix product, so the two paths agree to rounding, not always bit for bit. Under autograd that is the
cheaper graph, forward and backward: elementwise adds only, no concatenation, matrix product or ``(1, n)`` views per
stage (one view of ``y`` and one of ``y1`` per step). Adaptive tableaus keep the matrix product under autograd too:
their accept/reject decisions compare error ratios that a rounding difference can move across 1, and a solve
under autograd takes the same steps as one without.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.interpolation import hermite, linear
from ..core.stepper import Step, StepperBase
from ..core.tensors import ordinary_tensors, vmapped
from ..core.term import ODETerm, check_output
from .tableaus import ButcherTableau

Term = Callable[[float, Tensor], Tensor]  # (t, y of shape (1, n)) -> dy/dt of shape (n,)


@dataclass
class _Coefficients:
    """A tableau's coefficients as tensors of one dtype on one device."""

    a: list[Tensor | None]  # row i: (1, i)
    b: Tensor  # (1, s)
    e: Tensor | None  # (1, s), or (2, s) with a lower-order second estimate
    c: list[float]
    dense_t: Tensor | None  # (d, s + extra): transpose of the dense matrix P, float64
    extra_a: list[Tensor]  # row i: (1, s + i)
    extra_c: list[float]
    # Below float64 precision: every stage combination is y + h (a @ k) with float32_step's h (module docstring).
    low: bool = False
    # Row i's nonzero entries (j, a_ij): the stage combinations of a solve that records an autograd graph.
    nonzero: list[list[tuple[int, float]]] | None = None
    # The nonzero entries (j, b_j) of b: the last combination of a float32 solve under autograd (elementwise).
    b_nonzero: list[tuple[int, float]] | None = None


@dataclass
class StageBuffers:
    """A reusable stage buffer: ``shaped`` (s, *state shape), ``flat`` (s, n), ``heads[i] = flat[:i]``,
    ``rows[i] = shaped[i]``; ``plan`` (for :meth:`ExplicitRungeKutta.step`) lists per stage ``i >= 1`` its
    tableau row, the stages it combines (``heads[i]``, or ``flat[j:j+1]`` when ``a_ij`` is its one nonzero
    entry), ``rows[i]``, ``c[i]``, whether ``c[i] == c[i-1]`` (the same stage time) and that one entry (else
    None)."""

    shaped: Tensor
    flat: Tensor
    heads: list[Tensor]
    rows: list[Tensor]
    plan: list[tuple[Tensor, Tensor, Tensor, float, bool, float | None]] | None = None


_F32_MAX = float(np.finfo(np.float32).max)
_F32 = struct.Struct("f")


def float32_step(t: float, h: float) -> float:
    """The step a stage combination uses when the state is below float64 precision: the distance between the
    float32 times the step spans, ``float32(t + h) - float32(t)`` (as torchdiffeq's ``t1 - t0`` on its float32
    grid). Computed in float64, where the difference is exact; ``t, h`` floats, returns a float.

    ``h`` cast to float32 on every step would shorten (or lengthen) every step by the same rounding (``h = 0.01``:
    2.2e-8 relative, a phase drift of ``T`` times that); these steps add up to ``float32(t_end) - float32(t0)``.

    >>> float32_step(0.0, 2.0 ** -10) == 2.0 ** -10
    True
    >>> steps = [float32_step(k * 0.01, 0.01) for k in range(1000)]
    >>> sum(steps) == float(np.float32(10.0))   # float32(0.01) * 1000 is 10 - 2.2e-7
    True
    """
    t1 = t + h
    if not (abs(t) <= _F32_MAX and abs(t1) <= _F32_MAX):  # beyond float32 (or NaN): h itself
        return h
    pack, unpack = _F32.pack, _F32.unpack  # a float32 round trip (round to nearest, as a tensor cast)
    return unpack(pack(t1))[0] - unpack(pack(t))[0]


# interpolate_rows at several fractions per row: from this many output elements on, by stage weights and one batched
# product (measured faster from a few thousand elements; below, Horner's rule).
_WEIGHTS_MIN = 4096


def _tensor(values, dtype, device) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64).to(dtype=dtype, device=device)


def _combine(y: Tensor, ks: list[Tensor], entries: list[tuple[int, float]], h: float) -> Tensor:
    """``y + h sum_j a_j ks[j]`` over the nonzero ``entries`` ``(j, a_j)``, elementwise: the stage sum
    ``a_1 (k_1 + sum_j (a_j / a_1) k_j)`` at the increment's magnitude, then one rounding at ``y``'s (one ``add`` per
    entry, no concatenation or matrix product: the cheapest form under autograd, forward and backward)."""
    j0, a0 = entries[0]
    acc = ks[j0]
    for j, a in entries[1:]:
        acc = torch.add(acc, ks[j], alpha=a / a0)
    return torch.add(y, acc, alpha=a0 * h)


def _shaped_step(stepper: ExplicitRungeKutta, term: ODETerm, t: float, y: Tensor, h: float, hs: float, k1: Tensor,
                 co: _Coefficients, t_end_nudge: float | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """:meth:`ExplicitRungeKutta.step` below float64 for a tableau without an error estimate, without a stage buffer
    (an autograd graph is recorded, dense output is kept, or ``torch.func.vmap``): the stages stay in the bound term's
    state shape (``term.shape``, which ``k1`` has and the term accepts and returns), every combination is
    :func:`_combine` with the float32 step ``hs``, and ``y`` / ``y1`` are viewed between the loop's ``(1, n)`` and that
    shape once per step (not once per stage). Returns ``(y1, k, None)`` as :meth:`ExplicitRungeKutta.step`."""
    yu = y if y.shape == term.shape else term.in_shape(y)
    c, nonzero = co.c, co.nonzero
    ks = [k1]
    yi = yu
    for i in range(1, stepper.stages):
        yi = _combine(yu, ks, nonzero[i], hs)
        ti = t + c[i] * h if (t_end_nudge is None or c[i] != 1.0) else t_end_nudge
        ks.append(term(ti, yi))
    y1 = yi if stepper.last_stage_is_y1 else _combine(yu, ks, co.b_nonzero, hs)
    y1_flat = y1.reshape(1, -1)
    if y1_flat is not y1:
        term.shaped = (y1_flat, y1)  # the next step (and the loop's call at its start) take y1 in the term's shape
    return y1_flat, torch.stack(ks).view(len(ks), -1), None


class ExplicitRungeKutta(StepperBase):
    """A generic explicit RK method driven by a :class:`ButcherTableau`.

    The integrate loop calls :meth:`step` and, for accepted steps, :meth:`interpolate`; it knows
    nothing about any particular method.
    """

    rows = True
    compilable = True

    def __init__(self, tableau: ButcherTableau):
        self.tableau = tableau
        self.name = tableau.name
        self.order = tableau.order
        self.error_order = tableau.error_order
        self.controller_order = tableau.controller_order
        self.adaptive = tableau.adaptive
        self.fsal = tableau.fsal or tableau.reuse_last_stage
        self.stages = tableau.stages
        self.dense_order = tableau.dense_order if tableau.dense is not None else 3
        self.has_own_dense = tableau.dense is not None
        # Stage s-1 lands on y1 exactly when its row equals b (FSAL): reuse it as the new state.
        self.last_stage_is_y1 = tableau.fsal and tuple(tableau.a[-1]) == tuple(tableau.b[:-1])
        self._cache: dict[tuple[torch.dtype, torch.device], _Coefficients] = {}
        self._power_cache: dict[tuple[int, torch.device], Tensor] = {}
        # The dense-output weights of the last fractions tensor interpolated at (the tensor itself, its version, the
        # coefficients, the weights): a caller checking the same fractions every step builds them once.
        self._weights_cache: tuple[Tensor, int, Any, Tensor] | None = None
        self._c_cache: dict[torch.device, Tensor] = {}
        self._c_floats = [float(x) for x in tableau.c][1:]
        self._dense_rows = [[float(v) for v in row] for row in tableau.dense] if tableau.dense is not None else None

    # -- coefficients, cached per dtype/device ---------------------------------------------------
    def coefficients(self, dtype: torch.dtype, device: torch.device) -> _Coefficients:
        key = (dtype, device)
        co = self._cache.get(key)
        if co is None:
            with ordinary_tensors():  # a cache shared by later solves, with or without autograd
                tb = self.tableau
                a: list[Tensor | None] = [None] + [_tensor(row, dtype, device).view(1, -1) for row in tb.a[1:]]
                b = _tensor(tb.b, dtype, device).view(1, -1)
                e = None
                if tb.b_err is not None:  # one row, or two for a combined estimate (DOP853)
                    rows = [tb.b_err] + ([tb.b_err_low] if tb.b_err_low is not None else [])
                    e = torch.stack([_tensor(r, dtype, device) for r in rows])
                dense_t = None
                if tb.dense is not None:
                    p = torch.tensor([[float(v) for v in row] for row in tb.dense], dtype=torch.float64)
                    # Kept in float64: DOP853's matrix has entries ~500 that cancel; weights are cast after.
                    dense_t = p.t().contiguous().to(device=device)
                extra_a = [_tensor(row, dtype, device).view(1, -1) for row in tb.extra_a]
                nonzero = [[(j, float(v)) for j, v in enumerate(row) if float(v) != 0.0] for row in tb.a]
                b_nonzero = [(j, float(v)) for j, v in enumerate(tb.b) if float(v) != 0.0]
                co = _Coefficients(a, b, e, [float(x) for x in tb.c], dense_t, extra_a,
                                   [float(x) for x in tb.extra_c], low=torch.finfo(dtype).bits < 64, nonzero=nonzero,
                                   b_nonzero=b_nonzero)
            self._cache[key] = co
        return co

    def quadrature_weights(self) -> tuple[float, ...]:
        """The tableau's weights ``b``: :meth:`step` evaluates the term once per stage ``2..s``, in order, and
        returns ``y + h sum_i b_i k_i`` (up to rounding; see :meth:`StepperBase.quadrature_weights`)."""
        return tuple(float(v) for v in self.tableau.b)

    def stage_times(self, t: float, h: float) -> list[float]:
        """``t + c_i h`` for the stages ``2..s`` (as :meth:`step` computes them without ``t_end_nudge``)."""
        return [t + ci * h for ci in self._c_floats]

    # -- stage buffers ---------------------------------------------------------------------------
    def make_buffers(self, y: Tensor, k1: Tensor) -> StageBuffers | None:
        """A preallocated stage buffer with its views, for solves that keep no autograd graph.

        None under ``torch.func.vmap`` (``y`` or ``k1`` batched): :meth:`step` then builds its stages out of
        place, as batched stages cannot be copied into a buffer allocated from an unbatched state.
        """
        if vmapped(y, k1):
            return None
        s = self.stages
        shaped = y.new_empty((s, *k1.shape))
        flat = shaped.view(s, -1)
        heads, rows = [flat[:i] for i in range(s + 1)], list(shaped.unbind(0))
        co = self.coefficients(y.dtype, y.device)
        c = co.c
        plan = []
        for i in range(1, s):
            nz = co.nonzero[i]
            one, head = (nz[0][1], flat[nz[0][0]:nz[0][0] + 1]) if len(nz) == 1 else (None, heads[i])
            plan.append((co.a[i], head, rows[i], c[i], i > 1 and c[i] == c[i - 1], one))
        return StageBuffers(shaped, flat, heads, rows, plan)

    # -- one step --------------------------------------------------------------------------------
    def step(self, term: Term, t: float, y: Tensor, h: float, k1: Tensor, co: _Coefficients,
             t_end_nudge: float | None = None, buf: StageBuffers | None = None
             ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Advance ``y`` (shape ``(1, n)``) from ``t`` by ``h``.

        ``k1`` (the user's state shape) is dy/dt at ``(t, y)``. ``t_end_nudge`` replaces the time of stages with
        ``c == 1`` (to evaluate just before a discontinuity). Returns ``(y1, k, err)``: ``k`` the stacked
        stages ``(s, n)`` and ``err`` the local error estimate divided by ``h`` (``(1, n)``, or
        ``(2, n)`` for a combined estimate; ``None`` for fixed-step methods) -- the caller scales by
        ``|h|`` inside the norm, which saves a pass.
        """
        s = self.stages
        a = co.a
        c = co.c
        yi = y
        addmm = torch.addmm
        # Below float64: y + h (a @ k), rounded once at y's magnitude (module docstring); float64: one addmm.
        full = not co.low
        add, mm = torch.add, torch.mm
        if not full:
            hs = float32_step(t, h)
        hh = h if full else hs  # the step a single-entry combination y + (h a_ij) k_j is scaled by
        if buf is not None:  # no autograd graph: reuse a buffer and its cached views
            k = buf.flat
            buf.rows[0].copy_(k1)
            if getattr(term, "inline", False):
                # The term's call inlined (the per-stage Python frames are a measurable share of a small
                # solve); stages at the same time as the previous one get the same time tensor.
                func, t_dtype, device, shape = term.func, term.t_dtype, term.device, term.shape
                term.nfe += s - 1
                scalar = torch.scalar_tensor
                tt = None
                if term.flat:
                    for ai, hi, ri, ci, same, one in buf.plan:
                        yi = add(y, hi, alpha=one * hh) if one is not None else \
                            addmm(y, ai, hi, alpha=h) if full else add(y, mm(ai, hi), alpha=hs)
                        if not same:
                            ti = t + ci * h if (t_end_nudge is None or ci != 1.0) else t_end_nudge
                            tt = scalar(ti, dtype=t_dtype, device=device)
                        fi = func(tt, yi)
                        if not (isinstance(fi, Tensor) and fi.shape == shape):
                            check_output(fi, shape, float(tt))
                        ri.copy_(fi)
                else:
                    for ai, hi, ri, ci, same, one in buf.plan:
                        yi = add(y, hi, alpha=one * hh) if one is not None else \
                            addmm(y, ai, hi, alpha=h) if full else add(y, mm(ai, hi), alpha=hs)
                        if not same:
                            ti = t + ci * h if (t_end_nudge is None or ci != 1.0) else t_end_nudge
                            tt = scalar(ti, dtype=t_dtype, device=device)
                        fi = func(tt, yi.view(shape))
                        if not (isinstance(fi, Tensor) and fi.shape == shape):
                            check_output(fi, shape, float(tt))
                        ri.copy_(fi)
            else:
                for ai, hi, ri, ci, _, one in buf.plan:
                    yi = add(y, hi, alpha=one * hh) if one is not None else \
                        addmm(y, ai, hi, alpha=h) if full else add(y, mm(ai, hi), alpha=hs)
                    ti = t + ci * h if (t_end_nudge is None or ci != 1.0) else t_end_nudge
                    ri.copy_(term(ti, yi))
        elif not full and co.e is None and s > 1 and isinstance(term, ODETerm) and term.shape is not None \
                and k1.shape == term.shape:
            # Below float64, a tableau without error estimate, no buffer (an autograd graph): the stages and their
            # combinations in the term's own state shape, each combination elementwise (module docstring).
            return _shaped_step(self, term, t, y, h, hs, k1, co, t_end_nudge)
        elif s == 1:  # one stage (Euler): the stage matrix is k1 itself, no buffer to copy it into
            k = k1.reshape(1, -1)
        else:
            # No buffer (an autograd graph is recorded, or torch.func.vmap): stages out of place. Under autograd a
            # stage written into a shared buffer costs a full-buffer CopySlices and AsStrided node per stage in the
            # backward pass; under vmap a batched stage cannot be written into an unbatched buffer at all. The
            # combinations are the buffered path's, operation for operation (the same values bit for bit): one
            # nonzero coefficient is one add (y + (h a_ij) k_j); otherwise one (a)mm over the stages so far.
            nonzero = co.nonzero
            ks = [k1.reshape(1, -1)]
            for i in range(1, s):
                nz = nonzero[i]
                if len(nz) == 1:
                    j, aij = nz[0]
                    yi = add(y, ks[j], alpha=aij * hh)
                else:
                    kk = torch.cat(ks)
                    yi = addmm(y, a[i], kk, alpha=h) if full else add(y, mm(a[i], kk), alpha=hs)
                ti = t + c[i] * h if (t_end_nudge is None or c[i] != 1.0) else t_end_nudge
                ks.append(term(ti, yi).reshape(1, -1))
            k = torch.cat(ks)
        if self.last_stage_is_y1:
            y1 = yi
        elif s == 1:  # one stage: consistency makes b = (1), so y1 = y + h k1
            y1 = torch.add(y, k, alpha=h if full else hs)
        elif full:
            y1 = addmm(y, co.b, k, alpha=h)
        else:
            y1 = add(y, mm(co.b, k), alpha=hs)
        if co.e is None:
            return y1, k, None
        return y1, k, torch.mm(co.e, k.detach() if k.requires_grad else k)

    # -- per-sample steps: every row of a (B, n) state has its own step size ----------------------
    def make_row_buffers(self, y: Tensor) -> StageBuffers:
        """A preallocated ``(s, B, n)`` stage buffer for :meth:`step_rows` (solves without autograd)."""
        s = self.stages
        shaped = y.new_empty((s, *y.shape))
        flat = shaped.view(s, -1)
        return StageBuffers(shaped, flat, [flat[:i] for i in range(s + 1)], [shaped[i] for i in range(s)])

    def step_rows(self, term_rows: Callable[[Tensor, Tensor], Tensor], t: Tensor, y: Tensor, h: Tensor,
                  hc: Tensor, k1: Tensor, co: _Coefficients, buf: StageBuffers | None = None
                  ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """One step of every row of ``y`` (``(B, n)``) with its own ``h`` (``(B,)``) from its own ``t``.

        ``term_rows(t_rows, y_rows)`` evaluates dy/dt for all rows (``t_rows`` of shape ``(B,)``); ``hc`` is
        ``h`` as a ``(B, 1)`` column of the state's real dtype. The stages are stored multiplied by their
        row's step, ``kh[i] = h * k_i`` (shape ``(s, B, n)``), so every stage combination is one ``addmm``
        of a tableau row with the stacked stages. ``buf`` (from :meth:`make_row_buffers`) is reused when
        no autograd graph is kept. Returns ``(y1, kh, err, f_last)``: ``err`` of shape ``(r, B, n)`` is the
        local error estimate (already multiplied by ``h``; ``r = 2`` for a combined estimate) or None
        for fixed-step methods; ``f_last`` is the last stage's unscaled derivative (the next step's
        first stage for FSAL methods).
        """
        s = self.stages
        b_rows, n = y.shape
        yflat = y.reshape(1, b_rows * n)
        addmm, mul = torch.addmm, torch.mul
        if co.low:  # y + (a @ kh): rounded once at y's magnitude (module docstring)
            def addmm(y_, a_, k_):
                return torch.add(y_, torch.mm(a_, k_))
        a = co.a
        yi, f = y, k1
        c = self._c_cache.get(t.device)
        if c is None:
            with ordinary_tensors():
                c = self._c_cache[t.device] = torch.tensor(co.c, dtype=torch.float64, device=t.device).view(-1, 1)
        tc = torch.addcmul(t.view(1, b_rows), c, h.view(1, b_rows))  # every stage's times, (s, B)
        if buf is not None:
            kh, flat, heads, rows = buf.shaped, buf.flat, buf.heads, buf.rows
            mul(k1, hc, out=rows[0])
            for i in range(1, s):
                yi = addmm(yflat, a[i], heads[i]).view(b_rows, n)
                f = term_rows(tc[i], yi)
                mul(f, hc, out=rows[i])
        else:  # a fresh buffer: autograd differentiates through the stage writes
            kh = y.new_empty((s, b_rows, n))
            flat = kh.view(s, b_rows * n)
            kh[0] = k1 * hc
            for i in range(1, s):
                yi = addmm(yflat, a[i], flat[:i]).view(b_rows, n)
                f = term_rows(tc[i], yi)
                kh[i] = f * hc
        y1 = yi if self.last_stage_is_y1 else addmm(yflat, co.b, flat).view(b_rows, n)
        if co.e is None:
            return y1, kh, None, f
        kd = flat.detach() if flat.requires_grad else flat
        return y1, kh, torch.mm(co.e, kd).view(-1, b_rows, n), f

    def dense_stages_rows(self, term_rows: Callable[[Tensor, Tensor], Tensor], t0: Tensor, h: Tensor, hc: Tensor,
                          y0: Tensor, kh: Tensor, co: _Coefficients) -> Tensor:
        """The stages of a per-sample step followed by its extra dense-output stages (DOP853's three, evaluated
        for all rows and scaled by ``h`` like ``kh``); ``kh`` itself for methods without extra stages."""
        if not co.extra_a:
            return kh
        s, (b_rows, n) = self.stages, y0.shape
        kf = y0.new_empty((s + len(co.extra_a), b_rows, n))
        kf[:s] = kh
        flat = kf.view(kf.shape[0], b_rows * n)
        yflat = y0.view(1, b_rows * n)
        for j, (row, cj) in enumerate(zip(co.extra_a, co.extra_c)):
            yj = torch.addmm(yflat, row, flat[: s + j]).view(b_rows, n)
            kf[s + j] = term_rows(torch.add(t0, h, alpha=cj), yj) * hc
        return kf

    def interpolate_rows(self, y0: Tensor, y1: Tensor, kf: Tensor, fh1: Tensor | None, thetas: Tensor,
                         co: _Coefficients) -> Tensor:
        """Dense output of a per-sample step at one fraction per row, ``(B, n)``; or at ``m`` fractions per row
        (``thetas`` of shape ``(B, m)``), ``(B, m, n)``.

        ``kf``: the ``h``-scaled stages from :meth:`dense_stages_rows`; ``thetas`` (``(B,)`` or ``(B, m)``,
        float64): the fractions of each row's step; ``fh1`` (``h`` times dy/dt at the step ends) is needed only by
        methods without their own continuous extension (cubic Hermite).
        """
        b_rows, n = y0.shape
        m = 1 if thetas.dim() == 1 else thetas.shape[1]
        if co.dense_t is not None:
            # y0 + sum_j theta^j q_j with q = P^T kh (one product for all rows), by Horner's rule in theta; in float64
            # (or complex128): DOP853's P has entries ~500 that cancel. Thetas (B, m): every q_j broadcast over m.
            ct = torch.promote_types(kf.dtype, co.dense_t.dtype)
            base = y0.to(ct)
            if thetas.dim() == 2 and b_rows * m * n >= _WEIGHTS_MIN:
                # Many points: the weights of the stages at every fraction (B, m, s), then one batched product with
                # the stages (fewer passes over the (B, m, n) result than Horner's rule; the same polynomial).
                d = co.dense_t.shape[0]
                w = torch.matmul(thetas.to(torch.float64).unsqueeze(2) ** self._powers(d, thetas.device),
                                 co.dense_t).to(ct)
                return torch.baddbmm(base.unsqueeze(1), w, kf.to(ct).transpose(0, 1)).to(y0.dtype)
            q = torch.mm(co.dense_t.to(ct), kf.reshape(kf.shape[0], -1).to(ct)).view(-1, b_rows, n)
            if thetas.dim() == 1:
                th = thetas.view(b_rows, 1)
            else:
                th, q, base = thetas.view(b_rows, m, 1), q.unsqueeze(2), base.unsqueeze(1)
            acc = q[-1]
            for j in range(q.shape[0] - 2, -1, -1):
                acc = torch.addcmul(q[j], acc, th)
            return torch.addcmul(base, acc, th).to(y0.dtype)
        if thetas.dim() == 1:
            return hermite(thetas.view(b_rows, 1).to(co.b.real.dtype), y0, y1, kf[0], fh1)
        return hermite(thetas.view(b_rows, m, 1).to(co.b.real.dtype), y0.unsqueeze(1), y1.unsqueeze(1),
                       kf[0].unsqueeze(1), fh1.unsqueeze(1))

    def _powers(self, d: int, device: torch.device) -> Tensor:
        """``[1, 2, ..., d]`` as a float64 tensor (cached per device): exponents of the dense output."""
        p = self._power_cache.get((d, device))
        if p is None:
            with ordinary_tensors():
                p = self._power_cache[(d, device)] = torch.arange(1, d + 1, dtype=torch.float64, device=device)
        return p

    # -- dense output ----------------------------------------------------------------------------
    def _full_stages(self, term: Term, st: Step, co: _Coefficients) -> Tensor:
        if st.k_full is None:
            if not co.extra_a:
                st.k_full = st.k
            else:
                s = self.stages
                kf = st.y0.new_empty((s + len(co.extra_a), st.y0.shape[1]))
                kf[:s] = st.k
                for j, (row, cj) in enumerate(zip(co.extra_a, co.extra_c)):
                    yj = torch.addmm(st.y0, row, kf[: s + j], alpha=st.h)
                    kf[s + j] = term(st.t0 + cj * st.h, yj).reshape(-1)
                st.k_full = kf
        return st.k_full

    def end_derivative(self, term: Term, st: Step) -> Tensor:
        """dy/dt at the end of an accepted step (free for FSAL methods)."""
        if st.f1 is None:
            st.f1 = st.k[-1] if self.fsal else term(st.t0 + st.h, st.y1).reshape(-1)
        return st.f1

    def interpolate_floats(self, term: Term, st: Step, thetas: list[float], co: _Coefficients,
                           interp: str = "auto") -> Tensor:
        """:meth:`interpolate` at plain-float fractions: the dense weights are computed in Python
        (no small tensor ops), which is what the loop's output times need."""
        if interp != "auto" or co.dense_t is None:
            th = torch.tensor(thetas, dtype=torch.float64).to(dtype=co.b.real.dtype, device=st.y0.device)
            return self.interpolate(term, st, th, co, interp)
        kf = self._full_stages(term, st, co)
        p = self._dense_rows
        exps = range(1, len(p[0]) + 1)
        mul = operator.mul
        weights = []
        for th in thetas:
            pw = [th ** e for e in exps]
            weights.append([sum(map(mul, row, pw)) for row in p])
        # Each weight is rounded once from float64 to the state's dtype, as a float64 tensor cast would be.
        w = torch.tensor(weights, dtype=st.y0.dtype, device=st.y0.device)
        m = len(thetas)
        return torch.addmm(st.y0 if m == 1 else st.y0.expand(m, st.y0.shape[1]), w, kf, alpha=st.h)

    def dense_weights(self, thetas: Tensor, co: _Coefficients, dtype: torch.dtype) -> Tensor:
        """The weights of the stages in the method's own dense output at the fractions ``thetas`` (``(m,)``):
        ``(m, s_full)`` in ``dtype`` (the output is ``y0 + h * weights @ stages``). Kept for the last fractions tensor
        (a caller checking the same fractions every step builds them once)."""
        c = self._weights_cache
        if c is not None and c[0] is thetas and c[1] == thetas._version and c[2] is co and c[3].dtype == dtype:
            return c[3]
        d = co.dense_t.shape[0]
        th64 = thetas.view(-1, 1).to(torch.float64)
        powers = th64 ** self._powers(d, thetas.device)
        weights = torch.mm(powers, co.dense_t).to(dtype)  # (m, s_full)
        if not (thetas.requires_grad or thetas.is_inference() or torch.is_inference_mode_enabled()):
            self._weights_cache = (thetas, thetas._version, co, weights)
        return weights

    def interpolate_steps(self, y0: Tensor, k: Tensor, h: Tensor, thetas: Tensor, co: _Coefficients) -> Tensor:
        """The method's own dense output of ``B`` accepted steps at the same fractions: ``y0`` ``(B, n)`` the steps'
        starts, ``k`` ``(B, s, n)`` their stages (as :meth:`step` returns them), ``h`` ``(B,)`` their sizes,
        ``thetas`` ``(m,)``. Returns ``(B, m, n)``, as :meth:`interpolate` step by step. For methods with their own
        continuous extension and no extra stages (``co.dense_t`` set, ``co.extra_a`` empty).

        >>> import torch
        >>> from neurodyn.solvers import get_solver
        >>> rk = get_solver("dopri5")
        >>> co = rk.coefficients(torch.float64, torch.device("cpu"))
        >>> y0, k = torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 7, 1, dtype=torch.float64)  # y' = 1
        >>> rk.interpolate_steps(y0, k, torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.5, 1.0]), co)
        tensor([[[1.2500],
                 [1.5000]]], dtype=torch.float64)
        """
        w = self.dense_weights(thetas, co, k.dtype)  # (m, s)
        return torch.matmul(w, k).mul_(h.view(-1, 1, 1)).add_(y0.unsqueeze(1))

    def interpolate(self, term: Term, st: Step, thetas: Tensor, co: _Coefficients,
                    interp: str = "auto") -> Tensor:
        """The continuous extension of an accepted step at fractions ``thetas`` (shape ``(m,)``).

        ``interp`` is ``"auto"`` (the method's own dense output, else cubic Hermite), ``"hermite"``
        or ``"linear"``. Returns shape ``(m, n)``. ``thetas`` may carry gradients (output times that
        require grad).
        """
        m = thetas.shape[0]
        n = st.y0.shape[1]
        y0 = st.y0.expand(m, n)
        if interp == "linear":
            return linear(thetas.view(m, 1), st.y0, st.y1)
        if interp == "auto" and co.dense_t is not None:
            kf = self._full_stages(term, st, co)
            return torch.addmm(y0, self.dense_weights(thetas, co, st.y0.dtype), kf, alpha=st.h)
        f1 = self.end_derivative(term, st)
        return hermite(thetas.view(m, 1).to(st.y0.dtype), st.y0, st.y1, st.k[0], f1.reshape(-1), st.h)
