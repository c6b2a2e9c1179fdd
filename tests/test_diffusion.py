"""Score-based diffusion (VP-SDE): marginals vs quadrature, denoising score matching vs its closed-form excess
loss, reverse-SDE and probability-flow samplers and the probability-flow likelihood vs the exact Gaussian answers
(for Gaussian data the score of every marginal is closed form)."""

import math

import pytest
import torch
from scipy import integrate

from neurodyn.data.toy2d import sample_2d
from neurodyn.errors import InputError
from neurodyn.models import diffusion as dm
from neurodyn.models.flow_matching import VelocityMLP
from neurodyn.transport import wasserstein

BMIN, BMAX = 0.1, 20.0
MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
STD = torch.tensor([0.5, 0.8], dtype=torch.float64)


def _beta(t):
    return BMIN + t * (BMAX - BMIN)


def _alpha_sigma_quad(t):
    """alpha_t = exp(-1/2 int beta) and Var(x_t | x_0) = int_0^t beta(s) exp(-int_s^t beta) ds, by quadrature."""
    ib = integrate.quad(_beta, 0, t, epsabs=1e-14, epsrel=1e-13)[0]
    var = integrate.quad(lambda s: _beta(s) * math.exp(-integrate.quad(_beta, s, t, epsabs=1e-14)[0]), 0, t,
                         epsabs=1e-14, epsrel=1e-12)[0]
    return math.exp(-0.5 * ib), math.sqrt(var)


def _gauss_marginal(t, mu=MU, std=STD):
    """Mean and std of p_t for data N(mu, diag(std^2)): N(alpha mu, alpha^2 std^2 + sigma^2)."""
    la = -0.5 * (BMIN * t + 0.5 * (BMAX - BMIN) * t * t)
    a = math.exp(la)
    return a * mu, torch.sqrt(a * a * std * std + (1 - a * a))


def _exact_score(mu=MU, std=STD):
    def score(t, x):
        t = torch.as_tensor(t, dtype=x.dtype)
        la = -0.5 * (BMIN * t + 0.5 * (BMAX - BMIN) * t * t)
        a = la.exp() if t.dim() == 0 else la.exp()[:, None]
        return -(x - a * mu) / (a * a * std * std + (1 - a * a))
    return score


def _normal(mean, std):
    return torch.distributions.Independent(torch.distributions.Normal(mean, std), 1)


@pytest.mark.parametrize("t", [1e-5, 1e-3, 0.1, 0.5, 1.0])
def test_marginal_coefficients_match_quadrature(t):
    alpha, sigma = dm.VPSDE().marginal_coefficients(torch.tensor(t, dtype=torch.float64))
    a_q, s_q = _alpha_sigma_quad(t)
    assert float(alpha) == pytest.approx(a_q, rel=1e-10)
    assert float(sigma) == pytest.approx(s_q, rel=1e-7)


def test_sde_pieces_and_marginal_shapes():
    sde = dm.VPSDE()
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    torch.testing.assert_close(sde.drift(t, x), -0.5 * _beta(t)[:, None] * x)
    torch.testing.assert_close(sde.diffusion(t, x), _beta(t)[:, None].sqrt().expand(5, 3))
    mean, std = sde.marginal(x, t)
    a = torch.tensor([_alpha_sigma_quad(float(s))[0] for s in t], dtype=torch.float64)
    torch.testing.assert_close(mean, a[:, None] * x, rtol=1e-10, atol=0)
    assert std.shape == (5, 1)


