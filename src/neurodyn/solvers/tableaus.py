"""Butcher tableaus as data: every explicit Runge--Kutta method neurodyn has.

A method is one :class:`ButcherTableau`; one generic stepper (``explicit_rk.py``) runs them all.
Coefficients are exact rationals (:class:`fractions.Fraction`) where the source gives them, floats
(to full double precision) otherwise; they are turned into tensors of the state's dtype once per
dtype/device and cached.

Dense output convention: the continuous extension of a step from ``(t0, y0)`` with step ``h`` is

    y(t0 + theta * h) = y0 + h * sum_j b_j(theta) * k_j,      b_j(theta) = sum_m P[j][m] * theta**(m+1)

where ``k_j`` runs over the ``s`` main stages followed by the ``extra`` dense-output stages (DOP853's
three), and ``P`` is ``dense`` (``s + len(extra_c)`` rows, one column per power ``theta**1 ..
theta**d``).  Methods with no continuous extension of their own (``dense is None``) use cubic Hermite
interpolation.

Methods (``order``, ``error_order``, FSAL, ``dense_order``):

========================  =====  ===========  =====  ===========
name                      order  error_order  FSAL   dense_order
========================  =====  ===========  =====  ===========
``euler``                 1      --           no     (Hermite)
``midpoint``              2      --           no     (Hermite)
``heun2``                 2      --           no     (Hermite)
``ralston``               2      --           no     (Hermite)
``heun3``                 3      --           no     (Hermite)
``rk4`` (3/8 rule)        4      --           no     (Hermite)
``adaptive_heun``         2      1            no     (Hermite)
``fehlberg2``             2      1            no     (Hermite)
``bosh3``                 3      2            yes    (Hermite)
``dopri5``                5      4            yes    4 (Shampine)
``tsit5``                 5      4            yes    4 (Tsitouras)
``dopri8`` (DOP853)       8      5            yes    7 (Hairer)
``dopri5_shampine``       5      4            yes    4 (Shampine)
``bosh3_torchdiffeq``     3      2            yes    1 (quartic)
``fehlberg2_torchdiffeq`` 2      1            reuse  1 (quartic)
``adaptive_heun_torch..`` 2      1            reuse  1 (quartic)
========================  =====  ===========  =====  ===========

The last four are torchdiffeq's methods as it runs them (:mod:`neurodyn.compat.torchdiffeq` maps its names to
them): ``dopri5`` with Shampine's (1986) embedded estimate ``b_hat = (1951/21600, 0, 22642/50085, 451/720,
-12231/42400, 649/6300, 1/60)``; ``bosh3``, ``fehlberg2`` and ``adaptive_heun`` (``adaptive_heun_torchdiffeq``)
with the quartic through a midpoint estimate as dense output (:func:`midpoint_quartic_dense`), the last two reusing
their last stage as the next step's first although it is not evaluated at ``y1`` ("reuse").

The tableaus are checked against the rooted-tree order conditions in ``tests/test_tableaus.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction

Number = Fraction | float | int


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge--Kutta method as data.

    Parameters
    ----------
    name : str
        The method name users pass (``method="dopri5"``).
    c : sequence of s numbers
        Stage times as fractions of the step.
    a : sequence of s rows
        Row ``i`` holds the ``i`` coefficients ``a[i][0..i-1]`` (strictly lower triangular; row 0 is empty).
    b : sequence of s numbers
        Weights of the propagated solution.
    order : int
        Order of the propagated solution.
    b_err : sequence of s numbers or None
        ``b - b_hat``: the local error estimate is ``h * sum_j b_err[j] * k_j``. ``None`` for fixed-step
        methods.
    error_order : int or None
        Order of the embedded solution (``b_hat``); the controller exponent uses ``error_order + 1``.
    fsal : bool
        First-same-as-last: the last stage is evaluated at ``(t0 + h, y1)``, so it is the next step's first.
    dense : sequence of rows or None
        ``P`` in the dense output convention above.
    dense_order : int
        Order of accuracy of the continuous extension (3 for Hermite).
    extra_c, extra_a :
        Stages computed only when dense output is needed (row ``i`` of ``extra_a`` has ``s + i`` entries).
    """

    name: str
    c: Sequence[Number]
    a: Sequence[Sequence[Number]]
    b: Sequence[Number]
    order: int
    b_err: Sequence[Number] | None = None
    error_order: int | None = None
    fsal: bool = False
    dense: Sequence[Sequence[Number]] | None = None
    dense_order: int = 3
    extra_c: Sequence[Number] = field(default_factory=tuple)
    extra_a: Sequence[Sequence[Number]] = field(default_factory=tuple)
    b_err_low: Sequence[Number] | None = None
    control_order: int | None = None
    reuse_last_stage: bool = False

    # ``reuse_last_stage``: the last stage (at ``t0 + h``) is the next step's first stage although it is not
    # evaluated at ``y1`` (torchdiffeq's fehlberg2 and adaptive_heun do this); the stepper runs as FSAL.

    # ``b_err_low``: a second, lower-order estimate ``b - b_hat_low`` combined with ``b_err`` as in
    # Hairer's DOP853: ratio = |h| E^2 / sqrt(n (E^2 + 0.01 E_low^2)) with E^2 the sum of squared scaled
    # errors; the combination behaves like h^(control_order + 1). ``control_order`` is the order the
    # step-size controller uses (``k = control_order + 1``); it defaults to ``error_order``.

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def controller_order(self) -> int | None:
        return self.control_order if self.control_order is not None else self.error_order

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None


