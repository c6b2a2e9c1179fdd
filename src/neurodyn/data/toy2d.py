"""FFJORD's two-dimensional toy densities (Grathwohl et al. 2019), as torch samplers.

Every sampler draws from a ``torch.Generator`` (or the global stream) and returns a float tensor of shape
``(n, 2)``; the densities, scales and noise levels are those of FFJORD's experiments, so NLLs in nats are
comparable with the published figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["TOY_2D", "eight_gaussian_centers", "sample_2d"]


def _rand(n: int | tuple[int, ...], g: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    return torch.rand(n if isinstance(n, tuple) else (n,), generator=g, dtype=dtype)


def _randn(n: int | tuple[int, ...], g: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    return torch.randn(n if isinstance(n, tuple) else (n,), generator=g, dtype=dtype)


def _shuffle(x: Tensor, g: torch.Generator | None) -> Tensor:
    return x[torch.randperm(x.shape[0], generator=g)]


def eight_gaussian_centers(dtype: torch.dtype = torch.float32) -> Tensor:
    """The 8 component means of ``"8gaussians"``: radius ``4 / 1.414`` at angles ``k * pi / 4``; shape ``(8, 2)``.

    >>> eight_gaussian_centers(torch.float64).norm(dim=1).round(decimals=3).unique().tolist()
    [2.829]
    """
    c = 1.0 / math.sqrt(2.0)
    unit = torch.tensor([(1, 0), (-1, 0), (0, 1), (0, -1), (c, c), (c, -c), (-c, c), (-c, -c)], dtype=dtype)
    return unit * 4.0 / 1.414


def _eight_gaussians(n: int, g: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    # mixture of 8 equal-weight isotropic Gaussians, std 0.5 before the 1/1.414 rescaling
    idx = torch.randint(0, 8, (n,), generator=g)
    return eight_gaussian_centers(dtype)[idx] + _randn((n, 2), g, dtype) * (0.5 / 1.414)


def _checkerboard(n: int, g: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    # uniform on the 8 dark squares of a 4x4 board spanning [-4, 4]^2
    x1 = _rand(n, g, dtype) * 4 - 2
    x2 = _rand(n, g, dtype) - torch.randint(0, 2, (n,), generator=g).to(dtype) * 2
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], 1) * 2


def _two_spirals(n: int, g: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    half = n // 2
    r = torch.sqrt(_rand((n - half, 1), g, dtype)) * 540 * (2 * math.pi) / 360
    dx = -torch.cos(r) * r + _rand((n - half, 1), g, dtype) * 0.5
    dy = torch.sin(r) * r + _rand((n - half, 1), g, dtype) * 0.5
    arm = torch.cat([dx, dy], 1)
    x = torch.cat([arm, -arm[:half]], 0) / 3
    return x + _randn((n, 2), g, dtype) * 0.1


def _pinwheel(n: int, g: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    classes, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    labels = torch.arange(n) % classes
    feats = _randn((n, 2), g, dtype) * torch.tensor([radial_std, tangential_std], dtype=dtype)
    feats[:, 0] += 1.0
    angles = labels.to(dtype) * (2 * math.pi / classes) + rate * torch.exp(feats[:, 0])
    c, s = torch.cos(angles), torch.sin(angles)
    # row vector times the rotation [[c, -s], [s, c]]
    out = torch.stack([feats[:, 0] * c + feats[:, 1] * s, -feats[:, 0] * s + feats[:, 1] * c], 1)
    return 2 * _shuffle(out, g)


def _rings(n: int, g: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    # four concentric circles of radii 3, 2.25, 1.5, 0.75 (evenly spaced points), Gaussian noise 0.08
    k = n // 4
    sizes = [n - 3 * k, k, k, k]
    radii = [0.25, 0.5, 0.75, 1.0]
    parts = []
    for m, r in zip(sizes, radii):
        a = torch.arange(m, dtype=dtype) * (2 * math.pi / max(m, 1))
        parts.append(torch.stack([torch.cos(a), torch.sin(a)], 1) * r)
    x = _shuffle(torch.cat(parts, 0) * 3.0, g)
    return x + _randn((n, 2), g, dtype) * 0.08


def _moons(n: int, g: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    n_out = n // 2
    n_in = n - n_out
    a = torch.linspace(0, math.pi, n_out, dtype=dtype)
    b = torch.linspace(0, math.pi, n_in, dtype=dtype)
    outer = torch.stack([torch.cos(a), torch.sin(a)], 1)
    inner = torch.stack([1 - torch.cos(b), 1 - torch.sin(b) - 0.5], 1)
    x = _shuffle(torch.cat([outer, inner], 0), g) + _randn((n, 2), g, dtype) * 0.1
    return x * 2 + torch.tensor([-1.0, -0.2], dtype=dtype)


def _circles(n: int, g: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    n_out = n // 2
    n_in = n - n_out
    a = torch.arange(n_out, dtype=dtype) * (2 * math.pi / max(n_out, 1))
    b = torch.arange(n_in, dtype=dtype) * (2 * math.pi / max(n_in, 1))
    outer = torch.stack([torch.cos(a), torch.sin(a)], 1)
    inner = torch.stack([torch.cos(b), torch.sin(b)], 1) * 0.5
    x = _shuffle(torch.cat([outer, inner], 0), g) + _randn((n, 2), g, dtype) * 0.08
    return x * 3


def _swissroll(n: int, g: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    t = 1.5 * math.pi * (1 + 2 * _rand(n, g, dtype))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)
    return (x + _randn((n, 2), g, dtype)) / 5


TOY_2D: dict[str, Callable[[int, torch.Generator | None, torch.dtype], Tensor]] = {
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
    "pinwheel": _pinwheel,
    "rings": _rings,
    "moons": _moons,
    "circles": _circles,
    "swissroll": _swissroll,
}
"""The samplers by name: ``sampler(n, generator, dtype) -> (n, 2)``."""


def sample_2d(name: str, n: int, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` samples of FFJORD's 2-d toy density ``name``; shape ``(n, 2)``.

    Parameters
    ----------
    name : str
        One of ``"8gaussians"`` (8 Gaussians of std ``0.5/1.414`` at radius ``4/1.414``), ``"checkerboard"``
        (uniform on 8 squares of side 2 in ``[-4, 4]^2``), ``"2spirals"``, ``"pinwheel"`` (5 arms),
        ``"rings"`` (4 circles of radii 0.75 to 3, noise 0.08), ``"moons"`` (scikit-learn's moons, noise
        0.1, scaled by 2 and shifted by ``(-1, -0.2)``), ``"circles"`` (two circles, radius ratio 0.5, noise
        0.08, scaled by 3), ``"swissroll"`` (the 2-d section of the Swiss roll, noise 1, scaled by 1/5).
    n : int
        Number of samples (>= 1).
    generator : torch.Generator, optional
        Source of randomness (CPU); the global stream if omitted.
    dtype : torch.dtype
        Floating dtype of the result.

    Examples
    --------
    >>> import torch
    >>> x = sample_2d("8gaussians", 1000, torch.Generator().manual_seed(0))
    >>> x.shape
    torch.Size([1000, 2])
    """
    if name not in TOY_2D:
        raise InputError(f"sample_2d: unknown density {name!r}; choose one of {sorted(TOY_2D)}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"sample_2d: n must be a positive integer, got {n!r}.")
    if not dtype.is_floating_point:
        raise InputError(f"sample_2d: dtype must be a floating dtype, got {dtype}.")
    return TOY_2D[name](n, generator, dtype)
