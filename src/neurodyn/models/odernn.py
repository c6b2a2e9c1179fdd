"""``ODERNN``: a recurrent network whose hidden state follows an ODE between observations (Rubanova et al. 2019).

At each observation time the update cell (GRU, LSTM or the gated MLP unit of the latent ODE paper) folds the
observation into the state; between observations the state's ODE part ``h`` solves ``dh/dt = f(t, h)`` with
:func:`neurodyn.solve`. One solve per observation index covers the whole batch: each row's interval
``[t_{k-1}, t_k]`` is mapped to ``s in [0, 1]`` (``dh/ds = dt_k f(t_{k-1} + s dt_k, h)``), so rows with their own
times (``t`` of shape ``(B, T)``) are solved together exactly, and a padded step (``dt = 0``) leaves the state as it is.

The latent ODE paper's configuration (the gated MLP unit, a tanh MLP field of ``h``, explicit Euler, one time grid
for all rows) runs instead as one autograd function, :mod:`neurodyn.models.odernn_fused` (the same results and
gradients, the unit evaluated on the observed rows only; ``fused=False`` turns it off).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.tensors import ordinary_tensors, vmapped
from ..errors import InputError
from ..fields import autocast_dtype, takes_time
from ..solve import Plan, prepare, solve
from .odernn_fused import euler_steps, fused_odernn, mlp_layers

FIXED_STEP = ("euler", "midpoint", "heun2", "heun3", "ralston", "rk4")


def mlp(size_in: int, units: int, size_out: int, init_std: float | None = None, hidden_layers: int = 1
        ) -> nn.Sequential:
    """``Linear(size_in, units) -> Tanh -> [Linear(units, units) -> Tanh] * (hidden_layers - 1) -> Linear(units,
    size_out)``; weights ``N(0, init_std^2)`` and zero biases when ``init_std`` is given (the latent ODE paper's
    initialisation), else PyTorch's default."""
    layers: list[nn.Module] = [nn.Linear(size_in, units), nn.Tanh()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(units, units), nn.Tanh()]
    net = nn.Sequential(*layers, nn.Linear(units, size_out))
    if init_std is not None:
        for m in net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=init_std)
                nn.init.zeros_(m.bias)
    return net


# --------------------------------------------------------------------------------------------- update cells
class GRUUpdate(nn.Module):
    """``nn.GRUCell`` as an ODE-RNN update: state ``h (B, H)``, all of it evolved by the ODE."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.cell = nn.GRUCell(input_size, hidden_size)
        self.state_size = self.ode_size = hidden_size

    def forward(self, inp: Tensor, state: Tensor) -> Tensor:
        return self.cell(inp, state)


class LSTMUpdate(nn.Module):
    """``nn.LSTMCell`` as an ODE-RNN update: state ``cat(h, c) (B, 2H)``; the ODE evolves ``h`` (ODE-LSTM)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden_size)
        self.state_size, self.ode_size = 2 * hidden_size, hidden_size

    def forward(self, inp: Tensor, state: Tensor) -> Tensor:
        h, c = state.chunk(2, -1)
        return torch.cat(self.cell(inp, (h, c)), -1)


