#!/usr/bin/env python
"""Neural SDEs against diffrax on JAX-CPU (issue 13: "neurodyn vs torchsde (and diffrax on JAX-CPU when installed)"):
the problem of ``bench_sde.py`` (64-d MLP drift, diagonal MLP diffusion ``0.2 sigmoid(MLP(y))``, batch 512, float32,
t in [0, 1], dt = 0.01, the same weights in both), forward solve and one training step (``mean(y(1)^2)``, gradient
by backpropagation through the solver: neurodyn ``compile=True`` under autograd, diffrax's default
``RecursiveCheckpointAdjoint`` under ``jax.grad``), with torchsde in the same run.

Methods where the libraries have the same scheme: ``euler`` (Euler-Maruyama: diffrax ``Euler``), ``milstein`` (Ito
Milstein: ``ItoMilstein``), ``reversible_heun`` (Stratonovich: ``ReversibleHeun``). diffrax has no Ito SRK for
diagonal noise (its SRKs are Stratonovich or additive-noise schemes), so ``srk`` is not compared. Each library
integrates its own Brownian path (diffrax: ``VirtualBrownianTree`` with ``tol = dt / 8``, and for the forward solve
also ``UnsafeBrownianPath``, one draw per step, which diffrax's reverse-mode adjoints refuse), so errors are measured on
each library's own path: mean absolute error at t = 1 against the same library and method at dt / 16 on that path
(float64 where the library allows it; diffrax in float64 via ``jax_enable_x64`` for the reference only).

Timing: process CPU time (XLA runs its program on a thread of its own, which a thread clock would not count), one
thread per library (torch ``set_num_threads(1)``, ``--xla_cpu_multi_thread_eigen=false``), median of ``--repeats``
rounds with the entries interleaved, after a warm-up (compilation) call each.

Usage::

    taskset -c 1 .venv/bin/python benchmarks/bench_sde_diffrax.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sde import BATCH, DIM, DT, MLPSDE  # noqa: E402
from bench_suite import _jax_setup  # noqa: E402

import neurodyn  # noqa: E402
from neurodyn.paths import BrownianInterval  # noqa: E402

METHODS = {"euler": ("ito", "Euler"), "milstein": ("ito", "ItoMilstein"),
           "reversible_heun": ("stratonovich", "ReversibleHeun")}


def median_times(entries: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Process CPU seconds per call of each entry: median of ``repeats`` interleaved rounds after one warm-up."""
    for fn in entries.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in entries}
    for _ in range(repeats):
        for k, fn in entries.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def jax_params(sde: MLPSDE, dtype) -> dict:
    """The drift's and diffusion's weights as JAX arrays (``y @ W.T + b`` per layer)."""
    import jax.numpy as jnp

    def layers(seq):
        return [(jnp.asarray(m.weight.detach().numpy().T, dtype=dtype), jnp.asarray(m.bias.detach().numpy(),
                                                                                    dtype=dtype))
                for m in seq if isinstance(m, torch.nn.Linear)]
    return {"drift": layers(sde.drift), "diff": layers(sde.diff)}


def diffrax_solve(method: str, params: dict, y0, key, dt: float, dtype, path: str = "tree"):
    """``y(1)`` of the SDE by diffrax's ``method`` (a (BATCH, DIM) array), on the Brownian path of ``key``:
    ``path="tree"`` a ``VirtualBrownianTree`` (``tol = DT / 8``; any query order, what its adjoints need),
    ``"direct"`` an ``UnsafeBrownianPath`` (one draw per increment; fixed steps, forward solves only)."""
    import diffrax
    import jax
    import jax.numpy as jnp
    import lineax

    def mlp(ps, y):
        (w1, b1), (w2, b2) = ps
        return jnp.tanh(y @ w1 + b1) @ w2 + b2

    def drift(t, y, args):
        return mlp(args["drift"], y.reshape(BATCH, DIM)).reshape(-1)

    def diffusion(t, y, args):
        return lineax.DiagonalLinearOperator(0.2 * jax.nn.sigmoid(mlp(args["diff"], y.reshape(BATCH, DIM))).reshape(-1))

    shape = jax.ShapeDtypeStruct((BATCH * DIM,), dtype)
    bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=DT / 8, shape=shape, key=key) if path == "tree" else \
        diffrax.UnsafeBrownianPath(shape=shape, key=key)
    terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, bm))
    # diffrax's reverse-mode adjoints refuse UnsafeBrownianPath: forward-mode for it (forward solves only)
    extra = {} if path == "tree" else {"adjoint": diffrax.ForwardMode()}
    sol = diffrax.diffeqsolve(terms, getattr(diffrax, METHODS[method][1])(), 0.0, 1.0, dt, y0.reshape(-1),
                              args=params, max_steps=int(round(1.0 / dt)) + 2, **extra)
    return sol.ys[-1].reshape(BATCH, DIM)


