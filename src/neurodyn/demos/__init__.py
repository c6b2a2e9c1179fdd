"""Runnable demos: ``neurodyn demo <name>`` (or ``python -m neurodyn demo <name>``).

Each demo is a module in this package with ``NAME``, ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args) -> int``.  The registry below lists them without importing them (so ``--help`` stays fast).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> (module, one-line description)
DEMOS: dict[str, tuple[str, str]] = {
    "bouncing-ball": (
        "neurodyn.demos.bouncing_ball",
        "a bouncing ball through events with a jump: bounce times vs closed form; learn g and e from heights",
    ),
    "digits": (
        "neurodyn.demos.digits",
        "ODE-Net vs ResNet vs RK-Net on scikit-learn's 8x8 digits (accuracy, NFE, memory, adaptive NFE)",
    ),
    "spiral": (
        "neurodyn.demos.spiral",
        "fit a Neural ODE to the 2-d cubic spiral dz/dt = A z^3 (plots + metrics.json)",
    ),
    "circles": (
        "neurodyn.demos.circles",
        "nested rings and the 1-d map g(-1)=1, g(1)=-1: Neural ODE vs Augmented Neural ODE (accuracy, NFE)",
    ),
    "flows": (
        "neurodyn.demos.flows",
        "FFJORD vs I-CFM vs OT-CFM on 8gaussians and checkerboard: NLL, exact W2, sampling NFE, wall time, plots",
    ),
    "diffusion": (
        "neurodyn.demos.diffusion",
        "score-based diffusion (VP-SDE) on 8gaussians: reverse-SDE and probability-flow samples, W2, exact NLL",
    ),
    "latent": (
        "neurodyn.demos.latent",
        "latent ODE on the periodic toy (Rubanova et al. 2019): interpolation/extrapolation MSE, posterior bands",
    ),
    "physics": (
        "neurodyn.demos.physics",
        "HNN vs LNN vs plain network on mass-spring, pendulum and two-body (energy MSE, drift plots)",
    ),
    "latent-sde": (
        "neurodyn.demos.latent_sde",
        "latent SDE on the stochastic Lorenz attractor: ELBO, KL, posterior samples vs data (metrics.json)",
    ),
    "cde": (
        "neurodyn.demos.cde",
        "NeuralCDE vs ODE-RNN vs GRU-D vs SSM on UEA JapaneseVowels, 0/30/50/70 percent dropped: accuracy, NFE, wall",
    ),
    "pendulum": (
        "neurodyn.demos.pendulum",
        "fit a Neural ODE to a damped pendulum observed noisily at irregular times; extrapolate",
    ),
}
"""The demos by command name: ``(module, one-line description)``."""


def load(name: str) -> ModuleType:
    """Import the module of demo ``name``."""
    try:
        module, _ = DEMOS[name]
    except KeyError:
        raise KeyError(f"unknown demo {name!r}; available: {', '.join(sorted(DEMOS))}") from None
    return importlib.import_module(module)


__all__ = ["DEMOS", "load"]
