"""Path augmentations (``neurodyn.paths.augment``): the running integral against scipy's cumulative trapezoid and a
closed form, its gradients against finite differences, the basepoint's points and times, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
import torch

from neurodyn.errors import InputError
from neurodyn.paths import LinearPath, basepoint, cumulative_integral

pytestmark = pytest.mark.usefixtures("single_thread")


def _irregular(batch: tuple[int, ...], T: int, C: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.cumsum(0.1 + torch.rand(T, generator=g, dtype=torch.float64), 0) - 0.7
    x = torch.randn(*batch, T, C, generator=g, dtype=torch.float64)
    x = x.masked_fill(torch.rand(*batch, T, C, generator=g, dtype=torch.float64) < 0.4, float("nan"))
    return x, t


@pytest.mark.parametrize("batch", [(), (3,), (2, 4)])
def test_cumulative_integral_matches_scipy_per_channel_over_its_observed_points(batch):
    x, t = _irregular(batch, 11, 3, seed=len(batch))
    x[(0,) * len(batch) + (slice(None), 1)] = float("nan")  # a channel never observed
    x[(0,) * len(batch) + (slice(None), 2)] = float("nan")
    x[(0,) * len(batch) + (5, 2)] = 0.7  # a channel observed once
    z = cumulative_integral(x, t)
    assert z.shape == x.shape
    assert torch.equal(torch.isnan(z), torch.isnan(x))  # missing where the data are
    flat_x, flat_z = x.reshape(-1, 11, 3), z.reshape(-1, 11, 3)
    checked = 0
    for b in range(flat_x.shape[0]):
        for c in range(3):
            seen = ~torch.isnan(flat_x[b, :, c])
            if not bool(seen.any()):
                continue
            want = scipy.integrate.cumulative_trapezoid(flat_x[b, seen, c].numpy(), t[seen].numpy(), initial=0)
            assert np.allclose(flat_z[b, seen, c].numpy(), want, rtol=0, atol=1e-13), (b, c)
            checked += int(seen.sum())
    assert checked > 0.5 * flat_x[..., 0].numel()


def test_cumulative_integral_is_exact_for_data_linear_in_time():
    # the trapezoid rule integrates a linear function exactly: Z(s) = a (s - s0) + b (s^2 - s0^2) / 2
    t = torch.tensor([0.0, 0.3, 1.0, 1.1, 2.5, 4.0], dtype=torch.float64)
    a, b = torch.tensor([1.5, -2.0]), torch.tensor([0.5, 3.0])
    x = (a + b * t[:, None]).to(torch.float64)
    x[0, 0] = x[3, 0] = x[4, 1] = float("nan")
    z = cumulative_integral(x, t)
    for c in range(2):
        seen = ~torch.isnan(x[:, c])
        s = t[seen]
        want = a[c] * (s - s[0]) + b[c] * (s ** 2 - s[0] ** 2) / 2
        assert torch.allclose(z[seen, c], want.to(torch.float64), rtol=0, atol=1e-13)


def test_cumulative_integral_defaults_to_unit_spacing_and_float32():
    x = torch.tensor([[[1.0, 2.0], [3.0, float("nan")], [5.0, 6.0]]])
    z = cumulative_integral(x)
    assert z.dtype == torch.float32
    assert torch.allclose(z[0, :, 0], torch.tensor([0.0, 2.0, 6.0]))
    assert z[0, 0, 1] == 0.0 and torch.isnan(z[0, 1, 1]) and z[0, 2, 1] == 8.0  # (6 + 2) / 2 * 2


def test_cumulative_integral_gradients_match_finite_differences():
    x, t = _irregular((2,), 7, 2, seed=5)
    seen = ~torch.isnan(x)
    vals = x[seen].clone().requires_grad_(True)
    tt = t.clone().requires_grad_(True)

    def f(v, s):
        full = torch.full_like(x, float("nan")).masked_scatter(seen, v)
        return cumulative_integral(full, s)[seen]

    assert torch.autograd.gradcheck(f, (vals, tt), eps=1e-6, atol=1e-8)


def test_basepoint_prepends_a_zero_point_at_the_previous_spacing():
    x = torch.tensor([[[2.0, -1.0], [3.0, float("nan")], [4.0, 0.5]]], dtype=torch.float64)
    t = torch.tensor([1.0, 1.5, 3.0], dtype=torch.float64)
    xb, tb = basepoint(x, t)
    assert xb.shape == (1, 4, 2) and torch.equal(xb[:, 1:].nan_to_num(7.0), x.nan_to_num(7.0))
    assert torch.equal(xb[:, 0], torch.zeros(1, 2, dtype=torch.float64))
    assert torch.equal(tb, torch.tensor([0.5, 1.0, 1.5, 3.0], dtype=torch.float64))
    # the path through the basepoint carries the first observation as the increment of its first piece
    path = LinearPath(tb, xb)
    assert torch.equal(path.evaluate(1.0) - path.evaluate(0.5), x[:, 0])
    # explicit spacing, batched times (one row per series), default times
    _, tb2 = basepoint(x.expand(2, 3, 2), torch.stack([t, t + 1]), dt=0.25)
    assert torch.equal(tb2[:, 0], torch.tensor([0.75, 1.75], dtype=torch.float64))
    _, tb3 = basepoint(x)
    assert torch.equal(tb3, torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64))


def test_augmentations_refuse_bad_input_with_a_clear_error():
    x = torch.zeros(2, 4, 3)
    with pytest.raises(InputError, match="cumulative_integral: t must be finite and strictly increasing"):
        cumulative_integral(x, torch.tensor([0.0, 1.0, 1.0, 2.0]))
    with pytest.raises(InputError, match="cumulative_integral: t must have shape \\(T,\\) with T = 4"):
        cumulative_integral(x, torch.arange(5.0))
    with pytest.raises(InputError, match="cumulative_integral: the data must be floating point"):
        cumulative_integral(torch.zeros(2, 4, 3, dtype=torch.int64))
    with pytest.raises(InputError, match="basepoint: dt must be positive"):
        basepoint(x, dt=0.0)
    with pytest.raises(InputError, match="basepoint: t must be a floating tensor of shape \\(T,\\) or \\(..., T\\)"):
        basepoint(x, torch.arange(3.0))
    with pytest.raises(InputError, match="basepoint: t must be finite and strictly increasing"):
        basepoint(x, torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 1.0, 3.0]]))
    with pytest.raises(InputError, match="basepoint: at least 2 observation times"):
        basepoint(torch.zeros(1, 3))
