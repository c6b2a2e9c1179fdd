"""Control paths for :class:`neurodyn.ControlTerm` (the protocol: :mod:`neurodyn.core.paths`).

:class:`LinearPath`: piecewise-linear interpolation of data ``(..., T, channels)``.
:class:`BrownianInterval`, :class:`BrownianPath`, :class:`BrownianTree`, :class:`ReverseBrownian`: Brownian motion
(with space-time Levy areas), queried by interval (:mod:`neurodyn.paths.brownian`).
"""

from .brownian import (
    LEVY_AREAS,
    BrownianIncrement,
    BrownianInterval,
    BrownianPath,
    BrownianTree,
    ReverseBrownian,
)
from .linear import LinearPath

__all__ = [
    "LEVY_AREAS",
    "BrownianIncrement",
    "BrownianInterval",
    "BrownianPath",
    "BrownianTree",
    "LinearPath",
    "ReverseBrownian",
]