TABLEAUS: dict[str, ButcherTableau] = {}


def register(tableau: ButcherTableau) -> ButcherTableau:
    """Add a tableau to the registry of method names."""
    TABLEAUS[tableau.name] = tableau
    return tableau


F = Fraction


# ----------------------------------------------------------------------------------------------------
# Helpers: exact arithmetic on the published decimal/rational constants, rounded to float once.


def _exact(x: Number | str) -> Fraction:
    """The exact value of a constant: a rational, an int, or a decimal string (``"0.5260e-1"``)."""
    return Fraction(x)


def _num(x: Fraction) -> Number:
    """Store a computed constant: integers as ``int``, short rationals (the source's own exact values,
    such as 1/100 or 0.25) as ``Fraction``, anything carrying a long decimal expansion as ``float``."""
    if x.denominator == 1:
        return int(x)
    return x if x.denominator < 10**12 else float(x)


def _poly_mul(p: Sequence[Fraction], q: Sequence[Fraction]) -> list[Fraction]:
    """Product of two polynomials given as coefficient lists (index = power)."""
    out = [Fraction(0)] * (len(p) + len(q) - 1)
    for i, pi in enumerate(p):
        for j, qj in enumerate(q):
            out[i + j] += pi * qj
    return out


def _poly(*factors: Sequence[Number | str]) -> list[Fraction]:
    """Expanded product of polynomial factors, each a coefficient list (index = power)."""
    out = [Fraction(1)]
    for factor in factors:
        out = _poly_mul(out, [_exact(x) for x in factor])
    return out


def _dense_matrix(
    weights: Sequence[Sequence[Fraction]], basis: Sequence[Sequence[Fraction]]
) -> tuple[tuple[Number, ...], ...]:
    """``P`` for ``b_j(theta) = sum_m weights[m][j] * basis_m(theta)`` (basis polynomials vanish at 0).

    Returns one row per stage, one column per power ``theta**1 .. theta**d``.
    """
    degree = max(len(q) for q in basis) - 1
    assert all(q[0] == 0 for q in basis), "the basis polynomials must vanish at theta = 0"
    rows = []
    for j in range(len(weights[0])):
        coeffs = [Fraction(0)] * (degree + 1)
        for w, q in zip(weights, basis):
            for k, qk in enumerate(q):
                coeffs[k] += w[j] * qk
        rows.append(tuple(_num(x) for x in coeffs[1:]))
    return tuple(rows)


# ----------------------------------------------------------------------------------------------------
# Fixed-step methods.

register(ButcherTableau(name="euler", c=(0,), a=((),), b=(1,), order=1))

register(ButcherTableau(
    name="midpoint",  # explicit midpoint rule
    c=(0, F(1, 2)),
    a=((), (F(1, 2),)),
    b=(0, 1),
    order=2,
))

