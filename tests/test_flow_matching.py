"""Flow matching: conditional paths vs their time derivatives, OT pairing vs POT, W2 vs closed forms,
sampler NFE, exact likelihood and straightness vs closed forms for linear fields."""

import math

import numpy as np
import pytest
import torch

from neurodyn import transport
from neurodyn.errors import InputError
from neurodyn.models import flow_matching as fm


def _xy(n=32, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64) + 2


@pytest.mark.parametrize("matcher", [
    fm.ConditionalFlowMatcher(0.3),
    fm.TargetConditionalFlowMatcher(0.05),
    fm.SchrodingerBridgeConditionalFlowMatcher(0.6),
    fm.VariancePreservingConditionalFlowMatcher(0.2),
])
def test_conditional_velocity_is_time_derivative_of_the_path(matcher):
    """u_t(x | x0, x1) must be d/dt of the conditional flow psi_t(eps) = mu_t + sigma_t eps (central differences)."""
    x0, x1 = _xy()
    eps = torch.randn_like(x0)
    t = torch.linspace(0.1, 0.9, x0.shape[0], dtype=torch.float64)
    h = 1e-6
    psi = lambda s: matcher.sample_xt(x0, x1, s, eps)  # noqa: E731
    fd = (psi(t + h) - psi(t - h)) / (2 * h)
    ut = matcher.compute_conditional_flow(x0, x1, t, psi(t))
    tol = 1e-6 if not isinstance(matcher, fm.SchrodingerBridgeConditionalFlowMatcher) else 1e-6
    torch.testing.assert_close(ut, fd, atol=tol, rtol=tol)


def test_paths_closed_forms_and_end_points():
    x0, x1 = _xy()
    t = torch.full((x0.shape[0],), 0.25, dtype=torch.float64)
    eps = torch.randn_like(x0)
    icfm = fm.ConditionalFlowMatcher(0.2)
    torch.testing.assert_close(icfm.sample_xt(x0, x1, t, eps), 0.25 * x1 + 0.75 * x0 + 0.2 * eps)
    vp = fm.VariancePreservingConditionalFlowMatcher(0.0)
    torch.testing.assert_close(vp.sample_xt(x0, x1, t, eps), math.cos(math.pi / 8) * x0 + math.sin(math.pi / 8) * x1)
    sb = fm.SchrodingerBridgeConditionalFlowMatcher(0.5)
    torch.testing.assert_close(sb.compute_sigma_t(t), torch.full_like(t, 0.5 * math.sqrt(0.25 * 0.75)))
    tg = fm.TargetConditionalFlowMatcher(0.0)   # rectified flow from noise: x_t = t x1 + (1 - t) eps
    torch.testing.assert_close(tg.sample_xt(x0, x1, t, eps), 0.25 * x1 + 0.75 * eps)
    one, zero = torch.ones(x0.shape[0], dtype=torch.float64), torch.zeros(x0.shape[0], dtype=torch.float64)
    torch.testing.assert_close(fm.ConditionalFlowMatcher(0.0).sample_xt(x0, x1, one, eps), x1)
    torch.testing.assert_close(vp.sample_xt(x0, x1, zero, eps), x0)


def test_exact_plan_fallback_equals_pot_plan(monkeypatch):
    ot = pytest.importorskip("ot")
    x0, x1 = _xy(60, 2, seed=5)
    M = transport.cost_matrix(x0, x1)
    pi_pot = ot.emd(ot.unif(60), ot.unif(60), M)
    monkeypatch.setattr(transport, "have_pot", lambda: False)
    pi = transport.exact_plan(M)
    np.testing.assert_allclose(pi, pi_pot, atol=1e-15)
    assert float((pi * M).sum()) == pytest.approx(ot.emd2(ot.unif(60), ot.unif(60), M), rel=1e-12)


def test_ot_pairing_of_a_translation_is_the_identity():
    """Exact OT between x and a permuted copy of x + c (squared cost) pairs every point with its own translate."""
    x0, _ = _xy(40, 2, seed=1)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    x1 = (x0 + torch.tensor([5.0, -1.0], dtype=torch.float64))[perm]
    np.random.seed(0)
    a, b = fm.OTPlanSampler("exact").sample_plan(x0, x1)
    torch.testing.assert_close(b - a, torch.tensor([5.0, -1.0], dtype=torch.float64).expand(40, 2))


def _sqrtm(S):
    w, V = np.linalg.eigh(S)
    return V @ np.diag(np.sqrt(np.clip(w, 0, None))) @ V.T


def _bures_w2(m1, S1, m2, S2):
    s2h = _sqrtm(S2)
    return math.sqrt(float(np.sum((m1 - m2) ** 2) + np.trace(S1 + S2 - 2 * _sqrtm(s2h @ S1 @ s2h))))


