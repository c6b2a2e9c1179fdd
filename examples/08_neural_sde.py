"""Neural SDE: learn the drift and the noise level of a double-well process from sample paths.

The data: 512 paths of ``dX = (X - X^3) dt + 0.5 dW`` from ``X(0) ~ N(0, 0.1^2)``, observed at 16 times on [0, 3];
the paths split between the two wells at -1 and +1. The model: ``neurodyn.NeuralSDE`` with an MLP drift and a
learned constant diffusion ``sigma``, solved by Euler--Maruyama (``method="euler"``, step 0.05), a fresh Brownian
path per iteration. The loss compares the distributions at each observation time: in 1-d the Wasserstein-2
distance between two equal-size samples is the mean squared difference of the sorted samples; the loss compares
the states and the increments between observation times (which fix the noise level), and the gradient flows back
through the solver to the drift and to ``sigma``.

    python examples/08_neural_sde.py [--quick] [--out DIR]
"""

import argparse
import pathlib

import matplotlib.pyplot as plt
import torch
from torch import nn

import neurodyn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="fewer training iterations (CI)")
parser.add_argument("--out", default="examples/_out", help="folder for the figure")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_num_threads(1)  # tiny problems: one thread avoids contention

t = torch.linspace(0.0, 3.0, 16)
x0 = 0.1 * torch.randn(512, 1)
true_sde = neurodyn.NeuralSDE(lambda y: y - y ** 3, lambda y: 0.5 * torch.ones_like(y), t=t, method="euler",
                              step_size=0.01, entropy=1)
with torch.no_grad():
    data = true_sde(x0)                                                   # (16, 512, 1)


class ConstantDiffusion(nn.Module):
    """g(y) = sigma, one learned noise level (diagonal noise: the same shape as y)."""

    def __init__(self):
        super().__init__()
        self.log_sigma = nn.Parameter(torch.tensor(0.0))

    def forward(self, y):
        return self.log_sigma.exp() * torch.ones_like(y)


drift = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
diffusion = ConstantDiffusion()
model = neurodyn.NeuralSDE(drift, diffusion, t=t, method="euler", step_size=0.05)   # a new Brownian path per call


def w2(a, b):
    """Wasserstein-2 distance squared between two 1-d samples of equal size, at every time: (T,)."""
    return (a.sort(dim=1).values - b.sort(dim=1).values).pow(2).mean((1, 2))


def loss_fn(ys):
    """Distributions of the states and of the increments between observation times (these fix the noise level)."""
    return w2(ys, data).mean() + w2(ys.diff(dim=0), data.diff(dim=0)).mean()


with torch.no_grad():
    w2_start = w2(model(x0), data).mean().item()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
iters = 250 if args.quick else 800
for _ in range(iters):
    opt.zero_grad()
    loss = loss_fn(model(x0))
    loss.backward()
    opt.step()
with torch.no_grad():
    samples = model(x0, entropy=2)
    w2_end = w2(samples, data).mean().item()
sigma = diffusion.log_sigma.exp().item()
print(f"neural SDE, {iters} Adam steps: mean W2^2 over the 16 times {w2_start:.4f} -> {w2_end:.4f} "
      f"(fresh noise); learned sigma {sigma:.3f} (true 0.5)")
assert w2_end < 0.25 * w2_start and abs(sigma - 0.5) < 0.2

fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
for k in range(20):
    ax[0].plot(t, data[:, k, 0], "k-", lw=0.5, alpha=0.6)
    ax[1].plot(t, samples[:, k, 0], "C0-", lw=0.5, alpha=0.8)
ax[0].set(title="data: dX = (X - X^3) dt + 0.5 dW", xlabel="t", ylim=(-2, 2))
ax[1].set(title=f"neural SDE samples (sigma = {sigma:.2f})", xlabel="t", ylim=(-2, 2))
bins = torch.linspace(-2, 2, 41)
ax[2].hist(data[-1, :, 0], bins=bins, alpha=0.5, color="k", label="data at t=3")
ax[2].hist(samples[-1, :, 0], bins=bins, alpha=0.5, color="C0", label="model at t=3")
ax[2].set(title=f"marginal at t=3 (mean W2^2 {w2_end:.3f})", xlabel="x")
ax[2].legend(fontsize=8)
fig.tight_layout()
out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "08_neural_sde.png", dpi=80)
print(f"wrote {out / '08_neural_sde.png'}")
