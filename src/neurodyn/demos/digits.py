"""ODE-Net vs ResNet vs RK-Net on the 8x8 handwritten digits that ship with scikit-learn.

The data: ``sklearn.datasets.load_digits`` (1797 grey 8x8 images, 10 classes; bundled with scikit-learn, so
nothing is downloaded), scaled to [0, 1], split once by a seeded stratified split into 1437 training and 360
test images.

Three classifiers share a downsampling conv stem (1x8x8 -> Cx4x4) and a head (GroupNorm, ReLU, global
average pool, linear); they differ only in the feature block between them, built from one vector field
``f(t, h)`` as in the Neural ODE paper (Chen et al. 2018): GroupNorm, ReLU, 3x3 conv with the time as an
extra input channel, GroupNorm, ReLU, 3x3 conv with time channel, GroupNorm.

* ``odenet``: ``h(1) = h(0) + int_0^1 f(t, h) dt`` with ONE shared ``f``, solved by ``neurodyn.NeuralODE``
  (adaptive ``dopri5``, ``rtol = atol = 1e-3``, gradient ``"direct"`` by default).
* ``resnet``: ``N = 6`` separate residual layers ``h <- h + f_k(k / N, h)``, each with its own weights
  (about 6x the block's parameters).
* ``rknet``: the same single ``f`` integrated by fixed-step ``rk4`` (neurodyn's ``rk4`` is Kutta's 3/8 rule,
  as torchdiffeq's; step 0.25: 4 steps, 16 evaluations), gradient by backpropagation through the steps.

Reported per model (``metrics.json``): test accuracy, parameter count, vector-field evaluations (NFE) per
forward and per backward pass of one training batch (mean over training; "direct" backprop replays the
recorded graph and calls ``f`` zero times, so its backward NFE is 0), peak memory and training time.  Peak
memory is the rise of the process's peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` before each model, after ``malloc_trim``; ``resource.getrusage`` max RSS where that
is unavailable) over the resident size at the start of that model's training.  RSS on CPU is coarse (allocator
caching, page granularity, other allocations in the process), so ``extras.autograd_saved_mb`` also gives the
bytes autograd keeps for the backward pass of one training batch, counted exactly with
``torch.autograd.graph.saved_tensors_hooks``.

Adaptive computation (ODE-Net): each test image is solved alone, and its NFE is set against its
classification margin (top-1 minus top-2 logit), at the training tolerance and again at ``rtol = atol = 1e-5``
(dopri5 spends 6 evaluations per step, so at 1e-3 the NFE only takes two or three values); the Spearman rank
correlation is reported.  A tolerance
sweep (``rtol = atol`` from 1e-1 to 1e-5) gives test accuracy, mean NFE and wall time per test batch.

Default budget: 10 epochs of each model, float32, one torch thread; about 1.5-2 minutes on two shared CPU
cores.  Everything is seeded (split, initialisation, batch order), so accuracies and NFE repeat exactly;
times do not.

Regularisers (``--regularizers``, off by default): the ODE-Net is trained again, same initialisation, batch
order and epochs, with (a) RNODE: kinetic energy + Jacobian Frobenius norm (Hutchinson) integrated with the
state (``neurodyn.regularizers.regularized_solve``), (b) STEER: the end time of every training solve drawn
uniformly from ``[1 - b, 1 + b]`` (``steer_time``), (c) TayNODE: ``||d^2 h/dt^2||^2`` integrated with the state.
Each is evaluated as a plain ODE-Net at ``t = (0, 1)``: test accuracy and NFE per test batch at the training
tolerance (and at ``adaptive_tight_rtol``), next to its forward NFE per training batch over the last epoch;
``extras.regularizers`` in ``metrics.json`` and a console table.

Outputs (in ``--out``, default ``runs/digits``): ``metrics.json``, ``nfe_vs_margin.png``,
``tolerance_sweep.png`` and ``training_curves.png``.

Evaluation solves that fail (a learned field that stiffens, a very loose sweep tolerance) do not stop the
demo: the images of a failed solve count as misclassified, and ``eval_failures`` (per model),
``n_failed``/``failures`` (adaptive study) and ``failed_batches`` (sweep) in ``metrics.json`` record them.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import neurodyn
from neurodyn import regularizers
from neurodyn.demos._common import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    DemoError,
    add_out_and_seed,
    failure_note,
    failures_returned,
    float_in,
    training_failure,
)
from neurodyn.errors import SolveFailure
from neurodyn.progress import Progress
from neurodyn.regularizers import regularized_solve, steer_time
from neurodyn.solvers import available_methods

NAME = "digits"
DESCRIPTION = "ODE-Net vs ResNet vs RK-Net on scikit-learn's 8x8 digits (accuracy, NFE, memory, adaptive NFE)"

MODELS = ("odenet", "resnet", "rknet")
REG_VARIANTS = ("rnode", "steer", "taynode")  # --regularizers: the ODE-Net retrained with each
REG_KEYS = ("test_accuracy", "nfe_forward_end", "nfe_test_batch", "test_accuracy_tight", "nfe_test_batch_tight",
            "train_seconds")
METRIC_KEYS = ("test_accuracy", "params", "nfe_forward", "nfe_backward", "peak_memory_mb", "train_seconds")
SWEEP_RTOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


# ----------------------------------------------------------------------------------------------- config
@dataclass
class DigitsConfig:
    out: str = "runs/digits"
    epochs: int = 10
    seed: int = 0
    quick: bool = False
    width: int = 32
    groups: int = 8
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 1e-4
    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-3
    gradient: str = "direct"
    resnet_blocks: int = 6
    rk_step: float = 0.25
    test_size: int = 360
    eval_batch: int = 120
    threads: int = 1
    plots: bool = True
    train_limit: int = 0  # > 0: use only this many training images (the --quick smoke run)
    adaptive_limit: int = 0  # > 0: solve only this many test images one by one
    adaptive_tight_rtol: float = 1e-5  # the per-image NFE study is repeated at this rtol = atol
    sweep_rtols: tuple[float, ...] = SWEEP_RTOLS
    regularizers: bool = False  # also train the ODE-Net with RNODE, STEER and TayNODE (REG_VARIANTS)
    # RNODE weights. The penalties are sums over the 16 * width = 512 features of a sample (not means): 0.01
    # (the RNODE paper's scale) held the test accuracy at chance after 2 epochs; 1e-4 trained (short trial)
    reg_kinetic: float = 1e-4
    reg_jacobian: float = 1e-4
    reg_taylor: float = 1e-4  # TayNODE weight of ||d^K h/dt^K||^2, K = taylor_order (1e-3 collapsed at 3 epochs)
    taylor_order: int = 2
    steer_b: float = 0.5  # STEER: end time uniform in [1 - b, 1 + b]
    reg_variants: tuple[str, ...] = REG_VARIANTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DigitsConfig()
    add_out_and_seed(parser, d.out, d.seed)
    parser.add_argument("--epochs", type=POSITIVE_INT, default=None, metavar="N",
                        help=f"training epochs per model (default: {d.epochs}; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 320 training images, width 8, 2 epochs, 24 images in the per-image NFE "
                             "study (seconds; the accuracies mean nothing)")
    parser.add_argument("--width", type=POSITIVE_INT, default=None, metavar="C",
                        help=f"channels of the feature block (default: {d.width})")
    parser.add_argument("--method", default=d.method, choices=available_methods(), metavar="METHOD",
                        help=f"ODE-Net solver (default: {d.method})")
    parser.add_argument("--rtol", type=POSITIVE, default=d.rtol, help=f"ODE-Net rtol (default: {d.rtol:g})")
    parser.add_argument("--atol", type=POSITIVE, default=d.atol, help=f"ODE-Net atol (default: {d.atol:g})")
    parser.add_argument("--gradient", default=d.gradient, choices=("direct", "adjoint", "checkpoint"),
                        help=f"ODE-Net gradient method (default: {d.gradient})")
    parser.add_argument("--lr", type=POSITIVE, default=d.lr, help=f"AdamW learning rate (default: {d.lr:g})")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=d.batch_size,
                        help=f"training batch size (default: {d.batch_size})")
    parser.add_argument("--threads", type=POSITIVE_INT, default=d.threads,
                        help=f"torch CPU threads (default: {d.threads}: these convolutions are tiny, and on a "
                             "busy 2-core machine a second OpenMP thread made training 5-30x slower)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument("--regularizers", action="store_true",
                        help="also train the ODE-Net (same seed and epochs) with RNODE (kinetic + Jacobian), STEER "
                             "and TayNODE, and report accuracy and NFE of each (extras.regularizers)")
    parser.add_argument("--reg-kinetic", type=NON_NEGATIVE, default=d.reg_kinetic,
                        help=f"RNODE kinetic-energy weight (default: {d.reg_kinetic:g})")
    parser.add_argument("--reg-jacobian", type=NON_NEGATIVE, default=d.reg_jacobian,
                        help=f"RNODE Jacobian-Frobenius weight (default: {d.reg_jacobian:g})")
    parser.add_argument("--reg-taylor", type=NON_NEGATIVE, default=d.reg_taylor,
                        help=f"TayNODE weight (default: {d.reg_taylor:g}, order {d.taylor_order})")
    parser.add_argument("--steer-b", type=float_in(0.0, 1.0, high_open=True), default=d.steer_b,
                        help=f"STEER half-width b: end time uniform in [1-b, 1+b] (default: {d.steer_b:g})")
    parser.add_argument("--reg-variants", type=_variants, default=None, metavar="LIST",
                        help=f"comma-separated subset of {','.join(REG_VARIANTS)} to train with --regularizers "
                             "(default: all; rnode and taynode cost 4-20x a plain training step on CPU)")


def _variants(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in names if v not in REG_VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {REG_VARIANTS}, got {text!r}")
    return names


def config_from_args(args: argparse.Namespace) -> DigitsConfig:
    names = {f.name for f in fields(DigitsConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = DigitsConfig(**kw)
    if cfg.quick:
        cfg.epochs = kw.get("epochs", 2)
        cfg.width = kw.get("width", 8)
        cfg.groups = min(cfg.groups, cfg.width)
        cfg.train_limit = 320
        cfg.test_size = 360
        cfg.eval_batch = 120
        cfg.adaptive_limit = 24
        cfg.sweep_rtols = (1e-1, 1e-3)
    return cfg


# ------------------------------------------------------------------------------------------------- data
def load_data(cfg: DigitsConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: float32 images (N, 1, 8, 8) in [0, 1], int64 labels."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(f"the digits demo needs scikit-learn: pip install neurodyn[demo] ({exc})") from exc
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=cfg.test_size, stratify=y, random_state=cfg.seed)
    if cfg.train_limit:
        x_tr, y_tr = x_tr[: cfg.train_limit], y_tr[: cfg.train_limit]
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)



# ----------------------------------------------------------------------------------------------- models
class ConcatConv2d(nn.Module):
    """3x3 convolution that sees the time ``t`` as one extra constant input channel."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin + 1, cout, 3, padding=1)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = torch.ones_like(x[:, :1]) * t.to(x.dtype)
        return self.conv(torch.cat([tt, x], 1))


