"""FFJORD and flow matching on the 8-Gaussians density: two ways to train a continuous normalizing flow.

- FFJORD (``neurodyn.CNF``): maximum likelihood; every training step solves the flow with the log-density
  (Hutchinson's trace estimator) and backpropagates through it (``gradient="checkpoint"``).
- OT flow matching (``neurodyn.models.flow_matching``): regress a velocity field on straight conditional paths
  between noise and data, paired by minibatch optimal transport; no solve during training.

Both are scored by the exact test negative log-likelihood (the change of variables with the exact trace) against
the best single Gaussian (the data's mean and covariance), and by the evaluations needed to draw samples.

    python examples/09_ffjord_flow_matching.py [--quick] [--out DIR]
"""

import argparse
import pathlib
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import neurodyn
from neurodyn.data.toy2d import sample_2d
from neurodyn.models import ODEnet
from neurodyn.models.flow_matching import (
    ExactOptimalTransportConditionalFlowMatcher,
    VelocityMLP,
    cfm_loss,
    flow_log_likelihood,
    sample_flow,
)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="fewer training iterations (CI)")
parser.add_argument("--out", default="examples/_out", help="folder for the figure")
args = parser.parse_args()
torch.manual_seed(0)
np.random.seed(0)  # the OT pairing of the flow-matching minibatches draws from NumPy's generator (as torchcfm's)
torch.set_num_threads(1)  # tiny problems: one thread avoids contention
gen = torch.Generator().manual_seed(0)

test = sample_2d("8gaussians", 1000, gen)
gaussian = torch.distributions.MultivariateNormal(test.mean(0), torch.cov(test.T))
nll_gaussian = -gaussian.log_prob(test).mean().item()
results = {}

# FFJORD: maximum likelihood through the solver
flow = neurodyn.CNF(ODEnet(2, (64, 64, 64)), dim=2, trace="hutchinson", rtol=1e-5, atol=1e-5, gradient="checkpoint")
opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
start = time.perf_counter()
for _ in range(80 if args.quick else 1000):
    opt.zero_grad()
    loss = -flow.log_prob(sample_2d("8gaussians", 256, gen)).mean()
    loss.backward()
    opt.step()
seconds = time.perf_counter() - start
exact = neurodyn.CNF(flow.field.net, dim=2, trace="exact", rtol=1e-5, atol=1e-5)          # same field, exact trace
with torch.no_grad():
    nll = -exact.log_prob(test).mean().item()
    samples = exact.sample(2000)
results["FFJORD"] = dict(nll=nll, nfe=exact.last_solution.stats["nfe"], seconds=seconds, samples=samples)

# OT flow matching: simulation-free regression
velocity = VelocityMLP(2)
matcher = ExactOptimalTransportConditionalFlowMatcher(sigma=0.1)
opt = torch.optim.Adam(velocity.parameters(), lr=1e-3)
start = time.perf_counter()
for _ in range(400 if args.quick else 3000):
    opt.zero_grad()
    loss = cfm_loss(velocity, matcher, torch.randn(256, 2), sample_2d("8gaussians", 256, gen))
    loss.backward()
    opt.step()
seconds = time.perf_counter() - start
logp, _ = flow_log_likelihood(velocity, test)
drawn = sample_flow(velocity, torch.randn(2000, 2))
results["OT flow matching"] = dict(nll=-logp.mean().item(), nfe=drawn.nfe, seconds=seconds, samples=drawn.samples)

for name, r in results.items():
    print(f"{name}: test NLL {r['nll']:.3f} nats (single Gaussian {nll_gaussian:.3f}), {r['nfe']} evaluations to "
          f"sample, training {r['seconds']:.1f} s")
print(f"test NLL: FFJORD {results['FFJORD']['nll']:.3f}, OT flow matching {results['OT flow matching']['nll']:.3f}, "
      f"single Gaussian {nll_gaussian:.3f}")
assert all(r["nll"] < nll_gaussian - 0.3 for r in results.values()), "both flows should beat a single Gaussian"

fig, ax = plt.subplots(1, 3, figsize=(12, 4))
ax[0].scatter(*test.T, s=2, c="k")
ax[0].set(title="data: 8 Gaussians")
for k, (name, r) in enumerate(results.items()):
    ax[k + 1].scatter(*r["samples"].T, s=2, c=f"C{k}")
    ax[k + 1].set(title=f"{name}: NLL {r['nll']:.2f}, sampling NFE {r['nfe']}")
for a in ax:
    a.set(xlim=(-4.5, 4.5), ylim=(-4.5, 4.5), aspect="equal")
fig.tight_layout()
out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "09_ffjord_flow_matching.png", dpi=80)
print(f"wrote {out / '09_ffjord_flow_matching.png'}")
