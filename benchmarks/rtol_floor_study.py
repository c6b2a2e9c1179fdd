"""The float32 rtol floor study (docs/results.md, "float32 tolerances below the floor").

For float32 dopri5, tsit5 and bosh3 on torchdiffeq's ode_demo spiral, DETEST problems (tests/problems.py) and an MLP
field (batch 64), rtol in {1e-7, 2e-7, 5e-7, 9.5e-7, 2e-6}, atol 1e-9: the max error against float64 references
(exact or scipy DOP853 at rtol 1e-13), NFE, rejected steps and status, with neurodyn's floor
(``core.control.RTOL_FLOOR_EPS``) set to 8, 2, 1 and 0.5 machine epsilons, and torchdiffeq (dopri5,
bosh3) at the same rtol. Then the implicit methods at rtol 1e-7 under the same floors.

    PYTHONPATH=src taskset -c 1 python benchmarks/rtol_floor_study.py [dopri5,tsit5,bosh3]

Writes benchmarks/out/rtol_floor_<methods>.json and prints one JSON line per run.

The same floor in float64 (docs/results.md, "float64 tolerances below the floor"): rtol 1e-17 (so the floor runs), atol
1e-20, floors 16, 8, 4 and 2 epsilons, DETEST A2, B5, C1 and D (e = 0.5) against their exact solutions, 20000 steps:

    PYTHONPATH=src taskset -c 1 python benchmarks/rtol_floor_study.py float64 [dopri5,tsit5,...]

writes benchmarks/out/rtol_floor_float64.json.
"""
import json
import math
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import numpy as np  # noqa: E402
import scipy.integrate  # noqa: E402
import test_precision as tp  # noqa: E402
import torch  # noqa: E402
import torchdiffeq  # noqa: E402
from problems import PROBLEMS  # noqa: E402

import neurodyn  # noqa: E402
import neurodyn.core.control as control  # noqa: E402
import neurodyn.options as options  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")

F32 = torch.float32
EPS = torch.finfo(F32).eps
RTOLS = [1e-7, 2e-7, 5e-7, 9.5e-7, 2e-6]
FLOORS = [8.0, 2.0, 1.0, 0.5]
ATOL = 1e-9
MAXSTEPS = 200000

def set_floor(k):
    control.RTOL_FLOOR_EPS = k
    options.RTOL_FLOOR_EPS = k

# --- problems: (name, f(t,y) any dtype, y0 float64 tensor, t float64 grid, reference ndarray (T, *shape))
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
def spiral(t, y):
    return torch.mm(y ** 3, A.to(y.dtype))

def scipy_ref(f, y0, t):
    shape = y0.shape
    def fn(tt, yy):
        with torch.no_grad():
            return f(torch.tensor(tt, dtype=torch.float64), torch.from_numpy(yy).reshape(shape)).reshape(-1).numpy()
    s = scipy.integrate.solve_ivp(fn, (float(t[0]), float(t[-1])), y0.reshape(-1).numpy(), method="DOP853",
                                  rtol=1e-13, atol=1e-15, t_eval=t.numpy())
    assert s.success
    return s.y.T.reshape(len(t), *shape)

torch.manual_seed(0)
W1 = torch.randn(2, 32, dtype=torch.float64) * 0.8
b1 = torch.randn(32, dtype=torch.float64) * 0.3
W2 = torch.randn(32, 32, dtype=torch.float64) / math.sqrt(32)
b2 = torch.randn(32, dtype=torch.float64) * 0.3
W3 = torch.randn(32, 2, dtype=torch.float64) / math.sqrt(32)
def mlp(t, y):
    d = y.dtype
    h = torch.tanh(y @ W1.to(d) + b1.to(d))
    h = torch.tanh(h @ W2.to(d) + b2.to(d))
    return h @ W3.to(d) - 0.1 * y
Y0_MLP = torch.randn(64, 2, dtype=torch.float64)

