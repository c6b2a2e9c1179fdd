"""neurodyn vs torchsde on neural SDEs, side by side in one process (one thread; run it on one core).

Problem: a 64-d MLP drift (64 -> 128 -> 64, tanh) with a diagonal MLP diffusion (64 -> 128 -> 64, sigmoid times 0.2),
batch 512, float32, t in [0, 1], dt = 0.01, outputs at t = 0 and 1. Both libraries integrate the SAME Brownian path:
one ``neurodyn.paths.BrownianInterval`` (torchsde accepts its ``bm(ta, tb, return_U=...)`` call form), so they solve
the same discrete problem and their errors against a reference (the same method at dt / 16 on that path, float64) are
printed beside the times.

Sections (``--sections``):

* ``forward``: one solve under ``torch.no_grad()`` (euler, milstein [Ito], srk [Ito], reversible_heun [Stratonovich]),
  eager and ``compile=True`` (the compiled driven loop, ``neurodyn.compile.driven``, where its timing says it pays;
  ``compiled_path`` in the row);
* ``train``: one training step, ``loss = mean(y(1)^2)``, backward through the solver (direct backpropagation), eager
  and ``compile=True`` (compiled blocks of steps under autograd, ``neurodyn.compile.driven``, where the policy's
  timing of forward and backward says they pay; the gradients' largest relative difference from eager's in the row;
  the ``adjoint`` section: ``gradient="adjoint"`` vs ``torchsde.sdeint_adjoint``, reversible Heun's exact adjoint
  and the stochastic adjoint with midpoint, eager and ``compile=True`` (the forward solve as the compiled driven
  loop where the policy picks it; the backward solve eager));
* ``compiled``: an Euler loop whose step (drift and diffusion inside) is ``torch.compile``d vs the same loop eager,
  neurodyn and torchsde (what a compiled SDE step could give on this CPU);
* ``bound``: what bounds Euler's forward speed-up: whole solves (torchsde, neurodyn, neurodyn ``compile=True``)
  against loops doing part of the work (the eager step on precomputed increments; the four products with ``tanh``
  and ``sigmoid``; the products alone) and the per-operation cost of a step's pieces;
* ``latent``: one training step of ``neurodyn.models.LatentSDE`` (3-d data, 4 latent dims, context 64, hidden 64,
  batch 256, 50 observation times on [0, 1], dt = 0.02, Euler) against torchsde's ``sdeint(..., logqp=True)`` on the
  same networks (the same encoder, drifts, diffusion and decoder; torchsde integrates ``logqp`` itself);
* ``adaptive``: the latent SDE's posterior solve (Milstein, diagonal noise, 32 series of 21 times, float64; the model
  first trained for ``--adaptive-iters`` Adam steps on 128 series, 0: untrained): fixed dt from 1/8 to
  1/256 vs adaptive step doubling at rtol = atol from 1e-1 to 1e-4, strong error (mean over series of the max-norm
  at the final time, against dt = 1/4096 on the same path: one BrownianInterval object for all solves) vs drift
  evaluations (``stats['nfe']``: every drift evaluation of the solve, the step-doubling halves included; diffusion
  evaluations beside them), adaptive with the embedded error estimate and with step doubling (adaptive posterior
  solves land on the observation times, where the drift's context jumps; the fixed-step rows are given both without
  and with that landing); errors also over all observation times (``strong_error_all_times``: the mean over times;
  ``strong_error_path``: the mean over series of the largest over times); doubling with the
  error norm over every channel (``z`` and ``logqp``, LatentSDE's norm before it controlled ``z`` only); and the
  true local error's profile over the observation intervals with fixed grids shaped by it (uniform, equal local
  error per step, between: what any step-size distribution could gain); then ``srk`` (space-time Levy area, its
  own reference at dt = 1/8192): fixed dt and adaptive with both estimates.

Timings: entries run round-robin (one call of each per repeat), the median over repeats of wall time; the figure
reported is the ratio torchsde / neurodyn (> 1: neurodyn faster). Usage:

    taskset -c 1 .venv/bin/python benchmarks/bench_sde.py [--repeats 7] [--sections forward,train,latent,adaptive]
        [--clock cpu]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchsde
from torch import nn

import neurodyn
from neurodyn.models import LatentSDE
from neurodyn.paths import BrownianInterval

DIM, HIDDEN, BATCH, DT = 64, 128, 512, 0.01
METHODS = {"euler": "ito", "milstein": "ito", "srk": "ito", "reversible_heun": "stratonovich"}
LEVY = {"srk": "space-time"}


class MLPSDE(nn.Module):
    """``f(y) = MLP(y)``, ``g(y) = 0.2 sigmoid(MLP(y))`` (diagonal): torchsde's interface (``f``, ``g``)."""

    noise_type = "diagonal"

    def __init__(self, sde_type: str = "ito", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.sde_type = sde_type
        self.drift = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DIM))
        self.diff = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DIM))

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.drift(y)

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.2 * torch.sigmoid(self.diff(y))


