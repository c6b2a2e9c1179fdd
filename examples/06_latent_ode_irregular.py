"""Latent ODE on irregularly sampled series: reconstruct whole trajectories from a random half of the points.

The data: ``neurodyn.data.periodic_toy`` (sines of random frequency and offset, the toy of Rubanova et al. 2019),
40 times on [0, 2.5]. Each series shows the encoder its own random half of the points
(``neurodyn.data.interpolation_mask``; ``neurodyn.data.compact`` gives each row its own observation times); the
model (``neurodyn.LatentODE``: an ODE-RNN encoder run backward in time, a latent ODE, a linear decoder) is trained
on the negative ELBO to reconstruct all 40 points. It is scored on held-out series against the per-series mean of
the observed points (what a model that has not learnt the dynamics predicts), and the posterior is drawn on a
dense grid: a mean and a band between observations.

    python examples/06_latent_ode_irregular.py [--quick] [--out DIR]
"""

import argparse
import pathlib

import matplotlib.pyplot as plt
import torch

import neurodyn
from neurodyn.data import compact, interpolation_mask, periodic_toy

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="fewer epochs (CI)")
parser.add_argument("--out", default="examples/_out", help="folder for the figure")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_num_threads(1)  # tiny problems: one thread avoids contention
gen = torch.Generator().manual_seed(0)

times, values = periodic_toy(n_series=300, n_points=40, t_max=2.5, seed=0)   # (300, 40), (300, 40, 1)
t = times[0]                                                                  # one grid; each row sees half of it
x_train, x_test = values[:250], values[250:]
seen_test = interpolation_mask(torch.ones_like(x_test), 0.5, gen)

model = neurodyn.LatentODE(input_size=1, latent_size=6, rec_size=12, units=40, rec_units=40, gru_units=40,
                           encoder_steps=25)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
epochs = 8 if args.quick else 60
curve = []
for epoch in range(epochs):
    kl_weight = 0.0 if epoch < 5 else min(1.0, (epoch - 5) / 5)               # KL annealing
    for idx in torch.randperm(len(x_train)).split(25):
        x = x_train[idx]
        full = torch.ones_like(x)
        shown = compact(t, x, interpolation_mask(full, 0.5, gen))              # each row: its own 20 times
        opt.zero_grad()
        out = model.loss(shown.values, shown.times, shown.mask, t_pred=t, y_pred=x, mask_pred=full,
                         n_samples=3, kl_weight=kl_weight)
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        test = compact(t, x_test, seen_test)
        pred, _ = model(test.values, test.times, test.mask, t_pred=t, use_mean=True)
    curve.append((pred[0] - x_test).pow(2).mean().item())
    print(f"epoch {epoch + 1}: test MSE (posterior mean, all 40 points) {curve[-1]:.3f}")

observed_mean = (x_test * seen_test).sum(1, keepdim=True) / seen_test.sum(1, keepdim=True)
baseline = (x_test - observed_mean).pow(2).mean().item()
print(f"latent ODE: test MSE {curve[-1]:.3f} vs {baseline:.3f} for the per-series mean of the observed points")
assert curve[-1] < 0.85 * baseline

t_dense = torch.linspace(0.0, 2.5, 200)
with torch.no_grad():
    samples, _ = model(test.values[:3], test.times[:3], test.mask[:3], t_pred=t_dense, n_samples=30)  # (30, 3, 200, 1)
fig, ax = plt.subplots(1, 4, figsize=(15, 3.4))
for k in range(3):
    lo, hi = samples[:, k, :, 0].quantile(0.05, 0), samples[:, k, :, 0].quantile(0.95, 0)
    ax[k].fill_between(t_dense, lo, hi, color="C0", alpha=0.25, label="posterior 5-95%")
    ax[k].plot(t_dense, samples[:, k, :, 0].mean(0), "C0-", label="posterior mean")
    ax[k].plot(t, x_test[k, :, 0], "k.", ms=3, label="all points")
    shown_k = seen_test[k, :, 0] > 0
    ax[k].plot(t[shown_k], x_test[k, shown_k, 0], "ro", ms=4, mfc="none", label="shown to the encoder")
    ax[k].set(title=f"test series {k}", xlabel="t")
ax[0].legend(fontsize=7)
ax[3].plot(range(1, epochs + 1), curve, "o-", label="latent ODE")
ax[3].axhline(baseline, color="k", ls="--", label="per-series mean")
ax[3].set(title="test MSE", xlabel="epoch")
ax[3].legend(fontsize=8)
fig.tight_layout()
out_dir = pathlib.Path(args.out)
out_dir.mkdir(parents=True, exist_ok=True)
fig.savefig(out_dir / "06_latent_ode_irregular.png", dpi=80)
print(f"wrote {out_dir / '06_latent_ode_irregular.png'}")