def make_problems():
    out = []
    t = torch.linspace(0.0, 25.0, 1000, dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    out.append(("spiral (ode_demo)", spiral, y0, t, scipy_ref(spiral, y0, t)))
    for name in ["A2_cubic", "B5_rigid_body", "C1_chain", "D_kepler_e0.5", "E_van_der_pol_mu1"]:
        p = PROBLEMS[name]
        tt = torch.linspace(p.t0, p.t1, 101, dtype=torch.float64)
        out.append((name, p.f, p.y0_tensor(), tt, p.reference(tt.numpy())))
    t = torch.linspace(0.0, 10.0, 51, dtype=torch.float64)
    out.append(("MLP field (64x2, tanh 32-32)", mlp, Y0_MLP, t, scipy_ref(mlp, Y0_MLP, t)))
    return out

def err(ys, ref):
    return float(np.abs(ys.detach().double().numpy().reshape(ref.shape) - ref).max())

def run_nd(f, y0, t, method, rtol):
    try:
        s = neurodyn.solve(f, y0.to(F32), t.to(F32), method=method, rtol=rtol, atol=ATOL, max_steps=MAXSTEPS)
    except Exception as e:  # noqa
        return dict(status=type(e).__name__ + ": " + str(e)[:60], err=float("nan"), nfe=-1, rej=-1)
    return dict(status=s.status, err=float("nan") if s.status != "success" else None, ys=s.ys,
                nfe=s.stats["nfe"], rej=s.stats["rejected"], steps=s.stats["steps"])

def run_td(f, y0, t, method, rtol):
    n = [0]
    def g(tt, yy):
        n[0] += 1
        return f(tt, yy)
    try:
        ys = torchdiffeq.odeint(g, y0.to(F32), t.to(F32), method=method, rtol=rtol, atol=ATOL,
                                options=dict(max_num_steps=MAXSTEPS))
        st = "success"
    except Exception as e:  # noqa
        return dict(status=str(e)[:60], nfe=n[0], rej=-1, err=float("nan"))
    return dict(status=st, ys=ys, nfe=n[0], rej=-1)

def float64_study(methods):
    rows = []
    for name in ["A2_cubic", "B5_rigid_body", "C1_chain", "D_kepler_e0.5"]:
        p = PROBLEMS[name]
        t = torch.linspace(p.t0, p.t1, 101, dtype=torch.float64)
        ref = p.reference(t.numpy())
        for method in methods:
            for k in [16.0, 8.0, 4.0, 2.0]:
                set_floor(k)
                t0 = time.time()
                s = neurodyn.solve(p.f, p.y0_tensor(), t, method=method, rtol=1e-17, atol=1e-20, max_steps=20000,
                                   on_failure="return")
                ok = s.status == "success"
                rows.append(dict(problem=name, method=method, floor=k, status=s.status, nfe=s.stats["nfe"],
                                 steps=s.stats["steps"], rej=s.stats["rejected"], wall=time.time() - t0,
                                 err=err(s.ys, ref) if ok else float("nan")))
                print(json.dumps(rows[-1]), flush=True)
    set_floor(2.0)
    return rows


if len(sys.argv) > 1 and sys.argv[1] == "float64":
    methods = (sys.argv[2] if len(sys.argv) > 2 else
               "dopri5,tsit5,dopri8,bosh3,kvaerno3,kvaerno4,kvaerno5,radau,bdf,trbdf2").split(",")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "rtol_floor_float64.json"), "w") as fh:
        json.dump(float64_study(methods), fh)
    sys.exit(0)

methods = (sys.argv[1] if len(sys.argv) > 1 else "dopri5,tsit5,bosh3").split(",")
rows = []
for name, f, y0, t, ref in make_problems():
    for method in methods:
        cache = {}
        for rtol in RTOLS:
            for k in FLOORS:
                set_floor(k)
                eff = float(options.clamp_rtol("rtol", rtol, F32))
                if eff not in cache:
                    t0 = time.time()
                    r = run_nd(f, y0, t, method, rtol)
                    if r.get("ys") is not None:
                        r["err"] = err(r.pop("ys"), ref)
                    r["wall"] = time.time() - t0
                    cache[eff] = r
                r = dict(cache[eff])
                rows.append(dict(problem=name, method=method, lib=f"nd floor {k:g}eps", rtol=rtol, eff=eff, **r))
            if method in ("dopri5", "bosh3"):
                r = run_td(f, y0, t, method, rtol)
                if r.get("ys") is not None:
                    r["err"] = err(r.pop("ys"), ref)
                rows.append(dict(problem=name, method=method, lib="torchdiffeq", rtol=rtol, eff=rtol, **r))
            print(json.dumps(rows[-1]), flush=True)
        set_floor(2.0)
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, f"rtol_floor_{'_'.join(methods)}.json"), "w") as fh:
    json.dump(rows, fh)

# implicit methods, rtol 1e-7
p = PROBLEMS["B5_rigid_body"]
tt = torch.linspace(p.t0, p.t1, 101, dtype=torch.float64)
cases = [("MLP 4x2 (test_precision), t in [0, 1]", tp.Field(tp.F32), tp.Y0_MLP, torch.tensor([0.0, 1.0]),
          tp._reference_mlp().detach().numpy()),
         ("B5_rigid_body", p.f, p.y0_tensor().float(), tt.float(), p.reference(tt.numpy()))]
for name, f, y0, t, ref in cases:
    for m in ["bdf", "kvaerno3", "kvaerno4", "kvaerno5", "radau", "trbdf2"]:
        for k in (8.0, 2.0, 1.0, 0.5):
            set_floor(k)
            s = neurodyn.solve(f, y0, t, method=m, rtol=1e-7, atol=1e-9, max_steps=20000, on_failure="return")
            ys = s.ys.detach().double().numpy()
            ok = s.status == "success"
            e = float(np.abs((ys[-1] if name.startswith("MLP") else ys) - ref).max()) if ok else float("nan")
            st = s.stats
            print(f"| {name} | {m} | {k:g} | {s.status} | {e:.2g} | {st['nfe']} | {st['steps']} / {st['rejected']} |",
                  flush=True)
set_floor(2.0)
