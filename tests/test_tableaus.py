"""Independent checks of every Butcher tableau in ``neurodyn.solvers.tableaus``.

* consistency (row sums, weights, FSAL structure);
* the rooted-tree order conditions, generated here from scratch (Butcher's elementary weights
  ``Phi(t)`` and densities ``gamma(t)``), for the propagated weights, the embedded weights and the
  continuous extensions -- exactly (Fractions) for rational tableaus;
* the dense outputs against independent formulations (Hairer's nested DOPRI5 form, Tsitouras' factored
  polynomials, scipy's DOP853 interpolant);
* empirical convergence of a small stepper driven by the tableaus, run in 40-digit decimal arithmetic
  against closed-form solutions (global error, error estimate, dense output), and one double-precision
  step of DOP853 against scipy's.
"""

from __future__ import annotations

import math
import sys
from decimal import Decimal, localcontext
from fractions import Fraction
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from scipy.integrate import DOP853

try:
    from neurodyn.solvers.tableaus import TABLEAUS, ButcherTableau
except ImportError:  # not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from neurodyn.solvers.tableaus import TABLEAUS, ButcherTableau

# name: (order, error_order, fsal, dense_order or None when the method has no continuous extension)
EXPECTED = {
    "euler": (1, None, False, None),
    "midpoint": (2, None, False, None),
    "heun2": (2, None, False, None),
    "ralston": (2, None, False, None),
    "heun3": (3, None, False, None),
    "rk4": (4, None, False, None),
    "adaptive_heun": (2, 1, False, None),
    "fehlberg2": (2, 1, False, None),
    "bosh3": (3, 2, True, None),
    "dopri5": (5, 4, True, 4),
    "tsit5": (5, 4, True, 4),
    "dopri8": (8, 5, True, 7),
    # torchdiffeq's variants (compat.torchdiffeq): Shampine's error estimate; quartic dense outputs through a midpoint
    # estimate (fehlberg2's and adaptive_heun's reuse their last stage, which the stepper runs as FSAL).
    "dopri5_shampine": (5, 4, True, 4),
    "bosh3_torchdiffeq": (3, 2, True, 1),
    "fehlberg2_torchdiffeq": (2, 1, False, 1),
    "adaptive_heun_torchdiffeq": (2, 1, False, 1),
}
NAMES = sorted(EXPECTED)
DENSE_NAMES = [name for name in NAMES if EXPECTED[name][3] is not None]
ADAPTIVE_NAMES = [name for name in NAMES if EXPECTED[name][1] is not None]


# ----------------------------------------------------------------------------------------------------
# Rooted trees.  A tree is the sorted tuple of its root's subtrees; the single node is ().


def _graft(tree: tuple) -> list[tuple]:
    """All trees obtained from ``tree`` by attaching one new leaf to one of its nodes."""
    out = [tuple(sorted((*tree, ())))]
    for i, child in enumerate(tree):
        for new_child in _graft(child):
            out.append(tuple(sorted((*tree[:i], new_child, *tree[i + 1:]))))
    return out


@cache
def trees_of_order(n: int) -> tuple[tuple, ...]:
    if n == 1:
        return ((),)
    return tuple(sorted({t for smaller in trees_of_order(n - 1) for t in _graft(smaller)}))


def tree_order(tree: tuple) -> int:
    return 1 + sum(tree_order(child) for child in tree)


def gamma(tree: tuple) -> int:
    return tree_order(tree) * math.prod(gamma(child) for child in tree)


def sigma(tree: tuple) -> int:
    """Order of the symmetry group of ``tree``."""
    out = 1
    for child in set(tree):
        m = tree.count(child)
        out *= math.factorial(m) * sigma(child) ** m
    return out


def test_tree_generator():
    # Number of rooted trees with n nodes (OEIS A000081).
    assert [len(trees_of_order(n)) for n in range(1, 9)] == [1, 1, 2, 4, 9, 20, 48, 115]
    assert sum(len(trees_of_order(n)) for n in range(1, 9)) == 200
    for n in range(1, 9):
        ts = trees_of_order(n)
        assert all(tree_order(t) == n for t in ts)
        # The monotone labellings of all trees of order n number (n-1)!: sum_t n!/(gamma(t) sigma(t)).
        assert sum(Fraction(math.factorial(n), gamma(t) * sigma(t)) for t in ts) == math.factorial(n - 1)
    tall, bushy = ((((),),),), ((), (), ())
    assert gamma(tall) == 24 and gamma(bushy) == 4