class ConvODEFunc(nn.Module):
    """The vector field ``f(t, h)``: GN, ReLU, tconv, GN, ReLU, tconv, GN (the Neural ODE paper's block)."""

    def __init__(self, width: int, groups: int = 8):
        super().__init__()
        g = min(groups, width)
        self.norm1 = nn.GroupNorm(g, width)
        self.conv1 = ConcatConv2d(width, width)
        self.norm2 = nn.GroupNorm(g, width)
        self.conv2 = ConcatConv2d(width, width)
        self.norm3 = nn.GroupNorm(g, width)

    def forward(self, t: Tensor, h: Tensor) -> Tensor:
        out = self.conv1(t, F.relu(self.norm1(h)))
        out = self.conv2(t, F.relu(self.norm2(out)))
        return self.norm3(out)


class ResBlocks(nn.Module):
    """``N`` separate residual layers ``h <- h + f_k(k / N, h)`` (the same block, unshared weights)."""

    def __init__(self, width: int, groups: int, n: int):
        super().__init__()
        self.blocks = nn.ModuleList(ConvODEFunc(width, groups) for _ in range(n))
        self.nfe_forward = 0
        self.nfe_backward = 0  # backprop replays the graph: no block calls

    def forward(self, h: Tensor) -> Tensor:
        n = len(self.blocks)
        for k, f in enumerate(self.blocks):
            h = h + f(torch.tensor(k / n), h)
        self.nfe_forward = n
        return h


