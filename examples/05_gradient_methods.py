"""Checkpointed vs adjoint gradients: memory, time and agreement with backpropagation through the solver.

One MLP vector field, a batch of 256 states (32 with --quick), a loss on z(T), and the three gradient methods
of ``neurodyn.NeuralODE`` (and ``neurodyn.solve``):

- ``gradient="direct"``: autograd through every step; memory grows with the steps;
- ``gradient="adjoint"``: the continuous adjoint solved backward; O(1) memory, gradient accurate to the tolerance;
- ``gradient="checkpoint"``: the exact gradient of the discrete solve, replayed from a few stored states;
  bounded memory.

Memory is what autograd keeps between the forward and the backward pass (the bytes of the saved tensors,
counted with ``torch.autograd.graph.saved_tensors_hooks``), for T = 1, 2, 4, 8 (more steps as T grows).

    python examples/05_gradient_methods.py [--quick] [--out DIR]
"""

import argparse
import pathlib
import time

import matplotlib.pyplot as plt
import torch

import neurodyn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="smaller batch (CI)")
parser.add_argument("--out", default="examples/_out", help="folder for the figure")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_num_threads(1)  # tiny problems: one thread avoids contention
torch.set_default_dtype(torch.float64)

field = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                            torch.nn.Linear(64, 2))
with torch.no_grad():
    for layer in field[::2]:
        layer.weight.mul_(1.5)                          # a livelier field: more steps as T grows
z0 = torch.randn(32 if args.quick else 256, 2)
METHODS = ("direct", "adjoint", "checkpoint")


def gradient_step(gradient, T):
    """Loss on z(T), its gradient; returns (flat gradient, saved MiB, seconds, steps)."""
    saved = [0]

    def pack(x):
        saved[0] += x.numel() * x.element_size()
        return x

    field.zero_grad()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model = neurodyn.NeuralODE(field, t=(0.0, T), method="dopri5", rtol=1e-7, atol=1e-9, gradient=gradient)
        z_T = model(z0)
    z_T.pow(2).mean().backward()
    seconds = time.perf_counter() - start
    grad = torch.cat([p.grad.flatten() for p in field.parameters()])
    return grad, saved[0] / 2 ** 20, seconds, model.last_solution.stats["steps"]


horizons = (1.0, 2.0, 4.0, 8.0)
for m in METHODS:
    gradient_step(m, 0.5)                               # warm-up (first calls are slower)
memory = {m: [] for m in METHODS}
seconds = {m: [] for m in METHODS}
rel_error = {m: [] for m in METHODS}
for T in horizons:
    results = {m: gradient_step(m, T) for m in METHODS}
    reference = results["direct"][0]
    for m in METHODS:
        grad, mib, sec, steps = results[m]
        memory[m].append(mib)
        seconds[m].append(sec)
        rel_error[m].append(((grad - reference).norm() / reference.norm()).item())
    print(f"T={T:g} ({results['direct'][3]} steps): " + "; ".join(
        f"{m} {memory[m][-1]:.2f} MiB {seconds[m][-1]:.2f} s rel. diff {rel_error[m][-1]:.1e}" for m in METHODS))

print(f"memory growth T=8 vs T=1: direct {memory['direct'][-1] / memory['direct'][0]:.1f}x, "
      f"adjoint {memory['adjoint'][-1] / memory['adjoint'][0]:.1f}x, "
      f"checkpoint {memory['checkpoint'][-1] / memory['checkpoint'][0]:.1f}x")
print(f"at T=8: checkpoint gradient = direct to {rel_error['checkpoint'][-1]:.1e}, "
      f"adjoint to {rel_error['adjoint'][-1]:.1e}; memory direct/checkpoint "
      f"{memory['direct'][-1] / memory['checkpoint'][-1]:.0f}x")
assert max(rel_error["checkpoint"]) < 1e-10, "checkpointing reproduces the discrete gradient"
assert max(rel_error["adjoint"]) < 1e-4, "the adjoint gradient agrees to about the solver tolerance"
assert memory["direct"][-1] > 4 * memory["checkpoint"][-1] and memory["direct"][-1] > 4 * memory["adjoint"][-1]

fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
for m in METHODS:
    ax[0].plot(horizons, memory[m], "o-", label=m)
    ax[1].plot(horizons, seconds[m], "o-", label=m)
ax[0].set(title="autograd memory kept after forward", xlabel="T", ylabel="MiB", xscale="log", yscale="log")
ax[1].set(title="forward + backward time", xlabel="T", ylabel="s", xscale="log")
ax[2].bar(["adjoint", "checkpoint"], [max(rel_error["adjoint"]), max(max(rel_error["checkpoint"]), 1e-17)],
          color=["C1", "C2"])
ax[2].set(title="max relative gradient difference vs direct", yscale="log")
ax[0].legend()
for a in ax[:2]:
    a.set_xticks(horizons, [f"{T:g}" for T in horizons])
    a.minorticks_off()
fig.tight_layout()
out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "05_gradient_methods.png", dpi=80)
print(f"wrote {out / '05_gradient_methods.png'}")
