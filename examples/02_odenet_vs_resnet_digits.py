"""ODE-Net vs ResNet on scikit-learn's 8x8 digits (1797 images, bundled with scikit-learn: nothing downloaded).

Both classifiers: a linear stem (64 pixels -> 32 features), a feature block, tanh and a linear head to 10 classes.

- ResNet: 6 residual layers ``h <- h + f_k(h)``, each with its own weights.
- ODE-Net: ONE vector field ``f(t, h)`` integrated from t=0 to 1 by ``neurodyn.NeuralODE`` (adaptive dopri5):
  the continuous-depth limit of the ResNet, with a sixth of its block parameters.

After training, the ODE-Net's tolerance is a knob at test time: a looser tolerance means fewer vector-field
evaluations (NFE) per image batch, at some accuracy.

    python examples/02_odenet_vs_resnet_digits.py [--quick] [--out DIR]
"""

import argparse
import pathlib
import time

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import neurodyn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="fewer epochs (CI)")
parser.add_argument("--out", default="examples/_out", help="folder for the figure")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_num_threads(1)  # tiny problems: one thread avoids contention

digits = load_digits()
x_train, x_test, y_train, y_test = train_test_split(digits.data / 16.0, digits.target, test_size=0.2,
                                                    stratify=digits.target, random_state=0)
x_train, x_test = torch.tensor(x_train, dtype=torch.float32), torch.tensor(x_test, dtype=torch.float32)
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)
WIDTH = 32


class Block(nn.Module):
    """f(t, h): an MLP on the features with the time as an extra input."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(WIDTH + 1, 64), nn.Tanh(), nn.Linear(64, WIDTH))

    def forward(self, t, h):
        return self.net(torch.cat([h, t.expand(h.shape[0], 1)], -1))


class ResNet(nn.Module):
    def __init__(self, depth=6):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(depth))

    def forward(self, h):
        for k, f in enumerate(self.blocks):
            h = h + f(torch.tensor(k / len(self.blocks)), h) / len(self.blocks)
        return h


def classifier(block):
    return nn.Sequential(nn.Linear(64, WIDTH), block, nn.Tanh(), nn.Linear(WIDTH, 10))


models = {"ResNet (6 layers)": classifier(ResNet()),
          "ODE-Net": classifier(neurodyn.NeuralODE(Block(), t=(0.0, 1.0), method="dopri5", rtol=1e-3, atol=1e-3))}
epochs = 20 if args.quick else 60
results = {}
for name, model in models.items():
    torch.manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start, curve = time.perf_counter(), []
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train)).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
        with torch.no_grad():
            curve.append((model(x_test).argmax(-1) == y_test).float().mean().item())
    params = sum(p.numel() for p in model[1].parameters())
    results[name] = dict(accuracy=curve[-1], curve=curve, params=params, seconds=time.perf_counter() - start)
    print(f"{name:>17}: test accuracy {curve[-1]:.3f}, block parameters {params}, "
          f"training {results[name]['seconds']:.1f} s ({epochs} epochs)")

ode = models["ODE-Net"][1]
sweep = []
with torch.no_grad():
    for tol in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        ode.rtol = ode.atol = tol
        accuracy = (models["ODE-Net"](x_test).argmax(-1) == y_test).float().mean().item()
        sweep.append((tol, ode.nfe_forward, accuracy))
        print(f"ODE-Net at test time, rtol=atol={tol:g}: NFE {ode.nfe_forward}, accuracy {accuracy:.3f}")
res, odenet = results["ResNet (6 layers)"], results["ODE-Net"]
print(f"test accuracy: ODE-Net {odenet['accuracy']:.3f} ({odenet['params']} block parameters), ResNet "
      f"{res['accuracy']:.3f} ({res['params']}); ODE-Net NFE {sweep[0][1]} at tol 0.1 to {sweep[-1][1]} at 1e-5")
assert odenet["accuracy"] > 0.93 and res["accuracy"] > 0.93 and odenet["params"] * 5 < res["params"]
assert sweep[0][1] < sweep[-1][1], "a looser tolerance should take fewer evaluations"

fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
for name, r in results.items():
    ax[0].plot(range(1, epochs + 1), r["curve"], "o-", ms=3, label=f"{name}: {r['params']} block params")
ax[0].set(title="test accuracy on the 8x8 digits", xlabel="epoch", ylim=(0.5, 1.0))
ax[0].legend(fontsize=8)
ax[1].plot([s[1] for s in sweep], [s[2] for s in sweep], "o-")
for tol, nfe, accuracy in sweep:
    ax[1].annotate(f"tol {tol:g}", (nfe, accuracy), fontsize=8)
ax[1].set(title="ODE-Net: test-time tolerance", xlabel="NFE per forward solve", ylabel="test accuracy")
fig.tight_layout()
out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "02_odenet_vs_resnet_digits.png", dpi=80)
print(f"wrote {out / '02_odenet_vs_resnet_digits.png'}")
