"""A torchcfm 1.0.7 drop-in: ``import neurodyn.compat.torchcfm as torchcfm``.

The flow matchers are :mod:`neurodyn.models.flow_matching`'s classes (torchcfm's names, signatures and order of
random draws: seeded code gives torchcfm's numbers); ``torchcfm.conditional_flow_matching`` and
``torchcfm.optimal_transport`` exist as submodules, as in torchcfm. Exact OT uses POT when installed, else the
optimal assignment for equal batch sizes (exact for uniform weights).

Example::

    import neurodyn.compat.torchcfm as torchcfm
    FM = torchcfm.ExactOptimalTransportConditionalFlowMatcher(sigma=0.1)
    t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)
"""

from .conditional_flow_matching import (
    ConditionalFlowMatcher,
    ExactOptimalTransportConditionalFlowMatcher,
    SchrodingerBridgeConditionalFlowMatcher,
    TargetConditionalFlowMatcher,
    VariancePreservingConditionalFlowMatcher,
    pad_t_like_x,
)
from .optimal_transport import OTPlanSampler, wasserstein

__version__ = "1.0.7"

__all__ = [
    "ConditionalFlowMatcher",
    "ExactOptimalTransportConditionalFlowMatcher",
    "OTPlanSampler",
    "SchrodingerBridgeConditionalFlowMatcher",
    "TargetConditionalFlowMatcher",
    "VariancePreservingConditionalFlowMatcher",
    "pad_t_like_x",
    "wasserstein",
]
