"""A bouncing ball with events: bounce times against the closed form, then gravity and restitution learned from
noisy heights by differentiating through the bounces.

The state is ``(height, velocity)`` with ``height'' = -g``. A bounce is an :class:`neurodyn.Event`: the height
crosses 0 downward (``direction=-1``) and the jump map sets ``v -> -e v``. The event times are differentiable
(implicit function theorem), so a loss on the heights has a gradient with respect to ``g`` and ``e``.

    python examples/11_bouncing_ball.py [--quick] [--out DIR]
"""

import argparse
import math
import pathlib

import matplotlib.pyplot as plt
import torch

import neurodyn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="fewer optimisation steps (CI)")
parser.add_argument("--out", default="examples/_out", help="folder for the figure")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_num_threads(1)  # tiny problems: one thread avoids contention
f64 = torch.float64


def ball(g, e, t, rtol=1e-10, atol=1e-12):
    """Drop the ball from height 1 at rest; return the Solution at times t (heights, velocities, bounces)."""
    field = lambda t, y: torch.stack([y[1], -g * torch.ones_like(y[1])])  # noqa: E731
    bounce = neurodyn.Event(lambda t, y: y[0], direction=-1, terminal=False,
                            jump=lambda t, y: torch.stack([y[0], -e * y[1]]))
    return neurodyn.solve(field, torch.tensor([1.0, 0.0], dtype=f64), t, events=[bounce], rtol=rtol, atol=atol)


# 1. Bounce times against the closed form t_1 = sqrt(2/g), t_{k+1} = t_k + 2 e^k sqrt(2 g) / g ----------
g_true, e_true = 9.81, 0.8
exact = [math.sqrt(2 / g_true)]
for k in range(1, 10):
    exact.append(exact[-1] + 2 * e_true ** k * math.sqrt(2 * g_true) / g_true)
sol = ball(g_true, e_true, torch.tensor([0.0, exact[-1] + 0.01], dtype=f64))
found = sol.events.t
bounce_error = (found - torch.tensor(exact, dtype=f64)).abs().max().item()
print(f"10 bounces located: max |t_k - closed form| = {bounce_error:.1e} ({sol.stats['nfe']} evaluations)")
assert len(found) == 10 and bounce_error < 1e-8

# 2. Learn g and e from 60 noisy heights (the loss differentiates through every bounce) -----------------
t = torch.linspace(0.0, 2.5, 61, dtype=f64)
with torch.no_grad():
    heights = ball(g_true, e_true, t).ys[:, 0] + 1e-3 * torch.randn(61, dtype=f64)
g = torch.tensor(8.5, dtype=f64, requires_grad=True)
e = torch.tensor(0.7, dtype=f64, requires_grad=True)
start = ball(g.detach(), e.detach(), t).ys[:, 0]
opt = torch.optim.Adam([g, e], lr=0.05)
steps = 60 if args.quick else 200
losses = []
for _ in range(steps):
    opt.zero_grad()
    loss = (ball(g, e, t, rtol=1e-7, atol=1e-9).ys[:, 0] - heights).pow(2).mean()
    loss.backward()
    opt.step()
    losses.append(loss.item())
print(f"learned after {steps} Adam steps: g = {g.item():.3f} (true {g_true}), e = {e.item():.3f} (true {e_true}); "
      f"loss {losses[0]:.2e} -> {losses[-1]:.2e}")
assert abs(g.item() - g_true) < 0.3 and abs(e.item() - e_true) < 0.03

fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
t_fine = torch.linspace(0.0, 2.5, 500, dtype=f64)
with torch.no_grad():
    fitted = ball(g, e, t_fine).ys[:, 0]
ax[0].plot(t, heights, "k.", ms=4, label="noisy heights")
ax[0].plot(t, start.detach(), "C1--", lw=1, label="start: g=8.5, e=0.7")
ax[0].plot(t_fine, fitted, "C0-", label=f"learned: g={g.item():.2f}, e={e.item():.3f}")
ax[0].set(title="bouncing ball: fit through the events", xlabel="t", ylabel="height")
ax[0].legend(fontsize=8)
ax[1].semilogy(losses)
ax[1].set(title="training loss (gradient through bounce times)", xlabel="Adam step", ylabel="MSE")
fig.tight_layout()
out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "11_bouncing_ball.png", dpi=80)
print(f"wrote {out / '11_bouncing_ball.png'}")
