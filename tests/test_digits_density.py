"""Digits density helpers of neurodyn.demos.ffjord: the dequantise-logit map's log-determinant vs autograd, its
inverse, bits/dim, and the maximum-likelihood Gaussian vs NumPy."""

import math

import numpy as np
import torch

from neurodyn.demos.ffjord import DIGIT_LEVELS, bits_per_dim, dequantise_logit, fit_gaussian, logit_to_pixels


def test_dequantise_logit_logdet_matches_autograd_and_inverts():
    levels = torch.randint(0, DIGIT_LEVELS, (6, 5), generator=torch.Generator().manual_seed(0)).double()
    y, logdet = dequantise_logit(levels, torch.Generator().manual_seed(1))
    u = torch.rand(levels.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = levels + u                                          # the dequantised value the density is of
    torch.testing.assert_close(logit_to_pixels(y), x / DIGIT_LEVELS, rtol=0, atol=1e-12)
    # y = logit(0.05 + 0.9 (v + u) / 17) (checked above through its inverse); its log|det| by autograd
    for i in range(levels.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: torch.logit(0.05 + 0.9 * v / DIGIT_LEVELS), x[i])
        assert abs(float(torch.linalg.slogdet(jac)[1]) - float(logdet[i])) < 1e-10


def test_bits_per_dim_and_gaussian_fit():
    assert bits_per_dim(torch.full((4,), -64 * math.log(2), dtype=torch.float64), 64) == 1.0
    y = torch.randn(400, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.2, 0.0], [0.0, 0.5, 0.3], [0.0, 0.0, 2.0]], dtype=torch.float64)
    g = fit_gaussian(y, jitter=0.0)
    np.testing.assert_allclose(g.covariance_matrix.numpy(), np.cov(y.numpy().T, bias=True), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g.mean.numpy(), y.numpy().mean(0), rtol=1e-12, atol=1e-14)
