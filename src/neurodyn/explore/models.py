"""The explorer's models and the computations behind its two views.

Models: a Neural ODE and an Augmented Neural ODE fitted to the nested rings (the ``circles`` demo's data and
architecture), and a latent ODE fitted to the periodic toy (the ``latent`` demo's data and model class). Each comes
from the demo's saved run when there is one (``runs/circles``, ``runs/latent``: the demos write their weights), else
a built-in model: trained with a fixed seed and a fixed number of iterations (deterministic) the first time, its
weights cached in the user cache directory (:func:`default_cache_dir`) and loaded on later starts. Nothing is
downloaded.

Views:

* :func:`rings_state`: every display point of the rings flowed to time ``t`` by one model, projected on a fixed
  plane, and the accuracy at ``t`` of a linear classifier (least squares with a bias, on the state ``z(t)``, fitted
  on a separate set of points at each request).
* :func:`latent_posterior`: the latent ODE's posterior given the observations ``(t_i, x_i)`` of one series
  (amortised: one pass of the encoder, no training): the decoded posterior mean ``decoder(z(t))`` with
  ``z(0) = mean`` of ``q(z0 | x)``, and a band ``m(t) +- 2 s(t)`` from the mean and standard deviation of decoded
  posterior samples (a fixed seed, so equal inputs give equal outputs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data import compact, interpolation_mask, periodic_toy
from ..demos.circles import WEIGHTS as CIRCLES_WEIGHTS
from ..demos.circles import CirclesConfig, build_model, make_rings
from ..demos.latent import WEIGHTS as LATENT_WEIGHTS
from ..errors import InputError
from ..models import AugmentedNeuralODE, LatentODE
from ..solve import solve

CACHE_FORMAT = 1
RING_MODELS = ("node", "anode")


@dataclass(frozen=True)
class ExploreConfig:
    """What the built-in models are trained with (fixed seed and iteration counts: the same weights every time).

    The rings: ``n_fit`` training points, ``rings_iters`` Adam steps of ``batch`` points, MSE to the ±1 labels (as the
    ``circles`` demo). The latent ODE: ``latent_series`` periodic-toy series of ``latent_points`` times on
    ``[0, t_max]``, ``latent_iters`` Adam steps of ``latent_batch`` series showing half of their points in the window
    ``[0, H]``, reconstructing all of them; ``H`` grows linearly from 1 to ``t_max`` over the first ``grow_share`` of
    the steps (the latent demo's curriculum), while the KL weight is 0; it then rises linearly to 1.
    """

    seed: int = 0
    hidden: int = 32
    aug_dim: int = 3
    rings_iters: int = 300
    rings_lr: float = 3e-3
    n_fit: int = 1024
    n_display: int = 400
    n_linear: int = 1000
    batch: int = 128
    latent_series: int = 400
    latent_points: int = 40
    latent_iters: int = 800
    grow_share: float = 0.6
    latent_lr: float = 1e-2
    latent_batch: int = 50
    latent_size: int = 6
    latent_units: int = 40
    t_max: float = 5.0

    def key(self, part: str) -> str:
        """A short hash of what ``part`` ("rings" or "latent") is trained with and the cache format (its cache file's
        name)."""
        fields = {k: v for k, v in asdict(self).items() if k in ("seed", "t_max") or k.startswith(PART_FIELDS[part])
                  or k in PART_EXTRA[part]}
        text = json.dumps({"format": CACHE_FORMAT, "part": part, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


PART_FIELDS = {"rings": "rings_", "latent": "latent_"}
PART_EXTRA = {"rings": ("hidden", "aug_dim", "n_fit", "batch", "n_display"), "latent": ("grow_share",)}

QUICK = ExploreConfig(rings_iters=60, n_fit=256, latent_series=100, latent_iters=20)


def default_cache_dir() -> Path:
    """``$NEURODYN_CACHE_DIR``, else ``$XDG_CACHE_HOME/neurodyn``, else ``~/.cache/neurodyn``."""
    env = os.environ.get("NEURODYN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "neurodyn"


@dataclass
class RingsModel:
    """One rings classifier and what its view needs: the model, the fixed projection plane ``basis (D, 2)`` and the
    half-width ``extent`` of a square holding the projected points at every ``t`` in [0, 1]."""

    model: AugmentedNeuralODE
    basis: Tensor
    extent: float


@dataclass
class ExploreModels:
    """The trained models, the rings' display and linear-fit points, and where the weights came from."""

    config: ExploreConfig
    rings: dict[str, RingsModel]
    x_display: Tensor  # (n_display, 2)
    y_display: Tensor  # (n_display,) in ±1
    x_linear: Tensor  # (n_linear, 2): the points the linear classifier at t is fitted on
    y_linear: Tensor
    latent: LatentODE
    source: str  # per part: a demo's run, the cache, or trained at startup (and where it was cached)
    t_max: float  # the latent view's time span [0, t_max]
    train_seconds: dict[str, float] = field(default_factory=dict)  # the parts trained now


# --------------------------------------------------------------------------------------------------- building
def _rings_config(cfg: ExploreConfig) -> CirclesConfig:
    return CirclesConfig(hidden=cfg.hidden, aug_dim=cfg.aug_dim, method="dopri5", rtol=1e-3, atol=1e-3)


def _new_rings_model(cfg: ExploreConfig, name: str) -> AugmentedNeuralODE:
    torch.manual_seed(cfg.seed)
    aug = 0 if name == "node" else cfg.aug_dim
    return build_model(2, aug, cfg.hidden, _rings_config(cfg), out_dim=1)


def _new_latent_model(cfg: ExploreConfig) -> LatentODE:
    torch.manual_seed(cfg.seed)
    u = cfg.latent_units
    return LatentODE(1, latent_size=cfg.latent_size, rec_size=12, units=u, rec_units=u, gru_units=u,
                     encoder_steps=20, rtol=1e-3, atol=1e-3)


def _rings_data(cfg: ExploreConfig) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed)
    x_fit, y_fit = make_rings(cfg.n_fit, gen)
    x_display, y_display = make_rings(cfg.n_display, gen)
    x_linear, y_linear = make_rings(cfg.n_linear, gen)
    return {"x_fit": x_fit, "y_fit": y_fit, "x_display": x_display, "y_display": y_display,
            "x_linear": x_linear, "y_linear": y_linear}