register(ButcherTableau(
    name="heun2",  # Heun's method (explicit trapezoidal rule)
    c=(0, 1),
    a=((), (1,)),
    b=(F(1, 2), F(1, 2)),
    order=2,
))

register(ButcherTableau(
    name="ralston",  # Ralston's minimum-error second-order method
    c=(0, F(2, 3)),
    a=((), (F(2, 3),)),
    b=(F(1, 4), F(3, 4)),
    order=2,
))

register(ButcherTableau(
    name="heun3",  # Heun's third-order method
    c=(0, F(1, 3), F(2, 3)),
    a=((), (F(1, 3),), (0, F(2, 3))),
    b=(F(1, 4), 0, F(3, 4)),
    order=3,
))

register(ButcherTableau(
    name="rk4",  # Kutta's 3/8 rule, as torchdiffeq's rk4
    c=(0, F(1, 3), F(2, 3), 1),
    a=((), (F(1, 3),), (F(-1, 3), 1), (1, -1, 1)),
    b=(F(1, 8), F(3, 8), F(3, 8), F(1, 8)),
    order=4,
))


# ----------------------------------------------------------------------------------------------------
# Low-order adaptive pairs.

# Heun--Euler 2(1): propagate Heun's method, estimate the error with Euler.
register(ButcherTableau(
    name="adaptive_heun",
    c=(0, 1),
    a=((), (1,)),
    b=(F(1, 2), F(1, 2)),
    b_err=(F(1, 2) - 1, F(1, 2)),  # b_hat = (1, 0)
    order=2,
    error_order=1,
))

# Runge--Kutta--Fehlberg 1(2) as torchdiffeq's ``fehlberg2``: the stage at c = 1 is evaluated at the
# first-order solution (b_hat), and the second-order solution b is the one propagated, so the method
# is not FSAL (Fehlberg's original propagates b_hat and is).
_RKF12_B = (F(1, 512), F(255, 256), F(1, 512))
_RKF12_BHAT = (F(1, 256), F(255, 256), 0)
register(ButcherTableau(
    name="fehlberg2",
    c=(0, F(1, 2), 1),
    a=((), (F(1, 2),), (F(1, 256), F(255, 256))),
    b=_RKF12_B,
    b_err=tuple(x - y for x, y in zip(_RKF12_B, _RKF12_BHAT)),
    order=2,
    error_order=1,
))

# Bogacki--Shampine 3(2) (Bogacki & Shampine 1989), FSAL.
_BS3_B = (F(2, 9), F(1, 3), F(4, 9), 0)
_BS3_BHAT = (F(7, 24), F(1, 4), F(1, 3), F(1, 8))
register(ButcherTableau(
    name="bosh3",
    c=(0, F(1, 2), F(3, 4), 1),
    a=((), (F(1, 2),), (0, F(3, 4)), _BS3_B[:3]),
    b=_BS3_B,
    b_err=tuple(x - y for x, y in zip(_BS3_B, _BS3_BHAT)),
    order=3,
    error_order=2,
    fsal=True,
))


# ----------------------------------------------------------------------------------------------------
# Dormand--Prince 5(4) (Dormand & Prince 1980), FSAL, with Shampine's (1986) fourth-order continuous
# extension -- the dense output of Hairer's DOPRI5 and of scipy's RK45.

_DP5_B = (F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84), 0)
_DP5_BHAT = (F(5179, 57600), 0, F(7571, 16695), F(393, 640), F(-92097, 339200), F(187, 2100), F(1, 40))
_DP5_DENSE = (
    (1, F(-8048581381, 2820520608), F(8663915743, 2820520608), F(-12715105075, 11282082432)),
    (0, 0, 0, 0),
    (0, F(131558114200, 32700410799), F(-68118460800, 10900136933), F(87487479700, 32700410799)),
    (0, F(-1754552775, 470086768), F(14199869525, 1410260304), F(-10690763975, 1880347072)),
    (0, F(127303824393, 49829197408), F(-318862633887, 49829197408), F(701980252875, 199316789632)),
    (0, F(-282668133, 205662961), F(2019193451, 616988883), F(-1453857185, 822651844)),
    (0, F(40617522, 29380423), F(-110615467, 29380423), F(69997945, 29380423)),
)
register(ButcherTableau(
    name="dopri5",
    c=(0, F(1, 5), F(3, 10), F(4, 5), F(8, 9), 1, 1),
    a=(
        (),
        (F(1, 5),),
        (F(3, 40), F(9, 40)),
        (F(44, 45), F(-56, 15), F(32, 9)),
        (F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)),
        (F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)),
        _DP5_B[:6],
    ),
    b=_DP5_B,
    b_err=tuple(x - y for x, y in zip(_DP5_B, _DP5_BHAT)),
    order=5,
    error_order=4,
    fsal=True,
    dense=_DP5_DENSE,
    dense_order=4,
))



