"""Neural ODE basics and continuous depth: the state z(t) at any time t.

1. Solve a known linear ODE with ``neurodyn.solve(..., dense=True)`` and read the solution at arbitrary times
   with ``sol.evaluate(t)``; compare with the closed form ``expm(A t) z0``.
2. Fit a ``neurodyn.NeuralODE`` to 12 noisy observations of a spiral, then ask the trained model for z(t) at
   400 times between the observations (``output="solution"``, then ``sol.evaluate``): a continuous-depth model
   gives the whole trajectory, and it is closer to the truth than joining the observations by straight lines.

    python examples/01_neural_ode_basics.py [--quick] [--out DIR]
"""

import argparse
import pathlib

import matplotlib.pyplot as plt
import torch

import neurodyn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="fewer training iterations (CI)")
parser.add_argument("--out", default="examples/_out", help="folder for the figure")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_num_threads(1)  # tiny problems: one thread avoids contention

# 1. A known ODE, its dense solution at arbitrary times ------------------------------------------------
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
z0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
t_obs = torch.linspace(0.0, 6.0, 12, dtype=torch.float64)
sol = neurodyn.solve(lambda t, z: z @ A.T, z0, t_obs, method="tsit5", rtol=1e-8, atol=1e-10, dense=True)
t_any = torch.rand(1000, dtype=torch.float64) * 6.0                        # times the solver never stopped at
exact = torch.stack([torch.linalg.matrix_exp(A * s) @ z0 for s in t_any])
dense_error = (sol.evaluate(t_any) - exact).abs().max().item()
print(f"dense output: max |z(t) - expm(At) z0| over 1000 random t = {dense_error:.1e} "
      f"({sol.stats['steps']} steps, {sol.stats['nfe']} evaluations)")
assert dense_error < 1e-6

# 2. Fit a Neural ODE to 12 noisy observations, query it anywhere -------------------------------------
z_obs = sol.ys.float() + 0.02 * torch.randn(12, 2)
field = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
model = neurodyn.NeuralODE(field, t=t_obs.float(), output="trajectory", method="tsit5", rtol=1e-4, atol=1e-5)
opt = torch.optim.Adam(model.parameters(), lr=2e-2)
iters = 300 if args.quick else 1000
for _ in range(iters):
    opt.zero_grad()
    loss = (model(z_obs[0]) - z_obs).pow(2).mean()
    loss.backward()
    opt.step()
print(f"training: {iters} Adam steps, final MSE on the observations {loss.item():.2e}, "
      f"{model.nfe_forward} evaluations per forward solve")

model.output = "solution"                          # now forward returns the Solution, with its dense output
t_fine = torch.linspace(0.0, 6.0, 400)
with torch.no_grad():
    z_fine = model(z_obs[0]).evaluate(t_fine)                           # z(t) at 400 times, shape (400, 2)
true_fine = sol.evaluate(t_fine.double()).float()
path = neurodyn.LinearPath(t_obs.float(), z_obs)                               # straight lines between them
lines = torch.stack([path.evaluate(s) for s in t_fine])
rmse_node = (z_fine - true_fine).pow(2).sum(-1).mean().sqrt().item()
rmse_lines = (lines - true_fine).pow(2).sum(-1).mean().sqrt().item()
print(f"between the observations (400 times): RMSE Neural ODE {rmse_node:.3f}, straight lines {rmse_lines:.3f}")
assert rmse_node < rmse_lines, "the Neural ODE should beat linear interpolation between sparse observations"

fig, ax = plt.subplots(1, 2, figsize=(10, 4))
ax[0].plot(*true_fine.T, "k-", lw=1, label="true z(t)")
ax[0].plot(*lines.T, "C1--", lw=1, label=f"straight lines (RMSE {rmse_lines:.2f})")
ax[0].plot(*z_fine.T, "C0-", lw=1.5, label=f"Neural ODE z(t) (RMSE {rmse_node:.2f})")
ax[0].plot(*z_obs.T, "ko", ms=4, label="12 observations")
ax[0].set(title="continuous depth: z(t) at 400 times", xlabel="z1", ylabel="z2")
ax[0].legend(fontsize=8, loc="lower left")
ax[1].plot(t_fine, z_fine[:, 0], "C0-", label="Neural ODE z1(t)")
ax[1].plot(t_fine, true_fine[:, 0], "k-", lw=0.8, label="true z1(t)")
ax[1].plot(t_obs, z_obs[:, 0], "ko", ms=4)
ax[1].set(title="first coordinate over time", xlabel="t")
ax[1].legend(fontsize=8)
fig.tight_layout()
out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "01_neural_ode_basics.png", dpi=80)
print(f"wrote {out / '01_neural_ode_basics.png'}")
