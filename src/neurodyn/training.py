"""A small, reproducible trainer for Neural ODE models (and any ``nn.Module``).

:class:`Trainer` runs the usual loop (batch -> loss -> backward -> clip -> optimizer/scheduler step) and adds:

* a progress bar (:func:`~neurodyn.progress.progress_bar`: tqdm with its ETA when installed, else text) showing
  the loss, the NFE (forward+backward, summed over every :class:`~neurodyn.NeuralODE` in the model) and the step
  time;
* per-step logs ``metrics.csv`` and ``metrics.jsonl`` (appended and flushed every step) and a
  ``summary.json`` at the end, in ``log_dir``;
* seeded determinism: the data order comes from the trainer's own ``torch.Generator``;
* checkpoints (``log_dir/checkpoint.pt``) written atomically (temp file in the same folder, fsync,
  ``os.replace``) holding the model, optimizer and scheduler states, the step/epoch counters, the data-order
  generator and the python/numpy/torch RNG states, so that ``resume=True`` continues a run *bitwise* as if it
  had never stopped;
* DistributedDataParallel: under ``torchrun`` (or with ``torch.distributed`` already initialised) the model is
  wrapped in DDP (gloo on CPU, nccl on CUDA), the data sharded with a ``DistributedSampler`` seeded from the
  trainer's seed, and only rank 0 logs and writes checkpoints.

Example::

    import torch, neurodyn
    neurodyn.seed_everything(0)                     # before building the model: reproducible init
    f = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    model = neurodyn.NeuralODE(f, method="tsit5", rtol=1e-5, atol=1e-7)
    x = torch.randn(256, 2); y = x.flip(-1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = neurodyn.Trainer(model, opt, torch.nn.MSELoss(), train_data=(x, y), batch_size=32,
                               max_steps=200, log_dir="runs/flip", checkpoint_every=50, seed=0)
    history = trainer.fit()                         # list of per-step dicts (loss, nfe_forward, ...)
    trainer.evaluate((x, y))                        # {'loss': ..., 'samples': 256, ...}
    # after an interruption, the same script with resume=True continues from runs/flip/checkpoint.pt
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torch.utils.data._utils.collate import default_collate
from torch.utils.data.distributed import DistributedSampler

from .progress import progress_bar
from .solution import CODE, EVENT, FAILURE_STATUSES, SUCCESS

try:  # numpy is a dependency of neurodyn, but the trainer does not need it
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

__all__ = ["CheckpointError", "MetricLogger", "Trainer", "atomic_save", "count_nfe", "deterministic_mode",
           "seed_everything", "solver_stats", "unwrap_model"]

CHECKPOINT_NAME = "checkpoint.pt"
CSV_NAME = "metrics.csv"
JSONL_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
#: Columns of ``metrics.csv`` (and keys of each ``metrics.jsonl`` row / history entry).
COLUMNS = ("step", "epoch", "loss", "lr", "nfe_forward", "nfe_backward", "grad_norm", "step_time")
_FORMAT = 1
#: Numeric keys of a history row handed to the ``loggers`` (those not None).
LOGGED = ("loss", "lr", "nfe_forward", "nfe_backward", "grad_norm", "step_time", "epoch")
#: Keys every checkpoint written by :meth:`Trainer.save_checkpoint` holds.
_STATE_KEYS = ("format", "step", "epoch", "batch_in_epoch", "model", "optimizer", "data_rng", "rng", "seed",
               "batch_size")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable (truncated, corrupt, not a checkpoint) or written by a run with
    another seed or batch size. The message names the file and what to do."""


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int, *, deterministic: bool = False) -> int:
    """Seed python's ``random``, numpy's global generator (if numpy is installed) and torch (CPU and CUDA).

    Nothing else: by default no process-wide flag changes. ``deterministic=True`` also asks cuDNN for
    deterministic kernels, turns off its autotuner, calls ``torch.use_deterministic_algorithms(True,
    warn_only=True)`` and sets ``CUBLAS_WORKSPACE_CONFIG`` if unset; these are process-wide and stay set (use
    :func:`deterministic_mode`, or ``Trainer(deterministic=True)``, to have them restored afterwards). They can
    cost speed on GPU, and make ``torch.empty`` fill memory.

    Returns the seed.

    Examples
    --------
    >>> import torch
    >>> from neurodyn.training import seed_everything
    >>> _ = seed_everything(3); a = torch.rand(2)
    >>> _ = seed_everything(3); bool(torch.equal(a, torch.rand(2)))
    True
    """
    seed = int(seed)
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        _set_deterministic()
    return seed


def _set_deterministic() -> None:
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def deterministic_mode(enabled: bool = True) -> Iterator[None]:
    """Inside the block: cuDNN deterministic kernels, its autotuner off,
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` and ``CUBLAS_WORKSPACE_CONFIG`` (if unset).
    On exit every one of them is put back as it was. ``enabled=False``: touches nothing.

    Examples
    --------
    >>> import torch
    >>> from neurodyn.training import deterministic_mode
    >>> before = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    >>> with deterministic_mode():
    ...     torch.are_deterministic_algorithms_enabled()
    True
    >>> (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()) == before
    True
    """
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    _set_deterministic()
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel (``.module``) or ``torch.compile``
    (``._orig_mod``) wrappers."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def count_nfe(model: nn.Module) -> tuple[int, int]:
    """``(nfe_forward, nfe_backward)`` summed over every submodule exposing both attributes (each
    :class:`~neurodyn.NeuralODE`): the vector-field evaluations of its last forward solve and last backward
    pass. Wrappers (DDP ``.module``, ``torch.compile``) are looked through, and a module whose submodules expose
    the counters too (an :class:`~neurodyn.AugmentedNeuralODE` forwards its inner NeuralODE's) is not counted
    again.

    Examples
    --------
    >>> import torch, neurodyn
    >>> from neurodyn.training import count_nfe
    >>> ode = neurodyn.NeuralODE(torch.nn.Linear(2, 2), method="rk4", step_size=0.25)
    >>> model = torch.nn.Sequential(ode, torch.nn.Linear(2, 1))
    >>> _ = model(torch.randn(3, 2))
    >>> count_nfe(model)
    (16, 0)
    """
    def counts(m: nn.Module) -> bool:
        return hasattr(m, "nfe_forward") and hasattr(m, "nfe_backward")

    fwd = bwd = 0
    for m in unwrap_model(model).modules():
        if counts(m) and not any(c is not m and counts(c) for c in m.modules()):
            fwd += int(m.nfe_forward)
            bwd += int(m.nfe_backward)
    return fwd, bwd