def midpoint_quartic_dense(b: Sequence[Number], mid: Sequence[Number]) -> tuple[tuple[Number, ...], ...]:
    """``dense`` (the ``P`` rows of the dense output convention) of the quartic through ``y0``, ``y1``,
    ``y_mid = y0 + h sum_j mid_j k_j`` (an estimate of ``y(t0 + h / 2)``) and the slopes ``k_0`` at the start and
    ``k_{s-1}`` (the last stage) at the end: torchdiffeq's interpolation for its adaptive Runge--Kutta methods.

    Returns one row of four coefficients (``theta**1 .. theta**4``) per stage.

    >>> midpoint_quartic_dense((F(1, 2), F(1, 2)), (F(1, 2), 0))[0]  # adaptive_heun's first stage
    (1, Fraction(3, 2), Fraction(-4, 1), Fraction(2, 1))
    """
    s = len(b)
    rows = []
    for j in range(s):
        e0, e1 = int(j == 0), int(j == s - 1)
        bj, mj = F(b[j]), F(mid[j])
        rows.append((e0, e1 - 4 * e0 - 5 * bj + 16 * mj, 5 * e0 - 3 * e1 + 14 * bj - 32 * mj,
                     2 * e1 - 2 * e0 - 8 * bj + 16 * mj))
    return tuple(rows)


# Dormand--Prince 5(4) as torchdiffeq's dopri5: the error estimate of Shampine's (1986) variant of the
# embedded fourth-order solution. The dense output stays dopri5's: Shampine's continuous extension is the
# quartic through his midpoint estimate (torchdiffeq's interpolation; tests/test_torchdiffeq_steps.py).
_DPS_BHAT = (F(1951, 21600), 0, F(22642, 50085), F(451, 720), F(-12231, 42400), F(649, 6300), F(1, 60))
register(replace(TABLEAUS["dopri5"], name="dopri5_shampine",
                 b_err=tuple(x - y for x, y in zip(_DP5_B, _DPS_BHAT))))
# bosh3, fehlberg2 and adaptive_heun as torchdiffeq runs them: the dense output is the quartic through a midpoint
# estimate, and fehlberg2's and adaptive_heun's last stage (at t0 + h, but at the embedded first-order solution, not
# at y1) is reused as the next step's first (reuse_last_stage), so their steps are not the textbook methods'.
for _name, _mid, _order in (("bosh3", (0, F(1, 2), 0, 0), 1), ("fehlberg2", (0, F(1, 2), 0), 1),
                            ("adaptive_heun", (F(1, 2), 0), 1)):
    _tab = TABLEAUS[_name]
    register(replace(_tab, name=f"{_name}_torchdiffeq", dense=midpoint_quartic_dense(_tab.b, _mid),
                     dense_order=_order, reuse_last_stage=not _tab.fsal))

# ----------------------------------------------------------------------------------------------------
# Tsitouras 5(4) (Ch. Tsitouras, "Runge--Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption", Comput. Math. Appl. 62 (2011) 770--775), FSAL.  The coefficients are the
# high-precision values of the paper's method (c2, c3, c4 and a72 are exact); the paper prints the
# sign of b_hat_7 wrongly -- the embedded weight is +1/66.