def test_w2_of_gaussian_samples_vs_bures():
    """Samples x ~ N(m1, I) pushed by the Gaussian OT map T(x) = m2 + S2^(1/2) (x - m1) (the gradient of a convex
    function, so the identity pairing is an optimal discrete plan): the exact W2 between {x_i} and {T x_i} equals
    sqrt(mean |x_i - T x_i|^2) to round-off, and that agrees with the Bures closed form within sampling error."""
    g = torch.Generator().manual_seed(0)
    n = 800
    S2 = np.array([[1.5, 0.6], [0.6, 0.5]])
    m1, m2 = np.zeros(2), np.array([3.0, 1.0])
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.as_tensor(m2) + x @ torch.as_tensor(_sqrtm(S2)).T
    perm = torch.randperm(n, generator=g)
    w2 = transport.wasserstein(x, y[perm])
    sq = ((x - y) ** 2).sum(1)
    assert w2 == pytest.approx(math.sqrt(float(sq.mean())), rel=1e-9)
    exact = _bures_w2(m1, np.eye(2), m2, S2)
    se = float(sq.std()) / math.sqrt(n) / (2 * exact)   # delta method: standard error of sqrt(mean)
    assert abs(w2 - exact) < 4 * se


def test_w2_one_dimensional_is_sorted_matching():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 1, generator=g, dtype=torch.float64), torch.rand(300, 1, generator=g, dtype=torch.float64)
    exact = math.sqrt(float(((x.sort(0).values - y.sort(0).values) ** 2).mean()))
    assert transport.wasserstein(x, y) == pytest.approx(exact, rel=1e-10)
    w1 = float((x.sort(0).values - y.sort(0).values).abs().mean())
    assert transport.wasserstein(x, y, power=1) == pytest.approx(w1, rel=1e-10)


