"""The gated MLP unit's whole-series update and the ODE-RNN loop against plain re-implementations of their formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neurodyn
from neurodyn.models.odernn import ODERNN, GatedMLPUpdate, mlp

f64 = torch.float64


def _paper_unit(cell: GatedMLPUpdate, inp: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The latent ODE paper's unit written out: separate update and reset MLPs on ``cat(mean, std, input)``."""
    H, U = cell.hidden_size, cell.units
    z = torch.cat([state, inp], -1)
    wg, bg = cell.gates_in.weight, cell.gates_in.bias
    u = torch.sigmoid(cell.update_out(torch.tanh(z @ wg[:U].T + bg[:U])))
    r = torch.sigmoid(cell.reset_out(torch.tanh(z @ wg[U:].T + bg[U:])))
    mean, std = state[:, :H], state[:, H:]
    n = cell.new_state(torch.cat([mean * r, std * r, inp], -1))
    new_mean = (1 - u) * n[:, :H] + u * mean
    new_std = ((1 - u) * n[:, H:].abs() + u * std).abs()
    return torch.cat([new_mean, new_std], -1)


def _grads(out: torch.Tensor, wrt: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return list(torch.autograd.grad((out * w).sum(), wrt))


def test_gated_unit_series_update_equals_the_papers_formula_with_gradients():
    torch.manual_seed(0)
    cell = GatedMLPUpdate(4, 3, units=7).to(f64)
    T, B = 5, 6
    inp = torch.randn(T, B, 4, dtype=f64)
    state0 = torch.cat([torch.randn(B, 3, dtype=f64), torch.rand(B, 3, dtype=f64)], -1).requires_grad_()
    params = list(cell.parameters())
    update = cell.series_update(inp)
    ours, ref = state0, state0
    for k in range(T):  # a chain of updates: the input projections of every time feed one graph
        ours, ref = update(k, ours), _paper_unit(cell, inp[k], ref)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-13)
    for a, b in zip(_grads(ours, [state0, *params], 1), _grads(ref, [state0, *params], 1)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    single = cell(inp[0], state0)  # forward: one step of the same formula
    assert torch.allclose(single, _paper_unit(cell, inp[0], state0), rtol=0, atol=1e-14)


def _hand_odernn(rnn: ODERNN, x, t, mask, reverse):
    """The ODE-RNN over shared times by hand: explicit Euler with ``ceil(|dt| / max_step)`` equal steps per
    interval, the masked update ``seen * cell + (1 - seen) * state``."""
    B, T, _ = x.shape
    H = rnn.cell.ode_size
    state = x.new_zeros(B, rnn.cell.state_size)
    inp = torch.cat([x * mask, mask], -1)
    seen = (mask.amax(-1, keepdim=True) > 0).to(x.dtype)
    order = list(range(T - 1, -1, -1)) if reverse else list(range(T))
    out = {}
    for i, k in enumerate(order):
        if i:
            dt = t[k] - t[order[i - 1]]
            n = max(1, int(torch.ceil(dt.abs() / rnn.max_step - 1e-9)))
            h = state[:, :H]
            for _ in range(n):
                h = h + (dt / n) * rnn.field(h)
            state = torch.cat([h, state[:, H:]], -1)
        state = seen[:, k] * _paper_unit(rnn.cell, inp[:, k], state) + (1 - seen[:, k]) * state
        out[k] = state
    return torch.stack([out[k] for k in range(T)], 1), state


@pytest.mark.parametrize("reverse", [True, False])
def test_odernn_gated_loop_equals_the_hand_written_loop(reverse):
    torch.manual_seed(2)
    rnn = ODERNN(2, 3, cell="gated_mlp", units=9, field=mlp(3, 8, 3, 0.3, 2), max_step=0.3).to(f64)
    B, T = 4, 7
    g = torch.Generator().manual_seed(5)
    t = torch.rand(T, generator=g, dtype=f64).mul(0.7).cumsum(0)  # gaps up to 0.7: one to three Euler steps
    x = torch.randn(B, T, 2, generator=g, dtype=f64)
    mask = (torch.rand(B, T, 2, generator=g) > 0.4).to(f64)
    mask[:, 3] = 0.0  # a time no row observes: no update at all
    mask[:, 5] = 1.0  # a time every row observes
    mask[1, 1] = torch.tensor([0.0, 1.0], dtype=f64)  # one channel seen: the row updates
    states, last = rnn(x, t, mask, reverse=reverse)
    ref_states, ref_last = _hand_odernn(rnn, x, t, mask, reverse)
    assert torch.allclose(states, ref_states, rtol=0, atol=1e-12)
    assert torch.equal(last, states[:, 0] if reverse else states[:, -1])
    params = list(rnn.parameters())
    for a, b in zip(_grads(states, params, 3), _grads(ref_states, params, 3)):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)
    assert rnn.nfe == sum(max(1, int(torch.ceil(d / 0.3 - 1e-9))) for d in t.diff().abs())


