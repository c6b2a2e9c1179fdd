"""ODE-RNN, latent ODE, GRU-D / GRU baselines and the diagonal SSM layer against independent truths: matrix
exponentials, ODE solves at tight tolerance, sequential loops, hand-computed likelihoods and KL, formulas."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from torch import nn

import neurodyn
from neurodyn.data import compact, interpolation_mask, periodic_toy
from neurodyn.errors import InputError
from neurodyn.models import GRUD, ODERNN, DiagonalSSM, GRUBaseline, LatentODE, linear_scan
from neurodyn.models.latent_ode import gaussian_log_likelihood, kl_standard_normal

pytestmark = pytest.mark.usefixtures("single_thread")
f64 = torch.float64


# ---------------------------------------------------------------------------------------------------- scan / SSM
def _sequential(a, b):
    x = torch.zeros_like(b[:, 0])
    out = []
    for k in range(b.shape[1]):
        x = a[:, k] * x + b[:, k]
        out.append(x)
    return torch.stack(out, 1)


@pytest.mark.parametrize("T", [1, 2, 7, 16, 33])
def test_linear_scan_equals_sequential_loop(T):
    g = torch.Generator().manual_seed(T)
    a = torch.complex(torch.rand(3, T, 4, generator=g, dtype=f64), torch.randn(3, T, 4, generator=g, dtype=f64))
    b = torch.complex(torch.randn(3, T, 4, generator=g, dtype=f64), torch.randn(3, T, 4, generator=g, dtype=f64))
    assert torch.allclose(linear_scan(a, b, dim=1), _sequential(a, b), rtol=1e-12, atol=1e-12)
    if T == 1:  # a does not enter (x_{-1} = 0)
        return
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    w = torch.randn(3, T, 4, generator=g, dtype=f64)
    (linear_scan(a1, b1).real * w).sum().backward()
    (_sequential(a2, b2).real * w).sum().backward()
    assert torch.allclose(a1.grad, a2.grad, atol=1e-11) and torch.allclose(b1.grad, b2.grad, atol=1e-11)


def test_ssm_exact_discretisation_equals_an_ode_solve_at_irregular_dt():
    torch.manual_seed(0)
    layer = DiagonalSSM(input_size=2, state_size=3, output_size=2).to(f64)
    g = torch.Generator().manual_seed(1)
    t = torch.cat([torch.zeros(1, dtype=f64), torch.rand(9, generator=g, dtype=f64).cumsum(0) * 0.7])  # (10,)
    u = torch.randn(1, 10, 2, generator=g, dtype=f64)
    x_scan = layer.states(u, t)[0]  # (10, N) complex
    A = layer.A.detach()
    Bc = torch.view_as_complex(layer.B.detach().contiguous())
    x = torch.zeros(3, dtype=torch.complex128)
    for k in range(1, 10):  # u_k held on (t_{k-1}, t_k]
        drive = Bc @ u[0, k].to(torch.complex128)
        sol = neurodyn.solve(lambda _t, y, d=drive: A * y + d, x, t[k - 1:k + 1], rtol=1e-10, atol=1e-12)
        x = sol.ys[-1]
        assert torch.allclose(x_scan[k], x, rtol=1e-8, atol=1e-10), k
    y = layer(u, t)
    Cc = torch.view_as_complex(layer.C.detach().contiguous())
    assert torch.allclose(y[0], (x_scan @ Cc.T).real + u[0] @ layer.D.T, atol=1e-12)


def test_ssm_padding_keeps_the_state_and_batches_rows_with_own_times():
    layer = DiagonalSSM(1, 4, 1).to(f64)
    t = torch.tensor([[0.0, 0.3, 1.0, 1.0, 1.0], [0.0, 0.5, 0.6, 2.0, 3.0]], dtype=f64)
    u = torch.randn(2, 5, 1, dtype=f64)
    x = layer.states(u, t)
    assert torch.equal(x[0, 2], x[0, 3]) and torch.equal(x[0, 3], x[0, 4])
    assert torch.allclose(x[1:], layer.states(u[1:], t[1]), atol=1e-14)
    with pytest.raises(InputError, match="nondecreasing"):
        layer.states(u, t.flip(-1))


# ---------------------------------------------------------------------------------------------------- ODE-RNN
class _Recorder(nn.Module):
    """A cell that records the state it receives and returns ``state + W x``."""

    def __init__(self, inp, hidden):
        super().__init__()
        self.state_size = self.ode_size = hidden
        self.W = nn.Linear(inp, hidden, bias=False, dtype=f64)
        self.seen: list[torch.Tensor] = []

    def forward(self, x, state):
        self.seen.append(state.detach().clone())
        return state + self.W(x)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_odernn_between_observations_is_the_linear_odes_matrix_exponential(reverse, per_row):
    torch.manual_seed(0)
    H = 3
    M = torch.randn(H, H, dtype=f64) * 0.5
    field = nn.Linear(H, H, bias=False, dtype=f64)
    field.weight.data = M.clone()
    cell = _Recorder(4, H)
    rnn = ODERNN(2, H, cell=cell, field=field, method="dopri5", rtol=1e-10, atol=1e-12)
    B, T = 3, 6
    g = torch.Generator().manual_seed(2)
    t = torch.rand(B if per_row else 1, T, generator=g, dtype=f64).cumsum(-1)
    t = t if per_row else t[0]
    x = torch.randn(B, T, 2, generator=g, dtype=f64)
    states, last = rnn(x, t, reverse=reverse)
    tt = t if per_row else t.expand(B, -1)
    order = list(range(T - 1, -1, -1)) if reverse else list(range(T))
    for step in range(1, T):
        k, prev = order[step], order[step - 1]
        for b in range(B):
            E = torch.from_numpy(scipy.linalg.expm(M.numpy() * float(tt[b, k] - tt[b, prev])))
            assert torch.allclose(cell.seen[step][b], E @ states[b, prev], rtol=1e-8, atol=1e-10)
    assert torch.equal(last, states[:, 0] if reverse else states[:, -1])


def test_odernn_union_mode_equals_per_row_mode_and_masks_hold_the_state():
    torch.manual_seed(1)
    rnn = ODERNN(1, 4, cell="gru", method="dopri5", rtol=1e-10, atol=1e-12).to(f64)
    g = torch.Generator().manual_seed(3)
    t = torch.rand(3, 5, generator=g, dtype=f64).cumsum(-1)
    t = t - t[:, :1]  # a common first time: the union's state starts there too
    x = torch.randn(3, 5, 1, generator=g, dtype=f64)
    mask = torch.ones_like(x)
    mask[1, 2] = 0.0
    per_row, _ = rnn(x, t, mask)
    rnn.union = True
    union, _ = rnn(x, t, mask)
    assert torch.allclose(per_row, union, atol=1e-8)
    # the unobserved point of row 1: its state is the ODE's evolution of the previous one, no update
    rnn.union = False
    states, _ = rnn(x[1:2, :3], t[1:2, :3], mask[1:2, :3])
    ev = rnn.evolve(states[:, 1, :].contiguous(), t[1:2, 1:2], (t[1, 2] - t[1, 1]).reshape(1, 1))
    assert torch.allclose(states[:, 2], ev, atol=1e-9)


def test_odernn_cells_and_bad_input():
    x, t = torch.randn(2, 4, 3), torch.arange(4.0)
    for cell, size in (("gru", 5), ("lstm", 10), ("gated_mlp", 10)):
        states, last = ODERNN(3, 5, cell=cell, units=8, max_step=0.5)(x, t)
        assert states.shape == (2, 4, size) and last.shape == (2, size)
    with pytest.raises(InputError, match="nondecreasing"):
        ODERNN(3, 5)(x, t.flip(0))
    with pytest.raises(InputError, match="cell"):
        ODERNN(3, 5, cell="rnn")


# ---------------------------------------------------------------------------------------------------- baselines
def test_grud_decays_and_imputation_follow_the_formulas():
    torch.manual_seed(2)
    m = GRUD(2, 3, x_mean=torch.tensor([0.5, -1.0])).to(f64)
    with torch.no_grad():
        m.decay_x_weight.copy_(torch.tensor([0.7, 1.3]))
        m.decay_x_bias.copy_(torch.tensor([-0.1, 0.2]))
    delta = torch.tensor([[0.0, 2.0], [0.5, 0.1]], dtype=f64)
    gx, gh = m.decays(delta)
    assert torch.allclose(gx, torch.exp(-torch.clamp(delta * torch.tensor([0.7, 1.3], dtype=f64)
                                                     + torch.tensor([-0.1, 0.2], dtype=f64), min=0)))
    W, b = m.decay_h.weight.detach(), m.decay_h.bias.detach()
    assert torch.allclose(gh, torch.exp(-torch.clamp(delta @ W.T + b, min=0)))
    # a 3-step run with channel 1 missing at step 1 and 2, by hand
    t = torch.tensor([0.0, 0.4, 1.0], dtype=f64)
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [4.0, 0.0]]], dtype=f64)
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]]], dtype=f64)
    states, _ = m(x, t, mask)
    h = torch.zeros(1, 3, dtype=f64)
    x_last, mean = torch.tensor([0.5, -1.0], dtype=f64), torch.tensor([0.5, -1.0], dtype=f64)
    deltas = [torch.tensor([0.0, 0.0]), torch.tensor([0.4, 0.4]), torch.tensor([0.6, 1.0])]  # channel 1: 0.6 + 0.4
    for k in range(3):
        d = deltas[k].to(f64)[None]
        gx, gh = m.decays(d)
        mk = mask[0, k]
        xh = mk * x[0, k] + (1 - mk) * (gx[0] * x_last + (1 - gx[0]) * mean)
        h = m.cell(torch.cat([xh, mk])[None], gh * h)
        x_last = mk * x[0, k] + (1 - mk) * x_last
        assert torch.allclose(states[0, k], h[0], atol=1e-12), k


def test_gru_baseline_equals_nn_gru_on_fully_observed_rows():
    torch.manual_seed(3)
    m = GRUBaseline(2, 4).to(f64)
    t = torch.tensor([0.0, 0.3, 1.1, 1.5], dtype=f64)
    x = torch.randn(2, 4, 2, dtype=f64)
    states, _ = m(x, t)
    ref = nn.GRU(5, 4, batch_first=True, dtype=f64)
    ref.load_state_dict({k + "_l0": v for k, v in m.cell.state_dict().items()})
    dt = torch.cat([torch.zeros(1, dtype=f64), t.diff()])
    inp = torch.cat([x, torch.ones_like(x), dt[None, :, None].expand(2, -1, -1)], -1)
    assert torch.allclose(states, ref(inp)[0], atol=1e-12)
    # padding (no channel observed) holds the state
    mask = torch.ones_like(x)
    mask[:, 3] = 0
    s2, last = m(x, t, mask)
    assert torch.equal(s2[:, 3], s2[:, 2]) and torch.equal(last, s2[:, 2])


# ---------------------------------------------------------------------------------------------------- latent ODE
def test_elbo_pieces_against_torch_distributions():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 2, generator=g, dtype=f64)
    mean = torch.randn(4, 3, 5, 2, generator=g, dtype=f64)
    mask = (torch.rand(3, 5, 2, generator=g) < 0.6).to(f64)
    lp = torch.distributions.Normal(mean, 0.3).log_prob(x) * mask
    want_sum = lp.sum((-2, -1))
    assert torch.allclose(gaussian_log_likelihood(x, mean, 0.3, mask, "sum"), want_sum, atol=1e-12)
    assert torch.allclose(gaussian_log_likelihood(x, mean, 0.3, mask), want_sum / mask.sum((-2, -1)), atol=1e-12)
    mu, sd = torch.randn(3, 6, generator=g, dtype=f64), torch.rand(3, 6, generator=g, dtype=f64) + 0.1
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mu, sd), torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(kl_standard_normal(mu, sd), want.sum(-1), atol=1e-12)


def _small_model(**kw):
    torch.manual_seed(5)
    return LatentODE(1, latent_size=3, rec_size=4, units=8, rec_units=8, gru_units=8, **kw).to(f64)


def test_latent_ode_loss_is_the_hand_computed_bound():
    model = _small_model()
    t = torch.linspace(0, 2, 9, dtype=f64)
    x = torch.sin(t)[None, :, None].repeat(2, 1, 1)
    mask = torch.ones_like(x)
    mask[0, 3] = 0
    for iwae in (False, True):
        torch.manual_seed(11)
        out = model.loss(x, t, mask, n_samples=4, kl_weight=0.3, iwae=iwae)
        torch.manual_seed(11)
        pred, info = model(x, t, mask, n_samples=4)
        assert torch.allclose(pred, out["pred"], atol=1e-12)
        lik = torch.distributions.Normal(pred, model.obs_std).log_prob(x) * mask
        lik = lik.sum((-2, -1)) / mask.sum((-2, -1))  # (S, B)
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(info["mean"], info["std"]),
                                               torch.distributions.Normal(0.0, 1.0)).sum(-1)
        terms = lik - 0.3 * kl
        bound = (torch.logsumexp(terms, 0) - math.log(4)) if iwae else terms.mean(0)
        assert torch.allclose(out["loss"], -bound.mean(), rtol=1e-10)
        assert torch.allclose(out["mse"], ((pred - x) ** 2 * mask).sum() / (mask.sum() * 4), rtol=1e-10)
    # z0 is a sample of N(mean, std^2) and the latent trajectory solves the latent ODE from it
    z = info["z"][0, 0]
    sol = neurodyn.solve(lambda _t, y: model.field(y), info["z0"][0, 0], t, rtol=1e-10, atol=1e-12)
    assert torch.allclose(z, sol.ys, atol=2e-3)  # the model's solve runs at its rtol 1e-3


def test_latent_ode_shared_and_per_row_times_agree():
    model = _small_model(rtol=1e-9, atol=1e-11, encoder_method="dopri5")
    t = torch.linspace(0, 2, 7, dtype=f64)
    x = torch.cos(2 * t)[None, :, None].repeat(3, 1, 1)
    mask = torch.ones_like(x)
    p1, i1 = model(x, t, mask, use_mean=True)
    p2, i2 = model(x, t.expand(3, -1).contiguous(), mask, t_pred=t.expand(3, -1).contiguous(), use_mean=True)
    assert torch.allclose(i1["mean"], i2["mean"], atol=1e-9) and torch.allclose(p1, p2, atol=1e-8)
    # compacting the observed points of each row (per-row times) gives the same encoding as the masked union
    g = torch.Generator().manual_seed(0)
    m = interpolation_mask(mask, 4, g)
    b = compact(t, x, m)
    _, i3 = model(x, t, m, use_mean=True)
    _, i4 = model(b.values, b.times, b.mask, t_pred=t, use_mean=True)
    assert torch.allclose(i3["mean"], i4["mean"], atol=1e-7)


def test_poisson_rate_integral_is_the_integral_of_the_rate():
    model = _small_model(poisson=True, rtol=1e-10, atol=1e-12)
    t = torch.linspace(0, 2, 401, dtype=f64)
    x = torch.sin(t)[None, :, None]
    _, info = model(x[:, ::40], t[::40], t_pred=t, use_mean=True)
    rate = info["log_rate"][0, 0, :, 0].exp()
    trap = torch.cat([torch.zeros(1, dtype=f64), ((rate[1:] + rate[:-1]) / 2 * t.diff()).cumsum(0)])
    assert torch.allclose(info["rate_integral"][0, 0, :, 0], trap, rtol=1e-4, atol=1e-8)
    out = model.loss(x[:, ::40], t[::40], torch.ones_like(x[:, ::40]), n_samples=2)
    assert torch.isfinite(out["loss"])


def test_latent_ode_rejects_bad_input():
    model = _small_model()
    t = torch.linspace(0, 1, 5, dtype=f64)
    x = torch.zeros(2, 5, 1, dtype=f64)
    with pytest.raises(InputError, match="n_samples"):
        model(x, t, n_samples=0)
    with pytest.raises(InputError, match="y_pred"):
        model.loss(x, t, torch.ones_like(x), t_pred=t)


@pytest.mark.slow
def test_short_training_reduces_the_loss_on_the_periodic_toy():
    torch.manual_seed(0)
    t, x = periodic_toy(n_series=100, n_points=40, seed=1)
    model = LatentODE(1, latent_size=4, rec_size=8, units=32, rec_units=32, gru_units=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    full = torch.ones_like(x)
    g = torch.Generator().manual_seed(0)
    losses = []
    for it in range(40):
        idx = torch.arange(it % 4 * 25, it % 4 * 25 + 25)
        b = compact(t[0], x[idx], interpolation_mask(full[idx], 20, g))
        out = model.loss(b.values, b.times, b.mask, t[0], x[idx], full[idx], n_samples=1, kl_weight=0.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["mse"]))
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:4]) / 4


def test_odernn_gradient_methods_agree():
    """The adjoint and checkpoint backward passes evaluate the field again after the forward: each interval's solve
    must keep its own interval (equal to autograd through the steps)."""
    x = torch.randn(2, 4, 1, dtype=f64, generator=torch.Generator().manual_seed(0))
    t = torch.rand(2, 4, dtype=f64, generator=torch.Generator().manual_seed(1)).cumsum(-1)
    grads = {}
    for method in ("direct", "adjoint", "checkpoint"):
        torch.manual_seed(0)
        rnn = ODERNN(1, 3, method="dopri5", rtol=1e-10, atol=1e-12, gradient=method).to(f64)
        rnn(x, t)[0].sum().backward()
        grads[method] = torch.cat([p.grad.flatten() for p in rnn.parameters()])
    assert torch.allclose(grads["adjoint"], grads["direct"], atol=1e-8)
    assert torch.allclose(grads["checkpoint"], grads["direct"], atol=1e-10)


def test_latent_demo_help_lists_its_options(capsys):
    from neurodyn.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "latent", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--budget" in out and "--n-observed" in out and "--grow-epochs" in out


@pytest.mark.slow
def test_latent_demo_smoke(tmp_path):
    import json

    from neurodyn.cli import main

    out = tmp_path / "latent"
    assert main(["demo", "latent", "--quick", "--budget", "4", "--out", str(out), "--threads", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for task in ("interpolation", "extrapolation"):
        res = metrics[task]
        assert res["epochs"] >= 1 and math.isfinite(res["test"]["mse"])
        assert len(res["epoch_seconds"]) == res["epochs"]
        assert not res["ema"] and res["test_raw"] == res["test"]  # the default evaluates the raw weights
    assert metrics["config"]["ema_decay"] == 0.0
    assert metrics["target"]["met"] == (metrics["interpolation"]["test"]["mse"] <= 0.08)
    for name in ("interpolation.png", "extrapolation.png", "mse_curve.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latent_demo_evaluates_an_ema_of_the_weights_and_decay_0_the_raw_ones(monkeypatch):
    """Two epochs of two optimizer steps on 20 series: with ``ema_decay=0.5`` the model returned (evaluated, plotted,
    saved) has the hand-computed average of the initial weights and the weights after each step, not the raw ones;
    its ``test_raw`` equals ``test`` of the same training with ``ema_decay=0`` (the EMA does not change training),
    whose model is the raw weights after the last step."""
    from neurodyn.demos import latent as demo
    from neurodyn.models import LatentODE

    snaps: list[list[torch.Tensor]] = []
    real_step = torch.optim.Adamax.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        snaps.append([p.detach().clone() for group in self.param_groups for p in group["params"]])
        return out

    monkeypatch.setattr(torch.optim.Adamax, "step", step)
    torch.set_num_threads(1)
    t, x = periodic_toy(20, 100, 5.0, 0.01, seed=0)
    data = {"t": t[0], "x": x, "train": torch.arange(16), "test": torch.arange(16, 20)}
    res, last = {}, {}
    for decay in (0.0, 0.5):
        snaps.clear()
        cfg = demo.LatentConfig(n_series=20, batch_size=8, epochs=2, eval_every=1, grow_epochs=1, ema_decay=decay)
        res[decay] = demo._train(cfg, "interp", data, 1e9)
        assert res[decay]["epochs"] == 2 and len(snaps) == 4
        last[decay] = snaps[-1]
    torch.manual_seed(0)
    avg = [p.detach().clone() for p in LatentODE(1).parameters()]  # the initial weights (the demo's seed 0)
    for snap in snaps:
        avg = [0.5 * a + 0.5 * w for a, w in zip(avg, snap)]
    got = list(res[0.5]["model"].parameters())
    assert len(got) == len(avg)
    assert all(torch.allclose(g, a, rtol=0, atol=1e-6) for g, a in zip(got, avg))
    assert not all(torch.equal(g, w) for g, w in zip(got, last[0.5]))
    assert res[0.5]["ema"] and res[0.5]["test"]["mse"] != res[0.5]["test_raw"]["mse"]
    assert not res[0.0]["ema"] and res[0.0]["test"] == res[0.0]["test_raw"]
    assert res[0.5]["test_raw"] == pytest.approx(res[0.0]["test"], rel=1e-9)
    assert all(torch.equal(g, w) for g, w in zip(res[0.0]["model"].parameters(), last[0.0]))
    assert all(torch.equal(a, b) for a, b in zip(last[0.0], last[0.5]))  # the same training either way
