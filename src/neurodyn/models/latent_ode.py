"""``LatentODE``: the latent ODE VAE of Rubanova et al. (2019) over :func:`neurodyn.solve`.

Encoder: an :class:`~neurodyn.models.ODERNN` run backward in time over the observations gives ``q(z0 | x) =
N(mu, diag(std^2))`` at the first observation time. Generative model: ``z0 ~ N(0, I)``, ``dz/dt = f(z)`` solved by a
:class:`~neurodyn.models.NeuralODE`, ``x(t) ~ N(decoder(z(t)), obs_std^2)``; optionally the observation times are
events of a Poisson process of rate ``lambda(z(t)) = exp(g(z(t)))`` per channel, its integral solved with ``z``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from .neural_ode import NeuralODE
from .odernn import ODERNN, mlp


class _LatentField(nn.Module):
    """``dz/dt = f(z)``; with a Poisson process also ``dLambda/dt = exp(g(z))`` on the state ``cat(z, Lambda)``."""

    def __init__(self, latent_size: int, units: int, channels: int, poisson: bool, init_std: float | None,
                 layers: int):
        super().__init__()
        self.latent_size = latent_size
        self.net = mlp(latent_size, units, latent_size, init_std, layers)
        self.log_rate = mlp(latent_size, units, channels, init_std) if poisson else None

    def forward(self, z: Tensor) -> Tensor:
        if self.log_rate is None:
            return self.net(z)
        zz = z[..., :self.latent_size]
        return torch.cat([self.net(zz), self.log_rate(zz).exp()], -1)


def gaussian_log_likelihood(x: Tensor, mean: Tensor, std: float | Tensor, mask: Tensor,
                            reduction: str = "mean") -> Tensor:
    """Masked Gaussian log-likelihood per series.

    ``x``, ``mask``: ``(B, T, C)``; ``mean``: ``(..., B, T, C)``. Returns ``(..., B)``: the sum over the observed
    entries of ``log N(x; mean, std^2)``, divided by the number of observed entries when ``reduction="mean"`` (the
    latent ODE paper's normalisation) — a row with none gives 0.

    >>> x = torch.zeros(1, 2, 1); m = torch.ones(1, 2, 1)
    >>> round(float(gaussian_log_likelihood(x, x, 1.0, m)), 6) == round(-0.5 * math.log(2 * math.pi), 6)
    True
    """
    var = torch.as_tensor(std, dtype=x.dtype, device=x.device) ** 2
    logp = -0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)
    total = (logp * mask).sum((-2, -1))
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    return total / mask.sum((-2, -1)).clamp(min=1)


def kl_standard_normal(mean: Tensor, std: Tensor) -> Tensor:
    """``KL(N(mean, diag(std^2)) || N(0, I))`` summed over the last dimension: ``(..., L) -> (...)``.

    >>> float(kl_standard_normal(torch.zeros(3), torch.ones(3)))
    0.0
    """
    return 0.5 * (mean**2 + std**2 - 1 - 2 * torch.log(std)).sum(-1)


class LatentODE(nn.Module):
    """Latent ODE VAE (Rubanova et al. 2019): ODE-RNN encoder run backward, latent ODE, linear decoder.

    Parameters
    ----------
    input_size : int
        Channels ``C``.
    latent_size, rec_size : int
        Latent state ``L`` (default 10) and the encoder's hidden size (default 20).
    units, rec_units, gru_units : int
        Hidden units of the latent field, the encoder's field and the encoder's gated MLP unit (default 100 each).
    field_layers : int
        Hidden layers of the latent field and of the encoder's field (default 2: the paper's ``create_net`` with
        ``--gen-layers 1 --rec-layers 1``).
    obs_std : float
        Observation noise of the Gaussian likelihood (default 0.01).
    method, rtol, atol, gradient :
        Latent solve (default ``"dopri5"``, 1e-3, 1e-4, ``"direct"``).
    encoder_method : str
        The encoder's solver between observations (default ``"euler"``).
    encoder_steps : int
        The encoder's largest step is the observation span divided by ``encoder_steps`` (default 50).
    encoder_step_rule : ``"ceil"`` or ``"latent_ode"``
        The encoder's steps per interval (``ODERNN``'s ``step_rule``): ``ceil(gap / largest step)`` (default), or the
        latent_ode code's rule (one step below the largest step, else ``max(2, floor(gap / largest step)) - 1``).
    encoder_cell : ``"gated_mlp"`` (the paper's), ``"gru"`` or ``"lstm"``.
    poisson : bool
        Also model the observation times as a Poisson process (adds ``C`` rate integrals to the latent solve).
    init_std : float or None
        Weights ``N(0, init_std^2)`` and zero biases (the paper's 0.1), or PyTorch's default init (None).
    **solve_options :
        Other keywords of :func:`neurodyn.solve` for the latent solve.

    Shapes
    ------
    ``forward(x (B, T, C), t (T,) or (B, T), mask (B, T, C), t_pred (P,) or (B, P) = t, n_samples=S)`` returns
    ``(pred (S, B, P, C), info)``: decoded trajectories of ``S`` posterior samples; ``info`` holds ``mean``, ``std``
    ``(B, L)``, ``z0 (S, B, L)``, ``z (S, B, P, L)`` and, with ``poisson``, ``log_rate (S, B, P, C)`` and
    ``rate_integral (S, B, P, C)`` (from the start time). The latent ODE starts at the earliest first observation time
    of the batch or the earliest prediction time, whichever is first (each row's encoder state is carried there by
    the encoder's ODE).

    Examples
    --------
    >>> import torch, neurodyn
    >>> model = neurodyn.models.LatentODE(input_size=1, latent_size=4, rec_size=8, units=16, rec_units=16,
    ...                                   gru_units=16)
    >>> t = torch.linspace(0, 5, 20); x = torch.sin(t)[None, :, None].repeat(3, 1, 1); m = torch.ones_like(x)
    >>> out = model.loss(x, t, m, n_samples=2)
    >>> out["loss"].backward()
    >>> sorted(out)
    ['kl', 'likelihood', 'loss', 'mse', 'pred']
    """

    def __init__(self, input_size: int, latent_size: int = 10, rec_size: int = 20, *, units: int = 100,
                 rec_units: int = 100, gru_units: int = 100, field_layers: int = 2, obs_std: float = 0.01,
                 method: str = "dopri5", rtol: float = 1e-3, atol: float = 1e-4, gradient: str = "direct",
                 encoder_method: str = "euler",
                 encoder_steps: int = 50, encoder_step_rule: str = "ceil", encoder_cell: str = "gated_mlp",
                 poisson: bool = False,
                 init_std: float | None = 0.1, **solve_options: Any):
        super().__init__()
        if min(input_size, latent_size, rec_size, units, rec_units, gru_units, encoder_steps, field_layers) < 1:
            raise InputError("LatentODE: sizes, unit counts and encoder_steps must all be >= 1.")
        if not obs_std > 0:
            raise InputError(f"LatentODE: obs_std must be > 0, got {obs_std}.")
        from .odernn import CELLS, GatedMLPUpdate

        if encoder_cell == "gated_mlp":
            cell: nn.Module = GatedMLPUpdate(2 * input_size, rec_size, gru_units, init_std)
        elif encoder_cell in CELLS:
            cell = CELLS[encoder_cell](2 * input_size, rec_size)
        else:
            raise InputError(f"LatentODE: encoder_cell must be one of {sorted(CELLS)}, got {encoder_cell!r}.")
        self.input_size, self.latent_size, self.obs_std = input_size, latent_size, obs_std
        self.encoder_steps, self.poisson = encoder_steps, poisson
        rec_field = mlp(rec_size, rec_units, rec_size, init_std, field_layers)
        self.encoder = ODERNN(input_size, rec_size, cell=cell, field=rec_field, method=encoder_method,
                              step_rule=encoder_step_rule)
        self.to_z0 = mlp(cell.state_size, 100, 2 * latent_size, init_std)
        self.field = _LatentField(latent_size, units, input_size, poisson, init_std, field_layers)
        self.ode = NeuralODE(self.field, output="trajectory", method=method, rtol=rtol, atol=atol,
                             gradient=gradient, autonomous=True, **solve_options)
        self.decoder = nn.Linear(latent_size, input_size)
        if init_std is not None:
            nn.init.normal_(self.decoder.weight, std=init_std)
            nn.init.zeros_(self.decoder.bias)

    # ------------------------------------------------------------------------------------------------ pieces
    def encode(self, x: Tensor, t: Tensor, mask: Tensor, t0: Tensor | float | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """``q(z0 | x)``: returns ``(mean (B, L), std (B, L), t0)``; ``z0`` lives at ``t0`` (0-dim; default the
        batch's earliest first time, at or before every row's first time). Each row's encoder state is carried from
        its first time back to ``t0`` by the encoder's ODE."""
        tt = t if t.dim() == 2 else t.expand(x.shape[0], -1)
        span = float((tt[:, -1] - tt[:, 0]).max())
        max_step = span / self.encoder_steps if span > 0 else None
        _, state = self.encoder(x, t, mask, reverse=True, max_step=max_step, states=False)
        first = tt[:, 0].min()
        t_start = first if t0 is None else torch.as_tensor(t0, dtype=tt.dtype, device=tt.device).reshape(())
        if bool(t_start > first):
            raise InputError(f"LatentODE: t0={float(t_start):g} is after the first observation {float(first):g}.")
        back = (t_start - tt[:, 0])[:, None] if t.dim() == 2 else (t_start - tt[0, 0])
        if bool((back != 0).any()):
            n = self.encoder.cell.ode_size
            start = tt[:, :1] if t.dim() == 2 else tt[0, 0]
            h = self.encoder.evolve(state[:, :n], start, back, max_step)
            state = torch.cat([h, state[:, n:]], -1) if n < state.shape[1] else h
        mean, std = self.to_z0(state).chunk(2, -1)
        return mean, std.abs(), t_start

    def decode(self, z0: Tensor, t_start: Tensor, t_pred: Tensor) -> dict[str, Tensor]:
        """Solve the latent ODE from ``z0 (S, B, L)`` at ``t_start`` and decode at ``t_pred (P,)`` or ``(B, P)``;
        returns ``pred (S, B, P, C)``, ``z (S, B, P, L)`` (and the Poisson pieces)."""
        S, B, L = z0.shape
        if t_pred.dim() == 1:
            grid, idx = t_pred, None
        else:
            grid, idx = torch.unique(t_pred, sorted=True, return_inverse=True)
        if bool(grid[0] < t_start):
            raise InputError(f"LatentODE: prediction time {float(grid[0]):g} is before the start time "
                             f"{float(t_start):g} (the earliest first observation).")
        lead = bool(grid[0] > t_start)
        times = torch.cat([t_start.reshape(1).to(grid), grid]) if lead else grid
        state0 = z0.reshape(S * B, L)
        if self.poisson:
            state0 = torch.cat([state0, state0.new_zeros(S * B, self.input_size)], -1)
        if times.numel() == 1:  # a single time, the start
            ys = state0[None]
        else:
            ys = self.ode(state0, times)  # (P', S*B, L[+C])
        ys = ys[1:] if lead else ys
        ys = ys.reshape(ys.shape[0], S, B, -1).permute(1, 2, 0, 3)  # (S, B, P', .)
        if idx is not None:
            ys = ys.gather(2, idx[None, :, :, None].expand(S, -1, -1, ys.shape[-1]))
        z = ys[..., :L]
        out = {"z": z, "pred": self.decoder(z)}
        if self.poisson:
            out["log_rate"] = self.field.log_rate(z)
            out["rate_integral"] = ys[..., L:]
        return out

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor, t: Tensor, mask: Tensor | None = None, t_pred: Tensor | None = None,
                n_samples: int = 1, *, use_mean: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """Encode, sample ``n_samples`` ``z0`` (the mean itself when ``use_mean``), solve and decode at ``t_pred``
        (default ``t``). Shapes: see the class docstring."""
        mask = torch.ones_like(x) if mask is None else mask
        if n_samples < 1:
            raise InputError(f"LatentODE: n_samples must be >= 1, got {n_samples}.")
        tp = t if t_pred is None else t_pred
        mean, std, t_start = self.encode(x, t, mask, torch.minimum(t.min(), tp.min()))
        if use_mean:
            z0 = mean.expand(n_samples, -1, -1)
        else:
            z0 = mean + std * torch.randn((n_samples, *mean.shape), dtype=mean.dtype, device=mean.device)
        out = self.decode(z0, t_start, tp)
        out.update(mean=mean, std=std, z0=z0)
        return out.pop("pred"), out

    def loss(self, x: Tensor, t: Tensor, mask: Tensor, t_pred: Tensor | None = None, y_pred: Tensor | None = None,
             mask_pred: Tensor | None = None, *, n_samples: int = 3, kl_weight: float = 1.0, iwae: bool = True,
             reduction: str = "mean", use_mean: bool = False, bound: str = "series") -> dict[str, Tensor]:
        """Negative ELBO (``iwae=False``: ``-(mean_s log p(y | z_s) - kl_weight KL)``) or its importance-weighted
        bound (``iwae=True``: ``-(logsumexp_s (log p(y | z_s) - kl_weight KL) - log S)``), averaged over the batch.
        ``bound="batch"`` (with ``iwae=True``): the latent_ode code's form, the log-sum-exp over samples of the
        batch means, ``-(logsumexp_s mean_b (log p(y_b | z_sb) - kl_weight KL_b) - log S)``.

        ``x, t, mask``: what the encoder sees; the targets ``y_pred (B, P, C)`` at ``t_pred`` with ``mask_pred``
        default to ``x, t, mask``. The likelihood is :func:`gaussian_log_likelihood` (``reduction``), plus the Poisson
        process log-likelihood ``sum_events log rate - integral of the rate`` (over each row's prediction span) with
        ``poisson``. ``use_mean``: decode the posterior mean instead of samples (one "sample"; a deterministic
        reconstruction term, the KL term unchanged). Returns ``loss``, ``likelihood`` (mean over samples and batch),
        ``kl`` (batch mean), ``mse`` (detached)
        (masked, over samples) and ``pred (S, B, P, C)``.
        """
        if bound not in ("series", "batch"):
            raise InputError(f"LatentODE.loss: bound must be 'series' or 'batch', got {bound!r}.")
        if t_pred is None:
            t_pred, y_pred, mask_pred = t, x, mask
        elif y_pred is None or mask_pred is None:
            raise InputError("LatentODE.loss: with t_pred give its targets y_pred and mask_pred too.")
        pred, info = self(x, t, mask, t_pred, 1 if use_mean else n_samples, use_mean=use_mean)
        loglik = gaussian_log_likelihood(y_pred, pred, self.obs_std, mask_pred, reduction)  # (S, B)
        if self.poisson:
            seen = (mask_pred.amax(-1) > 0).to(pred.dtype)  # (B, P): event times
            events = (info["log_rate"] * seen[None, ..., None]).sum((-2, -1))
            last = seen.shape[1] - 1 - seen.flip(-1).argmax(-1)  # each row's last event
            integral = info["rate_integral"][:, torch.arange(seen.shape[0]), last].sum(-1)
            loglik = loglik + events - integral
        kl = kl_standard_normal(info["mean"], info["std"])  # (B,)
        terms = loglik - kl_weight * kl
        if bound == "batch" and iwae:
            terms = terms.mean(1, keepdim=True)  # (S, 1)
        if iwae:
            value = torch.logsumexp(terms, 0) - math.log(terms.shape[0])
        else:
            value = terms.mean(0)
        sq = ((pred - y_pred) ** 2 * mask_pred).sum() / (mask_pred.sum() * pred.shape[0]).clamp(min=1)
        return {"loss": -value.mean(), "likelihood": loglik.mean(), "kl": kl.mean(), "mse": sq.detach(), "pred": pred}

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, latent_size={self.latent_size}, obs_std={self.obs_std}, " \
               f"poisson={self.poisson}"