_TSIT5_C5 = "0.9800255409045096857298102862870245954942137979563024768854764293221195950761080302604"
_TSIT5_A = (
    (),
    (F(161, 1000),),
    (
        "-0.8480655492356988544426874250230774675121177393430391537369234245294192976164141156943e-2",
        "0.3354806554923569885444268742502307746751211773934303915373692342452941929761641411569",
    ),
    (
        "2.897153057105493432130432594192938764924887287701866490314866693455023795137503079289",
        "-6.359448489975074843148159912383825625952700647415626703305928850207288721235210244366",
        "4.362295432869581411017727318190886861027813359713760212991062156752264926097707165077",
    ),
    (
        "5.325864828439256604428877920840511317836476253097040101202360397727981648835607691791",
        "-11.74888356406282787774717033978577296188744178259862899288666928009020615663593781589",
        "7.495539342889836208304604784564358155658679161518186721010132816213648793440552049753",
        "-0.9249506636175524925650207933207191611349983406029535244034750452930469056411389539635e-1",
    ),
    (
        "5.861455442946420028659251486982647890394337666164814434818157239052507339770711679748",
        "-12.92096931784710929170611868178335939541780751955743459166312250439928519268343184452",
        "8.159367898576158643180400794539253485181918321135053305748355423955009222648673734986",
        "-0.7158497328140099722453054252582973869127213147363544882721139659546372402303777878835e-1",
        "-0.2826905039406838290900305721271224146717633626879770007617876201276764571291579142206e-1",
    ),
)
_TSIT5_B = (
    "0.9646076681806522951816731316512876333711995238157997181903319145764851595234062815396e-1",
    F(1, 100),
    "0.4798896504144995747752495322905965199130404621990332488332634944254542060153074523509",
    "1.379008574103741893192274821856872770756462643091360525934940067397245698027561293331",
    "-3.290069515436080679901047585711363850115683290894936158531296799594813811049925401677",
    "2.324710524099773982415355918398765796109060233222962411944060046314465391054716027841",
    0,
)
_TSIT5_BHAT = (
    "0.9468075576583945807478876255758922856117527357724631226139574065785592789071067303271e-1",
    "0.9183565540343253096776363936645313759813746240984095238905939532922955247253608687270e-2",
    "0.4877705284247615707855642599631228241516691959761363774365216240304071651579571959813",
    "1.234297566930478985655109673884237654035539930748192848315425833500484878378061439761",
    "-2.707712349983525454881109975059321670689605166938197378763992255714444407154902012702",
    "1.866628418170587035753719399566211498666255505244122593996591602841258328965767580089",
    F(1, 66),
)
# Tsitouras' dense output, b_j(theta) in the paper's factored form, expanded exactly below.
_TSIT5_DENSE_FACTORS = (
    (("-1.0530884977290216",), (0, 1), ("-1.3299890189751412", 1),
     ("0.7139816917074209", "-1.4364028541716351", 1)),
    (("0.1017",), (0, 0, 1), ("1.2949852507374631", "-2.1966568338249754", 1)),
    (("2.490627285651252793",), (0, 0, 1), ("1.57803468208092486", "-2.38535645472061657", 1)),
    (("-16.54810288924490272",), (0, 0, 1), ("-1.21712927295533244", 1), ("-0.61620406037800089", 1)),
    (("47.37952196281928122",), (0, 0, 1), ("-1.203071208372362603", 1), ("-0.658047292653547382", 1)),
    (("-34.87065786149660974",), (0, 0, 1), ("-1.2", 1), ("-0.666666666666666667", 1)),
    (("2.5",), (0, 0, 1), (-1, 1), ("-0.6", 1)),
)
register(ButcherTableau(
    name="tsit5",
    c=(0, F(161, 1000), F(327, 1000), F(9, 10), float(_TSIT5_C5), 1, 1),
    a=tuple(tuple(_num(_exact(x)) for x in row) for row in (*_TSIT5_A, _TSIT5_B[:6])),
    b=tuple(_num(_exact(x)) for x in _TSIT5_B),
    b_err=tuple(_num(_exact(x) - _exact(y)) for x, y in zip(_TSIT5_B, _TSIT5_BHAT)),
    order=5,
    error_order=4,
    fsal=True,
    dense=tuple(tuple(_num(x) for x in _poly(*factors)[1:]) for factors in _TSIT5_DENSE_FACTORS),
    dense_order=4,
))


