"""``torchcfm.models``: the toy MLP (``torchcfm.models.models.MLP``)."""

from .models import MLP

__all__ = ["MLP"]
