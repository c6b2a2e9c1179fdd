"""Data tooling for irregular series: collate/uncollate/compact round trips, masks, splits, normalisation and the
generated data sets against their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from neurodyn.data import (
    Normalizer,
    collate,
    compact,
    extrapolation_masks,
    interpolation_mask,
    pendulum,
    periodic_toy,
    spirals,
    split_indices,
    uncollate,
)
from neurodyn.errors import InputError

pytestmark = pytest.mark.usefixtures("single_thread")


def _series(seed=0, n=7, channels=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 12, (1,), generator=g))
        t = torch.rand(k, generator=g, dtype=torch.float64).sort().values * 10
        x = torch.randn(k, channels, generator=g, dtype=torch.float64)
        x[torch.rand(k, channels, generator=g) < 0.3] = float("nan")
        out.append((t, x))
    return out


def test_collate_uncollate_round_trip_and_padding():
    samples = _series()
    b = collate(samples)
    B, T, C = b.values.shape
    assert (B, C) == (7, 3) and T == max(len(t) for t, _ in samples)
    for i, (t, x) in enumerate(samples):
        n = len(t)
        assert int(b.lengths[i]) == n
        assert torch.equal(b.times[i, n:], t[-1].expand(T - n))  # padded by repeating the last time
        assert float(b.mask[i, n:].abs().sum()) == 0.0
        assert torch.equal(b.mask[i, :n] != 0, ~torch.isnan(x))
    back = uncollate(b)
    for (t, x), (t2, x2, m2) in zip(samples, back):
        assert torch.equal(t, t2)
        assert torch.equal(torch.isnan(x), torch.isnan(x2)) and torch.equal(x.nan_to_num(), x2.nan_to_num())
        assert torch.equal(m2, ~torch.isnan(x))
    assert b.valid.sum().item() == sum(len(t) for t, _ in samples)


def test_collate_explicit_mask_and_errors():
    t = torch.tensor([0.0, 1.0])
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = collate([(t, x, torch.tensor([[1, 0], [0, 1]]))])
    assert b.values[0].tolist() == [[1.0, 0.0], [0.0, 4.0]]
    with pytest.raises(InputError, match="channels"):
        collate([(t, x), (t, x[:, :1])])
    with pytest.raises(InputError, match="nondecreasing"):
        collate([(t.flip(0), x)])
    with pytest.raises(InputError, match="no samples"):
        collate([])


def test_compact_keeps_exactly_each_rows_observed_points():
    g = torch.Generator().manual_seed(3)
    t = torch.rand(5, 20, generator=g).sort(-1).values
    x = torch.randn(5, 20, 2, generator=g)
    m = (torch.rand(5, 20, 2, generator=g) < 0.4).float()
    m[2] = 0.0  # a row with no observation
    b = compact(t, x, m)
    for i in range(5):
        rows = (m[i].amax(-1) > 0).nonzero().flatten()
        n = len(rows)
        assert int(b.lengths[i]) == n
        assert torch.equal(b.times[i, :n], t[i, rows])
        assert torch.equal(b.values[i, :n], (x * m)[i, rows]) and torch.equal(b.mask[i, :n], m[i, rows])
        assert float(b.mask[i, n:].sum()) == 0.0
        if n:
            assert bool((b.times[i, n:] == t[i, rows[-1]]).all())
    # the round trip through uncollate gives the observed entries back
    for i, (ti, _, mi) in enumerate(uncollate(b)):
        rows = (m[i].amax(-1) > 0).nonzero().flatten()
        assert torch.equal(ti, t[i, rows]) and torch.equal(mi, m[i, rows] != 0)


def test_interpolation_mask_keeps_whole_points_of_the_mask():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 40, 2, generator=g) < 0.7).float()
    sub = interpolation_mask(mask, 10, torch.Generator().manual_seed(1))
    present = mask.amax(-1) > 0
    kept = sub.amax(-1) > 0
    assert torch.equal(kept.sum(-1), present.sum(-1).clamp(max=10))
    assert bool((sub <= mask).all())
    assert torch.equal(sub[kept], mask[kept])  # a kept point keeps all its channels
    half = interpolation_mask(mask, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal((half.amax(-1) > 0).sum(-1), (present.sum(-1).double() * 0.5).round().long())
    with pytest.raises(InputError):
        interpolation_mask(mask, 1.5)


def test_extrapolation_masks_partition_at_the_split():
    t = torch.rand(4, 30, generator=torch.Generator().manual_seed(2)).sort(-1).values
    mask = torch.ones(4, 30, 1)
    obs, pred = extrapolation_masks(t, mask)
    assert torch.equal(obs + pred, mask)
    mid = (t[:, 0] + t[:, -1]) / 2
    assert bool((t[obs[..., 0] > 0] <= mid.repeat_interleave(obs[..., 0].sum(-1).long())).all())
    for i in range(4):
        assert bool((t[i][pred[i, :, 0] > 0] > mid[i]).all()) and bool((t[i][obs[i, :, 0] > 0] <= mid[i]).all())


def test_split_indices_disjoint_cover():
    parts = split_indices(101, (0.8, 0.1, 0.1), seed=4)
    assert [len(p) for p in parts] == [81, 10, 10]
    assert sorted(torch.cat(parts).tolist()) == list(range(101))
    with pytest.raises(InputError):
        split_indices(10, (0.5, 0.6))


def test_normalizer_matches_numpy_masked_statistics():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 12, 3, generator=g, dtype=torch.float64) * 3 + 2
    m = (torch.rand(8, 12, 3, generator=g) < 0.6).double()
    n = Normalizer.fit(x, m)
    xn, mn = x.numpy().reshape(-1, 3), m.numpy().reshape(-1, 3) > 0
    for c in range(3):
        v = xn[mn[:, c], c]
        assert n.mean[c].item() == pytest.approx(v.mean(), rel=1e-12)
        assert n.std[c].item() == pytest.approx(v.std(), rel=1e-12)
    assert torch.allclose(n.inverse(n.transform(x)), x, atol=1e-12)


def test_periodic_toy_is_the_papers_sine_family():
    t, x = periodic_toy(n_series=6, n_points=100, t_max=5.0, noise=0.01, seed=7, dtype=torch.float64)
    assert bool((t == t[0]).all()) and t[0, 0] == 0 and float(t[0, -1]) <= 5.0 and bool((t[0].diff() >= 0).all())
    offset = x[:, 0, 0]  # sin(0) = 0 and no noise at t_0
    assert float((offset - 1).abs().max()) < 0.5  # N(1, 0.1^2)
    grid = torch.linspace(0.4, 0.8, 40001, dtype=torch.float64)
    for i in range(6):
        resid = x[i, :, 0] - offset[i] - torch.sin(2 * math.pi * grid[:, None] * t[0])  # (F, T)
        ok = ((resid[:, 1:] >= -5e-4) & (resid[:, 1:] <= 0.01 + 5e-4)).all(-1)  # grid step 1e-5: |error| < 3.2e-4
        assert bool(ok.any()), f"series {i}: no frequency in [0.4, 0.8] fits within the U[0, 0.01) noise"


def test_pendulum_matches_scipy():
    t, x = pendulum(n_series=3, n_points=15, t_max=5.0, noise=0.0, seed=2, dtype=torch.float64)
    for i in range(3):
        sol = solve_ivp(lambda _t, y: [y[1], -9.81 * np.sin(y[0]) - 0.1 * y[1]], (0.0, float(t[i, -1])),
                        x[i, 0].numpy(), t_eval=t[i].numpy(), rtol=1e-11, atol=1e-12, method="DOP853")
        assert np.abs(sol.y.T - x[i].numpy()).max() < 1e-6


def test_spirals_decay_and_turn_as_defined():
    t, z = spirals(n_series=6, n_points=40, noise=0.0, seed=1, dtype=torch.float64)
    logr = z.norm(dim=-1).log()
    for i in range(6):  # log radius linear in t: r e^{-a t}
        coef = np.polyfit(t[i].numpy(), logr[i].numpy(), 1)
        assert np.abs(np.polyval(coef, t[i].numpy()) - logr[i].numpy()).max() < 1e-10
        assert 0.05 - 1e-9 <= -coef[0] <= 0.2 + 1e-9
        ang = torch.atan2(z[i, :, 1], z[i, :, 0])
        turn = torch.remainder(ang.diff() + math.pi, 2 * math.pi) - math.pi
        w = turn / t[i].diff()
        ok = t[i].diff() * 1.5 < math.pi  # unambiguous angle changes
        assert float(w[ok].std()) < 1e-8 and 0.5 - 1e-9 <= float(w[ok].abs().mean()) <= 1.5 + 1e-9
