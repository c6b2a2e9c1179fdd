"""Progress meters: training loops (:class:`Progress`, :func:`progress_bar`) and solves (:class:`SolveProgress`).

:class:`Progress` is a dependency-free bar: on a terminal it redraws one line in place (``\\r``), at most
``refresh_hz`` times a second; anywhere else (a log file, CI, a pipe) it prints a plain line every ~10% of the run,
so logs stay short. :func:`progress_bar` gives the same interface backed by ``tqdm.auto`` when tqdm is installed
(ETA, notebook widgets), else a :class:`Progress`.

    bar = progress_bar(total=1000, desc="spiral")
    for i in range(1000):
        ...
        bar.update(loss=loss.item(), nfe=nfe)
    bar.close()

:class:`SolveProgress` is what ``neurodyn.solve(..., progress=True)`` shows: how far ``t`` has come between the
initial and final times, the accepted and rejected steps and the NFE, redrawn at most every ``interval`` seconds
and only once the solve has run for ``delay`` seconds.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from typing import IO, Any

from .errors import InputError, InputTypeError

__all__ = ["Progress", "SolveProgress", "as_meter", "has_tqdm", "progress_bar"]


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value == 0.0 or 1e-3 <= abs(value) < 1e4:
            return f"{value:.4f}"
        return f"{value:.3e}"
    return str(value)


class Progress:
    """Iteration counter with live fields (loss, NFE, ...) and iterations per second.

    Parameters
    ----------
    total : int
        Number of iterations expected.
    desc : str
        A label printed in front of the counter.
    stream : file-like, optional
        Where to write; defaults to ``sys.stdout``.
    tty : bool, optional
        Force (or forbid) in-place redrawing; by default ``stream.isatty()``.
    width : int
        Width of the bar itself, in characters (terminal mode only).
    refresh_hz : float
        Maximum redraws per second in terminal mode.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        width: int = 24,
        refresh_hz: float = 10.0,
    ):
        self.total = max(int(total), 0)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stdout
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            try:
                tty = bool(isatty()) if isatty is not None else False
            except (ValueError, OSError):  # closed or odd streams
                tty = False
        self.tty = tty
        self.width = width
        self.min_interval = 1.0 / refresh_hz if refresh_hz > 0 else 0.0
        self.n = 0
        self.fields: dict[str, Any] = {}
        self.start = time.perf_counter()
        self._last_draw = -float("inf")
        self._next_decile = 1  # non-tty mode: print when n crosses k * total / 10
        self._last_len = 0
        self._printed_n = -1  # non-tty mode: the iteration count of the last line written
        self._closed = False

    # ------------------------------------------------------------------ public
    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        """Iterations per second so far."""
        e = self.elapsed
        return self.n / e if e > 0 else 0.0

    def update(self, n: int = 1, **fields: Any) -> None:
        """Advance by ``n`` iterations and set the displayed fields (e.g. ``loss=0.1, nfe=26``)."""
        self.n += n
        self.fields.update(fields)
        if self.tty:
            now = time.perf_counter()
            if now - self._last_draw >= self.min_interval or self.n >= self.total:
                self._last_draw = now
                self._draw_inplace()
        else:
            crossed = False
            while self.total > 0 and self._next_decile <= 10 and self.n * 10 >= self._next_decile * self.total:
                self._next_decile += 1
                crossed = True
            if crossed:
                self._printed_n = self.n
                self._write(self.line() + "\n")

    def write(self, message: str) -> None:
        """Print a message without garbling the bar."""
        if self.tty and self._last_len:
            self._write("\r" + " " * self._last_len + "\r")
            self._last_len = 0
        self._write(message.rstrip("\n") + "\n")
        if self.tty:
            self._draw_inplace()

    def close(self) -> None:
        """Draw the final state and end the line (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.tty:
            self._draw_inplace()
            self._write("\n")
        elif self.n != self._printed_n:
            # the run stopped early (or had no total): still report where it ended
            self._write(self.line() + "\n")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- internals
    def line(self, bar: bool = False) -> str:
        """The status line: ``desc  [bar]  n/total  key=value ...  12.3 it/s  elapsed``."""
        parts = []
        if self.desc:
            parts.append(self.desc)
        if bar and self.total > 0:
            filled = min(self.width, int(self.width * self.n / self.total))
            parts.append("[" + "#" * filled + "." * (self.width - filled) + "]")
        width = len(str(self.total)) if self.total else 1
        parts.append(f"{self.n:>{width}d}/{self.total}")
        parts.extend(f"{k}={_fmt(v)}" for k, v in self.fields.items())
        parts.append(f"{self.rate:.1f} it/s")
        parts.append(f"{self.elapsed:.1f}s")
        if 0 < self.n < self.total:
            parts.append(f"eta {_duration(self.elapsed * (self.total - self.n) / self.n)}")
        return "  ".join(parts)

    def _draw_inplace(self) -> None:
        text = self.line(bar=True)
        pad = max(self._last_len - len(text), 0)
        self._write("\r" + text + " " * pad)
        self._last_len = len(text)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            flush()


def _duration(seconds: float) -> str:
    """``12.3s``, ``4m05s`` or ``2h03m``."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


