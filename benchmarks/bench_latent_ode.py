"""Latent ODE training time per epoch: neurodyn's LatentODE vs a torchdiffeq reimplementation of the reference code.

The reference (github.com/YuliaRubanova/latent_ode, ``run_models.py --latent-ode --dataset periodic -n 1000 -s 50 -l
10``) is not installed; ``Reference`` below re-implements its training step with torchdiffeq, written from reading
that code: the GRU unit of three tanh MLPs (100 units; mean and std states) with masked updates, the ODE-RNN encoder
run backward (rec dims 20, field MLP of two hidden layers of 100 units; a gap shorter than span/50 takes one explicit
Euler step by hand, a longer one ``odeint(method="euler")`` over ``max(2, int(gap / (span/50)))`` linspace points; the
NaN asserts and the "first point of the ODE equals the initial value" check of every step kept), ``transform_z0`` (40
-> 100 -> 20), the latent ODE (10 dims, MLP of two hidden layers of 100 units) solved by
``torchdiffeq.odeint(method="dopri5", rtol=1e-3, atol=1e-4)`` from 3 posterior samples, a linear decoder, the masked
Gaussian log-density (obs std 0.01, mean over observed times and dims), KL to N(0, 1) (mean over latents and series)
and the loss ``-logsumexp_s(likelihood_s - kl_coef * KL)``; Adamax, lr 1e-2.

neurodyn's side: ``LatentODE(1)`` with the same sizes and solvers (``encoder_cell="gated_mlp"``, encoder Euler with
the reference code's step counts, ``encoder_step_rule="latent_ode"``: one step for a gap below span/50, else
``max(2, int(gap / (span/50))) - 1``; ``--step-rule ceil`` takes ``ceil(gap / (span/50))`` steps instead; latent
dopri5 at 1e-3 / 1e-4 with torchdiffeq's step-size rule, I control: ``PIDController(pcoeff=0, icoeff=1)``, or
neurodyn's default PI control with ``--controller default``; 3 samples), its weights copied from the reference model
so both start from the same function; its loss is the reference's objective, ``LatentODE.loss(bound="batch")``
(the log-sum-exp over samples of the batch-mean likelihood; ``--bound series``: the per-series IWAE bound, whose
per-series sample weights often fall in float32's subnormal range, ~1e-39, and slow the latent backward pass on x86
several-fold).

Three neurodyn variants: ``neurodyn`` runs the encoder over the union of the 100 times with masks (the reference's
formulation), which takes the fused ODE-RNN run (:mod:`neurodyn.models.odernn_fused`: one autograd function, the
unit on the observed rows only, written-out backward with one weight-gradient product per weight);
``neurodyn_unfused`` is the same model with ``encoder.fused = False`` (one :func:`neurodyn.solve` per interval, the
path before the fused run); ``neurodyn_per_row`` gives each series' 50 observed points as per-row times ``(B, 50)``
(``neurodyn.data.compact``; 50 encoder steps, each interval solved for all rows at once, as the demo does; the
general path). ``--skip`` leaves variants out.

Same data: the periodic toy (1000 series, 100 shared times on [0, 5], 800 for training), batches of 50 with 50 of the
100 points observed per series (the same masks for both), interpolation task (reconstruct all 100 points).
One epoch = 16 iterations (forward + backward + optimizer step). The variants take turns iteration by iteration in one
process (order rotated), each epoch's time the sum of its own 16 iterations' (the machine's load shifts over seconds).
``--floor-reps``: then an encoder-only diagnostic (:func:`encoder_floor`).

    taskset -c 1 python benchmarks/bench_latent_ode.py [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torchdiffeq
from torch import nn
from torch.distributions import Normal, kl_divergence

from neurodyn import PIDController
from neurodyn.data import compact, interpolation_mask, periodic_toy
from neurodyn.models import LatentODE
from neurodyn.models.odernn_fused import euler_steps


def _mlp(n_in: int, units: int, n_out: int, hidden: int = 1) -> nn.Sequential:
    mid = [m for _ in range(hidden - 1) for m in (nn.Linear(units, units), nn.Tanh())]
    net = nn.Sequential(nn.Linear(n_in, units), nn.Tanh(), *mid, nn.Linear(units, n_out))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.1)
            nn.init.zeros_(m.bias)
    return net


class RefGRUUnit(nn.Module):
    def __init__(self, latent: int, inp: int, units: int = 100):
        super().__init__()
        self.update_gate = nn.Sequential(*_mlp(2 * latent + inp, units, latent), nn.Sigmoid())
        self.reset_gate = nn.Sequential(*_mlp(2 * latent + inp, units, latent), nn.Sigmoid())
        self.new_state_net = _mlp(2 * latent + inp, units, 2 * latent)

    def forward(self, y_mean, y_std, x):
        y_concat = torch.cat([y_mean, y_std, x], -1)
        u = self.update_gate(y_concat)
        r = self.reset_gate(y_concat)
        new_state, new_std = self.new_state_net(torch.cat([y_mean * r, y_std * r, x], -1)).chunk(2, -1)
        new_std = new_std.abs()
        new_y = (1 - u) * new_state + u * y_mean
        new_y_std = (1 - u) * new_std + u * y_std
        assert not torch.isnan(new_y).any()
        n = x.size(-1) // 2
        mask = (x[..., n:].sum(-1, keepdim=True) > 0).float()
        new_y = mask * new_y + (1 - mask) * y_mean
        new_y_std = mask * new_y_std + (1 - mask) * y_std
        return new_y, new_y_std.abs()


class RefODEFunc(nn.Module):
    def __init__(self, dim: int, units: int = 100):
        super().__init__()
        self.net = _mlp(dim, units, dim, hidden=2)  # create_net(n_layers=1): two hidden layers
        self.calls = [0]  # evaluations (a list: no module attribute set per call)

    def forward(self, t, y):
        self.calls[0] += 1
        return self.net(y)


class Reference(nn.Module):
    """The reference training step, re-implemented over torchdiffeq (see the module docstring)."""

    def __init__(self, latent: int = 10, rec: int = 20, units: int = 100, input_dim: int = 1):
        super().__init__()
        self.rec = rec
        self.gru = RefGRUUnit(rec, 2 * input_dim, units)
        self.rec_func = RefODEFunc(rec, units)
        self.transform_z0 = _mlp(2 * rec, 100, 2 * latent)
        self.gen_func = RefODEFunc(latent, units)
        self.decoder = nn.Linear(latent, input_dim)
        nn.init.normal_(self.decoder.weight, std=0.1)
        nn.init.zeros_(self.decoder.bias)

    def encode(self, data, t):
        n_traj = data.size(0)
        prev_y = torch.zeros(1, n_traj, self.rec)
        prev_std = torch.zeros(1, n_traj, self.rec)
        prev_t, t_i = t[-1] + 0.01, t[-1]
        minimum_step = (t[-1] - t[0]) / 50
        for i in reversed(range(len(t))):
            if prev_t - t_i < minimum_step:
                inc = self.rec_func(prev_t, prev_y) * (t_i - prev_t)
                ode_sol = torch.stack((prev_y, prev_y + inc), 2)
            else:
                n = max(2, int((prev_t - t_i) / minimum_step))
                tp = torch.linspace(float(prev_t), float(t_i), n)
                ode_sol = torchdiffeq.odeint(self.rec_func, prev_y, tp, rtol=1e-3, atol=1e-4,
                                             method="euler").permute(1, 2, 0, 3)
            if torch.mean(ode_sol[:, :, 0, :] - prev_y) >= 0.001:
                raise RuntimeError("first point of the ODE is not equal to initial value")
            yi_ode = ode_sol[:, :, -1, :]
            prev_y, prev_std = self.gru(yi_ode, prev_std, data[:, i, :].unsqueeze(0))
            prev_t, t_i = t[i], t[i - 1]
        mean, std = self.transform_z0(torch.cat([prev_y, prev_std], -1)).chunk(2, -1)
        return mean, std.abs()

    def loss(self, x, t, mask_obs, mask_pred, n_samples=3, kl_coef=0.0):
        mu, std = self.encode(torch.cat([x * mask_obs, mask_obs], -1), t)
        z0 = mu.repeat(n_samples, 1, 1) + std.repeat(n_samples, 1, 1) * torch.randn(n_samples, *mu.shape[1:])
        sol = torchdiffeq.odeint(self.gen_func, z0, t, rtol=1e-3, atol=1e-4, method="dopri5").permute(1, 2, 0, 3)
        pred = self.decoder(sol)
        logp = Normal(pred, 0.01).log_prob(x.expand_as(pred)) * mask_pred
        lik = (logp.sum(2) / mask_pred.sum(1).clamp(min=1)).mean(-1)  # (S, B): mean over time (observed), dims
        rec = lik.mean(1)
        kl = kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).mean((1, 2))
        loss = -torch.logsumexp(rec - kl_coef * kl, 0)
        return loss.mean()


def copy_weights(ref: Reference, ours: LatentODE) -> None:
    """Give ``ours`` the reference model's function (parameter by parameter)."""
    cell = ours.encoder.cell
    with torch.no_grad():
        cell.gates_in.weight.copy_(torch.cat([ref.gru.update_gate[0].weight, ref.gru.reset_gate[0].weight]))
        cell.gates_in.bias.copy_(torch.cat([ref.gru.update_gate[0].bias, ref.gru.reset_gate[0].bias]))
        cell.update_out.load_state_dict(ref.gru.update_gate[2].state_dict())
        cell.reset_out.load_state_dict(ref.gru.reset_gate[2].state_dict())
        cell.new_state.load_state_dict(ref.gru.new_state_net.state_dict())
        ours.encoder.field.load_state_dict(ref.rec_func.net.state_dict())
        ours.to_z0.load_state_dict(ref.transform_z0.state_dict())
        ours.field.net.load_state_dict(ref.gen_func.net.state_dict())
        ours.decoder.load_state_dict(ref.decoder.state_dict())


