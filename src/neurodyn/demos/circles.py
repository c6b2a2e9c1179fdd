"""Nested rings: a Neural ODE against an Augmented Neural ODE (Dupont, Doucet & Teh, 2019).

Data (seeded): points of the plane, an inner disk ``|x| <= 0.5`` labelled -1 inside an outer ring
``1 <= |x| <= 1.5`` labelled +1.  Two classifiers ``y = head(z(1))``, ``z(0) = x`` (NODE) or
``z(0) = [x, 0, ..., 0]`` (ANODE, ``--aug-dim`` extra zeros), ``dz/dt = MLP(z)`` (same hidden width, same
optimiser, the same minibatches, the same number of iterations), fitted to the labels by MSE.

A 2-d ODE flow is a homeomorphism of the plane: trajectories cannot cross, so the disk stays enclosed by
the image of the ring and no line separates them.  The NODE can only get close by stretching the ring
through the gaps between the samples, with a stiffer flow (more function evaluations, NFE); the ANODE lifts
the disk out of the ring through the extra dimensions.  Reported: test accuracy and forward NFE per
training batch at the end of training (and the NFE over training).

Second experiment, the 1-d map ``g(-1) = 1, g(1) = -1``: a 1-d NODE with ``y = z(1)`` cannot represent it
(the two trajectories would have to cross; the best it can do is squeeze both to 0, MSE >= 1), while an
ANODE with one extra dimension (``y`` = first coordinate of ``z(1)``) fits it.

Outputs (in ``--out``, default ``runs/circles``): ``metrics.json``, ``rings_flows.png`` (decision regions,
trajectories, final features), ``rings_training.png`` (loss, NFE and accuracy over training),
``map1d.png`` and ``rings_models.pt`` (the two rings classifiers' state dicts; ``neurodyn explore`` loads them).

An evaluation solve that fails (a learned field that stiffens) does not stop the demo: its points count as
misclassified, ``eval_failures`` in ``metrics.json`` notes it, and training goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurodyn import AugmentedNeuralODE, solve
from neurodyn.demos._common import (
    POSITIVE,
    POSITIVE_INT,
    DemoError,
    add_out_and_seed,
    failure_note,
    failures_returned,
    json_safe,
    training_failure,
)
from neurodyn.demos._common import config_from_args as _config_from_args
from neurodyn.errors import SolveFailure
from neurodyn.progress import Progress
from neurodyn.solvers import available_methods

NAME = "circles"
DESCRIPTION = "nested rings and the 1-d map g(-1)=1, g(1)=-1: Neural ODE vs Augmented Neural ODE (accuracy, NFE)"

R_INNER, R_RING = 0.5, (1.0, 1.5)
WEIGHTS = "rings_models.pt"  # state dicts {"node": ..., "anode": ...} written to --out


# ----------------------------------------------------------------------------------------------- config
@dataclass
class CirclesConfig:
    iters: int = 1500
    seed: int = 0
    out: str = "runs/circles"
    quick: bool = False
    hidden: int = 32
    aug_dim: int = 5
    augmentation: str = "zero"
    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-3
    lr: float = 1e-3
    batch_size: int = 128
    n_train: int = 1024
    n_test: int = 2000
    evals: int = 10
    iters_1d: int = 200
    lr_1d: float = 1e-2
    threads: int = 1
    plots: bool = True
    grid: int = 150


QUICK = dict(iters=60, iters_1d=30, n_train=256, n_test=512, evals=2, grid=40)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = CirclesConfig()
    add_out_and_seed(parser, d.out, d.seed)
    parser.add_argument("--iters", type=POSITIVE_INT, default=None, metavar="N",
                        help=f"training iterations per rings model (default: {d.iters}; --quick: {QUICK['iters']})")
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds' smoke run (fewer iterations and points; numbers not meaningful)")
    parser.add_argument("--hidden", type=POSITIVE_INT, default=d.hidden,
                        help=f"hidden width of both vector fields (default: {d.hidden})")
    parser.add_argument("--aug-dim", type=POSITIVE_INT, default=d.aug_dim,
                        help=f"extra dimensions of the ANODE on the rings (default: {d.aug_dim})")
    parser.add_argument("--augmentation", choices=("zero", "learned"), default=d.augmentation,
                        help=f"ANODE augmentation (default: {d.augmentation})")
    parser.add_argument("--method", default=d.method, choices=available_methods(), metavar="METHOD",
                        help=f"ODE solver (default: {d.method})")
    parser.add_argument("--rtol", type=POSITIVE, default=d.rtol, help=f"solver rtol (default: {d.rtol:g})")
    parser.add_argument("--atol", type=POSITIVE, default=d.atol, help=f"solver atol (default: {d.atol:g})")
    parser.add_argument("--lr", type=POSITIVE, default=d.lr, help=f"Adam learning rate (default: {d.lr:g})")
    parser.add_argument("--iters-1d", type=POSITIVE_INT, default=None, metavar="N",
                        help=f"iterations of the 1-d map experiment (default: {d.iters_1d})")
    parser.add_argument("--threads", type=POSITIVE_INT, default=d.threads,
                        help=f"torch CPU threads (default: {d.threads}: the problems are tiny)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")


def config_from_args(args: argparse.Namespace) -> CirclesConfig:
    return _config_from_args(CirclesConfig, args, QUICK)


# ------------------------------------------------------------------------------------------------- data
def make_rings(n: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points (half in the disk, half in the ring), uniform in area: ``x`` (n, 2), labels (n,) in ±1."""
    n_in = n // 2
    n_out = n - n_in
    r_in = R_INNER * torch.sqrt(torch.rand(n_in, generator=gen, dtype=torch.float64))
    lo, hi = R_RING
    r_out = torch.sqrt(lo**2 + (hi**2 - lo**2) * torch.rand(n_out, generator=gen, dtype=torch.float64))
    r = torch.cat([r_in, r_out])
    angle = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], -1)
    y = torch.cat([-torch.ones(n_in, dtype=torch.float64), torch.ones(n_out, dtype=torch.float64)])
    perm = torch.randperm(n, generator=gen)
    return x[perm].to(dtype), y[perm].to(dtype)