def _train_rings(model: AugmentedNeuralODE, x: Tensor, y: Tensor, cfg: ExploreConfig) -> None:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.rings_lr)
    for _ in range(cfg.rings_iters):
        idx = torch.randint(0, x.shape[0], (min(cfg.batch, x.shape[0]),), generator=gen)
        loss = torch.mean((model(x[idx]).squeeze(-1) - y[idx]) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _train_latent(model: LatentODE, cfg: ExploreConfig) -> None:
    t, x = periodic_toy(cfg.latent_series, cfg.latent_points, cfg.t_max, 0.01, seed=cfg.seed)
    t = t[0]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 2)  # the posterior samples of the loss
    opt = torch.optim.Adam(model.parameters(), lr=cfg.latent_lr)
    grow = cfg.grow_share * cfg.latent_iters
    for it in range(cfg.latent_iters):
        horizon = 1.0 + (cfg.t_max - 1.0) * min(1.0, it / grow)
        keep = t <= horizon
        idx = torch.randint(0, x.shape[0], (min(cfg.latent_batch, x.shape[0]),), generator=gen)
        tw, xb = t[keep], x[idx][:, keep]
        full = torch.ones_like(xb)
        b = compact(tw, xb, interpolation_mask(full, 0.5, gen))
        kl = max(0.0, (it - grow) / (cfg.latent_iters - grow))
        out = model.loss(b.values, b.times, b.mask, tw, xb, full, n_samples=3, kl_weight=kl)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()


def _plane(model: AugmentedNeuralODE, x: Tensor) -> tuple[Tensor, float]:
    """An orthonormal plane ``(D, 2)`` of the state space: the read-out direction (the trained head's weight) and
    the direction orthogonal to it along which the states of ``x`` vary most over ``t`` in [0, 1]; and the largest
    absolute projected coordinate over those times (times 1.05)."""
    with torch.no_grad():
        zs = solve(lambda t, z: model.func(z), model.augment(x), torch.linspace(0.0, 1.0, 11),
                   method="dopri5", rtol=1e-3, atol=1e-3).ys  # (11, B, D)
        u = model.head.weight[0] / model.head.weight[0].norm()
        z = zs.reshape(-1, zs.shape[-1])
        rest = z - (z @ u)[:, None] * u[None, :]
        rest = rest - rest.mean(0)
        _, _, vh = torch.linalg.svd(rest, full_matrices=False)
        v = vh[0] - (vh[0] @ u) * u
        basis = torch.stack([u, v / v.norm()], 1)
        return basis, 1.05 * float((z @ basis).abs().max())


