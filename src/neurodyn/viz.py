"""Plotting: solutions, phase portraits, vector fields and densities (matplotlib).

matplotlib is optional (``pip install "neurodyn[demo]"``) and imported only when a plot is made; without it
every function here raises :class:`MissingMatplotlib`, an ``ImportError`` naming the extra.

Each ``plot_*`` function draws on the Axes given as ``ax`` and returns it; with ``ax=None`` it makes a new figure
through ``matplotlib.pyplot`` (so it shows in notebooks and with ``plt.show()``) and returns its Axes. Nothing
is written to disk unless you save the figure (``ax.figure.savefig(...)`` or :func:`save_figure`).

>>> import torch, neurodyn
>>> from neurodyn import viz
>>> sol = neurodyn.solve(lambda t, y: torch.stack([y[1], -y[0]]), torch.tensor([1.0, 0.0]),
...                      torch.linspace(0, 6, 50), rtol=1e-5, atol=1e-7)
>>> fig = viz.new_figure((8.0, 3.0))                   # or plt.subplots(1, 2)
>>> ax_t, ax_p = fig.subplots(1, 2)
>>> _ = viz.plot_solution(sol, ax=ax_t)                # y[0](t), y[1](t)
>>> _ = viz.plot_phase(sol, ax=ax_p)                   # y[1] against y[0]
>>> _ = viz.plot_vector_field(lambda t, y: torch.stack([y[:, 1], -y[:, 0]], -1), ax=ax_p)
>>> len(ax_t.lines), len(ax_p.lines)
(2, 1)

The demos' figure helpers (:func:`plot_trajectories`, :func:`plot_phase_portrait`, :func:`plot_loss_curve`)
draw whole figures on an Agg canvas (:func:`new_figure`, never through pyplot, so they change no global
matplotlib state) and write them as PNG files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MissingMatplotlib",
    "new_figure",
    "plot_density",
    "plot_loss_curve",
    "plot_phase",
    "plot_phase_portrait",
    "plot_solution",
    "plot_trajectories",
    "plot_vector_field",
    "save_figure",
]

INSTALL_HINT = 'pip install "neurodyn[demo]"'


class MissingMatplotlib(ImportError):
    """matplotlib is not installed (it comes with the ``demo`` extra: ``pip install "neurodyn[demo]"``)."""


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingMatplotlib(f"neurodyn.viz needs matplotlib, which is not installed: {INSTALL_HINT} "
                                "(or pip install matplotlib)") from exc
    return matplotlib


def new_figure(figsize: tuple[float, float] = (6.4, 4.8)) -> Any:
    """A matplotlib ``Figure`` of ``figsize`` inches on its own Agg canvas (constrained layout), not registered
    with ``pyplot``: nothing global changes and nothing is left open. Save it with :func:`save_figure`.

    Raises :class:`MissingMatplotlib` when matplotlib is not installed.

    >>> from neurodyn import viz
    >>> fig = viz.new_figure((4.0, 3.0))
    >>> ax = fig.subplots()
    >>> fig.get_size_inches().tolist()
    [4.0, 3.0]
    """
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` (a ``Figure``, or an ``Axes`` whose figure is written) as a PNG to ``path``, creating the
    parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    getattr(fig, "figure", fig).savefig(path, format="png")
    return path


def _axes(ax: Any, figsize: tuple[float, float]) -> Any:
    """``ax``, or the Axes of a new pyplot figure."""
    if ax is not None:
        return ax
    _matplotlib()
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)[1]


def _np(x: Any) -> Any:
    """Tensor / array / list -> numpy array (detached, on CPU)."""
    import numpy as np

    if hasattr(x, "detach"):
        import torch

        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()  # numpy has no bfloat16
        x = x.numpy()
    return np.asarray(x)


def _times_and_states(sol: Any) -> tuple[Any, Any]:
    """``(ts, ys)`` as numpy arrays from a Solution or a ``(ts, ys)`` pair."""
    if hasattr(sol, "ts") and hasattr(sol, "ys"):
        ts, ys = sol.ts, sol.ys
    elif isinstance(sol, (tuple, list)) and len(sol) == 2:
        ts, ys = sol
    else:
        raise TypeError(f"expected a neurodyn Solution or a (ts, ys) pair, got {type(sol).__name__}")
    ts, ys = _np(ts), _np(ys)
    if ts.ndim != 1 or ys.ndim < 1 or ys.shape[0] != ts.shape[0]:
        raise ValueError(f"ts must be 1-d (T,) and ys (T, ...) with the same T; got ts {ts.shape}, ys {ys.shape}")
    return ts, ys


def _as_samples(ys: Any, what: str) -> Any:
    """``(T, *batch, D)`` -> ``(T, S, D)`` (S = prod(batch); a 1-d ``(T,)`` state is one sample, D = 1)."""
    import numpy as np

    if np.iscomplexobj(ys):
        raise ValueError(f"{what}: the states are complex; plot their real and imaginary parts, e.g. "
                         "(sol.ts, sol.ys.real)")
    if ys.ndim == 1:
        return ys[:, None, None]
    return ys.reshape(ys.shape[0], -1, ys.shape[-1])


def _pick(n: int, samples: int | Sequence[int] | None, what: str) -> list[int]:
    """The sample indices to draw: ``None`` all, an int the first that many, a sequence those."""
    if samples is None:
        return list(range(n))
    if isinstance(samples, int):
        if samples < 1:
            raise ValueError(f"{what}: samples must be >= 1, got {samples}")
        return list(range(min(samples, n)))
    chosen = [int(i) for i in samples]
    bad = [i for i in chosen if not -n <= i < n]
    if bad:
        raise ValueError(f"{what}: sample indices {bad} out of range for {n} samples")
    return chosen


def plot_solution(sol: Any, ax: Any = None, *, components: Sequence[int] | None = None,
                  samples: int | Sequence[int] | None = None, labels: Sequence[str] | None = None,
                  dense: int = 0, markers: bool = False, **line_kwargs: Any) -> Any:
    """Each state component against time.

    Parameters
    ----------
    sol : Solution or (ts, ys)
        ``ts`` shape ``(T,)``, ``ys`` shape ``(T, D)``, ``(T,)`` or ``(T, *batch, D)`` (a batch is flattened to
        ``S`` samples). Rows a failed solve did not reach are NaN and leave gaps.
    ax : matplotlib Axes, optional
        Where to draw; a new pyplot figure when None.
    components : sequence of int, optional
        Which of the ``D`` components (default all).
    samples : int or sequence of int, optional
        With a batch: the first ``samples`` samples, or these indices (default all).
    labels : sequence of str, optional
        One legend label per drawn component (default ``y[i]``); the legend is drawn when there is more than
        one component.
    dense : int
        With a Solution solved with ``dense=True``: draw each curve through ``dense`` evenly spaced times of
        its dense output (``sol.evaluate``) instead of straight segments between the outputs; 0 (default)
        joins the outputs.
    markers : bool
        Mark the output times ``ts`` with dots.
    **line_kwargs
        Passed to ``Axes.plot`` (``lw``, ``ls``, ``alpha``, ...).

    Returns
    -------
    Axes
        One line per (sample, component), samples outermost: ``ax.lines[s * len(components) + i]`` is
        component ``components[i]`` of sample ``s``. Component ``i`` has colour ``C{i}`` in every sample.

    Examples
    --------
    >>> import torch, neurodyn
    >>> from neurodyn import viz
    >>> sol = neurodyn.solve(lambda t, y: -y, torch.ones(4, 2), torch.linspace(0, 1, 11), rtol=1e-5)
    >>> ax = viz.plot_solution(sol, ax=viz.new_figure().subplots(), samples=3)   # 3 samples x 2 components
    >>> len(ax.lines)
    6
    """
    ts, ys = _times_and_states(sol)
    ys = _as_samples(ys, "plot_solution")
    n_dims = ys.shape[-1]
    comps = list(range(n_dims)) if components is None else [int(c) for c in components]
    if not comps or any(not -n_dims <= c < n_dims for c in comps):
        raise ValueError(f"plot_solution: components {list(components or [])} out of range for D={n_dims}")
    if labels is not None and len(labels) != len(comps):
        raise ValueError(f"plot_solution: {len(labels)} labels for {len(comps)} components")
    chosen = _pick(ys.shape[1], samples, "plot_solution")
    if dense < 0 or (dense and not hasattr(sol, "evaluate")):
        raise ValueError("plot_solution: dense=N (N >= 2) needs a Solution solved with dense=True")
    if dense:
        import numpy as np
        import torch

        t_hi = sol.t_final if np.isfinite(sol.t_final) else float(ts[-1])
        grid = torch.linspace(float(ts[0]), float(t_hi), max(dense, 2), dtype=sol.ts.dtype, device=sol.ts.device)
        with torch.no_grad():
            t_line, y_line = _np(grid), _as_samples(_np(sol.evaluate(grid)), "plot_solution")
    else:
        t_line, y_line = ts, ys
    ax = _axes(ax, (7.0, 4.0))
    alpha = line_kwargs.pop("alpha", 1.0 if len(chosen) == 1 else max(0.2, min(1.0, 3.0 / len(chosen))))
    for k, s in enumerate(chosen):
        for i, c in enumerate(comps):
            label = (labels[i] if labels is not None else f"y[{c % n_dims}]") if k == 0 else None
            ax.plot(t_line, y_line[:, s, c], color=f"C{i % 10}", alpha=alpha, label=label, **line_kwargs)
    if markers:
        for s in chosen:
            for i, c in enumerate(comps):
                ax.plot(ts, ys[:, s, c], ".", color=f"C{i % 10}", alpha=alpha)
    ax.set_xlabel("t")
    if len(comps) > 1:
        ax.legend(fontsize=8)
    return ax


def plot_phase(sol: Any, ax: Any = None, *, dims: tuple[int, int] = (0, 1),
               samples: int | Sequence[int] | None = None, start: bool = True, **line_kwargs: Any) -> Any:
    """Trajectories in a 2-d phase plane: component ``dims[1]`` against ``dims[0]``.

    Parameters
    ----------
    sol : Solution, (ts, ys) or Tensor / array ``ys``
        States of shape ``(T, D)`` or ``(T, *batch, D)`` with ``D >= 2`` (a batch is flattened to samples).
    ax : matplotlib Axes, optional
        Where to draw; a new pyplot figure when None.
    dims : (int, int)
        The two components on the x and y axes.
    samples : int or sequence of int, optional
        The first ``samples`` samples, or these indices (default all).
    start : bool
        Mark each trajectory's first point (one scatter collection, black dots).
    **line_kwargs
        Passed to ``Axes.plot``.

    Returns
    -------
    Axes
        One line per drawn sample, in order (``ax.lines[k]`` is sample ``samples[k]``).

    Examples
    --------
    >>> import torch, neurodyn
    >>> from neurodyn import viz
    >>> f = lambda t, y: torch.stack([y[..., 1], -y[..., 0]], -1)
    >>> sol = neurodyn.solve(f, torch.randn(5, 2), torch.linspace(0, 6, 60), rtol=1e-5)
    >>> ax = viz.plot_phase(sol, ax=viz.new_figure().subplots())
    >>> len(ax.lines), ax.lines[0].get_xydata().shape
    (5, (60, 2))
    """
    if hasattr(sol, "ys") or isinstance(sol, (tuple, list)):
        _, ys = _times_and_states(sol)
    else:
        ys = _np(sol)
    if ys.ndim < 2 or ys.shape[-1] < 2:
        raise ValueError(f"plot_phase: states of shape (T, ..., D) with D >= 2 needed, got {ys.shape}")
    ys = _as_samples(ys, "plot_phase")
    i, j = (int(d) for d in dims)
    if i == j or not all(-ys.shape[-1] <= d < ys.shape[-1] for d in (i, j)):
        raise ValueError(f"plot_phase: dims {tuple(dims)} must be two different components of D={ys.shape[-1]}")
    chosen = _pick(ys.shape[1], samples, "plot_phase")
    ax = _axes(ax, (5.5, 5.0))
    line_kwargs.setdefault("lw", 1.4)
    for s in chosen:
        ax.plot(ys[:, s, i], ys[:, s, j], **line_kwargs)
    if start:
        ax.scatter(ys[0, chosen, i], ys[0, chosen, j], color="k", s=12, zorder=3)
    ax.set_xlabel(f"y[{i}]")
    ax.set_ylabel(f"y[{j}]")
    return ax


def _field_dtype(f: Any) -> tuple[Any, Any]:
    """dtype and device to evaluate ``f`` in: its first parameter's, else torch's defaults."""
    import torch

    params = getattr(f, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return p.dtype, p.device
    return torch.get_default_dtype(), torch.device("cpu")


def plot_vector_field(f: Callable, ax: Any = None, *, t: float = 0.0, xlim: tuple[float, float] = (-2.0, 2.0),
                      ylim: tuple[float, float] = (-2.0, 2.0), n: int = 21, kind: str = "quiver",
                      normalize: bool = True, cmap: str = "viridis", dtype: Any = None, device: Any = None,
                      **kwargs: Any) -> Any:
    """A 2-d vector field ``f(t, y)`` on an ``n x n`` grid, as arrows (``kind="quiver"``) or stream lines
    (``kind="stream"``), coloured by speed ``|f|``.

    Parameters
    ----------
    f : callable
        ``f(t, y)`` (torchdiffeq's order, as for :func:`neurodyn.solve`) with ``t`` a 0-dim tensor and ``y`` of
        shape ``(N, 2)``, returning ``(N, 2)``. Evaluated once on the grid points, without gradients.
    ax : matplotlib Axes, optional
        Where to draw; a new pyplot figure when None.
    t : float
        The time at which the field is drawn.
    xlim, ylim : (float, float)
        The grid's extent, ``lo < hi``.
    n : int
        Points per axis (``n >= 2``).
    kind : {"quiver", "stream"}
    normalize : bool
        Quiver: arrows of equal length (the colour gives the speed); False draws ``f`` to scale.
    cmap : str
        Colour map of the speed.
    dtype, device :
        Of the grid points; default: those of ``f``'s first parameter (an ``nn.Module``), else torch's
        default dtype on the CPU.
    **kwargs
        Passed to ``Axes.quiver`` / ``Axes.streamplot``.

    Returns
    -------
    Axes
        With one ``Quiver`` in ``ax.collections`` (``kind="quiver"``; its ``U``, ``V`` are ``f``'s components,
        divided by ``|f|`` when ``normalize``) or the stream lines.

    Examples
    --------
    >>> import torch
    >>> from neurodyn import viz
    >>> ax = viz.plot_vector_field(lambda t, y: torch.stack([y[:, 1], -y[:, 0]], -1), ax=viz.new_figure().subplots(),
    ...                            xlim=(-1, 1), ylim=(-1, 1), n=11)
    >>> ax.collections[0].N
    121
    """
    import numpy as np

    for name, lim in (("xlim", xlim), ("ylim", ylim)):
        if len(lim) != 2 or not float(lim[0]) < float(lim[1]):
            raise ValueError(f"plot_vector_field: {name} must be (lo, hi) with lo < hi, got {lim}")
    if int(n) < 2:
        raise ValueError(f"plot_vector_field: n must be >= 2, got {n}")
    if kind not in ("quiver", "stream"):
        raise ValueError(f"plot_vector_field: kind must be 'quiver' or 'stream', got {kind!r}")
    if not callable(f):
        raise TypeError(f"plot_vector_field: f must be callable f(t, y), got {type(f).__name__}")
    _matplotlib()
    import torch

    default_dtype, default_device = _field_dtype(f)
    dtype = default_dtype if dtype is None else dtype
    device = default_device if device is None else device
    xs = np.linspace(float(xlim[0]), float(xlim[1]), int(n))
    ys = np.linspace(float(ylim[0]), float(ylim[1]), int(n))
    X, Y = np.meshgrid(xs, ys)
    pts = torch.tensor(np.stack([X.ravel(), Y.ravel()], axis=-1), dtype=dtype, device=device)
    with torch.no_grad():
        v = f(torch.tensor(float(t), dtype=dtype, device=device), pts)
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(pts.shape):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"plot_vector_field: f(t, y) must return a tensor of the points' shape {tuple(pts.shape)}, "
                         f"got {got}")
    V = _np(v).astype(float).reshape(X.shape + (2,))
    speed = np.linalg.norm(V, axis=-1)
    ax = _axes(ax, (5.5, 5.0))
    if kind == "quiver":
        U = V / np.maximum(speed, 1e-12)[..., None] if normalize else V
        kwargs.setdefault("angles", "xy")
        kwargs.setdefault("pivot", "mid")
        if normalize:
            kwargs.setdefault("scale_units", "xy")
            kwargs.setdefault("scale", 1.0 / (0.8 * min(xs[1] - xs[0], ys[1] - ys[0])))
        ax.quiver(X, Y, U[..., 0], U[..., 1], speed, cmap=cmap, **kwargs)
    else:
        ax.streamplot(xs, ys, V[..., 0], V[..., 1], color=speed, cmap=cmap, **kwargs)
    ax.set_xlim(float(xlim[0]), float(xlim[1]))
    ax.set_ylim(float(ylim[0]), float(ylim[1]))
    return ax


def plot_density(source: Callable | Any, ax: Any = None, *, xlim: tuple[float, float] | None = None,
                 ylim: tuple[float, float] | None = None, n: int = 100, log: bool = False, cmap: str = "viridis",
                 batch_size: int = 4096, **kwargs: Any) -> Any:
    """A 2-d density as an image: from a log-density function on an ``n x n`` grid, or from samples as a
    normalised histogram with ``n x n`` bins.

    Parameters
    ----------
    source : callable or Tensor / array
        ``log_prob(y)`` taking points ``(N, 2)`` and returning log-densities ``(N,)`` (e.g. a CNF's
        ``log_prob``; called in chunks of ``batch_size`` points, with autograd as the caller has it, since
        a trace estimator may need it), or samples of shape ``(N, 2)``.
    ax : matplotlib Axes, optional
        Where to draw; a new pyplot figure when None.
    xlim, ylim : (float, float), optional
        The extent: default ``(-4, 4)`` for a function, the samples' range for samples.
    n : int
        Grid points (function) or bins (samples) per axis.
    log : bool
        Show the log-density instead of the density.
    cmap : str
        Colour map.
    batch_size : int
        Points per ``log_prob`` call.
    **kwargs
        Passed to ``Axes.pcolormesh``.

    Returns
    -------
    Axes
        With one ``QuadMesh`` (``ax.collections[0]``) whose values (``get_array()``, ``n x n``, rows along y)
        are the density (or log-density) at the grid points / of the histogram's bins.

    Examples
    --------
    >>> import math, torch
    >>> from neurodyn import viz
    >>> log_prob = lambda y: -0.5 * (y ** 2).sum(-1) - math.log(2 * math.pi)     # standard normal
    >>> ax = viz.plot_density(log_prob, ax=viz.new_figure().subplots(), n=50)
    >>> ax.collections[0].get_array().shape
    (50, 50)
    >>> ax = viz.plot_density(torch.randn(10_000, 2), ax=viz.new_figure().subplots(), n=30)
    """
    import numpy as np

    if int(n) < 2:
        raise ValueError(f"plot_density: n must be >= 2, got {n}")
    for name, lim in (("xlim", xlim), ("ylim", ylim)):
        if lim is not None and (len(lim) != 2 or not float(lim[0]) < float(lim[1])):
            raise ValueError(f"plot_density: {name} must be (lo, hi) with lo < hi, got {lim}")
    if callable(source):
        _matplotlib()
        import torch

        xlim = (-4.0, 4.0) if xlim is None else xlim
        ylim = (-4.0, 4.0) if ylim is None else ylim
        xs = np.linspace(float(xlim[0]), float(xlim[1]), int(n))
        ys = np.linspace(float(ylim[0]), float(ylim[1]), int(n))
        X, Y = np.meshgrid(xs, ys)
        dtype, device = _field_dtype(source if hasattr(source, "parameters") else getattr(source, "__self__", None))
        pts = torch.tensor(np.stack([X.ravel(), Y.ravel()], axis=-1), dtype=dtype, device=device)
        parts = []
        for chunk in pts.split(int(batch_size)):
            lp = source(chunk)
            if not isinstance(lp, torch.Tensor) or lp.reshape(-1).shape[0] != chunk.shape[0]:
                got = tuple(lp.shape) if isinstance(lp, torch.Tensor) else type(lp).__name__
                raise ValueError(f"plot_density: log_prob(points of shape {tuple(chunk.shape)}) must return "
                                 f"{chunk.shape[0]} log-densities, got {got}")
            parts.append(lp.detach().reshape(-1))
        values = _np(torch.cat(parts)).astype(float).reshape(X.shape)
        if not log:
            values = np.exp(values)
        mesh_x, mesh_y = xs, ys
        shading = "nearest"
    else:
        samples = _np(source)
        if samples.ndim != 2 or samples.shape[1] != 2 or samples.shape[0] < 1:
            raise ValueError(f"plot_density: samples must have shape (N, 2), got {samples.shape}")
        _matplotlib()
        lo, hi = samples.min(0), samples.max(0)
        xlim = (float(lo[0]), float(hi[0])) if xlim is None else xlim
        ylim = (float(lo[1]), float(hi[1])) if ylim is None else ylim
        if not (xlim[0] < xlim[1] and ylim[0] < ylim[1]):
            raise ValueError("plot_density: the samples span no area; give xlim and ylim")
        hist, xe, ye = np.histogram2d(samples[:, 0], samples[:, 1], bins=int(n),
                                      range=[[float(xlim[0]), float(xlim[1])], [float(ylim[0]), float(ylim[1])]],
                                      density=True)
        values = hist.T  # rows along y, as the grid
        if log:
            with np.errstate(divide="ignore"):
                values = np.log(values)
        mesh_x, mesh_y = xe, ye
        shading = "flat"
    ax = _axes(ax, (5.5, 5.0))
    ax.pcolormesh(mesh_x, mesh_y, values, cmap=cmap, shading=shading, **kwargs)
    ax.set_xlim(float(xlim[0]), float(xlim[1]))
    ax.set_ylim(float(ylim[0]), float(ylim[1]))
    return ax


# ------------------------------------------------------------------------------------ the demos' figures
def plot_trajectories(t: Any, true: Any, pred: Any, path: str | Path, *, labels: Sequence[str] = ("x", "y"),
                      title: str = "") -> Path:
    """Each state component against time, ground truth (solid) and learned (dashed), one panel per component;
    written as a PNG to ``path``. ``true`` and ``pred`` have shape ``(len(t), d)``."""
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


def plot_phase_portrait(true: Any, pred: Any, path: str | Path, *, field: Callable | None = None,
                        title: str = "") -> Path:
    """Phase portrait of a 2-d system, true and learned trajectories, over the learned field (``field(t, y)``,
    :func:`plot_vector_field`) when given; written as a PNG to ``path``."""
    import numpy as np

    true, pred = _np(true), _np(pred)
    fig = new_figure((6.0, 6.0))
    ax = fig.subplots()
    if field is not None:
        finite = pred[np.isfinite(pred).all(-1)]
        both = np.concatenate([true, finite]) if len(finite) else true
        lo, hi = both.min(0), both.max(0)
        pad = 0.1 * (hi - lo)
        plot_vector_field(field, ax=ax, xlim=(lo[0] - pad[0], hi[0] + pad[0]), ylim=(lo[1] - pad[1], hi[1] + pad[1]),
                          cmap="Greys", alpha=0.6, width=0.003)
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
                    eval_iters: Sequence[int] = (), eval_values: Sequence[float | None] = (),
                    train_label: str = "minibatch loss", eval_label: str = "full-trajectory MSE",
                    vlines: Sequence[tuple[float, str]] = (), title: str = "") -> Path:
    """Training loss per iteration (log scale, with a running mean) and, on a second panel below with the same
    iteration axis, the periodic evaluations (markers; None / NaN for a failed evaluation leaves a gap).
    ``vlines`` are labelled vertical lines ``(iteration, label)`` marking phases of the run, drawn on both
    panels. Legends sit above their panels, outside the data. Written as a PNG to ``path``."""
    import numpy as np

    losses = _np(losses).astype(float)
    has_eval = len(eval_iters) > 0
    fig = new_figure((7.0, 6.0 if has_eval else 4.0))
    axes = fig.subplots(2 if has_eval else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    it = np.arange(1, len(losses) + 1)
    ax.plot(it, losses, color="C0", lw=0.6, alpha=0.35, label=train_label)
    if len(losses) >= 20:
        k = max(len(losses) // 50, 5)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(it[k - 1:], smooth, color="C0", lw=1.6, label=f"running mean over {k} iterations")
    ax.set_ylabel("training loss")
    if has_eval:
        values = np.array([np.nan if v is None else float(v) for v in eval_values])
        axes[1].plot(list(eval_iters), values, "o-", color="C3", ms=4, lw=1.2, label=eval_label)
        axes[1].set_ylabel("evaluation")
    for a in axes:
        for x, label in vlines:
            a.axvline(x, color="0.4", ls=":", lw=1.2, alpha=0.8, label=label if (label and a is axes[0]) else None)
        a.set_yscale("log")
        a.grid(alpha=0.3, which="both")
        labels = a.get_legend_handles_labels()[1]
        a.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False, borderaxespad=0.2,
                 ncols=2 if max(map(len, labels), default=0) <= 40 else 1)  # long labels one per row
    axes[-1].set_xlabel("iteration")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
