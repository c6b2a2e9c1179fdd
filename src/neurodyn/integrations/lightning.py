"""A Lightning callback logging what neurodyn's solves did in every training step.

Needs Lightning (``pip install "neurodyn[lightning]"``, i.e. the ``lightning`` package; ``pytorch_lightning``
is used when ``lightning`` is absent). Importing this module without either raises an ``ImportError`` naming
the extra; ``import neurodyn`` never imports Lightning.

Example::

    import lightning as L
    from neurodyn.integrations.lightning import SolverStatsCallback

    trainer = L.Trainer(max_epochs=10, callbacks=[SolverStatsCallback()], log_every_n_steps=1)
    trainer.fit(lit_module, train_loader)   # logs solver/nfe_forward, solver/nfe_backward, solver/steps, ...

See docs/lightning.md for a LightningModule wrapping a :class:`~neurodyn.NeuralODE`.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:
        raise ImportError(
            "neurodyn.integrations.lightning needs Lightning, which is not installed: "
            "pip install \"neurodyn[lightning]\" (or pip install lightning)."
        ) from exc

from ..solution import STATUSES
from ..training import solver_stats

__all__ = ["SolverStatsCallback"]

#: The per-step metrics (without the prefix), in the order they are logged.
METRICS = ("nfe_forward", "nfe_backward", "steps", "rejected", "status", "nfe_total")


class SolverStatsCallback(Callback):
    """Log the solver statistics of every training step: after the step (forward, backward, optimizer step),
    :func:`neurodyn.training.solver_stats` of the LightningModule, through ``pl_module.log_dict``.

    Logged per step (names with ``prefix``, default ``"solver/"``):

    ``nfe_forward``, ``nfe_backward``
        Vector-field evaluations of the step's forward solves and of their backward pass (0 for
        ``gradient="direct"``), summed over the module's NeuralODEs (the last solve of each).
    ``steps``, ``rejected``
        Accepted and rejected solver steps.
    ``status``
        The solver status as its index in :data:`neurodyn.solution.STATUSES` (0 = ``"success"``; the first
        failure among the solves, else 4 = ``"event"`` if one stopped at an event). The string is in
        :attr:`last`.
    ``nfe_total``
        ``nfe_forward + nfe_backward`` summed over all steps so far, this callback's state: it is saved in
        Lightning checkpoints and continues after a resume.

    Parameters
    ----------
    prefix : str
        Put before every metric name.
    prog_bar : bool
        Show the metrics in Lightning's progress bar too.

    Attributes
    ----------
    last : dict
        The last step's :func:`~neurodyn.training.solver_stats` (``status`` as a string).
    nfe_total : int
        The running total logged as ``nfe_total``.

    Steps in which no module solved anything log nothing.
    """

    def __init__(self, prefix: str = "solver/", prog_bar: bool = False):
        super().__init__()
        if not isinstance(prefix, str):
            raise TypeError(f"SolverStatsCallback: prefix must be a string, got {type(prefix).__name__}.")
        self.prefix = prefix
        self.prog_bar = bool(prog_bar)
        self.last: dict[str, Any] = {}
        self.nfe_total = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def metrics(self, stats: dict[str, Any]) -> dict[str, float]:
        """The logged dict for one step's :func:`~neurodyn.training.solver_stats` (after ``nfe_total`` counts it)."""
        values = {"nfe_forward": stats["nfe_forward"], "nfe_backward": stats["nfe_backward"],
                  "steps": stats["steps"], "rejected": stats["rejected"], "status": stats["status_code"],
                  "nfe_total": self.nfe_total}
        return {self.prefix + k: float(values[k]) for k in METRICS}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        stats = solver_stats(pl_module)
        if stats["solves"] == 0:
            return
        self.last = stats
        self.nfe_total += stats["nfe_forward"] + stats["nfe_backward"]
        pl_module.log_dict(self.metrics(stats), on_step=True, on_epoch=False, prog_bar=self.prog_bar,
                           batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"nfe_total": self.nfe_total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.nfe_total = int(state_dict["nfe_total"])

    @staticmethod
    def status_name(code: float) -> str:
        """The status string of a logged ``status`` value (e.g. ``0.0 -> "success"``)."""
        return STATUSES[int(code)]