def test_dsm_excess_loss_is_sigma2_weighted_score_error():
    """E[L(s* + v)] - E[L(s*)] = E_t[sigma_t^2] |v|^2 for a constant perturbation v (same draws for both losses);
    the loss gradient along v at the exact score is zero in expectation (unbiased)."""
    torch.manual_seed(0)
    sde, eps, n = dm.VPSDE(), 1e-5, 200_000
    x0 = MU + STD * torch.randn(n, 2, dtype=torch.float64)
    t = eps + (1 - eps) * torch.rand(n, dtype=torch.float64)
    z = torch.randn(n, 2, dtype=torch.float64)
    exact = _exact_score()
    v = torch.tensor([0.3, -0.2], dtype=torch.float64)
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def per_sample(score_fn):
        mean, sigma = sde.marginal(x0, t)
        return (sigma * score_fn(t, mean + sigma * z) + z).pow(2).sum(1)

    base = per_sample(exact)
    pert = per_sample(lambda tt, x: exact(tt, x) + v)
    e_sigma2 = integrate.quad(lambda s: _alpha_sigma_quad(s)[1] ** 2, eps, 1, epsrel=1e-10)[0] / (1 - eps)
    diff = pert - base
    assert float(diff.mean()) == pytest.approx(e_sigma2 * float(v @ v), abs=4 * float(diff.std()) / math.sqrt(n))
    # the library's loss is the mean of the per-sample losses, with the same draws
    loss = dm.denoising_score_matching_loss(lambda tt, x: exact(tt, x) + c * v, x0, sde, t=t, noise=z)
    assert float(loss.detach()) == pytest.approx(float(base.mean()), rel=1e-12)
    (g,) = torch.autograd.grad(loss, c)
    mean, sigma = sde.marginal(x0, t)
    per_grad = 2 * ((sigma * exact(t, mean + sigma * z) + z) * sigma * v).sum(1)   # d/dc of each sample's loss
    assert abs(float(g)) < 4 * float(per_grad.std()) / math.sqrt(n)
    assert float(per_grad.std()) > 0.1  # the bound is not vacuous
    # the perturbed score's loss is larger, by the predicted margin (many samples)
    assert float(pert.mean()) > float(base.mean())


@pytest.mark.parametrize("method,step_size", [("euler", 2e-3), ("srk", None)])
def test_reverse_sde_samples_have_the_marginal_mean_and_std(method, step_size):
    """Exact score, start from the exact p_1: the reverse SDE from t=1 down to eps (Euler--Maruyama, fixed steps;
    SRA1 adaptive at 1e-2) gives p_eps (mean and std within 4 standard errors plus a discretisation allowance)."""
    sde, eps, n = dm.VPSDE(), 1e-3, 5000
    m1, s1 = _gauss_marginal(1.0)
    me, se = _gauss_marginal(eps)
    g = torch.Generator().manual_seed(3)
    z = m1 + s1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    out = dm.reverse_sde_sample(_exact_score(), sde, z, eps=eps, method=method, step_size=step_size, rtol=1e-2,
                                atol=1e-2, entropy=11)
    x = out.samples
    if step_size:
        assert out.nfe == 500
    assert torch.all((x.mean(0) - me).abs() < 4 * se / math.sqrt(n) + 0.005 * se)
    assert torch.all((x.std(0) / se - 1).abs() < 4 / math.sqrt(2 * n) + 0.01)
    # and without the score term the samples are not from p_eps (the check can fail)
    wrong = dm.reverse_sde_sample(lambda t, y: torch.zeros_like(y), sde, z, eps=eps, step_size=2e-3, entropy=11)
    assert torch.any((wrong.samples.mean(0) - me).abs() > 0.5)


def test_probability_flow_maps_prior_to_data_exactly():
    """For isotropic-per-coordinate Gaussian data the PF-ODE flow map is affine:
    x_eps = m_eps + (s_eps / s_1) (x_1 - m_1). dopri5 at 1e-9 reproduces it pointwise; from N(0, I) the samples
    are within W2 sampling noise of the data."""
    sde, eps = dm.VPSDE(), 1e-3
    m1, s1 = _gauss_marginal(1.0)
    me, se = _gauss_marginal(eps)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1000, 2, generator=g, dtype=torch.float64)
    out = dm.probability_flow_sample(_exact_score(), sde, z, eps=eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.samples, me + se / s1 * (z - m1), rtol=0, atol=1e-6)
    assert out.trajectory.shape == (2, 1000, 2) and out.nfe > 0
    data = MU + STD * torch.randn(1000, 2, generator=g, dtype=torch.float64)
    ref = MU + STD * torch.randn(1000, 2, generator=g, dtype=torch.float64)
    w2 = wasserstein(out.samples, data)
    assert w2 < 1.5 * wasserstein(ref, data)
    assert wasserstein(out.samples + 0.5, data) > 2 * w2  # a shifted sampler is caught


