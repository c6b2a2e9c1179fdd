"""Generated irregularly sampled data sets: the periodic toy of the latent ODE paper, a damped pendulum and spirals.

Every generator is seeded, runs offline and returns ``(times, values)`` with ``times (N, T)`` and ``values
(N, T, C)`` (feed rows to :func:`neurodyn.data.collate`, or use them directly: every row is fully observed).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError


def _check(n_series: int, n_points: int, t_max: float, name: str) -> None:
    if n_series < 1 or n_points < 2 or not t_max > 0:
        raise InputError(f"{name}: need n_series >= 1, n_points >= 2 and t_max > 0, got {n_series}, {n_points}, "
                         f"{t_max}.")


def _sorted_uniform_times(rows: int, n_points: int, t_max: float, g: torch.Generator, dtype: torch.dtype) -> Tensor:
    """``rows`` rows of times: 0 followed by ``n_points - 1`` sorted uniform draws on ``[0, t_max]``."""
    t = torch.rand(rows, n_points - 1, generator=g, dtype=torch.float64).mul_(t_max).sort(-1).values
    return torch.cat([torch.zeros(rows, 1, dtype=torch.float64), t], 1).to(dtype)


def periodic_toy(n_series: int = 1000, n_points: int = 100, t_max: float = 5.0, noise: float = 0.01,
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The 1-d periodic toy of Rubanova et al. (2019), as their ``--dataset periodic`` setup generates it.

    One set of ``n_points`` times shared by all series: ``t_0 = 0`` and ``n_points - 1`` sorted uniform draws on
    ``[0, t_max]``. Series ``i``: ``x_i(t) = sin(2 pi f_i t) + c_i + noise * u_i(t)`` with frequency
    ``f_i ~ U[0.4, 0.8]``, amplitude 1, offset ``c_i ~ N(1, 0.1^2)``, and ``u_i(t) ~ U[0, 1)`` independent at each
    time except ``t_0`` (no noise on the first point).

    Returns
    -------
    times : Tensor, shape ``(n_series, n_points)`` (equal rows)
    values : Tensor, shape ``(n_series, n_points, 1)``

    Examples
    --------
    >>> t, x = periodic_toy(n_series=4, n_points=100, seed=0)
    >>> t.shape, x.shape, bool((t == t[0]).all()), float(t[0, 0])
    (torch.Size([4, 100]), torch.Size([4, 100, 1]), True, 0.0)
    """
    _check(n_series, n_points, t_max, "periodic_toy")
    g = torch.Generator().manual_seed(seed)
    t = _sorted_uniform_times(1, n_points, t_max, g, torch.float64)[0]
    freq = torch.rand(n_series, 1, generator=g, dtype=torch.float64) * 0.4 + 0.4
    offset = 1.0 + 0.1 * torch.randn(n_series, 1, generator=g, dtype=torch.float64)
    x = torch.sin(2 * math.pi * freq * t) + offset
    u = torch.rand(n_series, n_points - 1, generator=g, dtype=torch.float64)
    x[:, 1:] += noise * u
    return t.expand(n_series, -1).to(dtype).contiguous(), x[..., None].to(dtype)