_TQDM: list[bool] = []  # the answer of has_tqdm(), found once


def has_tqdm() -> bool:
    """Whether tqdm is installed (looked up once; nothing is imported)."""
    if not _TQDM:
        _TQDM.append(importlib.util.find_spec("tqdm") is not None)
    return _TQDM[0]


def _isatty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):  # closed or odd streams
        return False


class _TqdmProgress:
    """:class:`Progress`'s interface over a ``tqdm.auto`` bar (its ETA and rate; fields as the postfix)."""

    def __init__(self, total: int, desc: str, stream: IO[str] | None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=max(int(total), 0), desc=desc or None, file=stream if stream is not None else sys.stdout,
                        dynamic_ncols=True, smoothing=0.1)
        self.n = 0

    def update(self, n: int = 1, **fields: Any) -> None:
        """Advance by ``n`` iterations and set the displayed fields."""
        self.n += n
        if fields:
            self.bar.set_postfix_str("  ".join(f"{k}={_fmt(v)}" for k, v in fields.items()), refresh=False)
        self.bar.update(n)

    def write(self, message: str) -> None:
        """Print a message without garbling the bar."""
        self.bar.write(message.rstrip("\n"), file=self.bar.fp)

    def close(self) -> None:
        """Draw the final state and end the line (idempotent)."""
        self.bar.close()

    def __enter__(self) -> _TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int, desc: str = "", *, stream: IO[str] | None = None,
                 backend: str = "auto") -> Progress | _TqdmProgress:
    """An iteration bar: ``tqdm.auto`` (elapsed, rate and ETA) when tqdm is installed, else a :class:`Progress`.

    Parameters
    ----------
    total : int
        Number of iterations expected.
    desc : str
        A label printed in front of the bar.
    stream : file-like, optional
        Where to write; defaults to ``sys.stdout``.
    backend : ``"auto"``, ``"tqdm"`` or ``"text"``
        ``"auto"``: tqdm when installed, else the text :class:`Progress`.

    Returns
    -------
    An object with ``update(n=1, **fields)``, ``write(message)`` and ``close()`` (also a context manager).

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> with progress_bar(4, desc="fit", stream=out, backend="text") as bar:
    ...     for i in range(4):
    ...         bar.update(loss=1.0 / (i + 1))
    >>> out.getvalue().splitlines()[-1].startswith("fit  4/4  loss=0.2500")
    True
    """
    if backend not in ("auto", "tqdm", "text"):
        raise InputError(f"backend must be 'auto', 'tqdm' or 'text', got {backend!r}.")
    if backend == "tqdm" and not has_tqdm():
        raise InputError("backend='tqdm' needs tqdm: pip install tqdm (or use backend='auto' or 'text').")
    if backend != "text" and has_tqdm():
        return _TqdmProgress(total, desc, stream)
    return Progress(total, desc, stream=stream)


