"""FFJORD training step: neurodyn's CNF vs a faithful re-implementation of FFJORD's code on torchdiffeq 0.2.5.

What is compared (one process, one thread, interleaved iteration by iteration, alternating which goes first):

* the FFJORD toy setup on 8gaussians: one CNF block, ODEnet of concatsquash layers 2-64-64-64-2 with tanh,
  trainable end time ``sqrt_end_time^2`` initialised at 0.5, divergence by Hutchinson with a Gaussian probe drawn
  once per solve, dopri5 at rtol = atol = 1e-5, adjoint gradients, Adam lr 1e-3 weight decay 1e-5, batch 100,
  float32;
* both models start from the same weights and see the same batch at each iteration; each then trains on its own
  (their parameters drift apart, so the NFE of each is reported beside the times);
* the FFJORD side mirrors FFJORD's ``lib/layers`` (``ConcatSquashLinear``, ``ODEnet``, ``ODEfunc`` with
  ``divergence_approx`` and its probe ``_e`` sampled in ``before_odeint``, ``CNF`` with ``odeint_adjoint`` on the
  tuple state ``(z, delta_logp)``) and ``train_toy.compute_loss`` (``logpx = logpz - delta_logp``), written here;
* one iteration = sample batch, forward solve, loss, backward (adjoint solve), optimizer step.

    taskset -c 0 python benchmarks/bench_ffjord.py --iters 40
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn
from torchdiffeq import odeint_adjoint

from neurodyn.data.toy2d import sample_2d
from neurodyn.models.cnf import CNF, ODEnet


# ----------------------------------------------------------------------------- FFJORD's code on torchdiffeq
class FConcatSquash(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)
        self._hyper_gate = nn.Linear(1, dim_out)

    def forward(self, t, x):
        return self._layer(x) * torch.sigmoid(self._hyper_gate(t.view(1, 1))) + self._hyper_bias(t.view(1, 1))


class FODEnet(nn.Module):
    def __init__(self, dims=(2, 64, 64, 64, 2)):
        super().__init__()
        self.layers = nn.ModuleList(FConcatSquash(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.activation_fns = nn.ModuleList(nn.Tanh() for _ in dims[2:-1] + (None,))

    def forward(self, t, y):
        dx = y
        for i, layer in enumerate(self.layers):
            dx = layer(t, dx)
            if i < len(self.layers) - 1:
                dx = self.activation_fns[i](dx)
        return dx


def divergence_approx(f, y, e):
    e_dzdx = torch.autograd.grad(f, y, e, create_graph=True)[0]
    return (e_dzdx * e).view(y.shape[0], -1).sum(dim=1)


class FODEfunc(nn.Module):
    def __init__(self, diffeq):
        super().__init__()
        self.diffeq = diffeq
        self._e = None

    def before_odeint(self, e=None):
        self._e = e

    def forward(self, t, states):
        y = states[0]
        t = torch.as_tensor(t).type_as(y)
        if self._e is None:
            self._e = torch.randn_like(y)
        with torch.set_grad_enabled(True):
            y.requires_grad_(True)
            t.requires_grad_(True)
            dy = self.diffeq(t, y)
            divergence = divergence_approx(dy, y, e=self._e).view(y.shape[0], 1)
        return dy, -divergence


class FCNF(nn.Module):
    def __init__(self, odefunc, T=0.5, rtol=1e-5, atol=1e-5):
        super().__init__()
        self.sqrt_end_time = nn.Parameter(torch.sqrt(torch.tensor(T)))
        self.odefunc, self.rtol, self.atol = odefunc, rtol, atol
        self.nfe = 0

    def forward(self, z, logpz):
        times = torch.stack([torch.tensor(0.0).to(z), self.sqrt_end_time * self.sqrt_end_time])
        self.odefunc.before_odeint()
        z_t, logpz_t = odeint_adjoint(self.odefunc, (z, logpz), times, atol=self.atol, rtol=self.rtol,
                                      method="dopri5")
        return z_t[-1], logpz_t[-1]


def standard_normal_logprob(z):
    return -0.5 * math.log(2 * math.pi) - z.pow(2) / 2


class Counter(nn.Module):
    """Counts the calls of the wrapped ODEfunc (NFE, forward and adjoint together)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.n = inner, 0

    def before_odeint(self, e=None):
        self.inner.before_odeint(e)

    def forward(self, t, y):
        self.n += 1
        return self.inner(t, y)