class GatedMLPUpdate(nn.Module):
    """The latent ODE paper's GRU unit: state ``cat(mean, std) (B, 2H)``, gates and candidate from one-hidden-layer
    tanh MLPs of ``units`` units on ``cat(mean, std, input)``; the ODE evolves ``mean``.

    ``u = sigmoid(MLP_u(.))``, ``r = sigmoid(MLP_r(.))``, ``(m~, s~) = MLP_n(cat(r mean, r std, input))``,
    ``mean' = (1 - u) m~ + u mean``, ``std' = |(1 - u) |s~| + u std|``. The update and reset MLPs' first layers are one
    ``Linear`` of ``2 units`` outputs (the same function and parameters as two separate layers).

    :meth:`series_update` runs the unit over a whole series: the input's share of the two first layers is computed for
    every time in one product, and the update and reset output layers are applied as one block-diagonal product
    (the same function and parameters; :class:`ODERNN` uses it).
    """

    def __init__(self, input_size: int, hidden_size: int, units: int = 100, init_std: float | None = 0.1):
        super().__init__()
        self.hidden_size, self.units = hidden_size, units
        self.state_size, self.ode_size = 2 * hidden_size, hidden_size
        self.gates_in = nn.Linear(2 * hidden_size + input_size, 2 * units)
        self.update_out = nn.Linear(units, hidden_size)
        self.reset_out = nn.Linear(units, hidden_size)
        self.new_state = mlp(2 * hidden_size + input_size, units, 2 * hidden_size, init_std)
        if init_std is not None:
            for m in (self.gates_in, self.update_out, self.reset_out):
                nn.init.normal_(m.weight, std=init_std)
                nn.init.zeros_(m.bias)

    def forward(self, inp: Tensor, state: Tensor) -> Tensor:
        """One update: ``inp (B, I)``, ``state (B, 2H)`` -> the new state ``(B, 2H)``."""
        return self.series_update(inp[None])(0, state)

    def series_update(self, inp: Tensor) -> Callable[[int, Tensor], Tensor]:
        """The update over a series of inputs ``inp (T, B, I)``: returns ``update(k, state (B, 2H)) -> (B, 2H)``,
        the update with the input at time index ``k``.

        Example: ``update = cell.series_update(inp); state = update(0, state)``.
        """
        H, S = self.hidden_size, self.state_size
        g_w, n_w = self.gates_in.weight, self.new_state[0].weight
        g_in = F.linear(inp, g_w[:, S:], self.gates_in.bias).unbind(0)  # (B, 2 units) per time
        n_in = F.linear(inp, n_w[:, S:], self.new_state[0].bias).unbind(0)  # (B, units) per time
        g_s, n_s = g_w[:, :S].t(), n_w[:, :S].t()
        ur_w = torch.block_diag(self.update_out.weight, self.reset_out.weight).t()  # (2 units, 2H)
        ur_b = torch.cat([self.update_out.bias, self.reset_out.bias])
        out = self.new_state[2]

        def update(k: int, state: Tensor) -> Tensor:
            u, r = torch.sigmoid(torch.addmm(ur_b, torch.tanh(torch.addmm(g_in[k], state, g_s)), ur_w)).chunk(2, -1)
            rs = (state.reshape(-1, 2, H) * r.unsqueeze(1)).view(-1, S)
            n_mean, n_std = out(torch.tanh(torch.addmm(n_in[k], rs, n_s))).chunk(2, -1)
            mean, std = state.chunk(2, -1)
            return torch.cat([torch.lerp(n_mean, mean, u), torch.lerp(n_std.abs(), std, u).abs()], -1)

        return update


CELLS = {"gru": GRUUpdate, "lstm": LSTMUpdate, "gated_mlp": GatedMLPUpdate}


class _Rescaled(nn.Module):
    """``dh/ds = dt * f(t0 + s dt, h)`` on ``s in [0, 1]``; ``dt``, ``t0``: 0-dim (shared) or ``(B, 1)`` per row."""

    def __init__(self, field: nn.Module | Any, with_time: bool):
        super().__init__()
        self.field = field
        self.with_time = with_time
        self.interval: list[Tensor] = [torch.zeros(()), torch.zeros(())]  # [t0, dt], updated in place per solve

    def forward(self, s: Tensor, h: Tensor) -> Tensor:
        t0, dt = self.interval
        if self.with_time:
            s = s[:, None] if s.dim() == 1 else s  # per-sample steps: one s per row
            return dt * self.field(t0 + s * dt, h)
        return dt * self.field(h)