class SolveProgress:
    """A progress meter for solves: ``neurodyn.solve(..., progress=SolveProgress(...))`` (``progress=True`` makes
    one with the defaults).

    Shows the fraction of the time span ``[t0, t1]`` covered (``|t - t0| / |t1 - t0|``), the current ``t``, the
    accepted steps, the rejected ones, the NFE of the forward solve, the elapsed time and an ETA (from the rate at
    which ``t`` has advanced so far). Nothing is drawn until the solve has run for ``delay`` seconds, then at most
    once every ``interval`` seconds, and a last time when the solve ends; a solve shorter than ``delay`` shows
    nothing. One meter may serve many solves, one at a time (each :meth:`start` resets it).

    Parameters
    ----------
    desc : str
        A label printed in front of the bar.
    backend : ``"auto"``, ``"tqdm"`` or ``"text"``
        ``"auto"`` (default): ``tqdm.auto`` when tqdm is installed, else text lines.
    stream : file-like, optional
        Where to write; default ``sys.stderr`` (looked up at each :meth:`start`).
    delay : float
        Seconds a solve runs before anything is drawn (default 0.5).
    interval : float, optional
        Least seconds between two draws; default 0.1 where the bar is redrawn in place (tqdm, or text on a
        terminal), 2.0 for text lines written to a file or pipe (one line per draw).
    tty : bool, optional
        Text backend: redraw one line in place (True) or write a line per draw (False); default
        ``stream.isatty()``.

    Examples
    --------
    >>> import io, torch, neurodyn
    >>> from neurodyn.progress import SolveProgress
    >>> out = io.StringIO()
    >>> meter = SolveProgress(desc="decay", backend="text", stream=out, delay=0.0)
    >>> sol = neurodyn.solve(lambda t, y: -y, torch.ones(2, dtype=torch.float64),
    ...                      torch.tensor([0.0, 2.0], dtype=torch.float64), progress=meter)
    >>> last = out.getvalue().splitlines()[-1]
    >>> last.startswith("decay") and "100.0%" in last and f"steps={sol.stats['steps']}" in last
    True
    """

    def __init__(self, desc: str = "solve", *, backend: str = "auto", stream: IO[str] | None = None,
                 delay: float = 0.5, interval: float | None = None, tty: bool | None = None):
        if backend not in ("auto", "tqdm", "text"):
            raise InputError(f"SolveProgress: backend must be 'auto', 'tqdm' or 'text', got {backend!r}.")
        if backend == "tqdm" and not has_tqdm():
            raise InputError("SolveProgress(backend='tqdm') needs tqdm: pip install tqdm (or use backend='auto' or "
                             "'text').")
        for name, v in (("delay", delay), ("interval", interval)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
                                  or not math.isfinite(v)):
                raise InputError(f"SolveProgress: {name} must be a finite number of seconds >= 0, got {v!r}.")
        self.desc = str(desc)
        self.backend = "tqdm" if backend == "tqdm" or (backend == "auto" and has_tqdm()) else "text"
        self.stream = stream
        self.delay = float(delay)
        self.interval = None if interval is None else float(interval)
        self.tty = tty
        self.draws = 0  # lines or redraws written by the current solve
        self.t0 = self.t1 = self.t = 0.0
        self.steps = self.rejected = self.nfe = 0
        self.status = ""
        self._bar: Any = None
        self._out: IO[str] | None = None
        self._start = 0.0
        self._next = math.inf
        self._every = 0.1
        self._inplace = False
        self._last_len = 0

    # ------------------------------------------------------------------ the meter protocol
    def start(self, t0: float, t1: float) -> None:
        """A solve from ``t0`` to ``t1`` begins: reset the counts and the clock."""
        self.t0, self.t1, self.t = float(t0), float(t1), float(t0)
        self.steps = self.rejected = self.nfe = 0
        self.status = ""
        self.draws = 0
        self._bar = None
        self._last_len = 0
        self._out = self.stream if self.stream is not None else sys.stderr
        self._inplace = self.backend == "tqdm" or (self.tty if self.tty is not None else _isatty(self._out))
        self._every = self.interval if self.interval is not None else (0.1 if self._inplace else 2.0)
        self._start = time.perf_counter()
        self._next = self._start + self.delay

    def update(self, t: float, h: float, accepted: bool, nfe: int) -> None:
        """After an attempted step: ``t`` where the solve stands, ``h`` the step tried (signed), whether it was
        accepted, the NFE so far. Draws when ``interval`` seconds have passed since the last draw."""
        if accepted:
            self.steps += 1
        else:
            self.rejected += 1
        self.t = t
        self.nfe = nfe
        now = time.perf_counter()
        if now >= self._next:
            self._next = now + self._every
            self._draw(now, final=False)

    def close(self, status: str) -> None:
        """The solve ended with ``status`` (a :class:`~neurodyn.Solution` status, or ``"error"`` when it raised):
        the last draw, when anything was drawn."""
        self.status = status
        if self.draws:
            self._draw(time.perf_counter(), final=True)
        self._next = math.inf

    # ------------------------------------------------------------------ display
    @property
    def fraction(self) -> float:
        """The part of ``[t0, t1]`` covered, in [0, 1]."""
        span = self.t1 - self.t0
        return 1.0 if span == 0 else min(max((self.t - self.t0) / span, 0.0), 1.0)

    def fields(self) -> str:
        """``t=...  steps=...  rejected=...  nfe=...`` (and the status once closed)."""
        s = f"t={self.t:.6g}  steps={self.steps}  rejected={self.rejected}  nfe={self.nfe}"
        return s + (f"  {self.status}" if self.status else "")

    def line(self, now: float | None = None) -> str:
        """The text status line: ``desc  [bar]  42.0%  t=...  steps=...  rejected=...  nfe=...  1.2s  eta 1.7s``."""
        elapsed = (now if now is not None else time.perf_counter()) - self._start
        f = self.fraction
        width = 20
        filled = int(width * f)
        parts = [self.desc] if self.desc else []
        parts += ["[" + "#" * filled + "." * (width - filled) + "]", f"{100 * f:5.1f}%", self.fields(),
                  _duration(elapsed)]
        if 0 < f < 1 and not self.status:
            parts.append(f"eta {_duration(elapsed * (1 - f) / f)}")
        return "  ".join(parts)

    def _draw(self, now: float, final: bool) -> None:
        self.draws += 1
        out = self._out
        if self.backend == "tqdm":
            self._draw_tqdm(final)
            return
        text = self.line(now)
        if self._inplace:
            pad = max(self._last_len - len(text), 0)
            out.write("\r" + text + " " * pad + ("\n" if final else ""))
            self._last_len = len(text)
        else:
            out.write(text + "\n")
        flush = getattr(out, "flush", None)
        if flush is not None:
            flush()

    def _draw_tqdm(self, final: bool) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=100.0, desc=self.desc or None, file=self._out, smoothing=0, mininterval=0,
                             dynamic_ncols=True,
                             bar_format="{desc}: {percentage:5.1f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
            # the solve's start on tqdm's clock (time.time): the bar appears only after `delay`
            self._bar.start_t = time.time() - (time.perf_counter() - self._start)
        bar = self._bar
        bar.n = 100.0 * self.fraction
        bar.set_postfix_str(self.fields(), refresh=False)
        if final:
            bar.close()
            self._bar = None
        else:
            bar.refresh()


def as_meter(progress: Any) -> Any:
    """``solve``'s ``progress`` argument as a meter: None for False/None, a :class:`SolveProgress` for True, else the
    object itself when it has ``start(t0, t1)``, ``update(t, h, accepted, nfe)`` and ``close(status)``.

    Raises :class:`~neurodyn.errors.InputTypeError` for anything else.
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        return SolveProgress()
    if all(callable(getattr(progress, m, None)) for m in ("start", "update", "close")):
        return progress
    raise InputTypeError(f"progress must be True, False or a meter (neurodyn.progress.SolveProgress, or an object with "
                         f"start(t0, t1), update(t, h, accepted, nfe) and close(status) methods); got "
                         f"{type(progress).__name__} {progress!r:.60}.")
