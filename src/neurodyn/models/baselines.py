"""Recurrent baselines for irregularly sampled series: ``GRUD`` (Che et al. 2018) and a plain GRU with the time gap
as an input."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InputError


def _check(name: str, x: Tensor, t: Tensor, mask: Tensor | None, channels: int) -> tuple[Tensor, Tensor]:
    if x.dim() != 3 or x.shape[-1] != channels:
        raise InputError(f"{name}: x must have shape (B, T, {channels}), got {tuple(x.shape)}.")
    B, T, _ = x.shape
    if t.shape not in ((T,), (B, T)):
        raise InputError(f"{name}: t must have shape ({T},) or ({B}, {T}), got {tuple(t.shape)}.")
    if mask is not None and mask.shape != x.shape:
        raise InputError(f"{name}: mask shape {tuple(mask.shape)} differs from x shape {tuple(x.shape)}.")
    tt = t.expand(B, -1) if t.dim() == 1 else t
    return tt, (torch.ones_like(x) if mask is None else mask.to(x.dtype))


class GRUD(nn.Module):
    """GRU-D (Che et al. 2018): a GRU whose missing inputs decay to the empirical mean and whose hidden state decays
    with the time since the last observation.

    Per step ``k`` with mask ``m``, last observed value ``x_last`` and per-channel time since the last observation
    ``delta`` (``delta_k = t_k - t_{k-1} + (1 - m_{k-1}) delta_{k-1}``, ``delta_0 = 0``):
    ``gamma_x = exp(-relu(w_x * delta + b_x))`` (diagonal), ``gamma_h = exp(-relu(W_h delta + b_h))``,
    ``x^ = m x + (1 - m)(gamma_x x_last + (1 - gamma_x) x_mean)``, ``h <- gamma_h * h``, then
    ``h = GRUCell(cat(x^, m), h)``. Time points where no channel is observed (padding) leave ``h`` as it is.

    Parameters
    ----------
    input_size, hidden_size : int
    x_mean : Tensor, shape ``(C,)``, optional
        Empirical mean of each channel (default 0: standardised data).

    Shapes
    ------
    ``forward(x (B, T, C), t (T,) or (B, T), mask (B, T, C))`` returns ``(states (B, T, H), last (B, H))``.

    Examples
    --------
    >>> import torch
    >>> m = GRUD(2, 8)
    >>> states, last = m(torch.randn(3, 5, 2), torch.arange(5.0), torch.ones(3, 5, 2))
    >>> states.shape
    torch.Size([3, 5, 8])
    """

    def __init__(self, input_size: int, hidden_size: int, x_mean: Tensor | None = None):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.decay_x_weight = nn.Parameter(torch.zeros(input_size))
        self.decay_x_bias = nn.Parameter(torch.zeros(input_size))
        self.decay_h = nn.Linear(input_size, hidden_size)
        self.cell = nn.GRUCell(2 * input_size, hidden_size)
        self.register_buffer("x_mean", torch.zeros(input_size) if x_mean is None else torch.as_tensor(x_mean))

    def decays(self, delta: Tensor) -> tuple[Tensor, Tensor]:
        """``(gamma_x (..., C), gamma_h (..., H))`` for time gaps ``delta (..., C)``."""
        gx = torch.exp(-torch.relu(self.decay_x_weight * delta + self.decay_x_bias))
        gh = torch.exp(-torch.relu(self.decay_h(delta)))
        return gx, gh

    def forward(self, x: Tensor, t: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        tt, mask = _check("GRUD", x, t, mask, self.input_size)
        B, T, C = x.shape
        h = x.new_zeros(B, self.hidden_size)
        x_last = self.x_mean.to(x).expand(B, C)
        delta = x.new_zeros(B, C)
        seen = (mask.amax(-1, keepdim=True) > 0).to(x.dtype)
        out = []
        for k in range(T):
            m = mask[:, k]
            if k > 0:
                delta = (tt[:, k] - tt[:, k - 1])[:, None] + (1 - mask[:, k - 1]) * delta
            gx, gh = self.decays(delta)
            xk = m * x[:, k] + (1 - m) * (gx * x_last + (1 - gx) * self.x_mean.to(x))
            new = self.cell(torch.cat([xk, m], -1), gh * h)
            h = seen[:, k] * new + (1 - seen[:, k]) * h
            x_last = m * x[:, k] + (1 - m) * x_last
            out.append(h)
        return torch.stack(out, 1), h


class GRUBaseline(nn.Module):
    """A plain GRU over ``cat(x * mask, mask, dt)`` with ``dt`` the gap to the previous time point (0 first).

    Time points where no channel is observed (padding) leave the state unchanged.

    Shapes
    ------
    ``forward(x (B, T, C), t (T,) or (B, T), mask (B, T, C))`` returns ``(states (B, T, H), last (B, H))``.

    Examples
    --------
    >>> import torch
    >>> m = GRUBaseline(2, 8)
    >>> m(torch.randn(3, 5, 2), torch.arange(5.0))[0].shape
    torch.Size([3, 5, 8])
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.cell = nn.GRUCell(2 * input_size + 1, hidden_size)

    def forward(self, x: Tensor, t: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        tt, mask = _check("GRUBaseline", x, t, mask, self.input_size)
        B, T, _ = x.shape
        dt = torch.cat([tt.new_zeros(B, 1), tt.diff(dim=-1)], 1)[..., None].to(x.dtype)
        inp = torch.cat([x * mask, mask, dt], -1)
        seen = (mask.amax(-1, keepdim=True) > 0).to(x.dtype)
        h = x.new_zeros(B, self.hidden_size)
        out = []
        for k in range(T):
            h = seen[:, k] * self.cell(inp[:, k], h) + (1 - seen[:, k]) * h
            out.append(h)
        return torch.stack(out, 1), h
