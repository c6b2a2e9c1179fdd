"""The fused ODE-RNN run (one autograd function, written-out backward) against the general path, finite differences
and the latent_ode code's encoder loop over torchdiffeq."""

from __future__ import annotations

import copy

import pytest
import torch
import torchdiffeq

import neurodyn
from neurodyn.models.odernn import ODERNN, GatedMLPUpdate, mlp
from neurodyn.models.odernn_fused import euler_steps

f64 = torch.float64


def _case(hidden_layers: int, seed: int = 0):
    torch.manual_seed(seed)
    rnn = ODERNN(2, 3, cell="gated_mlp", units=7, field=mlp(3, 8, 3, 0.4, hidden_layers), max_step=0.3).to(f64)
    B, T = 5, 9
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.rand(T, generator=g, dtype=f64).mul(0.8).cumsum(0)  # gaps up to 0.8: one to three Euler steps
    x = torch.randn(B, T, 2, generator=g, dtype=f64)
    mask = (torch.rand(B, T, 2, generator=g) > 0.5).to(f64)
    mask[:, 2] = 0.0  # a time no row observes
    mask[:, 6] = 1.0  # a time every row observes
    state0 = torch.cat([torch.randn(B, 3, generator=g, dtype=f64), torch.rand(B, 3, generator=g, dtype=f64)], -1)
    return rnn, x, t, mask, state0


def _weighted(out: torch.Tensor, seed: int) -> torch.Tensor:
    return (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)).sum()


@pytest.mark.parametrize("hidden_layers", [1, 2])
@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize("rule", ["ceil", "latent_ode"])
def test_fused_run_equals_the_general_path_with_gradients(hidden_layers, reverse, rule):
    fused, x, t, mask, state0 = _case(hidden_layers)
    fused.step_rule = rule
    general = copy.deepcopy(fused)
    general.fused = False
    results = []
    for rnn in (fused, general):
        xx, s0 = x.clone().requires_grad_(), state0.clone().requires_grad_()
        states, last = rnn(xx, t, mask, reverse=reverse, state0=s0)
        (_weighted(states, 1) + _weighted(last, 2)).backward()
        results.append((states.detach(), last.detach(), xx.grad, s0.grad, [p.grad for p in rnn.parameters()],
                        rnn.nfe))
    (s1, l1, gx1, gs1, gp1, n1), (s2, l2, gx2, gs2, gp2, n2) = results
    assert n1 == n2 == sum(euler_steps(t.diff().tolist(), 0.3, rule))
    assert torch.allclose(s1, s2, rtol=0, atol=1e-13) and torch.allclose(l1, l2, rtol=0, atol=1e-13)
    for a, b in zip([gx1, gs1, *gp1], [gx2, gs2, *gp2]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # states=False: the same final state, no per-time states
    none, last = fused(x, t, mask, reverse=reverse, state0=state0, states=False)
    assert none is None and torch.allclose(last, l1, rtol=0, atol=1e-15)


def test_fused_gradients_match_finite_differences():
    rnn, x, t, mask, state0 = _case(2, seed=3)
    x, state0 = x[:3, :6].clone().requires_grad_(), state0[:3].clone().requires_grad_()
    t, mask = t[:6], mask[:3, :6]

    def run(x_, s0_):
        return rnn(x_, t, mask, reverse=True, state0=s0_)[1]

    assert torch.autograd.gradcheck(run, (x, state0), eps=1e-6, atol=1e-8)
    # parameters: the derivative along a random direction against a central difference
    params = list(rnn.parameters())
    loss = _weighted(run(x, state0), 4)
    grads = torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(9)
    direction = [torch.randn(p.shape, generator=g, dtype=f64) for p in params]
    eps = 1e-6
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(_weighted(run(x, state0), 4))
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    fd = (values[0] - values[1]) / (2 * eps)
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction))
    assert abs(float(fd - analytic)) < 1e-7 * max(1.0, abs(float(analytic)))