def make_stem(width: int, groups: int) -> nn.Module:
    """1x8x8 -> width x 4x4."""
    g = min(groups, width)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.GroupNorm(g, width), nn.ReLU(),
        nn.Conv2d(width, width, 4, stride=2, padding=1),
    )


def make_head(width: int, groups: int) -> nn.Module:
    return nn.Sequential(
        nn.GroupNorm(min(groups, width), width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, 10),
    )


class Classifier(nn.Module):
    """stem -> feature block -> head; ``block`` exposes ``nfe_forward`` / ``nfe_backward``."""

    def __init__(self, block: nn.Module, width: int, groups: int):
        super().__init__()
        self.stem = make_stem(width, groups)
        self.block = block
        self.head = make_head(width, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.stem(x)))


def build_model(kind: str, cfg: DigitsConfig) -> Classifier:
    w, g = cfg.width, cfg.groups
    if kind == "odenet":
        block: nn.Module = neurodyn.NeuralODE(ConvODEFunc(w, g), t=(0.0, 1.0), method=cfg.method, rtol=cfg.rtol,
                                              atol=cfg.atol, gradient=cfg.gradient)
    elif kind == "resnet":
        block = ResBlocks(w, g, cfg.resnet_blocks)
    elif kind == "rknet":
        block = neurodyn.NeuralODE(ConvODEFunc(w, g), t=(0.0, 1.0), method="rk4", step_size=cfg.rk_step,
                                   gradient="direct")
    else:
        raise ValueError(f"unknown model {kind!r}; expected one of {MODELS}")
    return Classifier(block, w, g)


