"""Implicit Runge--Kutta methods as data: every stiff method neurodyn has.

A method is one :class:`ImplicitTableau` (full ``s x s`` matrix ``A``); one generic stepper
(``implicit_rk.py``) runs them all. Coefficients are exact rationals (:class:`fractions.Fraction`) where
the method has rational coefficients, and floats to full double precision otherwise (closed forms in
``sqrt(2)``, ``sqrt(3)``, ``sqrt(6)``, ``sqrt(15)``, roots of polynomials, or the published decimals).

Three kinds of method, solved differently:

* ``"dirk"`` -- lower-triangular ``A`` (SDIRK, ESDIRK): stage by stage, one Newton iteration per stage
  on ``n`` unknowns with the matrix ``I - h a_ii J``. An explicit first stage (``c_1 = 0``, ``a_11 = 0``)
  reuses ``f(t0, y0)``.
* ``"firk"`` -- fully implicit (Gauss--Legendre, Radau IIA with 2 stages): all stages at once, Newton on
  ``s n`` unknowns with the matrix ``I - h A (x) J``.
* ``"radau5"`` -- the 3-stage Radau IIA method solved as in Hairer & Wanner's RADAU5 (and scipy's
  ``Radau``): ``A^{-1}`` is diagonalised into one real eigenvalue and a complex pair, so Newton needs one
  real and one complex ``n x n`` factorisation. Its error estimate (adaptive ``radau``) uses the real one.

Methods (``order``, embedded ``error_order``, kind, dense output):

=====================  =====  ===========  ======  ==============================================
name                   order  error_order  kind    notes
=====================  =====  ===========  ======  ==============================================
``kvaerno3``           3      2            dirk    ESDIRK 4 stages, L-stable, stiffly accurate
``kvaerno4``           4      3            dirk    ESDIRK 5 stages, L-stable, stiffly accurate
``kvaerno5``           5      4            dirk    ESDIRK 7 stages, L-stable, stiffly accurate
``trbdf2``             2      (3rd-order   dirk    TR-BDF2, gamma = 2 - sqrt 2; Hosea--Shampine
                              companion)           estimate; tolerance-proportional below rtol 1e-3;
                                                   fixed-step when ``step_size`` is given
``radau``              5      3            radau5  Radau IIA, RADAU5's embedded estimate
``implicit_euler``     1      --           dirk    backward Euler
``implicit_midpoint``  2      --           dirk    1-stage Gauss
``trapezoid``          2      --           dirk    Crank--Nicolson (Lobatto IIIA, 2 stages)
``sdirk2``             2      --           dirk    2-stage L-stable SDIRK, gamma = 1 - sqrt(2)/2
``radauIIA3``          3      --           firk    2-stage Radau IIA
``radauIIA5``          5      --           radau5  3-stage Radau IIA (fixed step)
``gl4``                4      --           firk    2-stage Gauss--Legendre
``gl6``                6      --           firk    3-stage Gauss--Legendre
=====================  =====  ===========  ======  ==============================================

The fixed-step names are torchdiffeq's. Dense output: the collocation polynomial for the collocation
methods (``firk``/``radau5``); for ``kvaerno4``/``kvaerno5`` a combination of the stage values that reproduces
the slow solution of very stiff components (cubic Hermite on ``f(y0), f(y1)`` multiplies their tiny errors by
``lambda``), with its error on the stiff components in the step-size control; cubic Hermite otherwise.

References
----------
A. Kvaernoe, "Singly diagonally implicit Runge--Kutta methods with an explicit first stage", BIT 44
(2004) 489--502 (``kvaerno3/4/5``; gamma of the 3/2 and 4/3 pairs is the root of the L-stability
polynomial, of which the paper prints 10 digits).
M. E. Hosea & L. F. Shampine, "Analysis and implementation of TR-BDF2", Appl. Numer. Math. 20 (1996)
21--37 (``trbdf2`` and its error estimate).
E. Hairer & G. Wanner, "Solving Ordinary Differential Equations II", 2nd ed., Springer 1996, IV.5 and
IV.8 (Radau IIA, RADAU5's transformation and error estimate, Gauss methods).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction as Fr

Number = Fr | float | int


@dataclass(frozen=True)
class ImplicitTableau:
    """An implicit Runge--Kutta method as data.

    Parameters
    ----------
    name : str
        The method name users pass (``method="kvaerno5"``).
    c : sequence of s numbers
        Stage times as fractions of the step.
    a : s rows of s numbers
        The full Butcher matrix ``A`` (lower triangular for ``kind="dirk"``).
    b : sequence of s numbers
        Weights of the propagated solution.
    order : int
        Order of the propagated solution.
    kind : ``"dirk"``, ``"firk"`` or ``"radau5"``
        How the stage equations are solved (see the module docstring).
    b_err : sequence of s numbers or None
        ``b - b_hat`` for an embedded pair (``dirk``): the local error estimate is
        ``h * sum_j b_err[j] * k_j``. ``None`` for fixed-step methods. ``radau5`` has its own estimate.
    error_order : int or None
        Order of the error estimate (it behaves like ``h^(error_order + 1)``); the step-size
        controller uses ``error_order + 1``.
    filter_error : bool
        Multiply the ``dirk`` estimate by ``(I - h gamma J)^{-1}`` (Shampine's filter, as
        OrdinaryDiffEq's ``smooth_est``): keeps the estimate of stiff components bounded.
    dense : ``"hermite"``, ``"collocation"`` or ``"stages"``
        Continuous extension: cubic Hermite, the collocation polynomial (collocation methods), or a combination
        of the stage values (stiffly accurate ESDIRKs with stage order 2; ``stage_dense``).
    dense_order : int
        Order of the continuous extension.
    stage_dense : tuple or None
        ``(stiff_degree, trees, skip)`` of the stage-value extension (see ``implicit_rk._stage_dense``).
    stage_dense_check : tuple, ``"hermite"`` or None
        A second stage-value extension of another stiff degree (or ``"hermite"``: cubic Hermite on the stage
        derivatives at the step's ends): their difference at two interior points, restricted to the stiff
        components, joins the step's error estimate (``implicit_rk.ImplicitRungeKutta._dense_error``).
    proportional_below : float or None
        For a method that advances its lower-order solution (no local extrapolation): below this ``rtol`` the
        stepper runs at the internal tolerances ``rtol' = r0 (rtol / r0)^((p+1)/p)``, ``atol' = atol rtol' / rtol``
        (``p = order``), so that the global error is proportional to ``rtol`` rather than to ``rtol^(p/(p+1))``.
    """

    name: str
    c: Sequence[Number]
    a: Sequence[Sequence[Number]]
    b: Sequence[Number]
    order: int
    kind: str = "dirk"
    b_err: Sequence[Number] | None = None
    error_order: int | None = None
    filter_error: bool = True
    dense: str = "hermite"
    dense_order: int = 3
    adaptive_estimate: bool = False  # radau5: the embedded RADAU5 estimate is available
    stage_dense: tuple | None = None
    stage_dense_check: tuple | str | None = None
    proportional_below: float | None = None

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None or self.adaptive_estimate

    @property
    def controller_order(self) -> int | None:
        return self.error_order

    @property
    def explicit_first(self) -> bool:
        """The first stage is ``f(t0, y0)`` (ESDIRK): ``c_1 = 0`` and ``a_1j = 0``."""
        return self.kind == "dirk" and float(self.c[0]) == 0.0 and all(float(x) == 0.0 for x in self.a[0])

    @property
    def stiffly_accurate(self) -> bool:
        """The last row of ``A`` is ``b`` (and ``c_s = 1``): the last stage value is ``y1``."""
        return float(self.c[-1]) == 1.0 and all(float(x) == float(y) for x, y in zip(self.a[-1], self.b))


IMPLICIT_TABLEAUS: dict[str, ImplicitTableau] = {}


def register(tableau: ImplicitTableau) -> ImplicitTableau:
    """Add an implicit tableau to the registry of method names."""
    IMPLICIT_TABLEAUS[tableau.name] = tableau
    return tableau


def _poly(coeffs: Sequence[float], x: float) -> float:
    v = 0.0
    for co in coeffs:
        v = v * x + co
    return v


def _newton_root(coeffs: Sequence[float], x: float) -> float:
    """A root of a polynomial (highest degree first) by Newton from ``x`` (polishes a printed value)."""
    deriv = [co * (len(coeffs) - 1 - i) for i, co in enumerate(coeffs[:-1])]
    for _ in range(50):
        step = _poly(coeffs, x) / _poly(deriv, x)
        x -= step
        if abs(step) <= 1e-17 * abs(x):
            break
    return x


def _row_sums(a: Sequence[Sequence[Number]]) -> list[Number]:
    return [sum(row) for row in a]


# ------------------------------------------------------------------------------------------------
# ESDIRK pairs of Kvaernoe (2004). Both the advancing and the embedded method are stiffly accurate
# (y1 is the last stage, the embedded solution the one before), so b_err = a_s - a_{s-1}.
# ------------------------------------------------------------------------------------------------
def _esdirk(name: str, a: list[list[Number]], order: int, stage_dense: tuple | None = None,
            stage_dense_check: tuple | str | None = None) -> ImplicitTableau:
    s = len(a)
    b = list(a[-1])
    b_hat = list(a[-2])
    return ImplicitTableau(name=name, c=_row_sums(a), a=a, b=b, order=order, kind="dirk",
                           b_err=[x - y for x, y in zip(b, b_hat)], error_order=order - 1,
                           dense="hermite" if stage_dense is None else "stages", dense_order=3 if s > 2 else 2,
                           stage_dense=stage_dense, stage_dense_check=stage_dense_check)


# kvaerno3: gamma is the root near 0.4359 of x^3 - 3 x^2 + 3/2 x - 1/6 (L-stability of the 3rd-order
# method; the paper prints gamma = 0.4358665215).
_g3 = _newton_root([1.0, -3.0, 1.5, -1.0 / 6.0], 0.4358665215)
_kv3 = [
    [0, 0, 0, 0],
    [_g3, _g3, 0, 0],
    [(-4 * _g3**2 + 6 * _g3 - 1) / (4 * _g3), (-2 * _g3 + 1) / (4 * _g3), _g3, 0],
    [(6 * _g3 - 1) / (12 * _g3), -1 / ((24 * _g3 - 12) * _g3), (-6 * _g3**2 + 6 * _g3 - 1) / (6 * _g3 - 3), _g3],
]
# Stage-value continuous extension: stiff degree 2 over stages 1 and 3 (c = 0, 0.872, 1; the embedded stage 2 at
# c = 1 skipped), checked against cubic Hermite on the stage derivatives K_0, K_3.
register(_esdirk("kvaerno3", _kv3, 3, stage_dense=(2, (), (2,)), stage_dense_check="hermite"))

# kvaerno4: gamma is the root near 0.5728 of x^4 - 4 x^3 + 3 x^2 - 2/3 x + 1/24 (the paper prints
# 0.5728160625); the coefficients are the paper's closed forms in gamma.
_g4 = _newton_root([1.0, -4.0, 3.0, -2.0 / 3.0, 1.0 / 24.0], 0.5728160625)


def _p(*coeffs: float) -> float:
    return _poly(coeffs, _g4)


_kv4 = [
    [0, 0, 0, 0, 0],
    [_g4, _g4, 0, 0, 0],
    [_p(144, -180, 81, -15, 1) * _g4 / _p(12, -6, 1) ** 2, _p(-36, 39, -15, 2) * _g4 / _p(12, -6, 1) ** 2, _g4, 0, 0],
    [_p(-144, 396, -330, 117, -18, 1) / (12 * _g4**2 * _p(12, -9, 2)),
     _p(72, -126, 69, -15, 1) / (12 * _g4**2 * _p(3, -1)),
     _p(-6, 6, -1) * _p(12, -6, 1) ** 2 / (12 * _g4**2 * _p(12, -9, 2) * _p(3, -1)), _g4, 0],
    [_p(288, -312, 120, -18, 1) / (48 * _g4**2 * _p(12, -9, 2)),
     _p(24, -12, 1) / (48 * _g4**2 * _p(3, -1)),
     -(_p(12, -6, 1) ** 3) / (48 * _g4**2 * _p(3, -1) * _p(12, -9, 2) * _p(6, -6, 1)),
     _p(-24, 36, -12, 1) / _p(24, -24, 4), _g4],
]
# Stage-value continuous extension (implicit_rk._stage_dense): stiff degree 2 with the order-3 tree, skipping the
# embedded stage 4 (at c = 1 like stage 5); checked against the stiff-degree-3 one (c = 0, 1.146, 0.597, 1).
register(_esdirk("kvaerno4", _kv4, 4, stage_dense=(2, ("Ac2",), (3,)), stage_dense_check=(3, (), (3,))))

# kvaerno5: gamma = 0.26; the paper's 17-digit decimals.
_g5 = Fr(26, 100)
_kv5 = [
    [0, 0, 0, 0, 0, 0, 0],
    [_g5, _g5, 0, 0, 0, 0, 0],
    [Fr(13, 100), 0.84033320996790809, _g5, 0, 0, 0, 0],
    [0.22371961478320505, 0.47675532319799699, -0.06470895363112615, _g5, 0, 0, 0],
    [0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998, _g5, 0, 0],
    [0.13855640231268224, 0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676, _g5, 0],
    [0.13659751177640291, 0, -0.05496908796538376, -0.04118626728321046, 0.62993304899016403,
     0.06962479448202728, _g5],
]
# Stage-value continuous extension: stiff degree 3 with the trees A c^2, A c^3 (non-stiff order 3), skipping the
# embedded stage 6; checked against stiff degree 4 with A c^2 (abscissae 0, 0.52, 1.23, 0.896, 0.436, 1).
register(_esdirk("kvaerno5", _kv5, 5, stage_dense=(3, ("Ac2", "Ac3"), (5,)), stage_dense_check=(4, ("Ac2",), (5,))))

# ------------------------------------------------------------------------------------------------
# TR-BDF2 (Bank et al. 1985; Hosea & Shampine 1996): trapezoidal rule to t0 + gamma h, BDF2 to t0 + h,
# gamma = 2 - sqrt(2) so both stages share the diagonal d = gamma / 2. The error estimate is the
# difference to the 3rd-order companion b_hat = ((1 - w)/3, (3 w + 1)/3, d/3) (w = sqrt(2)/4), filtered
# through (I - d h J)^{-1} (Hosea & Shampine; OrdinaryDiffEq's btilde are these with the opposite sign).
# Measured against the true local error (scipy Radau at rtol 1e-13 from every step's start, HIRES at
# rtol 1e-6) the filtered estimate is exact to a few per cent (median ratio 1.00, largest 1.08), but the
# method advances its 2nd-order solution, so under error-per-step control its global error grows like
# rtol^(2/3) (5.7e-4 on HIRES at rtol 1e-6, 3.1e-5 at 1e-8). Below rtol = 1e-3 (MATLAB ode23tb's default,
# where TR-BDF2 is at home) it therefore runs at rtol' = 1e-3 (rtol / 1e-3)^(3/2) (atol scaled alike), which
# makes the global error proportional to rtol (<= 5e-5 on Robertson, HIRES and Van der Pol at rtol 1e-6) at
# sqrt(1e-3 / rtol)^(1/3) times the steps (3.2x at rtol 1e-6). See ``ImplicitTableau.proportional_below``.
# ------------------------------------------------------------------------------------------------
_s2 = math.sqrt(2.0)
_d = 1.0 - _s2 / 2.0
_w = _s2 / 4.0
_trbdf2_a = [[0, 0, 0], [_d, _d, 0], [_w, _w, _d]]
register(ImplicitTableau(
    name="trbdf2", c=[0, 2.0 - _s2, 1], a=_trbdf2_a, b=[_w, _w, _d], order=2, kind="dirk",
    b_err=[(_s2 - 1.0) / 3.0, -Fr(1, 3), (2.0 - _s2) / 3.0],  # b - b_hat
    error_order=2, dense="stages", dense_order=2, stage_dense=(2, (), ()), stage_dense_check="hermite",
    proportional_below=1e-3,
))

# ------------------------------------------------------------------------------------------------
# Radau IIA, 3 stages (order 5, stage order 3).
# ------------------------------------------------------------------------------------------------
_s6 = math.sqrt(6.0)
_radau5_c = [(4.0 - _s6) / 10.0, (4.0 + _s6) / 10.0, 1]
_radau5_a = [
    [(88.0 - 7.0 * _s6) / 360.0, (296.0 - 169.0 * _s6) / 1800.0, (-2.0 + 3.0 * _s6) / 225.0],
    [(296.0 + 169.0 * _s6) / 1800.0, (88.0 + 7.0 * _s6) / 360.0, (-2.0 - 3.0 * _s6) / 225.0],
    [(16.0 - _s6) / 36.0, (16.0 + _s6) / 36.0, Fr(1, 9)],
]
_radau5_b = list(_radau5_a[-1])
register(ImplicitTableau(name="radau", c=_radau5_c, a=_radau5_a, b=_radau5_b, order=5, kind="radau5",
                         error_order=3, dense="collocation", dense_order=3, adaptive_estimate=True))
register(ImplicitTableau(name="radauIIA5", c=_radau5_c, a=_radau5_a, b=_radau5_b, order=5, kind="radau5",
                         dense="collocation", dense_order=3))

# ------------------------------------------------------------------------------------------------
# Fixed-step methods (torchdiffeq's names).
# ------------------------------------------------------------------------------------------------
register(ImplicitTableau(name="implicit_euler", c=[1], a=[[1]], b=[1], order=1, kind="dirk", dense_order=1))
register(ImplicitTableau(name="implicit_midpoint", c=[Fr(1, 2)], a=[[Fr(1, 2)]], b=[1], order=2, kind="dirk",
                         dense_order=2))
register(ImplicitTableau(name="trapezoid", c=[0, 1], a=[[0, 0], [Fr(1, 2), Fr(1, 2)]], b=[Fr(1, 2), Fr(1, 2)],
                         order=2, kind="dirk", dense_order=2))
_gs = 1.0 - _s2 / 2.0
register(ImplicitTableau(name="sdirk2", c=[_gs, 1], a=[[_gs, 0], [1.0 - _gs, _gs]], b=[1.0 - _gs, _gs], order=2,
                         kind="dirk", dense_order=2))
register(ImplicitTableau(name="radauIIA3", c=[Fr(1, 3), 1], a=[[Fr(5, 12), -Fr(1, 12)], [Fr(3, 4), Fr(1, 4)]],
                         b=[Fr(3, 4), Fr(1, 4)], order=3, kind="firk", dense="collocation", dense_order=2))
_s3 = math.sqrt(3.0)
register(ImplicitTableau(
    name="gl4", c=[0.5 - _s3 / 6.0, 0.5 + _s3 / 6.0],
    a=[[Fr(1, 4), 0.25 - _s3 / 6.0], [0.25 + _s3 / 6.0, Fr(1, 4)]], b=[Fr(1, 2), Fr(1, 2)], order=4, kind="firk",
    dense="collocation", dense_order=2,
))
_s15 = math.sqrt(15.0)
register(ImplicitTableau(
    name="gl6", c=[0.5 - _s15 / 10.0, Fr(1, 2), 0.5 + _s15 / 10.0],
    a=[[Fr(5, 36), 2.0 / 9.0 - _s15 / 15.0, 5.0 / 36.0 - _s15 / 30.0],
       [5.0 / 36.0 + _s15 / 24.0, Fr(2, 9), 5.0 / 36.0 - _s15 / 24.0],
       [5.0 / 36.0 + _s15 / 30.0, 2.0 / 9.0 + _s15 / 15.0, Fr(5, 36)]],
    b=[Fr(5, 18), Fr(4, 9), Fr(5, 18)], order=6, kind="firk", dense="collocation", dense_order=3,
))
# TR-BDF2 without error control (``step_size`` given) is the same tableau: ``trbdf2`` serves both.

ADAPTIVE_IMPLICIT = [name for name, tb in IMPLICIT_TABLEAUS.items() if tb.adaptive]
FIXED_IMPLICIT = [name for name, tb in IMPLICIT_TABLEAUS.items() if not tb.adaptive]
