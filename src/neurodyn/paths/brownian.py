"""Brownian motion as a control path: a Brownian interval (virtual Brownian tree) and its relatives.

A sample path ``W`` of Brownian motion on ``[t0, t1]`` with values of shape ``shape`` (``(..., m)``: batch
dimensions in front, ``m`` independent Brownian channels last), made of a binary tree of intervals. The root holds
the increment over ``[t0, t1]`` (and, when asked for, its space-time and space-time-time Levy areas); a query
splits the interval that holds it at the query point, and the two children are drawn from their exact joint law
given the parent (a Brownian bridge, with the Levy areas conditioned too). The normal draws of a split are seeded
by the parent node's seed, a hash of the entropy and the node's position in the tree, so that a value dropped from
the (LRU) cache is drawn again identically: the same interval gives the same increment however often and in
whatever order it is asked for (rejected steps, adaptive stepping, checkpoint replays, the adjoint's backward pass).

Quantities over an interval ``[s, t]``, ``h = t - s``, ``W_{s,r} = W(r) - W(s)``:

``W``
    ``W(t) - W(s)``, normal with variance ``h``.
``H`` (space-time Levy area)
    ``(1/h) int_s^t W_{s,r} dr - W/2``, normal with variance ``h/12``, independent of ``W``.
``K`` (space-time-time Levy area)
    ``(1/h^2) int_s^t W_{s,r} (h/2 - (r - s)) dr + W/12``, normal with variance ``h/720``, independent of ``W``
    and ``H``. (``H`` and ``K`` are the first two Legendre coefficients of the Brownian bridge.)
``A`` (Levy area, ``(..., m, m)``)
    ``A_ij = (1/2) int_s^t (W^i_{s,r} dW^j_r - W^j_{s,r} dW^i_r)``; its exact law given ``(W, H)`` cannot be
    sampled cheaply, so it is approximated: Davie's ``H_i W_j - W_i H_j + lambda_ij``, ``lambda_ij`` normal with
    variance ``h^2/12``, or Foster's, with the exact conditional variance ``h^2/20 + (h/5)(H_i^2 + H_j^2)``. Both
    give ``Var A_ij = h^2/4``, the Levy area's variance, and the exact conditional mean.

:class:`BrownianInterval` (the tree), :class:`BrownianPath` (every queried value kept, for fixed steps),
:class:`BrownianTree` (a dyadic tree: the path depends on the entropy only, not on the queries),
:class:`ReverseBrownian` (time reversed). All satisfy the :class:`~neurodyn.core.paths.Path` protocol and accept
torchsde's constructor arguments and its call form ``bm(ta, tb, return_U=, return_A=)``.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from functools import lru_cache
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.tensors import ordinary_tensors
from ..errors import InputError

LEVY_AREAS = ("none", "space-time", "space-time-time", "davie", "foster")
_NUM_STATS = {"none": 1, "space-time": 2, "davie": 2, "foster": 2, "space-time-time": 3}
_VAR_FACTORS = (1.0, 1.0 / 12.0, 1.0 / 720.0)  # variances of W, H, K over an interval of length h, divided by h
_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """A 64-bit hash of ``x`` (splitmix64's finaliser): the per-node seeds."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


_LEFT, _RIGHT, _AREA, _ROOT = 0x5851F42D4C957F2D, 0x14057B7EF767814F, 0x2545F4914F6CDD1D, 0x61C8864680B583EB


class BrownianIncrement(NamedTuple):
    """What :meth:`BrownianInterval.levy` returns over ``[s, t]`` (see the module docstring for definitions).

    ``W``, ``H``, ``K`` have the interval's ``shape``; ``A`` has shape ``(*shape, m)`` with ``m = shape[-1]``.
    Quantities the interval was not built for are ``None``.
    """

    W: Tensor
    H: Tensor | None
    K: Tensor | None
    A: Tensor | None


# ----------------------------------------------------------------------------------------------------------------
# The bridge algebra: one linear map (two adjacent intervals -> their union) from which the splitting law follows.
# ----------------------------------------------------------------------------------------------------------------


def _to_moments(h: float, x: list) -> list:
    """``(W, H, K)[:k]`` over an interval of length ``h`` -> ``(int dW, int W dr, int W (r - s) dr)[:k]``."""
    out = [x[0]]
    if len(x) > 1:
        i1 = h * (x[1] + 0.5 * x[0])
        out.append(i1)
        if len(x) > 2:
            out.append(0.5 * h * i1 - h * h * (x[2] - x[0] / 12.0))
    return out


def _from_moments(h: float, m: list) -> list:
    """Inverse of :func:`_to_moments`."""
    out = [m[0]]
    if len(m) > 1:
        out.append(m[1] / h - 0.5 * m[0])
        if len(m) > 2:
            out.append((0.5 * h * m[1] - m[2]) / (h * h) + m[0] / 12.0)
    return out


def _compose(h1: float, h2: float, left: list, right: list) -> list:
    """``(W, H, K)[:k]`` of ``[s, t]`` from those of ``[s, u]`` (length ``h1``) and ``[u, t]`` (length ``h2``).

    Works on floats and on tensors alike (it is linear).
    """
    ml, mr = _to_moments(h1, left), _to_moments(h2, right)
    out = [ml[0] + mr[0]]
    if len(ml) > 1:
        out.append(ml[1] + h2 * ml[0] + mr[1])
        if len(ml) > 2:
            out.append(ml[2] + 0.5 * ((h1 + h2) ** 2 - h1 * h1) * ml[0] + mr[2] + h1 * mr[1])
    return _from_moments(h1 + h2, out)


def _cholesky(c: list[list[float]]) -> list[list[float]]:
    k = len(c)
    low = [[0.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(i + 1):
            s = c[i][j] - sum(low[i][q] * low[j][q] for q in range(j))
            low[i][j] = math.sqrt(max(s, 0.0)) if i == j else s / low[j][j]
    return low


@lru_cache(maxsize=256)
def _split_coefficients(r: float, k: int) -> tuple[tuple[float, ...], ...]:
    """The splitting law in standard units: with ``p`` the parent's ``(W, H, K)[:k]`` divided by their standard
    deviations and ``z`` standard normals, the children's values divided by theirs are ``G @ [p; z]``.

    ``r = h1 / h`` is where the split falls. Derivation: the children are independent normals with variances
    ``h_i * (1, 1/12, 1/720)``; the parent is the linear map :func:`_compose` of them. Conditioning on the parent,
    the left child is normal with mean ``S_L M_L^T D^{-1} p`` and covariance ``S_L - S_L M_L^T D^{-1} M_L S_L``
    (``S`` the children's covariances, ``D`` the parent's, ``M`` the composition's blocks); the right child follows
    exactly from the parent and the left child, ``M_R^{-1} (p - M_L x_L)``. (For ``r > 1/2`` the roles swap: the
    smaller child is drawn, so that the inverted block is well conditioned.)
    Returns ``G`` as a tuple of ``2k`` rows of ``2k`` coefficients.
    """
    h1, h2 = r, 1.0 - r
    sd_l = [math.sqrt(h1 * v) for v in _VAR_FACTORS[:k]]
    sd_r = [math.sqrt(h2 * v) for v in _VAR_FACTORS[:k]]
    sd_p = [math.sqrt(v) for v in _VAR_FACTORS[:k]]
    zero = [0.0] * k

    def unit(i: int) -> list[float]:
        return [1.0 if q == i else 0.0 for q in range(k)]

    # Composition in standard units: p = ML xl + MR xr (xl, xr, p all standardised).
    ml = [[_compose(h1, h2, [sd_l[j] * e for j, e in enumerate(unit(c))], zero)[i] / sd_p[i] for c in range(k)]
          for i in range(k)]
    mr = [[_compose(h1, h2, zero, [sd_r[j] * e for j, e in enumerate(unit(c))])[i] / sd_p[i] for c in range(k)]
          for i in range(k)]
    # Standardised: children covariance I, parent covariance ML ML^T + MR MR^T = I (checked in the tests).
    # The smaller child a is drawn given p: mean Ma^T p, covariance I - Ma^T Ma; the larger one b follows as
    # Mb^{-1} (p - Ma xa) (Mb is then the well-conditioned block).
    ma, mb = (ml, mr) if r <= 0.5 else (mr, ml)
    eye = [[1.0 if i == j else 0.0 for j in range(k)] for i in range(k)]
    mean_a = [[ma[c][i] for c in range(k)] for i in range(k)]  # Ma^T
    cov_a = [[eye[i][j] - sum(ma[c][i] * ma[c][j] for c in range(k)) for j in range(k)] for i in range(k)]
    chol = _cholesky(cov_a)
    mb_inv = _inverse(mb)
    aa = [[sum(ma[i][c] * mean_a[c][j] for c in range(k)) for j in range(k)] for i in range(k)]  # Ma Ma^T
    b_p = [[sum(mb_inv[i][c] * (eye[c][j] - aa[c][j]) for c in range(k)) for j in range(k)] for i in range(k)]
    mac = [[sum(ma[i][c] * chol[c][j] for c in range(k)) for j in range(k)] for i in range(k)]
    b_z = [[-sum(mb_inv[i][c] * mac[c][j] for c in range(k)) for j in range(k)] for i in range(k)]
    rows_a = [tuple(mean_a[i]) + tuple(chol[i]) for i in range(k)]
    rows_b = [tuple(b_p[i]) + tuple(b_z[i]) for i in range(k)]
    rows = rows_a + rows_b if r <= 0.5 else rows_b + rows_a
    return tuple(rows)


def _inverse(m: list[list[float]]) -> list[list[float]]:
    """Inverse of a small matrix by Gauss-Jordan elimination with partial pivoting."""
    k = len(m)
    a = [list(row) + [1.0 if i == j else 0.0 for j in range(k)] for i, row in enumerate(m)]
    for col in range(k):
        piv = max(range(col, k), key=lambda i: abs(a[i][col]))
        a[col], a[piv] = a[piv], a[col]
        d = a[col][col]
        a[col] = [v / d for v in a[col]]
        for i in range(k):
            if i != col and a[i][col] != 0.0:
                f = a[i][col]
                a[i] = [v - f * w for v, w in zip(a[i], a[col])]
    return [row[k:] for row in a]


# ----------------------------------------------------------------------------------------------------------------
# The tree.
# ----------------------------------------------------------------------------------------------------------------


class _Node:
    __slots__ = ("start", "end", "parent", "is_left", "seed", "mid", "left", "right", "ks", "ke")

    def __init__(self, start: float, end: float, parent: _Node | None, is_left: bool, seed: int,
                 ks: int | None = None, ke: int | None = None):
        self.start = start
        self.end = end
        self.parent = parent
        self.is_left = is_left
        self.seed = seed
        self.mid: float | None = None
        self.left: _Node | None = None
        self.right: _Node | None = None
        self.ks = ks  # grid indices (dyadic tree only)
        self.ke = ke


def _as_float(name: str, t: Any) -> float:
    if isinstance(t, Tensor):
        if t.numel() != 1:
            raise InputError(f"Brownian path: {name} must be one time (a float or a 1-element tensor), got a tensor "
                             f"of shape {tuple(t.shape)}.")
        t = t.item()
    try:
        out = float(t)
    except (TypeError, ValueError):
        raise InputError(f"Brownian path: {name} must be a real number, got {t!r}.") from None
    if not math.isfinite(out):
        raise InputError(f"Brownian path: {name} must be finite, got {out}.")
    return out


class BrownianInterval:
    """Brownian motion on ``[t0, t1]`` as a binary tree of Brownian bridges, queried by interval.

    Parameters
    ----------
    t0, t1 : float
        The interval, ``t0 < t1``. ``W(t0) = 0``.
    shape : tuple of int
        Shape of ``W(t)``: ``(..., m)``, batch dimensions in front and ``m`` Brownian channels last (``()`` for one
        scalar motion). torchsde's ``size=`` is accepted too. May be left out when ``W`` is given.
    dtype, device
        Of the values (default: torch's default dtype, CPU; or those of ``W``).
    entropy : int, optional
        Seed of the path. ``None``: drawn from torch's global generator (so ``torch.manual_seed`` fixes it).
    levy_area : str
        What besides the increment is available: ``"none"``, ``"space-time"`` (``H``), ``"space-time-time"``
        (``H`` and ``K``), ``"davie"`` or ``"foster"`` (``H`` and an approximate Levy area ``A``). torchsde's
        ``levy_area_approximation=`` is accepted too.
    tol : float, optional
        Query times are rounded to ``-log10(tol)`` decimals (as torchsde); for ``halfway_tree=True`` the times are
        snapped to a dyadic grid of spacing at most ``tol`` (default ``1e-6 * (t1 - t0)`` there). ``None`` or 0:
        exact times.
    halfway_tree : bool
        ``False`` (default): intervals are split at the queried times (exact at any time, one normal draw per new
        query point); the path depends on the entropy and on the set and order of the query points (within one
        object, every interval always gives the same value). ``True``: intervals are split at their midpoints only,
        so the path depends on the entropy alone (two objects with one entropy agree whatever they were asked).
    W, H : Tensor, optional
        The increment (and space-time Levy area) over ``[t0, t1]``, drawn when not given.
    dt : float, optional
        Accepted for torchsde compatibility (its expected step size); unused: the tree adapts to each query's
        width (nodes much wider than the query are split at their midpoints), so it stays ``O(log n)`` deep.
    cache_size : int or None
        How many nodes' values to keep (LRU); ``None``: all of them. Memory is ``O(cache_size)`` tensors.
    pool_size : int
        Accepted for torchsde compatibility (seeds here are hashes of the entropy; nothing is pooled).

    Notes
    -----
    Methods: ``evaluate(t)`` (``W(t)``), ``increment(s, t)``, ``levy(s, t)`` (a :class:`BrownianIncrement`), and
    torchsde's call form ``bm(ta)`` (``W(ta)``) / ``bm(ta, tb, return_U=False, return_A=False)`` with
    ``U = int_ta^tb (W(r) - W(ta)) dr = h (W/2 + H)``. Times may be asked in any order; ``increment(s, t)`` with
    ``s > t`` is ``-increment(t, s)``. Returned tensors may be the cache's own (not copied, as torchsde): changing
    one in place does not change the path (the entry is noticed and drawn again), but the next identical query may
    return the same tensor object.

    Examples
    --------
    >>> import torch
    >>> bm = BrownianInterval(0.0, 1.0, shape=(4, 2), dtype=torch.float64, entropy=0, levy_area="space-time")
    >>> dW = bm.increment(0.25, 0.5)                      # shape (4, 2), variance 0.25
    >>> torch.allclose(dW, bm.evaluate(0.5) - bm.evaluate(0.25))
    True
    >>> out = bm.levy(0.25, 0.5)                          # out.W, out.H: (4, 2); out.K, out.A: None
    >>> W, U = bm(0.25, 0.5, return_U=True)               # torchsde's form: U = int (W(r) - W(0.25)) dr
    """

    def __init__(self, t0: float = 0.0, t1: float = 1.0, shape: tuple[int, ...] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 entropy: int | None = None, levy_area: str | None = None, tol: float | None = None, *,
                 size: tuple[int, ...] | None = None, levy_area_approximation: str | None = None,
                 halfway_tree: bool = False, W: Tensor | None = None, H: Tensor | None = None,
                 dt: float | None = None, cache_size: int | None = 45, pool_size: int = 8):
        t0, t1 = _as_float("t0", t0), _as_float("t1", t1)
        if not t0 < t1:
            raise InputError(f"BrownianInterval: need t0 < t1, got t0={t0}, t1={t1}.")
        if shape is not None and size is not None and tuple(shape) != tuple(size):
            raise InputError(f"BrownianInterval: shape={tuple(shape)} and size={tuple(size)} disagree; give one.")
        shape = size if shape is None else shape
        if levy_area is not None and levy_area_approximation is not None and levy_area != levy_area_approximation:
            raise InputError(f"BrownianInterval: levy_area={levy_area!r} and levy_area_approximation="
                             f"{levy_area_approximation!r} disagree; give one.")
        levy_area = levy_area if levy_area is not None else levy_area_approximation
        levy_area = "none" if levy_area is None else levy_area
        if levy_area not in LEVY_AREAS:
            raise InputError(f"BrownianInterval: levy_area must be one of {list(LEVY_AREAS)}, got {levy_area!r}.")
        for name, x in (("W", W), ("H", H)):
            if x is not None and (not isinstance(x, Tensor) or not x.is_floating_point()):
                raise InputError(f"BrownianInterval: {name} must be a floating-point tensor, got {type(x).__name__}"
                                 f"{'' if not isinstance(x, Tensor) else ' of dtype ' + str(x.dtype)}.")
        given = [x for x in (W, H) if x is not None]
        if shape is None:
            if not given:
                raise InputError("BrownianInterval: give shape= (or size=) or W= to fix the shape of W(t).")
            shape = given[0].shape
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise InputError(f"BrownianInterval: shape must be a tuple of ints, got {shape!r}.") from None
        if any(s < 0 for s in shape):
            raise InputError(f"BrownianInterval: shape must be non-negative, got {shape}.")
        dtype = dtype if dtype is not None else (given[0].dtype if given else torch.get_default_dtype())
        if not dtype.is_floating_point:
            raise InputError(f"BrownianInterval: dtype must be floating point, got {dtype}.")
        device = torch.device(device) if device is not None else (given[0].device if given else torch.device("cpu"))
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())  # 'cuda' and W's 'cuda:0' are one device
        for name, x in (("W", W), ("H", H)):
            if x is not None and (tuple(x.shape) != shape or x.dtype != dtype or x.device != device):
                raise InputError(f"BrownianInterval: {name} has shape {tuple(x.shape)}, {x.dtype}, {x.device}; "
                                 f"expected {shape}, {dtype}, {device}.")
        if H is not None and _NUM_STATS[levy_area] < 2:
            warnings.warn(f"BrownianInterval: H= is ignored with levy_area={levy_area!r} (as torchsde); pass "
                          f"levy_area='space-time' to use it.", stacklevel=2)
            H = None
        if tol is not None:
            tol = _as_float("tol", tol)
            if tol < 0:
                raise InputError(f"BrownianInterval: tol must be non-negative, got {tol}.")
        if halfway_tree and tol is None:
            tol = 1e-6 * (t1 - t0)
        if halfway_tree and tol <= 0:
            raise InputError("BrownianInterval: halfway_tree=True needs a positive tol (the grid spacing).")
        if dt is not None:
            dt = _as_float("dt", dt)
            if dt <= 0:
                raise InputError(f"BrownianInterval: dt must be positive, got {dt}.")
        if cache_size is not None and (not isinstance(cache_size, int) or cache_size < 0):
            raise InputError(f"BrownianInterval: cache_size must be a non-negative int or None, got {cache_size!r}.")
        if not isinstance(pool_size, int) or pool_size <= 0:
            raise InputError(f"BrownianInterval: pool_size must be a positive int, got {pool_size!r}.")
        if entropy is None:
            entropy = int(torch.randint(0, 2**62, ()).item())
        if not isinstance(entropy, int):
            raise InputError(f"BrownianInterval: entropy must be an int, got {type(entropy).__name__}.")

        self._t0, self._t1 = t0, t1
        self._shape = shape
        self._dtype = dtype
        self._device = device
        self._entropy = entropy
        self._levy_area = levy_area
        self._k = _NUM_STATS[levy_area]
        self._have_a = levy_area in ("davie", "foster")
        self._tol = tol
        self._halfway = bool(halfway_tree)
        self._dt = dt
        self._cache_size = cache_size
        self._pool_size = pool_size
        self._gen = torch.Generator(device=device)
        self._slack = 1e-12 * max(1.0, abs(t0), abs(t1))
        if self._halfway:
            self._depth = max(1, math.ceil(math.log2((t1 - t0) / tol)))
            if self._depth > 50 or (t1 - t0) / 2**self._depth <= 4 * math.ulp(max(abs(t0), abs(t1))):
                raise InputError(f"BrownianInterval: tol={tol} is below the floating-point resolution of times in "
                                 f"[{t0}, {t1}] (a dyadic tree {self._depth} levels deep); use tol >= "
                                 f"{max((t1 - t0) * 2.0**-50, 8 * math.ulp(max(abs(t0), abs(t1)))):.3g}.")
            self._grid = 1 << self._depth
            self._round = None
        else:
            self._round = None if not tol else -int(math.log10(tol))
        # A node wider than _piece_factor times the query's width is split at its midpoint (a dyadic skeleton,
        # local to where the queries are), narrower ones at the queried time: the tree stays O(log n) deep however
        # the widths vary. Independent of cache_size and dt: the path does not depend on them.
        self._piece_factor = 32.0

        root_seed = _mix(entropy & _M64)
        self._root = _Node(t0, t1, None, True, root_seed, 0 if self._halfway else None,
                           self._grid if self._halfway else None)
        z = self._randn(root_seed, _ROOT, self._k)  # the split noise of the root uses the unsalted seed
        h = t1 - t0
        vals = [z[i] * math.sqrt(h * _VAR_FACTORS[i]) for i in range(self._k)]
        if W is not None:
            vals[0] = W.detach()
        if H is not None:
            vals[1] = H.detach()
        self._root_vals = torch.stack(vals) if self._k > 1 else vals[0].unsqueeze(0)
        self._cache: dict | OrderedDict = {} if cache_size is None else OrderedDict()
        self._last = self._root

    # ------------------------------------------------------------------ properties (torchsde's names too)
    knots: tuple[float, ...] = ()

    @property
    def t0(self) -> float:
        return self._t0

    @property
    def t1(self) -> float:
        return self._t1

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def size(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def entropy(self) -> int:
        return self._entropy

    @property
    def levy_area(self) -> str:
        return self._levy_area

    @property
    def levy_area_approximation(self) -> str:
        return self._levy_area

    @property
    def tol(self) -> float | None:
        return self._tol

    @property
    def dt(self) -> float | None:
        return self._dt

    @property
    def cache_size(self) -> int | None:
        return self._cache_size

    @property
    def pool_size(self) -> int:
        return self._pool_size

    @property
    def halfway_tree(self) -> bool:
        return self._halfway

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(t0={self._t0}, t1={self._t1}, shape={self._shape}, dtype={self._dtype}, "
                f"device={self._device}, entropy={self._entropy}, levy_area={self._levy_area!r}, tol={self._tol}, "
                f"halfway_tree={self._halfway}, cache_size={self._cache_size})")

    # ------------------------------------------------------------------ noise
    def _seed(self, seed: int) -> None:
        # torch's CPU generator (mt19937) keeps only 32 bits of a seed: fold all 64 in.
        self._gen.manual_seed((seed ^ (seed >> 32)) & 0xFFFFFFFF)

    def _randn(self, seed: int, salt: int, rows: int) -> Tensor:
        self._seed(seed ^ salt)
        return torch.randn((rows, *self._shape), dtype=self._dtype, device=self._device, generator=self._gen)

    # ------------------------------------------------------------------ times
    def _check_time(self, name: str, t: Any) -> float:
        t = _as_float(name, t)
        if t < self._t0 or t > self._t1:
            if t < self._t0 - self._slack or t > self._t1 + self._slack:
                raise InputError(f"{type(self).__name__}: {name}={t} is outside the path's interval "
                                 f"[{self._t0}, {self._t1}]; build it over an interval that covers every query.")
            t = min(max(t, self._t0), self._t1)
        return t

    def _snap(self, t: float) -> tuple[float, int | None]:
        if self._halfway:
            k = round((t - self._t0) / (self._t1 - self._t0) * self._grid)
            return self._grid_time(k), k
        if self._round is not None:
            t = round(t, self._round)
            t = min(max(t, self._t0), self._t1)
        return t, None

    def _grid_time(self, k: int) -> float:
        if k == 0:
            return self._t0
        if k == self._grid:
            return self._t1
        return self._t0 + (self._t1 - self._t0) * (k / self._grid)

    # ------------------------------------------------------------------ tree
    def _split(self, node: _Node, at: float, query_width: float) -> None:
        """Give ``node`` two children; the split is at ``at``, or at the midpoint for wide nodes / dyadic trees."""
        if self._halfway:
            km = (node.ks + node.ke) // 2
            mid = self._grid_time(km)
            node.left = _Node(node.start, mid, node, True, _mix(node.seed ^ _LEFT), node.ks, km)
            node.right = _Node(mid, node.end, node, False, _mix(node.seed ^ _RIGHT), km, node.ke)
        else:
            width = node.end - node.start
            dyadic = width > self._piece_factor * query_width
            mid = 0.5 * (node.start + node.end) if dyadic else at
            if self._round is not None and dyadic:
                mid = round(mid, self._round)
            if not node.start < mid < node.end:
                mid = at
            node.left = _Node(node.start, mid, node, True, _mix(node.seed ^ _LEFT))
            node.right = _Node(mid, node.end, node, False, _mix(node.seed ^ _RIGHT))
        node.mid = mid

    def _locate(self, a: float, b: float) -> list[_Node]:
        """The nodes whose union is ``[a, b]`` (``a < b``), in order, splitting nodes as needed."""
        node = self._last
        width = b - a
        while a < node.start or b > node.end:
            node = node.parent
        out: list[_Node] = []
        pending: list[tuple[_Node, float, float]] = []
        while True:
            if a == node.start and b == node.end:
                out.append(node)
                if not pending:
                    break
                node, a, b = pending.pop()
                continue
            if node.mid is None:
                self._split(node, a if a > node.start else b, width)
            m = node.mid
            if b <= m:
                node = node.left
            elif a >= m:
                node = node.right
            else:
                pending.append((node.right, m, b))
                node, b = node.left, m
        self._last = out[-1]
        return out

    def _values(self, node: _Node) -> Tensor:
        """The node's stacked ``(W, H, K)[:k]``, shape ``(k, *shape)``, from the cache or drawn from its parent."""
        if node is self._root:
            return self._root_vals
        v = self._cached(node)
        if v is not None:
            if self._cache_size is not None:
                self._cache.move_to_end(node)
            return v
        chain = [node]
        n = node.parent
        while n is not self._root:
            v = self._cached(n)
            if v is not None:
                break
            chain.append(n)
            n = n.parent
        else:
            v = self._root_vals
        for c in reversed(chain):
            v = self._children(c.parent, v)[0 if c.is_left else 1]
        return v

    def _cached(self, node: _Node) -> Tensor | None:
        """The cached values of ``node``, or ``None``. Values are handed to the caller uncopied; an entry whose tensor
        was changed in place since (its version counter moved) is dropped and drawn again, identically."""
        e = self._cache.get(node)
        if e is None:
            return None
        if e[0]._version != e[1]:
            del self._cache[node]
            return None
        return e[0]

    def _children(self, parent: _Node, v: Tensor) -> tuple[Tensor, Tensor]:
        """Draw both children of ``parent`` from its values ``v`` (exact conditional law), and cache them."""
        if torch.is_inference_mode_enabled():  # cached values must be ordinary tensors (they carry a version counter)
            with ordinary_tensors():
                return self._children(parent, v)
        h = parent.end - parent.start
        h1 = parent.mid - parent.start
        z = self._randn(parent.seed, 0, self._k)
        if self._k == 1:
            r = h1 / h
            left = z.mul_(math.sqrt(h1 * (h - h1) / h)).add_(v, alpha=r)
            right = v - left
        else:
            g = _split_coefficients(h1 / h, self._k)
            k = self._k
            sd_p = [math.sqrt(h * f) for f in _VAR_FACTORS[:k]]
            sd_l = [math.sqrt(h1 * f) for f in _VAR_FACTORS[:k]]
            sd_r = [math.sqrt((h - h1) * f) for f in _VAR_FACTORS[:k]]
            # children_i = sd_child_i * sum_j (G_ij p_j / sd_p_j + G_i,k+j z_j): one small matmul over the stack.
            coef = [[sd * g[i][j] / sd_p[j] for j in range(k)] + [sd * g[i][k + j] for j in range(k)]
                    for i, sd in enumerate(sd_l + sd_r)]
            mat = torch.tensor(coef, dtype=self._dtype, device=self._device)
            both = torch.cat([v, z]).reshape(2 * k, -1)
            out = (mat @ both).reshape(2 * k, *self._shape)
            left, right = out[:k], out[k:]
        if self._cache_size != 0:
            cache = self._cache
            cache[parent.left] = (left, left._version)
            cache[parent.right] = (right, right._version)
            if self._cache_size is not None:
                while len(cache) > self._cache_size:
                    cache.popitem(last=False)
        return left, right

    def _query(self, a: float, b: float) -> tuple[Tensor, list[_Node]]:
        """Stacked ``(W, H, K)[:k]`` over ``[a, b]`` (``a < b``, already checked) and the nodes that make it."""
        nodes = self._locate(a, b)
        v = self._values(nodes[0])
        if len(nodes) > 1:
            k = self._k
            acc = list(v.unbind(0))
            for n in nodes[1:]:
                w = self._values(n)
                acc = _compose(n.start - a, n.end - n.start, acc, list(w.unbind(0))) if k > 1 else [acc[0] + w[0]]
            v = torch.stack(acc) if k > 1 else acc[0].unsqueeze(0)  # (W alone: its sum is a fresh tensor, not copied)
        elif nodes[0] is self._root:
            v = v.clone()  # the root's values cannot be redrawn (W, H may be given): the caller gets a copy
        return v, nodes

    def _area(self, nodes: list[_Node]) -> Tensor:
        """Davie's / Foster's approximate Levy area over the union of ``nodes``, Chen's relation across them.

        Per node: ``A = M - M^T`` with ``M = H (x) W + c * N`` (``N`` standard normal ``(*shape, m)``, ``c`` half the
        wanted standard deviation times ``sqrt 2``), so ``A`` is exactly antisymmetric with ``A_ij`` having mean
        ``H_i W_j - W_i H_j`` and noise variance ``2 c^2``: ``h^2/12`` (Davie), ``h^2/20 + h/5 (H_i^2 + H_j^2)``
        (Foster).
        """
        total = None
        w_acc = None
        for n in nodes:
            v = self._values(n)
            w, hh = v[0], v[1]
            h = n.end - n.start
            self._seed(n.seed ^ _AREA)
            noise = torch.randn((*self._shape, self._shape[-1]), dtype=self._dtype, device=self._device,
                                generator=self._gen)
            mat = hh.unsqueeze(-1) * w.unsqueeze(-2)
            if self._levy_area == "davie":
                mat.add_(noise, alpha=h / math.sqrt(24.0))
            else:
                h2 = hh * hh
                c = (h2.unsqueeze(-1) + h2.unsqueeze(-2)).mul_(h / 10.0).add_(h * h / 40.0).sqrt_()
                mat.addcmul_(c, noise)
            if total is None:
                total, w_acc = mat - mat.transpose(-1, -2), w
            else:  # Chen: A_acc + A_node + (1/2) (W_acc (x) W - W (x) W_acc)
                mat.addcmul_(0.5 * w_acc.unsqueeze(-1), w.unsqueeze(-2))
                total = total + (mat - mat.transpose(-1, -2))
                w_acc = w_acc + w
        return total

    def _zeros(self, *extra: int) -> Tensor:
        return torch.zeros((*self._shape, *extra), dtype=self._dtype, device=self._device)

    # ------------------------------------------------------------------ the Path protocol
    def evaluate(self, t: Tensor | float) -> Tensor:
        """``W(t)`` (with ``W(t0) = 0``), shape ``shape``."""
        return self.increment(self._t0, t)

    def increment(self, s: Tensor | float, t: Tensor | float) -> Tensor:
        """``W(t) - W(s)``, shape ``shape``; ``s > t`` gives ``-(W(s) - W(t))``."""
        s, t = self._check_time("s", s), self._check_time("t", t)
        sign = 1.0
        if s > t:
            s, t, sign = t, s, -1.0
        (s, _), (t, _) = self._snap(s), self._snap(t)
        if s == t:
            return self._zeros()
        w = self._query(s, t)[0][0]
        return w if sign > 0 else -w

    def derivative(self, t: Tensor | float) -> Tensor:
        """Brownian paths are nowhere differentiable: always raises :class:`~neurodyn.InputError`."""
        raise InputError(f"{type(self).__name__}: Brownian motion has no derivative dW/dt, so a ControlTerm driven by "
                         "it cannot be integrated in its ODE form; solve it with an SDE method (e.g. 'euler', "
                         "'milstein', 'srk', 'heun'), which uses increment(s, t).")

    def grad_tensors(self) -> list[Tensor]:
        """``[]``: a Brownian path holds no data that needs gradients."""
        return []

    def levy(self, s: Tensor | float, t: Tensor | float) -> BrownianIncrement:
        """``W``, ``H``, ``K``, ``A`` over ``[s, t]`` (see :class:`BrownianIncrement`).

        Fields the interval was not built for are ``None`` (:meth:`require` raises for them, naming the
        ``levy_area`` to use). ``s > t`` (a step backward in time): the definitions with ``h = t - s < 0`` give
        ``W_{s,t} = -W_{t,s}``, ``H_{s,t} = H_{t,s}``, ``K_{s,t} = -K_{t,s}``, ``A_{s,t} = -A_{t,s}``.
        """
        s, t = self._check_time("s", s), self._check_time("t", t)
        if s > t:
            out = self.levy(t, s)
            neg = [None if x is None else -x for x in (out.W, out.K, out.A)]
            return BrownianIncrement(neg[0], out.H, neg[1], neg[2])
        (s, _), (t, _) = self._snap(s), self._snap(t)
        k = self._k
        if s == t:
            z = self._zeros()
            a = None
            if self._have_a:
                a = self._zeros(self._shape[-1]) if self._shape else self._zeros()
            return BrownianIncrement(z, z if k > 1 else None, z if k > 2 else None, a)
        v, nodes = self._query(s, t)
        a = None
        if self._have_a:
            a = self._area(nodes) if self._shape else self._zeros()
        return BrownianIncrement(v[0], v[1] if k > 1 else None, v[2] if k > 2 else None, a)

    def require(self, what: str) -> None:
        """Raise :class:`~neurodyn.InputError` unless ``what`` (``"H"``, ``"K"``, ``"A"`` or torchsde's ``"U"``) is
        available, naming the ``levy_area`` to build the interval with; a stepper calls it before any work.

        Examples
        --------
        >>> BrownianInterval(0.0, 1.0, shape=(2,), levy_area="space-time").require("H")   # fine; "A" would raise
        """
        if what not in ("H", "K", "A", "U"):
            raise InputError(f"{type(self).__name__}.require: what must be 'H', 'K', 'A' or 'U', got {what!r}.")
        ok = {"H": self._k > 1, "K": self._k > 2, "A": self._have_a, "U": self._k > 1}[what]
        if not ok:
            use = {"H": "'space-time' (or 'space-time-time', 'davie', 'foster')", "U": "'space-time'",
                   "K": "'space-time-time'", "A": "'davie' or 'foster'"}[what]
            raise InputError(f"{type(self).__name__}: {what} was asked for but the interval was built with "
                             f"levy_area={self._levy_area!r}; build it with levy_area={use}.")

    # ------------------------------------------------------------------ torchsde's call form
    def __call__(self, ta: Any, tb: Any = None, return_U: bool = False, return_A: bool = False) -> Any:
        """torchsde's form. ``bm(ta)``: ``W(ta)`` (relative to ``t0``). ``bm(ta, tb)``: ``W(tb) - W(ta)``;
        with ``return_U`` also ``U = int_ta^tb (W(r) - W(ta)) dr`` and with ``return_A`` the approximate Levy area
        (``(*shape, m)``; zeros when ``len(shape) <= 1``, torchsde's convention that such shapes are batches of
        scalar motions). Times outside ``[t0, t1]`` are clamped with a warning, as torchsde; ``ta > tb`` raises.
        """
        if return_U:
            self.require("U")
        if return_A:
            self.require("A")
        if tb is None:
            ta, tb, names = self._t0, ta, ("t0", "ta")
        else:
            names = ("ta", "tb")
        ta, tb = _as_float(names[0], ta), _as_float(names[1], tb)
        for name, x in zip(names, (ta, tb)):
            if x < self._t0 or x > self._t1:
                warnings.warn(f"Should have {self._t0} <= {name} <= {self._t1} but got {name}={x}; clamped.",
                              stacklevel=2)
        ta, tb = min(max(ta, self._t0), self._t1), min(max(tb, self._t0), self._t1)
        if ta > tb:
            raise RuntimeError(f"Query times ta={ta:.3f} and tb={tb:.3f} must respect ta <= tb.")
        if not (return_U or return_A):
            (a, _), (b, _) = self._snap(ta), self._snap(tb)
            return self._zeros() if a == b else self._query(a, b)[0][0]
        out = self.levy(ta, tb)
        res = [out.W]
        if return_U:
            res.append((tb - ta) * (0.5 * out.W + out.H))
        if return_A:
            res.append(out.A if len(self._shape) > 1 else torch.zeros_like(out.W))
        return tuple(res)


class BrownianPath(BrownianInterval):
    """Brownian motion that keeps every queried value: the cheapest choice for fixed steps (``O(n)`` memory).

    A :class:`BrownianInterval` split exactly at the queried times with an unbounded cache, so a sequential pass
    draws one normal per step. Two call forms:

    * ``BrownianPath(t0, t1, shape=..., dtype=..., device=..., entropy=..., levy_area=...)``;
    * torchsde's ``BrownianPath(t0, w0, window_size=8)``: the path starts at ``w0`` on ``[t0, t0 + 1]`` and
      ``bm(t)`` is ``w0 + W(t)``.

    Examples
    --------
    >>> import torch
    >>> bm = BrownianPath(0.0, 1.0, shape=(8, 3), entropy=1)
    >>> ws = [bm.increment(i / 100, (i + 1) / 100) for i in range(100)]   # each (8, 3), variance 0.01
    """

    def __init__(self, t0: float = 0.0, t1: Any = None, shape: tuple[int, ...] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 entropy: int | None = None, levy_area: str | None = None, *, w0: Tensor | None = None,
                 window_size: int = 8, size: tuple[int, ...] | None = None,
                 levy_area_approximation: str | None = None, W: Tensor | None = None):
        if isinstance(t1, Tensor) and (t1.dim() > 0 or w0 is not None):  # torchsde: BrownianPath(t0, w0)
            w0, t1 = t1, None
        self._w0 = w0
        if w0 is not None:
            shape = tuple(w0.shape) if shape is None and size is None else shape
            dtype = w0.dtype if dtype is None else dtype
            device = w0.device if device is None else device
        t0 = _as_float("t0", t0)
        t1 = t0 + 1.0 if t1 is None else t1
        super().__init__(t0, t1, shape, dtype, device, entropy, levy_area, size=size,
                         levy_area_approximation=levy_area_approximation, W=W, cache_size=None)
        self._piece_factor = math.inf

    def __call__(self, ta: Any, tb: Any = None, return_U: bool = False, return_A: bool = False) -> Any:
        out = super().__call__(ta, tb, return_U=return_U, return_A=return_A)
        if tb is None and self._w0 is not None and not (return_U or return_A):
            out = out + self._w0
        return out


class BrownianTree(BrownianInterval):
    """A dyadic Brownian tree: the path is a function of the entropy alone (not of the queries).

    Intervals are split at their midpoints only, down to a grid of spacing at most ``tol``; query times are
    snapped to that grid (so values are exact Brownian motion on the grid). Two call forms:

    * ``BrownianTree(t0, t1=..., shape=..., entropy=..., tol=1e-6, levy_area=...)``;
    * torchsde's ``BrownianTree(t0, w0, t1=None, w1=None, entropy=None, tol=1e-6, pool_size=24, cache_depth=9,
      safety=None)``: the path starts at ``w0`` (``t1`` defaults to ``t0 + 1``; ``w1`` fixes ``W(t1)``) and
      ``bm(t)`` is ``w0 + W(t)``.

    Examples
    --------
    >>> import torch
    >>> a = BrownianTree(0.0, t1=1.0, shape=(2,), entropy=3)
    >>> b = BrownianTree(0.0, t1=1.0, shape=(2,), entropy=3)
    >>> _ = a.increment(0.9, 1.0)                       # a is asked something else first
    >>> torch.equal(a.increment(0.0, 0.5), b.increment(0.0, 0.5))
    True
    """

    def __init__(self, t0: float = 0.0, w0: Tensor | None = None, t1: float | None = None,
                 w1: Tensor | None = None, entropy: int | None = None, tol: float = 1e-6, pool_size: int = 24,
                 cache_depth: int = 9, safety: float | None = None, *, shape: tuple[int, ...] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 levy_area: str | None = None, levy_area_approximation: str | None = None,
                 cache_size: int | None = 45):
        self._w0 = w0
        if w0 is not None:
            shape = tuple(w0.shape) if shape is None else shape
            dtype = w0.dtype if dtype is None else dtype
            device = w0.device if device is None else device
        t0 = _as_float("t0", t0)
        t1 = t0 + 1.0 if t1 is None else t1
        if w1 is not None and w0 is None:
            raise InputError("BrownianTree: w1= needs w0= (W(t1) - W(t0) = w1 - w0).")
        W = None if w1 is None else (w1 - w0)
        super().__init__(t0, t1, shape, dtype, device, entropy, levy_area, tol,
                         levy_area_approximation=levy_area_approximation, halfway_tree=True, W=W,
                         cache_size=cache_size, pool_size=pool_size)

    def __call__(self, ta: Any, tb: Any = None, return_U: bool = False, return_A: bool = False) -> Any:
        out = super().__call__(ta, tb, return_U=return_U, return_A=return_A)
        if tb is None and self._w0 is not None and not (return_U or return_A):
            out = out + self._w0
        return out


class ReverseBrownian:
    """The Brownian motion ``bm`` seen backward in time, as torchsde's: ``rev(ta, tb) = bm(-tb, -ta)``.

    ``bm`` lives on ``[t0, t1]``; the reversed one on ``[-t1, -t0]``. Increments are passed through unnegated,
    torchsde's convention (its adjoint negates drift and diffusion instead). ``increment(s, t)`` is
    ``bm.increment(-t, -s)``.

    Examples
    --------
    >>> bm = BrownianInterval(0.0, 1.0, shape=(3,), entropy=0)
    >>> rev = ReverseBrownian(bm)
    >>> bool((rev(-1.0, -0.5) == bm(0.5, 1.0)).all())
    True
    """

    knots: tuple[float, ...] = ()

    def __init__(self, base_brownian: Any):
        if not callable(base_brownian):
            raise InputError(f"ReverseBrownian(bm): bm must be a Brownian motion, got {type(base_brownian).__name__}.")
        self.base_brownian = base_brownian

    def __call__(self, ta: Any, tb: Any = None, return_U: bool = False, return_A: bool = False) -> Any:
        if tb is None:
            raise InputError("ReverseBrownian: call it with an interval, rev(ta, tb).")
        return self.base_brownian(-_as_float("tb", tb), -_as_float("ta", ta), return_U=return_U, return_A=return_A)

    def increment(self, s: Tensor | float, t: Tensor | float) -> Tensor:
        """``bm.increment(-t, -s)``, shape ``bm.shape``."""
        return self.base_brownian.increment(-_as_float("t", t), -_as_float("s", s))

    def evaluate(self, t: Tensor | float) -> Tensor:
        """``bm.increment(-t, t1)``: zero at the reversed path's start ``-t1``."""
        return self.base_brownian.increment(-_as_float("t", t), self.base_brownian.t1)

    def derivative(self, t: Tensor | float) -> Tensor:
        """Raises, as :meth:`BrownianInterval.derivative`."""
        return self.base_brownian.derivative(t)

    def levy(self, s: Tensor | float, t: Tensor | float) -> BrownianIncrement:
        """``bm.levy(-t, -s)``, passed through as torchsde passes ``U`` and ``A``."""
        return self.base_brownian.levy(-_as_float("t", t), -_as_float("s", s))

    def require(self, what: str) -> None:
        """As :meth:`BrownianInterval.require`."""
        self.base_brownian.require(what)

    @property
    def t0(self) -> float:
        return 0.0 - self.base_brownian.t1

    @property
    def t1(self) -> float:
        return 0.0 - self.base_brownian.t0

    def grad_tensors(self) -> list[Tensor]:
        return []

    @property
    def dtype(self) -> torch.dtype:
        return self.base_brownian.dtype

    @property
    def device(self) -> torch.device:
        return self.base_brownian.device

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base_brownian.shape

    @property
    def levy_area_approximation(self) -> str:
        return self.base_brownian.levy_area_approximation

    def __repr__(self) -> str:
        return f"ReverseBrownian(base_brownian={self.base_brownian!r})"