class RegularizedODEBlock(nn.Module):
    """The ODE-Net block trained with a regulariser (``variant`` in ``REG_VARIANTS``).

    Training (``self.training``): ``rnode`` / ``taynode`` solve the state together with the penalty integrals
    (:func:`neurodyn.regularizers.regularized_solve`) and leave the weighted penalty in ``self.penalty`` for
    the loss; ``steer`` integrates to a random end time in ``[1 - b, 1 + b]``.  Evaluation: the plain
    ``NeuralODE`` solve on ``t = (0, 1)``, so every variant is measured exactly as the plain ODE-Net is.
    """

    def __init__(self, ode: neurodyn.NeuralODE, variant: str, cfg: DigitsConfig):
        super().__init__()
        if variant not in REG_VARIANTS:
            raise ValueError(f"unknown regulariser {variant!r}; expected one of {REG_VARIANTS}")
        self.ode = ode
        self.variant = variant
        self.steer_b = cfg.steer_b
        self.steer_gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.field: regularizers.RegularizedField | None = None
        if variant == "rnode":
            self.field = regularizers.RegularizedField(ode.func, kinetic=cfg.reg_kinetic, jacobian=cfg.reg_jacobian,
                                        generator=torch.Generator().manual_seed(cfg.seed + 3))
        elif variant == "taynode":
            self.field = regularizers.RegularizedField(ode.func, taylor=cfg.reg_taylor, taylor_order=cfg.taylor_order)
        self.penalty: Tensor | None = None
        self.parts: dict[str, float] = {}
        self.nfe_forward = 0
        self.last_solution: neurodyn.Solution | None = None  # the last training solve with a penalty

    # the tolerance study and the sweep set these on the block
    @property
    def rtol(self) -> float:
        return self.ode.rtol

    @rtol.setter
    def rtol(self, value: float) -> None:
        self.ode.rtol = value

    @property
    def atol(self) -> float:
        return self.ode.atol

    @atol.setter
    def atol(self, value: float) -> None:
        self.ode.atol = value

    @property
    def nfe_backward(self) -> int:
        if self.training and self.field is not None:  # the solve's own count ("direct" backward calls no field)
            sol = self.last_solution
            return int(sol.stats.get("nfe_backward", 0)) if sol is not None else 0
        return self.ode.nfe_backward

    def forward(self, h: Tensor) -> Tensor:
        self.penalty = None
        if not self.training:
            out = self.ode(h)
            self.nfe_forward = self.ode.nfe_forward
            return out
        t_end = steer_time(1.0, self.steer_b, self.steer_gen, t0=0.0) if self.variant == "steer" else 1.0
        t = torch.tensor([0.0, t_end], dtype=h.dtype)
        if self.field is None:
            out = self.ode(h, t=t)
            self.nfe_forward = self.ode.nfe_forward
            return out
        zs, penalty, parts, sol = regularized_solve(self.field, h, t, method=self.ode.method, rtol=self.ode.rtol,
                                                    atol=self.ode.atol, gradient=self.ode.gradient,
                                                    return_solution=True)
        self.last_solution = sol
        self.nfe_forward = int(sol.stats["nfe"])
        self.penalty = penalty
        self.parts = {k: float(v.detach().mean()) for k, v in parts.items()}
        return zs[-1]


def build_regularized(variant: str, cfg: DigitsConfig) -> Classifier:
    """The ODE-Net of ``build_model("odenet")`` (same parameters, same initialisation under the same seed) with
    its block wrapped for ``variant``."""
    model = build_model("odenet", cfg)
    model.block = RegularizedODEBlock(model.block, variant, cfg)
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------- memory
_LIBC: Any = None


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so one model's cache does not hide the next one's."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
        _LIBC = False


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        return None
    return None


class PeakRSS:
    """Peak resident set size reached inside a ``with`` block, minus the resident size at its start (MB).

    Linux: the high-water mark ``VmHWM`` is reset by writing 5 to ``/proc/self/clear_refs``.  Elsewhere:
    ``resource.getrusage`` max RSS, which never goes down (so later blocks can only report a rise above
    the earlier peak).
    """

    def __enter__(self) -> PeakRSS:
        gc.collect()
        _malloc_trim()
        self.method = "ru_maxrss"
        try:
            Path("/proc/self/clear_refs").write_text("5")
            if _proc_status_kb("VmHWM") is not None:
                self.method = "VmHWM (reset via /proc/self/clear_refs)"
        except OSError:  # pragma: no cover - non-Linux or restricted /proc
            pass
        self.start_kb = _proc_status_kb("VmRSS") if self.method != "ru_maxrss" else self._maxrss_kb()
        return self

    @staticmethod
    def _maxrss_kb() -> int:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, kB on Linux

    def __exit__(self, *exc: object) -> None:
        peak = _proc_status_kb("VmHWM") if self.method != "ru_maxrss" else self._maxrss_kb()
        self.mb = max(0, (peak or 0) - (self.start_kb or 0)) / 1024.0


