"""A tiny dependency-free progress bar for training loops.

On a terminal it redraws one line in place (``\\r``), at most ``refresh_hz`` times a second; anywhere else
(a log file, CI, a pipe) it prints a plain line every ~10% of the run, so logs stay short.

    bar = Progress(total=1000, desc="spiral")
    for i in range(1000):
        ...
        bar.update(loss=loss.item(), nfe=nfe)
    bar.close()
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

__all__ = ["Progress"]


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