# --clock: wall time (time.perf_counter), or the thread's CPU time (time.thread_time: on a machine shared with other
# processes it leaves out the time slices others took during a run).
CLOCK = [time.perf_counter]


def _median_times(entries: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in entries}
    clock = CLOCK[0]
    for fn in entries.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in entries.items():
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _nd(sde: MLPSDE, y0: torch.Tensor, ts: torch.Tensor, bm: BrownianInterval, method: str, dt: float,
        **kw) -> torch.Tensor:
    term = neurodyn.sde_term(sde.f, sde.g, bm, noise="diagonal", sde_type=sde.sde_type)
    return neurodyn.solve(term, y0, ts, method=method, step_size=dt, **kw).ys


def _ts(sde: MLPSDE, y0: torch.Tensor, ts: torch.Tensor, bm: BrownianInterval, method: str, dt: float,
        **kw) -> torch.Tensor:
    return torchsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=dt, **kw)


def section_solver(repeats: int, train: bool) -> list[dict]:
    rows = []
    ts = torch.tensor([0.0, 1.0])
    g = torch.Generator().manual_seed(1)
    y0 = torch.randn(BATCH, DIM, generator=g)
    for method, sde_type in METHODS.items():
        sde = MLPSDE(sde_type)
        bm = BrownianInterval(0.0, 1.0, shape=(BATCH, DIM), dtype=torch.float32, entropy=5,
                              levy_area=LEVY.get(method, "none"), cache_size=None)
        # Errors against the same method at dt / 16 on the same path, in float64.
        with torch.no_grad():
            sde64 = MLPSDE(sde_type).double()
            bm64 = BrownianInterval(0.0, 1.0, shape=(BATCH, DIM), dtype=torch.float64, entropy=5,
                                    levy_area=LEVY.get(method, "none"), cache_size=None)
            ref = _nd(sde64, y0.double(), ts.double(), bm64, method, DT / 16)[-1]
            err_nd = float((_nd(sde64, y0.double(), ts.double(), bm64, method, DT)[-1] - ref).abs().mean())
            err_ts = float((_ts(sde64, y0.double(), ts.double(), bm64, method, DT)[-1] - ref).abs().mean())

        if train:
            def run(fn: Callable, _sde=sde, _bm=bm, _m=method) -> None:
                _sde.zero_grad()
                fn(_sde, y0, ts, _bm, _m, DT)[-1].pow(2).mean().backward()
        else:
            def run(fn: Callable, _sde=sde, _bm=bm, _m=method) -> None:
                with torch.no_grad():
                    fn(_sde, y0, ts, _bm, _m, DT)

        def floor(_sde=sde) -> None:
            # The 100 drift + diffusion evaluations of an Euler solve and nothing else: the bound on any speedup.
            with torch.no_grad():
                y = y0
                for _ in range(100):
                    y = y + _sde.f(None, y) * DT + _sde.g(None, y) * 0.1

        entries = {"neurodyn": lambda: run(_nd), "torchsde": lambda: run(_ts)}
        extra = {}
        if train:
            # compile=True under autograd: compiled blocks of steps (neurodyn.compile.driven), where the policy's
            # timing of forward and backward says they pay; gradients against the eager solve's
            grads = []
            for comp in (True, False):
                sde.zero_grad()
                sol = neurodyn.solve(neurodyn.sde_term(sde.f, sde.g, bm, noise="diagonal", sde_type=sde.sde_type),
                                     y0, ts, method=method, step_size=DT, compile=comp)
                sol.ys[-1].pow(2).mean().backward()
                grads.append([p.grad.clone() for p in sde.parameters()])
                if comp:
                    extra = {"compiled_path": sol.stats.get("compiled"),
                             "compile_reason": sol.stats.get("compile_reason")}
            extra["compiled_grad_max_rel_diff"] = max(float((a - b).abs().max() / b.abs().max())
                                                      for a, b in zip(*grads))
            entries["neurodyn compiled"] = lambda: run(functools.partial(_nd, compile=True))
        if not train:
            # compile=True: the compiled driven loop (neurodyn.compile.driven) where the policy measures that it pays
            with torch.no_grad():
                sol = neurodyn.solve(neurodyn.sde_term(sde.f, sde.g, bm, noise="diagonal", sde_type=sde.sde_type),
                                     y0, ts, method=method, step_size=DT, compile=True)
                extra = {"compiled_path": sol.stats.get("compiled"),
                         "compiled_max_abs_diff": float((sol.ys - _nd(sde, y0, ts, bm, method, DT)).abs().max())}
            entries["neurodyn compiled"] = lambda: run(functools.partial(_nd, compile=True))
        if not train and method == "euler":
            entries["f+g only"] = floor
        med = _median_times(entries, repeats)
        rows.append({"section": "train" if train else "forward", "method": method, "neurodyn_s": med["neurodyn"],
                     "torchsde_s": med["torchsde"], "speedup": med["torchsde"] / med["neurodyn"],
                     "err_neurodyn": err_nd, "err_torchsde": err_ts, "f_g_only_s": med.get("f+g only")})
        if "neurodyn compiled" in med:
            rows[-1].update({"neurodyn_compiled_s": med["neurodyn compiled"],
                             "speedup_compiled": med["torchsde"] / med["neurodyn compiled"], **extra})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def section_compiled(repeats: int) -> list[dict]:
    """What compiling the SDE step could give: an Euler--Maruyama loop of 100 steps whose step (drift and diffusion
    inside, ``y + f(y) dt + g(y) dW``) is ``torch.compile``d, against the same loop eager, neurodyn's solve and
    torchsde's, on the same Brownian increments; forward (no graph) and training step (``mean(y(1)^2)``,
    backward through the loop). Also the compiled and eager ``tanh`` of the networks' hidden layer alone."""
    rows = []
    ts = torch.tensor([0.0, 1.0])
    y0 = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(1))
    sde = MLPSDE("ito")
    bm = BrownianInterval(0.0, 1.0, shape=(BATCH, DIM), dtype=torch.float32, entropy=5, cache_size=None)
    grid = [i * DT for i in range(100)] + [1.0]

    def step(y: torch.Tensor, dW: torch.Tensor) -> torch.Tensor:
        return y + sde.f(None, y) * DT + sde.g(None, y) * dW

    options = {"cpp_wrapper": True}
    compiled = torch.compile(step, options=options)

    def loop(fn: Callable) -> torch.Tensor:
        y = y0
        for a, b in zip(grid[:-1], grid[1:]):
            y = fn(y, bm(a, b))
        return y

    with torch.no_grad():
        err = float((loop(compiled) - loop(step)).abs().max())
        ref = _nd(sde, y0, ts, bm, "euler", DT)[-1]
        err_nd = float((loop(step) - ref).abs().max())
    for train in (False, True):
        def run(fn: Callable, _train=train) -> None:
            if _train:
                sde.zero_grad()
                fn().pow(2).mean().backward()
            else:
                with torch.no_grad():
                    fn()

        entries = {"neurodyn": lambda: run(lambda: _nd(sde, y0, ts, bm, "euler", DT)[-1]),
                   "torchsde": lambda: run(lambda: _ts(sde, y0, ts, bm, "euler", DT)[-1]),
                   "eager step loop": lambda: run(lambda: loop(step)),
                   "compiled step loop": lambda: run(lambda: loop(compiled))}
        med = _median_times(entries, repeats)
        rows.append({"section": "compiled", "method": "euler", "train": train, **{k + "_s": v for k, v in med.items()},
                     "compiled_vs_eager_loop": med["eager step loop"] / med["compiled step loop"],
                     "torchsde_vs_compiled_loop": med["torchsde"] / med["compiled step loop"],
                     "max_abs_diff_compiled_eager": err, "max_abs_diff_loop_neurodyn": err_nd})
        print(json.dumps(rows[-1]), flush=True)
    h = torch.randn(BATCH, HIDDEN)
    tanh_c = torch.compile(torch.tanh, options=options)
    med = _median_times({"eager tanh": lambda: [torch.tanh(h) for _ in range(100)],
                         "compiled tanh": lambda: [tanh_c(h) for _ in range(100)]}, repeats)
    rows.append({"section": "compiled", "method": "tanh (512, 128) x 100", **{k + "_s": v for k, v in med.items()}})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def section_bound(repeats: int) -> list[dict]:
    """What bounds Euler's forward speed-up on this problem: whole solves (torchsde, neurodyn eager and
    ``compile=True``) against loops of 100 steps that do only part of the work -- the eager step (drift, diffusion,
    ``y + f dt + g dW`` on precomputed increments), the four matrix products with the two ``tanh`` and the
    ``sigmoid`` (ATen's kernels, what no fusion removes), the four products alone -- and the per-operation cost of one
    step's pieces (``addmm`` (512, 64) x (64, 128) + bias, ``tanh`` (512, 128), ``sigmoid`` (512, 64), one elementwise
    (512, 64) product). Ratios: torchsde time / entry time."""
    ts = torch.tensor([0.0, 1.0])
    y0 = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(1))
    sde = MLPSDE("ito")
    bm = BrownianInterval(0.0, 1.0, shape=(BATCH, DIM), dtype=torch.float32, entropy=5, cache_size=None)
    grid = [i * DT for i in range(100)] + [1.0]
    dws = [bm(a, b) for a, b in zip(grid[:-1], grid[1:])]
    d0, d2, g0, g2 = sde.drift[0], sde.drift[2], sde.diff[0], sde.diff[2]

    def eager_loop() -> None:
        y = y0
        for dw in dws:
            y = y + sde.f(None, y) * DT + sde.g(None, y) * dw

    def gemm(act: bool) -> None:
        for _ in range(100):
            a = torch.addmm(d0.bias, y0, d0.weight.t())
            b = torch.addmm(g0.bias, y0, g0.weight.t())
            if act:
                a, b = a.tanh_(), b.tanh_()
            torch.addmm(d2.bias, a, d2.weight.t())
            c = torch.addmm(g2.bias, b, g2.weight.t())
            if act:
                c.sigmoid_()

    h_big, h = torch.randn(BATCH, HIDDEN), torch.randn(BATCH, DIM)
    with torch.no_grad():
        whole = {"torchsde": lambda: _ts(sde, y0, ts, bm, "euler", DT),
                 "neurodyn": lambda: _nd(sde, y0, ts, bm, "euler", DT),
                 "neurodyn compile=True": lambda: _nd(sde, y0, ts, bm, "euler", DT, compile=True),
                 "eager step loop": eager_loop, "4 addmm + 2 tanh + sigmoid": lambda: gemm(True),
                 "4 addmm": lambda: gemm(False)}
        med = _median_times(whole, repeats)
        row = {"section": "bound", "method": "euler", **{k + "_s": v for k, v in med.items()},
               **{"torchsde / " + k: med["torchsde"] / v for k, v in med.items() if k != "torchsde"}}
        print(json.dumps(row), flush=True)
        ops = {"addmm": lambda: [torch.addmm(d0.bias, y0, d0.weight.t()) for _ in range(100)],
               "tanh (512, 128)": lambda: [torch.tanh(h_big) for _ in range(100)],
               "sigmoid (512, 64)": lambda: [torch.sigmoid(h) for _ in range(100)],
               "mul (512, 64)": lambda: [h * DT for _ in range(100)]}
        per_op = _median_times(ops, repeats)
        row2 = {"section": "bound", "method": "per op (us per call)", **{k: v * 1e4 for k, v in per_op.items()}}
        print(json.dumps(row2), flush=True)
    return [row, row2]