def autograd_saved_mb(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Bytes (MB) autograd saves for the backward pass of one batch, each tensor storage counted once."""
    seen: set[int] = set()
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        try:
            key = t.untyped_storage().data_ptr()
            size = t.untyped_storage().nbytes()
        except RuntimeError:  # pragma: no cover - tensors without storage
            key, size = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += size
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total / 2**20


# ------------------------------------------------------------------------------------------------- train
def train_model(kind: str, model: Classifier, data: tuple[Tensor, ...], cfg: DigitsConfig,
                stream: Any) -> dict[str, Any]:
    x_tr, y_tr, x_te, y_te = data
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n = x_tr.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if total >= 10:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.2)
    else:  # OneCycleLR divides by zero when the warm-up phase rounds to no step (e.g. 5 steps): constant LR
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    nfe_f: list[int] = []
    nfe_b: list[int] = []
    epoch_loss: list[float] = []
    epoch_test_acc: list[float] = []
    bar = Progress(total, desc=f"{kind:>6s}", stream=stream)
    eval_seconds = 0.0
    eval_failures: list[str] = []  # notes of evaluation solves that failed (their images count as wrong)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        for _ in range(cfg.epochs):
            model.train()
            perm = torch.randperm(n, generator=gen)
            run_loss = 0.0
            for i in range(steps_per_epoch):
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                opt.zero_grad(set_to_none=True)
                try:
                    loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                except SolveFailure as exc:
                    bar.close()
                    raise training_failure(f"{kind}, step {len(nfe_f) + 1}", exc) from exc
                penalty = getattr(model.block, "penalty", None)  # RegularizedODEBlock (--regularizers) only
                if penalty is not None:
                    loss = loss + penalty
                nfe_f.append(model.block.nfe_forward)
                loss.backward()
                nfe_b.append(model.block.nfe_backward)
                opt.step()
                sched.step()
                value = loss.item()
                if not math.isfinite(value):
                    bar.close()
                    raise DemoError(f"{kind}: training diverged (loss={value}); try a lower --lr")
                run_loss += value * idx.numel()
                bar.update(loss=value, nfe=nfe_f[-1])
            epoch_loss.append(run_loss / n)
            e0 = time.perf_counter()
            epoch_test_acc.append(accuracy(model, x_te, y_te, cfg.eval_batch, eval_failures))
            eval_seconds += time.perf_counter() - e0
        train_seconds = time.perf_counter() - t0 - eval_seconds  # the per-epoch test evaluations excluded
    bar.close()
    saved = autograd_saved_mb(model, x_tr[: cfg.batch_size], y_tr[: cfg.batch_size])
    acc = accuracy(model, x_te, y_te, cfg.eval_batch, eval_failures)
    result = {
        "test_accuracy": acc,
        "params": n_params(model),
        "nfe_forward": float(np.mean(nfe_f)) if nfe_f else 0.0,
        "nfe_backward": float(np.mean(nfe_b)) if nfe_b else 0.0,
        "peak_memory_mb": mem.mb,
        "train_seconds": train_seconds,
        "extras": {
            "block_params": n_params(model.block),
            "nfe_forward_max": int(max(nfe_f)) if nfe_f else 0,
            "nfe_backward_max": int(max(nfe_b)) if nfe_b else 0,
            "autograd_saved_mb": saved,
            "peak_memory_method": mem.method,
            "epoch_train_loss": epoch_loss,
            "epoch_test_accuracy": epoch_test_acc,
            "train_steps": total,
            "block": _describe_block(kind, cfg),
            "eval_failures": eval_failures,
        },
    }
    if cfg.regularizers:  # forward NFE per training batch over the last epoch ("at the end of training")
        result["extras"]["nfe_forward_last_epoch"] = float(np.mean(nfe_f[-steps_per_epoch:])) if nfe_f else 0.0
    print(f"{kind}: test accuracy {acc:.4f}, {result['params']} params, NFE fwd {result['nfe_forward']:.1f} "
          f"bwd {result['nfe_backward']:.1f}, peak RSS +{mem.mb:.1f} MB (autograd saves {saved:.1f} MB/batch), "
          f"{train_seconds:.1f}s", file=stream)
    return result


def _describe_block(kind: str, cfg: DigitsConfig) -> str:
    ode = f"NeuralODE({cfg.method}, rtol={cfg.rtol:g}, atol={cfg.atol:g}, gradient={cfg.gradient})"
    if kind == "rnode":
        return f"{ode} + kinetic {cfg.reg_kinetic:g} + Jacobian Frobenius {cfg.reg_jacobian:g} (Hutchinson)"
    if kind == "steer":
        return f"{ode}, STEER end time ~ U[{1 - cfg.steer_b:g}, {1 + cfg.steer_b:g}] in training"
    if kind == "taynode":
        return f"{ode} + TayNODE order {cfg.taylor_order}, weight {cfg.reg_taylor:g}"
    if kind == "odenet":
        return f"NeuralODE({cfg.method}, rtol={cfg.rtol:g}, atol={cfg.atol:g}, gradient={cfg.gradient})"
    if kind == "resnet":
        return f"{cfg.resnet_blocks} residual layers h + f_k(k/N, h)"
    return f"NeuralODE(rk4, step_size={cfg.rk_step:g}, gradient=direct)"


def warm_up(cfg: DigitsConfig, x: Tensor, y: Tensor) -> None:
    """One training step of a throwaway copy of each model, so that one-time allocations (kernel caches,
    the autograd engine) are not charged to the first model's peak memory."""
    for kind in MODELS:
        model = build_model(kind, cfg)
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            model.eval()
            model(x[:1])
    gc.collect()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int, failures: list[str] | None = None) -> float:
    """Fraction of ``x`` (N, 1, 8, 8) classified as ``y`` (N,), in batches of ``batch``, in eval mode. The
    images of a batch whose ODE solve failed (``on_failure="return"``) count as misclassified; a note on each
    such solve is appended to ``failures``.

    Example: ``accuracy(model, x_te, y_te, 120)`` -> 0.97
    """
    model.eval()
    correct = 0
    with failures_returned(model) as failed:
        for i in range(0, x.shape[0], batch):
            logits = model(x[i:i + batch])
            sol = failed()
            if sol is not None:
                if failures is not None:
                    failures.append(f"images {i}..{min(i + batch, x.shape[0]) - 1}: {failure_note(sol)}")
                continue
            correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / x.shape[0]


