"""Solves under ``torch.inference_mode()`` mixed with ordinary solves under autograd, in both orders.

A tensor created under inference mode is an inference tensor: autograd refuses to save it for backward later. The
solvers, paths and compiled loops keep caches of tensors (coefficients, tolerances, Brownian samples, reused inputs)
on objects shared between solves; such a cache filled by a solve under inference mode must not break a later solve
with autograd, and a solve under inference mode must still work after one with autograd.

The scenarios run in a fresh process (``python tests/test_inference_mode.py NAMES OUT ORDER``), each in the order
inference -> autograd with backward -> inference -> autograd (compiled ones: a third pair, one process each), so that
an inference solve is the one that fills every cache: the scenario's own, or an earlier one's in the same process
(the uncompiled scenarios share one process, each failing on its own; a cache filled under inference mode by one of
them breaks the next one with autograd that saves it). The outputs of all solves must agree, the gradients of the
autograd solves too, and they must equal the ones computed in the pytest process, where the scenario runs with
autograd only (no inference mode before it in that scenario). Compiled scenarios also check Dynamo's graph count: no
new graph once each mode ran twice, and as many graphs in all as when the first solve is the one with autograd.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback

import pytest
import torch

F64 = torch.float64


def _net(seed: int = 0, d: int = 2, h: int = 16, out: int | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, out or d)).double()


def _ode(**kw):
    """A small neural ODE solved with ``solve(**kw)``; returns ``(run, params)``."""
    import neurodyn as nd

    net = _net()
    batch = kw.pop("batch", 1)
    torch.manual_seed(1)
    y0 = torch.randn(batch, 2, dtype=F64)
    t = torch.linspace(0, 1, 5, dtype=F64)

    if "gradient" in kw:
        kw["params"] = list(net.parameters())

    def field(s, y):  # one field for every solve (the compiled code is cached per field)
        return net(y)

    def run():
        return nd.solve(field, y0, t, **kw).ys

    return run, list(net.parameters())


def _stiff(**kw):
    """A stiff linear part plus a network (implicit methods)."""
    import neurodyn as nd

    net = _net()
    y0 = torch.tensor([[1.0, 0.5]], dtype=F64)
    t = torch.linspace(0, 1, 4, dtype=F64)
    lam = torch.tensor([-50.0, -1.0], dtype=F64)
    if "gradient" in kw:
        kw["params"] = list(net.parameters())

    def field(s, y):
        return lam * y + 0.1 * net(y)

    def run():
        return nd.solve(field, y0, t, **kw).ys

    return run, list(net.parameters())


def _symplectic(method):
    import neurodyn as nd

    net = _net(h=8, d=1, out=1)
    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.3]], dtype=F64)
    t = torch.linspace(0, 1, 5, dtype=F64)

    def field(s, y):  # second order: q' = p, p' = -net(q) (a separable Hamiltonian field)
        return torch.cat([y[..., 1:], -net(y[..., :1])], -1)

    def run():
        return nd.solve(field, y0, t, method=method, step_size=0.05).ys

    return run, list(net.parameters())


def _sde(compile=False):
    import neurodyn as nd
    from neurodyn.paths import BrownianInterval

    drift = _net()
    sigma = torch.nn.Parameter(torch.tensor([0.2, 0.3], dtype=F64))
    y0 = torch.tensor([[0.1, 0.5], [1.0, -0.2]], dtype=F64)
    ts = torch.linspace(0, 1, 5, dtype=F64)

    def f(s, y):
        return drift(y)

    def g(s, y):
        return sigma * y

    def run():
        bm = BrownianInterval(0.0, 1.0, shape=(2, 2), dtype=F64, entropy=11)
        term = nd.sde_term(f, g, bm, noise="diagonal", sde_type="ito")
        return nd.solve(term, y0, ts, method="euler", step_size=1 / 16, compile=compile).ys

    return run, [*drift.parameters(), sigma]


def _sdeint():
    from neurodyn.compat.torchsde import sdeint
    from neurodyn.paths import BrownianInterval

    class SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def __init__(self):
            super().__init__()
            self.net = _net()
            self.sigma = torch.nn.Parameter(torch.tensor([0.2, 0.3], dtype=F64))

        def f(self, t, y):
            return self.net(y)

        def g(self, t, y):
            return self.sigma * torch.cos(y)

    sde = SDE()
    y0 = torch.tensor([[0.1, 0.5], [1.0, -0.2]], dtype=F64)
    ts = torch.linspace(0, 1, 5, dtype=F64)

    def run():
        bm = BrownianInterval(0.0, 1.0, shape=(2, 2), dtype=F64, levy_area="space-time", entropy=3)
        return sdeint(sde, y0, ts, bm=bm, method="srk", dt=1 / 16)

    return run, list(sde.parameters())


def _cde(adjoint):
    from neurodyn.compat import torchcde as ncde

    torch.manual_seed(2)
    x = torch.randn(2, 7, 3, dtype=F64).cumsum(1)
    t = torch.linspace(0, 1, 7, dtype=F64)
    hidden, channels = 4, 3
    net = _net(d=hidden, h=8, out=hidden * channels)
    z0 = torch.zeros(2, hidden, dtype=F64)

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, s, z):
            return torch.tanh(self.net(z)).view(*z.shape, channels)

    def run():
        X = ncde.CubicSpline(ncde.natural_cubic_coeffs(x, t), t)
        return ncde.cdeint(X, Field(), z0, X.interval, adjoint=adjoint, method="rk4", options={"step_size": 1 / 6})

    return run, list(net.parameters())


def _events():
    import neurodyn as nd

    net = _net()
    y0 = torch.tensor([[1.0, 0.0]], dtype=F64)
    t = torch.linspace(0, 2, 5, dtype=F64)

    def field(s, y):
        return torch.stack([y[..., 1], -y[..., 0]], -1) + 0.1 * net(y)

    event = nd.Event(lambda s, y: y[..., 0].sum() - 0.2, terminal=False)

    def run():
        sol = nd.solve(field, y0, t, events=[event])
        return torch.cat([sol.ys.flatten(), sol.events.t.flatten()])

    return run, list(net.parameters())


def _neural_ode():
    import neurodyn as nd

    torch.manual_seed(0)
    model = nd.NeuralODE(nd.DerivativeMLP(2, 16), t=(0.0, 1.0), output="trajectory").double()
    y0 = torch.tensor([[0.3, -0.4], [0.1, 0.2]], dtype=F64)

    def run():
        return model(y0)

    return run, list(model.parameters())


SCENARIOS = {
    "dopri5": lambda: _ode(method="dopri5", rtol=1e-6, atol=1e-8),
    "tsit5": lambda: _ode(method="tsit5", rtol=1e-6, atol=1e-8),
    "dopri8": lambda: _ode(method="dopri8", rtol=1e-6, atol=1e-8),
    "rk4": lambda: _ode(method="rk4", step_size=0.05),
    "euler": lambda: _ode(method="euler", step_size=0.05),
    "dense": lambda: _ode(method="dopri5", dense=True),
    "per_sample_steps": lambda: _ode(method="dopri5", per_sample_steps=True, batch=3),
    "adjoint": lambda: _ode(method="dopri5", gradient="adjoint"),
    "checkpoint": lambda: _ode(method="dopri5", gradient="checkpoint"),
    "interpolated": lambda: _ode(method="dopri5", gradient="interpolated"),
    "adjoint_rk4": lambda: _ode(method="rk4", step_size=0.1, gradient="adjoint"),
    "kvaerno5": lambda: _stiff(method="kvaerno5", rtol=1e-6, atol=1e-8),
    "radau": lambda: _stiff(method="radau", rtol=1e-6, atol=1e-8),
    "sdirk2": lambda: _stiff(method="sdirk2", step_size=0.05),
    "bdf": lambda: _stiff(method="bdf", rtol=1e-6, atol=1e-8),
    "implicit_checkpoint": lambda: _stiff(method="kvaerno3", rtol=1e-5, atol=1e-7, gradient="checkpoint"),
    "adams": lambda: _ode(method="adams", rtol=1e-6, atol=1e-8),
    "explicit_adams": lambda: _ode(method="explicit_adams", step_size=0.05),
    "leapfrog": lambda: _symplectic("leapfrog"),
    "yoshida4": lambda: _symplectic("yoshida4"),
    "sde": _sde,
    "sdeint": _sdeint,
    "cde": lambda: _cde(adjoint=False),
    "cde_adjoint": lambda: _cde(adjoint=True),
    "events": _events,
    "neural_ode": _neural_ode,
    "compile": lambda: _ode(method="dopri5", compile=True),
    "compile_batched": lambda: _ode(method="tsit5", compile=True, batch=64),
    "compile_rk4": lambda: _ode(method="rk4", step_size=0.1, compile=True),
    "compile_sde": lambda: _sde(compile=True),
}
COMPILED = {"compile", "compile_batched", "compile_rk4", "compile_sde"}


def _grads(run, params):
    for p in params:
        p.grad = None
    out = run()
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in params]


def _child(names: str, path: str, order: str) -> None:
    """For each scenario of the comma-separated ``names`` in turn, solves in ``order`` (``i``: under inference mode,
    ``g``: with autograd and backward) in this (fresh) process; saves per scenario the outputs, the gradients and
    Dynamo's count of compiled graphs after each solve to ``path``."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)
    counters.clear()
    results = {}
    for name in names.split(","):
        res: dict = {"out": [], "grads": [], "compiles": []}
        try:
            run, params = SCENARIOS[name]()
            for mode in order:
                if mode == "i":
                    with torch.inference_mode():
                        res["out"].append(run().clone())
                else:
                    out, grads = _grads(run, params)
                    res["out"].append(out)
                    res["grads"].append(grads)
                res["compiles"].append(counters["stats"]["unique_graphs"])
        except Exception:  # reported by this scenario's test; the next scenarios still run
            res = {"error": traceback.format_exc()[-4000:]}
        results[name] = res
    torch.save(results, path)