# ----------------------------------------------------------------------------------------------- models
class MLPField(nn.Module):
    """Autonomous vector field ``dz/dt = MLP(z)``: two hidden ReLU layers of ``hidden`` units."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def build_model(in_dim: int, aug_dim: int, hidden: int, cfg: CirclesConfig, *, out_dim: int | None,
                augmentation: str = "zero") -> AugmentedNeuralODE:
    """``aug_dim=0`` is the plain NODE (the same class, so the two differ only in the state dimension)."""
    return AugmentedNeuralODE(MLPField(in_dim + aug_dim, hidden), in_dim, aug_dim, augmentation=augmentation,
                              out_dim=out_dim, method=cfg.method, rtol=cfg.rtol, atol=cfg.atol, autonomous=True)


def trajectory(model: AugmentedNeuralODE, x: torch.Tensor, steps: int = 41) -> torch.Tensor:
    """States of the augmented ODE at ``steps`` times in [0, 1]: shape (steps, B, in_dim + aug_dim)."""
    ts = torch.linspace(0.0, 1.0, steps, dtype=x.dtype)
    with torch.no_grad():
        z0 = model.augment(x)
        sol = solve(lambda t, z: model.func(z), z0, ts, method=model.ode.method, rtol=model.ode.rtol,
                    atol=model.ode.atol, on_failure="return")  # for plots: NaN past a failure
    return sol.ys


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------------------------- training
def train_classifier(name: str, model: AugmentedNeuralODE, data: dict[str, torch.Tensor], cfg: CirclesConfig,
                     stream: Any) -> dict[str, Any]:
    """Fit ``model`` to the rings labels by MSE; return its metrics and history."""
    x_tr, y_tr, x_te, y_te = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same minibatches for every model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses: list[float] = []
    nfes: list[int] = []
    eval_iters: list[int] = []
    eval_acc: list[float] = []
    eval_every = max(cfg.iters // max(cfg.evals, 1), 1)
    eval_failures: list[str] = []

    def accuracy(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[float, float, int]:
        """Accuracy, MSE and NFE on ``(x, y)``; a failed solve (noted) counts every point as wrong, MSE NaN."""
        with torch.no_grad(), failures_returned(model) as failed:
            out = model(x).squeeze(-1)
            sol = failed()
        if sol is not None:
            eval_failures.append(f"{what}: {failure_note(sol)}")
            return 0.0, float("nan"), model.nfe_forward
        acc = float((torch.where(out >= 0, 1.0, -1.0) == y).float().mean())
        return acc, float(torch.mean((out - y) ** 2)), model.nfe_forward

    t0 = time.perf_counter()
    bar = Progress(cfg.iters, desc=f"rings {name}", stream=stream)
    for it in range(1, cfg.iters + 1):
        idx = torch.randint(0, x_tr.shape[0], (min(cfg.batch_size, x_tr.shape[0]),), generator=gen)
        opt.zero_grad(set_to_none=True)
        try:
            out = model(x_tr[idx]).squeeze(-1)
        except SolveFailure as exc:
            bar.close()
            raise training_failure(f"rings {name}, iteration {it}", exc) from exc
        nfes.append(model.nfe_forward)
        loss = torch.mean((out - y_tr[idx]) ** 2)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            bar.close()
            raise DemoError(f"rings {name}: training diverged at iteration {it}; try a lower --lr")
        if it % eval_every == 0 or it == cfg.iters:
            eval_iters.append(it)
            eval_acc.append(accuracy(x_te, y_te, f"iteration {it}, test set")[0])
            bar.update(loss=losses[-1], nfe=nfes[-1], test_acc=eval_acc[-1])
        else:
            bar.update(loss=losses[-1], nfe=nfes[-1])
    bar.close()
    seconds = time.perf_counter() - t0

    acc, mse, nfe_test = accuracy(x_te, y_te, "final, test set")
    train_acc, _, _ = accuracy(x_tr, y_tr, "final, training set")
    tail = max(len(nfes) // 10, 1)
    return {
        "accuracy": acc,
        "nfe": sum(nfes[-tail:]) / tail,
        "nfe_kind": f"mean forward NFE per training batch ({cfg.batch_size} points) over the last {tail} iterations",
        "nfe_first": sum(nfes[:tail]) / tail,
        "nfe_max": max(nfes),
        "nfe_test_batch": nfe_test,
        "test_mse": mse,
        "train_accuracy": train_acc,
        "final_train_loss_tail_mean": sum(losses[-tail:]) / tail,
        "state_dim": model.state_dim,
        "params": n_params(model),
        "train_seconds": seconds,
        "eval_iters": eval_iters,
        "eval_accuracy": eval_acc,
        "eval_failures": eval_failures,
        "loss_history": losses,
        "nfe_history": nfes,
    }


def train_map1d(name: str, model: AugmentedNeuralODE, cfg: CirclesConfig, stream: Any) -> dict[str, Any]:
    """Fit ``g(-1) = 1, g(1) = -1`` with the prediction = first coordinate of ``z(1)``."""
    x = torch.tensor([[-1.0], [1.0]])
    y = -x
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr_1d)
    losses: list[float] = []
    nfes: list[int] = []
    bar = Progress(cfg.iters_1d, desc=f"1-d map {name}", stream=stream)
    t0 = time.perf_counter()
    for it in range(1, cfg.iters_1d + 1):
        opt.zero_grad(set_to_none=True)
        try:
            loss = torch.mean((model(x)[:, :1] - y) ** 2)
        except SolveFailure as exc:
            bar.close()
            raise training_failure(f"1-d map {name}, iteration {it}", exc) from exc
        loss.backward()
        opt.step()
        losses.append(loss.item())
        nfes.append(model.nfe_forward)
        bar.update(loss=losses[-1], nfe=nfes[-1])
    bar.close()
    with torch.no_grad(), failures_returned(model) as failed:
        pred = model(x)[:, 0]  # NaN if the solve failed (then noted)
        sol = failed()
        final = float(torch.mean((pred - y[:, 0]) ** 2))
    tail = max(len(losses) // 10, 1)
    return {
        "final_loss": final,
        "min_loss": min(losses),
        "loss_tail_mean": sum(losses[-tail:]) / tail,
        "pred_at_minus1": float(pred[0]),
        "pred_at_plus1": float(pred[1]),
        "nfe": sum(nfes[-tail:]) / tail,
        "state_dim": model.state_dim,
        "train_seconds": time.perf_counter() - t0,
        "loss_history": losses,
        "eval_failures": [] if sol is None else [f"final: {failure_note(sol)}"],
    }


# -------------------------------------------------------------------------------------------------- run
def train(cfg: CirclesConfig, *, stream: Any = None) -> dict[str, Any]:
    """Run both experiments; return the metrics dict (also written to ``<out>/metrics.json``)."""
    stream = stream if stream is not None else sys.stdout
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        gen = torch.Generator().manual_seed(cfg.seed)
        x_tr, y_tr = make_rings(cfg.n_train, gen)
        x_te, y_te = make_rings(cfg.n_test, gen)
        data = {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
        print(f"neurodyn demo circles: rings {cfg.n_train} train / {cfg.n_test} test points, {cfg.iters} "
              f"iterations per model, hidden={cfg.hidden}, ANODE +{cfg.aug_dim} dims ({cfg.augmentation}), "
              f"{cfg.method} rtol={cfg.rtol:g} atol={cfg.atol:g}, seed={cfg.seed}, out={out}", file=stream)

        models: dict[str, AugmentedNeuralODE] = {}
        results: dict[str, dict[str, Any]] = {}
        for name, aug in (("node", 0), ("anode", cfg.aug_dim)):
            torch.manual_seed(cfg.seed)
            models[name] = build_model(2, aug, cfg.hidden, cfg, out_dim=1, augmentation=cfg.augmentation)
            results[name] = train_classifier(name, models[name], data, cfg, stream)

        map_models: dict[str, AugmentedNeuralODE] = {}
        map_results: dict[str, dict[str, Any]] = {}
        for name, aug in (("node", 0), ("anode", 1)):
            torch.manual_seed(cfg.seed)
            map_models[name] = build_model(1, aug, cfg.hidden, cfg, out_dim=None)
            map_results[name] = train_map1d(name, map_models[name], cfg, stream)

        node, anode = results["node"], results["anode"]
        targets = {
            "anode_accuracy_ge_0.99": anode["accuracy"] >= 0.99,
            "anode_fewer_nfe_than_node": anode["nfe"] < node["nfe"],
            "anode_beats_node": anode["accuracy"] > node["accuracy"]
            or (anode["accuracy"] == node["accuracy"] and anode["nfe"] < node["nfe"]),
            "map1d_node_loss_stays_high": map_results["node"]["loss_tail_mean"] >= 0.9,
            "map1d_anode_fits": map_results["anode"]["final_loss"] < 1e-2,
        }

        # the trained rings classifiers, for `neurodyn explore` (its continuous-depth view loads them)
        torch.save({name: m.state_dict() for name, m in models.items()}, out / WEIGHTS)

        plots: list[str] = []
        if cfg.plots:
            plots = _make_plots(cfg, out, data, models, results, map_models, map_results, stream)

        metrics: dict[str, Any] = {
            "demo": NAME,
            "node": _summary(node),
            "anode": _summary(anode),
            "map1d": {
                "node": _summary(map_results["node"]),
                "anode": _summary(map_results["anode"]),
                "node_loss_lower_bound": 1.0,
                "note": "1-d NODE: y = z(1), trajectories from -1 and 1 cannot cross, so MSE >= 1 (both -> 0); "
                        "ANODE: y = first coordinate of z(1) in 2-d",
            },
            "targets": targets,
            "data": {"inner_radius": R_INNER, "ring": list(R_RING), "n_train": cfg.n_train, "n_test": cfg.n_test},
            "history": {
                name: {k: r[k] for k in ("loss_history", "nfe_history", "eval_iters", "eval_accuracy")}
                for name, r in results.items()
            },
            "history_map1d": {name: r["loss_history"] for name, r in map_results.items()},
            "iterations": cfg.iters,
            "wall_seconds": None,  # filled in below, just before writing
            "cpu_seconds": None,  # process CPU time (user + sys): steadier than wall time on a busy machine
            "seed": cfg.seed,
            "config": asdict(cfg),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python_version": platform.python_version(),
            "machine": platform.machine(),
            "plots": plots,
        }
    finally:
        torch.set_num_threads(old_threads)

    metrics["wall_seconds"] = time.perf_counter() - wall0
    metrics["cpu_seconds"] = time.process_time() - cpu0
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n")
    m1 = metrics["map1d"]
    print(f"done in {metrics['wall_seconds']:.1f}s (CPU {metrics['cpu_seconds']:.1f}s)\n"
          f"  rings NODE : accuracy {node['accuracy']:.4f}, {node['nfe']:.1f} NFE/batch (end), "
          f"{node['nfe_first']:.1f} (start)\n"
          f"  rings ANODE: accuracy {anode['accuracy']:.4f}, {anode['nfe']:.1f} NFE/batch (end), "
          f"{anode['nfe_first']:.1f} (start)\n"
          f"  1-d map    : NODE loss {m1['node']['final_loss']:.4f} (>= 1 is forced), "
          f"ANODE loss {m1['anode']['final_loss']:.2e}\n"
          f"  targets    : " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in targets.items()), file=stream)
    print(f"wrote {out / 'metrics.json'}" + "".join(f", {p}" for p in plots), file=stream)
    return metrics


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if not k.endswith("_history") and k not in ("eval_iters", "eval_accuracy")}


# ------------------------------------------------------------------------------------------------ plots
def _make_plots(cfg, out, data, models, results, map_models, map_results, stream) -> list[str]:
    try:
        from neurodyn import viz

        paths = [
            _plot_flows(cfg, out / "rings_flows.png", data, models, results, viz),
            _plot_training(cfg, out / "rings_training.png", results, viz),
            _plot_map1d(cfg, out / "map1d.png", map_models, map_results, viz),
        ]
    except ImportError as exc:  # viz.MissingMatplotlib is an ImportError
        print(f"skipping plots: {exc}", file=stream)
        return []
    return [str(p) for p in paths]


def _class_colors(y):
    return ["C0" if v < 0 else "C3" for v in y.tolist()]


def _plot_flows(cfg, path, data, models, results, viz) -> Path:
    import numpy as np

    x_te, y_te = data["x_test"], data["y_test"]
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    pick = torch.cat([torch.nonzero(y_te < 0)[:, 0][torch.randperm(int((y_te < 0).sum()), generator=gen)[:30]],
                      torch.nonzero(y_te > 0)[:, 0][torch.randperm(int((y_te > 0).sum()), generator=gen)[:45]]])
    xs = np.linspace(-2.0, 2.0, cfg.grid)
    X, Y = np.meshgrid(xs, xs)
    grid = torch.tensor(np.stack([X.ravel(), Y.ravel()], -1), dtype=x_te.dtype)

    fig = viz.new_figure((14.0, 9.0))
    axes = fig.subplots(2, 3)
    for row, (name, model) in enumerate(models.items()):
        r = results[name]
        label = "NODE (2-d)" if name == "node" else f"ANODE (2+{model.aug_dim}-d)"
        with torch.no_grad(), failures_returned(model):  # plots: NaN (blank) where a solve failed
            score = model(grid).squeeze(-1).reshape(X.shape).numpy()
        ax = axes[row, 0]
        ax.contourf(X, Y, score, levels=[-1e9, 0.0, 1e9], colors=["#cfe0f3", "#f6d2cf"], alpha=0.9)
        ax.contour(X, Y, score, levels=[0.0], colors="k", linewidths=1.0)
        ax.scatter(x_te[:, 0], x_te[:, 1], c=_class_colors(y_te), s=3, alpha=0.6)
        ax.set_title(f"{label}: decision regions, test acc {r['accuracy']:.3f}")
        ax.set_aspect("equal")

        traj = trajectory(model, x_te[pick]).numpy()  # (T, n, D)
        ax = axes[row, 1]
        colors = _class_colors(y_te[pick])
        for j in range(traj.shape[1]):
            ax.plot(traj[:, j, 0], traj[:, j, 1], color=colors[j], lw=0.7, alpha=0.7)
        ax.scatter(traj[0, :, 0], traj[0, :, 1], c=colors, s=8, marker="o", label="z(0)")
        ax.scatter(traj[-1, :, 0], traj[-1, :, 1], c=colors, s=14, marker="x", label="z(1)")
        ax.set_title(f"{label}: trajectories, first 2 coordinates\n(end-of-training NFE/batch {r['nfe']:.1f})")
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_aspect("equal", adjustable="datalim")

        with torch.no_grad(), failures_returned(model):
            z1 = model.ode(model.augment(x_te))
        ax = axes[row, 2]
        if not bool(torch.isfinite(z1).all()):  # the solve failed: no features to show
            ax.set_title(f"{label}: final features z(1): the solve failed")
            continue
        w = model.head.weight[0].detach()
        b = float(model.head.bias.detach()[0])
        s = (z1 @ w + b).numpy()
        w_hat = w / w.norm()
        rest = z1 - (z1 @ w_hat)[:, None] * w_hat[None, :]
        rest = rest - rest.mean(0)
        _, _, v = torch.linalg.svd(rest, full_matrices=False)
        o = (rest @ v[0]).numpy()
        ax.scatter(s, o, c=_class_colors(y_te), s=3, alpha=0.6)
        ax.axvline(0.0, color="k", lw=1.0)
        ax.set_title(f"{label}: final features z(1)")
        ax.set_xlabel("read-out  w·z(1) + b")
        ax.set_ylabel("main orthogonal direction")
    fig.suptitle(f"nested rings (blue: disk, -1; red: ring, +1), {cfg.iters} iterations, seed {cfg.seed}")
    return viz.save_figure(fig, path)


def _plot_training(cfg, path, results, viz) -> Path:
    import numpy as np

    fig = viz.new_figure((14.0, 4.0))
    axes = fig.subplots(1, 3)
    for name, r in results.items():
        color = "C1" if name == "node" else "C2"
        label = "NODE" if name == "node" else "ANODE"
        it = np.arange(1, len(r["loss_history"]) + 1)
        for ax, key in ((axes[0], "loss_history"), (axes[1], "nfe_history")):
            vals = np.asarray(r[key], dtype=float)
            ax.plot(it, vals, color=color, lw=0.5, alpha=0.3)
            k = max(len(vals) // 50, 1)
            if len(vals) >= 2 * k and k > 1:
                ax.plot(it[k - 1:], np.convolve(vals, np.ones(k) / k, mode="valid"), color=color, lw=1.6,
                        label=f"{label} ({k}-iter mean)")
            else:
                ax.plot(it, vals, color=color, lw=1.6, label=label)
        axes[2].plot(r["eval_iters"], r["eval_accuracy"], "o-", color=color, ms=4, label=label)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (MSE)")
    axes[1].set_title("forward NFE per batch")
    axes[2].set_title("test accuracy")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return viz.save_figure(fig, path)


def _plot_map1d(cfg, path, map_models, map_results, viz) -> Path:
    import numpy as np

    x0 = torch.linspace(-1.5, 1.5, 13)[:, None]
    x0 = torch.cat([x0, torch.tensor([[-1.0], [1.0]])])
    fig = viz.new_figure((16.0, 4.0))
    axes = fig.subplots(1, 4)
    ts = np.linspace(0.0, 1.0, 41)
    for ax, name in ((axes[0], "node"), (axes[1], "anode")):
        traj = trajectory(map_models[name], x0).numpy()
        for j in range(traj.shape[1]):
            special = j >= traj.shape[1] - 2
            ax.plot(ts, traj[:, j, 0], color=("C0" if x0[j, 0] < 0 else "C3") if special else "0.7",
                    lw=2.0 if special else 0.8)
        ax.plot([1.0, 1.0], [1.0, -1.0], "k*", ms=10, label="targets g(-1)=1, g(1)=-1")
        ax.set_xlabel("t")
        ax.set_ylabel("z1(t)")
        ax.set_title(("NODE (1-d): " if name == "node" else "ANODE (1+1-d): ")
                     + f"loss {map_results[name]['final_loss']:.3g}")
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
        if name == "anode":
            ax3 = axes[2]
            for j in range(traj.shape[1]):
                special = j >= traj.shape[1] - 2
                ax3.plot(traj[:, j, 0], traj[:, j, 1],
                         color=("C0" if x0[j, 0] < 0 else "C3") if special else "0.7", lw=2.0 if special else 0.8)
            ax3.set_xlabel("z1 (read out)")
            ax3.set_ylabel("z2 (augmented)")
            ax3.set_title("ANODE: the trajectories go round each other")
            ax3.grid(alpha=0.3)
    for name, r in map_results.items():
        axes[3].plot(np.arange(1, len(r["loss_history"]) + 1), r["loss_history"],
                     color="C1" if name == "node" else "C2", label=name.upper())
    axes[3].axhline(1.0, color="k", ls=":", lw=1.0, label="NODE lower bound (1)")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("iteration")
    axes[3].set_title("1-d map: training loss")
    axes[3].legend(fontsize=8)
    axes[3].grid(alpha=0.3, which="both")
    return viz.save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    train(config_from_args(args))
    return 0