# ------------------------------------------------------------------------------------ adaptive computation
def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    def ranks(v: Any) -> Any:
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return sums[inv] / counts[inv]

    ra, rb = ranks(a), ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def per_input_nfe(model: Classifier, x: Tensor, y: Tensor, tol: float | None = None) -> dict[str, Any]:
    """Solve each input alone (the error norm of a batched solve is shared by the whole batch): its NFE,
    margin (top-1 minus top-2 logit) and correctness; at ``rtol = atol = tol`` if given."""
    model.eval()
    block = model.block
    saved = (block.rtol, block.atol)
    if tol is not None:
        block.rtol = block.atol = tol
    nfe, margin, correct, failures = [], [], [], []
    t0 = time.perf_counter()
    try:
        with failures_returned(model) as failed:
            for i in range(x.shape[0]):
                logits = model(x[i:i + 1])[0]
                sol = failed()
                if sol is not None:  # left out of the statistics, counted and noted
                    failures.append(f"image {i}: {failure_note(sol)}")
                    continue
                nfe.append(int(block.nfe_forward))
                top2 = logits.topk(2).values
                margin.append(float(top2[0] - top2[1]))
                correct.append(bool(int(logits.argmax()) == int(y[i])))
        rtol, atol = block.rtol, block.atol
    finally:
        block.rtol, block.atol = saved
    seconds = time.perf_counter() - t0
    nfe_a = np.asarray(nfe, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if not len(nfe):
        nfe_a = np.asarray([np.nan])  # every solve failed: the statistics below are NaN (null in the JSON)
    return {
        "rtol": rtol,
        "atol": atol,
        "n_inputs": len(nfe),
        "n_failed": len(failures),
        "failures": failures,
        "nfe": nfe,
        "margin": margin,
        "correct": correct,
        "spearman_nfe_vs_margin": spearman(nfe, margin),
        "nfe_mean": float(nfe_a.mean()),
        "nfe_min": int(nfe_a.min()) if len(nfe) else float("nan"),
        "nfe_max": int(nfe_a.max()) if len(nfe) else float("nan"),
        "nfe_mean_correct": float(nfe_a[ok].mean()) if ok.any() else float("nan"),
        "nfe_mean_wrong": float(nfe_a[~ok].mean()) if (~ok).any() else float("nan"),
        "nfe_histogram": {str(k): int(v) for k, v in zip(*np.unique(np.asarray(nfe, dtype=int),
                                                                    return_counts=True))},
        "seconds": seconds,
    }


@torch.no_grad()
def tolerance_sweep(model: Classifier, x: Tensor, y: Tensor, cfg: DigitsConfig) -> list[dict[str, Any]]:
    """Test accuracy, mean NFE and wall time per test batch of the trained ODE-Net at each ``rtol = atol``."""
    block = model.block
    saved = (block.rtol, block.atol)
    rows = []
    model.eval()
    try:
        for tol in cfg.sweep_rtols:
            block.rtol, block.atol = tol, tol
            correct, nfes, walls, failures = 0, [], [], []
            with failures_returned(model) as failed:
                for i in range(0, x.shape[0], cfg.eval_batch):
                    t0 = time.perf_counter()
                    logits = model(x[i:i + cfg.eval_batch])
                    walls.append(time.perf_counter() - t0)
                    nfes.append(block.nfe_forward)
                    sol = failed()
                    if sol is not None:  # a failed batch counts as misclassified
                        failures.append(f"batch {i // cfg.eval_batch}: {failure_note(sol)}")
                        continue
                    correct += int((logits.argmax(1) == y[i:i + cfg.eval_batch]).sum())
            rows.append({"rtol": tol, "atol": tol, "test_accuracy": correct / x.shape[0],
                         "nfe_per_batch": float(np.mean(nfes)), "wall_ms_per_batch": 1e3 * float(np.mean(walls)),
                         "batch_size": cfg.eval_batch, "failed_batches": len(failures), "failures": failures})
    finally:
        block.rtol, block.atol = saved
    return rows


# ----------------------------------------------------------------------------------------------------- run
def train(cfg: DigitsConfig, *, stream: Any = None) -> dict[str, Any]:
    """Run the whole demo; return the metrics dict (also written to ``<out>/metrics.json``)."""
    stream = stream if stream is not None else sys.stdout
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        data = load_data(cfg)
        x_tr, y_tr, x_te, y_te = data
        print(f"neurodyn demo digits: {x_tr.shape[0]} train / {x_te.shape[0]} test images, {cfg.epochs} epochs, "
              f"width {cfg.width}, ODE-Net {cfg.method} rtol={cfg.rtol:g} atol={cfg.atol:g} "
              f"gradient={cfg.gradient}, seed={cfg.seed}, out={out}", file=stream)
        warm_up(cfg, x_tr[: cfg.batch_size], y_tr[: cfg.batch_size])
        metrics: dict[str, Any] = {}
        models: dict[str, Classifier] = {}
        for kind in MODELS:
            torch.manual_seed(cfg.seed)
            models[kind] = build_model(kind, cfg)
            metrics[kind] = train_model(kind, models[kind], data, cfg, stream)

        odenet = models["odenet"]
        x_ad, y_ad = x_te, y_te
        if cfg.adaptive_limit:
            x_ad, y_ad = x_te[: cfg.adaptive_limit], y_te[: cfg.adaptive_limit]
        adaptive = per_input_nfe(odenet, x_ad, y_ad)
        adaptive_tight = per_input_nfe(odenet, x_ad, y_ad, tol=cfg.adaptive_tight_rtol)
        for a in (adaptive, adaptive_tight):
            print(f"adaptive computation at rtol=atol={a['rtol']:g}: NFE per test image {a['nfe_min']}..{a['nfe_max']} "
                  f"(mean {a['nfe_mean']:.1f}; correct {a['nfe_mean_correct']:.1f}, misclassified "
                  f"{a['nfe_mean_wrong']:.1f}); Spearman(NFE, margin) = {a['spearman_nfe_vs_margin']:.3f}", file=stream)
        sweep = tolerance_sweep(odenet, x_te, y_te, cfg)
        for row in sweep:
            print(f"  rtol {row['rtol']:.0e}: accuracy {row['test_accuracy']:.4f}, NFE/batch "
                  f"{row['nfe_per_batch']:.1f}, {row['wall_ms_per_batch']:.1f} ms/batch", file=stream)

        reg = run_regularizers(cfg, data, metrics["odenet"], odenet, stream) if cfg.regularizers else None

        plots: list[str] = []
        if cfg.plots:
            plots = _make_plots(cfg, out, metrics, [adaptive, adaptive_tight], sweep, stream)
        metrics["extras"] = {
            "adaptive": adaptive,
            "adaptive_tight": adaptive_tight,
            "tolerance_sweep": sweep,
            "wall_seconds": None,  # filled in below, just before writing
            "data": {"train": int(x_tr.shape[0]), "test": int(x_te.shape[0]), "image": [1, 8, 8],
                     "source": "sklearn.datasets.load_digits, stratified train_test_split(random_state=seed)"},
            "config": asdict(cfg),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python_version": platform.python_version(),
            "machine": platform.machine(),
            "plots": plots,
        }
        if reg is not None:
            metrics["extras"]["regularizers"] = reg
    finally:
        torch.set_num_threads(old_threads)

    wall = time.perf_counter() - wall0
    metrics["extras"]["wall_seconds"] = wall
    (out / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2, allow_nan=False) + "\n")
    print(f"done in {wall:.1f}s; wrote {out / 'metrics.json'}" + "".join(f", {p}" for p in plots), file=stream)
    print(format_table(metrics), file=stream)
    if reg is not None:
        print(format_regularizer_table(reg), file=stream)
    return metrics