# ----------------------------------------------------------------------------------------------------
# Tableau algebra, exact when every coefficient is rational.


def _is_exact(tab: ButcherTableau) -> bool:
    values = [*tab.c, *tab.b, *(x for row in tab.a for x in row)]
    values += [*(tab.b_err or ()), *tab.extra_c, *(x for row in tab.extra_a for x in row)]
    values += [x for row in (tab.dense or ()) for x in row]
    return all(isinstance(x, (int, Fraction)) for x in values)


class Algebra:
    """Elementary weights of a tableau, extended with its dense-only stages (square A)."""

    def __init__(self, tab: ButcherTableau):
        self.exact = _is_exact(tab)
        conv = Fraction if self.exact else float
        n = tab.stages + len(tab.extra_c)
        rows = [*tab.a, *tab.extra_a]
        self.s, self.n = tab.stages, n
        self.A = [[conv(row[j]) if j < len(row) else conv(0) for j in range(n)] for row in rows]
        self.b = [conv(x) for x in tab.b] + [conv(0)] * (n - tab.stages)
        self.b_hat = None
        if tab.b_err is not None:
            self.b_hat = [conv(x) - conv(e) for x, e in zip(tab.b, tab.b_err)] + [conv(0)] * (n - self.s)
        self.P = None if tab.dense is None else [[conv(x) for x in row] for row in tab.dense]
        self._phi: dict[tuple, tuple[list, list]] = {}

    def phi(self, tree: tuple) -> tuple[list, list]:
        """Stage vector Phi_j(t) and the same with |A| (for the rounding-error scale)."""
        if tree not in self._phi:
            val, mag = [1] * self.n, [1.0] * self.n
            for child in tree:
                cv, cm = self.phi(child)
                val = [v * sum(a * x for a, x in zip(row, cv)) for v, row in zip(val, self.A)]
                mag = [m * sum(abs(float(a)) * x for a, x in zip(row, cm)) for m, row in zip(mag, self.A)]
            self._phi[tree] = (val, mag)
        return self._phi[tree]

    def dense_weights(self, theta):
        return [sum(p * theta ** (m + 1) for m, p in enumerate(row)) for row in self.P]

    def residual(self, weights, tree: tuple, theta=1):
        """(sum_j w_j Phi_j(t) - theta^|t| / gamma(t), rounding scale)."""
        val, mag = self.phi(tree)
        res = sum(w * v for w, v in zip(weights, val)) - Fraction(1, gamma(tree)) * theta ** tree_order(tree)
        scale = sum(abs(float(w)) * m for w, m in zip(weights, mag))
        return res, scale

    def satisfies(self, weights, order: int, theta=1) -> bool:
        """Whether all conditions up to ``order`` hold (exactly, or to rounding error)."""
        for n in range(1, order + 1):
            for tree in trees_of_order(n):
                res, scale = self.residual(weights, tree, theta)
                if self.exact and isinstance(theta, (int, Fraction)):
                    if res != 0:
                        return False
                elif abs(float(res)) > 64 * 2.0**-52 * max(1.0, scale):
                    return False
        return True


@cache
def algebra(name: str) -> Algebra:
    return Algebra(TABLEAUS[name])


# ----------------------------------------------------------------------------------------------------
# Structure and consistency.


def test_registry():
    assert set(TABLEAUS) == set(EXPECTED)
    for name, (order, error_order, fsal, dense_order) in EXPECTED.items():
        tab = TABLEAUS[name]
        assert tab.name == name
        assert (tab.order, tab.error_order, tab.fsal) == (order, error_order, fsal)
        assert tab.adaptive == (error_order is not None)
        assert (tab.dense is not None) == (dense_order is not None)
        if dense_order is not None:
            assert tab.dense_order == dense_order


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_consistency(name):
    tab = TABLEAUS[name]
    s = tab.stages
    assert len(tab.a) == s and len(tab.b) == s
    assert all(len(row) == i for i, row in enumerate(tab.a))
    assert tab.c[0] == 0
    assert len(tab.extra_c) == len(tab.extra_a)
    assert all(len(row) == s + i for i, row in enumerate(tab.extra_a))
    for ci, row in zip([*tab.c, *tab.extra_c], [*tab.a, *tab.extra_a]):
        assert math.fsum(float(x) for x in row) == pytest.approx(float(ci), abs=1e-14)
        if _is_exact(tab):
            assert sum(row) == ci
    assert math.fsum(float(x) for x in tab.b) == pytest.approx(1.0, abs=1e-14)
    if tab.b_err is not None:
        assert len(tab.b_err) == s
        assert abs(math.fsum(float(x) for x in tab.b_err)) <= 1e-14
        assert any(x != 0 for x in tab.b_err)
    if tab.fsal:  # the last stage is f(t0 + h, y1)
        assert tab.c[-1] == 1 and tab.b[-1] == 0
        assert list(tab.a[-1]) == list(tab.b[:-1])
    if tab.dense is not None:
        assert len(tab.dense) == s + len(tab.extra_c)
        assert len({len(row) for row in tab.dense}) == 1