def _reference_unit(cell: GatedMLPUpdate, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
    """The latent_ode code's GRU unit (separate update and reset MLPs, masked update), written out."""
    H, U = cell.hidden_size, cell.units
    z = torch.cat([mean, std, x], -1)
    wg, bg = cell.gates_in.weight, cell.gates_in.bias
    u = torch.sigmoid(cell.update_out(torch.tanh(z @ wg[:U].T + bg[:U])))
    r = torch.sigmoid(cell.reset_out(torch.tanh(z @ wg[U:].T + bg[U:])))
    n = cell.new_state(torch.cat([mean * r, std * r, x], -1))
    new_mean = (1 - u) * n[:, :H] + u * mean
    new_std = (1 - u) * n[:, H:].abs() + u * std
    seen = (x[:, x.shape[1] // 2:].sum(-1, keepdim=True) > 0).to(x.dtype)
    return seen * new_mean + (1 - seen) * mean, (seen * new_std + (1 - seen) * std).abs()


def test_latent_ode_step_rule_reproduces_the_reference_encoder_over_torchdiffeq():
    """The latent_ode code's ODE-RNN run backward (a gap below span/50 takes one Euler step by hand, a longer one
    ``torchdiffeq.odeint(method="euler")`` over ``max(2, int(gap / (span/50)))`` points), from the last time on:
    ``LatentODE(encoder_step_rule="latent_ode")``'s encoder gives the same state."""
    torch.manual_seed(5)
    model = neurodyn.models.LatentODE(1, latent_size=3, rec_size=4, units=8, rec_units=8, gru_units=6,
                                      encoder_step_rule="latent_ode", init_std=0.3).to(f64)
    g = torch.Generator().manual_seed(6)
    t = torch.cat([torch.zeros(1, dtype=f64), torch.rand(39, generator=g, dtype=f64).mul(5).sort().values])
    x = torch.randn(4, 40, 1, generator=g, dtype=f64)
    mask = (torch.rand(4, 40, 1, generator=g) > 0.5).to(f64)
    span = float(t[-1] - t[0])
    steps = euler_steps(t.diff().tolist(), span / 50, "latent_ode")
    assert max(steps) >= 2 and sum(s > 1 for s in steps) < len(steps)  # the data exercises both branches
    data = torch.cat([x * mask, mask], -1)
    field = model.encoder.field
    mean = torch.zeros(4, 4, dtype=f64)
    std = torch.zeros(4, 4, dtype=f64)
    for i in range(39, -1, -1):
        if i < 39:
            prev_t, t_i = t[i + 1], t[i]
            if prev_t - t_i < span / 50:
                mean = mean + field(mean) * (t_i - prev_t)
            else:
                n = max(2, int((prev_t - t_i) / (span / 50)))
                mean = torchdiffeq.odeint(lambda s, y: field(y), mean, torch.linspace(float(prev_t), float(t_i), n,
                                                                                      dtype=f64), method="euler")[-1]
        mean, std = _reference_unit(model.encoder.cell, data[:, i], mean, std)
    _, last = model.encoder(x, t, mask, reverse=True, max_step=span / 50)
    assert torch.allclose(last, torch.cat([mean, std], -1), rtol=0, atol=1e-12)
    assert model.encoder.nfe == sum(steps)


def test_fused_run_rejects_a_nonfinite_state_and_bad_step_rule():
    rnn, x, t, mask, state0 = _case(1)
    with torch.no_grad():
        rnn.field[0].weight[0, 0] = float("nan")
    with pytest.raises(neurodyn.errors.NonFiniteError, match="fused run"):
        rnn(x, t, mask, state0=state0)
    with pytest.raises(neurodyn.errors.InputError, match="step_rule"):
        ODERNN(1, 2, step_rule="floor")


def test_fused_run_applies_only_where_it_holds():
    """A field of time, another method or per-row times take the general path (same results as fused=False)."""
    rnn, x, t, mask, state0 = _case(1)
    layers = rnn._fusable(x, t, mask, state0)
    assert layers is not None and len(layers) == 2
    for change in ({"method": "rk4"}, {"gradient": "checkpoint"}, {"fused": False}):
        other = copy.deepcopy(rnn)
        for k, v in change.items():
            setattr(other, k, v)
        assert other._fusable(x, t, mask, state0) is None
    with torch.no_grad():  # no graph recorded: the fused run still applies
        s_ng, l_ng = rnn(x, t, mask, state0=state0)
    s, last = rnn(x, t, mask, state0=state0)
    assert torch.equal(s_ng, s.detach()) and torch.equal(l_ng, last.detach())


def test_latent_ode_batch_bound_is_the_latent_ode_codes_objective():
    """``bound="batch"``: ``-(logsumexp_s mean_b (log p(y_b | z_sb) - w KL_b) - log S)``, computed here with
    ``torch.distributions``."""
    model = neurodyn.models.LatentODE(1, latent_size=3, rec_size=4, units=8, rec_units=8, gru_units=6).to(f64)
    g = torch.Generator().manual_seed(2)
    t = torch.linspace(0, 2, 12, dtype=f64)
    x = torch.randn(5, 12, 1, generator=g, dtype=f64)
    mask = (torch.rand(5, 12, 1, generator=g) > 0.3).to(f64)
    torch.manual_seed(0)
    out = model.loss(x, t, mask, n_samples=4, kl_weight=0.7, bound="batch")
    torch.manual_seed(0)
    pred, info = model(x, t, mask, n_samples=4)
    logp = torch.distributions.Normal(pred, 0.01).log_prob(x) * mask
    lik = logp.sum((-2, -1)) / mask.sum((-2, -1))  # (S, B)
    q = torch.distributions.Normal(info["mean"], info["std"])
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1)  # (B,)
    expected = -(torch.logsumexp((lik - 0.7 * kl).mean(1), 0) - torch.log(torch.tensor(4.0, dtype=f64)))
    assert torch.allclose(out["loss"], expected, rtol=1e-12, atol=0)
    with pytest.raises(neurodyn.errors.InputError, match="bound"):
        model.loss(x, t, mask, bound="samples")


def test_fused_runs_reuse_buffers_only_when_no_backward_is_pending():
    """Two recorded runs before either backward pass, a run whose graph is dropped, a run under no_grad: every
    gradient equals the general path's (the second recorded run takes fresh buffers)."""
    fused, x, t, mask, state0 = _case(2, seed=7)
    general = copy.deepcopy(fused)
    general.fused = False
    x2 = x.flip(0).contiguous()

    def grads(rnn, xs):
        outs = [rnn(xx, t, mask, reverse=True, state0=state0)[1] for xx in xs]
        result = []
        for out in reversed(outs):  # the second run's backward first
            result.append(torch.autograd.grad(_weighted(out, 5), list(rnn.parameters())))
        return result

    rnn_out = fused(x, t, mask, state0=state0)[1]  # recorded, then dropped without a backward pass
    del rnn_out
    with torch.no_grad():
        fused(x2, t, mask, state0=state0)
    for a, b in zip(grads(fused, [x, x2]), grads(general, [x, x2])):
        for ga, gb in zip(a, b):
            assert torch.allclose(ga, gb, rtol=0, atol=1e-12)
    assert fused._workspace  # buffers kept for the next run
