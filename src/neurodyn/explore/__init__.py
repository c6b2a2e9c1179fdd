"""``neurodyn explore``: the seeds' interactive figures as a local web page.

Two views, served by a FastAPI application on 127.0.0.1 (the ``explore`` extra installs FastAPI and uvicorn):

* continuous depth: nested rings flowing through a trained Neural ODE and Augmented Neural ODE, a time slider, and
  the accuracy of a linear classifier on ``z(t)`` at the slider's ``t``;
* irregular time series: click to add observations, shift-click to remove the nearest; a trained latent ODE's
  posterior mean and ``+-2`` std band follow at once (the encoder's amortised inference, no retraining).

``neurodyn.explore.models`` (the models and the numbers) needs only torch; ``neurodyn.explore.app`` needs FastAPI.

>>> from neurodyn.explore import load_or_train, create_app  # doctest: +SKIP
>>> import uvicorn; uvicorn.run(create_app(load_or_train()), host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExploreConfig", "ExploreModels", "create_app", "default_cache_dir", "latent_posterior", "load_or_train",
           "rings_state", "serve"]

_FROM_MODELS = ("ExploreConfig", "ExploreModels", "default_cache_dir", "latent_posterior", "load_or_train",
                "rings_state")
_FROM_APP = ("create_app", "serve")


def __getattr__(name: str) -> Any:
    """Import on first use: ``neurodyn explore --help`` (``neurodyn.explore.command``) needs neither torch nor
    FastAPI."""
    if name in _FROM_MODELS:
        from . import models

        return getattr(models, name)
    if name in _FROM_APP:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