def rows_for(method: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torchsde

    sde_type = METHODS[method][0]
    sde = MLPSDE(sde_type)
    params = list(sde.parameters())
    ts = torch.tensor([0.0, 1.0])
    y0 = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(1))
    bm = BrownianInterval(0.0, 1.0, shape=(BATCH, DIM), dtype=torch.float32, entropy=5, cache_size=None)
    key = jax.random.PRNGKey(5)
    jp = jax_params(sde, jnp.float32)
    jy0 = jnp.asarray(y0.numpy())

    def nd_solve(compile: bool) -> torch.Tensor:
        term = neurodyn.sde_term(sde.f, sde.g, bm, noise="diagonal", sde_type=sde_type)
        return neurodyn.solve(term, y0, ts, method=method, step_size=DT, compile=compile).ys[-1]

    def nd_forward() -> None:
        with torch.no_grad():
            nd_solve(True)

    def nd_train() -> None:
        sde.zero_grad()
        nd_solve(True).pow(2).mean().backward()

    def ts_forward() -> None:
        with torch.no_grad():
            torchsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=DT)

    def ts_train() -> None:
        sde.zero_grad()
        torchsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=DT)[-1].pow(2).mean().backward()

    dx_forward_jit = jax.jit(lambda p, y: diffrax_solve(method, p, y, key, DT, jnp.float32))
    dx_direct_jit = jax.jit(lambda p, y: diffrax_solve(method, p, y, key, DT, jnp.float32, "direct"))
    dx_grad_jit = jax.jit(jax.grad(lambda p, y: jnp.mean(diffrax_solve(method, p, y, key, DT, jnp.float32) ** 2)))

    def dx_forward() -> None:
        dx_forward_jit(jp, jy0).block_until_ready()

    def dx_direct() -> None:
        dx_direct_jit(jp, jy0).block_until_ready()

    def dx_train() -> None:
        jax.block_until_ready(dx_grad_jit(jp, jy0))

    # Errors at t = 1 on each library's own path against dt / 16 (float64).
    sde64 = MLPSDE(sde_type).double()
    bm64 = BrownianInterval(0.0, 1.0, shape=(BATCH, DIM), dtype=torch.float64, entropy=5, cache_size=None)
    with torch.no_grad():
        def nd64(dt):
            return neurodyn.solve(neurodyn.sde_term(sde64.f, sde64.g, bm64, noise="diagonal", sde_type=sde_type),
                                  y0.double(), ts.double(), method=method, step_size=dt).ys[-1]
        err_nd = float((nd64(DT) - nd64(DT / 16)).abs().mean())
    jp64 = jax_params(sde, jnp.float64)
    jy64 = jnp.asarray(y0.double().numpy())
    err_dx = float(jnp.mean(jnp.abs(diffrax_solve(method, jp64, jy64, key, DT, jnp.float64)
                                    - diffrax_solve(method, jp64, jy64, key, DT / 16, jnp.float64))))
    # The gradients agree across libraries only in distribution (different paths): check each is finite.
    grads_ok = all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(dx_grad_jit(jp, jy0)))
    nd_train()
    grads_ok = grads_ok and all(bool(torch.isfinite(p.grad).all()) for p in params)

    fwd = median_times({"neurodyn": nd_forward, "torchsde": ts_forward, "diffrax": dx_forward,
                        "diffrax direct path": dx_direct}, repeats)
    train = median_times({"neurodyn": nd_train, "torchsde": ts_train, "diffrax": dx_train}, repeats)
    return {"method": method, "diffrax_solver": METHODS[method][1],
            "forward_s": fwd, "train_s": train,
            "forward_diffrax_over_neurodyn": fwd["diffrax"] / fwd["neurodyn"],
            "forward_diffrax_direct_over_neurodyn": fwd["diffrax direct path"] / fwd["neurodyn"],
            "forward_torchsde_over_neurodyn": fwd["torchsde"] / fwd["neurodyn"],
            "train_diffrax_over_neurodyn": train["diffrax"] / train["neurodyn"],
            "train_torchsde_over_neurodyn": train["torchsde"] / train["neurodyn"],
            "err_neurodyn": err_nd, "err_diffrax": err_dx, "grads_finite": grads_ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_sde_diffrax.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    jax = _jax_setup()
    import diffrax

    rows = []
    failed = []
    for method in args.methods.split(","):
        try:
            rows.append(rows_for(method, args.repeats))
        except Exception as exc:  # a library that cannot run the case (e.g. out of memory): said, not hidden
            failed.append({"method": method, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
            print(json.dumps(failed[-1]), flush=True)
            continue
        print(json.dumps(rows[-1]), flush=True)
    print("\n| method | forward: neurodyn / torchsde / diffrax tree / diffrax direct path (ms) | diffrax / neurodyn "
          "(tree, direct) | training step: neurodyn / torchsde / diffrax (ms) | diffrax / neurodyn | error at t = 1 vs "
          "dt/16, neurodyn / diffrax |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        f, t = r["forward_s"], r["train_s"]
        print(f"| {r['method']} ({r['diffrax_solver']}) | {f['neurodyn'] * 1e3:.1f} / {f['torchsde'] * 1e3:.1f} / "
              f"{f['diffrax'] * 1e3:.1f} / {f['diffrax direct path'] * 1e3:.1f} | "
              f"{r['forward_diffrax_over_neurodyn']:.2f}, {r['forward_diffrax_direct_over_neurodyn']:.2f} | "
              f"{t['neurodyn'] * 1e3:.1f} / "
              f"{t['torchsde'] * 1e3:.1f} / {t['diffrax'] * 1e3:.1f} | {r['train_diffrax_over_neurodyn']:.2f} | "
              f"{r['err_neurodyn']:.3e} / {r['err_diffrax']:.3e} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for f in failed:
        print(f"| {f['method']} | not run: {f['error']} | | | | |")
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "jax": jax.__version__,
                                          "diffrax": diffrax.__version__, "rows": rows, "failed": failed}, indent=1))


if __name__ == "__main__":
    main()
