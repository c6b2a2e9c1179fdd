"""Hamiltonian vs Lagrangian vs plain networks on the HNN paper's tasks (Greydanus et al. 2019).

Three systems, data as in the paper's code (initial states, observation grids, noise, train/test split):

* ``mass_spring``: ``H = q^2 + p^2``; 50 trajectories of 30 points on ``[0, 3]`` from the exact solution, initial
  radius uniform in ``[0.1, 1]``, Gaussian noise std 0.1 on ``(q, p)``; half the trajectories for training.
* ``pendulum``: ``H = 2 (1 - cos q) + p^2``; 50 trajectories of 45 points on ``[0, 3]`` (reference solve at
  rtol 1e-10), initial radius uniform in ``[1.3, 2.3]``, noise std 0.1; half for training.
* ``two_body``: two unit masses, ``G = 1``, ``H = |p1|^2/2 + |p2|^2/2 - 1/|q1 - q2|``; near-circular orbits
  (separation vector with components uniform in ``[0.5, 1.5]``, circular speed times ``1 + 0.05 N(0, 1)``), 50
  points per orbit on ``[0, 20]``, no noise, 20% of the orbits for testing.

The targets are the exact derivatives ``dx/dt`` at the (noisy) observed states' clean values. Three models, each
an MLP of 200 tanh units and three layers (the paper's), trained with Adam (lr 1e-3; weight decay 1e-4 for the
one-dimensional tasks, 0 for two-body, as the paper's code) in float32 on derivatives:

* ``hnn``: :class:`neurodyn.models.HNN` (scalar ``H``, field = its symplectic gradient);
* ``lnn``: :class:`neurodyn.models.LNN` (scalar ``L(q, qdot)``; states ``(q, qdot)`` with ``qdot = dH/dp`` of the
  noisy observation, targets ``qddot``; softplus units, since ``tanh``'s ``d2L/dqdot2`` starts near singular);
* ``node``: :class:`neurodyn.models.DerivativeMLP` (outputs ``dx/dt`` directly: the paper's baseline).

Metrics per system and model (``metrics.json``): ``train_mse`` / ``test_mse`` (derivative MSE in ``(q, p)``
coordinates; the LNN's ``dp/dt`` is its ``qddot`` mapped back), ``energy_mse`` (the paper's energy metric: the
mean squared difference between the true energy along the model's rollout and the true energy of its start,
over ``[0, 20]`` at 100 points with ``dopri5`` at rtol 1e-9, from 15 starts: for the mass-spring the paper's
analysis notebook's, each component uniform in ``[-1, -0.2] U [0.2, 1]`` (partly outside the training radii), for
the others the test trajectories' clean starts; as the paper's analysis notebooks do, the models' rollouts run on
the times scaled by ``1 + 0.9 sigma`` for noise std ``sigma``, 1.09 on the noisy tasks, "to compensate for noise
effects") and the mean energy drift at the end of the rollouts. Plots
(matplotlib): ``energy_<system>.png`` (true energy along one rollout per model), ``phase_<system>.png``.

``--budget paper`` uses the paper's training budget everywhere (2,000 steps; two-body 10,000 steps, batch 200,
1,000 orbits; the LNN as many steps); the default ``ci`` budget keeps it for the HNN and the baseline on the
mass-spring and pendulum, cuts two-body to 2,000 steps on 200 orbits and the LNN to a quarter of the steps;
``--quick`` is a smoke run (30 steps; numbers not meaningful).

Other experiments join by adding a function ``run_<name>(cfg, out, stream) -> dict`` to :data:`EXPERIMENTS` (the
demo runs the selected ones in order and puts each result under its name in ``metrics.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from neurodyn import solve
from neurodyn.demos._common import POSITIVE_INT, DemoError, add_out_and_seed, json_safe
from neurodyn.demos._common import config_from_args as _config_from_args
from neurodyn.models.physics import HNN, LNN, DerivativeMLP

NAME = "physics"
DESCRIPTION = "HNN vs LNN vs plain network on mass-spring, pendulum and two-body (energy MSE, drift plots)"

MODELS = ("hnn", "lnn", "node")


# ----------------------------------------------------------------------------------------------- config
@dataclass
class PhysicsConfig:
    out: str = "runs/physics"
    seed: int = 0
    quick: bool = False
    budget: str = "ci"
    only: str = ""
    models: str = ",".join(MODELS)
    hidden: int = 200
    lr: float = 1e-3
    rollout_t: float = 20.0
    rollout_points: int = 100
    trials: int = 15
    threads: int = 1
    plots: bool = True


QUICK = dict(trials=3, rollout_points=50)
#: Training steps per system by budget, the LNN's steps (its Hessian makes a step ~10x dearer), two-body orbits.
BUDGETS = {
    "paper": {"mass_spring": 2000, "pendulum": 2000, "two_body": 10000, "lnn_fraction": 1.0,
              "two_body_orbits": 1000},
    "ci": {"mass_spring": 2000, "pendulum": 2000, "two_body": 2000, "lnn_fraction": 0.25, "two_body_orbits": 200},
    "quick": {"mass_spring": 30, "pendulum": 30, "two_body": 30, "lnn_fraction": 1.0, "two_body_orbits": 10},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PhysicsConfig()
    add_out_and_seed(parser, d.out, d.seed)
    parser.add_argument("--quick", action="store_true", help="a smoke run (100 steps; numbers not meaningful)")
    parser.add_argument("--budget", choices=("ci", "paper"), default=d.budget,
                        help="training budget: 'paper' (2000 steps; two-body 10000 steps on 1000 orbits) or "
                             "'ci' (two-body cut to 2000 steps on 200 orbits) (default: ci)")
    parser.add_argument("--only", default=d.only, metavar="NAMES",
                        help=f"comma-separated experiments to run (default: all of {', '.join(EXPERIMENTS)})")
    parser.add_argument("--models", default=d.models, metavar="NAMES",
                        help=f"comma-separated models (default: {d.models})")
    parser.add_argument("--trials", type=POSITIVE_INT, default=None,
                        help=f"rollouts for the energy metric (default: {d.trials})")
    parser.add_argument("--threads", type=POSITIVE_INT, default=d.threads, help="torch CPU threads (default: 1)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")


def config_from_args(args: argparse.Namespace) -> PhysicsConfig:
    return _config_from_args(PhysicsConfig, args, QUICK)


# ------------------------------------------------------------------------------------------------ systems
@dataclass
class System:
    """A Hamiltonian system: its true ``H`` on ``(..., 2d)`` states, how to sample one trajectory's start, the
    observation grid, the noise, and ``qdot = velocity(x)`` (the Lagrangian coordinates' map from ``p``)."""

    name: str
    dim: int
    hamiltonian: Callable[[Tensor], Tensor]
    sample_start: Callable[[torch.Generator], Tensor]
    t_span: float
    points: int
    noise: float
    test_split: float
    weight_decay: float
    batch: int | None
    velocity_scale: float  # qdot = velocity_scale * p (both systems' kinetic terms are quadratic and diagonal)
    eval_start: Callable[[torch.Generator], Tensor] | None = None  # rollout starts (None: the test trajectories')

    def field(self, x: Tensor) -> Tensor:
        """The true ``dx/dt``."""
        return HNN(hamiltonian=self.hamiltonian).time_derivative(x)


def _spring_start(gen: torch.Generator) -> Tensor:
    y0 = torch.rand(2, generator=gen, dtype=torch.float64) * 2 - 1
    radius = float(torch.rand((), generator=gen, dtype=torch.float64)) * 0.9 + 0.1
    return y0 / y0.norm() * radius


def _spring_eval_start(gen: torch.Generator) -> Tensor:
    """The paper's energy-metric starts: each component uniform in [-1, -0.2] or [0.2, 1]."""
    x0 = torch.rand(2, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    return x0 + 0.2 * torch.sign(x0)


def _pendulum_start(gen: torch.Generator) -> Tensor:
    y0 = torch.rand(2, generator=gen, dtype=torch.float64) * 2 - 1
    radius = float(torch.rand((), generator=gen, dtype=torch.float64)) + 1.3
    return y0 / y0.norm() * radius


def _two_body_start(gen: torch.Generator) -> Tensor:
    pos = torch.rand(2, generator=gen, dtype=torch.float64) * 1.0 + 0.5
    r = float(pos.norm())
    vel = pos.flip(0) / (2 * r ** 1.5)
    vel[0] = -vel[0]
    vel = vel * (1 + 0.05 * float(torch.randn((), generator=gen, dtype=torch.float64)))
    # layout (q_x1, q_x2, q_y1, q_y2, p_x1, p_x2, p_y1, p_y2), body 2 mirrored through the origin
    return torch.tensor([pos[0], -pos[0], pos[1], -pos[1], vel[0], -vel[0], vel[1], -vel[1]], dtype=torch.float64)


def _two_body_h(x: Tensor) -> Tensor:
    qx1, qx2, qy1, qy2 = x[..., 0], x[..., 1], x[..., 2], x[..., 3]
    kinetic = 0.5 * x[..., 4:].pow(2).sum(-1)
    return kinetic - 1.0 / torch.sqrt((qx1 - qx2) ** 2 + (qy1 - qy2) ** 2)


SYSTEMS: dict[str, System] = {
    "mass_spring": System("mass_spring", 2, lambda x: x[..., 0] ** 2 + x[..., 1] ** 2, _spring_start, 3.0, 30,
                          0.1, 0.5, 1e-4, None, 2.0, _spring_eval_start),
    "pendulum": System("pendulum", 2, lambda x: 2 * (1 - torch.cos(x[..., 0])) + x[..., 1] ** 2, _pendulum_start,
                       3.0, 45, 0.1, 0.5, 1e-4, None, 2.0),
    "two_body": System("two_body", 8, _two_body_h, _two_body_start, 20.0, 50, 0.0, 0.2, 0.0, 200, 1.0),
}


def make_dataset(system: System, trajectories: int, gen: torch.Generator) -> dict[str, Tensor]:
    """``x`` (noisy states), ``dx`` (exact derivatives at the clean states), per trajectory: shapes
    ``(trajectories, points, 2d)``; ``starts`` (clean initial states, ``(trajectories, 2d)``)."""
    starts = torch.stack([system.sample_start(gen) for _ in range(trajectories)])
    t = torch.linspace(0.0, system.t_span, system.points, dtype=torch.float64)
    field = system.field
    with torch.no_grad():
        clean = solve(lambda tt, y: field(y), starts, t, method="dopri8", rtol=1e-11, atol=1e-12).ys
    clean = clean.transpose(0, 1)  # (trajectories, points, 2d)
    dx = field(clean)
    x = clean + system.noise * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    return {"x": x, "dx": dx, "starts": starts, "t": t}


# ------------------------------------------------------------------------------------------------ models
def build_model(kind: str, system: System, hidden: int) -> torch.nn.Module:
    if kind == "hnn":
        return HNN(system.dim, hidden, "tanh")
    if kind == "lnn":
        return LNN(system.dim, hidden, "softplus", warn=False)
    if kind == "node":
        return DerivativeMLP(system.dim, hidden, "tanh")
    raise DemoError(f"unknown model {kind!r}; choose from {', '.join(MODELS)}")


def _to_lagrangian(system: System, x: Tensor) -> Tensor:
    d = system.dim // 2
    return torch.cat([x[..., :d], system.velocity_scale * x[..., d:]], -1)


def _from_lagrangian(system: System, v: Tensor) -> Tensor:
    d = system.dim // 2
    return torch.cat([v[..., :d], v[..., d:] / system.velocity_scale], -1)


def predict(kind: str, model: torch.nn.Module, system: System, x: Tensor) -> Tensor:
    """The model's ``dx/dt`` in ``(q, p)`` coordinates at states ``x`` (``(N, 2d)``)."""
    if kind != "lnn":
        return model.time_derivative(x)
    d = system.dim // 2
    v = _to_lagrangian(system, x)
    return torch.cat([v[..., d:], model.accelerations(v) / system.velocity_scale], -1)


def train_model(kind: str, model: torch.nn.Module, system: System, data: dict, steps: int, lr: float,
                gen: torch.Generator) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr, weight_decay=system.weight_decay)
    x = data["x_train"].float()
    dx = data["dx_train"].float()
    losses = []
    d = system.dim // 2
    for _ in range(steps):
        if system.batch is not None and system.batch < x.shape[0]:
            idx = torch.randperm(x.shape[0], generator=gen)[: system.batch]
            xb, dxb = x[idx], dx[idx]
        else:
            xb, dxb = x, dx
        if kind == "lnn":  # loss on qddot: the qdot half of the field is its input
            pred = model.accelerations(_to_lagrangian(system, xb))
            loss = (pred - system.velocity_scale * dxb[..., d:]).pow(2).mean()
        else:
            loss = (model.time_derivative(xb) - dxb).pow(2).mean()
        if not torch.isfinite(loss):
            raise DemoError(f"{system.name}/{kind}: the training loss became {float(loss)}; try another --seed.")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def rollout(kind: str, model: torch.nn.Module, system: System, starts: Tensor, t: Tensor) -> tuple[Tensor, str]:
    """Trajectories ``(len(t), trials, 2d)`` in ``(q, p)`` coordinates from ``starts`` (float64, dopri5 at rtol
    1e-9, at most 20,000 steps: a learned field whose orbit runs off the training states can turn stiff and stall
    the step size); a failed solve keeps its partial result (NaN rows) and its status."""
    m = model.double()
    y0 = _to_lagrangian(system, starts) if kind == "lnn" else starts
    with torch.no_grad():
        sol = solve(m, y0, t, method="dopri5", rtol=1e-9, atol=1e-9, max_steps=20_000, on_failure="return")
    ys = _from_lagrangian(system, sol.ys) if kind == "lnn" else sol.ys
    return ys, sol.status


# ------------------------------------------------------------------------------------------ experiments
def _hamiltonian_experiment(name: str, cfg: PhysicsConfig, out: Path, stream: Any) -> dict[str, Any]:
    system = SYSTEMS[name]
    budget = BUDGETS["quick" if cfg.quick else cfg.budget]
    steps = budget[name]
    trajectories = budget["two_body_orbits"] if name == "two_body" else 50
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = make_dataset(system, trajectories, gen)
    n_test = int(round(trajectories * system.test_split))
    # the paper's split: the first half of the trajectories train (1-d tasks), the first 20% test (two-body)
    test_idx = slice(trajectories - n_test, trajectories) if name != "two_body" else slice(0, n_test)
    train_idx = slice(0, trajectories - n_test) if name != "two_body" else slice(n_test, trajectories)
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    data.update(x_train=flat(data["x"][train_idx]), dx_train=flat(data["dx"][train_idx]),
                x_test=flat(data["x"][test_idx]), dx_test=flat(data["dx"][test_idx]))
    if system.eval_start is not None:
        starts = torch.stack([system.eval_start(gen) for _ in range(cfg.trials)])
    else:
        starts = data["starts"][test_idx][: cfg.trials]
    t_roll = torch.linspace(0.0, cfg.rollout_t, cfg.rollout_points, dtype=torch.float64)
    # the paper's notebooks integrate the models on t * (1 + 0.9 sigma) (the true energy is constant along any time)
    time_scale = 1.0 + 0.9 * system.noise
    e0 = system.hamiltonian(starts)
    result: dict[str, Any] = {
        "system": name, "steps": steps, "trajectories": trajectories, "points_per_trajectory": system.points,
        "noise_std": system.noise, "train_points": int(data["x_train"].shape[0]),
        "test_points": int(data["x_test"].shape[0]),
        "rollout": {"t_end": cfg.rollout_t, "trials": len(starts), "model_time_scale": time_scale},
        "models": {},
    }
    curves = {}
    for kind in [m for m in cfg.models.split(",") if m]:
        torch.manual_seed(cfg.seed)
        model = build_model(kind, system, cfg.hidden)
        t0 = time.perf_counter()
        n_steps = max(1, int(steps * budget["lnn_fraction"])) if kind == "lnn" else steps
        losses = train_model(kind, model, system, data, n_steps, cfg.lr, gen)
        train_s = time.perf_counter() - t0
        def mse(x: Tensor, dx: Tensor, kind: str = kind, model: torch.nn.Module = model) -> float:
            return float((predict(kind, model, system, x.float()).detach() - dx.float()).pow(2).mean())
        train_mse, test_mse = mse(data["x_train"], data["dx_train"]), mse(data["x_test"], data["dx_test"])
        t0 = time.perf_counter()
        ys, status = rollout(kind, model, system, starts, t_roll * time_scale)
        roll_s = time.perf_counter() - t0
        energy = system.hamiltonian(ys)  # (T, trials)
        err = (energy - e0).pow(2)
        valid = torch.isfinite(err)
        energy_mse = float(err[valid].mean()) if bool(valid.all()) else math.nan
        drift = float((energy[-1] - e0).abs().mean()) if bool(torch.isfinite(energy[-1]).all()) else math.nan
        result["models"][kind] = {
            "train_mse": train_mse, "test_mse": test_mse, "energy_mse": energy_mse,
            "energy_drift_end": drift, "rollout_status": status, "final_loss": losses[-1] if losses else None,
            "steps": n_steps, "train_seconds": round(train_s, 2), "rollout_seconds": round(roll_s, 2),
        }
        curves[kind] = (ys[:, 0].detach(), energy[:, 0].detach())
        print(f"{name:12s} {kind:5s} train {train_mse:.3e}  test {test_mse:.3e}  energy MSE {energy_mse:.3e}  "
              f"drift {drift:.3e}  ({train_s:.1f} s train, {roll_s:.1f} s rollout, {status})", file=stream)
    hnn, node = result["models"].get("hnn"), result["models"].get("node")
    if hnn and node and hnn["energy_mse"] > 0:
        result["energy_mse_ratio_node_over_hnn"] = node["energy_mse"] / hnn["energy_mse"]
    if cfg.plots:
        result["plots"] = _plot(system, out, t_roll * time_scale, float(e0[0]), curves, stream)
    return result


def run_mass_spring(cfg: PhysicsConfig, out: Path, stream: Any) -> dict[str, Any]:
    """Ideal mass-spring (the paper's task 1)."""
    return _hamiltonian_experiment("mass_spring", cfg, out, stream)


def run_pendulum(cfg: PhysicsConfig, out: Path, stream: Any) -> dict[str, Any]:
    """Ideal pendulum (the paper's task 2)."""
    return _hamiltonian_experiment("pendulum", cfg, out, stream)


def run_two_body(cfg: PhysicsConfig, out: Path, stream: Any) -> dict[str, Any]:
    """Two-body problem (the paper's task 4)."""
    return _hamiltonian_experiment("two_body", cfg, out, stream)


def run_bouncing_ball(cfg: PhysicsConfig, out: Path, stream: Any) -> dict[str, Any]:
    """Bouncing ball through events with a jump map: 10 bounce times vs the closed form, g and e learned from
    observed heights (:func:`neurodyn.demos.bouncing_ball.experiment`)."""
    from .bouncing_ball import experiment

    return experiment(out / "bouncing_ball", iters=60, seed=cfg.seed, plots=cfg.plots,
                      stream=stream)


#: The demo's sub-experiments, run in this order: name -> ``run(cfg, out_dir, stream) -> metrics dict``.
EXPERIMENTS: dict[str, Callable[[PhysicsConfig, Path, Any], dict[str, Any]]] = {
    "mass_spring": run_mass_spring,
    "pendulum": run_pendulum,
    "two_body": run_two_body,
    "bouncing_ball": run_bouncing_ball,
}


def _plot(system: System, out: Path, t: Tensor, e0: float, curves: dict, stream: Any) -> list[str]:
    try:
        from neurodyn import viz
    except ImportError as exc:  # pragma: no cover
        print(f"skipping plots: {exc}", file=stream)
        return []
    try:
        fig = viz.new_figure((8.0, 4.5))
    except ImportError as exc:  # viz.MissingMatplotlib
        print(f"skipping plots: {exc}", file=stream)
        return []
    ax = fig.subplots()
    ax.axhline(e0, color="k", lw=1.2, label="ground truth")
    for kind, (_, energy) in curves.items():
        ax.plot(t.numpy(), energy.numpy(), lw=1.2, label=kind.upper())
    ax.set_xlabel("t")
    ax.set_ylabel("true energy along the rollout")
    ax.set_title(f"{system.name}: energy drift")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths = [str(viz.save_figure(fig, out / f"energy_{system.name}.png"))]
    if system.dim == 2:
        fig = viz.new_figure((5.5, 5.0))
        ax = fig.subplots()
        for kind, (ys, _) in curves.items():
            ax.plot(ys[:, 0].numpy(), ys[:, 1].numpy(), lw=1.0, label=kind.upper())
        ax.set_xlabel("q")
        ax.set_ylabel("p")
        ax.set_title(f"{system.name}: phase space, t in [0, {float(t[-1]):g}]")
        ax.legend(fontsize=8)
        paths.append(str(viz.save_figure(fig, out / f"phase_{system.name}.png")))
    return paths


# --------------------------------------------------------------------------------------------------- run
def train(cfg: PhysicsConfig, stream: Any = sys.stdout) -> dict[str, Any]:
    """Run the selected experiments; return the metrics (also written to ``<out>/metrics.json``)."""
    names = [n for n in cfg.only.split(",") if n] or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise DemoError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    bad = [m for m in cfg.models.split(",") if m and m not in MODELS]
    if bad:
        raise DemoError(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"config": asdict(cfg), "python": platform.python_version(),
                               "torch": torch.__version__, "experiments": {}}
    for name in names:
        metrics["experiments"][name] = EXPERIMENTS[name](cfg, out, stream)
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n")
    print(f"wrote {out / 'metrics.json'}", file=stream)
    return metrics


def run(args: argparse.Namespace) -> int:
    train(config_from_args(args))
    return 0
