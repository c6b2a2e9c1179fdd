"""Derive the coefficients of neurodyn's float64 ``tanh`` formula (``compile/patches.py``, ``_TANH_DIF64`` and
``_TANH_DEN64``): a rational fit ``tanh(h) / h ~ P(h^2) / Q(h^2)`` on ``[0, A]`` with ``P(0) = Q(0) = 1``, both of
degree ``M`` in ``h^2``, near-minimax in relative error. The formula uses ``Q`` and ``D = (P - Q) / h^2`` (degree
``M - 1``), so that ``P / Q - 1 = h^2 D / Q`` comes without cancellation.

Method, in 40-digit arithmetic (mpmath): a linearised least-squares fit of ``P - f Q`` divided by ``f`` times the
previous iterate's ``Q`` (Loeb's iteration), with Lawson's reweighting (each point's weight times its absolute error)
driving the weighted fit towards the minimax one; nodes Chebyshev-spaced in ``h`` over ``[0, A]``; the iterate with the
smallest maximum error on the nodes is kept. Prints that error; the relative error, on a finer grid (``h`` spaced ``A /
4000``), of ``tanh(2 h) = 2 t / (1 + t^2)`` with ``t = h (1 + h^2 D / Q)`` evaluated exactly from the coefficients
rounded to float64 (the formula's rounding of each operation left out); and ``D`` and ``Q`` as Python literals. ~1-2
minutes on one core::

    python benchmarks/fit_tanh_float64.py --degree 8 --half-range 9.55
"""

from __future__ import annotations

import argparse

import mpmath as mp


def fit(degree: int, half_range: float, iterations: int = 25) -> tuple[list, list, mp.mpf]:
    """``(p, q, max relative error on the nodes)``: coefficients of ``P`` and ``Q`` in powers of ``h^2``, constant
    term first (both 1)."""
    m, a = degree, mp.mpf(half_range)
    scale = a * a  # fitted in u = h^2 / A^2 in [0, 1]; the coefficients are rescaled at the end
    n_nodes = 60 * m
    hs = [a * (1 - mp.cos(mp.pi * (i + mp.mpf(1) / 2) / n_nodes)) / 2 for i in range(n_nodes)]
    us = [h * h / scale for h in hs]
    fs = [mp.tanh(h) / h for h in hs]
    weights = [mp.mpf(1)] * n_nodes
    q_prev = [mp.mpf(1)] * n_nodes
    best = None
    for _ in range(iterations):
        # normal equations of sum_i w_i ((P(u_i) - f_i Q(u_i)) / (f_i Q_prev(u_i)))^2 in p_1..p_m, q_1..q_m
        gram, rhs = mp.zeros(2 * m, 2 * m), mp.zeros(2 * m, 1)
        for u, f, w, qp in zip(us, fs, weights, q_prev):
            row = [u ** k for k in range(1, m + 1)] + [-f * u ** k for k in range(1, m + 1)]
            scale_i = w / (f * qp) ** 2
            for i in range(2 * m):
                rhs[i] += scale_i * row[i] * (f - 1)
                for j in range(2 * m):
                    gram[i, j] += scale_i * row[i] * row[j]
        sol = mp.lu_solve(gram, rhs)
        p = [mp.mpf(1)] + [sol[k] for k in range(m)]
        q = [mp.mpf(1)] + [sol[m + k] for k in range(m)]
        q_prev = [mp.polyval(q[::-1], u) for u in us]
        errors = [(mp.polyval(p[::-1], u) / qv - f) / f for u, f, qv in zip(us, fs, q_prev)]
        worst = max(abs(e) for e in errors)
        if best is None or worst < best[2]:
            best = ([c / scale ** k for k, c in enumerate(p)], [c / scale ** k for k, c in enumerate(q)], worst)
        total = sum(w * abs(e) for w, e in zip(weights, errors))
        weights = [w * abs(e) / total for w, e in zip(weights, errors)]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--degree", type=int, default=8, help="degree M of P and Q in h^2")
    parser.add_argument("--half-range", type=float, default=9.55, help="fit on [0, A]")
    args = parser.parse_args()
    mp.mp.dps = 40
    p, q, worst = fit(args.degree, args.half_range)
    d64 = [float(pk - qk) for pk, qk in zip(p[1:], q[1:])]
    q64 = [float(c) for c in q]
    d_mp, q_mp = [mp.mpf(c) for c in d64[::-1]], [mp.mpf(c) for c in q64[::-1]]
    worst64 = mp.mpf(0)
    for i in range(4000):
        h = mp.mpf(args.half_range) * (i + 1) / 4000
        t = h * (1 + h * h * mp.polyval(d_mp, h * h) / mp.polyval(q_mp, h * h))
        worst64 = max(worst64, abs(2 * t / (1 + t * t) / mp.tanh(2 * h) - 1))
    print(f"max relative error of tanh(h) / h: {mp.nstr(worst, 4)} on the nodes; of tanh(2 h) with float64 "
          f"coefficients: {mp.nstr(worst64, 4)}")
    print("_TANH_DIF64 = (" + ", ".join(repr(c) for c in d64) + ")")
    print("_TANH_DEN64 = (" + ", ".join(repr(c) for c in q64) + ")")


if __name__ == "__main__":
    main()
