"""Hamiltonian neural network (HNN) vs a plain network on a pendulum: energy conservation over a long rollout.

The pendulum ``H(q, p) = p^2 / 2 + (1 - cos q)``. Both models learn the field ``dx/dt`` from noisy samples
``(x, dx/dt)``: ``neurodyn.HNN`` learns a scalar H and uses its symplectic gradient ``(dH/dp, -dH/dq)``;
``neurodyn.DerivativeMLP`` outputs ``dx/dt`` directly. Rolled out with ``neurodyn.solve`` far beyond the
training data's time scale, the plain network drifts in energy (it spirals in or out); the HNN's orbits stay
on level sets of its learned H, so the true energy stays close to its initial value.

    python examples/10_hamiltonian_nn.py [--quick] [--out DIR]
"""

import argparse
import pathlib

import matplotlib.pyplot as plt
import torch

import neurodyn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="fewer training steps (CI)")
parser.add_argument("--out", default="examples/_out", help="folder for the figure")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_num_threads(1)  # tiny problems: one thread avoids contention


def energy(x):
    return 0.5 * x[..., 1] ** 2 + 1 - torch.cos(x[..., 0])


def true_field(x):
    return torch.stack([x[..., 1], -torch.sin(x[..., 0])], -1)


# Training data: states with energy up to ~1.5 (libration), derivatives with noise
x = torch.rand(2000, 2) * torch.tensor([3.0, 3.0]) - torch.tensor([1.5, 1.5])
x = x[energy(x) < 1.5][:1000]
dxdt = true_field(x) + 0.05 * torch.randn_like(x)

models = {"HNN": neurodyn.HNN(2, 200), "plain MLP": neurodyn.DerivativeMLP(2, 200)}
steps = 500 if args.quick else 3000
for name, model in models.items():
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,))
        opt.zero_grad()
        loss = (model.time_derivative(x[idx]) - dxdt[idx]).pow(2).mean()
        loss.backward()
        opt.step()
    print(f"{name}: {steps} Adam steps, derivative MSE {loss.item():.4f} (noise variance 0.0025)")

x0 = torch.tensor([[1.0, 0.0], [0.0, 1.2], [-0.5, -0.5]])
t = torch.linspace(0.0, 50.0, 501)
rollout, drift = {}, {}
with torch.no_grad():
    truth = neurodyn.solve(lambda t, y: true_field(y), x0, t, method="dopri5", rtol=1e-6, atol=1e-8).ys
for name, model in models.items():
    ys = neurodyn.solve(model, x0, t, method="dopri5", rtol=1e-6, atol=1e-6).ys.detach()    # (501, 3, 2)
    rollout[name] = ys
    drift[name] = (energy(ys) - energy(x0)).abs().mean().item()
    print(f"{name}: mean |E(t) - E(0)| over t in [0, 50], 3 orbits = {drift[name]:.4f}")
print(f"energy drift (mean |E(t) - E(0)|, t <= 50): HNN {drift['HNN']:.4f}, plain MLP {drift['plain MLP']:.4f} "
      f"({drift['plain MLP'] / drift['HNN']:.1f}x)")
assert drift["HNN"] < drift["plain MLP"], "the HNN should conserve energy better than the plain network"

fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
for k, (name, ys) in enumerate(rollout.items()):
    for j in range(3):
        ax[k].plot(truth[:, j, 0], truth[:, j, 1], "k-", lw=0.6)
        ax[k].plot(ys[:, j, 0], ys[:, j, 1], f"C{j}-", lw=0.8)
    ax[k].set(title=f"{name} rollout, t in [0, 50] (black: true)", xlabel="q", ylabel="p")
    ax[2].plot(t, (energy(ys) - energy(x0)).mean(-1), label=f"{name} (mean |drift| {drift[name]:.3f})")
ax[2].set(title="energy E(t) - E(0), averaged over 3 orbits", xlabel="t")
ax[2].legend(fontsize=8)
fig.tight_layout()
out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "10_hamiltonian_nn.png", dpi=80)
print(f"wrote {out / '10_hamiltonian_nn.png'}")
