"""The ODE-RNN with the gated MLP unit and explicit Euler steps on a shared time grid, as one autograd function.

:class:`~neurodyn.models.ODERNN` runs through :func:`fused_odernn` where it applies (its ``fused`` option: the
:class:`~neurodyn.models.odernn.GatedMLPUpdate` cell, a field that is a tanh MLP of ``h`` alone, ``method="euler"``,
``gradient="direct"``, one time grid for all rows, nothing under ``torch.func`` transforms or autocast). It computes
what the general path computes -- the same Euler steps between observations, the same unit at each time, the same
masks -- with these differences in how:

* the forward pass records no autograd graph; it keeps the activations it needs in preallocated buffers;
* the unit runs only on the rows observed at that time (the general path runs it on every row and keeps the old
  state where a row has no observation: the same result);
* the backward pass is written out: each step pulls the state's cotangent back through the step (products with the
  weights), and every weight's gradient is one product over all steps at the end (one large product instead of one
  small one per step and layer), as recurrent-network libraries do;
* the large buffers stay with the module for its next run (:func:`take`), unless a recorded run still holds them.

Its gradients are those of the general path (``gradient="direct"``) to rounding; ``tests/test_odernn_fused.py``
compares both, and compares them with finite differences. The backward pass is not differentiable again and there is
no forward-mode rule: for second derivatives (``create_graph=True``) or ``torch.func.jvp`` build the ODE-RNN with
``fused=False``. A NaN or inf in the state raises :class:`~neurodyn.errors.NonFiniteError` after the run.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from ..errors import NonFiniteError


def mlp_layers(field: Any) -> list[nn.Linear] | None:
    """The ``Linear`` layers of ``field`` when it is an ``nn.Sequential`` of ``Linear -> Tanh -> ... -> Linear``
    (alternating, at least one hidden layer), else None."""
    if not isinstance(field, nn.Sequential) or len(field) < 3 or len(field) % 2 == 0:
        return None
    mods = list(field)
    if not all(isinstance(m, nn.Linear) for m in mods[::2]) or not all(type(m) is nn.Tanh for m in mods[1::2]):
        return None
    if any(m.weight.dtype != mods[0].weight.dtype for m in mods[::2]):
        return None
    return mods[::2]


def euler_steps(gaps: list[float], max_step: float | None, rule: str) -> list[int]:
    """Euler steps per interval of length ``|gap|``: ``"ceil"``: ``ceil(|gap| / max_step)`` (at least one; one when
    ``max_step`` is None); ``"latent_ode"``: the latent_ode code's rule (Rubanova et al.), one step for a gap shorter
    than ``max_step``, else ``max(2, floor(|gap| / max_step)) - 1``.

    >>> euler_steps([0.05, 0.15, 0.35], 0.1, "ceil"), euler_steps([0.05, 0.15, 0.35], 0.1, "latent_ode")
    ([1, 2, 4], [1, 1, 2])
    """
    if max_step is None:
        return [1 for _ in gaps]
    if rule == "ceil":
        return [max(1, math.ceil(abs(g) / max_step - 1e-9)) for g in gaps]
    return [1 if abs(g) < max_step else max(2, int(abs(g) / max_step)) - 1 for g in gaps]


def holds_saved(owner: weakref.ref | None) -> bool:
    """Whether the recorded run ``owner`` (a weak reference to its autograd context) still holds its saved buffers:
    its graph is alive and not yet freed by a backward pass (``retain_graph=True`` keeps them)."""
    ctx = owner() if owner is not None else None
    if ctx is None:
        return False
    try:
        _ = ctx.saved_tensors
    except RuntimeError:  # freed by the backward pass
        return False
    return True


def take(space: dict | None, name: str, like: Tensor, *shape: int) -> Tensor:
    """An uninitialised tensor of ``shape`` (dtype and device of ``like``): a leading slice of the workspace's buffer
    ``name`` (grown as needed) when ``space`` is given, else a new one. Reusing the large buffers of one run for the
    next spares the fresh memory pages (page faults) that new multi-megabyte tensors cost on every run."""
    if space is None:
        return like.new_empty(shape)
    buf = space.get(name)
    if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0] or buf.dtype != like.dtype \
            or buf.device != like.device:
        buf = space[name] = like.new_empty(shape)
    return buf[:shape[0]]


class FusedODERNN(torch.autograd.Function):
    """Forward: the whole ODE-RNN run (see the module docstring); backward: written out (internal to
    :func:`fused_odernn`). The unit's activations of all observed rows are kept in flat buffers (rows of time
    ``order[0]`` first), so that the backward pass derives its elementwise factors and the weight gradients in one
    operation each for all steps."""

    @staticmethod
    def forward(ctx: Any, state0: Tensor, g_obs: Tensor, n_obs: Tensor, plan: dict, g_s: Tensor, u_w: Tensor,
                r_w: Tensor, u_b: Tensor, r_b: Tensor, n_s: Tensor, o_w: Tensor, o_b: Tensor, *field: Tensor
                ) -> Tensor:
        order, steps, dts, rows = plan["order"], plan["steps"], plan["dts"], plan["rows"]
        B, S = state0.shape
        H = S // 2
        N = g_obs.shape[0]
        ws, bs = field[0::2], field[1::2]
        n_euler = sum(steps)
        new_empty = state0.new_empty
        # The workspace of the module's previous run, unless a recorded run still needs it (its backward pending).
        space = plan["space"]
        if space is not None:
            if holds_saved(space.get("owner")):
                space = None
            elif plan["recorded"]:  # (forward runs without grad mode: the caller decided)
                space["owner"] = weakref.ref(ctx)
        ctx.space = space
        # Euler buffers: the state before each step and each hidden layer's activation.
        hbuf = take(space, "h", state0, n_euler, B, H)
        acts = [take(space, f"a{j}", state0, n_euler, B, w.shape[0]) for j, w in enumerate(ws[:-1])]
        # The unit's buffers, one row per observed (time, row).
        s_buf, a1_buf, ur_buf = take(space, "s", state0, N, S), take(space, "a1", state0, N, g_s.shape[0]), \
            take(space, "ur", state0, N, S)
        rs_buf, a2_buf = take(space, "rs", state0, N, S), take(space, "a2", state0, N, n_s.shape[0])
        o_buf, pre_buf = take(space, "o", state0, N, S), take(space, "pre", state0, N, H)
        # Weights laid out once as the products read them (contiguous: faster small products).
        ur_w = torch.block_diag(u_w, r_w)  # (2H, 2 units)
        ur_b = torch.cat([u_b, r_b])
        g_s, n_s = g_s.contiguous(), n_s.contiguous()
        g_t, n_t, o_t, ur_t = (w.t().contiguous() for w in (g_s, n_s, o_w, ur_w))
        ws_t = [w.t().contiguous() for w in ws]
        keep = plan["keep"]
        states = new_empty(len(order), B, S) if keep else None
        state = state0.clone()
        # Per-step views of the buffers (split once).
        hs, acts_e = hbuf.unbind(0), [a.unbind(0) for a in acts]
        sizes = plan["sizes"]
        s_p, a1_p, ur_p, rs_p, a2_p, o_p, pre_p, g_p, n_p = (
            x.split(sizes) for x in (s_buf, a1_buf, ur_buf, rs_buf, a2_buf, o_buf, pre_buf, g_obs, n_obs))
        n_hidden = len(acts)
        e = 0
        slot = 0
        for i, k in enumerate(order):
            if i:  # Euler steps: each step's start kept in hs, the last step's end written into the state
                end = state[:, :H]
                h = hs[e].copy_(end)
                dt = dts[i - 1]
                for st in range(steps[i - 1], 0, -1):
                    a = h
                    for j in range(n_hidden):
                        a = torch.addmm(bs[j], a, ws_t[j], out=acts_e[j][e]).tanh_()
                    h = torch.add(h, torch.addmm(bs[-1], a, ws_t[-1]), alpha=dt, out=end if st == 1 else hs[e + 1])
                    e += 1
            idx = rows[k]
            if idx is not None:
                full = sizes[slot] == B
                if full:
                    s = s_p[slot]
                    s.copy_(state)
                else:
                    s = torch.index_select(state, 0, idx, out=s_p[slot])
                a1 = torch.addmm(g_p[slot], s, g_t, out=a1_p[slot]).tanh_()
                ur = torch.addmm(ur_b, a1, ur_t, out=ur_p[slot]).sigmoid_()
                u = ur[:, :H]
                rs = torch.mul(s.view(-1, 2, H), ur[:, None, H:], out=rs_p[slot].view(-1, 2, H)).view(-1, S)
                a2 = torch.addmm(n_p[slot], rs, n_t, out=a2_p[slot]).tanh_()
                o = torch.addmm(o_b, a2, o_t, out=o_p[slot])
                pre = torch.lerp(o[:, H:].abs(), s[:, H:], u, out=pre_p[slot])
                new = new_empty(sizes[slot], S)
                torch.lerp(o[:, :H], s[:, :H], u, out=new[:, :H])
                torch.abs(pre, out=new[:, H:])
                if full:
                    state = new
                else:
                    state.index_copy_(0, idx, new)
                slot += 1
            if keep:
                states[k] = state
        if not bool(torch.isfinite(state).all()):  # a NaN/inf anywhere reaches the final state
            raise NonFiniteError("ODERNN (fused run): the state became NaN or inf (check the data, the field's "
                                 "weights and max_step).", status="non_finite", t=plan["t_end"])
        ctx.plan = plan
        ctx.shapes = (B, S, len(ws))
        ctx.save_for_backward(hbuf, *acts, s_buf, a1_buf, ur_buf, rs_buf, a2_buf, o_buf, pre_buf, g_s, ur_w, n_s,
                              o_w, *ws)
        return states if keep else state

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_states: Tensor) -> tuple:
        plan = ctx.plan
        order, steps, dts, rows = plan["order"], plan["steps"], plan["dts"], plan["rows"]
        B, S, n_layers = ctx.shapes
        H = S // 2
        hbuf, *rest = ctx.saved_tensors
        acts, rest = rest[:n_layers - 1], rest[n_layers - 1:]
        (s_buf, a1_buf, ur_buf, rs_buf, a2_buf, o_buf, pre_buf, g_s, ur_w, n_s, o_w), ws = rest[:11], rest[11:]
        n_euler = hbuf.shape[0]
        space = ctx.space
        N = s_buf.shape[0]
        one = hbuf.new_ones(())
        # Elementwise factors of every step at once (tanh' = 1 - a^2 in one pass each).
        d_acts = [torch.addcmul(one, a, a, value=-1, out=take(space, f"da{j}", a, *a.shape))
                  for j, a in enumerate(acts)]
        dz = [take(space, f"dz{j}", hbuf, n_euler, B, w.shape[0]) for j, w in enumerate(ws)]  # pre-activations'
        u, r = ur_buf[:, :H], ur_buf[:, H:]
        nm, ns = o_buf[:, :H], o_buf[:, H:]
        sg_pre = pre_buf.sign()
        one_u = 1 - u
        f_do = take(space, "f_do", hbuf, N, S)  # d(new state) -> d(unit output o)
        f_do[:, :H] = one_u
        torch.mul(one_u, ns.sign(), out=f_do[:, H:]).mul_(sg_pre)
        f_ds = take(space, "f_ds", hbuf, N, S)  # d(new state) -> d(old state), directly
        f_ds[:, :H] = u
        torch.mul(u, sg_pre, out=f_ds[:, H:])
        f_um, f_us = s_buf[:, :H] - nm, (s_buf[:, H:] - ns.abs()).mul_(sg_pre)  # d(new mean, new std) -> du
        rr = torch.cat([r, r], -1)
        d_a1 = torch.addcmul(one, a1_buf, a1_buf, value=-1, out=take(space, "d_a1", hbuf, *a1_buf.shape))
        d_a2 = torch.addcmul(one, a2_buf, a2_buf, value=-1, out=take(space, "d_a2", hbuf, *a2_buf.shape))
        d_ur = ur_buf * (1 - ur_buf)
        do_buf, dur_buf = take(space, "do", hbuf, N, S), take(space, "dur", hbuf, N, S)
        dz2_buf, dz1_buf = torch.empty_like(a2_buf), torch.empty_like(a1_buf)  # returned: not workspace
        keep = plan["keep"]
        ds = d_states[order[-1]].clone() if keep else d_states.clone()
        sizes = plan["sizes"]
        s_p, f_do_p, f_ds_p, f_um_p, f_us_p, rr_p, d_a1_p, d_a2_p, d_ur_p, do_p, dz2_p, dur_p, dz1_p = (
            x.split(sizes) for x in (s_buf, f_do, f_ds, f_um, f_us, rr, d_a1, d_a2, d_ur, do_buf, dz2_buf, dur_buf,
                                     dz1_buf))
        dz_e, d_acts_e = [x.unbind(0) for x in dz], [x.unbind(0) for x in d_acts]
        n_hidden = len(ws) - 1
        e = n_euler
        slot = len(sizes)
        T = len(order)
        # (often only the last state's cotangent is not zero)
        nonzero = d_states.flatten(1).any(1).tolist() if keep else [False] * len(order)
        for i in range(T - 1, -1, -1):
            k = order[i]
            if i < T - 1 and nonzero[k]:
                ds += d_states[k]
            idx = rows[k]
            if idx is not None:
                slot -= 1
                full = sizes[slot] == B
                dn = ds if full else ds.index_select(0, idx)
                do = torch.mul(dn, f_do_p[slot], out=do_p[slot])
                dz2 = torch.mm(do, o_w, out=dz2_p[slot]).mul_(d_a2_p[slot])
                drs = torch.mm(dz2, n_s)
                dur = dur_p[slot]
                torch.mul(dn[:, :H], f_um_p[slot], out=dur[:, :H]).addcmul_(dn[:, H:], f_us_p[slot])
                torch.sum(drs.view(-1, 2, H) * s_p[slot].view(-1, 2, H), 1, out=dur[:, H:])
                dur.mul_(d_ur_p[slot])
                dz1 = torch.mm(dur, ur_w, out=dz1_p[slot]).mul_(d_a1_p[slot])
                ds_s = torch.mul(dn, f_ds_p[slot]).addcmul_(drs, rr_p[slot]).addmm_(dz1, g_s)
                if full:
                    ds = ds_s
                else:
                    ds.index_copy_(0, idx, ds_s)
            if i:
                dh = ds[:, :H]
                dt = dts[i - 1]
                for _ in range(steps[i - 1]):
                    e -= 1
                    g = torch.mul(dh, dt, out=dz_e[-1][e])
                    for j in range(n_hidden - 1, -1, -1):
                        g = torch.mm(g, ws[j + 1], out=dz_e[j][e]).mul_(d_acts_e[j][e])
                    dh.addmm_(g, ws[0])
        # Weight gradients: one product per weight over all steps.
        field_grads: list[Tensor] = []
        ins = [hbuf, *acts]
        for j, w in enumerate(ws):
            d = dz[j].reshape(-1, w.shape[0])
            field_grads += [d.t().mm(ins[j].reshape(-1, w.shape[1])), d.sum(0)]
        Uh = a1_buf.shape[1] // 2
        d_urw = dur_buf.t().mm(a1_buf)
        d_urb = dur_buf.sum(0)
        return (ds, dz1_buf, dz2_buf, None, dz1_buf.t().mm(s_buf), d_urw[:H, :Uh], d_urw[H:, Uh:], d_urb[:H],
                d_urb[H:], dz2_buf.t().mm(rs_buf), do_buf.t().mm(a2_buf), do_buf.sum(0), *field_grads)


def fused_odernn(cell: nn.Module, layers: list[nn.Linear], x: Tensor, t: Tensor, mask: Tensor, reverse: bool,
                 state0: Tensor, max_step: float | None, rule: str, keep: bool = True, space: dict | None = None
                 ) -> tuple[Tensor | None, Tensor, int]:
    """Run the ODE-RNN of ``cell`` (a :class:`~neurodyn.models.odernn.GatedMLPUpdate`) and the tanh MLP field
    ``layers`` over ``x (B, T, C)`` with ``mask`` at the shared times ``t (T,)`` from ``state0 (B, S)``, Euler steps
    between observations (:func:`euler_steps` with ``max_step`` and ``rule``). Returns ``(states (B, T, S), last
    (B, S), nfe)`` as :meth:`ODERNN.forward <neurodyn.models.ODERNN.forward>` (``nfe``: field evaluations;
    ``keep=False``: ``states`` is None and not formed). ``space``: a dict the caller keeps between runs, whose buffers
    a run reuses (:func:`take`; not while a recorded run's backward pass is pending)."""
    B, T, _ = x.shape
    S = cell.state_size
    order = list(range(T - 1, -1, -1)) if reverse else list(range(T))
    # The observed (time, row) pairs in the order of travel: their inputs, and each time's rows and range.
    seen = (mask.amax(-1) > 0).t()[order]  # (T, B), travel order
    counts = seen.sum(1).tolist()
    pairs = seen.nonzero()
    flat = (pairs[:, 1] * T + torch.as_tensor(order, device=x.device)[pairs[:, 0]])  # row * T + time index
    obs = torch.cat([x * mask, mask], -1).reshape(B * T, -1).index_select(0, flat)  # (N, 2C)
    rows: list[Tensor | None] = [None] * T
    for k, c, r in zip(order, counts, pairs[:, 1].split(counts)):
        if c:
            rows[k] = r
    g_w, n_w = cell.gates_in.weight, cell.new_state[0].weight
    g_obs = F.linear(obs, g_w[:, S:], cell.gates_in.bias)  # the inputs' share of the unit's first layers
    n_obs = F.linear(obs, n_w[:, S:], cell.new_state[0].bias)
    times = t.detach()[order]
    gaps = times.diff().tolist()
    steps = euler_steps(gaps, max_step, rule)
    plan = {"order": order, "steps": steps, "dts": [g / n for g, n in zip(gaps, steps)], "rows": rows,
            "sizes": [c for c in counts if c], "keep": keep,
            "t_end": float(times[-1]), "space": space}
    field = [p for m in layers for p in (m.weight, m.bias)]
    out = cell.new_state[2]
    plan["recorded"] = torch.is_grad_enabled() and any(
        v.requires_grad for v in (state0, g_obs, n_obs, *cell.parameters(), *field))
    res = FusedODERNN.apply(state0, g_obs, n_obs, plan, g_w[:, :S], cell.update_out.weight, cell.reset_out.weight,
                               cell.update_out.bias, cell.reset_out.bias, n_w[:, :S], out.weight, out.bias, *field)
    if not keep:
        return None, res, sum(steps)
    return res.transpose(0, 1), res[order[-1]], sum(steps)