def _rings_from_run(run: Path, cfg: ExploreConfig) -> tuple[dict[str, AugmentedNeuralODE], str]:
    """The rings classifiers saved by ``neurodyn demo circles --out run`` (``rings_models.pt``, built as its
    ``metrics.json`` config says)."""
    demo = json.loads((run / "metrics.json").read_text())["config"]
    ccfg = CirclesConfig(hidden=int(demo["hidden"]), aug_dim=int(demo["aug_dim"]), method=str(demo["method"]),
                         rtol=float(demo["rtol"]), atol=float(demo["atol"]))
    state = torch.load(run / CIRCLES_WEIGHTS, weights_only=True)
    out = {}
    for name in RING_MODELS:
        aug = 0 if name == "node" else ccfg.aug_dim
        out[name] = build_model(2, aug, ccfg.hidden, ccfg, out_dim=1, augmentation=str(demo["augmentation"]))
        out[name].load_state_dict(state[name])
    return out, (f"rings: the circles demo's run {run} ({demo['iters']} iterations, hidden {ccfg.hidden}, ANODE "
                 f"+{ccfg.aug_dim} dims)")


def _latent_from_run(run: Path) -> tuple[LatentODE, float, str]:
    """The interpolation model saved by ``neurodyn demo latent --out run`` (``interpolation_model.pt``; the demo's
    model is ``LatentODE(1)``) and its data's time span."""
    demo = json.loads((run / "metrics.json").read_text())["config"]
    model = LatentODE(1)
    model.load_state_dict(torch.load(run / LATENT_WEIGHTS, weights_only=True))
    return model, float(demo["t_max"]), f"latent ODE: the latent demo's run {run}"


def _cached_or_trained(part: str, cfg: ExploreConfig, directory: Path, retrain: bool, build: Callable[[], Any],
                       train: Callable[[Any], None], say: Callable[[str], None]) -> tuple[Any, float | None, str]:
    """``build()``'s model(s) with the weights of ``<directory>/explore-<part>-<key>.pt``, or trained by ``train``
    and written there; returns the model(s), the training seconds (None when loaded) and a note."""
    path = directory / f"explore-{part}-{cfg.key(part)}.pt"
    label = "rings" if part == "rings" else "latent ODE"
    model = build()
    modules = model if isinstance(model, dict) else {"model": model}
    if path.is_file() and not retrain:
        try:
            state = torch.load(path, weights_only=True)
            for name, m in modules.items():
                m.load_state_dict(state["weights"][name])
            return model, None, (f"{label}: built in, loaded from the cache {path} (trained once with seed "
                                 f"{cfg.seed} in {state['seconds']:.0f} s)")
        except Exception as exc:  # noqa: BLE001 (any unreadable or mismatched file: train again)
            say(f"cache file {path} unreadable ({exc}); training again")
            model = build()
            modules = model if isinstance(model, dict) else {"model": model}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        train(model)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"format": CACHE_FORMAT, "config": asdict(cfg), "seconds": seconds,
                    "weights": {n: m.state_dict() for n, m in modules.items()}}, tmp)
        os.replace(tmp, path)
        where = f"cached to {path}"
    except OSError as exc:
        where = f"not cached ({exc.strerror or exc})"
    return model, seconds, f"{label}: built in, trained at startup in {seconds:.1f} s (seed {cfg.seed}), {where}"