def test_sampler_nfe_and_labels():
    x0 = torch.randn(50, 2, dtype=torch.float64)
    shifts = torch.tensor([[1.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    field = lambda t, x, y: shifts[y].expand_as(x)  # noqa: E731
    y = torch.arange(50) % 2
    out = fm.sample_flow(field, x0, y=y, method="rk4", step_size=0.1, n_times=11)
    torch.testing.assert_close(out.samples, x0 + shifts[y])
    # 10 RK4 steps of 4 stages, plus the loop's one evaluation at t0
    assert out.stats["steps"] == 10 and out.nfe == 41 and out.trajectory.shape == (11, 50, 2)
    ad = fm.sample_flow(lambda t, x: -x, x0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ad.samples, x0 * math.exp(-1.0), atol=1e-7, rtol=1e-7)
    assert ad.nfe > 0
    with pytest.raises(InputError, match="n_times"):
        fm.sample_flow(field, x0, n_times=1)


def test_exact_log_likelihood_of_a_linear_flow():
    """v = A x: x(1) = expm(A) x(0), so log p_1(x) = log N(expm(-A) x; 0, I) - tr(A)."""
    A = torch.tensor([[0.3, -0.8], [0.5, -0.4]], dtype=torch.float64)
    x1 = torch.randn(20, 2, dtype=torch.float64)
    logp, nfe = fm.flow_log_likelihood(lambda t, x: x @ A.T, x1, rtol=1e-10, atol=1e-10)
    z = x1 @ torch.linalg.matrix_exp(-A).T
    exact = -0.5 * (z**2).sum(1) - math.log(2 * math.pi) - torch.trace(A)
    torch.testing.assert_close(logp, exact, atol=1e-8, rtol=1e-8)
    assert nfe > 0


def test_straightness_closed_forms():
    x0 = torch.randn(100, 2, dtype=torch.float64)
    assert fm.path_straightness(lambda t, x: torch.ones_like(x), x0) == pytest.approx(1.0, abs=1e-10)
    theta = 2.0   # rotation by theta over unit time: arc theta |x| vs chord 2 |x| sin(theta / 2)
    R = torch.tensor([[0.0, -theta], [theta, 0.0]], dtype=torch.float64)
    s = fm.path_straightness(lambda t, x: x @ R.T, x0, rtol=1e-9, atol=1e-9)
    assert s == pytest.approx(theta**2 / (4 * math.sin(theta / 2) ** 2), rel=1e-6)


def test_cfm_loss_value_and_class_conditioning():
    net = fm.VelocityMLP(2, width=16, num_classes=3).double()
    x0, x1 = _xy(32, 2)
    y0, y1 = torch.arange(32) % 3, (torch.arange(32) + 1) % 3
    matcher = fm.ExactOptimalTransportConditionalFlowMatcher(0.1)
    torch.manual_seed(0)
    np.random.seed(0)
    loss = fm.cfm_loss(net, matcher, x0, x1, y0, y1)
    torch.manual_seed(0)
    np.random.seed(0)
    t, xt, ut, _, y1p = matcher.guided_sample_location_and_conditional_flow(x0, x1, y0, y1)
    torch.testing.assert_close(loss, ((net(t, xt, y1p) - ut) ** 2).mean())
    with pytest.raises(InputError, match="class-conditional"):
        net(0.5, x0)
    with pytest.raises(InputError, match="same sample shape"):
        fm.cfm_loss(net, matcher, x0, torch.zeros(32, 3, dtype=torch.float64))


@pytest.mark.slow
def test_flows_demo_small_run(tmp_path):
    import json

    from neurodyn.demos.flows import flows_experiment

    m = flows_experiment(tmp_path, ("8gaussians",), iters=20, test_n=150, ffjord=False, plots=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for kind in ("icfm", "otcfm"):
        r = m["8gaussians"][kind]
        assert saved["8gaussians"][kind]["w2"] == pytest.approx(r["w2"], rel=1e-12)
        assert r["straightness"] >= 1 - 1e-6          # Cauchy-Schwarz: kinetic energy >= squared displacement
        assert r["iters"] == 20 and r["sample_nfe"] > 0 and r["nll_nfe"] > 0
        # cross-entropy against the data density is at least its entropy (2.84 nats) up to test-set noise
        assert r["test_nll"] > 2.84 - 0.3


def _toy_samplers(seed=5):
    g = torch.Generator().manual_seed(seed)
    return (lambda n: torch.randn(n, 2, generator=g) * 0.5 + torch.tensor([2.0, 0.0]),
            lambda n: torch.rand(n, 2, generator=g) * 2 - 1)


def _flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_train_flow_matching_ema_is_the_weighted_sum_of_the_iterates():
    """ema_decay=d: the returned average equals d^(T-1) p_1 + sum_{k>=2} (1-d) d^(T-k) p_k over the last iterates
    p_k of a run without the average (float64 sum of recorded iterates), and the average does not change training:
    the last iterate is bit-equal to that run's."""
    from neurodyn.demos.flows import train_flow_matching

    T, d = 25, 0.8
    iterates = []
    plain = train_flow_matching("icfm", *_toy_samplers(), iters=T, batch=32, seed=3, dim=2, eval_every=1,
                                on_eval=lambda it, net: iterates.append(_flat(net).double()) and False)
    r = train_flow_matching("icfm", *_toy_samplers(), iters=T, batch=32, seed=3, dim=2, ema_decay=d)
    assert len(iterates) == T and plain["ema_net"] is None
    assert torch.equal(_flat(r["net"]), _flat(plain["net"]))
    expected = d ** (T - 1) * iterates[0] + sum((1 - d) * d ** (T - k) * iterates[k - 1] for k in range(2, T + 1))
    got = _flat(r["ema_net"]).double()
    assert (got - expected).abs().max() < 1e-6
    assert (got - iterates[-1]).abs().max() > 1e-3      # the average is not the last iterate


def test_train_flow_matching_cosine_schedule_lr_sequence():
    """lr_schedule="cosine": the learning rate of iteration k (1-based) is lr (1 + cos(pi (k-1) / T)) / 2;
    constant without a schedule; bad options are refused before any work."""
    from neurodyn.demos.flows import train_flow_matching

    T, lr = 40, 3e-3
    r = train_flow_matching("icfm", *_toy_samplers(), iters=T, batch=16, lr=lr, dim=2, lr_schedule="cosine")
    expected = lr * (1 + np.cos(np.pi * np.arange(T) / T)) / 2
    np.testing.assert_allclose(r["lrs"], expected, rtol=1e-14, atol=0)
    assert r["lrs"][0] == lr and r["lrs"][T // 2] == pytest.approx(lr / 2, rel=1e-14)
    const = train_flow_matching("icfm", *_toy_samplers(), iters=5, batch=16, lr=lr, dim=2)
    assert const["lrs"] == [lr] * 5
    with pytest.raises(InputError, match="lr_schedule"):
        train_flow_matching("icfm", *_toy_samplers(), iters=5, lr_schedule="linear")
    with pytest.raises(InputError, match="ema_decay"):
        train_flow_matching("icfm", *_toy_samplers(), iters=5, ema_decay=1.0)


def test_flows_demo_evaluates_the_weight_average_when_asked(tmp_path):
    from neurodyn.demos.flows import evaluate_flow, flows_experiment, sample_2d, train_flow_matching

    m = flows_experiment(tmp_path, ("8gaussians",), iters=4, test_n=64, ffjord=False, plots=False, ema_decay=0.5)
    assert m["settings"]["ema_decay"] == 0.5
    # the same run by hand (the demo's seeds: batches from seed + 1, test set seed + 2, sampling noise seed + 3)
    gen = torch.Generator().manual_seed(1)
    r = train_flow_matching("icfm", lambda n: torch.randn(n, 2, generator=gen),
                            lambda n: sample_2d("8gaussians", n, generator=gen), iters=4, batch=256, sigma=0.1,
                            lr=1e-3, seed=0, ema_decay=0.5)
    test = sample_2d("8gaussians", 64, generator=torch.Generator().manual_seed(2))
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    ema, last = evaluate_flow(r["ema_net"], x0, test), evaluate_flow(r["net"], x0, test)
    assert m["8gaussians"]["icfm"]["w2"] == pytest.approx(ema["w2"], rel=1e-9)
    assert abs(ema["w2"] - last["w2"]) > 1e-6  # the average is not the last iterate