def solver_stats(model: nn.Module) -> dict[str, Any]:
    """What the last solve of each submodule holding one (``last_solution``: :class:`~neurodyn.NeuralODE`,
    :class:`~neurodyn.AugmentedNeuralODE`, :class:`~neurodyn.NeuralSDE`, the CNF, ...) did, summed; a solution
    shared by a wrapper and its inner module counts once. Read it after ``backward()`` for the backward NFE.

    Returns ``{"solves": k, "nfe_forward": sum of stats["nfe"], "nfe_backward": sum of stats["nfe_backward"]
    (0 for gradient="direct"), "steps": accepted steps, "rejected": rejected steps, "status": str or None,
    "status_code": int}``: ``status`` is the first failure among the solves (:data:`neurodyn.solution.STATUSES`),
    else ``"event"`` if one stopped at an event, else ``"success"`` (None and code -1 without any solve);
    ``status_code`` is its index in ``STATUSES`` (0 = success).

    Examples
    --------
    >>> import torch, neurodyn
    >>> from neurodyn.training import solver_stats
    >>> ode = neurodyn.NeuralODE(torch.nn.Linear(2, 2), method="rk4", step_size=0.25)
    >>> _ = ode(torch.randn(3, 2))
    >>> s = solver_stats(torch.nn.Sequential(ode, torch.nn.Linear(2, 1)))
    >>> s["nfe_forward"], s["steps"], s["rejected"], s["status"]
    (16, 4, 0, 'success')
    """
    seen: set[int] = set()
    out: dict[str, Any] = {"solves": 0, "nfe_forward": 0, "nfe_backward": 0, "steps": 0, "rejected": 0}
    statuses = []
    for m in unwrap_model(model).modules():
        sol = getattr(m, "last_solution", None)
        if sol is None or not hasattr(sol, "stats") or id(sol) in seen:
            continue
        seen.add(id(sol))
        st = sol.stats
        out["solves"] += 1
        out["nfe_forward"] += int(st.get("nfe", 0))
        out["nfe_backward"] += int(st.get("nfe_backward", 0))
        out["steps"] += int(st.get("steps", 0))
        out["rejected"] += int(st.get("rejected", 0))
        statuses.append(sol.status)
    failed = [s for s in statuses if s in FAILURE_STATUSES]
    status = failed[0] if failed else EVENT if EVENT in statuses else SUCCESS if statuses else None
    out["status"] = status
    out["status_code"] = CODE[status] if status is not None else -1
    return out


@runtime_checkable
class MetricLogger(Protocol):
    """What ``Trainer(loggers=[...])`` calls on rank 0: ``log_metrics(metrics, step)`` after every optimizer
    step, ``metrics`` the step's numeric values (:data:`LOGGED`: loss, lr, nfe_forward, nfe_backward, grad_norm
    when clipping, step_time, epoch) as floats and ``step`` the step number (1-based); and ``flush()`` (else
    ``save()``), if the object has one, when ``fit`` returns. Lightning's loggers (``CSVLogger``,
    ``TensorBoardLogger``, ...) fit it as they are (their ``save()`` writes the file); TensorBoard's
    ``SummaryWriter`` is accepted too (one ``add_scalar(name, value, step)`` per metric). The Trainer never
    closes a logger.

    Example: ``class Printer: def log_metrics(self, metrics, step): print(step, metrics["loss"])``.
    """

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class _ScalarWriter:
    """A ``SummaryWriter`` (anything with ``add_scalar``) as a :class:`MetricLogger`."""

    def __init__(self, writer: Any):
        self.writer = writer

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        if callable(getattr(self.writer, "flush", None)):
            self.writer.flush()


def _as_logger(obj: Any, i: int) -> Any:
    if callable(getattr(obj, "log_metrics", None)):
        return obj
    if callable(getattr(obj, "add_scalar", None)):
        return _ScalarWriter(obj)
    raise TypeError(f"Trainer: loggers[{i}] ({type(obj).__name__}) has neither log_metrics(metrics, step) nor "
                    f"add_scalar(tag, value, global_step) (TensorBoard's SummaryWriter); see "
                    f"neurodyn.training.MetricLogger.")