def pendulum(n_series: int = 256, n_points: int = 50, t_max: float = 10.0, noise: float = 0.01, gravity: float = 9.81,
             length: float = 1.0, damping: float = 0.1, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Damped pendulums ``theta'' = -(gravity / length) sin(theta) - damping theta'`` observed at irregular times.

    Each series has its own times (0, then ``n_points - 1`` sorted uniform draws on ``[0, t_max]``) and initial state
    ``theta_0 ~ U[-2, 2]``, ``omega_0 ~ U[-1, 1]``; all are solved in one :func:`neurodyn.solve` call with per-sample
    output times (``dopri5``, rtol 1e-9, float64), then Gaussian noise of std ``noise`` is added.

    Returns
    -------
    times : Tensor, shape ``(n_series, n_points)``
    values : Tensor, shape ``(n_series, n_points, 2)``: ``(theta, omega)``

    Examples
    --------
    >>> t, x = pendulum(n_series=3, n_points=20, seed=0)
    >>> t.shape, x.shape
    (torch.Size([3, 20]), torch.Size([3, 20, 2]))
    """
    from ..solve import solve

    _check(n_series, n_points, t_max, "pendulum")
    g = torch.Generator().manual_seed(seed)
    t = _sorted_uniform_times(n_series, n_points, t_max, g, torch.float64)
    t[:, 1:] = torch.maximum(t[:, 1:], t[:, :-1] + 1e-9).cummax(-1).values  # strictly increasing rows
    y0 = torch.stack([torch.rand(n_series, generator=g, dtype=torch.float64) * 4 - 2,
                      torch.rand(n_series, generator=g, dtype=torch.float64) * 2 - 1], -1)

    def field(_t: Tensor, y: Tensor) -> Tensor:
        return torch.stack([y[:, 1], -(gravity / length) * torch.sin(y[:, 0]) - damping * y[:, 1]], -1)

    ys = solve(field, y0, t, rtol=1e-9, atol=1e-11, per_sample_steps=True).ys  # (T, B, 2)
    x = ys.transpose(0, 1) + noise * torch.randn(n_series, n_points, 2, generator=g, dtype=torch.float64)
    return t.to(dtype), x.to(dtype)


def spirals(n_series: int = 256, n_points: int = 50, t_max: float = 6.0, noise: float = 0.01, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Two-dimensional damped spirals (the linear ODE ``z' = [[-a, s w], [-s w, -a]] z``) at irregular times.

    Series ``i``: direction ``s_i = +-1`` (clockwise or counter-clockwise, equally likely), angular speed
    ``w_i ~ U[0.5, 1.5]``, decay ``a_i ~ U[0.05, 0.2]``, radius ``r_i ~ U[0.5, 1.5]`` and phase
    ``p_i ~ U[0, 2 pi)``; ``z_i(t) = r_i e^{-a_i t} (cos(p_i - s_i w_i t), sin(p_i - s_i w_i t))`` (closed form),
    at its own times (0, then sorted uniform draws on ``[0, t_max]``), plus Gaussian noise of std ``noise``.

    Returns
    -------
    times : Tensor, shape ``(n_series, n_points)``
    values : Tensor, shape ``(n_series, n_points, 2)``
    direction : not returned; it is ``sign`` of the angular momentum ``x dy - y dx`` (negative for ``s = +1``).

    Examples
    --------
    >>> t, z = spirals(n_series=2, n_points=30, seed=0)
    >>> t.shape, z.shape
    (torch.Size([2, 30]), torch.Size([2, 30, 2]))
    """
    _check(n_series, n_points, t_max, "spirals")
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    t = _sorted_uniform_times(n_series, n_points, t_max, g, f64)
    s = torch.randint(0, 2, (n_series, 1), generator=g).to(f64) * 2 - 1
    w = torch.rand(n_series, 1, generator=g, dtype=f64) + 0.5
    a = torch.rand(n_series, 1, generator=g, dtype=f64) * 0.15 + 0.05
    r = torch.rand(n_series, 1, generator=g, dtype=f64) + 0.5
    p = torch.rand(n_series, 1, generator=g, dtype=f64) * 2 * math.pi
    ang = p - s * w * t
    z = (r * torch.exp(-a * t))[..., None] * torch.stack([torch.cos(ang), torch.sin(ang)], -1)
    z = z + noise * torch.randn(z.shape, generator=g, dtype=f64)
    return t.to(dtype), z.to(dtype)


def stochastic_lorenz(n_series: int = 1024, n_points: int = 100, t_max: float = 2.0, noise: float = 0.01,
                      sigma: float = 10.0, rho: float = 28.0, beta: float = 8.0 / 3.0,
                      alpha: tuple[float, float, float] = (0.15, 0.15, 0.15), dt: float = 1e-3, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The stochastic Lorenz attractor ``dx = sigma (y - x) dt + alpha_1 x dW_1``,
    ``dy = (x (rho - z) - y) dt + alpha_2 y dW_2``, ``dz = (x y - beta z) dt + alpha_3 z dW_3`` (Ito).

    Initial states ``N(0, I)``; Euler--Maruyama steps of ``dt`` in float64 from a seeded generator; the paths are
    recorded at ``n_points`` equally spaced times on ``[0, t_max]``, divided by their per-channel standard deviation
    (over series and times), then Gaussian noise of std ``noise`` is added.

    Returns
    -------
    times : Tensor, shape ``(n_points,)``
    values : Tensor, shape ``(n_points, n_series, 3)`` (time-major, as :class:`neurodyn.models.LatentSDE` takes)

    Examples
    --------
    >>> t, x = stochastic_lorenz(n_series=4, n_points=50, seed=0)
    >>> t.shape, x.shape
    (torch.Size([50]), torch.Size([50, 4, 3]))
    """
    _check(n_series, n_points, t_max, "stochastic_lorenz")
    if not dt > 0:
        raise InputError(f"stochastic_lorenz: dt must be positive, got {dt!r}.")
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    per = max(1, math.ceil(t_max / (n_points - 1) / dt))  # Euler steps between recorded times
    h = t_max / (n_points - 1) / per
    a = torch.tensor(alpha, dtype=f64)
    y = torch.randn(n_series, 3, generator=g, dtype=f64)
    out = [y]
    for _ in range(n_points - 1):
        for _ in range(per):
            x1, x2, x3 = y.unbind(-1)
            f = torch.stack([sigma * (x2 - x1), x1 * (rho - x3) - x2, x1 * x2 - beta * x3], -1)
            dw = torch.randn(n_series, 3, generator=g, dtype=f64) * math.sqrt(h)
            y = y + f * h + a * y * dw
        out.append(y)
    xs = torch.stack(out)
    xs = xs / xs.reshape(-1, 3).std(0)
    xs = xs + noise * torch.randn(xs.shape, generator=g, dtype=f64)
    return torch.linspace(0.0, t_max, n_points, dtype=dtype), xs.to(dtype)
