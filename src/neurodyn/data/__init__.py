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
from .uea import (
    LabelledSeries,
    TSFile,
    drop_observations,
    labelled_series,
    load_uea,
    parse_ts,
    read_ts,
    uea_path,
)

__all__ = [
    "IrregularBatch",
    "LabelledSeries",
    "Normalizer",
    "TSFile",
    "collate",
    "compact",
    "drop_observations",
    "extrapolation_masks",
    "interpolation_mask",
    "labelled_series",
    "load_uea",
    "parse_ts",
    "pendulum",
    "periodic_toy",
    "read_ts",
    "spirals",
    "stochastic_lorenz",
    "split_indices",
    "uea_path",
    "uncollate",
]