# ----------------------------------------------------------------------------------------------------
# DOP853: the Dormand--Prince 8(5,3) method of Hairer's DOP853 code (Hairer, Norsett & Wanner, "Solving
# Ordinary Differential Equations I", 2nd ed., section II.10), with its seventh-order dense output.
#
# Stages, numbered from 0 as in the code: 0..11 are the 12 stages of the method, stage 12 is
# f(t + h, y1) -- Hairer's FSAL stage, whose row of ``a`` is ``b`` -- and stages 13..15 are the three
# extra stages of the dense output (c = 0.1, 0.2, 7/9), which use stage 12.  The coefficients are the
# 30-digit decimals of Hairer's code.
#
# Error estimate: DOP853 combines a fifth-order estimate err5 = h * sum_j e5_j k_j (e5 = b - b_hat5,
# with b_hat5 of order 5) and a third-order one err3 (b_hat3 of order 3) into
# err5**2 / sqrt(err5**2 + 0.01 * err3**2), which behaves like h**8.  A generic embedded-pair engine
# carries both: b_err = e5 (error_order = 5, the order of b - e5) and b_err_low = e3 = b - b_hat3, with
# b_hat3 = bhh1, bhh2, bhh3 on stages 0, 8 and 11 (Hairer's BHH1..3); the controller uses order 7
# (exponent 1/8), as DOP853 does.

