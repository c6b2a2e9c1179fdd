"""Data tooling for irregularly sampled time series: batches, masks, splits, normalisation, generated data sets."""

from .batch import (
    IrregularBatch,
    Normalizer,
    collate,
    compact,
    extrapolation_masks,
    interpolation_mask,
    split_indices,
    uncollate,
)
from .synthetic import pendulum, periodic_toy, spirals, stochastic_lorenz

__all__ = [
    "IrregularBatch",
    "Normalizer",
    "collate",
    "compact",
    "extrapolation_masks",
    "interpolation_mask",
    "pendulum",
    "periodic_toy",
    "spirals",
    "stochastic_lorenz",
    "split_indices",
    "uncollate",
]