def _in_fresh_process(name: str, order: str, path: str) -> dict:
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, os.path.abspath(__file__), name, path, order], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.load(path)


@pytest.fixture(scope="module")
def uncompiled_runs(tmp_path_factory) -> dict:
    """Every uncompiled scenario, one after the other in one fresh process."""
    names = ",".join(n for n in SCENARIOS if n not in COMPILED)
    return _in_fresh_process(names, "igig", str(tmp_path_factory.mktemp("inference") / "res.pt"))


def _baseline(name: str):
    """The scenario with autograd only, in the pytest process (no inference mode before it in this scenario)."""
    run, params = SCENARIOS[name]()
    out, grads = _grads(run, params)
    return out, grads


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in COMPILED else n
                                  for n in SCENARIOS])
def test_inference_then_autograd_then_inference(name, tmp_path, request):
    compiled = name in COMPILED
    if compiled:
        r = _in_fresh_process(name, "igigig", str(tmp_path / "res.pt"))[name]
    else:
        r = request.getfixturevalue("uncompiled_runs")[name]
    assert "error" not in r, r.get("error")
    outs, grads = r["out"], r["grads"]
    assert not any(g.is_inference() for gs in grads for g in gs)
    # compiled: the inference graph's kernels and the training graph's round differently (float64, ~1e-12)
    tol = {"rtol": 1e-8, "atol": 1e-10} if compiled else {"rtol": 1e-10, "atol": 1e-12}
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], **tol)
    for gs in grads[1:]:
        for a, b in zip(gs, grads[0]):
            torch.testing.assert_close(a, b, **tol)
    base_out, base_grads = _baseline(name)
    torch.testing.assert_close(outs[1], base_out, **tol)
    assert len(base_grads) == len(grads[0])
    for a, b in zip(grads[0], base_grads):
        torch.testing.assert_close(a, b, **tol)
    if compiled:
        # Steady state after a solve of each mode twice (no recompilation when the mode alternates), and the same
        # graphs in all as when the first solve is the one with autograd.
        c = r["compiles"]
        assert c[-1] == c[3], c
        g_first = _in_fresh_process(name, "gigigi", str(tmp_path / "g.pt"))[name]["compiles"]
        assert c[-1] == g_first[-1], (c, g_first)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3])