def load_or_train(config: ExploreConfig | None = None, *, cache_dir: str | Path | None = None,
                  runs_dir: str | Path | None = None, retrain: bool = False,
                  log: Callable[[str], None] | None = None) -> ExploreModels:
    """The explorer's models.

    For each part, in this order: the demos' saved runs under ``runs_dir`` when given and present
    (``<runs_dir>/circles/rings_models.pt`` from ``neurodyn demo circles``, ``<runs_dir>/latent/interpolation_model.pt``
    from ``neurodyn demo latent``, each with its ``metrics.json``); else the built-in model from
    ``<cache_dir>/explore-<part>-<key>.pt`` (unless ``retrain``); else the built-in model trained now (deterministic:
    ``config.seed``) and written there. ``cache_dir=None`` uses :func:`default_cache_dir`; a directory that cannot be
    written only skips the write. ``log`` receives one-line progress messages; ``source`` of the result says where
    each part came from.

    >>> m = load_or_train(QUICK, cache_dir="/tmp/cache", log=print)  # doctest: +SKIP
    >>> sorted(m.rings), m.x_display.shape  # doctest: +SKIP
    (['anode', 'node'], torch.Size([400, 2]))
    """
    cfg = config if config is not None else ExploreConfig()
    say = log if log is not None else (lambda s: None)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data = _rings_data(cfg)
    seconds: dict[str, float] = {}
    notes: list[str] = []

    ring_models = None
    run = Path(runs_dir) / "circles" if runs_dir is not None else None
    if run is not None and (run / CIRCLES_WEIGHTS).is_file():
        try:
            ring_models, note = _rings_from_run(run, cfg)
            notes.append(note)
        except Exception as exc:  # noqa: BLE001 (a run of another version: fall back, saying why)
            say(f"cannot use {run / CIRCLES_WEIGHTS} ({exc}); using the built-in rings models")
    if ring_models is None:
        def train_rings(models: dict[str, AugmentedNeuralODE]) -> None:
            for name in RING_MODELS:
                say(f"training the rings {name.upper()} ({cfg.rings_iters} steps)...")
                _train_rings(models[name], data["x_fit"], data["y_fit"], cfg)

        ring_models, sec, note = _cached_or_trained(
            "rings", cfg, directory, retrain, lambda: {n: _new_rings_model(cfg, n) for n in RING_MODELS},
            train_rings, say)
        notes.append(note)
        if sec is not None:
            seconds["rings"] = sec

    latent = None
    t_max = cfg.t_max
    run = Path(runs_dir) / "latent" if runs_dir is not None else None
    if run is not None and (run / LATENT_WEIGHTS).is_file():
        try:
            latent, t_max, note = _latent_from_run(run)
            notes.append(note)
        except Exception as exc:  # noqa: BLE001
            say(f"cannot use {run / LATENT_WEIGHTS} ({exc}); using the built-in latent ODE")
    if latent is None:
        def train_latent(model: LatentODE) -> None:
            say(f"training the latent ODE ({cfg.latent_iters} steps; once, then cached)...")
            _train_latent(model, cfg)

        latent, sec, note = _cached_or_trained("latent", cfg, directory, retrain, lambda: _new_latent_model(cfg),
                                               train_latent, say)
        notes.append(note)
        if sec is not None:
            seconds["latent"] = sec

    for m in (*ring_models.values(), latent):
        m.eval()
        m.requires_grad_(False)
    rings = {name: RingsModel(m, *_plane(m, data["x_display"])) for name, m in ring_models.items()}
    return ExploreModels(cfg, rings, data["x_display"], data["y_display"], data["x_linear"], data["y_linear"],
                         latent, "; ".join(notes), t_max, seconds)


# ------------------------------------------------------------------------------------------------------ views
def flow(model: AugmentedNeuralODE, x: Tensor, t: float) -> Tensor:
    """``z(t)`` of the (augmented) ODE from ``z(0) = augment(x)``: ``x (B, in_dim) -> (B, in_dim + aug_dim)``.

    >>> f = torch.nn.Linear(3, 3)
    >>> model = AugmentedNeuralODE(f, in_dim=2, aug_dim=1, out_dim=1, autonomous=True)
    >>> flow(model, torch.ones(4, 2), 0.5).shape, flow(model, torch.ones(4, 2), 0.0)[0].tolist()
    (torch.Size([4, 3]), [1.0, 1.0, 0.0])
    """
    with torch.no_grad():
        z0 = model.augment(x)
        if t == 0.0:
            return z0
        return solve(lambda s, z: model.func(z), z0, torch.tensor([0.0, t], dtype=x.dtype), method="dopri5",
                     rtol=1e-3, atol=1e-3).ys[-1]


