"""Stiff training with ``method="auto"``: a Neural ODE with a fast, known relaxation (rate 1000) and a learned
slow part.

The data: a slow damped rotation ``x' = A x`` and a fast variable that relaxes onto ``x1^2`` at rate 1000
(``y' = -1000 (y - x1^2)``). The model keeps the stiff relaxation and learns the rest with an MLP:
``x' = net(x)[:2]``, ``y' = -1000 (y - net(x)[2])``. An explicit method (tsit5) is held at its stability boundary
(h ~ 3e-3) through the whole solve; ``method="auto"`` starts with tsit5, detects the stiffness and switches to an
implicit method (kvaerno5), with gradients through it as usual.

    python examples/04_stiff_training.py [--quick] [--out DIR]
"""

import argparse
import pathlib
import time

import matplotlib.pyplot as plt
import torch

import neurodyn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="fewer training iterations (CI)")
parser.add_argument("--out", default="examples/_out", help="folder for the figure")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_num_threads(1)  # tiny problems: one thread avoids contention
K = 1000.0
A = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]])


def true_field(t, z):
    x, y = z[..., :2], z[..., 2:]
    return torch.cat([x @ A.T, -K * (y - x[..., :1] ** 2)], -1)


class StiffField(torch.nn.Module):
    """Learned slow dynamics, known fast relaxation of y onto a learned target."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))

    def forward(self, t, z):
        x, y = z[..., :2], z[..., 2:]
        d = self.net(x)
        return torch.cat([d[..., :2], -K * (y - d[..., 2:])], -1)


z0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.5, 0.5], [-1.0, 0.5, 1.0]])        # 3 trajectories, state (x1, x2, y)
t = torch.linspace(0.0, 3.0, 16)
with torch.no_grad():
    data = neurodyn.solve(true_field, z0, t, method="auto", rtol=1e-6, atol=1e-8).ys   # (16, 3, 3)

field = StiffField()


def loss_and_stats(method):
    sol = neurodyn.solve(field, z0, t, method=method, rtol=1e-4, atol=1e-6)
    return (sol.ys - data).pow(2).mean(), sol


# One training step with each method: the cost of an explicit method on a stiff problem.
cost = {}
for method in ("tsit5", "auto"):
    start = time.perf_counter()
    loss, sol = loss_and_stats(method)
    loss.backward()
    cost[method] = (sol.stats["nfe"], sol.stats["steps"], time.perf_counter() - start)
    field.zero_grad()
    print(f"{method:>5}: {sol.stats['steps']:5d} steps, {sol.stats['nfe']:6d} evaluations, "
          f"{cost[method][2]:.2f} s for forward + backward; switches: {sol.stats.get('switches', '-')}")
assert cost["auto"][0] * 5 < cost["tsit5"][0], "auto should need far fewer evaluations than tsit5 here"

iters = 30 if args.quick else 300
opt = torch.optim.Adam(field.parameters(), lr=1e-2)
losses = []
start = time.perf_counter()
for _ in range(iters):
    opt.zero_grad()
    loss, sol = loss_and_stats("auto")
    loss.backward()
    opt.step()
    losses.append(loss.item())
print(f"trained {iters} steps with method='auto' in {time.perf_counter() - start:.1f} s: "
      f"MSE {losses[0]:.3f} -> {losses[-1]:.4f}")
assert losses[-1] < losses[0] / 5

fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
t_fine = torch.linspace(0.0, 3.0, 200)
with torch.no_grad():
    pred = neurodyn.solve(field, z0, t_fine, method="auto", rtol=1e-4, atol=1e-6).ys
for k in range(3):
    ax[0].plot(t, data[:, k, 0], f"C{k}o", ms=3)
    ax[0].plot(t_fine, pred[:, k, 0], f"C{k}-")
    ax[1].plot(t, data[:, k, 2], f"C{k}o", ms=3)
    ax[1].plot(t_fine, pred[:, k, 2], f"C{k}-")
ax[0].set(title="slow coordinate x1: data (dots), model (lines)", xlabel="t")
ax[1].set(title="fast coordinate y (relaxation rate 1000)", xlabel="t")
ax[2].bar(["tsit5", "auto"], [cost["tsit5"][0], cost["auto"][0]], color=["C3", "C2"])
ax[2].set(title="evaluations per training solve", yscale="log")
fig.tight_layout()
out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "04_stiff_training.png", dpi=80)
print(f"wrote {out / '04_stiff_training.png'}")
