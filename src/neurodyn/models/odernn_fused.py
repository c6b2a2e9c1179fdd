"""The ODE-RNN with the gated MLP unit and explicit Euler steps on a shared time grid, as one autograd function.

:class:`~neurodyn.models.ODERNN` runs through :func:`fused_odernn` where it applies (:func:`fused_supported`: the
:class:`~neurodyn.models.odernn.GatedMLPUpdate` cell, a field that is a tanh MLP of ``h`` alone, ``method="euler"``,
``gradient="direct"``, one time grid for all rows, nothing under ``torch.func`` transforms or autocast). It computes
what the general path computes -- the same Euler steps between observations, the same unit at each time, the same
masks -- with three differences in how:

* the forward pass records no autograd graph; it keeps the activations it needs in preallocated buffers;
* the unit runs only on the rows observed at that time (the general path runs it on every row and keeps the old
  state where a row has no observation: the same result);
* the backward pass is written out: each step pulls the state's cotangent back through the step (products with the
  weights), and every weight's gradient is one product over all steps at the end (one large product instead of one
  small one per step and layer), as recurrent-network libraries do.

Its gradients are those of the general path (``gradient="direct"``) to rounding; ``tests/test_odernn_fused.py``
compares both, and compares them with finite differences.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


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
    import math

    if max_step is None:
        return [1 for _ in gaps]
    if rule == "ceil":
        return [max(1, math.ceil(abs(g) / max_step - 1e-9)) for g in gaps]
    return [1 if abs(g) < max_step else max(2, int(abs(g) / max_step)) - 1 for g in gaps]


class FusedODERNN(torch.autograd.Function):
    """Forward: the whole ODE-RNN run (see the module docstring); backward: written out (internal to
    :func:`fused_odernn`)."""

    @staticmethod
    def forward(ctx: Any, state0: Tensor, g_in: Tensor, n_in: Tensor, plan: dict, g_s: Tensor, u_w: Tensor,
                r_w: Tensor, u_b: Tensor, r_b: Tensor, n_s: Tensor, o_w: Tensor, o_b: Tensor, *field: Tensor
                ) -> Tensor:
        order, steps, dts, rows = plan["order"], plan["steps"], plan["dts"], plan["rows"]
        B, S = state0.shape
        H = S // 2
        U2 = g_s.shape[0]
        ws, bs = field[0::2], field[1::2]
        n_euler = sum(steps)
        # Euler buffers: the state before each step and each hidden layer's activation.
        hbuf = state0.new_empty(n_euler, B, H)
        acts = [state0.new_empty(n_euler, B, w.shape[0]) for w in ws[:-1]]
        ur_w = torch.block_diag(u_w, r_w)  # (2H, 2 units)
        ur_b = torch.cat([u_b, r_b])
        g_t, ur_t, n_t, o_t = g_s.t(), ur_w.t(), n_s.t(), o_w.t()
        ws_t = [w.t() for w in ws]
        T = len(order)
        states = state0.new_empty(T, B, S)
        saved_gru: list[tuple] = []
        state = state0.clone()
        e = 0
        for i, k in enumerate(order):
            if i:
                h = state[:, :H]
                dt = dts[i - 1]
                for _ in range(steps[i - 1]):
                    hbuf[e].copy_(h)
                    a = h
                    for j in range(len(acts)):
                        a = torch.tanh(torch.addmm(bs[j], a, ws_t[j], out=acts[j][e]), out=acts[j][e])
                    h = torch.add(h, torch.addmm(bs[-1], a, ws_t[-1]), alpha=dt)
                    e += 1
                state[:, :H] = h
            idx = rows[k]
            if idx is not None:
                full = idx.numel() == B
                s = state if full else state.index_select(0, idx)
                gk = g_in[k] if full else g_in[k].index_select(0, idx)
                nk = n_in[k] if full else n_in[k].index_select(0, idx)
                a1 = torch.tanh(torch.addmm(gk, s, g_t))
                ur = torch.sigmoid(torch.addmm(ur_b, a1, ur_t))
                u, r = ur[:, :H], ur[:, H:]
                rs = (s.view(-1, 2, H) * r.unsqueeze(1)).view(-1, S)
                a2 = torch.tanh(torch.addmm(nk, rs, n_t))
                o = torch.addmm(o_b, a2, o_t)
                nm, ns = o[:, :H], o[:, H:]
                ans = ns.abs()
                pre = torch.lerp(ans, s[:, H:], u)
                new = torch.cat([torch.lerp(nm, s[:, :H], u), pre.abs()], -1)
                saved_gru.append((k, idx, s, a1, ur, rs, a2, o, pre))
                if full:
                    state = new
                else:
                    state.index_copy_(0, idx, new)
            states[k] = state
        ctx.plan = plan
        ctx.saved_gru = saved_gru
        ctx.shapes = (B, S, U2, n_in.shape[-1])
        ctx.save_for_backward(hbuf, *acts, g_s, ur_w, n_s, o_w, *ws)
        return states

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_states: Tensor) -> tuple:
        plan = ctx.plan
        order, steps, dts = plan["order"], plan["steps"], plan["dts"]
        B, S, U2, U = ctx.shapes
        H = S // 2
        n_layers = (len(ctx.saved_tensors) - 5) // 2 + 1
        hbuf, *rest = ctx.saved_tensors
        acts, (g_s, ur_w, n_s, o_w), ws = rest[:n_layers - 1], rest[n_layers - 1:n_layers + 3], rest[n_layers + 3:]
        n_euler = hbuf.shape[0]
        # Cotangents of each Euler step's pre-activations (for the batched weight gradients at the end).
        dz = [hbuf.new_empty(n_euler, B, w.shape[0]) for w in ws]
        gru = {k: v for k, *v in ctx.saved_gru}
        dg_rows, dn_rows, flat_idx = [], [], []
        dur_all, a1_all, s_all, dz2_all, rs_all, do_all, a2_all = [], [], [], [], [], [], []
        ds = d_states[order[-1]].clone()
        e = n_euler
        T = len(order)
        for i in range(T - 1, -1, -1):
            k = order[i]
            if i < T - 1:
                ds += d_states[k]
            if k in gru:
                idx, s, a1, ur, rs, a2, o, pre = gru[k]
                full = idx.numel() == B
                dn = ds if full else ds.index_select(0, idx)
                u, r = ur[:, :H], ur[:, H:]
                nm, ns = o[:, :H], o[:, H:]
                dm_out = dn[:, :H]
                dsd_out = dn[:, H:] * pre.sign()
                du = dm_out * (s[:, :H] - nm) + dsd_out * (s[:, H:] - ns.abs())
                one_u = 1 - u
                do = torch.cat([dm_out * one_u, dsd_out * one_u * ns.sign()], -1)
                dz2 = torch.mm(do, o_w).mul_(1 - a2 * a2)
                drs = torch.mm(dz2, n_s)
                dr = (drs.view(-1, 2, H) * s.view(-1, 2, H)).sum(1)
                dur = torch.cat([du, dr], -1).mul_(ur * (1 - ur))
                dz1 = torch.mm(dur, ur_w).mul_(1 - a1 * a1)
                ds_s = torch.cat([dm_out * u, dn[:, H:] * pre.sign() * u], -1)
                ds_s += (drs.view(-1, 2, H) * r.unsqueeze(1)).view(-1, S)
                ds_s.addmm_(dz1, g_s)
                if full:
                    ds = ds_s
                else:
                    ds.index_copy_(0, idx, ds_s)
                flat_idx.append(idx + k * B)
                dg_rows.append(dz1)
                dn_rows.append(dz2)
                dur_all.append(dur), a1_all.append(a1), s_all.append(s)
                dz2_all.append(dz2), rs_all.append(rs), do_all.append(do), a2_all.append(a2)
            if i:
                dh = ds[:, :H].clone()
                dt = dts[i - 1]
                for _ in range(steps[i - 1]):
                    e -= 1
                    g = dz[-1][e]
                    torch.mul(dh, dt, out=g)
                    for j in range(len(ws) - 2, -1, -1):
                        a = acts[j][e]
                        g = torch.mm(g, ws[j + 1], out=dz[j][e]).mul_(1 - a * a)
                    dh.addmm_(g, ws[0])
                ds[:, :H] = dh
        # Batched weight gradients.
        field_grads: list[Tensor] = []
        ins = [hbuf, *acts]
        for j, w in enumerate(ws):
            d = dz[j].reshape(-1, w.shape[0])
            field_grads += [d.t().mm(ins[j].reshape(-1, w.shape[1])), d.sum(0)]
        if dg_rows:
            dur_c, dz2_c, do_c = torch.cat(dur_all), torch.cat(dz2_all), torch.cat(do_all)
            d_gs = torch.cat(dg_rows).t().mm(torch.cat(s_all))
            d_ur = dur_c.t().mm(torch.cat(a1_all))
            d_ns = dz2_c.t().mm(torch.cat(rs_all))
            d_o = do_c.t().mm(torch.cat(a2_all))
            fi = torch.cat(flat_idx)
            d_g_in = ds.new_zeros(len(order) * B, U2).index_copy_(0, fi, torch.cat(dg_rows))
            d_n_in = ds.new_zeros(len(order) * B, U).index_copy_(0, fi, dz2_c)
            d_g_in, d_n_in = d_g_in.view(-1, B, U2), d_n_in.view(-1, B, U)
            Uh = U2 // 2
            d_uw, d_rw = d_ur[:H, :Uh], d_ur[H:, Uh:]
            d_ub, d_rb = dur_c[:, :H].sum(0), dur_c[:, H:].sum(0)
            d_ob = do_c.sum(0)
        else:
            z = ds.new_zeros
            d_gs, d_ns, d_o = z(g_s.shape), z(n_s.shape), z(o_w.shape)
            d_g_in, d_n_in = z(len(order), B, U2), z(len(order), B, U)
            d_uw, d_rw, d_ub, d_rb, d_ob = z(H, U2 // 2), z(H, U2 // 2), z(H), z(H), z(S)
        return (ds, d_g_in, d_n_in, None, d_gs, d_uw, d_rw, d_ub, d_rb, d_ns, d_o, d_ob, *field_grads)


def fused_odernn(cell: nn.Module, layers: list[nn.Linear], x: Tensor, t: Tensor, mask: Tensor, reverse: bool,
                 state0: Tensor, max_step: float | None, rule: str) -> tuple[Tensor, Tensor, int]:
    """Run the ODE-RNN of ``cell`` (a :class:`~neurodyn.models.odernn.GatedMLPUpdate`) and the tanh MLP field
    ``layers`` over ``x (B, T, C)`` with ``mask`` at the shared times ``t (T,)`` from ``state0 (B, S)``, Euler steps
    between observations (:func:`euler_steps` with ``max_step`` and ``rule``). Returns ``(states (B, T, S), last
    (B, S), nfe)`` as :meth:`ODERNN.forward <neurodyn.models.ODERNN.forward>` (``nfe``: field evaluations)."""
    B, T, _ = x.shape
    S = cell.state_size
    inp = torch.cat([x * mask, mask], -1).transpose(0, 1)  # (T, B, 2C)
    g_w, n_w = cell.gates_in.weight, cell.new_state[0].weight
    g_in = F.linear(inp, g_w[:, S:], cell.gates_in.bias)
    n_in = F.linear(inp, n_w[:, S:], cell.new_state[0].bias)
    seen = (mask.amax(-1) > 0).t()  # (T, B)
    counts = seen.sum(1).tolist()
    rows: list[Tensor | None] = [None if c == 0 else r for c, r in zip(counts, seen.nonzero()[:, 1].split(counts))]
    order = list(range(T - 1, -1, -1)) if reverse else list(range(T))
    gaps = t.detach()[order].diff().tolist()
    steps = euler_steps(gaps, max_step, rule)
    plan = {"order": order, "steps": steps, "dts": [g / n for g, n in zip(gaps, steps)], "rows": rows}
    field = [p for m in layers for p in (m.weight, m.bias)]
    out = cell.new_state[2]
    states = FusedODERNN.apply(state0, g_in, n_in, plan, g_w[:, :S], cell.update_out.weight, cell.reset_out.weight,
                               cell.update_out.bias, cell.reset_out.bias, n_w[:, :S], out.weight, out.bias, *field)
    return states.transpose(0, 1), states[order[-1]], sum(steps)