# ----------------------------------------------------------------------------------------------------
# Order conditions.


@pytest.mark.parametrize("name", NAMES)
def test_order_conditions(name):
    tab, alg = TABLEAUS[name], algebra(name)
    assert alg.satisfies(alg.b, tab.order), f"{name}: b is not of order {tab.order}"
    assert not alg.satisfies(alg.b, tab.order + 1), f"{name}: b is of order {tab.order + 1}"


@pytest.mark.parametrize("name", ADAPTIVE_NAMES)
def test_embedded_order_conditions(name):
    tab, alg = TABLEAUS[name], algebra(name)
    assert alg.satisfies(alg.b_hat, tab.error_order)
    assert not alg.satisfies(alg.b_hat, tab.error_order + 1)


def test_dop853_third_order_estimate():
    """DOP853's other embedded formula (b_hat3: the weights of k_0, k_8, k_11 subtracted from b in
    Hairer's code) is of order 3 only -- the fifth-order e5 is the better single estimate."""
    alg = algebra("dopri8")
    b_hat3 = [0.0] * alg.n
    b_hat3[0], b_hat3[8], b_hat3[11] = (
        0.244094488188976377952755905512, 0.733846688281611857341361741547, 0.220588235294117647058823529412e-1
    )
    assert alg.satisfies(b_hat3, 3) and not alg.satisfies(b_hat3, 4)
    # The tableau carries it as the second (combined) estimate: b - b_err_low is this b_hat3.
    tab = TABLEAUS["dopri8"]
    from_tableau = [float(b) - float(e) for b, e in zip(tab.b, tab.b_err_low)] + [0.0] * (alg.n - len(tab.b))
    assert max(abs(x - y) for x, y in zip(from_tableau, b_hat3)) < 1e-15
    assert tab.controller_order == 7


# ----------------------------------------------------------------------------------------------------
# Dense output.

THETAS = (0.13, 0.37, 0.5, 0.81)


@pytest.mark.parametrize("name", DENSE_NAMES)
def test_dense_endpoints(name):
    alg = algebra(name)
    for bj, wj, row in zip(alg.b, alg.dense_weights(1), alg.P):
        # to rounding: the monomial coefficients of DOP853's interpolant reach ~500 and cancel
        tol = max(1e-14, 16 * 2.0**-52 * sum(abs(float(p)) for p in row))
        assert float(wj) == pytest.approx(float(bj), abs=tol)
    assert all(w == 0 for w in alg.dense_weights(0))
    if alg.exact:
        assert alg.dense_weights(Fraction(1)) == alg.b


@pytest.mark.parametrize("name", DENSE_NAMES)
def test_dense_order_conditions(name):
    tab, alg = TABLEAUS[name], algebra(name)
    for theta in THETAS:
        weights = alg.dense_weights(theta)
        assert alg.satisfies(weights, tab.dense_order, theta), f"{name} at theta={theta}"
        assert not alg.satisfies(weights, tab.dense_order + 1, theta)
    if alg.exact:
        for theta in (Fraction(1, 3), Fraction(37, 100)):
            assert alg.satisfies(alg.dense_weights(theta), tab.dense_order, theta)


