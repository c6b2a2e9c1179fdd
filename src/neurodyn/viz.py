"""Plot helpers for the demos (matplotlib, Agg canvas, PNG files).

matplotlib is an optional dependency (``pip install neurodyn[demo]``); it is imported only when a plot is
made.  Figures are drawn on an Agg canvas directly, never through ``pyplot``, so nothing here changes the
global matplotlib backend or leaks figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MissingMatplotlib", "plot_trajectories", "plot_phase_portrait", "plot_loss_curve"]

INSTALL_HINT = "pip install neurodyn[demo]"


class MissingMatplotlib(ImportError):
    """matplotlib is not installed."""


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` of ``figsize`` inches (Agg canvas, constrained layout; no pyplot state).

    Raises :class:`MissingMatplotlib` when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingMatplotlib(f"plots need matplotlib, which is not installed: {INSTALL_HINT}") from exc
    fig = Figure(figsize=figsize, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _np(x: Any) -> Any:
    """Tensor / array / list -> numpy array (detached, on CPU)."""
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def plot_trajectories(t: Any, true: Any, pred: Any, path: str | Path, *, labels: Sequence[str] = ("x", "y"),
                      title: str = "") -> Path:
    """Each state component against time: ground truth (solid) and learned (dashed).

    ``true`` and ``pred`` have shape ``(len(t), d)``.
    """
    t, true, pred = _np(t), _np(true), _np(pred)
    d = true.shape[-1]
    fig = new_figure((8.0, 2.2 * d + 0.6))
    axes = fig.subplots(d, 1, sharex=True, squeeze=False)[:, 0]
    for i, ax in enumerate(axes):
        name = labels[i] if i < len(labels) else f"z{i}"
        ax.plot(t, true[:, i], color="C0", lw=1.6, label=f"true {name}(t)")
        ax.plot(t, pred[:, i], color="C1", lw=1.4, ls="--", label=f"learned {name}(t)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("t")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_phase_portrait(true: Any, pred: Any, path: str | Path, *, field: Any = None,
                        title: str = "") -> Path:
    """Phase portrait of a 2-d system: both trajectories, plus the learned vector field if given.

    ``field`` is an optional callable mapping an ``(N, 2)`` numpy array of points to ``(N, 2)`` velocities;
    it is drawn as a normalised quiver plot behind the trajectories.
    """
    import numpy as np

    true, pred = _np(true), _np(pred)
    fig = new_figure((6.0, 6.0))
    ax = fig.subplots()
    if field is not None:
        lo = np.minimum(true.min(0), pred.min(0))
        hi = np.maximum(true.max(0), pred.max(0))
        pad = 0.1 * (hi - lo)
        xs = np.linspace(lo[0] - pad[0], hi[0] + pad[0], 21)
        ys = np.linspace(lo[1] - pad[1], hi[1] + pad[1], 21)
        X, Y = np.meshgrid(xs, ys)
        pts = np.stack([X.ravel(), Y.ravel()], axis=-1)
        V = _np(field(pts)).reshape(X.shape + (2,))
        norm = np.linalg.norm(V, axis=-1, keepdims=True)
        V = V / np.maximum(norm, 1e-12)
        ax.quiver(X, Y, V[..., 0], V[..., 1], color="0.7", width=0.003, scale=30)
    ax.plot(true[:, 0], true[:, 1], color="C0", lw=1.6, label="true")
    ax.plot(pred[:, 0], pred[:, 1], color="C1", lw=1.4, ls="--", label="learned")
    ax.plot(true[0, 0], true[0, 1], "ko", ms=4, label="z0")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_loss_curve(losses: Sequence[float], path: str | Path, *,
                    eval_iters: Sequence[int] = (), eval_values: Sequence[float] = (),
                    train_label: str = "minibatch loss", eval_label: str = "full-trajectory MSE",
                    vlines: Sequence[tuple[float, str]] = (), title: str = "") -> Path:
    """Training loss per iteration (log scale), optionally with periodic evaluations as markers and
    labelled vertical lines ``(iteration, label)`` marking phases of the run."""
    import numpy as np

    losses = _np(losses).astype(float)
    fig = new_figure((7.0, 4.0))
    ax = fig.subplots()
    it = np.arange(1, len(losses) + 1)
    ax.plot(it, losses, color="C0", lw=0.6, alpha=0.35, label=train_label)
    if len(losses) >= 20:
        k = max(len(losses) // 50, 5)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(it[k - 1:], smooth, color="C0", lw=1.6, label=f"{train_label} ({k}-iter mean)")
    if len(eval_iters):
        ax.plot(list(eval_iters), list(eval_values), "o-", color="C3", ms=4, lw=1.2, label=eval_label)
    for x, label in vlines:
        ax.axvline(x, color="0.4", ls=":", lw=1.2, label=label if label else None, alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