# ----------------------------------------------------------------------------- the benchmark
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)

    ours = CNF(ODEnet(2, (64, 64, 64), "tanh"), dim=2, trace="hutchinson", noise="gaussian", t1=0.5, train_t1=True,
               method="dopri5", rtol=1e-5, atol=1e-5, gradient="adjoint")
    odefunc = FODEfunc(FODEnet())
    theirs = FCNF(odefunc)
    # same initial weights: copy ours into theirs (layer by layer)
    with torch.no_grad():
        for lo, lt in zip(ours.field.net.layers, odefunc.diffeq.layers):
            lt._layer.weight.copy_(lo.layer.weight)
            lt._layer.bias.copy_(lo.layer.bias)
            lt._hyper_gate.weight.copy_(lo.hyper_gate.weight)
            lt._hyper_gate.bias.copy_(lo.hyper_gate.bias)
            lt._hyper_bias.weight.copy_(lo.hyper_bias.weight)
    counter = Counter(odefunc)
    theirs.odefunc = counter
    opt_o = torch.optim.Adam(ours.parameters(), lr=1e-3, weight_decay=1e-5)
    opt_t = torch.optim.Adam(theirs.parameters(), lr=1e-3, weight_decay=1e-5)
    g = torch.Generator().manual_seed(a.seed + 1)

    def step_ours(x):
        opt_o.zero_grad()
        loss = -ours.log_prob(x).mean()
        nfe_f = int(ours.last_solution.stats["nfe"])
        loss.backward()
        opt_o.step()
        return float(loss.detach()), nfe_f + int(ours.last_solution.stats.get("nfe_backward", 0))

    def step_theirs(x):
        counter.n = 0
        opt_t.zero_grad()
        zero = torch.zeros(x.shape[0], 1)
        z, delta_logp = theirs(x, zero)
        logpz = standard_normal_logprob(z).sum(1, keepdim=True)
        loss = -(logpz - delta_logp).mean()
        loss.backward()
        opt_t.step()
        return float(loss.detach()), counter.n

    times = {"neurodyn": [], "ffjord": []}
    nfes = {"neurodyn": [], "ffjord": []}
    losses = {"neurodyn": [], "ffjord": []}
    runs = {"neurodyn": step_ours, "ffjord": step_theirs}
    for it in range(a.iters):
        x = sample_2d("8gaussians", 100, g)
        order = ("neurodyn", "ffjord") if it % 2 == 0 else ("ffjord", "neurodyn")
        for name in order:
            t0 = time.perf_counter()
            loss, nfe = runs[name](x)
            times[name].append(time.perf_counter() - t0)
            nfes[name].append(nfe)
            losses[name].append(loss)
    skip = min(2, a.iters - 1)  # first iterations: allocator and autograd warm-up
    print(f"FFJORD 8gaussians training step, {a.iters} interleaved iterations (first {skip} not timed), 1 thread")
    print(f"{'':10s} {'median s/iter':>14s} {'mean s/iter':>12s} {'mean NFE (f+b)':>15s} {'s per 100 NFE':>14s} "
          f"{'last loss':>10s}")
    for name in ("neurodyn", "ffjord"):
        ts, ns = times[name][skip:], nfes[name][skip:]
        print(f"{name:10s} {statistics.median(ts):14.4f} {statistics.mean(ts):12.4f} {statistics.mean(ns):15.1f} "
              f"{100 * sum(ts) / sum(ns):14.4f} {losses[name][-1]:10.4f}")
    ratio = statistics.median(times["ffjord"][skip:]) / statistics.median(times["neurodyn"][skip:])
    per_nfe = (sum(times["ffjord"][skip:]) / sum(nfes["ffjord"][skip:])) / \
              (sum(times["neurodyn"][skip:]) / sum(nfes["neurodyn"][skip:]))
    print(f"speed-up (FFJORD median / neurodyn median): {ratio:.2f}x; per NFE: {per_nfe:.2f}x")


if __name__ == "__main__":
    main()
