"""A continuous-time diagonal linear state-space layer (S4D / S5 family) for irregularly sampled inputs.

``dx/dt = A x + B u(t)``, ``y = Re(C x) + D u`` with a complex diagonal ``A`` (negative real parts), discretised
exactly by zero-order hold with each step's own ``dt``: ``x_k = exp(A dt_k) x_{k-1} + (exp(A dt_k) - 1) / A * B u_k``
(``u_k`` held over ``(t_{k-1}, t_k]``), and the linear recurrence is solved by a parallel (associative) scan.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import InputError


def linear_scan(a: Tensor, b: Tensor, dim: int = 1) -> Tensor:
    """All states of ``x_k = a_k x_{k-1} + b_k`` (``x_{-1} = 0``) along ``dim``, by a log-depth associative scan.

    ``a`` and ``b`` broadcast to one shape (real or complex). The combine rule of two steps is
    ``(a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2)``; ``ceil(log2 T)`` rounds of whole-tensor ops (Hillis--Steele).

    >>> a = torch.tensor([[0.5, 0.5, 0.5]]); b = torch.tensor([[1.0, 1.0, 1.0]])
    >>> linear_scan(a, b).tolist()
    [[1.0, 1.5, 1.75]]
    """
    a, b = torch.broadcast_tensors(a, b)
    a, b = a.movedim(dim, 0), b.movedim(dim, 0)
    T = a.shape[0]
    d = 1
    while d < T:
        b = torch.cat([b[:d], a[d:] * b[:-d] + b[d:]], 0)
        a = torch.cat([a[:d], a[d:] * a[:-d]], 0)
        d *= 2
    return b.movedim(0, dim)


class DiagonalSSM(nn.Module):
    """Continuous-time diagonal linear SSM layer, exact for irregular time steps.

    Parameters
    ----------
    input_size, output_size : int
    state_size : int
        Complex state dimension ``N``.
    init : ``"lin"`` or ``"inv"``
        S4D-Lin (``A_n = -1/2 + i pi n``) or S4D-Inv initialisation of the eigenvalues.
    timescale : float
        The eigenvalues are scaled by ``1 / timescale`` (the time unit of the data).

    Shapes
    ------
    ``forward(u (B, T, input_size), t (T,) or (B, T))`` returns ``y (B, T, output_size)``; ``states(u, t)`` returns
    ``x (B, T, N)`` (complex). The state is 0 at ``t_0``; a padded step (``dt = 0``) leaves it unchanged. ``t`` may
    be nondecreasing (padding by repeating the last time).

    Examples
    --------
    >>> import torch
    >>> layer = DiagonalSSM(input_size=2, state_size=4, output_size=3)
    >>> u, t = torch.randn(5, 20, 2), torch.rand(5, 20).sort(-1).values
    >>> layer(u, t).shape
    torch.Size([5, 20, 3])
    """

    def __init__(self, input_size: int, state_size: int, output_size: int, *, init: str = "lin",
                 timescale: float = 1.0):
        super().__init__()
        if min(input_size, state_size, output_size) < 1 or not timescale > 0:
            raise InputError("DiagonalSSM: sizes must be >= 1 and timescale > 0.")
        n = torch.arange(state_size, dtype=torch.float64)
        if init == "lin":
            imag = math.pi * n
        elif init == "inv":
            imag = state_size / math.pi * (state_size / (2 * n + 1) - 1)
        else:
            raise InputError(f"DiagonalSSM: init must be 'lin' or 'inv', got {init!r}.")
        dtype = torch.get_default_dtype()
        self.log_neg_real = nn.Parameter(torch.full((state_size,), math.log(0.5 / timescale), dtype=dtype))
        self.imag = nn.Parameter((imag / timescale).to(dtype))
        scale = 1.0 / math.sqrt(input_size)
        self.B = nn.Parameter(torch.randn(state_size, input_size, 2, dtype=dtype) * scale / math.sqrt(2))
        self.C = nn.Parameter(torch.randn(output_size, state_size, 2, dtype=dtype) / math.sqrt(state_size))
        self.D = nn.Parameter(torch.zeros(output_size, input_size, dtype=dtype))
        self.input_size, self.state_size, self.output_size = input_size, state_size, output_size

    @property
    def A(self) -> Tensor:
        """The complex eigenvalues, shape ``(N,)``, real parts negative."""
        return torch.complex(-self.log_neg_real.exp(), self.imag)

    def discretise(self, dt: Tensor) -> tuple[Tensor, Tensor]:
        """Zero-order hold for steps ``dt (...)``: ``(Abar (..., N), Bbar (..., N, input_size))`` with
        ``Abar = exp(A dt)``, ``Bbar = (Abar - 1) / A * B``."""
        A = self.A
        Adt = A * dt[..., None].to(A.real.dtype)
        Abar = torch.exp(Adt)
        Bc = torch.view_as_complex(self.B.contiguous())
        return Abar, ((Abar - 1) / A)[..., None] * Bc

    def states(self, u: Tensor, t: Tensor) -> Tensor:
        """The complex states ``x (B, T, N)`` at the times ``t``."""
        if u.dim() != 3 or u.shape[-1] != self.input_size:
            raise InputError(f"DiagonalSSM: u must have shape (B, T, {self.input_size}), got {tuple(u.shape)}.")
        B, T, _ = u.shape
        if t.shape not in ((T,), (B, T)):
            raise InputError(f"DiagonalSSM: t must have shape ({T},) or ({B}, {T}), got {tuple(t.shape)}.")
        if T > 1 and bool((t.diff(dim=-1) < 0).any()):
            raise InputError("DiagonalSSM: times must be nondecreasing along each row.")
        tt = t.expand(B, -1) if t.dim() == 1 else t
        dt = torch.cat([tt.new_zeros(B, 1), tt.diff(dim=-1)], 1)  # dt_0 = 0: the state starts at 0 at t_0
        Abar, Bbar = self.discretise(dt)  # (B, T, N), (B, T, N, I)
        drive = (Bbar * u[:, :, None, :].to(Bbar.dtype)).sum(-1)
        return linear_scan(Abar, drive, dim=1)

    def forward(self, u: Tensor, t: Tensor) -> Tensor:
        x = self.states(u, t)
        Cc = torch.view_as_complex(self.C.contiguous())
        return torch.einsum("btn,on->bto", x, Cc).real.to(u.dtype) + u @ self.D.T