def test_dopri5_dense_matches_hairer_contd5():
    """Hairer's DOPRI5 writes the same interpolant as y0 + theta (r1 + theta1 (r2 + theta (r3 +
    theta1 r4))) with r1 = y1 - y0, r2 = h k0 - r1, r3 = r1 - h k6 - r2, r4 = h sum d_j k_j."""
    F = Fraction
    d = [F(-12715105075, 11282082432), 0, F(87487479700, 32700410799), F(-10690763975, 1880347072),
         F(701980252875, 199316789632), F(-1453857185, 822651844), F(69997945, 29380423)]
    alg = algebra("dopri5")
    assert alg.exact
    for theta in (F(1, 7), F(37, 100), F(1, 2), F(9, 10)):
        t1 = 1 - theta
        expected = []
        for j in range(7):
            e0, e6 = int(j == 0), int(j == 6)
            r1 = alg.b[j]
            r2 = e0 - r1
            r3 = r1 - e6 - r2
            expected.append(theta * (r1 + t1 * (r2 + theta * (r3 + t1 * d[j]))))
        assert alg.dense_weights(theta) == expected


def test_tsit5_dense_matches_factored_polynomials():
    """Tsitouras (2011) gives b_j(theta) in factored form; evaluate it directly."""
    def factored(t):
        return [
            -1.0530884977290216 * t * (t - 1.3299890189751412) * (t**2 - 1.4364028541716351 * t
                                                                  + 0.7139816917074209),
            0.1017 * t**2 * (t**2 - 2.1966568338249754 * t + 1.2949852507374631),
            2.490627285651252793 * t**2 * (t**2 - 2.38535645472061657 * t + 1.57803468208092486),
            -16.54810288924490272 * (t - 1.21712927295533244) * (t - 0.61620406037800089) * t**2,
            47.37952196281928122 * (t - 1.203071208372362603) * (t - 0.658047292653547382) * t**2,
            -34.87065786149660974 * (t - 1.2) * (t - 0.666666666666666667) * t**2,
            2.5 * (t - 1) * (t - 0.6) * t**2,
        ]
    alg = algebra("tsit5")
    for theta in (*THETAS, 1.0):
        np.testing.assert_allclose(
            [float(w) for w in alg.dense_weights(theta)], factored(theta), rtol=0, atol=1e-13
        )


# A small stepper driven by the tableaus.  The convergence tests run it in 40-digit decimal arithmetic
# against closed-form solutions, so that rounding does not hide the asymptotic rates (Tsitouras' method
# is so accurate on y' = y that in double precision its fifth-order error only emerges near 1e-13); the
# only floor left is the rounding of the float coefficients themselves (~1e-15).

PREC = 40
FLOOR = 1e-16  # measured errors must stay above the effect of the float coefficients' rounding


def to_decimal(x) -> Decimal:
    if isinstance(x, Fraction):
        return Decimal(x.numerator) / Decimal(x.denominator)
    return Decimal(x)  # exact for int and float


def rk_step(tab: ButcherTableau, f, t, y, h, conv=float, extra=False):
    """One step; returns (y1, stages), with the dense-only stages appended when ``extra``."""
    rows = [*tab.a, *(tab.extra_a if extra else ())]
    cs = [*tab.c, *(tab.extra_c if extra else ())]
    ks = []

    def stage(ci, row):
        return f(t + conv(ci) * h, y + h * sum(conv(aij) * kj for aij, kj in zip(row, ks)))

    for ci, row in zip(cs[: tab.stages], rows):
        ks.append(stage(ci, row))
    y1 = y + h * sum(conv(bj) * kj for bj, kj in zip(tab.b, ks))
    for ci, row in zip(cs[tab.stages:], rows[tab.stages:]):
        ks.append(stage(ci, row))
    return y1, ks


def dense_eval(tab: ButcherTableau, y0, h, ks, theta, conv=float):
    weights = [sum(conv(p) * theta ** (m + 1) for m, p in enumerate(row)) for row in tab.dense]
    return y0 + h * sum(w * k for w, k in zip(weights, ks))


def slope(hs, errs):
    return np.polyfit(np.log(np.asarray(hs, dtype=float)), np.log(np.asarray(errs, dtype=float)), 1)[0]


