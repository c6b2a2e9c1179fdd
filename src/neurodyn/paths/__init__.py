"""Control paths for :class:`neurodyn.ControlTerm` (the protocol: :mod:`neurodyn.core.paths`).

:class:`LinearPath`: piecewise-linear interpolation of data ``(..., T, channels)``.
"""

from .linear import LinearPath

__all__ = ["LinearPath"]