def linear_fit(z: Tensor, y: Tensor) -> Tensor:
    """Least-squares linear classifier with a bias: ``w (D + 1,)`` minimising ``||[z, 1] w - y||^2``.

    >>> z = torch.tensor([[0.0], [1.0], [2.0], [3.0]]); y = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    >>> w = linear_fit(z, y); bool(((torch.cat([z, torch.ones(4, 1)], 1) @ w >= 0) == (y > 0)).all())
    True
    """
    a = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1).double()
    return torch.linalg.lstsq(a, y.double()[:, None], driver="gelsd").solution[:, 0].to(z.dtype)


def rings_state(models: ExploreModels, name: str, t: float) -> dict[str, Any]:
    """The rings view of model ``name`` ("node" or "anode") at time ``t`` in [0, 1].

    Returns ``points`` (the display points' ``z(t)`` on the model's fixed plane, ``(n_display, 2)`` as lists),
    ``correct`` (each display point classified right by the linear classifier at ``t``), ``accuracy`` (its accuracy
    on the display points; it is fitted on the separate ``x_linear`` points) and ``state_dim``.
    """
    if name not in models.rings:
        raise InputError(f"unknown model {name!r}; choose one of {sorted(models.rings)}")
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise InputError(f"t must be in [0, 1], got {t}")
    rm = models.rings[name]
    n = models.x_display.shape[0]
    z = flow(rm.model, torch.cat([models.x_display, models.x_linear]), t)
    w = linear_fit(z[n:], models.y_linear)
    score = z[:n] @ w[:-1] + w[-1]
    correct = (score >= 0) == (models.y_display > 0)
    return {"model": name, "t": t, "state_dim": int(z.shape[1]), "points": (z[:n] @ rm.basis).tolist(),
            "correct": correct.tolist(), "accuracy": float(correct.float().mean())}


def latent_posterior(model: LatentODE, times: Tensor, values: Tensor, grid: Tensor, *, n_samples: int = 32,
                     seed: int = 0) -> dict[str, Tensor]:
    """Posterior of the latent ODE given one series' observations, decoded on ``grid``.

    ``times (K,)`` increasing (ties allowed) in ``[grid[0], grid[-1]]``, ``values (K,)``, ``grid (G,)`` increasing;
    ``K = 0`` gives the prior ``z0 ~ N(0, I)`` at ``grid[0]``. Returns ``mean (G,)`` (decoded posterior mean: the
    same as ``model(x, t, mask, grid, use_mean=True)``), ``lower``/``upper (G,)`` (``m +- 2 s`` of ``n_samples``
    decoded samples, drawn with a generator seeded by ``seed``), ``samples (n_samples, G)`` and ``z0_std (L,)``.

    >>> model = LatentODE(1, latent_size=2, rec_size=4, units=8, rec_units=8, gru_units=8)
    >>> grid = torch.linspace(0.0, 5.0, 11)
    >>> out = latent_posterior(model, torch.tensor([1.0, 2.5]), torch.tensor([0.5, 1.0]), grid, n_samples=4)
    >>> out["mean"].shape, out["samples"].shape, bool((out["upper"] >= out["lower"]).all())
    (torch.Size([11]), torch.Size([4, 11]), True)
    """
    with torch.no_grad():
        L = model.latent_size
        eps = torch.randn((n_samples, 1, L), generator=torch.Generator().manual_seed(seed), dtype=grid.dtype)
        t0 = grid[0]
        if times.numel() == 0:
            mean, std = torch.zeros(1, L, dtype=grid.dtype), torch.ones(1, L, dtype=grid.dtype)
        else:
            x = values.reshape(1, -1, 1).to(grid.dtype)
            mean, std, t0 = model.encode(x, times.to(grid.dtype), torch.ones_like(x), t0)
        z0 = torch.cat([mean[None], mean[None] + std[None] * eps])  # (1 + S, 1, L)
        pred = model.decode(z0, t0, grid)["pred"][:, 0, :, 0]  # (1 + S, G)
        samples = pred[1:]
        m, s = samples.mean(0), samples.std(0)
        return {"mean": pred[0], "lower": m - 2 * s, "upper": m + 2 * s, "samples": samples, "z0_std": std[0]}
