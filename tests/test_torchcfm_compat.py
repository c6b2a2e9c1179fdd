"""neurodyn.compat.torchcfm against torchcfm 1.0.7 itself: same seeds -> same t, x_t, u_t, noise, OT pairs."""

import numpy as np
import pytest
import torch

torchcfm = pytest.importorskip("torchcfm")
pytest.importorskip("ot")
from torchcfm import conditional_flow_matching as ref  # noqa: E402
from torchcfm import optimal_transport as ref_ot  # noqa: E402

import neurodyn.compat.torchcfm as ours  # noqa: E402
from neurodyn import transport  # noqa: E402


def _batches(n=64, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * 0.5 + 3.0


def _run(cls_ours, cls_ref, args, guided=False, t=None, seed=123):
    x0, x1 = _batches()
    y0, y1 = torch.arange(64) % 3, torch.arange(64) % 5
    outs = []
    for cls in (cls_ours, cls_ref):
        torch.manual_seed(seed)
        np.random.seed(seed)
        fm = cls(*args)
        if guided:
            outs.append(fm.guided_sample_location_and_conditional_flow(x0, x1, y0, y1, t=t, return_noise=True))
        else:
            outs.append(fm.sample_location_and_conditional_flow(x0, x1, t=t, return_noise=True))
    return outs


@pytest.mark.parametrize("name, args", [
    ("ConditionalFlowMatcher", (0.1,)),
    ("ExactOptimalTransportConditionalFlowMatcher", (0.1,)),
    ("TargetConditionalFlowMatcher", (0.05,)),
    ("VariancePreservingConditionalFlowMatcher", (0.2,)),
    ("SchrodingerBridgeConditionalFlowMatcher", (0.5,)),
    ("SchrodingerBridgeConditionalFlowMatcher", (0.7, "sinkhorn")),
])
def test_same_seed_same_draws(name, args):
    a, b = _run(getattr(ours, name), getattr(ref, name), args)
    assert len(a) == len(b) == 4
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("name, args", [
    ("ExactOptimalTransportConditionalFlowMatcher", (0.0,)),
    ("SchrodingerBridgeConditionalFlowMatcher", (0.5,)),
])
def test_guided_variants_carry_labels_like_torchcfm(name, args):
    a, b = _run(getattr(ours, name), getattr(ref, name), args, guided=True)
    assert len(a) == len(b) == 6
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_given_t_and_pad():
    t = torch.linspace(0.1, 0.9, 64)
    a, b = _run(ours.ConditionalFlowMatcher, ref.ConditionalFlowMatcher, (0.3,), t=t)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    x = torch.zeros(5, 3, 4, 4)
    assert ours.pad_t_like_x(torch.rand(5), x).shape == ref.pad_t_like_x(torch.rand(5), x).shape == (5, 1, 1, 1)
    assert ours.pad_t_like_x(0.5, x) == 0.5


def test_ot_plan_sampler_pairs_and_labels():
    x0, x1 = _batches(50, 3, seed=4)
    y0, y1 = torch.arange(50), torch.arange(50) + 100
    res = []
    for cls in (ours.OTPlanSampler, ref_ot.OTPlanSampler):
        np.random.seed(7)
        res.append(cls("exact").sample_plan_with_labels(x0, x1, y0, y1))
    for u, v in zip(*res):
        assert torch.equal(u, v)
    xa, xb, ya, yb = res[0]
    assert torch.equal(xa, x0[ya]) and torch.equal(xb, x1[yb - 100])   # labels follow their points
    np.random.seed(1)
    pi_ref = ref_ot.OTPlanSampler("sinkhorn", reg=0.5).get_map(x0, x1)
    pi = ours.OTPlanSampler("sinkhorn", reg=0.5).get_map(x0, x1)
    np.testing.assert_allclose(pi, pi_ref, rtol=0, atol=1e-15)


def test_wasserstein_matches_torchcfm():
    x0, x1 = _batches(80, 2, seed=2)
    for power in (1, 2):
        assert ours.wasserstein(x0, x1, power=power) == pytest.approx(ref_ot.wasserstein(x0, x1, power=power),
                                                                      rel=1e-12)
    assert ours.wasserstein(x0, x1, method="sinkhorn", reg=0.5) == pytest.approx(
        ref_ot.wasserstein(x0, x1, method="sinkhorn", reg=0.5), rel=1e-9)


def test_fallback_without_pot_reproduces_pot(monkeypatch):
    """Without POT, the exact plan (assignment) and the entropic plan (log-domain Sinkhorn) give POT's plans, so
    the seeded draws are unchanged."""
    x0, x1 = _batches(40, 2, seed=9)
    np.random.seed(3)
    torch.manual_seed(3)
    ref_out = ref.ExactOptimalTransportConditionalFlowMatcher(0.1).sample_location_and_conditional_flow(x0, x1)
    pi_sk = transport.sinkhorn_plan(transport.cost_matrix(x0, x1), reg=2.0)
    monkeypatch.setattr(transport, "have_pot", lambda: False)
    np.random.seed(3)
    torch.manual_seed(3)
    out = ours.ExactOptimalTransportConditionalFlowMatcher(0.1).sample_location_and_conditional_flow(x0, x1)
    for u, v in zip(out, ref_out):
        assert torch.equal(u, v)
    np.testing.assert_allclose(transport.sinkhorn_plan(transport.cost_matrix(x0, x1), reg=2.0), pi_sk, atol=1e-10)
    with pytest.raises(ValueError, match="needs POT"):
        transport.exact_plan(np.ones((3, 4)))


def test_readme_snippet_runs_unchanged():
    """torchcfm's README training loop (ConditionalFlowMatcher + models.models.MLP), the imports swapped: the same
    seed gives the same loss sequence, and the trained fields agree; torch_wrapper gives the same f(t, x)."""
    from torchcfm.models.models import MLP as RefMLP

    from neurodyn.compat.torchcfm.models.models import MLP
    from neurodyn.compat.torchcfm.utils import torch_wrapper

    def train(lib, mlp):
        torch.manual_seed(0)
        np.random.seed(0)
        model = mlp(dim=2, time_varying=True)
        optimizer = torch.optim.Adam(model.parameters())
        FM = lib.ExactOptimalTransportConditionalFlowMatcher(sigma=0.1)
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            x0, x1 = torch.randn(32, 2), torch.randn(32, 2) + 2
            t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)
            vt = model(torch.cat([xt, t[:, None]], dim=-1))
            loss = torch.mean((vt - ut) ** 2)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses, model

    (la, ma), (lb, mb) = train(ours, MLP), train(torchcfm, RefMLP)
    assert la == lb
    x = torch.randn(10, 2)
    t = torch.tensor(0.3)
    assert torch.equal(torch_wrapper(ma)(t, x), mb(torch.cat([x, torch.full((10, 1), 0.3)], 1)))


