"""Augmented Neural ODEs: what a plain Neural ODE cannot represent, and what an augmented one does.

A Neural ODE's flow is a homeomorphism: trajectories cannot cross.

1. The 1-d map ``g(-1) = 1, g(1) = -1``: the two trajectories would have to cross, so a 1-d Neural ODE cannot fit
   it (the best it can do is squeeze both points towards 0: MSE >= 1); ``neurodyn.AugmentedNeuralODE`` with one
   extra dimension goes around (MSE near 0).
2. Nested rings (a disk labelled -1 inside a ring labelled +1), classified by a linear head on z(1): in 2-d the
   flow must keep the disk enclosed by the ring, and gets a linearly separable picture only by squeezing the ring
   through the gaps between samples (after 300 iterations it still misclassifies some points; trained longer it
   classifies them all, with features spread along the read-out instead of at -1 and +1: a larger test MSE and
   more evaluations per solve); with 5 extra dimensions (ANODE) the disk is lifted out of the ring.

    python examples/03_augmented_rings.py [--quick] [--out DIR]
"""

import argparse
import math
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


def mlp_field(dim, hidden=32):
    """dz/dt = MLP(z) (autonomous: NeuralODE detects the one-argument signature)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, dim))


def fit(model, predict, x, y, iters, lr, batch=None):
    """Adam on the MSE of predict(x) against y (minibatches of ``batch`` when given); returns the last loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(iters):
        idx = torch.randint(0, len(x), (batch,)) if batch else slice(None)
        opt.zero_grad()
        loss = (predict(x[idx]) - y[idx]).pow(2).mean()
        loss.backward()
        opt.step()
    return loss.item()


# 1. The 1-d map g(-1) = 1, g(1) = -1 -------------------------------------------------------------------
x1 = torch.tensor([[-1.0], [1.0]])
node_1d = neurodyn.AugmentedNeuralODE(mlp_field(1), in_dim=1, aug_dim=0, rtol=1e-3, atol=1e-4)
anode_1d = neurodyn.AugmentedNeuralODE(mlp_field(2), in_dim=1, aug_dim=1, rtol=1e-3, atol=1e-4)
iters_1d = 150 if args.quick else 400
mse_node_1d = fit(node_1d, node_1d, x1, -x1, iters_1d, 1e-2)
mse_anode_1d = fit(anode_1d, lambda x: anode_1d(x)[..., :1], x1, -x1, iters_1d, 1e-2)  # output: first coordinate
print(f"1-d map g(-1)=1, g(1)=-1: MSE Neural ODE {mse_node_1d:.3f} (cannot go below 1), "
      f"augmented (+1 dim) {mse_anode_1d:.4f}")
assert mse_node_1d > 0.9 and mse_anode_1d < 0.1

# 2. Nested rings -----------------------------------------------------------------------------------------


def rings(n):
    """n points uniform in area: half in the disk |x| <= 0.5 (label -1), half in the ring 1 <= |x| <= 1.5 (+1)."""
    r = torch.cat([0.5 * torch.rand(n // 2).sqrt(), (1.0 + 1.25 * torch.rand(n - n // 2)).sqrt()])
    angle = 2 * math.pi * torch.rand(n)
    return torch.stack([r * angle.cos(), r * angle.sin()], -1), torch.cat([-torch.ones(n // 2), torch.ones(n // 2)])


x, y = rings(512)
x_test, y_test = rings(1000)
iters = 300 if args.quick else 1500
results = {}
for name, aug in (("Neural ODE", 0), ("ANODE (+5 dims)", 5)):
    torch.manual_seed(1)
    model = neurodyn.AugmentedNeuralODE(mlp_field(2 + aug), in_dim=2, aug_dim=aug, out_dim=1, rtol=1e-3, atol=1e-3)
    fit(model, lambda xb, m=model: m(xb).squeeze(-1), x, y, iters, 1e-3, batch=128)
    with torch.no_grad():
        score = model(x_test).squeeze(-1)
        features = model.ode(model.augment(x_test))                   # z(1) before the linear head
    accuracy = (score.sign() == y_test).float().mean().item()
    test_mse = (score - y_test).pow(2).mean().item()
    results[name] = dict(accuracy=accuracy, mse=test_mse, nfe=model.nfe_forward, features=features, model=model)
    print(f"rings, {name}: test accuracy {accuracy:.3f}, test MSE {test_mse:.4f}, "
          f"{model.nfe_forward} evaluations per forward solve")
node, anode = results.values()
print(f"rings: test MSE Neural ODE {node['mse']:.4f} vs ANODE {anode['mse']:.4f} "
      f"({node['mse'] / anode['mse']:.0f}x); accuracy {node['accuracy']:.3f} vs {anode['accuracy']:.3f}")
assert anode["mse"] < node["mse"] and anode["accuracy"] >= node["accuracy"] and anode["accuracy"] > 0.98

fig, ax = plt.subplots(1, 3, figsize=(13, 4))
ax[0].plot([-1, 1], [1, -1], "ko", ms=8, label="targets g(x)")
with torch.no_grad():
    grid = torch.linspace(-1.5, 1.5, 61)[:, None]
    ax[0].plot(grid, node_1d(grid), "C0-", label=f"Neural ODE (MSE {mse_node_1d:.2f})")
    ax[0].plot(grid, anode_1d(grid)[:, 0], "C1-", label=f"ANODE +1 dim (MSE {mse_anode_1d:.3f})")
ax[0].set(title="1-d map g(-1)=1, g(1)=-1", xlabel="x", ylabel="z(1)")
ax[0].legend(fontsize=8)
for k, (name, r) in enumerate(results.items()):
    f = r["features"]
    colors = ["C3" if v < 0 else "C0" for v in y_test]
    ax[k + 1].scatter(f[:, 0], f[:, 1] if f.shape[1] == 2 else f[:, 2], c=colors, s=4)
    ax[k + 1].set(title=f"{name}: features z(1)\naccuracy {r['accuracy']:.3f}, MSE {r['mse']:.3f}, "
                        f"NFE {r['nfe']}", xlabel="z1", ylabel="z2" if f.shape[1] == 2 else "z3 (extra)")
fig.tight_layout()
out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "03_augmented_rings.png", dpi=80)
print(f"wrote {out / '03_augmented_rings.png'}")