def section_adjoint(repeats: int) -> list[dict]:
    """One training step with the adjoint: reversible Heun's exact adjoint and the stochastic adjoint (midpoint),
    neurodyn ``gradient="adjoint"`` vs ``torchsde.sdeint_adjoint`` on the same path; the relative difference of the
    two parameter gradients is printed beside the times."""
    rows = []
    ts = torch.tensor([0.0, 1.0])
    y0 = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(1))
    for method, adj in (("reversible_heun", "adjoint_reversible_heun"), ("midpoint", "midpoint")):
        sde = MLPSDE("stratonovich")
        params = list(sde.parameters())
        bm = BrownianInterval(0.0, 1.0, shape=(BATCH, DIM), dtype=torch.float32, entropy=5, cache_size=None)

        def nd(_sde=sde, _bm=bm, _m=method, _p=params, _a=adj, compile=False) -> list[torch.Tensor]:
            _sde.zero_grad()
            term = neurodyn.sde_term(_sde.f, _sde.g, _bm, sde_type="stratonovich")
            sol = neurodyn.solve(term, y0, ts, method=_m, step_size=DT, gradient="adjoint", params=_p,
                                 adjoint_method=None if _m == "reversible_heun" else _a, compile=compile)
            sol.ys[-1].pow(2).mean().backward()
            nd.compiled = sol.stats.get("compiled")
            return [p.grad.clone() for p in _p]

        def tsd(_sde=sde, _bm=bm, _m=method, _p=params, _a=adj) -> list[torch.Tensor]:
            _sde.zero_grad()
            torchsde.sdeint_adjoint(_sde, y0, ts, bm=_bm, method=_m, adjoint_method=_a, dt=DT)[-1].pow(2).mean() \
                .backward()
            return [p.grad.clone() for p in _p]

        ga, gb, gc = nd(), tsd(), nd(compile=True)
        path = nd.compiled
        diff = max(float((a - b).norm() / b.norm()) for a, b in zip(ga, gb))
        # compile=True: the forward solve (no autograd graph) as the compiled driven loop where the policy picks it;
        # the backward solve steps eagerly
        diff_c = max(float((a - b).norm() / b.norm()) for a, b in zip(gc, ga))
        med = _median_times({"neurodyn": nd, "torchsde": tsd, "neurodyn compiled": lambda: nd(compile=True)},
                            repeats)
        rows.append({"section": "adjoint", "method": method, "neurodyn_s": med["neurodyn"],
                     "torchsde_s": med["torchsde"], "speedup": med["torchsde"] / med["neurodyn"],
                     "grad_rel_diff": diff, "neurodyn_compiled_s": med["neurodyn compiled"],
                     "speedup_compiled": med["torchsde"] / med["neurodyn compiled"], "compiled_path": path,
                     "compiled_grad_rel_diff": diff_c})
        print(json.dumps(rows[-1]), flush=True)
    return rows