def _x0s(n):
    return torch.randn(n, 2) * 0.5 + torch.tensor([2.0, 0.0])


def _x1s(n):
    return torch.from_numpy(np.random.rand(n, 2).astype(np.float32)) * 2 - 1


def _flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def _torchcfm_loop(kind, iters, lr_at=None):
    """torchcfm's own training loop (its MLP, its matcher, Adam, batch 64, seed 7) on the global-stream samplers;
    ``lr_at(k)``: the learning rate set by hand before step ``k``. Returns the trained weights, flattened."""
    from torchcfm.models.models import MLP as RefMLP

    torch.manual_seed(7)
    np.random.seed(7)
    model = RefMLP(dim=2, time_varying=True)
    opt = torch.optim.Adam(model.parameters())
    fm = (ref.ConditionalFlowMatcher if kind == "icfm" else ref.ExactOptimalTransportConditionalFlowMatcher)(0.1)
    for k in range(iters):
        if lr_at is not None:
            opt.param_groups[0]["lr"] = lr_at(k)
        opt.zero_grad()
        x0, x1 = _x0s(64), _x1s(64)
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        torch.mean((model(torch.cat([xt, t[:, None]], dim=-1)) - ut) ** 2).backward()
        opt.step()
    return _flat(model)


@pytest.mark.parametrize("kind", ["icfm", "otcfm"])
def test_train_flow_matching_with_dim_is_torchcfms_training_loop(kind):
    """neurodyn.demos.flows.train_flow_matching(..., dim=2) on global-stream samplers is torchcfm's own training
    loop (its MLP, its matchers, the same seed): the trained weights are bit-equal. Without dim, a probe batch is
    drawn before the initialisation, so the run differs."""
    from neurodyn.demos.flows import train_flow_matching

    theirs = _torchcfm_loop(kind, 20)
    net = train_flow_matching(kind, _x0s, _x1s, iters=20, batch=64, sigma=0.1, seed=7, dim=2)["net"]
    assert torch.equal(_flat(net), theirs)
    probe = train_flow_matching(kind, _x0s, _x1s, iters=20, batch=64, sigma=0.1, seed=7)["net"]
    assert not torch.equal(_flat(probe), theirs)


def test_train_flow_matching_cosine_schedule_is_torchcfms_loop_with_cosine_lr():
    """lr_schedule="cosine" on global-stream samplers: bit-equal weights to torchcfm's own training loop whose Adam
    learning rate is set by hand to 1e-3 (1 + cos(pi k / T)) / 2 before step k (0-based)."""
    import math

    from neurodyn.demos.flows import train_flow_matching

    T = 20
    theirs = _torchcfm_loop("icfm", T, lambda k: 1e-3 * (0.5 * (1.0 + math.cos(math.pi * k / T))))
    net = train_flow_matching("icfm", _x0s, _x1s, iters=T, batch=64, sigma=0.1, seed=7, dim=2,
                              lr_schedule="cosine")["net"]
    assert torch.equal(_flat(net), theirs)