_DOP853_C = (
    "0", "0.526001519587677318785587544488e-01", "0.789002279381515978178381316732e-01",
    "0.118350341907227396726757197510", "0.281649658092772603273242802490",
    "0.333333333333333333333333333333", "0.25", "0.307692307692307692307692307692",
    "0.651282051282051282051282051282", "0.6", "0.857142857142857142857142857142", "1", "1",
    "0.1", "0.2", "0.777777777777777777777777777778",
)
# Rows of the extended A (16 stages) as {column: value}; row 12 is b, rows 13..15 the dense stages.
_DOP853_A = (
    {},
    {
        0: "5.26001519587677318785587544488e-2",
    },
    {
        0: "1.97250569845378994544595329183e-2", 1: "5.91751709536136983633785987549e-2",
    },
    {
        0: "2.95875854768068491816892993775e-2", 2: "8.87627564304205475450678981324e-2",
    },
    {
        0: "2.41365134159266685502369798665e-1", 2: "-8.84549479328286085344864962717e-1",
        3: "9.24834003261792003115737966543e-1",
    },
    {
        0: "3.7037037037037037037037037037e-2", 3: "1.70828608729473871279604482173e-1",
        4: "1.25467687566822425016691814123e-1",
    },
    {
        0: "3.7109375e-2", 3: "1.70252211019544039314978060272e-1", 4: "6.02165389804559606850219397283e-2",
        5: "-1.7578125e-2",
    },
    {
        0: "3.70920001185047927108779319836e-2", 3: "1.70383925712239993810214054705e-1",
        4: "1.07262030446373284651809199168e-1", 5: "-1.53194377486244017527936158236e-2",
        6: "8.27378916381402288758473766002e-3",
    },
    {
        0: "6.24110958716075717114429577812e-1", 3: "-3.36089262944694129406857109825",
        4: "-8.68219346841726006818189891453e-1", 5: "2.75920996994467083049415600797e1",
        6: "2.01540675504778934086186788979e1", 7: "-4.34898841810699588477366255144e1",
    },
    {
        0: "4.77662536438264365890433908527e-1", 3: "-2.48811461997166764192642586468",
        4: "-5.90290826836842996371446475743e-1", 5: "2.12300514481811942347288949897e1",
        6: "1.52792336328824235832596922938e1", 7: "-3.32882109689848629194453265587e1",
        8: "-2.03312017085086261358222928593e-2",
    },
    {
        0: "-9.3714243008598732571704021658e-1", 3: "5.18637242884406370830023853209",
        4: "1.09143734899672957818500254654", 5: "-8.14978701074692612513997267357",
        6: "-1.85200656599969598641566180701e1", 7: "2.27394870993505042818970056734e1",
        8: "2.49360555267965238987089396762", 9: "-3.0467644718982195003823669022",
    },
    {
        0: "2.27331014751653820792359768449", 3: "-1.05344954667372501984066689879e1",
        4: "-2.00087205822486249909675718444", 5: "-1.79589318631187989172765950534e1",
        6: "2.79488845294199600508499808837e1", 7: "-2.85899827713502369474065508674",
        8: "-8.87285693353062954433549289258", 9: "1.23605671757943030647266201528e1",
        10: "6.43392746015763530355970484046e-1",
    },
    {
        0: "5.42937341165687622380535766363e-2", 5: "4.45031289275240888144113950566",
        6: "1.89151789931450038304281599044", 7: "-5.8012039600105847814672114227",
        8: "3.1116436695781989440891606237e-1", 9: "-1.52160949662516078556178806805e-1",
        10: "2.01365400804030348374776537501e-1", 11: "4.47106157277725905176885569043e-2",
    },
    {
        0: "5.61675022830479523392909219681e-2", 6: "2.53500210216624811088794765333e-1",
        7: "-2.46239037470802489917441475441e-1", 8: "-1.24191423263816360469010140626e-1",
        9: "1.5329179827876569731206322685e-1", 10: "8.20105229563468988491666602057e-3",
        11: "7.56789766054569976138603589584e-3", 12: "-8.298e-3",
    },
    {
        0: "3.18346481635021405060768473261e-2", 5: "2.83009096723667755288322961402e-2",
        6: "5.35419883074385676223797384372e-2", 7: "-5.49237485713909884646569340306e-2",
        10: "-1.08347328697249322858509316994e-4", 11: "3.82571090835658412954920192323e-4",
        12: "-3.40465008687404560802977114492e-4", 13: "1.41312443674632500278074618366e-1",
    },
    {
        0: "-4.28896301583791923408573538692e-1", 5: "-4.69762141536116384314449447206",
        6: "7.68342119606259904184240953878", 7: "4.06898981839711007970213554331",
        8: "3.56727187455281109270669543021e-1", 12: "-1.39902416515901462129418009734e-3",
        13: "2.9475147891527723389556272149", 14: "-9.15095847217987001081870187138",
    },
)
_DOP853_E5 = {
    0: "0.1312004499419488073250102996e-1", 5: "-0.1225156446376204440720569753e+1",
    6: "-0.4957589496572501915214079952", 7: "0.1664377182454986536961530415e+1",
    8: "-0.3503288487499736816886487290", 9: "0.3341791187130174790297318841",
    10: "0.8192320648511571246570742613e-1", 11: "-0.2235530786388629525884427845e-1",
}
_DOP853_D = (
    {
        0: "-0.84289382761090128651353491142e+1", 5: "0.56671495351937776962531783590",
        6: "-0.30689499459498916912797304727e+1", 7: "0.23846676565120698287728149680e+1",
        8: "0.21170345824450282767155149946e+1", 9: "-0.87139158377797299206789907490",
        10: "0.22404374302607882758541771650e+1", 11: "0.63157877876946881815570249290",
        12: "-0.88990336451333310820698117400e-1", 13: "0.18148505520854727256656404962e+2",
        14: "-0.91946323924783554000451984436e+1", 15: "-0.44360363875948939664310572000e+1",
    },
    {
        0: "0.10427508642579134603413151009e+2", 5: "0.24228349177525818288430175319e+3",
        6: "0.16520045171727028198505394887e+3", 7: "-0.37454675472269020279518312152e+3",
        8: "-0.22113666853125306036270938578e+2", 9: "0.77334326684722638389603898808e+1",
        10: "-0.30674084731089398182061213626e+2", 11: "-0.93321305264302278729567221706e+1",
        12: "0.15697238121770843886131091075e+2", 13: "-0.31139403219565177677282850411e+2",
        14: "-0.93529243588444783865713862664e+1", 15: "0.35816841486394083752465898540e+2",
    },
    {
        0: "0.19985053242002433820987653617e+2", 5: "-0.38703730874935176555105901742e+3",
        6: "-0.18917813819516756882830838328e+3", 7: "0.52780815920542364900561016686e+3",
        8: "-0.11573902539959630126141871134e+2", 9: "0.68812326946963000169666922661e+1",
        10: "-0.10006050966910838403183860980e+1", 11: "0.77771377980534432092869265740",
        12: "-0.27782057523535084065932004339e+1", 13: "-0.60196695231264120758267380846e+2",
        14: "0.84320405506677161018159903784e+2", 15: "0.11992291136182789328035130030e+2",
    },
    {
        0: "-0.25693933462703749003312586129e+2", 5: "-0.15418974869023643374053993627e+3",
        6: "-0.23152937917604549567536039109e+3", 7: "0.35763911791061412378285349910e+3",
        8: "0.93405324183624310003907691704e+2", 9: "-0.37458323136451633156875139351e+2",
        10: "0.10409964950896230045147246184e+3", 11: "0.29840293426660503123344363579e+2",
        12: "-0.43533456590011143754432175058e+2", 13: "0.96324553959188282948394950600e+2",
        14: "-0.39177261675615439165231486172e+2", 15: "-0.14972683625798562581422125276e+3",
    },
)
_DOP853_S = 13  # main stages: 12 + the FSAL stage