class ODERNN(nn.Module):
    """ODE-RNN: update cell at observations, ODE evolution (:func:`neurodyn.solve`) between them.

    Parameters
    ----------
    input_size : int
        Channels ``C`` of the observations; the cell sees ``cat(values * mask, mask)`` (``2 C`` inputs).
    hidden_size : int
        Size ``H`` of the ODE-evolved hidden state.
    cell : ``"gru"``, ``"lstm"``, ``"gated_mlp"`` or nn.Module
        The update. A module takes ``(input (B, 2C), state (B, S))`` and returns the new state, and has attributes
        ``state_size`` (``S``) and ``ode_size`` (the leading state entries the ODE evolves; the rest is held). A cell
        whose class defines ``series_update(inputs (T, B, 2C))`` returning ``update(k, state) -> new state`` (as
        :class:`GatedMLPUpdate`) is run through it (work on the inputs done once for all times).
    field : nn.Module or callable, optional
        ``f(h)`` or ``f(t, h)`` on ``(B, ode_size)`` (``t``: 0-dim, or ``(B, 1)`` when rows have their own times).
        Default: ``Linear(H, units) -> Tanh -> Linear(units, H)``.
    units : int
        Hidden units of the default field and of the ``"gated_mlp"`` cell.
    method : str
        Solver between observations (default ``"euler"``); a fixed-step method takes
        ``ceil(max_row |dt| / max_step)`` equal steps per interval (at least one).
    max_step : float, optional
        Largest step (in time units) of a fixed-step method; default: one step per interval.
    rtol, atol, gradient, per_sample_steps, **solve_options :
        As in :func:`neurodyn.solve` (adaptive methods; ``per_sample_steps=True`` gives each row its own steps).
    union : bool
        For ``t`` of shape ``(B, T)`` with rows that differ: run on the union of all rows' times with per-row masks
        (True), or step each row through its own times (False, default).
    step_rule : ``"ceil"`` or ``"latent_ode"``
        Steps of a fixed-step method per interval ``dt`` (with ``max_step``): ``ceil(|dt| / max_step)`` (default), or
        the latent_ode code's rule (Rubanova et al.): one step when ``|dt| < max_step``, else
        ``max(2, floor(|dt| / max_step)) - 1`` (:func:`neurodyn.models.odernn_fused.euler_steps`).
    fused : bool
        Run as one autograd function (:mod:`neurodyn.models.odernn_fused`; the same results) where it applies: the
        ``"gated_mlp"`` cell, a field that is an ``nn.Sequential`` tanh MLP of ``h``, ``method="euler"``,
        ``gradient="direct"``, one time grid for all rows (default True; False: always :func:`neurodyn.solve` per
        interval).

    Shapes
    ------
    ``forward(x (B, T, C), t (T,) or (B, T), mask (B, T, C) = ones)`` returns ``(states (B, T, S), last (B, S))``:
    the state right after the update at each time (in time order) and the final state (at each row's first time
    when ``reverse=True``, else at its last). A time point where no channel is observed leaves the state unchanged
    (the ODE evolution still runs through it).

    Examples
    --------
    >>> import torch, neurodyn
    >>> rnn = neurodyn.models.ODERNN(input_size=1, hidden_size=8, max_step=0.1)
    >>> x, t = torch.randn(4, 10, 1), torch.rand(4, 10).sort(-1).values
    >>> states, last = rnn(x, t)
    >>> states.shape, last.shape
    (torch.Size([4, 10, 8]), torch.Size([4, 8]))
    """

    def __init__(self, input_size: int, hidden_size: int, *, cell: str | nn.Module = "gru",
                 field: nn.Module | Any | None = None, units: int = 100, method: str = "euler",
                 max_step: float | None = None, rtol: float = 1e-3, atol: float = 1e-4, gradient: str = "direct",
                 per_sample_steps: bool = False, union: bool = False, step_rule: str = "ceil", fused: bool = True,
                 **solve_options: Any):
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise InputError(f"ODERNN: input_size and hidden_size must be >= 1, got {input_size}, {hidden_size}.")
        if isinstance(cell, str):
            if cell not in CELLS:
                raise InputError(f"ODERNN: cell must be one of {sorted(CELLS)} or an nn.Module, got {cell!r}.")
            cell = CELLS[cell](2 * input_size, hidden_size, units) if cell == "gated_mlp" else \
                CELLS[cell](2 * input_size, hidden_size)
        for attr in ("state_size", "ode_size"):
            if not isinstance(getattr(cell, attr, None), int):
                raise InputError(f"ODERNN: the cell module needs an integer attribute {attr!r}.")
        if step_rule not in ("ceil", "latent_ode"):
            raise InputError(f"ODERNN: step_rule must be 'ceil' or 'latent_ode', got {step_rule!r}.")
        if max_step is not None and not max_step > 0:
            raise InputError(f"ODERNN: max_step must be > 0, got {max_step}.")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.cell = cell
        if field is None:
            field = mlp(cell.ode_size, units, cell.ode_size)
        if not callable(field):
            raise InputError(f"ODERNN: field must be callable, got {type(field).__name__}.")
        self.field = field
        self.rescaled = _Rescaled(field, takes_time(field))
        self.method, self.max_step, self.rtol, self.atol, self.gradient = method, max_step, rtol, atol, gradient
        self.per_sample_steps, self.union = per_sample_steps, union
        self.step_rule, self.fused = step_rule, fused
        self.solve_options = dict(solve_options)
        self.nfe = 0
        self._unit: dict[tuple, Tensor] = {}  # the rescaled interval [0, 1] per dtype and device
        self._plans: dict[tuple, Plan] = {}  # prepared solves of the reused field, per state shape and options
        self._workspace: dict[str, Any] = {}  # the fused run's reused buffers

    def evolve(self, h: Tensor, t0: Tensor, dt: Tensor, max_step: float | None = None,
               dt_max: float | None = None) -> Tensor:
        """Solve the ODE part ``h (B, ode_size)`` from ``t0`` over ``dt`` (0-dim, or ``(B, 1)`` per row; negative:
        backward in time). ``dt_max``: ``max |dt|`` when the caller knows it (saves a device sync). Adds the solve's
        NFE to ``self.nfe``."""
        h, nfe = self._evolve(h, t0, dt, max_step, dt_max)
        self.nfe += nfe
        return h

    def _evolve(self, h: Tensor, t0: Tensor, dt: Tensor, max_step: float | None,
                dt_max: float | None) -> tuple[Tensor, int]:
        """:meth:`evolve`, returning ``(h, nfe)``."""
        big = float(dt.abs().max()) if dt_max is None else dt_max
        if big == 0.0:
            return h, 0
        opts = self.solve_options
        step = self.max_step if max_step is None else max_step
        if self.method in FIXED_STEP and "step_size" not in opts:
            n = euler_steps([big], step, self.step_rule)[0]
            opts = {**opts, "step_size": 1.0 / n}
        if self.gradient == "direct":  # autograd records every evaluation now: the one field object can be reused
            field = self.rescaled
        else:  # the backward pass evaluates the field again later: each solve keeps its own interval
            field = _Rescaled(self.field, self.rescaled.with_time)
        field.interval[:] = (t0, dt)
        s = self._unit.get((h.dtype, h.device))
        if s is None:
            with ordinary_tensors():  # kept for later solves, with or without autograd
                s = self._unit[(h.dtype, h.device)] = torch.tensor([0.0, 1.0], dtype=h.dtype, device=h.device)
        kw = dict(method=self.method, rtol=self.rtol, atol=self.atol, gradient=self.gradient,
                  per_sample_steps=self.per_sample_steps, **opts)
        if field is not self.rescaled or vmapped(h):
            sol = solve(field, h, s, **kw)
            return sol.ys[-1], sol.stats["nfe"]
        # The one field object: the checks of the solve's arguments run once per state shape and options (a plan),
        # then each interval reruns the plan (the state itself still checked for NaN/inf).
        key = (h.shape, h.dtype, h.device, torch.is_grad_enabled(), autocast_dtype(h.device.type),
               *sorted(kw.items()))
        try:
            plan = self._plans.get(key)
        except TypeError:  # an option that is not hashable (a tensor tolerance): no reuse
            sol = solve(field, h, s, **kw)
            return sol.ys[-1], sol.stats["nfe"]
        if plan is None:
            plan = prepare(field, h, s, **kw)
            sol = plan.run()
            if len(self._plans) >= 64:  # many batch sizes or step counts: start afresh
                self._plans.clear()
            self._plans[key] = replace(plan, y0=h.detach())
        else:
            sol = plan.rerun(h)
        return sol.ys[-1], sol.stats["nfe"]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_plans"] = {}  # prepared solves are rebuilt on use
        state["_workspace"] = {}
        return state

    def forward(self, x: Tensor, t: Tensor, mask: Tensor | None = None, *, reverse: bool = False,
                state0: Tensor | None = None, max_step: float | None = None, states: bool = True
                ) -> tuple[Tensor | None, Tensor]:
        """Run over the observations (see the class docstring for shapes); ``reverse=True`` runs from the last time
        back to the first (the latent ODE encoder); ``max_step`` overrides the module's for this call;
        ``states=False`` returns ``(None, last)`` (the fused run then does not form the per-time states)."""
        B, T, C = self._check(x, t, mask)
        mask = torch.ones_like(x) if mask is None else mask.to(x.dtype)
        if t.dim() == 2 and self.union and not bool((t == t[:1]).all()):
            seq, last = self._forward_union(x, t, mask, reverse, state0, max_step)
            return (seq if states else None), last
        shared = t.dim() == 1 or bool((t == t[:1]).all())
        tt = (t if t.dim() == 1 else t[0]) if shared else t
        state = x.new_zeros(B, self.cell.state_size) if state0 is None else state0
        layers = self._fusable(x, tt, mask, state) if shared else None
        if layers is not None:
            seq, last, self.nfe = fused_odernn(self.cell, layers, x, tt, mask, reverse, state,
                                               self.max_step if max_step is None else max_step, self.step_rule,
                                               states, self._workspace)
            return seq, last
        n_ode = self.cell.ode_size
        inp = torch.cat([x * mask, mask], -1).transpose(0, 1)  # (T, B, 2C)
        update = self.cell.series_update(inp) if callable(getattr(type(self.cell), "series_update", None)) else None
        inps = inp.unbind(0)
        seen = (mask.amax(-1, keepdim=True) > 0).transpose(0, 1)  # (T, B, 1)
        seen_all, seen_any = seen.all(1).view(-1).tolist(), seen.any(1).view(-1).tolist()
        seen = seen.unbind(0)
        order = range(T - 1, -1, -1) if reverse else range(T)
        dts = (tt.diff(dim=-1)).detach()
        dt_max = dts.abs().amax(0).tolist() if not shared else dts.abs().tolist()
        # Each interval's start and signed length, in the order of travel (one tensor op for all of them).
        idx = list(order)
        if shared:
            ts = tt[idx]
            t0s, dtv = ts[:-1].unbind(0), ts.diff().unbind(0)  # 0-dim each
        else:
            ts = tt[:, idx]
            t0s, dtv = ts[:, :-1, None].unbind(1), ts.diff(dim=1)[:, :, None].unbind(1)  # (B, 1) each
        out: list[Tensor] = []
        prev = None
        nfe = 0
        split = [n_ode, self.cell.state_size - n_ode]
        for i, k in enumerate(order):
            if prev is not None:
                h, rest = state.split(split, -1) if split[1] else (state, None)
                h, n = self._evolve(h, t0s[i - 1], dtv[i - 1], max_step, dt_max[min(prev, k)])
                nfe += n
                state = torch.cat([h, rest], -1) if rest is not None else h
            if seen_any[k]:  # rows with no observed channel keep their state
                new = update(k, state) if update is not None else self.cell(inps[k], state)
                state = new if seen_all[k] else torch.where(seen[k], new, state)
            out.append(state)
            prev = k
        self.nfe = nfe
        if not states:
            return None, state
        return torch.stack(out[::-1] if reverse else out, 1), state

    def _fusable(self, x: Tensor, t: Tensor, mask: Tensor, state: Tensor) -> list[nn.Linear] | None:
        """The field's ``Linear`` layers where the fused run applies (see ``fused``), else None."""
        if not self.fused or type(self.cell) is not GatedMLPUpdate or self.method != "euler" or self.solve_options \
                or self.gradient != "direct" or self.per_sample_steps or self.rescaled.with_time:
            return None
        layers = mlp_layers(self.field)
        if layers is None or any(m.bias is None for m in layers):
            return None
        dtype = x.dtype
        tensors = [mask, state, *self.cell.parameters(), *(p for m in layers for p in m.parameters())]
        if dtype not in (torch.float32, torch.float64) or any(v.dtype != dtype or v.device != x.device
                                                               for v in tensors):
            return None
        if t.requires_grad or mask.requires_grad or vmapped(x) or autocast_dtype(x.device.type) is not None:
            return None
        if layers[0].in_features != self.cell.ode_size or layers[-1].out_features != self.cell.ode_size:
            return None
        return layers

    def _forward_union(self, x: Tensor, t: Tensor, mask: Tensor, reverse: bool, state0: Tensor | None,
                       max_step: float | None) -> tuple[Tensor, Tensor]:
        """Scatter the rows onto the union of their times (masks 0 where a row has no observation), run there, and
        gather each row's states back."""
        u, idx = torch.unique(t, sorted=True, return_inverse=True)  # (M,), (B, T)
        B, T, C = x.shape
        M = u.shape[0]
        xu = x.new_zeros(B, M, C).scatter_add_(1, idx[..., None].expand(-1, -1, C), x * mask)
        mu = x.new_zeros(B, M, C).scatter_add_(1, idx[..., None].expand(-1, -1, C), mask)
        xu = xu / mu.clamp(min=1)
        mu = (mu > 0).to(x.dtype)
        union, self.union = self.union, False
        try:
            states_u, _ = self.forward(xu, u, mu, reverse=reverse, state0=state0, max_step=max_step)
        finally:
            self.union = union
        states = states_u.gather(1, idx[..., None].expand(-1, -1, states_u.shape[-1]))
        last = states[:, 0] if reverse else states[torch.arange(B), T - 1]
        return states, last

    def _check(self, x: Tensor, t: Tensor, mask: Tensor | None) -> tuple[int, int, int]:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise InputError(f"ODERNN: x must have shape (B, T, {self.input_size}), got {tuple(x.shape)}.")
        B, T, C = x.shape
        if t.shape not in ((T,), (B, T)):
            raise InputError(f"ODERNN: t must have shape ({T},) or ({B}, {T}) to match x {tuple(x.shape)}, got "
                             f"{tuple(t.shape)}.")
        if T > 1 and bool((t.diff(dim=-1) < 0).any()):
            raise InputError("ODERNN: times must be nondecreasing along each row (pad by repeating the last time).")
        if mask is not None and mask.shape != x.shape:
            raise InputError(f"ODERNN: mask shape {tuple(mask.shape)} differs from x shape {tuple(x.shape)}.")
        return B, T, C

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}, method={self.method!r}, " \
               f"max_step={self.max_step}"