class _TorchsdeLatent(nn.Module):
    """torchsde's view of a ``LatentSDE``'s posterior: ``f`` (context-conditioned), ``g``, prior drift ``h``."""

    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, model: LatentSDE):
        super().__init__()
        self.model = model
        self.posterior = None  # the PosteriorSDE (observation times and contexts) of the solve in progress

    def f(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.model.f_net(torch.cat([z, self.posterior.context(t)], -1))

    def h(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.model.h_net(z)

    def g(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.model.g_net(z)


def _torchsde_latent_loss(model: LatentSDE, wrap: _TorchsdeLatent, xs: torch.Tensor, ts: torch.Tensor,
                          bm: BrownianInterval, dt: float, eps: torch.Tensor | None = None,
                          parts: bool = False):
    ctx = model.encode(xs)
    mean, std = model.qz0(ctx[0])
    z0 = mean + std * (torch.randn_like(mean) if eps is None else eps)
    pm, ps = model.pz0_mean, model.pz0_logstd.exp()
    kl0 = (torch.log(ps / std) + (std ** 2 + (mean - pm) ** 2) / (2 * ps ** 2) - 0.5).sum(-1)
    wrap.posterior = model.posterior_sde(ts, ctx)
    zs, logqp = torchsde.sdeint(wrap, z0, ts, bm=bm, method="euler", dt=dt, logqp=True)
    wrap.posterior = None
    if parts:
        return zs, logqp.sum(0)
    log_lik = model.log_likelihood(xs, zs)
    return (-log_lik + kl0 + logqp.sum(0)).mean()


def section_latent(repeats: int) -> list[dict]:
    """One training step of the latent SDE, neurodyn against torchsde at equal error. The posterior paths of both
    (the same model, z0 draw and BrownianInterval) are compared with neurodyn's at a 64 times finer step: the error
    at t = 1 and the path's largest over the observation times (mean over series of the max-norm over z), and the
    ``logqp`` error. neurodyn lands on every observation time (the drift's context changes there): ``step_size``
    0.02 takes two steps per observation interval (1/49), 0.02 and a sliver; ``step_size`` 1/49 takes one.
    torchsde steps dt = 0.02 across them and interpolates its outputs linearly."""
    from neurodyn.data import stochastic_lorenz

    torch.manual_seed(0)
    ts, xs = stochastic_lorenz(256, 50, 1.0, dt=5e-3, seed=0)
    model = LatentSDE(3, 4, 64, 64, step_size=0.02)
    wrap = _TorchsdeLatent(model)
    bm = BrownianInterval(0.0, 1.0, shape=(256, 5), entropy=1, cache_size=None)
    # (torchsde's logqp=True augments the state with the KL channel too: the same (256, 5) path for both)
    gap = float(ts[1] - ts[0])
    eps = torch.randn(256, 4, generator=torch.Generator().manual_seed(5))

    def nd_paths(step: float) -> tuple[torch.Tensor, torch.Tensor]:
        model.step_size = step
        with torch.no_grad():
            zs, logqp, _ = model.posterior(xs, ts, bm=bm, eps=eps)
        return zs, logqp

    ref_z, ref_q = nd_paths(gap / 64)

    def errors(zs: torch.Tensor, logqp: torch.Tensor) -> dict:
        e = (zs - ref_z).abs().amax(-1)  # (T, B)
        return {"error_t1": float(e[-1].mean()), "error_path": float(e.amax(0).mean()),
                "error_logqp": float((logqp - ref_q).abs().mean())}

    def nd_step(step: float) -> Callable[[], None]:
        def run() -> None:
            model.step_size = step
            model.zero_grad()
            model.elbo(xs, ts, bm=bm)["loss"].backward()
        return run

    def tsd() -> None:
        model.zero_grad()
        _torchsde_latent_loss(model, wrap, xs, ts, bm, 0.02).backward()

    runs = {"neurodyn 0.02": nd_step(0.02), "neurodyn 1/49": nd_step(gap), "torchsde": tsd}
    med = _median_times(runs, repeats)
    errs = {"neurodyn 0.02": errors(*nd_paths(0.02)), "neurodyn 1/49": errors(*nd_paths(gap))}
    nfe = {"neurodyn 0.02": 0, "neurodyn 1/49": 0}
    for k, step in (("neurodyn 0.02", 0.02), ("neurodyn 1/49", gap)):
        nd_paths(step)
        nfe[k] = model.last_solution.stats["nfe"]
    with torch.no_grad():
        errs["torchsde"] = errors(*_torchsde_latent_loss(model, wrap, xs, ts, bm, 0.02, eps=eps, parts=True))
    rows = []
    for k in ("neurodyn 0.02", "neurodyn 1/49"):
        rows.append({"section": "latent", "method": "euler", "neurodyn": k, "neurodyn_s": med[k],
                     "torchsde_s": med["torchsde"], "speedup": med["torchsde"] / med[k], "neurodyn_nfe": nfe[k],
                     "torchsde_steps": 50, **{f"neurodyn_{a}": b for a, b in errs[k].items()},
                     **{f"torchsde_{a}": b for a, b in errs["torchsde"].items()}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def section_adaptive(adaptive_iters: int) -> list[dict]:
    from neurodyn.data import stochastic_lorenz

    torch.manual_seed(0)
    ts, xs = stochastic_lorenz(128, 21, 1.0, dt=5e-3, seed=3)
    ts, xs = ts.double(), xs.double()
    model = LatentSDE(3, 4, 16, 32, method="milstein", step_size=0.05).double()
    # Briefly trained (--adaptive-iters Adam steps) so the posterior follows the attractor's fast transitions.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for it in range(adaptive_iters):
        loss = model.elbo(xs, ts, kl_weight=min(1.0, it / 50))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    xs = xs[:, :32]
    eps = torch.randn(32, 4, dtype=torch.float64)
    rows = []

    # One path object for every solve: within one BrownianInterval every interval always has the same value, so the
    # reference, the fixed and the adaptive solves see one sample path whatever times they query.
    bm = BrownianInterval(0.0, 1.0, shape=(32, 5), dtype=torch.float64, entropy=9, levy_area="none", cache_size=None)

    def every_channel(scaled: torch.Tensor) -> torch.Tensor:  # RMS over z and logqp (LatentSDE's norm before)
        return scaled.pow(2).mean().sqrt()

    def solve(**kw) -> tuple[torch.Tensor, dict]:
        model.step_size = kw.pop("step_size", None)
        model.rtol = model.atol = kw.pop("tol", 1e-3)
        model.solve_options = {"solver_options": {"error_estimate": kw.pop("estimate", "auto")}}
        if kw.pop("landing", False):  # fixed steps that also land on the observation times (as adaptive ones do)
            model.solve_options["jump_t"] = ts[1:-1]
        if kw.pop("all_channels", False):
            model.solve_options["norm"] = every_channel
        with torch.no_grad():
            zs, _, _ = model.posterior(xs, ts, bm=bm, eps=eps)
        return zs, model.last_solution.stats

    def add(mode: str, setting: str, zs: torch.Tensor, st: dict) -> None:
        e = (zs - ref).abs().amax(-1)  # (T, series): max-norm over z
        rows.append({"section": "adaptive", "mode": mode, "setting": setting, "nfe": int(st["nfe"]),
                     "nfe_diffusion": int(st.get("nfe_diffusion", 0)), "steps": int(st["steps"]),
                     "rejected": int(st.get("rejected", 0)), "strong_error": float(e[-1].mean()),
                     "strong_error_all_times": float(e[1:].mean()),
                     "strong_error_path": float(e[1:].amax(0).mean())})
        print(json.dumps(rows[-1]), flush=True)

    ref, _ = solve(step_size=1 / 4096)
    for k in (3, 4, 5, 6, 7, 8):
        add("fixed", f"dt=1/{2 ** k}", *solve(step_size=2.0 ** -k))
    for k in (4, 5, 6, 7, 8):
        add("fixed, landing on the observation times", f"dt=1/{2 ** k}", *solve(step_size=2.0 ** -k, landing=True))
    for estimate in ("embedded", "doubling"):
        for tol in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4):
            add(f"adaptive {estimate}", f"tol={tol:g}", *solve(tol=tol, estimate=estimate))
    for tol in (1e-2, 3e-3, 1e-3, 3e-4):
        add("adaptive doubling, error norm over z and logqp (before)", f"tol={tol:g}",
            *solve(tol=tol, estimate="doubling", all_channels=True))
    rows += _local_error_grids(model, xs, ts, eps, bm)
    # srk (space-time Levy area: another path object, its own srk reference at dt = 1/8192)
    model.method = "srk"
    bm = BrownianInterval(0.0, 1.0, shape=(32, 5), dtype=torch.float64, entropy=9, levy_area="space-time",
                          cache_size=None)
    ref, _ = solve(step_size=1 / 8192)
    for k in (4, 5, 6, 7, 8, 9):
        add("srk fixed", f"dt=1/{2 ** k}", *solve(step_size=2.0 ** -k))
    for estimate in ("embedded", "doubling"):
        for tol in (1e-2, 1e-3, 1e-4):
            add(f"srk adaptive {estimate}", f"tol={tol:g}", *solve(tol=tol, estimate=estimate))
    model.method = "milstein"
    return rows


def _local_error_grids(model: LatentSDE, xs: torch.Tensor, ts: torch.Tensor, eps: torch.Tensor,
                       bm: BrownianInterval, per: int = 8) -> list[dict]:
    """What any step-size distribution can gain on the posterior solve (Milstein, same path): the true local error of
    one step from the reference state, ``per`` equal steps per observation interval, its batch RMS over z per
    interval ``c_j``; then fixed grids with ``m_j`` equal steps in interval ``j``, ``m_j`` proportional to
    ``c_j^a`` (``a = 0``: uniform; ``a = 2/3``: equal local error per step, what a local-error controller aims at;
    ``a = 1/3``), stepped one step per solve on the same path, their errors at t = 1 and over all observation
    times against a dt = 0.05/512 reference."""
    from neurodyn import solve as nd_solve
    from neurodyn.core.term import sde_term

    with torch.no_grad():
        ctx = model.encode(xs)
        mean, std = model.qz0(ctx[0])
        y0 = torch.cat([mean + std * eps, torch.zeros_like(mean[:, :1])], dim=-1)
        sde = model.posterior_sde(ts, ctx)

        def term():
            return sde_term(sde.drift, sde.diffusion, bm)

        def grid_of(m: list[int]) -> torch.Tensor:
            return torch.cat([ts[j] + (ts[j + 1] - ts[j]) * torch.arange(m[j], dtype=ts.dtype) / m[j]
                              for j in range(len(ts) - 1)] + [ts[-1:]])

        def stepped(y: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
            out = [y]
            for i in range(len(grid) - 1):
                y = nd_solve(term(), y, grid[i:i + 2], method="milstein", step_size=float(grid[i + 1] - grid[i])).ys[-1]
                out.append(y)
            return out

        n_int = len(ts) - 1
        fine = grid_of([per] * n_int)
        ref = nd_solve(term(), y0, fine, method="milstein", step_size=0.05 / 512, jump_t=ts[1:-1]).ys
        loc = torch.stack([stepped(ref[i], fine[i:i + 2])[-1] - ref[i + 1] for i in range(len(fine) - 1)])
        c = loc[..., :4].pow(2).mean((1, 2)).reshape(n_int, per).mean(1).sqrt()  # (intervals,)
        rows = [{"section": "adaptive", "mode": "local error profile", "setting": f"{per} steps per interval",
                 "rms_local_error_per_interval": [float(v) for v in c]}]
        print(json.dumps(rows[-1]), flush=True)
        ref_ts = ref[::per]
        for a, label in ((0.0, "uniform per interval"), (2 / 3, "m_j ~ c_j^(2/3) (equal local error)"),
                         (1 / 3, "m_j ~ c_j^(1/3)")):
            for n in (40, 80, 160, 320):
                w = c ** a
                m = [max(1, int(v)) for v in torch.round(n * w / w.sum())]
                grid = grid_of(m)
                ys = torch.stack(stepped(y0, grid))
                at = [int((grid - t).abs().argmin()) for t in ts]
                e = (ys[at][..., :4] - ref_ts[..., :4]).abs().amax(-1)
                rows.append({"section": "adaptive", "mode": f"grid {label}", "setting": f"N={sum(m)}",
                             "nfe": sum(m), "strong_error": float(e[-1].mean()),
                             "strong_error_all_times": float(e[1:].mean()),
                             "strong_error_path": float(e[1:].amax(0).mean())})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--adaptive-iters", type=int, default=150, help="training steps before the adaptive study")
    parser.add_argument("--sections", default="forward,train,latent,adaptive")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time entries by wall time or by the thread's CPU time (shared machines)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_sde.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    CLOCK[0] = time.thread_time if args.clock == "cpu" else time.perf_counter
    rows: list[dict] = []
    sections = args.sections.split(",")
    if "forward" in sections:
        rows += section_solver(args.repeats, train=False)
    if "train" in sections:
        rows += section_solver(args.repeats, train=True)
    if "compiled" in sections:
        rows += section_compiled(args.repeats)
    if "bound" in sections:
        rows += section_bound(args.repeats)
    if "adjoint" in sections:
        rows += section_adjoint(args.repeats)
    if "latent" in sections:
        rows += section_latent(args.repeats)
    if "adaptive" in sections:
        rows += section_adaptive(args.adaptive_iters)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "torchsde": torchsde.__version__,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