def run_regularizers(cfg: DigitsConfig, data: tuple[Tensor, ...], plain_metrics: dict[str, Any],
                     plain: Classifier, stream: Any) -> dict[str, Any]:
    """Train the ODE-Net with each of ``REG_VARIANTS`` (same seed, batches, epochs as the plain one) and
    evaluate every variant, the plain one included, as a plain ODE-Net on ``t = (0, 1)``."""
    _, _, x_te, y_te = data
    tols = (cfg.rtol, cfg.adaptive_tight_rtol)
    eval_cfg = DigitsConfig(**{**asdict(cfg), "sweep_rtols": tols})

    def summary(model: Classifier, m: dict[str, Any]) -> dict[str, Any]:
        at, tight = tolerance_sweep(model, x_te, y_te, eval_cfg)
        return {"test_accuracy": at["test_accuracy"], "nfe_forward_end": m["extras"]["nfe_forward_last_epoch"],
                "nfe_test_batch": at["nfe_per_batch"], "test_accuracy_tight": tight["test_accuracy"],
                "nfe_test_batch_tight": tight["nfe_per_batch"], "train_seconds": m["train_seconds"],
                "nfe_forward_mean": m["nfe_forward"], "nfe_backward_mean": m["nfe_backward"],
                "epoch_test_accuracy": m["extras"]["epoch_test_accuracy"], "block": m["extras"]["block"]}

    variants = {"plain": summary(plain, plain_metrics)}
    for variant in cfg.reg_variants:
        torch.manual_seed(cfg.seed)
        model = build_regularized(variant, cfg)
        m = train_model(variant, model, data, cfg, stream)
        m["extras"]["block"] = _describe_block(variant, cfg)
        variants[variant] = summary(model, m)
        if model.block.parts:
            variants[variant]["penalties_last_batch"] = model.block.parts
    return {
        "variants": variants,
        "eval_rtol": cfg.rtol,
        "eval_rtol_tight": cfg.adaptive_tight_rtol,
        "eval_batch": cfg.eval_batch,
        "weights": {"kinetic": cfg.reg_kinetic, "jacobian": cfg.reg_jacobian, "taylor": cfg.reg_taylor,
                    "taylor_order": cfg.taylor_order, "steer_b": cfg.steer_b},
        "notes": "nfe_forward_end: forward NFE per training batch, mean over the last epoch (rnode/taynode count "
                 "evaluations of the augmented field, steer solves to its random end time); nfe_test_batch: "
                 "plain solve on t=(0,1) per test batch of eval_batch at rtol=atol=eval_rtol (_tight: at "
                 "eval_rtol_tight); same seed, initialisation, batch order and epochs for every variant",
    }