def _dop853_row(i: int) -> list[Fraction]:
    return [_exact(_DOP853_A[i].get(j, 0)) for j in range(i)]


def _dop853_dense() -> tuple[tuple[Number, ...], ...]:
    """Hairer's contd8 interpolant, expanded into the ``P`` matrix over all 16 stages.

    DOP853 writes the interpolant in nested form,

        y(t0 + theta h) = y0 + theta (r1 + theta1 (r2 + theta (r3 + theta1 (r4 + theta (r5
                               + theta1 (r6 + theta r7)))))),          theta1 = 1 - theta,

    with r1 = y1 - y0 = h sum b_j k_j, r2 = h k_0 - r1, r3 = 2 r1 - h (k_0 + k_12) and
    r4..r7 = h sum_j d_{4..7, j} k_j.  So b_j(theta) = sum_m w_m[j] q_m(theta) with
    q_m = theta**(m // 2 + 1) * (1 - theta)**((m + 1) // 2).
    """
    n = len(_DOP853_C)
    b = _dop853_row(_DOP853_S - 1) + [Fraction(0)] * (n - _DOP853_S + 1)
    e0 = [Fraction(int(j == 0)) for j in range(n)]
    e12 = [Fraction(int(j == _DOP853_S - 1)) for j in range(n)]
    weights = [
        b,
        [x - y for x, y in zip(e0, b)],
        [2 * x - y - z for x, y, z in zip(b, e0, e12)],
        *([_exact(d.get(j, 0)) for j in range(n)] for d in _DOP853_D),
    ]
    basis = [_poly(*[(0, 1)] * (m // 2 + 1), *[(1, -1)] * ((m + 1) // 2)) for m in range(len(weights))]
    return _dense_matrix(weights, basis)


_DOP853_BHH = {0: "0.244094488188976377952755905512", 8: "0.733846688281611857341361741547",
               11: "0.220588235294117647058823529412e-01"}


def _dop853_e3() -> tuple:
    b = list(_dop853_row(_DOP853_S - 1)) + [0]
    return tuple(_num(_exact(b[j]) - _exact(_DOP853_BHH.get(j, 0))) for j in range(_DOP853_S))


register(ButcherTableau(
    name="dopri8",
    c=tuple(_num(_exact(x)) for x in _DOP853_C[:_DOP853_S]),
    a=tuple(tuple(_num(x) for x in _dop853_row(i)) for i in range(_DOP853_S)),
    b=tuple(_num(x) for x in _dop853_row(_DOP853_S - 1)) + (0,),
    b_err=tuple(_num(_exact(_DOP853_E5.get(j, 0))) for j in range(_DOP853_S)),
    b_err_low=_dop853_e3(),
    control_order=7,
    order=8,
    error_order=5,
    fsal=True,
    dense=_dop853_dense(),
    dense_order=7,
    extra_c=tuple(_num(_exact(x)) for x in _DOP853_C[_DOP853_S:]),
    extra_a=tuple(tuple(_num(x) for x in _dop853_row(i)) for i in range(_DOP853_S, len(_DOP853_C))),
))