def hand_encoder(model: LatentODE, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Diagnostic only, not a neurodyn path: the arithmetic of ``model.encoder`` on the shared grid (backward,
    ``ceil(gap / (span / encoder_steps))`` equal explicit Euler steps per interval, the gated unit's whole-series
    update, masked by ``torch.where``) written as a plain loop with no solver, then ``to_z0``'s mean: what the encoder
    would cost with no per-solve overhead at all."""
    enc = model.encoder
    H, T = enc.cell.ode_size, x.shape[1]
    inp = torch.cat([x * mask, mask], -1).transpose(0, 1)
    update = enc.cell.series_update(inp)
    seen = (mask.amax(-1, keepdim=True) > 0).transpose(0, 1).unbind(0)
    state = x.new_zeros(x.shape[0], enc.cell.state_size)
    max_step = float(t[-1] - t[0]) / model.encoder_steps
    gaps = t.diff().tolist()
    for k in range(T - 1, -1, -1):
        if k < T - 1:
            h, rest = state.split([H, H], -1)
            n = euler_steps([gaps[k]], max_step, enc.step_rule)[0]  # the encoder's steps
            for _ in range(n):
                h = h + (-gaps[k] / n) * enc.field(h)
            state = torch.cat([h, rest], -1)
        state = torch.where(seen[k], update(k, state), state)
    return model.to_z0(state).chunk(2, -1)[0]


def encoder_floor(ref: Reference, ours: LatentODE, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
                  reps: int) -> dict[str, float]:
    """Median seconds of one encoder forward + backward (batch ``x``), the three alternating: the reference's,
    neurodyn's (``LatentODE.encode``) and :func:`hand_encoder`."""
    fns = {"reference": lambda: ref.encode(torch.cat([x * mask, mask], -1), t)[0].sum().backward(),
           "neurodyn": lambda: ours.encode(x, t, mask)[0].sum().backward(),
           "hand_loop": lambda: hand_encoder(ours, x, t, mask).sum().backward()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps + 1):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if r:  # the first round warms up
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--controller", choices=("i", "default"), default="i",
                    help="neurodyn's latent step-size control: 'i' torchdiffeq's I control, as the reference "
                         "(default), or neurodyn's default PI control")
    ap.add_argument("--step-rule", choices=("latent_ode", "ceil"), default="latent_ode",
                    help="neurodyn's encoder steps per interval: the reference code's rule (default) or ceil(gap / "
                         "(span/50))")
    ap.add_argument("--bound", choices=("batch", "series"), default="batch",
                    help="neurodyn's IWAE bound: the reference's log-sum-exp over samples of the batch means "
                         "(default) or the per-series bound")
    ap.add_argument("--skip", default="", help="comma-separated variants to leave out (not 'reference')")
    ap.add_argument("--floor-reps", type=int, default=9, help="rounds of the encoder-only diagnostic (0: skip)")
    args = ap.parse_args()
    if args.epochs < 1:
        ap.error("--epochs must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t, x = periodic_toy(1000, 100, seed=0)
    tt, train = t[0], x[:800]
    full = torch.ones_like(train)
    g = torch.Generator().manual_seed(1)
    kw = {"controller": PIDController(pcoeff=0.0, icoeff=1.0)} if args.controller == "i" else {}
    kw["encoder_step_rule"] = args.step_rule
    ref, ours, ours_c = Reference(), LatentODE(1, **kw), LatentODE(1, **kw)
    ours_u = LatentODE(1, **kw)
    ours_u.encoder.fused = False
    for m in (ours, ours_c, ours_u):
        copy_weights(ref, m)
    with torch.no_grad():  # same function: same encoder output at init
        m0 = interpolation_mask(full[:50], 50, torch.Generator().manual_seed(3))
        mu_r, _ = ref.encode(torch.cat([train[:50] * m0, m0], -1), tt)
        mu_o, _, _ = ours.encode(train[:50], tt, m0)
        enc_diff = float((mu_r[0] - mu_o).abs().max())
    models = {"reference": ref, "neurodyn": ours, "neurodyn_unfused": ours_u, "neurodyn_per_row": ours_c}
    if args.skip:
        for name in args.skip.split(","):
            models.pop(name)
    opts = {k: torch.optim.Adamax(m.parameters(), lr=1e-2) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    nfe: dict[str, list[int]] = {k: [] for k in models}
    names = list(models)
    for epoch in range(args.epochs):
        perm = torch.randperm(800, generator=g)
        masks = [interpolation_mask(full[perm[i * 50:(i + 1) * 50]], 50, g) for i in range(16)]
        spent = dict.fromkeys(models, 0.0)
        for i in range(16):
            idx = perm[i * 50:(i + 1) * 50]
            xb, mb = train[idx], masks[i]
            for name in names[i % len(names):] + names[:i % len(names)]:  # turns, the order rotated per iteration
                ref.gen_func.calls[0] = 0
                t0 = time.perf_counter()
                if name == "reference":
                    loss = ref.loss(xb, tt, mb, full[idx])
                elif name in ("neurodyn", "neurodyn_unfused"):  # the masked union grid, as the reference
                    loss = models[name].loss(xb, tt, mb, tt, xb, full[idx], n_samples=3, kl_weight=0.0,
                                             bound=args.bound)["loss"]
                else:  # each series steps through its own 50 observed times
                    b = compact(tt, xb, mb)
                    loss = ours_c.loss(b.values, b.times, b.mask, tt, xb, full[idx], n_samples=3,
                                       kl_weight=0.0, bound=args.bound)["loss"]
                opts[name].zero_grad()
                loss.backward()
                opts[name].step()
                spent[name] += time.perf_counter() - t0
                nfe[name].append(ref.gen_func.calls[0] if name == "reference" else models[name].ode.nfe_forward)
        for name in names:
            times[name].append(spent[name])
        print(f"epoch {epoch} " + " ".join(f"{k} {v:.2f} s" for k, v in spent.items()), flush=True)
    floor = {}
    if args.floor_reps:
        m = interpolation_mask(full[:50], 50, torch.Generator().manual_seed(4))
        with torch.no_grad():
            floor_diff = float((hand_encoder(ours, train[:50], tt, m) - ours.encode(train[:50], tt, m)[0]).abs().max())
        floor = encoder_floor(ref, ours, train[:50], tt, m, args.floor_reps)
        floor = {"median_s": floor, "ratio_to_reference": {k: v / floor["reference"] for k, v in floor.items()},
                 "hand_loop_max_abs_diff": floor_diff}
        print("encoder only:", json.dumps(floor), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: [o / r for o, r in zip(times[k], times["reference"])] for k in nfe if k != "reference"}
    result = {"epoch_s": times, "median_epoch_s": med, "ratio_per_epoch": ratios,
              "median_ratio": {k: statistics.median(v) for k, v in ratios.items()},
              "latent_nfe_per_iter_mean": {k: sum(v) / len(v) for k, v in nfe.items()},
              "latent_nfe_per_iter_by_epoch": {k: [sum(v[i:i + 16]) / 16 for i in range(0, len(v), 16)]
                                               for k, v in nfe.items()},
              "encoder_max_abs_diff_at_init": enc_diff, "encoder_only": floor,
              "controller": args.controller, "bound": args.bound, "step_rule": args.step_rule,
              "torch": torch.__version__, "torchdiffeq": torchdiffeq.__version__, "threads": args.threads}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