def test_odernn_gradient_reaches_the_data_through_every_time():
    """Gradients with respect to ``x`` (each time's input projection taken from one product over all times)
    against finite differences."""
    torch.manual_seed(4)
    rnn = ODERNN(1, 2, cell="gated_mlp", units=5, field=mlp(2, 6, 2, 0.5), max_step=0.5).to(f64)
    t = torch.tensor([0.0, 0.4, 1.1, 1.5], dtype=f64)
    x = torch.randn(2, 4, 1, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_: rnn(x_, t, reverse=True)[1], (x,), eps=1e-6, atol=1e-7)


def test_euler_one_stage_step_gradients_match_finite_differences():
    """The one-stage explicit step (no stage buffer) under autograd: solution and gradients of a linear ODE."""
    A = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=f64, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.3]], dtype=f64, requires_grad=True)
    t = torch.tensor([0.0, 0.3], dtype=f64)

    def run(A_, y0_):
        return neurodyn.solve(lambda s, y: y @ A_.T, y0_, t, method="euler", step_size=0.1).ys[-1]

    step = torch.eye(2, dtype=f64) + 0.1 * A.detach()
    assert torch.allclose(run(A, y0), y0.detach() @ torch.linalg.matrix_power(step, 3).T, rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(run, (A, y0), eps=1e-6, atol=1e-8)


def test_odernn_nonfinite_field_still_raises():
    """The solve's check of the derivative at the start (screened by a sum) still catches a NaN."""
    field = nn.Linear(2, 2)
    with torch.no_grad():
        field.weight[0, 0] = float("nan")
    rnn = ODERNN(1, 2, cell="gru", field=field, max_step=0.5)
    with pytest.raises(neurodyn.errors.NonFiniteError):
        rnn(torch.randn(2, 3, 1), torch.tensor([0.0, 1.0, 2.0]))


# ------------------------------------------------------------------------------------------------ Plan.rerun
def test_plan_rerun_equals_a_fresh_solve_with_gradients_and_checks_its_state():
    from neurodyn.solve import prepare

    field = mlp(3, 8, 3, 0.5).to(f64)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=f64)
    plan = prepare(lambda s, y: field(y), torch.zeros(4, 3, dtype=f64), t, method="rk4", step_size=0.1)
    y0 = torch.randn(4, 3, dtype=f64, requires_grad=True)
    ys = plan.rerun(y0).ys
    ref = neurodyn.solve(lambda s, y: field(y), y0, t, method="rk4", step_size=0.1).ys
    assert torch.equal(ys, ref)
    params = [y0, *field.parameters()]
    for a, b in zip(_grads(ys, params, 7), _grads(ref, params, 7)):
        assert torch.equal(a, b)
    with pytest.raises(neurodyn.errors.InputError, match="match the prepared state"):
        plan.rerun(torch.zeros(5, 3, dtype=f64))
    with pytest.raises(neurodyn.errors.InputError, match="match the prepared state"):
        plan.rerun(torch.zeros(4, 3))  # float32
    with pytest.raises(neurodyn.errors.InputError, match="NaN or inf"):
        plan.rerun(torch.full((4, 3), float("nan"), dtype=f64))
    with torch.no_grad(), pytest.raises(neurodyn.errors.InputError, match="grad mode"):
        plan.rerun(torch.zeros(4, 3, dtype=f64))


def test_odernn_reuses_one_plan_per_shape_and_still_rejects_a_nan_state():
    rnn = ODERNN(1, 2, cell="gru", max_step=0.5)
    x, t = torch.randn(3, 4, 1), torch.tensor([0.0, 0.3, 1.2, 1.5])
    rnn(x, t)
    assert len(rnn._plans) == 2  # one Euler step (gaps 0.3) and two (gap 0.9)
    rnn(x[:2], t)
    assert len(rnn._plans) == 4  # a second batch size
    with pytest.raises(neurodyn.errors.InputError, match="NaN or inf"):
        rnn(x, t, state0=torch.full((3, 2), float("nan")))