def test_probability_flow_log_likelihood_is_the_gaussian_log_density():
    """With the exact score and the exact p_1 as base, CNF.log_prob of the PF-ODE is log p_eps to solver
    tolerance; with the N(0, I) prior it is off by the (small) prior mismatch only."""
    sde, eps = dm.VPSDE(), 1e-5
    m1, s1 = _gauss_marginal(1.0)
    me, se = _gauss_marginal(eps)
    x = me + se * torch.randn(300, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    truth = _normal(me, se).log_prob(x)
    logp, nfe = dm.probability_flow_log_likelihood(_exact_score(), sde, x, eps=eps, base=_normal(m1, s1),
                                                   rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logp, truth, rtol=0, atol=1e-4)
    assert nfe > 0
    logp0, _ = dm.probability_flow_log_likelihood(_exact_score(), sde, x, eps=eps, rtol=1e-7, atol=1e-7)
    assert float((logp0 - truth).abs().mean()) < 0.05


def test_probability_flow_cnf_hutchinson_is_unbiased():
    """Gaussian probes on a 4-d anisotropic Gaussian: the per-sample Hutchinson log-density has mean equal to the
    exact one (4 standard errors) and a non-zero spread."""
    mu = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    std = torch.tensor([0.3, 1.5, 0.7, 2.0], dtype=torch.float64)
    sde, eps = dm.VPSDE(), 1e-3
    m1, s1 = _gauss_marginal(1.0, mu, std)
    me, se = _gauss_marginal(eps, mu, std)
    x = me + se * torch.randn(2000, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    truth = _normal(me, se).log_prob(x)
    flow = dm.probability_flow_cnf(_exact_score(mu, std), sde, 4, eps=eps, trace="hutchinson", noise="gaussian",
                                   base=_normal(m1, s1), rtol=1e-7, atol=1e-7,
                                   generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        err = flow.log_prob(x) - truth
    assert float(err.std()) > 0.05
    assert abs(float(err.mean())) < 4 * float(err.std()) / math.sqrt(x.shape[0])
    # sampling through the same CNF lands on the data marginal (mean, 4 standard errors)
    with torch.no_grad():
        xs, _ = flow.inverse(m1 + s1 * torch.randn(2000, 4, generator=torch.Generator().manual_seed(8),
                                                     dtype=torch.float64))
    assert torch.all((xs.mean(0) - me).abs() < 4 * se / math.sqrt(2000) + 0.02 * se)


def test_score_model_training_decreases_the_loss_on_8gaussians():
    torch.manual_seed(0)
    sde = dm.VPSDE()
    score = dm.ScoreModel(VelocityMLP(2, width=64, depth=2, activation=torch.nn.SiLU), sde)
    g = torch.Generator().manual_seed(1)
    x_eval = sample_2d("8gaussians", 2048, generator=g)
    t_eval = 1e-5 + (1 - 1e-5) * torch.rand(2048, generator=g)
    z_eval = torch.randn(2048, 2, generator=g)

    def eval_loss():
        with torch.no_grad():
            return float(dm.denoising_score_matching_loss(score, x_eval, sde, t=t_eval, noise=z_eval))

    before = eval_loss()
    opt = torch.optim.Adam(score.parameters(), 3e-3)
    for _ in range(30):
        loss = dm.denoising_score_matching_loss(score, sample_2d("8gaussians", 128, generator=g), sde)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_bad_inputs_are_refused():
    sde = dm.VPSDE()
    with pytest.raises(InputError, match="beta_max"):
        dm.VPSDE(beta_min=1.0, beta_max=0.5)
    with pytest.raises(InputError, match="beta_min"):
        dm.VPSDE(beta_min=-1.0)
    with pytest.raises(InputError, match=r"\(B, d\)"):
        dm.denoising_score_matching_loss(_exact_score(), torch.zeros(3), sde)
    with pytest.raises(InputError, match="eps"):
        dm.probability_flow_sample(_exact_score(), sde, torch.zeros(3, 2), eps=0.0)
    with pytest.raises(InputError, match="step_size"):
        dm.reverse_sde_sample(_exact_score(), sde, torch.zeros(3, 2), step_size=2.0)
    with pytest.raises(InputError, match="sde must be a VPSDE"):
        dm.ScoreModel(VelocityMLP(2), "vp")


@pytest.mark.slow  # ~10-25 s: trains, samples twice, a likelihood solve, three exact W2
def test_diffusion_demo_writes_its_metrics(tmp_path):
    import json

    from neurodyn.demos.diffusion import diffusion_experiment

    m = diffusion_experiment(tmp_path, iters=20, batch=64, sde_steps=25, test_n=100, plots=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert m["reverse_sde_nfe"] == 25 and saved["reverse_sde_nfe"] == 25
    assert saved["test_nll"] == pytest.approx(m["test_nll"], rel=1e-12)
    assert saved["w2_probability_flow"] == pytest.approx(m["w2_probability_flow"], rel=1e-12)
    assert m["w2_data_vs_data"] < m["w2_reverse_sde"]  # 20 iterations cannot match the data
