"""Neural CDE vs ODE-RNN vs GRU-D vs a diagonal SSM layer on real irregular data: UEA JapaneseVowels with 0/30/50/70%
of the observations dropped at random (Kidger et al. 2020).

Data (``neurodyn.data.load_uea``, read from the ``aeon`` wheel, no download): 270 train / 370 test utterances, 12
channels (LPC cepstra), lengths 7-29, 9 speakers. Channels are standardised with the training set's observed mean
and std. For each drop rate ``r`` the same fraction of each series' time points is dropped (whole time points, all
channels; ``neurodyn.data.drop_observations(per="time")``, seeded by the run's seed and the rate) in train and test.
The classification is read at each series' last time point (its length minus one, observed or not).

Models (``--cde-hidden`` 64 for the NeuralCDE, ``--grud-hidden`` 64 for GRU-D, ``--hidden`` 32 for the others,
``--width`` 32 for the vector-field MLPs; the NeuralCDE's field is Kidger et al.'s shape: 59.2k parameters with the
default path augmentations, GRU-D 18.7k, the others 6-8k; each model's hidden size chosen by its validation accuracy
over 32 / 64 (/ 128 for GRU-D), docs/results.md):

* ``NeuralCDE``: the natural cubic spline of ``(time_scale * t, x)`` (``--time-scale`` 1; the time channel is never
  dropped; dropped values are NaN: the spline passes through each channel's observed points), computed once per data
  split (and for every training batch again after its re-drop, ``--redrop``); ``dz = f(z) dX``, ``f`` a
  ``CDEField`` (``--cde-layers`` 3 hidden layers of ``--width`` with ``--cde-activation`` ReLU, then ``tanh``),
  fixed-step ``rk4`` with step 1 (one sample), gradients by backpropagation through the solver; the readout at the
  series' last time point (``--readout mean``: averaged over its time points; ``--path linear``: linear
  interpolation).
* ``ODERNN``: GRU updates at the observed points, an MLP field (``--width`` units) between them (one Euler step per
  sample interval), linear readout of the state.
* ``GRUD``: GRU-D (input and hidden decays, masks), linear readout.
* ``SSM``: each series compacted to its observed points (times ``(B, T')``: the irregular steps go into the exact
  discretisation), ``Linear -> 2 x [DiagonalSSM (complex state --hidden // 2) -> GELU, residual, LayerNorm]``, mean
  over the series' points, linear readout.

Training: AdamW (``--lr``, ``--weight-decay`` 1.0, constant rate), batches of ``--batch-size``, ``--cde-epochs``
(100) epochs for the NeuralCDE and ``--epochs`` (60) for the others (each chosen by validation, docs/results.md),
cross-entropy plus ``--penalty`` (0.03) times the sum of the Frobenius norms of the NeuralCDE's field parameters, or
of every parameter of the other models (Kidger et al. 2020's regularisation).
``--val-fraction f`` (0.2): a fraction ``f`` of the training series (drawn by the seed, the same for every model and
rate) is held out, dropped at the same rate, and every model's test accuracy
is taken after its epoch of best validation accuracy (the latest on ties; the last epoch's is kept as
``accuracy_last_epoch``); with ``--val-fraction 0`` the test accuracy after the last epoch is reported (no model
selection on the test set either way). ``--intensity`` adds the observational intensity (``time_scale`` times
the count of observed time points so far) to the NeuralCDE's path. ``--augment`` augments the NeuralCDE's path
(Morrill et al. 2020; :mod:`neurodyn.paths.augment`): ``cumsum`` appends the running integral ``Z_c = int X_c
d(time_scale t)`` of each data channel (trapezoid over each series' observed points, then splined like the data:
``dZ = X dt``, so the channels' levels enter the CDE's dynamics; ``C`` more channels, or ``--augment-channels k``
learned combinations of them), ``basepoint`` a point of zeros one sample before the first (so ``X(t_0)`` is an
increment of the path, not only the initial state's input; one more rk4 step). ``--extra locf delta`` adds
path channels that are linear between the sample times (GRU-D's inputs, so that the model stays a CDE): each data
channel's last observation carried forward, and the time since the last observed time point (one channel: whole time
points are dropped). ``--readout final-path`` reads the classes from the final state and the path's value at the
series' last time; ``--cde-step`` sets the rk4 step (1: the knot spacing). ``--redrop p`` (default 0.2; the
NeuralCDE only: a path augmentation; the baselines read the masks themselves and were not screened with it) drops
each observed time point of each training series again with probability ``p`` in every batch (at least 2 kept, else
the series is left as it is) and recomputes its path (:func:`series_coeffs` solves every series' spline at once, so
this costs a few percent of a step). ``--ema-decay d`` (default 0.95) keeps an exponential moving average of the
weights (and floating buffers) of the ``--ema-models`` after every optimizer step, from the initial weights
(:func:`ema_of`: ``torch.optim.swa_utils.AveragedModel``); the epoch is chosen and the
accuracies reported with the averaged weights (training uses the raw ones). The default applies it to the NeuralCDE
only, as validation chose per model: the NeuralCDE's validation accuracy with the average was never below its raw
weights' (docs/results.md), GRU-D's and ODE-RNN's fell (70% dropped, seeds 0-2: 97.5 -> 95.1 and 96.9 -> 95.7).
``metrics.json`` holds, per model and drop rate, the accuracy of each seed, their mean and std, parameters, NFE per
forward pass (solver field evaluations; None for models without a solver), training seconds; ``accuracy.png`` the
accuracy vs drop rate. A run's results depend only on its seed, so seeds can run in separate processes (``--seed k
--seeds 1 --out DIR_k``) and be combined by ``--merge DIR_0 DIR_1 ...`` (into ``--out``).

Results (docs/results.md, "The epoch budget by validation" and the sections before it; these defaults, seeds 0-2,
mean test accuracy % at 0/30/50/70% dropped): NeuralCDE (59.2k parameters, 100 epochs) 98.3 / 97.75 / 97.0 / 97.1,
GRU-D (hidden 64, 18.7k, 60 epochs) 96.7 / 95.3 / 96.4 / 96.3, ODE-RNN 94.5 / 93.0 / 94.1 / 91.7: the NeuralCDE is the
best model at every rate. With 60 epochs it was 97.9 / 97.6 / 96.3 / 97.1, one test series behind GRU-D at 50% (over
seeds 0-6: 97.2 against 96.1); GRU-D at 100 epochs (not chosen by validation) 96.1 / 96.3 at 50 / 70%. With GRU-D at
hidden 32 (6.3k parameters; 96.7 / 97.5 / 95.2 / 95.9) the 60-epoch NeuralCDE led at every rate.
The seventh session's NeuralCDE (hidden 32, no re-drop, raw weights;
30.7k parameters) 97.7 / 96.8 / 95.7 / 95.0, behind GRU-D at 70%. With ``--weight-decay 0`` (Adam, the sixth session's
protocol) 96.9 / 96.2 / 95.0 / 93.7, ODE-RNN 96.4 / 96.1 / 93.4 / 90.1, GRU-D 97.4 / 97.0 / 95.9 / 95.9. Without the
augmentations (``--augment none``, 17.6k parameters, no weight decay) 94.7 / 94.1 / 92.7 / 93.3; the earlier setup
(hidden 16, one Softplus layer, no penalty, time 0.1 t, 30 epochs, one spline over the padded grid) 89.2 / 89.4 / 87.0 /
83.6.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neurodyn.data import Normalizer, compact, drop_observations, load_uea
from neurodyn.demos._common import (
    POSITIVE,
    POSITIVE_INT,
    DemoError,
    add_out_and_seed,
    config_from_args,
    ema_of,
    float_in,
    json_safe,
)
from neurodyn.models import GRUD, ODERNN, DiagonalSSM, NeuralCDE
from neurodyn.models.neural_cde import CDEField
from neurodyn.paths.augment import basepoint, cumulative_integral
from neurodyn.paths.cubic import CubicPath, natural_cubic_coeffs
from neurodyn.paths.fill import fill_missing

NAME = "cde"
DESCRIPTION = ("NeuralCDE vs ODE-RNN vs GRU-D vs SSM on UEA JapaneseVowels with 0/30/50/70 percent dropped: accuracy, "
               "parameters, NFE, wall")
MODELS = ("NeuralCDE", "ODERNN", "GRUD", "SSM")
AUGMENTATIONS = ("cumsum", "basepoint")
EXTRA_CHANNELS = ("locf", "delta")


@dataclass
class CDEConfig:
    out: str = "runs/cde"
    seed: int = 0
    seeds: int = 3
    rates: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.5, 0.7])
    models: list[str] = field(default_factory=lambda: list(MODELS))
    dataset: str = "JapaneseVowels"
    epochs: int = 60  # ODE-RNN, GRU-D and the SSM (GRU-D: validation over 60 / 100 kept 60, eleventh session)
    cde_epochs: int = 100  # the NeuralCDE (eleventh session: validation over 60 / 100 chose 100)
    batch_size: int = 32
    lr: float = 3e-3
    hidden: int = 32  # ODE-RNN and the SSM
    grud_hidden: int = 64  # GRU-D (tenth session: validation over 32 / 64 / 128 chose 64)
    cde_hidden: int = 64  # the NeuralCDE's state (tenth session: 64 with redrop 0.2 and ema_decay 0.95)
    width: int = 32
    cde_layers: int = 3  # hidden layers of the NeuralCDE's field (Kidger et al. 2020: 3 of width 32, ReLU)
    cde_activation: str = "relu"
    penalty: float = 0.03  # Kidger et al.'s penalty * sum of the norms of each model's penalised parameters
    time_scale: float = 1.0
    path: str = "cubic"
    readout: str = "final"
    weight_decay: float = 1.0  # AdamW's decoupled weight decay of every model (0: Adam)
    val_fraction: float = 0.2  # > 0: that fraction of the training split held out, every model selected by it
    intensity: bool = False  # the NeuralCDE's path gets the cumulative count of observed time points
    augment: list[str] = field(default_factory=lambda: ["cumsum", "basepoint"])  # NeuralCDE path augmentations
    augment_channels: int = 0  # with "cumsum": 0 = the C integral channels as they are, k = a learned map to k
    extra: list[str] = field(default_factory=list)  # NeuralCDE path channels on linear pieces: "locf", "delta"
    cde_step: float = 1.0  # the NeuralCDE's rk4 step (the knots are 1 apart)
    redrop: float = 0.2  # NeuralCDE only: each training batch's observed time points dropped again with this prob.
    ema_decay: float = 0.95  # > 0: validation and test on an EMA of the weights (decay d per step) of ema_models
    ema_models: list[str] = field(default_factory=lambda: ["NeuralCDE"])  # the models ema_decay applies to
    subset: int = 0  # 0: all series; N: the first N of each split (smoke tests)
    threads: int = 1
    plots: bool = True
    quick: bool = False


QUICK = {"seeds": 1, "rates": [0.0, 0.5], "epochs": 6, "cde_epochs": 6}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = CDEConfig()
    add_out_and_seed(parser, d.out, d.seed)
    parser.add_argument("--seeds", type=POSITIVE_INT, default=None,
                        help=f"seeds seed, seed+1, ... per model and rate (default: {d.seeds})")
    parser.add_argument("--rates", type=float_in(0.0, 1.0, high_open=True), nargs="+", default=None,
                        help=f"fractions of time points dropped (default: {' '.join(map(str, d.rates))})")
    parser.add_argument("--models", choices=MODELS, nargs="+", default=None,
                        help=f"models to train (default: {' '.join(d.models)})")
    parser.add_argument("--dataset", choices=("JapaneseVowels", "BasicMotions"), default=None,
                        help=f"UEA data set from the aeon wheel (default: {d.dataset})")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=None,
                        help=f"training epochs of ODE-RNN, GRU-D and the SSM (default: {d.epochs})")
    parser.add_argument("--cde-epochs", type=POSITIVE_INT, default=None,
                        help=f"training epochs of the NeuralCDE (default: {d.cde_epochs})")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=None, help=f"batch size ({d.batch_size})")
    parser.add_argument("--lr", type=POSITIVE, default=None, help=f"Adam learning rate (default: {d.lr:g})")
    parser.add_argument("--hidden", type=POSITIVE_INT, default=None,
                        help=f"hidden size of ODE-RNN and the SSM ({d.hidden})")
    parser.add_argument("--grud-hidden", type=POSITIVE_INT, default=None,
                        help=f"hidden size of GRU-D ({d.grud_hidden})")
    parser.add_argument("--cde-hidden", type=POSITIVE_INT, default=None,
                        help=f"hidden size of the NeuralCDE ({d.cde_hidden}: its field has hidden x channels outputs)")
    parser.add_argument("--width", type=POSITIVE_INT, default=None,
                        help=f"width of the NeuralCDE's and the ODE-RNN's vector-field MLPs ({d.width})")
    parser.add_argument("--cde-layers", type=POSITIVE_INT, default=None,
                        help=f"hidden layers of the NeuralCDE's vector-field MLP ({d.cde_layers})")
    parser.add_argument("--cde-activation", choices=("relu", "softplus", "tanh"), default=None,
                        help=f"activation of the NeuralCDE's hidden layers ({d.cde_activation})")
    parser.add_argument("--penalty", type=float_in(0.0), default=None,
                        help="add penalty x the sum of the Frobenius norms of the penalised parameters to the loss "
                             "(Kidger et al. 2020: the NeuralCDE's vector field, every parameter of the other models; "
                             f"{d.penalty:g})")
    parser.add_argument("--path", choices=("cubic", "linear"), default=None,
                        help=f"the NeuralCDE's control path: natural cubic spline or linear ({d.path})")
    parser.add_argument("--time-scale", type=POSITIVE, default=None,
                        help=f"the NeuralCDE's time channel is time_scale * t ({d.time_scale:g})")
    parser.add_argument("--readout", choices=("final", "mean", "final-path"), default=None,
                        help=f"the NeuralCDE's readout: at the last time, averaged over the series' times, or a "
                             f"linear map of the last time's state and path value ({d.readout})")
    parser.add_argument("--weight-decay", type=float_in(0.0), default=None,
                        help=f"AdamW weight decay of every model (default {d.weight_decay:g}; 0: Adam)")
    parser.add_argument("--val-fraction", type=float_in(0.0, 1.0, high_open=True), default=None,
                        help="hold out this fraction of the training series (seeded by --seed) and report, for every "
                             "model, the test accuracy after the epoch with the best validation accuracy "
                             f"({d.val_fraction:g}: no validation split, the last epoch)")
    parser.add_argument("--intensity", action="store_true", default=None,
                        help="add the observational intensity to the NeuralCDE's path: time_scale times the count of "
                             "observed time points so far (Kidger et al. 2020)")
    parser.add_argument("--augment", choices=AUGMENTATIONS + ("none",), nargs="+", default=None,
                        help="augment the NeuralCDE's path (Morrill et al. 2020): 'cumsum' adds the running "
                             "integral of each data channel over the scaled time (trapezoid on each series' observed "
                             "points; dZ = X dt, so the levels enter the dynamics), 'basepoint' a point of zeros one "
                             "sample before the first; 'none': neither (default: cumsum basepoint)")
    parser.add_argument("--augment-channels", type=int, default=None,
                        help="with --augment cumsum: 0 = the integral of every data channel; k > 0 = k learned linear "
                             "combinations of them (the path's integral channels mapped by a trained k x C matrix, "
                             "penalised with the field; default 0)")
    parser.add_argument("--extra", choices=EXTRA_CHANNELS + ("none",), nargs="+", default=None,
                        help="more channels of the NeuralCDE's path, each linear between the sample times: 'locf' "
                             "the last observation carried forward of each data channel, 'delta' the scaled time "
                             "since the last observed time point (GRU-D's inputs; default: none)")
    parser.add_argument("--cde-step", type=POSITIVE, default=None,
                        help=f"the NeuralCDE's rk4 step; the knots are 1 apart ({d.cde_step:g})")
    parser.add_argument("--redrop", type=float_in(0.0, 1.0, high_open=True), default=None,
                        help="NeuralCDE only: in every training batch drop each observed time point of each series "
                             "again with this probability (at least 2 kept, else the series is left as it is) and "
                             f"recompute its path (default {d.redrop:g}; 0: off)")
    parser.add_argument("--ema-decay", type=float_in(0.0, 1.0, high_open=True), default=None,
                        help="> 0: keep an exponential moving average of the weights of the --ema-models, w_ema <- "
                             "d w_ema + (1 - d) w after every optimizer step (started at the initial weights), and "
                             "select the epoch and report the test accuracy with the averaged weights "
                             f"(default {d.ema_decay:g}; 0: the raw weights)")
    parser.add_argument("--ema-models", choices=MODELS, nargs="+", default=None,
                        help=f"the models --ema-decay applies to (default: {' '.join(d.ema_models)})")
    parser.add_argument("--subset", type=int, default=None,
                        help="use the first N series of each split only (0: all; for smoke tests)")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help=f"torch threads (default: {d.threads})")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 1 seed, drop rates 0 and 0.5, 6 epochs (about a minute)")
    parser.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                        help="write the table of runs made separately (their --out directories, e.g. one seed each) "
                             "instead of training")
    parser.add_argument("--no-plots", dest="plots", action="store_false", default=None, help="skip the PNG plot")


# ----------------------------------------------------------------------------------------------- models
def _last(states: Tensor, lengths: Tensor) -> Tensor:
    """``states (B, T, H)`` at index ``lengths - 1`` of each row: ``(B, H)``."""
    return states[torch.arange(states.shape[0]), lengths - 1]


class _PrecomputedCDE(NeuralCDE):
    """A NeuralCDE whose natural cubic spline comes from coefficients computed once per data split (the data do not
    change between epochs; torchcde's workflow): ``coeffs`` is set before each call."""

    coeffs: Tensor | None = None

    def make_path(self, x: Tensor, t: Tensor) -> CubicPath:
        return CubicPath(t, self.coeffs) if self.coeffs is not None else super().make_path(x, t)


def last_observed(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(locf, delta)`` of ``x`` ``(B, T, C)`` (NaN where missing) on the times ``t`` ``(T,)``: ``locf`` ``(B, T, C)``
    each channel's last observed value at or before each time (before its first observation, the first), ``delta``
    ``(B, T, 1)`` the time since the last time point with any channel observed (0 before the first).

    Examples
    --------
    >>> import torch
    >>> nan = float("nan")
    >>> locf, delta = last_observed(torch.tensor([[[nan], [2.0], [nan], [nan], [5.0]]]), torch.arange(5.0))
    >>> locf.flatten().tolist(), delta.flatten().tolist()
    ([2.0, 2.0, 2.0, 2.0, 5.0], [0.0, 0.0, 1.0, 2.0, 0.0])
    """
    T = x.shape[-2]
    obs = ~torch.isnan(x)
    idx = torch.arange(T, device=x.device).view(T, 1).expand_as(x)
    prev = torch.where(obs, idx, torch.full_like(idx, -1)).cummax(-2).values
    first = torch.where(obs, idx, torch.full_like(idx, T)).amin(-2, keepdim=True).clamp(max=T - 1)
    locf = x.nan_to_num(0.0).gather(-2, torch.where(prev < 0, first.expand_as(prev), prev))
    any_obs = obs.any(-1)  # (B, T)
    last = torch.where(any_obs, torch.arange(T, device=x.device), torch.full_like(any_obs, -1, dtype=torch.long))
    last = last.cummax(-1).values
    delta = torch.where(last < 0, torch.zeros_like(t).expand_as(last), t - t[last.clamp(min=0)])
    return locf, delta[..., None]


def linear_channels(coeffs: Tensor, v: Tensor, lengths: Tensor, channels: list[int]) -> Tensor:
    """``coeffs`` ``(B, T - 1, 4C)`` (torchcde's cubic layout ``[a, b, 2c, 3d]``) with the ``channels`` of ``v``
    ``(B, T, C)`` (complete there) replaced by linear interpolation on the unit-spaced grid up to each series' point
    ``lengths - 1``, constant after it."""
    if not channels:
        return coeffs
    B, T, C = v.shape
    out = coeffs.clone()
    k = torch.arange(T - 1)
    inside = (k[None, :] < (lengths - 1)[:, None])[..., None]  # (B, T - 1, 1)
    end = v[torch.arange(B), lengths - 1][:, None, :]  # (B, 1, C)
    a = torch.where(inside, v[:, :-1], end)
    b = torch.where(inside, v[:, 1:] - v[:, :-1], torch.zeros_like(a))
    for j, part in enumerate((a, b, torch.zeros_like(a), torch.zeros_like(a))):
        out[..., [j * C + c for c in channels]] = part[..., channels]
    return out


def cde_input(d: dict[str, Tensor], time_scale: float, intensity: bool = False,
              augment: tuple[str, ...] | list[str] = (), extra: tuple[str, ...] | list[str] = ()) -> Tensor:
    """``cat(time_scale * t, x)`` with NaN at the missing values: ``(B, T, 1 + C)`` (the time channel is complete);
    with ``intensity``, ``cat(time_scale * t, time_scale * n, x)``, ``(B, T, 2 + C)``, ``n`` the count of observed
    time points up to each time (complete too; the demo drops whole time points, so one count serves all channels).
    ``augment`` (:data:`AUGMENTATIONS`): ``"cumsum"`` appends ``Z = cumulative_integral(x, time_scale * t)``
    (:func:`neurodyn.paths.cumulative_integral`; ``C`` more channels, NaN where ``x`` is); ``"basepoint"`` prepends
    a point at ``t_0 - 1`` where every channel but the time is 0 (:func:`neurodyn.paths.basepoint`; ``T + 1``
    points, on the grid :func:`cde_grid` gives)."""
    t = d["t"][0]
    x = d["x"].masked_fill(d["mask"] == 0, float("nan"))
    parts = []
    if intensity:
        parts.append(time_scale * (d["mask"].amax(-1, keepdim=True) > 0).to(d["x"].dtype).cumsum(-2))
    parts.append(x)
    if extra:
        locf, delta = last_observed(x, t)
        parts += [locf] * ("locf" in extra) + [time_scale * delta] * ("delta" in extra)
    if "cumsum" in augment:
        parts.append(cumulative_integral(x, time_scale * t))
    v = torch.cat(parts, -1)
    if "basepoint" in augment:
        v, t = basepoint(v, t)
    return torch.cat([time_scale * t.expand(v.shape[0], -1)[..., None], v], -1)


def cde_grid(d: dict[str, Tensor], augment: tuple[str, ...] | list[str] = ()) -> tuple[Tensor, Tensor]:
    """The NeuralCDE's solve grid ``(T,)`` and each series' number of points on it ``(B,)``: the sample grid and
    ``d["lengths"]``, with ``"basepoint"`` in ``augment`` one more point ``t_0 - 1`` first and ``lengths + 1``."""
    grid, lengths = d["t"][0], d["lengths"]
    if "basepoint" in augment:
        return torch.cat([grid[:1] - (grid[1] - grid[0]), grid]), lengths + 1
    return grid, lengths


class CDEClassifier(nn.Module):
    """NeuralCDE on the natural cubic spline of :func:`cde_input` (``cat(time_scale * t, x)`` and the augmentations),
    read out at each series' last time point. ``d["coeffs"]`` (:func:`series_coeffs` of :func:`cde_input`), when
    present, is the path. With ``"cumsum"`` in ``augment`` and ``augment_channels = k > 0`` the ``C`` integral
    channels enter the path through a learned ``k x C`` map (``summary``; applied to the data and to the spline
    coefficients alike: the spline is linear in the data), so the field has ``1 + C + k`` channels."""

    def __init__(self, channels: int, hidden: int, width: int, classes: int, time_scale: float, path: str = "cubic",
                 readout: str = "final", intensity: bool = False, layers: int = 1, activation: str = "softplus",
                 augment: tuple[str, ...] | list[str] = (), augment_channels: int = 0,
                 extra: tuple[str, ...] | list[str] = (), step: float = 1.0):
        super().__init__()
        bad = [a for a in augment if a not in AUGMENTATIONS]
        if bad or augment_channels < 0 or (augment_channels and "cumsum" not in augment):
            raise DemoError(f"CDEClassifier: augment must be among {AUGMENTATIONS} (got {list(augment)}) and "
                            f"augment_channels >= 0, > 0 only with 'cumsum' (got {augment_channels})")
        if any(e not in EXTRA_CHANNELS for e in extra) or readout not in ("final", "mean", "final-path"):
            raise DemoError(f"CDEClassifier: extra must be among {EXTRA_CHANNELS} (got {list(extra)}) and readout "
                            f"one of final, mean, final-path (got {readout!r})")
        self.readout = readout
        self.augment = tuple(augment)
        self.extra = tuple(extra)
        self.base = 1 + int(intensity) + channels + n_extra(channels, extra)  # channels before the integral ones
        self.summary = nn.Linear(channels, augment_channels, bias=False) if augment_channels else None
        c = self.base + (0 if "cumsum" not in augment else augment_channels or channels)
        field = CDEField(hidden, c, width, depth=layers + 1, activation=activation)
        self.cde = _PrecomputedCDE(c, hidden, classes, vector_field=field,
                                   path=path, method="rk4", step_size=step, gradient="direct")
        if readout == "final-path":  # the classes from the final state and the path's final value
            self.cde.readout = nn.Identity()
            self.head = nn.Linear(hidden + c, classes)
        self.time_scale = time_scale
        self.intensity = intensity
        self.nfe = 0

    def _summarise(self, v: Tensor, blocks: int) -> Tensor:
        """``v (..., blocks * (base + C))`` with the last ``C`` channels of each block mapped by ``summary``."""
        if self.summary is None:
            return v
        v = v.unflatten(-1, (blocks, -1))
        z = v[..., self.base:]
        nan = torch.isnan(z).any(-1, keepdim=True)  # missing stays missing; no NaN reaches the map's gradient
        z = self.summary(z.nan_to_num(0.0)).masked_fill(nan, float("nan"))
        return torch.cat([v[..., :self.base], z], -1).flatten(-2)

    def forward(self, d: dict[str, Tensor]) -> Tensor:
        grid, lengths = cde_grid(d, self.augment)  # the demo's series share the sample grid 0, 1, ..., T - 1
        coeffs = d.get("coeffs")
        self.cde.coeffs = None if coeffs is None else self._summarise(coeffs, 4)
        try:
            x = self._summarise(cde_input(d, self.time_scale, self.intensity, self.augment, self.extra), 1)
            y = self.cde(x, grid, times=grid)  # (B, T, classes)
        finally:
            self.cde.coeffs = None
        self.nfe = int(self.cde.last_stats.get("nfe", 0))
        if self.readout == "mean":  # the readout averaged over the series' own time points
            idx = torch.arange(y.shape[1])
            first = int("basepoint" in self.augment)
            valid = ((idx >= first) & (idx < lengths[:, None])).to(y.dtype)[..., None]
            return (y * valid).sum(1) / valid.sum(1)
        if self.readout == "final-path":
            return self.head(torch.cat([_last(y, lengths), _last(fill_missing(x, grid), lengths)], -1))
        return _last(y, lengths)


def n_extra(channels: int, extra: tuple[str, ...] | list[str]) -> int:
    """The number of path channels ``extra`` adds: ``channels`` for ``"locf"``, 1 for ``"delta"``."""
    return channels * ("locf" in extra) + int("delta" in extra)


def linear_columns(channels: int, intensity: bool, extra: tuple[str, ...] | list[str]) -> list[int]:
    """The channels of :func:`cde_input` that ``extra`` adds (their path is linear between the sample times)."""
    start = 1 + int(intensity) + channels
    return list(range(start, start + n_extra(channels, extra)))


class RNNClassifier(nn.Module):
    """ODE-RNN or GRU-D over the sample grid with masks, read out at each series' last time point."""

    def __init__(self, kind: str, channels: int, hidden: int, width: int, classes: int):
        super().__init__()
        self.kind = kind
        self.rnn = ODERNN(channels, hidden, cell="gru", units=width, method="euler") if kind == "ODERNN" \
            else GRUD(channels, hidden)
        self.readout = nn.Linear(hidden, classes)
        self.nfe: int | None = 0 if kind == "ODERNN" else None

    def forward(self, d: dict[str, Tensor]) -> Tensor:
        states, _ = self.rnn(d["x"], d["t"][0], d["mask"])
        if self.kind == "ODERNN":
            self.nfe = int(self.rnn.nfe)
        return self.readout(_last(states, d["lengths"]))


class SSMClassifier(nn.Module):
    """Two diagonal SSM layers over each series' observed points (own irregular times), mean-pooled."""

    def __init__(self, channels: int, hidden: int, classes: int, layers: int = 2, timescale: float = 10.0):
        super().__init__()
        self.encoder = nn.Linear(channels, hidden)
        self.ssms = nn.ModuleList(DiagonalSSM(hidden, max(1, hidden // 2), hidden, timescale=timescale)
                                  for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.readout = nn.Linear(hidden, classes)
        self.nfe = None

    def forward(self, d: dict[str, Tensor]) -> Tensor:
        b = compact(d["t"], d["x"], d["mask"])
        h = self.encoder(b.values)
        for ssm, norm in zip(self.ssms, self.norms):
            h = norm(h + torch.nn.functional.gelu(ssm(h, b.times)))
        valid = b.valid.to(h.dtype)[..., None]
        return self.readout((h * valid).sum(1) / valid.sum(1))


def penalised_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ``--penalty`` acts on (Kidger et al. 2020): the NeuralCDE's vector field, every parameter of
    the other models (and the NeuralCDE's learned map of its integral channels, ``--augment-channels``)."""
    if isinstance(model, CDEClassifier):
        summary = [] if model.summary is None else list(model.summary.parameters())
        return list(model.cde.func.parameters()) + summary
    return list(model.parameters())


def make_model(name: str, channels: int, classes: int, cfg: CDEConfig) -> nn.Module:
    """The classifier ``name`` (one of :data:`MODELS`) for ``channels`` inputs and ``classes`` classes."""
    if name == "NeuralCDE":
        return CDEClassifier(channels, cfg.cde_hidden, cfg.width, classes, cfg.time_scale, cfg.path, cfg.readout,
                             cfg.intensity, cfg.cde_layers, cfg.cde_activation, cfg.augment, cfg.augment_channels,
                             cfg.extra, cfg.cde_step)
    if name in ("ODERNN", "GRUD"):
        return RNNClassifier(name, channels, cfg.grud_hidden if name == "GRUD" else cfg.hidden, cfg.width, classes)
    return SSMClassifier(channels, cfg.hidden, classes)


# --------------------------------------------------------------------------------------------- training
def _data(cfg: CDEConfig) -> dict[str, Any]:
    try:
        train, test = load_uea(cfg.dataset, "train"), load_uea(cfg.dataset, "test")
    except Exception as exc:  # the aeon wheel missing: say how to install it
        raise DemoError(str(exc)) from exc
    if cfg.subset:
        n = cfg.subset
        train, test = (type(s)(s.times[:n], s.values[:n], s.mask[:n], s.lengths[:n], s.labels[:n], s.classes, s.name)
                       for s in (train, test))
    T = max(train.times.shape[1], test.times.shape[1])
    norm = Normalizer.fit(train.values, train.mask)
    out = {"classes": len(train.classes), "channels": train.values.shape[-1]}
    for key, s in (("train", train), ("test", test)):
        pad = T - s.times.shape[1]
        # one shared sample grid 0..T-1 for every series (the CDE solves on it; padding is masked out)
        t = torch.arange(T, dtype=s.times.dtype).expand(len(s), T)
        x = torch.nn.functional.pad(norm.transform(s.values) * s.mask, (0, 0, 0, pad))
        m = torch.nn.functional.pad(s.mask, (0, 0, 0, pad))
        out[key] = {"t": t, "x": x, "mask": m, "lengths": s.lengths, "y": s.labels}
    return out


def series_coeffs(x: Tensor, t: Tensor, lengths: Tensor) -> Tensor:
    """Natural cubic coefficients ``(B, T - 1, 4C)`` (torchcde's layout) of each series' own points, constant after
    its end: row ``b`` is the natural cubic spline of ``x[b, :L_b]`` on ``t[:L_b]`` (``L_b = lengths[b]``; NaN
    filled as :func:`~neurodyn.paths.natural_cubic_coeffs` fills them), then, from ``t[L_b - 1]`` on, channel 0 (the
    time) goes on with its last slope and the other channels keep their value at ``t[L_b - 1]``. The padding after a
    series therefore does not change its path on ``[t_0, t[L_b - 1]]`` (one spline over the padded grid would end
    at ``t[T - 1]`` instead, bending the series' last pieces towards a point that is not data).

    ``x`` ``(B, T, C)`` with channel 0 the complete time channel, ``t`` ``(T,)``, ``lengths`` ``(B,)`` in ``[2, T]``.

    The splines are :func:`~neurodyn.paths.natural_cubic_coeffs` with ``lengths`` (every series and channel
    solved at once: one Thomas solve with per-row knot spacings, a loop over the ``T`` knot positions only, each
    row the same to the bit as that row's spline alone; ``tests/test_demo_cde_redrop.py`` checks it against one call
    per length), which also holds every channel's value after the series' end; this function only sets the time
    channel's pieces there to its last slope. This is what makes recomputing the splines for every training batch
    (``CDEConfig.redrop``) cheap.

    Examples
    --------
    >>> import torch
    >>> t = torch.arange(4.0)
    >>> x = torch.stack([t.expand(2, 4), torch.tensor([[0.0, 1.0, 0.0, 9.0], [0.0, 1.0, 0.0, 5.0]])], -1)
    >>> c = series_coeffs(x, t, torch.tensor([3, 4]))
    >>> c[0, 2]  # row 0 ends at t = 2: [a, b, 2c, 3d] per channel; its value 0 held, the time's slope 1 kept
    tensor([2., 0., 1., 0., 0., 0., 0., 0.])
    """
    B, T, C = x.shape
    if bool((lengths < 2).any()) or bool((lengths > T).any()):
        raise DemoError(f"series_coeffs: every length must be in [2, {T}], got {lengths.min()}..{lengths.max()}")
    out = natural_cubic_coeffs(x, t, lengths=lengths).reshape(B, T - 1, 4, C)
    # the time channel after the series' end: its last slope (its value at t[L - 1] is held there already)
    tt = t.to(x.dtype)
    L = lengths.to(torch.long)
    after = torch.arange(T - 1, device=x.device) >= (L - 1)[:, None]  # (B, T - 1)
    end = out[:, :, 0, 0].gather(-1, (L - 1).clamp(max=T - 2)[:, None])  # the held value (where there is an after)
    slope = out[:, :, 1, 0].gather(-1, (L - 2)[:, None])  # (B, 1)
    a0 = torch.where(after, end + slope * (tt[:-1] - tt[L - 1][:, None]), out[:, :, 0, 0])
    b0 = torch.where(after, slope, out[:, :, 1, 0])
    out = torch.cat([torch.stack([a0, b0, out[:, :, 2, 0], out[:, :, 3, 0]], -1)[..., None], out[..., 1:]], -1)
    return out.reshape(B, T - 1, 4 * C)


def _with_path(d: dict[str, Tensor], cfg: CDEConfig) -> dict[str, Tensor]:
    """``d`` with ``d["coeffs"]``: the NeuralCDE's cubic path of :func:`cde_input` (:func:`series_coeffs`, the
    ``extra`` channels linear), computed from ``d``'s mask and values."""
    grid, lengths = cde_grid(d, cfg.augment)
    v = cde_input(d, cfg.time_scale, cfg.intensity, cfg.augment, cfg.extra)
    cols = linear_columns(d["x"].shape[-1], cfg.intensity, cfg.extra)
    return {**d, "coeffs": linear_channels(series_coeffs(v, grid, lengths), v, lengths, cols)}


def _with_drop(split: dict[str, Tensor], rate: float, seed: int, cfg: CDEConfig, name: str) -> dict[str, Tensor]:
    mask = drop_observations(split["mask"], rate, lengths=split["lengths"], seed=seed, per="time")
    d = {**split, "mask": mask, "x": split["x"] * mask}
    if name == "NeuralCDE" and cfg.path == "cubic":
        d = _with_path(d, cfg)
    return d


def redrop(d: dict[str, Tensor], p: float, generator: torch.Generator) -> dict[str, Tensor]:
    """``d`` (a batch: ``mask`` and ``x`` ``(B, T, C)``) with each observed time point of each series dropped again
    with probability ``p`` (whole time points, as the demo drops them; one uniform draw per series and time point
    from ``generator``). A series left with fewer than 2 observed time points keeps all of its points. Only
    ``mask`` and ``x`` change; a path in ``d`` must be recomputed (:func:`_with_path`).

    Examples
    --------
    >>> import torch
    >>> d = {"mask": torch.ones(2, 5, 1), "x": torch.ones(2, 5, 1)}
    >>> r = redrop(d, 0.99, torch.Generator().manual_seed(0))  # nearly all dropped: fewer than 2 left, so all kept
    >>> r["mask"].sum().item()
    10.0
    """
    observed = d["mask"].amax(-1) > 0  # (B, T): time points with any channel observed
    keep = observed & (torch.rand(observed.shape, generator=generator) >= p)
    keep = torch.where((keep.sum(-1) >= 2)[:, None], keep, observed)
    k = keep[..., None].to(d["mask"].dtype)
    return {**d, "mask": d["mask"] * k, "x": d["x"] * k}


def split_validation(split: dict[str, Tensor], fraction: float, seed: int) -> tuple[dict[str, Tensor], ...]:
    """``(train, val)``: ``round(fraction * N)`` series of ``split`` drawn at random (seeded by ``seed``; the same for
    every model and drop rate) held out for validation."""
    n = len(split["y"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))
    n_val = min(n - 1, max(1, round(fraction * n)))
    return _rows(split, perm[n_val:]), _rows(split, perm[:n_val])


def _rows(d: dict[str, Tensor], idx: Tensor | slice) -> dict[str, Tensor]:
    return {k: v[idx] for k, v in d.items()}


def _accuracy(model: nn.Module, d: dict[str, Tensor], batch: int = 128) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(d["y"]), batch):
            s = slice(i, i + batch)
            logits = model(_rows(d, s))
            correct += int((logits.argmax(-1) == d["y"][s]).sum())
    model.train()
    return correct / len(d["y"])


def epochs_of(name: str, cfg: CDEConfig) -> int:
    """The training epochs of model ``name``: ``cfg.cde_epochs`` for the NeuralCDE, ``cfg.epochs`` for the others."""
    return cfg.cde_epochs if name == "NeuralCDE" else cfg.epochs


def train_one(name: str, cfg: CDEConfig, data: dict[str, Any], rate: float, seed: int) -> dict[str, Any]:
    """Train model ``name`` at drop rate ``rate`` with ``seed``; its test accuracy, parameters, NFE and seconds.

    With ``cfg.redrop`` (NeuralCDE only) each training batch is re-dropped (:func:`redrop`, a generator seeded by the
    seed and rate) and its path recomputed. With ``cfg.ema_decay`` and ``name`` in ``cfg.ema_models``, an EMA of the
    weights is updated after every optimizer step (:func:`ema_of`, from the initial weights; training itself
    uses the raw weights), and the validation accuracy, the epoch choice and the reported accuracies use the
    averaged weights."""
    drop_seed = 1000 * seed + round(1000 * rate)
    t0 = time.perf_counter()
    train_split, val = data["train"], None
    if cfg.val_fraction:
        train_split, val_split = split_validation(data["train"], cfg.val_fraction, seed)
        val = _with_drop(val_split, rate, drop_seed + 2, cfg, name)
    train = _with_drop(train_split, rate, drop_seed, cfg, name)
    test = _with_drop(data["test"], rate, drop_seed + 1, cfg, name)
    prep = time.perf_counter() - t0
    torch.manual_seed(seed)
    model = make_model(name, data["channels"], data["classes"], cfg)
    # the EMA of the weights (started at the initial ones); its module is the network evaluated
    ema = ema_of(model, cfg.ema_decay) if cfg.ema_decay and name in cfg.ema_models else None
    averaged = ema.module if ema is not None else model
    redrops = torch.Generator().manual_seed(drop_seed + 3) if cfg.redrop and name == "NeuralCDE" else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.weight_decay \
        else torch.optim.Adam(model.parameters(), lr=cfg.lr)
    penalised = penalised_parameters(model)
    g = torch.Generator().manual_seed(seed)
    n = len(train["y"])
    start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    best: tuple[float, int, dict[str, Tensor]] | None = None  # (validation accuracy, epoch, state)
    eval_seconds = 0.0
    val_curve: list[float] = []
    for epoch in range(epochs_of(name, cfg)):
        for idx in torch.randperm(n, generator=g).split(cfg.batch_size):
            batch = _rows(train, idx)
            if redrops is not None:
                batch = redrop(batch, cfg.redrop, redrops)
                if "coeffs" in batch:
                    batch = _with_path(batch, cfg)
            logits = model(batch)
            loss = nn.functional.cross_entropy(logits, train["y"][idx])
            if cfg.penalty:
                loss = loss + cfg.penalty * sum(p.norm() for p in penalised)
            if not torch.isfinite(loss):
                raise DemoError(f"{name} diverged in epoch {epoch} at drop rate {rate} (loss {float(loss)}); try a "
                                f"lower --lr or another --seed")
            opt.zero_grad()
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
        if val is not None:  # the latest epoch wins ties
            t1 = time.perf_counter()
            va = _accuracy(averaged, val)
            val_curve.append(va)
            if best is None or va >= best[0]:
                best = (va, epoch, {k: v.detach().clone() for k, v in averaged.state_dict().items()})
            eval_seconds += time.perf_counter() - t1
    seconds = time.perf_counter() - start - eval_seconds
    t0 = time.perf_counter()
    extra: dict[str, Any] = {"ema": ema is not None}
    if best is not None:
        extra.update({"accuracy_last_epoch": _accuracy(averaged, test), "val_accuracy": best[0],
                      "best_epoch": best[1], "val_curve": val_curve})
        model.load_state_dict(best[2])
    elif ema is not None:
        model.load_state_dict(averaged.state_dict())
    acc = _accuracy(model, test)
    return {"accuracy": acc, "train_accuracy": _accuracy(model, train), "final_loss": float(loss.detach()),
            "params": sum(p.numel() for p in model.parameters()), "nfe_per_forward": model.nfe,
            "train_seconds": seconds, "test_seconds": time.perf_counter() - t0, "path_seconds": prep, **extra}


def _plot(cfg: CDEConfig, table: dict[str, dict[str, Any]], path: Path) -> Path:
    from neurodyn import viz

    fig = viz.new_figure((7.0, 4.2))
    ax = fig.subplots()
    for k, name in enumerate(cfg.models):
        rows = [table[name][str(r)] for r in cfg.rates]
        mean = [100 * r["mean"] for r in rows]
        std = [100 * r["std"] for r in rows]
        ax.errorbar([100 * r for r in cfg.rates], mean, yerr=std, fmt="o-", color=f"C{k}", capsize=3, label=name)
        for r, row in zip(cfg.rates, rows):
            ax.plot([100 * r] * len(row["seeds"]), [100 * a for a in row["seeds"]], ".", color=f"C{k}", alpha=0.4)
    ax.set_xlabel("observations dropped (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{cfg.dataset}: mean of {cfg.seeds} seed(s) (dots: each seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    return viz.save_figure(fig, path)


def train(cfg: CDEConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    data = _data(cfg)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {str(r): [] for r in cfg.rates} for m in cfg.models}
    start = time.perf_counter()
    for k in range(cfg.seeds):  # models interleaved: the machine's load hits them alike
        seed = cfg.seed + k
        for rate in cfg.rates:
            for name in cfg.models:
                res = train_one(name, cfg, data, rate, seed)
                runs[name][str(rate)].append({"seed": seed, **res})
                print(f"seed {seed}  drop {100 * rate:3.0f}%  {name:9s}  test acc {100 * res['accuracy']:5.1f}%  "
                      f"({res['params']} params, NFE {res['nfe_per_forward']}, {res['train_seconds']:.1f} s)",
                      flush=True)
    return summarise(cfg, runs, time.perf_counter() - start)


def summarise(cfg: CDEConfig, runs: dict[str, dict[str, list[dict[str, Any]]]], seconds: float) -> dict[str, Any]:
    """The table (mean / std / each seed per model and rate), the issue's targets, ``metrics.json`` and the plot in
    ``cfg.out`` from the runs ``runs[model][str(rate)]`` (a list of per-seed results)."""
    table: dict[str, dict[str, Any]] = {}
    for name in cfg.models:
        table[name] = {}
        for rate in cfg.rates:
            rs = runs[name][str(rate)]
            acc = torch.tensor([r["accuracy"] for r in rs], dtype=torch.float64)
            table[name][str(rate)] = {
                "mean": float(acc.mean()), "std": float(acc.std()) if len(rs) > 1 else 0.0,
                "seeds": [r["accuracy"] for r in rs], "params": rs[0]["params"],
                "nfe_per_forward": rs[0]["nfe_per_forward"],
                "train_seconds_mean": sum(r["train_seconds"] for r in rs) / len(rs)}
    target: dict[str, Any] = {}
    if "NeuralCDE" in cfg.models and len(cfg.models) > 1:
        cde = table["NeuralCDE"]
        if "0.0" in cde:
            best = max(table[m]["0.0"]["mean"] for m in cfg.models if m != "NeuralCDE")
            target["within_1_point_of_best_at_0"] = cde["0.0"]["mean"] >= best - 0.01
        for r in ("0.5", "0.7"):
            rivals = [m for m in ("ODERNN", "GRUD") if m in cfg.models]
            if r in cde and rivals:
                target[f"ahead_of_odernn_grud_at_{r}"] = all(cde[r]["mean"] > table[m][r]["mean"] for m in rivals)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {
        "config": asdict(cfg), "table": table, "runs": runs, "target": target, "seconds_total": seconds,
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "threads": cfg.threads},
    }
    plots = []
    if cfg.plots:
        try:
            plots.append(str(_plot(cfg, table, out / "accuracy.png")))
        except ImportError as exc:
            print(f"skipping plots: {exc}", file=sys.stderr)
    metrics["plots"] = plots
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1, allow_nan=False))
    print(f"\n{'model':10s}" + "".join(f"  drop {100 * r:3.0f}%" for r in cfg.rates) + "   params  NFE")
    for name in cfg.models:
        row = table[name]
        print(f"{name:10s}" + "".join(f"  {100 * row[str(r)]['mean']:8.1f}%" for r in cfg.rates)
              + f"  {row[str(cfg.rates[0])]['params']:7d}  {row[str(cfg.rates[0])]['nfe_per_forward']}")
    print(f"wrote {out / 'metrics.json'}")
    return metrics


def merge(cfg: CDEConfig, dirs: list[str]) -> dict[str, Any]:
    """Combine the ``metrics.json`` of runs made in separate processes (e.g. one seed each, ``--seed k --seeds 1``,
    or some drop rates each) into one table in ``cfg.out``. The runs must agree on every setting but the seeds and
    rates, and every model and rate must end up with the same seeds."""
    parts = []
    for d in dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise DemoError(f"--merge: no metrics.json in {d}")
        parts.append(json.loads(path.read_text()))
    ignore = {"seed", "seeds", "rates", "out", "plots", "quick"}
    base = {k: v for k, v in parts[0]["config"].items() if k not in ignore}
    for d, p in zip(dirs, parts):
        other = {k: v for k, v in p["config"].items() if k not in ignore}
        if other != base:
            diff = sorted(k for k in base if base[k] != other.get(k))
            raise DemoError(f"--merge: {d} was run with other settings ({', '.join(diff)})")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for p in parts:
        for name, by_rate in p["runs"].items():
            for rate, rs in by_rate.items():
                runs.setdefault(name, {}).setdefault(rate, []).extend(rs)
    seeds = sorted({r["seed"] for by_rate in runs.values() for rs in by_rate.values() for r in rs})
    rates = sorted({float(r) for by_rate in runs.values() for r in by_rate})
    for name, by_rate in runs.items():
        for rate, rs in by_rate.items():
            rs.sort(key=lambda r: r["seed"])
            if [r["seed"] for r in rs] != seeds:
                raise DemoError(f"--merge: {name} at drop rate {rate} has seeds {[r['seed'] for r in rs]}, the "
                                f"merged runs {seeds}; every model and rate needs the same seeds")
    cfg = replace(cfg, **base, seed=seeds[0], seeds=len(seeds), rates=rates)
    return summarise(cfg, runs, sum(p["seconds_total"] for p in parts))


def run(args: argparse.Namespace) -> int:
    if args.extra is not None and "none" in args.extra:
        if len(args.extra) > 1:
            raise DemoError(f"--extra {' '.join(args.extra)}: 'none' cannot be combined with a channel")
        args.extra = []
    if args.augment is not None and "none" in args.augment:
        if len(args.augment) > 1:
            raise DemoError(f"--augment {' '.join(args.augment)}: 'none' cannot be combined with an augmentation")
        args.augment = []
    cfg = config_from_args(CDEConfig, args, QUICK)
    if cfg.augment_channels < 0 or (cfg.augment_channels and "cumsum" not in cfg.augment):
        raise DemoError(f"--augment-channels {cfg.augment_channels}: must be >= 0, and > 0 only with --augment cumsum "
                        f"(it sets how many learned combinations of the integral channels the path gets)")
    if args.merge:
        merge(cfg, args.merge)
    else:
        train(cfg)
    return 0