def _fsync_dir(path: str) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` all-or-nothing: ``write(f)`` into a temp file in the same folder, flush, fsync,
    ``os.replace``. On any failure the temp file is removed and ``path`` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically: readers see the old file or the complete new one, never a
    partial write (temp file in the same folder, fsync, ``os.replace``)."""
    _atomic_write(os.fspath(path), lambda f: torch.save(obj, f))


def _atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_len(next(iter(batch.values())))
    return 1


def _as_dataset(data: Any) -> tuple[Dataset, bool]:
    """A Dataset, plus whether batches should be a bare tensor (data given as one tensor)."""
    if isinstance(data, Tensor):
        return TensorDataset(data), True
    if isinstance(data, (tuple, list)) and data and all(isinstance(d, Tensor) for d in data):
        return TensorDataset(*data), False
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return data, False
    raise TypeError(f"train/eval data must be a Dataset, a tensor or a tuple of tensors, got {type(data).__name__}.")


def _fetch(dataset: Dataset, bare: bool, idx: list[int], collate: Callable) -> Any:
    if isinstance(dataset, TensorDataset):  # fast path: one gather per tensor
        out = []
        for t in dataset.tensors:
            out.append(t[torch.as_tensor(idx, dtype=torch.long, device=t.device)])
        return out[0] if bare else tuple(out)
    return collate([dataset[i] for i in idx])


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _maybe_init_distributed(device: torch.device | None) -> None:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1 in the environment)."""
    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return
    use_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if np is not None:
        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())
    if np is not None and "numpy" in state:
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _loader_samplers(loader: DataLoader) -> list[Any]:
    """The loader's sampler objects (its ``sampler``, its ``batch_sampler`` and the sampler inside that)."""
    out = []
    for obj in (loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)):
        if obj is not None and all(obj is not o for o in out):
            out.append(obj)
    return out


def _loader_generators(loader: DataLoader) -> list[torch.Generator]:
    """The ``torch.Generator`` s a loader's order and worker seeds draw from besides the global RNG."""
    out: list[torch.Generator] = []
    for obj in [loader, *_loader_samplers(loader)]:
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not o for o in out):
            out.append(g)
    return out


def _stateful(loader: DataLoader) -> bool:
    """A loader that saves and restores its own position (torchdata's ``StatefulDataLoader``)."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------
class Trainer:
    """Train ``model`` with ``optimizer`` on ``loss_fn``; logs, checkpoints, exact resume, DDP.

    Parameters
    ----------
    model : nn.Module
        The model (a :class:`~neurodyn.NeuralODE` or anything containing some). Moved to ``device``; under
        ``torch.distributed`` wrapped in ``DistributedDataParallel`` (``trainer.model``; the plain module is
        ``trainer.module``).
    optimizer : torch.optim.Optimizer
        Built on ``model.parameters()``.
    loss_fn : callable
        ``loss_fn(model, batch) -> scalar Tensor`` (call ``model(...)`` inside: under DDP it is the wrapper).
        A ``torch.nn`` loss module (``nn.MSELoss()``, ...) is called as ``loss_fn(model(x), y)`` on batches
        ``(x, y)``. For exact data-parallel gradients use a *mean* over the batch.
    train_data : Dataset, Tensor, tuple of Tensors, or DataLoader
        Tensors become a ``TensorDataset``: a batch is then a tuple of tensors (a bare tensor for a single one).
        Other datasets are batched with ``collate_fn`` (default: torch's ``default_collate``) in-process.
        A ``torch.utils.data.DataLoader`` (or torchdata's ``StatefulDataLoader``) is used as it is: its batches,
        sampler, workers and order; an epoch is one pass over it (``len(loader)`` batches; an iterable one
        without ``len`` trains by ``max_steps``, an epoch ending when it runs out). Under DDP give it a
        ``DistributedSampler`` (the trainer calls ``set_epoch``). What resume restores is below (``resume``).
    batch_size : int
        Per process (under DDP the global batch is ``batch_size * world_size``). Needed unless ``train_data``
        is a DataLoader (its ``batch_size`` is then used; a different value is refused).
    max_steps, epochs : int
        How long ``fit`` trains: at least one is needed; with both it stops at whichever comes first.
    scheduler : LR scheduler, optional
        Stepped after every optimizer step (``scheduler_interval="step"``) or at the end of every epoch
        (``"epoch"``); ``ReduceLROnPlateau`` is given the logged loss.
    log_dir : str or PathLike, optional
        Where ``metrics.csv``, ``metrics.jsonl``, ``summary.json`` and ``checkpoint.pt`` go (created; rank 0
        only). ``None``: no files at all.
    checkpoint_every : int, optional
        Write the checkpoint every N steps. Whatever it is, ``fit`` writes one when it finishes;
        ``checkpoint_every=0`` disables checkpoints.
    seed : int
        Seeds python/numpy/torch at construction (:func:`seed_everything`; seed *before* building the model
        for a reproducible initialisation too), the data-order generator and the ``DistributedSampler``.
    progress : bool
        Show a progress bar on stdout (loss, NFE forward+backward, step time, ETA): ``tqdm.auto`` when tqdm is
        installed, else a :class:`~neurodyn.progress.Progress`; rank 0 only.
    device : str or torch.device, optional
        Default: ``cuda:LOCAL_RANK`` under DDP with CUDA, else the model's device.
    grad_clip : float, optional
        Clip the global gradient norm to this value (the pre-clip norm is logged as ``grad_norm``).
    resume : bool or path
        Continue from ``log_dir/checkpoint.pt`` (or the given file) when it exists, restoring everything needed
        for a bitwise-identical continuation; the logs are cut back to the checkpoint's step. Starts fresh when
        there is no checkpoint. A truncated or corrupt checkpoint, or one written with another ``seed`` or
        global batch size, raises :class:`CheckpointError` naming the file. Checkpoints are pickles: resume only
        from files you trust. With a DataLoader: a ``StatefulDataLoader`` (torchdata) is restored from its own
        ``state_dict`` (mid-epoch included); a plain ``DataLoader`` resumes exactly at an epoch boundary, and
        mid-epoch by replaying the interrupted epoch's order (the RNG states at the epoch's start are in the
        checkpoint) and skipping the batches already trained on: they are loaded again, not trained on. The
        replay is exact when the loader's order and workers draw only from torch's, python's and numpy's global
        RNGs or from a ``torch.Generator`` set as the loader's (or its sampler's) ``generator`` (true of torch's
        samplers); a sampler keeping another RNG of its own is not restored.
    shuffle, drop_last : bool
        Data order per epoch (from the trainer's generator) and whether to drop a last incomplete batch
        (defaults True, False; with a DataLoader set them on the loader).
    collate_fn : callable, optional
        Turns a list of dataset items into a batch (not used for tensor data, nor with a DataLoader).
    scheduler_interval : ``"step"`` or ``"epoch"``
        When the scheduler is stepped.
    on_step : callable, optional
        ``on_step(trainer, row)`` after every step, on every rank (gradients are still in ``.grad``).
    ddp_kwargs : dict, optional
        Extra keyword arguments for ``DistributedDataParallel`` (e.g. ``find_unused_parameters=True``).
    loggers : sequence, optional
        Objects given every step's metrics on rank 0 (:class:`MetricLogger`: ``log_metrics(metrics, step)``,
        e.g. Lightning's ``CSVLogger`` / ``TensorBoardLogger``), or TensorBoard ``SummaryWriter`` s
        (``add_scalar`` per metric). Flushed when ``fit`` returns, never closed.
    deterministic : bool
        During ``fit``: deterministic cuDNN kernels, no autotuner, ``torch.use_deterministic_algorithms(True,
        warn_only=True)`` (:func:`deterministic_mode`), all restored when ``fit`` returns. Default False: the
        trainer changes no process-wide flag (bitwise resume on GPU may need it).

    Attributes
    ----------
    step, epoch, batch_in_epoch : int
        Optimizer steps done, current epoch (0-based), batches of it consumed.
    history : list of dict
        One row per step (keys :data:`COLUMNS`), including the steps before a resume (read back from
        ``metrics.jsonl``, rank 0).
    rank, world_size : int
        The process's rank and the number of processes (0 and 1 without DDP).

    Examples
    --------
    >>> import tempfile, torch, neurodyn
    >>> _ = neurodyn.seed_everything(0)
    >>> model = neurodyn.NeuralODE(torch.nn.Linear(2, 2), method="rk4", step_size=0.25)
    >>> x = torch.randn(64, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> trainer = neurodyn.Trainer(model, opt, torch.nn.MSELoss(), train_data=(x, 0.5 * x), batch_size=16,
    ...                            epochs=2, log_dir=tempfile.mkdtemp(), seed=0, progress=False)
    >>> history = trainer.fit()
    >>> len(history), history[-1]["step"], history[-1]["nfe_forward"]
    (8, 8, 16)
    >>> history[-1]["loss"] < history[0]["loss"]
    True
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[..., Tensor],
        *,
        train_data: Any,
        batch_size: int | None = None,
        max_steps: int | None = None,
        epochs: int | None = None,
        scheduler: Any = None,
        log_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        seed: int = 0,
        progress: bool = True,
        device: str | torch.device | None = None,
        grad_clip: float | None = None,
        resume: bool | str | os.PathLike = False,
        shuffle: bool | None = None,
        drop_last: bool | None = None,
        collate_fn: Callable[[list], Any] | None = None,
        scheduler_interval: str = "step",
        on_step: Callable[[Trainer, dict], None] | None = None,
        ddp_kwargs: dict[str, Any] | None = None,
        loggers: Any = None,
        deterministic: bool = False,
    ):
        if max_steps is None and epochs is None:
            raise ValueError("Trainer: give max_steps or epochs (or both).")
        self.loader: DataLoader | None = train_data if isinstance(train_data, DataLoader) else None
        if self.loader is not None:
            set_here = [name for name, v in (("shuffle", shuffle), ("drop_last", drop_last),
                                             ("collate_fn", collate_fn)) if v is not None]
            if set_here:
                raise ValueError(f"Trainer: train_data is a DataLoader: set {', '.join(set_here)} on the DataLoader, "
                                 f"not on the Trainer.")
            if batch_size is not None and self.loader.batch_size is not None and batch_size != self.loader.batch_size:
                raise ValueError(f"Trainer: batch_size={batch_size!r} but the DataLoader's batch_size is "
                                 f"{self.loader.batch_size}: leave batch_size out (the loader's is used).")
            batch_size = self.loader.batch_size if batch_size is None else batch_size
            try:
                self._loader_len: int | None = len(self.loader)
            except TypeError:  # an IterableDataset without __len__
                self._loader_len = None
            if self._loader_len is None and (epochs is not None or scheduler_interval == "epoch"):
                raise ValueError("Trainer: the DataLoader has no len() (an IterableDataset without __len__): train "
                                 "it by max_steps (not epochs), with scheduler_interval='step'.")
            if self._loader_len == 0:
                raise ValueError("Trainer: the DataLoader yields no batch (len 0).")
        elif batch_size is None:
            raise ValueError("Trainer: batch_size is needed (unless train_data is a DataLoader, which has its own).")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"Trainer: batch_size must be an integer >= 1, got {batch_size!r}.")
        for name, v in (("max_steps", max_steps), ("epochs", epochs)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"Trainer: {name} must be an integer >= 0, got {v!r}.")
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 0):
            raise ValueError(f"Trainer: checkpoint_every must be an integer >= 0, got {checkpoint_every!r}.")
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"Trainer: scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}.")
        if grad_clip is not None and not (float(grad_clip) > 0):
            raise ValueError(f"Trainer: grad_clip must be > 0, got {grad_clip!r}.")

        self.optimizer, self.loss_fn, self.scheduler = optimizer, loss_fn, scheduler
        self.batch_size, self.max_steps, self.epochs = batch_size, max_steps, epochs
        self.checkpoint_every = checkpoint_every
        self.loggers = [_as_logger(lg, i) for i, lg in enumerate(loggers or ())]
        self.deterministic = bool(deterministic)
        self.seed = seed_everything(seed)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.shuffle = True if shuffle is None else bool(shuffle)
        self.drop_last = False if drop_last is None else bool(drop_last)
        self.collate_fn = collate_fn or default_collate
        self.scheduler_interval = scheduler_interval
        self.on_step = on_step
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        if self.loader is not None:
            self.dataset, self._bare = self.loader.dataset, False
        else:
            self.dataset, self._bare = _as_dataset(train_data)
            if len(self.dataset) == 0:
                raise ValueError("Trainer: train_data is empty.")

        # --- distributed setup and device
        explicit = torch.device(device) if device is not None else None
        _maybe_init_distributed(explicit)
        self.distributed = _dist_ready() and torch.distributed.get_world_size() > 1
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.world_size = torch.distributed.get_world_size() if self.distributed else 1
        if explicit is not None:
            self.device = explicit
        elif self.distributed and torch.distributed.get_backend() == "nccl":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        else:
            p = next(iter(model.parameters()), None)
            self.device = p.device if p is not None else torch.device("cpu")
        self.module = unwrap_model(model).to(self.device)
        self.is_main = self.rank == 0
        self.progress = bool(progress) and self.is_main

        # --- data order
        self.sampler = None
        self._loader_iter: Iterator | None = None
        self._loader_epoch_rng: dict[str, Any] | None = None  # the RNG states as the current epoch's iter() began
        self._loader_resume: dict[str, Any] | None = None  # what the first batch after a resume must restore
        if self.loader is not None:
            if self.distributed and not isinstance(self.dataset, IterableDataset) and not any(
                    isinstance(smp, DistributedSampler) for smp in _loader_samplers(self.loader)):
                raise ValueError("Trainer: under DDP the DataLoader needs a DistributedSampler (each rank would "
                                 "otherwise train on all the data): DataLoader(dataset, batch_size=..., "
                                 "sampler=DistributedSampler(dataset, seed=...)).")
        elif self.distributed:
            self.sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank,
                                              shuffle=self.shuffle, seed=self.seed, drop_last=self.drop_last)
        self._data_gen = torch.Generator().manual_seed(self.seed)
        self._epoch_start_state: Tensor | None = None
        self._batches: list[list[int]] | None = None
        self._batches_epoch = -1

        # --- counters, logs
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        self._logs_open = False
        self._csv_file = self._jsonl_file = None
        self._csv = None
        self._train_time = 0.0

        if self.is_main and self.log_dir is not None:
            os.makedirs(self.log_dir, exist_ok=True)
        if resume:
            path = self.checkpoint_path if resume is True else os.fspath(resume)
            if path is not None and os.path.exists(path):
                self.load_checkpoint(path)
            elif resume is not True:
                raise FileNotFoundError(f"Trainer: no checkpoint at {path!r} to resume from.")

        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            kwargs = dict(ddp_kwargs or {})
            if self.device.type == "cuda":
                kwargs.setdefault("device_ids", [self.device.index])
            self.model: nn.Module = DistributedDataParallel(self.module, **kwargs)
        else:
            self.model = self.module

    # ------------------------------------------------------------------ properties
    @property
    def checkpoint_path(self) -> str | None:
        return None if self.log_dir is None else os.path.join(self.log_dir, CHECKPOINT_NAME)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (``len(loader)`` for a DataLoader; 0 when it has no len)."""
        if self.loader is not None:
            return self._loader_len or 0
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def total_steps(self) -> int:
        """Where ``fit`` stops: ``max_steps`` and/or ``epochs * steps_per_epoch``, whichever is smaller."""
        limits = []
        if self.max_steps is not None:
            limits.append(self.max_steps)
        if self.epochs is not None:
            limits.append(self.epochs * self.steps_per_epoch)
        return min(limits)

    # ------------------------------------------------------------------ data
    def _epoch_batches(self) -> list[list[int]]:
        """The index batches of the current epoch (drawn once per epoch from the data-order generator)."""
        if self._batches_epoch != self.epoch or self._batches is None:
            if self.sampler is not None:
                self.sampler.set_epoch(self.epoch)
                order = list(iter(self.sampler))
            else:
                self._epoch_start_state = self._data_gen.get_state()
                n = len(self.dataset)
                order = (torch.randperm(n, generator=self._data_gen) if self.shuffle else torch.arange(n)).tolist()
            bs = self.batch_size
            batches = [order[i:i + bs] for i in range(0, len(order), bs)]
            if self.drop_last and batches and len(batches[-1]) < bs:
                batches.pop()
            if not batches:
                raise ValueError(f"Trainer: no complete batch of {bs} in {len(order)} samples (drop_last=True).")
            self._batches, self._batches_epoch = batches, self.epoch
        return self._batches

    def _start_loader_epoch(self) -> None:
        for smp in _loader_samplers(self.loader):
            if callable(getattr(smp, "set_epoch", None)):
                smp.set_epoch(self.epoch)
        gens = _loader_generators(self.loader)
        self._loader_epoch_rng = {"rng": _rng_state(), "generators": [g.get_state() for g in gens]}
        self._loader_iter = iter(self.loader)

    def _next_loader_batch(self) -> Any:
        """The next batch of the DataLoader; starts (or, after a resume, restores) the epoch's iterator."""
        if self._loader_iter is None:
            pending, self._loader_resume = self._loader_resume, None
            if pending is not None and pending.get("epoch_rng") is not None:
                # plain DataLoader, resumed mid-epoch: replay the epoch's order, skip what was trained on
                epoch_rng = pending["epoch_rng"]
                _set_rng_state(epoch_rng["rng"])
                for g, st in zip(_loader_generators(self.loader), epoch_rng["generators"]):
                    g.set_state(st)
                self._start_loader_epoch()
                for i in range(self.batch_in_epoch):
                    try:
                        next(self._loader_iter)
                    except StopIteration:
                        raise CheckpointError(
                            f"Trainer: the checkpoint is {self.batch_in_epoch} batches into epoch {self.epoch}, but "
                            f"the DataLoader's epoch has only {i} batches now: resume with the same data and "
                            f"loader settings.") from None
            elif pending is not None and pending.get("loader") is not None:
                self.loader.load_state_dict(pending["loader"])  # StatefulDataLoader: continues where it was
                for smp in _loader_samplers(self.loader):
                    if callable(getattr(smp, "set_epoch", None)):
                        smp.set_epoch(self.epoch)
                self._loader_iter = iter(self.loader)
            else:
                self._start_loader_epoch()
            if pending is not None:  # the streams as they were at the checkpoint (iter() may have drawn from them)
                _set_rng_state(pending["rng"])
                for g, st in zip(_loader_generators(self.loader), pending["generators"]):
                    g.set_state(st)
        try:
            return next(self._loader_iter)
        except StopIteration:
            if self.batch_in_epoch == 0:
                raise ValueError(f"Trainer: the DataLoader yielded no batch in epoch {self.epoch}.") from None
            if self._loader_len is not None:
                raise ValueError(f"Trainer: the DataLoader ran out after {self.batch_in_epoch} batches of epoch "
                                 f"{self.epoch}, but its len() is {self._loader_len}.") from None
            self.epoch += 1  # a loader without len(): its epoch ends when it runs out
            self.batch_in_epoch = 0
            self._start_loader_epoch()
            try:
                return next(self._loader_iter)
            except StopIteration:
                raise ValueError(f"Trainer: the DataLoader yielded no batch in epoch {self.epoch}.") from None

    def _loss(self, model: nn.Module, batch: Any) -> Tensor:
        if isinstance(self.loss_fn, nn.modules.loss._Loss):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError("Trainer: a torch.nn loss module needs (input, target) batches; pass "
                                "loss_fn(model, batch) for other layouts.")
            x, y = batch
            loss = self.loss_fn(model(x), y)
        else:
            loss = self.loss_fn(model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"Trainer: loss_fn must return a scalar tensor, got "
                            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}.")
        return loss.reshape(())

    # ------------------------------------------------------------------ training
    def _train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.loader is not None:
            batch = _to_device(self._next_loader_batch(), self.device)
            n_batches = self._loader_len if self._loader_len is not None else math.inf
        else:
            batches = self._epoch_batches()
            n_batches = len(batches)
            batch = _to_device(_fetch(self.dataset, self._bare, batches[self.batch_in_epoch], self.collate_fn),
                               self.device)
        epoch = self.epoch
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(self.model, batch)
        loss.backward()
        nfe_f, nfe_b = count_nfe(self.module)
        grad_norm = None
        if self.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip))
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        loss_value = loss.detach()
        if self.distributed:  # log the mean over ranks (the full-batch loss for a mean loss and equal shards)
            loss_value = loss_value.clone()
            torch.distributed.all_reduce(loss_value)
            loss_value = loss_value / self.world_size
        loss_value = float(loss_value)

        self.step += 1
        self.batch_in_epoch += 1
        if self.scheduler is not None and self.scheduler_interval == "step":
            self._step_scheduler(loss_value)
        if self.batch_in_epoch >= n_batches:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._loader_iter = None
            if self.scheduler is not None and self.scheduler_interval == "epoch":
                self._step_scheduler(loss_value)
        dt = time.perf_counter() - t0
        self._train_time += dt
        return {"step": self.step, "epoch": epoch, "loss": loss_value, "lr": lr, "nfe_forward": nfe_f,
                "nfe_backward": nfe_b, "grad_norm": grad_norm, "step_time": dt}

    def _step_scheduler(self, loss_value: float) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(loss_value)
        else:
            self.scheduler.step()

    def fit(self) -> list[dict[str, Any]]:
        """Train until :attr:`total_steps`; returns :attr:`history` (one dict per step, keys :data:`COLUMNS`).

        Writes a row to ``metrics.csv``/``metrics.jsonl`` per step, the checkpoint every ``checkpoint_every``
        steps and at the end, and ``summary.json`` at the end (rank 0), and hands each step's metrics to the
        ``loggers``. Calling ``fit`` again after raising ``max_steps``/``epochs`` continues the run. With
        ``deterministic=True`` the deterministic flags hold during ``fit`` only.
        """
        with deterministic_mode(self.deterministic):
            return self._fit()

    def _fit(self) -> list[dict[str, Any]]:
        self.module.train()
        if self.is_main:
            self._open_logs()
        total = self.total_steps
        start = self.step
        bar = None
        if self.progress and total > start:
            desc = "train" if start == 0 else f"train (from step {start})"
            bar = progress_bar(total - start, desc=desc)  # tqdm (with its ETA) when installed, else text
        wall0 = time.perf_counter()
        try:
            while self.step < total:
                row = self._train_step()
                self.history.append(row)
                if self.is_main:
                    self._log_row(row)
                    self._log_metrics(row)
                if bar is not None:
                    bar.update(loss=row["loss"], nfe=f"{row['nfe_forward']}+{row['nfe_backward']}",
                               step=f"{1e3 * row['step_time']:.1f}ms")
                if self.on_step is not None:
                    self.on_step(self, row)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.step < total:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            self._close_logs()
            for lg in self.loggers if self.is_main else ():
                done = getattr(lg, "flush", None) or getattr(lg, "save", None)  # Lightning's loggers: save()
                if callable(done):
                    done()
        if self.checkpoint_every != 0:
            self.save_checkpoint()
        if self.is_main and self.log_dir is not None:
            _atomic_write_text(os.path.join(self.log_dir, SUMMARY_NAME),
                               json.dumps(self.summary(time.perf_counter() - wall0), indent=2) + "\n")
        return self.history

    def summary(self, wall_time: float | None = None) -> dict[str, Any]:
        """Totals of the run so far (what ``summary.json`` holds)."""
        h = self.history
        times = [r["step_time"] for r in h]
        losses = [r["loss"] for r in h]
        return {
            "steps": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "steps_logged": len(h),
            "final_loss": losses[-1] if losses else None,
            "min_loss": min(losses) if losses else None,
            "nfe_forward_total": sum(r["nfe_forward"] for r in h),
            "nfe_backward_total": sum(r["nfe_backward"] for r in h),
            "mean_step_time": sum(times) / len(times) if times else None,
            "train_time": sum(times), "wall_time_last_fit": wall_time,
            "seed": self.seed, "world_size": self.world_size, "resumed_from": self.resumed_from,
            "batch_size": self.batch_size, "device": str(self.device),
        }

    @torch.no_grad()
    def evaluate(self, data: Any, batch_size: int | None = None) -> dict[str, Any]:
        """Mean loss of the (unwrapped) model on ``data`` (same forms as ``train_data``, a DataLoader included:
        its batches as they come), in eval mode, no grad.

        Runs on the full ``data`` in every process (no sharding, no communication). Returns
        ``{"loss": mean over samples (batch losses weighted by batch size), "samples": n, "batches": k,
        "nfe_forward": mean per batch}``. Does not touch the RNG states beyond what the model itself draws.
        """
        if isinstance(data, DataLoader):
            batches: Any = data
        else:
            dataset, bare = _as_dataset(data)
            bs = batch_size or self.batch_size
            if bs is None:
                raise ValueError("Trainer.evaluate: give batch_size (the trainer's DataLoader has none).")
            batches = (_fetch(dataset, bare, list(range(i, min(i + bs, len(dataset)))), self.collate_fn)
                       for i in range(0, len(dataset), bs))
        was_training = self.module.training
        self.module.eval()
        total, n, nfe, k = 0.0, 0, 0, 0
        try:
            for raw in batches:
                batch = _to_device(raw, self.device)
                m = _batch_len(batch)
                total += float(self._loss(self.module, batch)) * m
                n += m
                k += 1
                nfe += count_nfe(self.module)[0]
        finally:
            self.module.train(was_training)
        return {"loss": total / n if n else float("nan"), "samples": n, "batches": k,
                "nfe_forward": nfe / k if k else 0.0}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a bitwise-exact resume needs (this process's RNG states under ``"rng"``)."""
        started = self._batches_epoch == self.epoch and self._batches is not None and self.batch_in_epoch > 0
        return {
            "format": _FORMAT,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            # the data-order generator as it was when the current epoch's order was drawn (or now, at a boundary)
            "data_rng": (self._epoch_start_state if started and self.sampler is None else self._data_gen.get_state()),
            "rng": _rng_state(),
            "seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
            "train_time": self._train_time,
            # a DataLoader's position: its own state (StatefulDataLoader), or the RNG states its current epoch
            # began with (plain DataLoader, mid-epoch: resume replays the epoch)
            "loader": (self.loader.state_dict() if self.loader is not None and _stateful(self.loader)
                       and self.batch_in_epoch > 0 else None),
            "loader_epoch_rng": (self._loader_epoch_rng if self.loader is not None and not _stateful(self.loader)
                                 and self.batch_in_epoch > 0 else None),
            "loader_generators": ([g.get_state() for g in _loader_generators(self.loader)]
                                  if self.loader is not None else None),
        }

    def load_state_dict(self, state: dict[str, Any], *, source: str = "the checkpoint") -> None:
        """Restore from :meth:`state_dict` (model, optimizer, scheduler, counters, data order, RNG states).

        Raises :class:`CheckpointError` (naming ``source``, e.g. the file) when ``state`` is not a checkpoint
        of this format, or when it was written with another ``seed`` or global batch size (``batch_size`` times
        the number of processes) than this trainer's: the continuation would then silently differ from both
        runs. (Another number of DDP processes with the same global batch is accepted: the checkpoint then
        restores rank 0's RNG streams on every rank.)
        """
        if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
            missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
            raise CheckpointError(
                f"Trainer: {source} is not a Trainer checkpoint (missing {', '.join(missing)}); delete it to "
                f"start fresh, or resume from another file.")
        if state["format"] != _FORMAT:
            raise CheckpointError(
                f"Trainer: {source} has checkpoint format {state['format']!r}, this version reads {_FORMAT}; "
                f"delete it to start fresh, or resume with the neurodyn version that wrote it.")
        clashes = []
        if state["seed"] != self.seed:
            clashes.append(("seed", f"seed={state['seed']!r} there, {self.seed!r} here"))
        # the global batch (batch_size per process x processes) decides the steps: a DDP run may resume in one
        # process with the whole global batch, and the other way round
        theirs_world = int(state.get("world_size", 1))
        theirs_global = None if state["batch_size"] is None else state["batch_size"] * theirs_world
        ours_global = None if self.batch_size is None else self.batch_size * self.world_size
        if theirs_global != ours_global:
            clashes.append(("batch_size", f"batch_size={state['batch_size']!r} x {theirs_world} process(es) there, "
                                          f"{self.batch_size!r} x {self.world_size} here"))
        if clashes:
            names = " and ".join(name for name, _ in clashes)
            values = "; ".join(text for _, text in clashes)
            raise CheckpointError(
                f"Trainer: {source} was written by a run with another {names} ({values}): resuming would not "
                f"continue that run. Pass the same {names} to resume it, or start fresh (another log_dir, or "
                f"delete the checkpoint).")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._data_gen.set_state(state["data_rng"])
        self._batches, self._batches_epoch, self._epoch_start_state = None, -1, None

        def mine(per_rank: list) -> Any:  # one per rank (DDP): ours if the world is the same, else rank 0's
            return per_rank[self.rank] if len(per_rank) == self.world_size else per_rank[0]

        rng = state["rng"]
        rng = mine(rng) if isinstance(rng, list) else rng
        _set_rng_state(rng)
        if self.loader is not None:
            loader_state, epoch_rng, gen_states = (
                mine(x["per_rank"]) if isinstance(x, dict) and "per_rank" in x else x
                for x in (state.get("loader"), state.get("loader_epoch_rng"), state.get("loader_generators")))
            gen_states = gen_states or []
            mid = self.batch_in_epoch > 0
            if mid and _stateful(self.loader) and loader_state is None:
                raise CheckpointError(f"Trainer: {source} was written mid-epoch with a plain DataLoader (or another "
                                      f"data path); resume it with a plain DataLoader too (not a StatefulDataLoader).")
            if mid and not _stateful(self.loader) and epoch_rng is None:
                raise CheckpointError(f"Trainer: {source} was written mid-epoch with a StatefulDataLoader (or another "
                                      f"data path); resume it with the same kind of train_data.")
            gens = _loader_generators(self.loader)
            if len(gen_states) != len(gens):
                raise CheckpointError(f"Trainer: {source} holds {len(gen_states)} DataLoader generator state(s), this "
                                      f"DataLoader has {len(gens)} torch.Generator(s) (loader / sampler "
                                      f"`generator`): resume with a DataLoader built the same way.")
            self._loader_iter = None
            self._loader_resume = None
            if mid:  # the next batch restores the epoch's iterator (see _next_loader_batch)
                self._loader_resume = {"rng": rng, "generators": gen_states, "loader": loader_state,
                                       "epoch_rng": epoch_rng}
            else:  # at an epoch boundary the next epoch starts from the restored RNG streams, as it would have
                for g, st in zip(gens, gen_states):
                    g.set_state(st)
        self._train_time = float(state.get("train_time", 0.0))
        self.resumed_from = self.step

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> str | None:
        """Write the checkpoint atomically (rank 0; every rank must call it under DDP, as ``fit`` does).
        Returns the path (None without a ``log_dir`` and ``path``)."""
        path = self.checkpoint_path if path is None else os.fspath(path)
        if path is None:
            return None
        state = self.state_dict()
        if self.distributed:  # each rank's RNG streams (they can differ, e.g. dropout with adaptive steps)
            for key in ("rng", "loader", "loader_epoch_rng", "loader_generators"):
                per_rank: list[Any] = [None] * self.world_size
                torch.distributed.all_gather_object(per_rank, state[key])
                if key == "rng":
                    state[key] = per_rank
                else:
                    state[key] = {"per_rank": per_rank} if any(x is not None for x in per_rank) else None
        if self.is_main:
            atomic_save(state, path)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` (a pickle: only from trusted files).

        Raises :class:`CheckpointError` naming ``path`` when the file cannot be read (truncated, corrupt) or
        does not fit this trainer (see :meth:`load_state_dict`)."""
        path = os.fspath(path)
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except FileNotFoundError:
            raise
        except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
            first_line = (str(exc).splitlines() or [""])[0]
            raise CheckpointError(
                f"Trainer: cannot read the checkpoint {path!r} ({type(exc).__name__}: {first_line}); "
                f"it is truncated or corrupt (e.g. the disk filled up, or it was copied partially). Delete it to "
                f"start fresh, or resume from an intact copy.") from exc
        self.load_state_dict(state, source=f"the checkpoint {path!r}")

    # ------------------------------------------------------------------ logs
    def _open_logs(self) -> None:
        if self._logs_open or self.log_dir is None:
            return
        csv_path = os.path.join(self.log_dir, CSV_NAME)
        jsonl_path = os.path.join(self.log_dir, JSONL_NAME)
        if self.resumed_from is not None and not self.history:
            # keep the rows up to the checkpoint's step (later ones belong to the interrupted run's lost tail)
            rows = []
            if os.path.exists(jsonl_path):
                with open(jsonl_path, encoding="utf-8") as f:
                    for line in f:
                        line = line.strip()
                        if not line:
                            continue
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError:  # a torn last line
                            continue
                        if row.get("step", math.inf) <= self.resumed_from:
                            rows.append(row)
            self.history = rows
            _atomic_write_text(jsonl_path, "".join(json.dumps(r) + "\n" for r in rows))
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(COLUMNS)
            for r in rows:
                w.writerow(["" if r.get(c) is None else r.get(c) for c in COLUMNS])
            _atomic_write_text(csv_path, buf.getvalue())
            mode = "a"
        elif self.step == 0 and not self.history:
            mode = "w"
        else:
            mode = "a"
        self._csv_file = open(csv_path, mode, newline="", encoding="utf-8")
        self._jsonl_file = open(jsonl_path, mode, encoding="utf-8")
        self._csv = csv.writer(self._csv_file)
        if mode == "w":
            self._csv.writerow(COLUMNS)
            self._csv_file.flush()
        self._logs_open = True

    def _log_row(self, row: dict[str, Any]) -> None:
        if not self._logs_open:
            return
        self._csv.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
        self._csv_file.flush()
        self._jsonl_file.write(json.dumps(row) + "\n")
        self._jsonl_file.flush()

    def _log_metrics(self, row: dict[str, Any]) -> None:
        if self.loggers:
            metrics = {k: float(row[k]) for k in LOGGED if row.get(k) is not None}
            for lg in self.loggers:
                lg.log_metrics(metrics, step=row["step"])

    def _close_logs(self) -> None:
        for f in (self._csv_file, self._jsonl_file):
            if f is not None:
                f.close()
        self._csv_file = self._jsonl_file = self._csv = None
        self._logs_open = False
