"""Batches of irregularly sampled series: collate, split back, masks for interpolation / extrapolation,
train/val/test splits and masked normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError


@dataclass
class IrregularBatch:
    """A padded batch of irregularly sampled series.

    Attributes
    ----------
    times : Tensor, shape ``(B, T)``
        Each row's observation times, nondecreasing; a row shorter than ``T`` is padded by repeating its last time
        (a padded step has length 0, which the recurrent encoders skip). ``neurodyn.solve`` refuses repeated
        times, so a per-sample solve on these rows needs the padding replaced by increasing times (its outputs
        there are then ignored through ``lengths``/``mask``).
    values : Tensor, shape ``(B, T, C)``
        Observed values; 0 wherever ``mask`` is 0 (missing or padding).
    mask : Tensor, shape ``(B, T, C)``
        1 where a value is observed, 0 where it is missing or padding (values' dtype).
    lengths : Tensor, shape ``(B,)``, int64
        Number of real (unpadded) time points of each row.
    """

    times: Tensor
    values: Tensor
    mask: Tensor
    lengths: Tensor

    @property
    def valid(self) -> Tensor:
        """``(B, T)`` bool: True on the real (unpadded) time points."""
        T = self.times.shape[1]
        return torch.arange(T, device=self.times.device) < self.lengths[:, None]

    def to(self, *args, **kwargs) -> IrregularBatch:
        """The batch moved / cast like ``Tensor.to`` (``lengths`` stays int64)."""
        return IrregularBatch(self.times.to(*args, **kwargs), self.values.to(*args, **kwargs),
                              self.mask.to(*args, **kwargs), self.lengths.to(device=self.times.device))


def collate(samples: Sequence[tuple[Tensor, ...]]) -> IrregularBatch:
    """Collate variable-length irregular series into an :class:`IrregularBatch` (a ``DataLoader`` ``collate_fn``).

    Parameters
    ----------
    samples : sequence of ``(times, values)`` or ``(times, values, mask)``
        ``times`` shape ``(n_i,)`` nondecreasing, ``values`` shape ``(n_i, C)`` with NaN for a missing value (when
        no mask is given), ``mask`` shape ``(n_i, C)`` (nonzero: observed). ``n_i >= 1``; ``C`` the same for all.

    Returns
    -------
    IrregularBatch
        ``times (B, T)`` padded by repeating each row's last time, ``values (B, T, C)`` with 0 at missing and padded
        entries, ``mask (B, T, C)``, ``lengths (B,)``; ``T = max n_i``.

    Examples
    --------
    >>> import torch
    >>> b = collate([(torch.tensor([0.0, 0.5]), torch.tensor([[1.0], [2.0]])),
    ...              (torch.tensor([0.25]), torch.tensor([[float("nan")]]))])
    >>> b.times.tolist(), b.mask[..., 0].tolist(), b.lengths.tolist()
    ([[0.0, 0.5], [0.25, 0.25]], [[1.0, 1.0], [0.0, 0.0]], [2, 1])
    """
    if len(samples) == 0:
        raise InputError("collate: got no samples; pass at least one (times, values[, mask]) tuple.")
    channels = None
    rows = []
    for i, s in enumerate(samples):
        if len(s) not in (2, 3):
            raise InputError(f"collate: sample {i} has {len(s)} parts; pass (times, values) or (times, values, mask).")
        t, x = torch.as_tensor(s[0]), torch.as_tensor(s[1])
        if t.dim() != 1 or t.numel() == 0:
            raise InputError(f"collate: sample {i}: times must be 1-D and non-empty, got shape {tuple(t.shape)}.")
        if x.dim() != 2 or x.shape[0] != t.shape[0]:
            raise InputError(f"collate: sample {i}: values must have shape (n, C) with n = len(times) = {t.shape[0]}, "
                             f"got {tuple(x.shape)}.")
        if channels is None:
            channels = x.shape[1]
        elif x.shape[1] != channels:
            raise InputError(f"collate: sample {i} has {x.shape[1]} channels, sample 0 has {channels}; all samples "
                             f"need the same channels (use NaN or a 0 mask for a missing channel).")
        if t.numel() > 1 and bool((t[1:] < t[:-1]).any()):
            raise InputError(f"collate: sample {i}: times must be nondecreasing; sort each series by time first.")
        if len(s) == 3:
            m = torch.as_tensor(s[2])
            if m.shape != x.shape:
                raise InputError(f"collate: sample {i}: mask shape {tuple(m.shape)} differs from values shape "
                                 f"{tuple(x.shape)}.")
            m = m != 0
        else:
            m = ~torch.isnan(x)
        rows.append((t, x, m))
    B, T = len(rows), max(r[0].shape[0] for r in rows)
    dtype = rows[0][1].dtype if rows[0][1].is_floating_point() else torch.get_default_dtype()
    times = torch.empty(B, T, dtype=rows[0][0].dtype if rows[0][0].is_floating_point() else dtype)
    values = torch.zeros(B, T, channels, dtype=dtype)
    mask = torch.zeros(B, T, channels, dtype=dtype)
    lengths = torch.empty(B, dtype=torch.int64)
    for b, (t, x, m) in enumerate(rows):
        n = t.shape[0]
        times[b, :n] = t
        times[b, n:] = t[-1]
        values[b, :n] = torch.where(m, x.to(dtype), torch.zeros((), dtype=dtype))
        mask[b, :n] = m.to(dtype)
        lengths[b] = n
    return IrregularBatch(times, values, mask, lengths)


def uncollate(batch: IrregularBatch) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Split a batch back into its series: ``[(times (n_i,), values (n_i, C) with NaN where missing, mask (n_i, C)
    bool)]``; the inverse of :func:`collate`.

    >>> import torch
    >>> b = collate([(torch.tensor([0.0, 1.0]), torch.tensor([[1.0], [float("nan")]]))])
    >>> t, x, m = uncollate(b)[0]
    >>> x[:, 0].tolist(), m[:, 0].tolist()
    ([1.0, nan], [True, False])
    """
    out = []
    for b in range(batch.times.shape[0]):
        n = int(batch.lengths[b])
        m = batch.mask[b, :n] != 0
        x = torch.where(m, batch.values[b, :n], torch.full((), float("nan"), dtype=batch.values.dtype))
        out.append((batch.times[b, :n].clone(), x, m))
    return out


def split_indices(n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> tuple[Tensor, ...]:
    """Random disjoint index sets (train, val, test, ...) covering ``range(n)`` in the given fractions.

    ``fractions`` must be positive and sum to 1; the sizes are ``floor(f * n)`` with the remainder given to the first
    set.

    >>> tr, va, te = split_indices(10, (0.6, 0.2, 0.2), seed=1)
    >>> len(tr), len(va), len(te), sorted(torch.cat([tr, va, te]).tolist()) == list(range(10))
    (6, 2, 2, True)
    """
    if n < len(fractions) or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise InputError(f"split_indices: need n >= {len(fractions)} and positive fractions summing to 1, got n={n}, "
                         f"fractions={tuple(fractions)}.")
    sizes = [int(f * n) for f in fractions]
    sizes[0] += n - sum(sizes)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return tuple(torch.split(perm, sizes))


def interpolation_mask(mask: Tensor, n_observed: int | float, generator: torch.Generator | None = None) -> Tensor:
    """The encoder's mask for the interpolation task: keep ``n_observed`` of each row's observed time points at
    random (an int: that many, a float in (0, 1]: that fraction), drop the others; the target is the full ``mask``.

    Parameters
    ----------
    mask : Tensor, shape ``(B, T, C)``
        The observation mask (1 observed).
    n_observed : int or float

    Returns
    -------
    Tensor, shape ``(B, T, C)``: ``mask`` with the dropped time points zeroed (a time point is kept or dropped with
    all its channels).

    >>> m = torch.ones(2, 10, 1)
    >>> interpolation_mask(m, 4, torch.Generator().manual_seed(0)).sum((1, 2)).tolist()
    [4.0, 4.0]
    """
    if mask.dim() != 3:
        raise InputError(f"interpolation_mask: mask must be (B, T, C), got shape {tuple(mask.shape)}.")
    present = mask.amax(-1) > 0  # (B, T)
    counts = present.sum(-1)
    if isinstance(n_observed, float):
        if not 0.0 < n_observed <= 1.0:
            raise InputError(f"interpolation_mask: a fraction must be in (0, 1], got {n_observed}.")
        keep = (counts.to(torch.float64) * n_observed).round().clamp(min=1).long()
    else:
        if n_observed < 1:
            raise InputError(f"interpolation_mask: n_observed must be >= 1, got {n_observed}.")
        keep = counts.clamp(max=int(n_observed))
    scores = torch.rand(present.shape, generator=generator, device=mask.device if generator is None else "cpu")
    scores = scores.to(mask.device).masked_fill(~present, 2.0)  # absent points sort last
    rank = scores.argsort(-1).argsort(-1)
    kept = (rank < keep[:, None]) & present
    return mask * kept[..., None].to(mask.dtype)


def extrapolation_masks(times: Tensor, mask: Tensor, split: float | Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Masks for the extrapolation task: observe the points at ``times <= split``, predict those after.

    Parameters
    ----------
    times : Tensor, shape ``(B, T)`` or ``(T,)``
    mask : Tensor, shape ``(B, T, C)``
    split : float or Tensor of shape ``(B,)``, optional
        Default: the middle of each row's span, ``(t_first + t_last) / 2``.

    Returns
    -------
    (observed_mask, target_mask), both ``(B, T, C)``.

    >>> t = torch.linspace(0, 1, 5)
    >>> o, p = extrapolation_masks(t, torch.ones(1, 5, 1))
    >>> o[0, :, 0].tolist(), p[0, :, 0].tolist()
    ([1.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0])
    """
    tt = times.expand(mask.shape[0], -1) if times.dim() == 1 else times
    if tt.shape != mask.shape[:2]:
        raise InputError(f"extrapolation_masks: times {tuple(times.shape)} do not match mask {tuple(mask.shape)}.")
    if split is None:
        split = (tt[:, 0] + tt[:, -1]) / 2
    s = torch.as_tensor(split, dtype=tt.dtype, device=tt.device)
    before = (tt <= (s[:, None] if s.dim() == 1 else s))[..., None].to(mask.dtype)
    return mask * before, mask * (1 - before)


class Normalizer:
    """Per-channel standardisation from the observed entries only: ``(x - mean) / std``.

    >>> x = torch.tensor([[[1.0], [3.0], [100.0]]]); m = torch.tensor([[[1.0], [1.0], [0.0]]])
    >>> n = Normalizer.fit(x, m)
    >>> n.mean.tolist(), n.std.tolist()
    ([2.0], [1.0])
    >>> torch.allclose(n.inverse(n.transform(x)), x)
    True
    """

    def __init__(self, mean: Tensor, std: Tensor):
        self.mean, self.std = mean, std

    @classmethod
    def fit(cls, values: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Normalizer:
        """Fit on ``values (..., C)`` over the entries where ``mask`` (same shape; default: not NaN) is nonzero."""
        m = (~torch.isnan(values)) if mask is None else (mask != 0)
        if not bool(m.any()):
            raise InputError("Normalizer.fit: no observed entry to fit on.")
        x = torch.where(m, values, torch.zeros((), dtype=values.dtype))
        w = m.to(values.dtype).reshape(-1, values.shape[-1])
        x = x.reshape(-1, values.shape[-1])
        n = w.sum(0).clamp(min=1)
        mean = (x * w).sum(0) / n
        var = (((x - mean) * w) ** 2).sum(0) / n
        return cls(mean, var.sqrt().clamp(min=eps))

    def transform(self, values: Tensor) -> Tensor:
        """Standardise ``values (..., C)``."""
        return (values - self.mean) / self.std

    def inverse(self, values: Tensor) -> Tensor:
        """Undo :meth:`transform`."""
        return values * self.std + self.mean


def compact(times: Tensor, values: Tensor, mask: Tensor) -> IrregularBatch:
    """Keep each row's observed time points only (a time point with at least one observed channel), moved to the
    front and padded as :func:`collate` pads: the input of a per-sample encoder that steps through a row's own
    observations instead of the union of all rows' times.

    Parameters
    ----------
    times : Tensor, shape ``(T,)`` or ``(B, T)``
    values, mask : Tensor, shape ``(B, T, C)``

    Returns
    -------
    IrregularBatch with ``T' = max_b (observed time points of row b)`` (at least 1; a row with none keeps its first
    time with a zero mask).

    >>> t = torch.arange(4.0); x = torch.arange(8.0).reshape(2, 4, 1)
    >>> m = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])[..., None]
    >>> b = compact(t, x, m)
    >>> b.times.tolist(), b.values[..., 0].tolist(), b.lengths.tolist()
    ([[0.0, 2.0], [3.0, 3.0]], [[0.0, 2.0], [7.0, 0.0]], [2, 1])
    """
    if values.dim() != 3 or mask.shape != values.shape:
        raise InputError(f"compact: values and mask must be (B, T, C) of one shape, got {tuple(values.shape)} and "
                         f"{tuple(mask.shape)}.")
    B, T, C = values.shape
    tt = times.expand(B, -1) if times.dim() == 1 else times
    if tt.shape != (B, T):
        raise InputError(f"compact: times {tuple(times.shape)} do not match values {tuple(values.shape)}.")
    present = mask.amax(-1) > 0  # (B, T)
    lengths = present.sum(-1)
    width = max(1, int(lengths.max()))
    # stable order: observed points first, in time order
    order = torch.argsort((~present).to(torch.int8), dim=-1, stable=True)[:, :width]
    t_c = tt.gather(1, order)
    x_c = values.gather(1, order[..., None].expand(-1, -1, C))
    m_c = mask.gather(1, order[..., None].expand(-1, -1, C))
    keep = torch.arange(width, device=values.device) < lengths[:, None]
    last = t_c.gather(1, (lengths - 1).clamp(min=0)[:, None])
    t_c = torch.where(keep, t_c, last)
    m_c = m_c * keep[..., None].to(mask.dtype)
    return IrregularBatch(t_c, x_c * m_c, m_c, lengths)
