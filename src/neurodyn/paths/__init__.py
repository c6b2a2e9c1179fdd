"""Control paths for :class:`neurodyn.ControlTerm` (the protocol: :mod:`neurodyn.core.paths`).

:class:`LinearPath`: piecewise-linear interpolation of data ``(..., T, channels)`` (and rectilinear, causal);
:class:`CubicPath`: piecewise cubics in torchcde's coefficient layout -- natural cubic splines
(:func:`natural_cubic_coeffs`) and cubic Hermite with backward differences (:func:`hermite_coeffs`, causal);
:func:`logsig_windows`: depth-1/2 log-signatures over windows (the log-ODE method); data preparation in
:mod:`neurodyn.paths.fill` (missing values, rectilinear data, observation-intensity / mask channels); path
augmentations in :mod:`neurodyn.paths.augment` (:func:`cumulative_integral`, :func:`basepoint`).
:class:`BrownianInterval`, :class:`BrownianPath`, :class:`BrownianTree`, :class:`ReverseBrownian`: Brownian motion
(with space-time Levy areas), queried by interval (:mod:`neurodyn.paths.brownian`).
"""

from .augment import basepoint, cumulative_integral
from .brownian import (
    LEVY_AREAS,
    BrownianIncrement,
    BrownianInterval,
    BrownianPath,
    BrownianTree,
    ReverseBrownian,
)
from .cubic import CubicPath, hermite_coeffs, natural_cubic_coeffs
from .fill import fill_missing, forward_fill, observation_channels, rectilinear_data
from .linear import LinearPath
from .logsig import logsig_windows

__all__ = ["LEVY_AREAS", "BrownianIncrement", "BrownianInterval", "BrownianPath", "BrownianTree", "CubicPath",
           "LinearPath", "ReverseBrownian", "basepoint",
           "cumulative_integral", "fill_missing", "forward_fill", "hermite_coeffs", "logsig_windows",
           "natural_cubic_coeffs", "observation_channels", "rectilinear_data"]