def format_regularizer_table(reg: dict[str, Any]) -> str:
    tight = f"{reg['eval_rtol_tight']:g}"
    lines = [f"| ODE-Net variant | test acc | NFE fwd / train batch (last epoch) | NFE / test batch "
             f"(rtol {reg['eval_rtol']:g}) | test acc ({tight}) | NFE / test batch ({tight}) | train (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, v in reg["variants"].items():
        lines.append(f"| {name} | {v['test_accuracy']:.4f} | {v['nfe_forward_end']:.1f} | {v['nfe_test_batch']:.1f} "
                     f"| {v['test_accuracy_tight']:.4f} | {v['nfe_test_batch_tight']:.1f} | {v['train_seconds']:.1f} |")
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    """NaN / inf (e.g. a Spearman correlation of a constant NFE) become null: metrics.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def format_table(metrics: dict[str, Any]) -> str:
    head = "| model | test acc | params | NFE fwd | NFE bwd | peak RSS (MB) | autograd saved (MB) | train (s) |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for kind in MODELS:
        m = metrics[kind]
        lines.append(f"| {kind} | {m['test_accuracy']:.4f} | {m['params']} | {m['nfe_forward']:.1f} | "
                     f"{m['nfe_backward']:.1f} | {m['peak_memory_mb']:.1f} | {m['extras']['autograd_saved_mb']:.1f} "
                     f"| {m['train_seconds']:.1f} |")
    return "\n".join(lines)


def _make_plots(cfg: DigitsConfig, out: Path, metrics: dict[str, Any], adaptive: list[dict[str, Any]],
                sweep: list[dict[str, Any]], stream: Any) -> list[str]:
    try:
        from neurodyn import viz
        from neurodyn.viz import new_figure, save_figure
    except ImportError as exc:  # pragma: no cover
        print(f"skipping plots: {exc}", file=stream)
        return []
    try:
        paths = []
        # NFE vs margin, one panel per tolerance
        fig = new_figure((5.2 * len(adaptive), 4.2))
        axes = np.atleast_1d(fig.subplots(1, len(adaptive)))
        rng = np.random.default_rng(cfg.seed)
        for ax, a in zip(axes, adaptive):
            nfe = np.asarray(a["nfe"], dtype=float)
            margin = np.asarray(a["margin"])
            ok = np.asarray(a["correct"], dtype=bool)
            nfe = nfe + rng.uniform(-0.4, 0.4, nfe.shape)  # NFE moves in whole steps: jitter to show density
            ax.scatter(margin[ok], nfe[ok], s=12, alpha=0.5, color="C0", label="correct")
            if (~ok).any():
                ax.scatter(margin[~ok], nfe[~ok], s=30, marker="x", color="C3", label="misclassified")
            ax.set_xlabel("margin: top-1 minus top-2 logit")
            ax.set_ylabel("NFE, this test image solved alone (jittered)")
            ax.set_title(f"{cfg.method}, rtol = atol = {a['rtol']:g}: Spearman {a['spearman_nfe_vs_margin']:.2f}",
                         fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("ODE-Net adaptive computation: NFE per test image vs margin", fontsize=10)
        paths.append(save_figure(fig, out / "nfe_vs_margin.png"))
        # tolerance sweep
        fig = new_figure((9.0, 3.6))
        ax1, ax2 = fig.subplots(1, 2)
        tol = [r["rtol"] for r in sweep]
        ax1.semilogx(tol, [r["test_accuracy"] for r in sweep], "o-", color="C0")
        ax1.set_xlabel("rtol = atol")
        ax1.set_ylabel("test accuracy")
        ax1.invert_xaxis()
        ax1b = ax1.twinx()
        ax1b.semilogx(tol, [r["nfe_per_batch"] for r in sweep], "s--", color="C1")
        ax1b.set_ylabel("NFE per test batch", color="C1")
        ax1.grid(alpha=0.3)
        ax2.plot([r["wall_ms_per_batch"] for r in sweep], [r["test_accuracy"] for r in sweep], "o-", color="C2")
        for r in sweep:
            ax2.annotate(f"{r['rtol']:.0e}", (r["wall_ms_per_batch"], r["test_accuracy"]), fontsize=7,
                         textcoords="offset points", xytext=(3, 3))
        ax2.set_xlabel(f"wall ms per test batch of {cfg.eval_batch}")
        ax2.set_ylabel("test accuracy")
        ax2.grid(alpha=0.3)
        fig.suptitle("ODE-Net tolerance sweep: speed vs accuracy", fontsize=10)
        paths.append(save_figure(fig, out / "tolerance_sweep.png"))
        # training curves
        fig = new_figure((9.0, 3.4))
        ax1, ax2 = fig.subplots(1, 2)
        for i, kind in enumerate(MODELS):
            ex = metrics[kind]["extras"]
            ep = np.arange(1, len(ex["epoch_train_loss"]) + 1)
            ax1.semilogy(ep, ex["epoch_train_loss"], "o-", color=f"C{i}", label=kind)
            if ex["epoch_test_accuracy"]:
                ax2.plot(ep, ex["epoch_test_accuracy"], "o-", color=f"C{i}", label=kind)
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("train cross-entropy")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("test accuracy")
        for a in (ax1, ax2):
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        paths.append(save_figure(fig, out / "training_curves.png"))
    except viz.MissingMatplotlib as exc:
        print(f"skipping plots: {exc}", file=sys.stderr)
        return []
    return [str(p) for p in paths]


def validate(cfg: DigitsConfig) -> None:
    """Raise ``ValueError`` saying what is wrong with ``cfg`` (options that depend on each other), if anything."""
    groups = min(cfg.groups, cfg.width)
    if cfg.width % groups:
        raise ValueError(f"--width must be a multiple of {groups} (the GroupNorm groups), got {cfg.width}")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        validate(cfg)
    except ValueError as exc:
        print(f"neurodyn demo digits: error: {exc}", file=sys.stderr)
        return 2
    train(cfg)
    return 0
