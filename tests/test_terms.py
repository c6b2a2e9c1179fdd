"""Terms (ODETerm, ControlTerm, MultiTerm, SplitTerm, AdjointTerm) and the LinearPath control path.

Truths: numpy's linear interpolation; the closed form of linear CDEs (a product of matrix exponentials over the
pieces of a piecewise-linear control) and its autograd gradient; central finite differences of the solve;
the whole-field symplectic trajectories; the adjoint field written out for a linear system.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import neurodyn
from neurodyn import ControlTerm, InputError, LinearPath, MultiTerm, ODETerm, SplitTerm, Term
from neurodyn.core.term import AdjointTerm

D = torch.float64


def _data(B=2, T=5, C=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = torch.tensor([0.0, 0.4, 1.1, 1.5, 2.3, 3.0, 3.2][:T], dtype=D)
    xs = torch.randn(B, T, C, generator=g, dtype=D)
    return ts, xs


def _matrices(C=2, d=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.6 * torch.randn(C, d, d, generator=g, dtype=D)


class LinearField(nn.Module):
    """f(t, h) = [A_c h]_c: shape (B, d) -> (B, d, C)."""

    def __init__(self, As):
        super().__init__()
        self.A = nn.Parameter(As.clone())

    def forward(self, t, h):
        return torch.einsum("cij,bj->bic", self.A, h)


def exact_cde(As, ts, xs, h0, t_out):
    """dh = sum_c A_c h dX_c with X piecewise linear: on each piece dh/dt = (sum_c A_c slope_c) h, so h is a
    product of matrix exponentials. Differentiable in As, xs, h0. Returns (len(t_out), B, d)."""
    slopes = (xs[:, 1:] - xs[:, :-1]) / (ts[1:] - ts[:-1]).view(1, -1, 1)
    M = torch.einsum("bkc,cij->bkij", slopes, As)
    knots = ts.tolist()
    out = []
    for t in t_out:
        h = h0
        for k in range(len(knots) - 1):
            dt = min(t, knots[k + 1]) - knots[k]
            if dt <= 0:
                break
            h = (torch.linalg.matrix_exp(M[:, k] * dt) @ h.unsqueeze(-1)).squeeze(-1)
        out.append(h)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# LinearPath
# ----------------------------------------------------------------------------------------------
def test_linear_path_matches_numpy_interp():
    ts, xs = _data(B=3, T=6, C=2)
    X = LinearPath(ts, xs)
    tn, xn = ts.numpy(), xs.numpy()
    for t in [0.0, 0.2, 0.4, 0.9, 1.5, 2.0, 2.999, 3.0]:
        want = np.stack([[np.interp(t, tn, xn[b, :, c]) for c in range(2)] for b in range(3)])
        np.testing.assert_allclose(X.evaluate(torch.tensor(t, dtype=D)).numpy(), want, rtol=0, atol=1e-14)
    # Slopes: the piece containing t; on an interior knot the piece starting there; outside, the end pieces.
    for t, k in [(0.1, 0), (0.4, 1), (1.0, 1), (2.9, 4), (3.0, 4), (-1.0, 0), (5.0, 4)]:
        want = (xn[:, k + 1] - xn[:, k]) / (tn[k + 1] - tn[k])
        np.testing.assert_allclose(X.derivative(torch.tensor(t, dtype=D)).numpy(), want, rtol=1e-13, atol=1e-13)
    inc = X.increment(0.3, 2.7).numpy()
    want = np.stack([[np.interp(2.7, tn, xn[b, :, c]) - np.interp(0.3, tn, xn[b, :, c]) for c in range(2)]
                     for b in range(3)])
    np.testing.assert_allclose(inc, want, atol=1e-14)
    assert X.knots == tuple(ts.tolist())
    # Linear extrapolation outside [ts[0], ts[-1]].
    x_out = X.evaluate(4.0).numpy()
    np.testing.assert_allclose(x_out, xn[:, -1] + (xn[:, -1] - xn[:, -2]) / (tn[-1] - tn[-2]) * 1.0, atol=1e-13)


@pytest.mark.parametrize("ts, xs, match", [
    (torch.tensor([0.0, 1.0, 1.0], dtype=D), torch.zeros(3, 1, dtype=D), "strictly increasing"),
    (torch.tensor([0.0, 1.0], dtype=D), torch.zeros(3, 1, dtype=D), r"\(\.\.\., T, channels\)"),
    (torch.tensor([0.0, 1.0], dtype=D), torch.zeros(2, dtype=D), r"\(\.\.\., T, channels\)"),
    (torch.tensor([0.0, 1.0], dtype=D, requires_grad=True), torch.zeros(2, 1, dtype=D), "ts.detach"),
    (torch.tensor([0.0], dtype=D), torch.zeros(1, 1, dtype=D), "at least 2"),
])
def test_linear_path_rejects_bad_input(ts, xs, match):
    with pytest.raises(InputError, match=match):
        LinearPath(ts, xs)


# ----------------------------------------------------------------------------------------------
# vf / contr / prod
# ----------------------------------------------------------------------------------------------
def test_vf_contr_prod_agree_with_the_ode_form():
    ts, xs = _data()
    As = _matrices()
    f = LinearField(As)
    X = LinearPath(ts, xs)
    cterm = ControlTerm(f, X)
    y = torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=D)
    t0, t1 = 0.5, 0.9  # inside one piece: X(t1) - X(t0) = dX/dt (t1 - t0) exactly
    tt = torch.tensor(0.7, dtype=D)
    dX = cterm.contr(t0, t1)
    assert dX.shape == (2, 2)
    torch.testing.assert_close(cterm.vf_prod(tt, y, dX), cterm.ode(tt, y) * (t1 - t0), rtol=1e-14, atol=1e-14)
    # prod is the matrix-vector product per state row: sum_c A_c y dX_c.
    want = torch.einsum("cij,bj,bc->bi", As, y, xs[:, 2] - xs[:, 1]) * (t1 - t0) / (ts[2] - ts[1])
    torch.testing.assert_close(cterm.vf_prod(tt, y, dX), want, rtol=1e-13, atol=1e-14)
    oterm = ODETerm(lambda t, y: -2.0 * y)
    assert oterm.contr(t0, t1) == pytest.approx(0.4)
    torch.testing.assert_close(oterm.vf_prod(tt, y, oterm.contr(t0, t1)), -0.8 * y)
    multi = MultiTerm(oterm, cterm)
    assert multi.kinds == {"ode", "control"}
    torch.testing.assert_close(multi.vf_prod(tt, y, multi.contr(t0, t1)), -0.8 * y + want, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(multi.ode(tt, y), -2.0 * y + cterm.ode(tt, y))
    assert multi.knots == tuple(ts.tolist())


def test_control_term_rejects_wrong_channels():
    ts, xs = _data(C=2)
    term = ControlTerm(lambda t, h: torch.stack([h, h, h], -1), LinearPath(ts, xs))  # 3 channels, path has 2
    with pytest.raises(InputError, match="channels = 2"):
        neurodyn.solve(term, torch.ones(2, 2, dtype=D), ts)


# ----------------------------------------------------------------------------------------------
# Controlled differential equations: closed forms
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, kw, tol", [
    ("dopri5", {"rtol": 1e-10, "atol": 1e-12}, 1e-8),
    ("tsit5", {"rtol": 1e-10, "atol": 1e-12}, 1e-8),
    ("dopri8", {"rtol": 1e-11, "atol": 1e-13}, 1e-9),
    ("radau", {"rtol": 1e-9, "atol": 1e-11}, 1e-7),
    ("bdf", {"rtol": 1e-9, "atol": 1e-11}, 1e-6),
    ("rk4", {"step_size": 0.01}, 2e-6),
])
def test_scalar_linear_cde_closed_form(method, kw, tol):
    """dh = A h dX, X scalar and piecewise linear: h(t) = expm(A (X(t) - X(0))) h0, at knots and between."""
    ts, xs = _data(B=3, T=6, C=1)
    A = torch.tensor([[-0.3, 1.2], [-1.0, 0.1]], dtype=D)
    h0 = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]], dtype=D)
    X = LinearPath(ts, xs)
    term = ControlTerm(lambda t, h: (h @ A.T).unsqueeze(-1), X)
    t_out = torch.tensor([0.0, 0.25, 0.4, 1.3, 2.3, 2.5, 3.0], dtype=D)
    sol = neurodyn.solve(term, h0, t_out, method=method, **kw)
    for i, t in enumerate(t_out.tolist()):
        dX = X.evaluate(t) - X.evaluate(0.0)  # (3, 1)
        exact = torch.stack([torch.linalg.matrix_exp(A * dX[b, 0]) @ h0[b] for b in range(3)])
        torch.testing.assert_close(sol.ys[i], exact, rtol=tol, atol=tol)


def test_multichannel_cde_lands_on_knots():
    """Two non-commuting channels: the exact solution is a product of matrix exponentials over the pieces. The
    knots are landed on, so an adaptive method pays no rejected steps at the kinks of X."""
    ts, xs = _data(B=2, T=6, C=2)
    As = _matrices()
    h0 = torch.tensor([[1.0, 0.5], [-0.2, 1.0]], dtype=D)
    t_out = torch.linspace(0, 3.0, 7, dtype=D)
    sol = neurodyn.solve(ControlTerm(LinearField(As), LinearPath(ts, xs)), h0, t_out, rtol=1e-10, atol=1e-12)
    exact = exact_cde(As, ts, xs, h0, t_out.tolist())
    torch.testing.assert_close(sol.ys, exact, rtol=1e-8, atol=1e-9)
    # The same field integrated without landing on the knots (its ODE form as a plain function): the kinks of X
    # cost rejected steps and accuracy.
    plain = ControlTerm(LinearField(As), LinearPath(ts, xs))
    sol2 = neurodyn.solve(plain.ode, h0, t_out, rtol=1e-10, atol=1e-12)
    err, err2 = float((sol.ys - exact).detach().abs().max()), float((sol2.ys - exact).detach().abs().max())
    assert sol2.stats["rejected"] > 2 * sol.stats["rejected"] and err2 > 5 * err


def test_multiterm_ode_plus_control_closed_form():
    """dh = -lam h dt + a h dX (scalar state per sample): h(t) = h0 exp(-lam t + a (X(t) - X(0)))."""
    ts, xs = _data(B=2, T=5, C=1)
    lam, a = 0.7, 0.9
    X = LinearPath(ts, xs)
    term = MultiTerm(ODETerm(lambda t, h: -lam * h), ControlTerm(lambda t, h: a * h.unsqueeze(-1), X))
    h0 = torch.tensor([[1.0], [2.0]], dtype=D)
    t_out = torch.tensor([0.0, 0.7, 1.5, 2.3], dtype=D)
    sol = neurodyn.solve(term, h0, t_out, method="tsit5", rtol=1e-10, atol=1e-12)
    for i, t in enumerate(t_out.tolist()):
        exact = h0 * torch.exp(-lam * t + a * (X.evaluate(t) - X.evaluate(0.0)))
        torch.testing.assert_close(sol.ys[i], exact, rtol=1e-8, atol=1e-10)


def test_odeterm_is_the_plain_field():
    f = lambda t, y: torch.stack([y[1], -torch.sin(y[0])])  # noqa: E731
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    t = torch.linspace(0, 5, 6, dtype=D)
    a = neurodyn.solve(f, y0, t, rtol=1e-8)
    b = neurodyn.solve(ODETerm(f), y0, t, rtol=1e-8)
    assert torch.equal(a.ys, b.ys) and a.stats["nfe"] == b.stats["nfe"]


# ----------------------------------------------------------------------------------------------
# Gradients of a CDE: w.r.t. h0, the vector field's parameters and the path's data
# ----------------------------------------------------------------------------------------------
def _cde_loss(gradient, As, xs_data, h0_data, ts, t_out, w, **kw):
    field = LinearField(As)
    xs = xs_data.clone().requires_grad_(True)
    h0 = h0_data.clone().requires_grad_(True)
    sol = neurodyn.solve(ControlTerm(field, LinearPath(ts, xs)), h0, t_out, gradient=gradient, **kw)
    loss = (sol.ys * w).sum()
    gx, gh, gA = torch.autograd.grad(loss, (xs, h0, field.A))
    return loss.detach(), gx, gh, gA


@pytest.mark.parametrize("gradient, rel", [("direct", 1e-7), ("checkpoint", 1e-7), ("adjoint", 1e-6),
                                           ("interpolated", 1e-6)])
def test_cde_gradients_match_the_closed_form(gradient, rel):
    ts, xs = _data(B=2, T=5, C=2)
    As = _matrices()
    h0 = torch.tensor([[1.0, 0.5], [-0.2, 1.0]], dtype=D)
    t_out = torch.tensor([0.0, 0.4, 1.0, 1.5, 2.3], dtype=D)  # output times on knots and between
    w = torch.randn(len(t_out), 2, 2, generator=torch.Generator().manual_seed(3), dtype=D)
    _, gx, gh, gA = _cde_loss(gradient, As, xs, h0, ts, t_out, w, rtol=1e-10, atol=1e-12, checkpoints=3)
    # Truth: autograd through the closed form.
    xe, he, Ae = xs.clone().requires_grad_(True), h0.clone().requires_grad_(True), As.clone().requires_grad_(True)
    le = (exact_cde(Ae, ts, xe, he, t_out.tolist()) * w).sum()
    tx, th, tA = torch.autograd.grad(le, (xe, he, Ae))
    for got, want in ((gx, tx), (gh, th), (gA, tA)):
        err = float((got - want).abs().max() / want.abs().max())
        assert err < rel, (gradient, err)


@pytest.mark.slow  # 8 s; tests/test_cde.py checks the path-data gradients against finite differences by default
def test_cde_gradient_wrt_path_data_matches_finite_differences():
    ts, xs = _data(B=1, T=4, C=2)
    As = _matrices()
    h0 = torch.tensor([[1.0, -0.5]], dtype=D)
    t_out = torch.tensor([0.0, 0.7, 1.5], dtype=D)
    w = torch.tensor([[[0.0, 0.0]], [[1.0, -2.0]], [[0.5, 1.5]]], dtype=D)
    _, gx, _, _ = _cde_loss("adjoint", As, xs, h0, ts, t_out, w, rtol=1e-10, atol=1e-12)
    eps = 1e-6
    for idx in [(0, 0, 0), (0, 1, 1), (0, 2, 0), (0, 3, 1)]:
        xp, xm = xs.clone(), xs.clone()
        xp[idx] += eps
        xm[idx] -= eps
        lp = _cde_loss("direct", As, xp, h0, ts, t_out, w, rtol=1e-12, atol=1e-14)[0]
        lm = _cde_loss("direct", As, xm, h0, ts, t_out, w, rtol=1e-12, atol=1e-14)[0]
        fd = float(lp - lm) / (2 * eps)
        assert abs(float(gx[idx]) - fd) < 1e-6 * max(1.0, abs(fd)), (idx, float(gx[idx]), fd)


def test_control_term_closure_over_grad_tensor_is_reported():
    ts, xs = _data(B=1, T=3, C=1)
    w = torch.tensor(0.5, dtype=D, requires_grad=True)
    term = ControlTerm(lambda t, h: (w * h).unsqueeze(-1), LinearPath(ts, xs))
    with pytest.raises(InputError, match="params"):
        neurodyn.solve(term, torch.ones(1, 2, dtype=D), ts, gradient="adjoint")
    # Passing it explicitly joins the term's own tensors: gradient of h(T) = h0 exp(w (X(T) - X(0))).
    sol = neurodyn.solve(term, torch.ones(1, 2, dtype=D), ts, gradient="adjoint", params=[w], rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), (w,))
    dX = float(xs[0, -1, 0] - xs[0, 0, 0])
    assert float(g) == pytest.approx(2 * dX * np.exp(0.5 * dX), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# SplitTerm: the symplectic steppers evaluate each half only where needed
# ----------------------------------------------------------------------------------------------
class Counted:
    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, t, x):
        self.calls += 1
        return self.f(t, x)


def _pendulum():
    dq = Counted(lambda t, p: p)
    dp = Counted(lambda t, q: -torch.sin(q))
    whole = Counted(lambda t, y: torch.cat([y[..., 1:], -torch.sin(y[..., :1])], -1))
    return dq, dp, whole


@pytest.mark.parametrize("method, m, energy", [("leapfrog", 1, 1e-2), ("yoshida4", 3, 1e-4),
                                               ("semi_implicit_euler", 1, 0.1)])
def test_split_term_same_trajectory_half_the_calls(method, m, energy):
    dq, dp, whole = _pendulum()
    y0 = torch.tensor([[1.0, 0.0], [2.5, 0.3]], dtype=D)  # batch of two pendulums: state (..., 2d), d = 1
    n_steps = 160  # step 1/16: the output times lie on the step grid (no dense-output evaluations)
    t = torch.linspace(0, 10, 11, dtype=D)
    a = neurodyn.solve(whole, y0, t, method=method, step_size=10 / n_steps)
    b = neurodyn.solve(SplitTerm(dq, dp), y0, t, method=method, step_size=10 / n_steps)
    torch.testing.assert_close(b.ys, a.ys, rtol=0, atol=1e-13)
    # Whole field: 2m calls per step, each computing both halves (+1 at t0). Halves: m calls of each (+1 each).
    assert whole.calls == 2 * m * n_steps + 1
    assert dq.calls == m * n_steps + 1 and dp.calls == m * n_steps + 1
    H = lambda y: 0.5 * y[..., 1] ** 2 - torch.cos(y[..., 0])  # noqa: E731
    assert float((H(b.ys) - H(y0)).abs().max()) < energy  # bounded energy error (symplectic)


def test_split_term_dense_output_and_general_methods():
    """Output times inside the steps (Hermite on the step ends), and a non-symplectic method on the ODE form."""
    dq, dp, whole = _pendulum()
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    t = torch.linspace(0, 3, 11, dtype=D)
    for method in ("semi_implicit_euler", "leapfrog"):
        a = neurodyn.solve(whole, y0, t, method=method, step_size=0.07)
        b = neurodyn.solve(SplitTerm(dq, dp), y0, t, method=method, step_size=0.07)
        torch.testing.assert_close(b.ys, a.ys, rtol=0, atol=1e-13)
    a = neurodyn.solve(whole, y0, t, method="dopri5", rtol=1e-9)
    b = neurodyn.solve(SplitTerm(dq, dp), y0, t, method="dopri5", rtol=1e-9)
    torch.testing.assert_close(b.ys, a.ys, rtol=0, atol=1e-14)


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "adjoint"])
def test_split_term_gradients_equal_whole_field(gradient):
    k = torch.tensor(1.3, dtype=D, requires_grad=True)
    y0 = torch.tensor([1.0, 0.2], dtype=D, requires_grad=True)
    t = torch.linspace(0, 4, 5, dtype=D)
    whole = lambda t, y: torch.cat([y[..., 1:], -k * torch.sin(y[..., :1])], -1)  # noqa: E731
    ref = neurodyn.solve(whole, y0, t, method="yoshida4", step_size=0.05)
    g_ref = torch.autograd.grad(ref.ys[-1].sum(), (y0, k))
    term = SplitTerm(lambda t, p: p, lambda t, q: -k * torch.sin(q))
    sol = neurodyn.solve(term, y0, t, method="yoshida4", step_size=0.05, gradient=gradient, params=[k],
                         checkpoints=4)
    g = torch.autograd.grad(sol.ys[-1].sum(), (y0, k))
    tol = 1e-12 if gradient != "adjoint" else 1e-3  # the adjoint: the continuous gradient (rk4 backward)
    for x, r in zip(g, g_ref):
        torch.testing.assert_close(x, r, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# accepts: unsupported combinations are rejected before work
# ----------------------------------------------------------------------------------------------
def test_stepper_rejects_terms_it_cannot_integrate():
    ts, xs = _data(B=1, T=3, C=1)
    calls = Counted(lambda t, h: h.unsqueeze(-1))
    term = ControlTerm(calls, LinearPath(ts, xs))
    with pytest.raises(InputError, match=r"'leapfrog'.*ControlTerm.*'control'.*dopri5"):
        neurodyn.solve(term, torch.ones(1, 2, dtype=D), ts, method="leapfrog", step_size=0.1)
    assert calls.calls == 0

    class NoiseTerm(Term):
        kinds = frozenset({"sde"})

    with pytest.raises(InputError, match="not a NoiseTerm.*methods that do: euler, euler_heun, heun, log_ode"):
        neurodyn.solve(NoiseTerm(), torch.ones(2, dtype=D), ts)

    class JumpTerm(Term):
        kinds = frozenset({"jump"})

    with pytest.raises(InputError, match="no method integrates 'jump'"):
        neurodyn.solve(JumpTerm(), torch.ones(2, dtype=D), ts)
    with pytest.raises(InputError, match="per_sample_steps"):
        neurodyn.solve(term, torch.ones(1, 2, dtype=D), ts, per_sample_steps=True)
    with pytest.raises(InputError, match="not a term"):
        MultiTerm(lambda t, y: y)


# ----------------------------------------------------------------------------------------------
# AdjointTerm
# ----------------------------------------------------------------------------------------------
def test_adjoint_term_of_a_linear_field():
    """f = W y: the augmented field on [y, a, g] is [W y, -W^T a, -a y^T] (g over W's entries)."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(3, 3, generator=g, dtype=D, requires_grad=True)
    y, a = torch.randn(3, generator=g, dtype=D), torch.randn(3, generator=g, dtype=D)
    adj = AdjointTerm(ODETerm(lambda t, y: W @ y), (3,), [W])
    z = torch.cat([y, a, torch.zeros(9, dtype=D)]).view(1, -1)
    out = adj.ode(torch.tensor(0.0, dtype=D), z).view(-1)
    Wd = W.detach()
    torch.testing.assert_close(out[:3], Wd @ y)
    torch.testing.assert_close(out[3:6], -Wd.T @ a)
    torch.testing.assert_close(out[6:], -torch.outer(a, y).reshape(-1))
    # Interpolated form: y from a lookup, state [a, g].
    adj2 = AdjointTerm(ODETerm(lambda t, y: W @ y), (3,), [W], y_of_t=lambda t: y)
    out2 = adj2.ode(torch.tensor(0.0, dtype=D), torch.cat([a, torch.zeros(9, dtype=D)]).view(1, -1)).view(-1)
    torch.testing.assert_close(out2, out[3:])