# y' = y, y(0) = 1  and  y' = -2 t y^2, y(0) = 1 (non-autonomous, nonlinear): exact solutions.
PROBLEMS = {
    "exp": (lambda t, y: y, lambda t: t.exp()),
    "nonlinear": (lambda t, y: -2 * t * y * y, lambda t: 1 / (1 + t * t)),
}
T_END = 2
# Numbers of steps on [0, T_END] per (order, problem): in the asymptotic range, above the ~1e-15 floor.
STEPS = {
    1: ((64, 128, 256), (64, 128, 256)),
    2: ((32, 64, 128), (32, 64, 128)),
    3: ((32, 64, 128), (32, 64, 128)),
    4: ((32, 64, 128), (32, 64, 128)),
    5: ((64, 96, 128, 192), (64, 96, 128, 192)),
    8: ((4, 6, 8, 12), (8, 12, 16, 24)),
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("name", NAMES)
def test_empirical_order(name, problem):
    """The global error at t = 2 of the fixed-step method falls like h^order."""
    tab = TABLEAUS[name]
    f, exact = PROBLEMS[problem]
    ns = STEPS[tab.order][problem == "nonlinear"]
    errs = []
    with localcontext(prec=PREC):
        for n in ns:
            h, y = Decimal(T_END) / n, Decimal(1)
            for i in range(n):
                y, _ = rk_step(tab, f, i * h, y, h, conv=to_decimal)
            errs.append(abs(y - exact(Decimal(T_END))))
    assert min(errs) > FLOOR, errs
    assert slope([T_END / n for n in ns], errs) == pytest.approx(tab.order, abs=0.3), errs


@pytest.mark.parametrize("name", ADAPTIVE_NAMES)
def test_empirical_error_estimate(name):
    """The local error estimate h * sum_j b_err_j k_j of one step falls like h^(error_order + 1)."""
    tab = TABLEAUS[name]
    f, _ = PROBLEMS["nonlinear"]
    hs = [Decimal(2) ** -k for k in ((4, 5, 6, 7) if tab.error_order >= 4 else (6, 7, 8, 9))]
    ests = []
    with localcontext(prec=PREC):
        for h in hs:
            _, ks = rk_step(tab, f, Decimal("0.5"), Decimal("0.8"), h, conv=to_decimal)
            ests.append(abs(h * sum(to_decimal(e) * k for e, k in zip(tab.b_err, ks))))
    assert min(ests) > FLOOR, ests
    assert slope(hs, ests) == pytest.approx(tab.error_order + 1, abs=0.3), ests


# Step sizes 2^-k per (dense_order, problem), in the asymptotic range and above the rounding floor.
DENSE_STEPS = {1: ((3, 4, 5, 6), (3, 4, 5, 6)), 4: ((3, 4, 5, 6), (3, 4, 5, 6)), 7: ((0, 1, 2, 3), (2, 3, 4, 5))}


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("name", DENSE_NAMES)
def test_empirical_dense_order(name, problem):
    """From the exact y0, the interpolant at theta = 0.37 errs by O(h^(dense_order + 1))."""
    tab = TABLEAUS[name]
    f, exact = PROBLEMS[problem]
    hs = [Decimal(2) ** -k for k in DENSE_STEPS[tab.dense_order][problem == "nonlinear"]]
    errs = []
    with localcontext(prec=PREC):
        theta = Decimal("0.37")
        for h in hs:
            _, ks = rk_step(tab, f, Decimal(0), Decimal(1), h, conv=to_decimal, extra=True)
            errs.append(abs(dense_eval(tab, Decimal(1), h, ks, theta, conv=to_decimal) - exact(theta * h)))
    assert min(errs) > FLOOR, errs
    assert slope(hs, errs) >= tab.dense_order + 1 - 0.3, errs


def test_dopri8_matches_scipy_dop853():
    """One double-precision step of dopri8 reproduces scipy's DOP853 step and its dense output (which
    scipy evaluates in Hairer's nested contd8 form)."""
    tab = TABLEAUS["dopri8"]

    def f(t, y):
        return np.array([y[1], -np.sin(y[0]) + 0.3 * np.cos(t)])

    y0, h = np.array([0.8, -0.4]), 0.7
    solver = DOP853(f, 0.0, y0, 10.0, first_step=h, max_step=h, rtol=1e3, atol=1e3)
    solver.step()
    assert solver.t == pytest.approx(h, abs=1e-15)
    interp = solver.dense_output()
    y1, ks = rk_step(tab, f, 0.0, y0, h, extra=True)
    np.testing.assert_allclose(y1, solver.y, rtol=0, atol=1e-15)
    for theta in (0.0, *THETAS, 1.0):
        # to rounding: the monomial form cancels coefficients of size ~500
        np.testing.assert_allclose(dense_eval(tab, y0, h, ks, theta), interp(theta * h), rtol=0, atol=1e-12)
