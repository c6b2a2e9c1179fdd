"""neurodyn.compat.torchsde against torchsde 0.2.6 itself, on the same Brownian path (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch

import neurodyn
import neurodyn.compat.torchsde as nts

torchsde = pytest.importorskip("torchsde")

F64 = torch.float64
B, D, M = 4, 3, 2
TS = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)


class SDE(torch.nn.Module):
    """Drift, diffusion by noise type, and a prior drift ``h`` (for logqp)."""

    def __init__(self, noise: str, kind: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.noise_type, self.sde_type = noise, kind
        self.lin = torch.nn.Linear(D, D).double()
        self.sig = torch.nn.Linear(D, D * M if noise == "general" else D).double()
        self.prior = torch.nn.Linear(D, D).double()

    def f(self, t, y):
        return torch.tanh(self.lin(y))

    def h(self, t, y):
        return self.prior(y)

    def g(self, t, y):
        out = torch.sigmoid(self.sig(y))
        if self.noise_type == "general":
            return out.view(y.size(0), D, M)
        # Diagonal and scalar noise: g_i depends on y_i alone (the diagonal-noise contract Milstein and the Ito
        # adjoint rely on, torchsde's too). torchsde's scalar Milstein uses (dg/dy)^T g where the method needs
        # (dg/dy) g; they coincide for this diagonal Jacobian only.
        elementwise = torch.sigmoid(self.sig.weight.diagonal() * y + self.sig.bias) if self.sig.weight.shape[0] == D \
            else None
        if self.noise_type == "scalar":
            return elementwise.unsqueeze(-1)
        if self.noise_type == "diagonal":
            return elementwise
        if self.noise_type == "additive":
            return torch.diag_embed(torch.sigmoid(self.sig.bias)).expand(y.size(0), D, D) * 1.0
        return out


def _channels(noise: str) -> int:
    return {"general": M, "scalar": 1}.get(noise, D)


def _y0():
    return torch.randn(B, D, dtype=F64, generator=torch.Generator().manual_seed(1))


CASES = [("euler", "ito", "diagonal"), ("euler", "ito", "general"), ("milstein", "ito", "diagonal"),
         ("milstein", "ito", "scalar"), ("srk", "ito", "diagonal"), ("srk", "ito", "additive"),
         ("srk", "ito", "scalar"), ("heun", "stratonovich", "diagonal"), ("midpoint", "stratonovich", "general"),
         ("euler_heun", "stratonovich", "general"), ("milstein", "stratonovich", "diagonal"),
         ("log_ode", "stratonovich", "diagonal"), ("reversible_heun", "stratonovich", "general")]


@pytest.mark.parametrize("method,kind,noise", CASES)
def test_same_outputs_as_torchsde(method, kind, noise):
    """One torchsde BrownianInterval passed to both; ts on the dt grid: outputs agree to 1e-10."""
    sde = SDE(noise, kind)
    levy = {"srk": "space-time", "log_ode": "foster"}.get(method, "none")
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(B, _channels(noise)), dtype=F64, levy_area_approximation=levy,
                                   entropy=3)
    with torch.no_grad():
        ref = torchsde.sdeint(sde, _y0(), TS, bm=bm, method=method, dt=1 / 64)
        ours = nts.sdeint(sde, _y0(), TS, bm=bm, method=method, dt=1 / 64)
    assert ours.shape == ref.shape == (len(TS), B, D)
    assert float((ours - ref).abs().max()) < 1e-10


def test_grad_free_milstein_and_our_brownian():
    """options={'grad_free': True}; and neurodyn's BrownianInterval passed to both libraries."""
    sde = SDE("diagonal", "ito")
    bm = nts.BrownianInterval(0.0, 1.0, size=(B, D), dtype=F64, entropy=4)
    with torch.no_grad():
        ref = torchsde.sdeint(sde, _y0(), TS, bm=bm, method="milstein", dt=1 / 32, options={"grad_free": True})
        ours = nts.sdeint(sde, _y0(), TS, bm=bm, method="milstein", dt=1 / 32, options={"grad_free": True})
        plain = nts.sdeint(sde, _y0(), TS, bm=bm, method="milstein", dt=1 / 32)
    assert float((ours - ref).abs().max()) < 1e-10
    assert float((ours - plain).abs().max()) > 1e-8  # the option changes the method


@pytest.mark.parametrize("noise", ["diagonal", "general"])
def test_logqp(noise):
    """logqp=True: (ys, log_ratio) with log_ratio of shape (T - 1, batch), equal to torchsde's."""
    sde = SDE(noise, "stratonovich")
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(B, D + 1 if noise == "diagonal" else M), dtype=F64, entropy=5)
    with torch.no_grad():
        ys_r, lr_r = torchsde.sdeint(sde, _y0(), TS, bm=bm, method="midpoint", dt=1 / 32, logqp=True)
        ys_o, lr_o = nts.sdeint(sde, _y0(), TS, bm=bm, method="midpoint", dt=1 / 32, logqp=True)
    assert lr_o.shape == (len(TS) - 1, B) and ys_o.shape == (len(TS), B, D)
    assert float((ys_o - ys_r).abs().max()) < 1e-10
    assert float((lr_o - lr_r).abs().max()) < 1e-10
    assert bool((lr_o > 0).all())


def test_extra_state_round_trip():
    """extra=True returns reversible Heun's (f, g, z) as torchsde's; passing it back continues the solve exactly."""
    sde = SDE("diagonal", "stratonovich")
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(B, D), dtype=F64, entropy=7)
    kw = {"bm": bm, "method": "reversible_heun", "dt": 1 / 32}
    with torch.no_grad():
        full = nts.sdeint(sde, _y0(), torch.tensor([0.0, 0.5, 1.0], dtype=F64), **kw)
        first, state = nts.sdeint(sde, _y0(), torch.tensor([0.0, 0.5], dtype=F64), extra=True, **kw)
        _, ref_state = torchsde.sdeint(sde, _y0(), torch.tensor([0.0, 0.5], dtype=F64), extra=True, **kw)
        second = nts.sdeint(sde, first[-1], torch.tensor([0.5, 1.0], dtype=F64), extra_solver_state=state, **kw)
        ref_second = torchsde.sdeint(sde, first[-1], torch.tensor([0.5, 1.0], dtype=F64),
                                     extra_solver_state=ref_state, **kw)
    assert len(state) == 3
    for a, b in zip(state, ref_state, strict=True):
        assert float((a - b).abs().max()) < 1e-10
    assert float((second[-1] - full[-1]).abs().max()) < 1e-12
    assert float((second[-1] - ref_second[-1]).abs().max()) < 1e-10
    # Without the state the continuation restarts z = y: a different path.
    restart = nts.sdeint(sde, first[-1], torch.tensor([0.5, 1.0], dtype=F64), **kw)
    assert float((restart[-1] - full[-1]).abs().max()) > 1e-6
    with torch.no_grad():
        _, none = nts.sdeint(sde, _y0(), TS, bm=bm, method="midpoint", dt=1 / 32, extra=True)
    assert none == ()


class Renamed(torch.nn.Module):
    noise_type, sde_type = "diagonal", "ito"

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=F64))

    def drift(self, t, y):
        return -self.a * y

    def diffusion(self, t, y):
        return 0.3 * torch.cos(y)

    def prior(self, t, y):
        return -y


def test_names_mapping():
    """names={'drift':..., 'diffusion':..., 'prior_drift':...} as torchsde's."""
    names = {"drift": "drift", "diffusion": "diffusion", "prior_drift": "prior"}
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(B, D + 1), dtype=F64, entropy=2)
    with torch.no_grad():
        a, la = torchsde.sdeint(Renamed(), _y0(), TS, bm=bm, method="euler", dt=1 / 32, names=names, logqp=True)
        b, lb = nts.sdeint(Renamed(), _y0(), TS, bm=bm, method="euler", dt=1 / 32, names=names, logqp=True)
    assert float((a - b).abs().max()) < 1e-10 and float((la - lb).abs().max()) < 1e-10
    with pytest.raises(ValueError, match="at least one of `f`"):
        nts.sdeint(Renamed(), _y0(), TS, bm=bm, dt=1 / 32)


@pytest.mark.parametrize("method,kind,noise,tol", [
    ("midpoint", "stratonovich", "diagonal", 1e-10),
    ("reversible_heun", "stratonovich", "general", 1e-10),
    ("heun", "stratonovich", "general", 1e-10),
])
def test_adjoint_gradients_match_torchsde(method, kind, noise, tol):
    """sdeint_adjoint's gradients w.r.t. y0 and every parameter equal torchsde's sdeint_adjoint on one path
    (Stratonovich: both solve the adjoint SDE with midpoint; reversible Heun: both exact)."""
    sde = SDE(noise, kind)
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(B, _channels(noise)), dtype=F64, entropy=3)
    out = []
    for lib in (torchsde, nts):
        sde.zero_grad()
        y0 = _y0().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ys = lib.sdeint_adjoint(sde, y0, TS, bm=bm, method=method, dt=1 / 64)
        (ys ** 2).sum().backward()
        out.append([y0.grad.clone()] + [p.grad.clone() for p in (sde.lin.weight, sde.lin.bias, sde.sig.weight)])
    for a, b in zip(*out, strict=True):
        assert float((a - b).abs().max()) < tol * max(1.0, float(b.abs().max()))


def test_ito_adjoint_consistent():
    """Ito SDE: the adjoint (converted to Stratonovich) and torchsde's Ito adjoint approach the discrete gradient
    (sdeint) as dt shrinks."""
    sde = SDE("diagonal", "ito")
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(B, D), dtype=F64, entropy=3)

    def grad(fn, dt):
        sde.zero_grad()
        ys = fn(sde, _y0(), TS, bm=bm, method="milstein", dt=dt)
        (ys ** 2).sum().backward()
        return sde.sig.weight.grad.clone()

    errs = []
    for dt in (1 / 16, 1 / 256):
        direct = grad(nts.sdeint, dt)
        errs.append(float((grad(nts.sdeint_adjoint, dt) - direct).abs().max() / direct.abs().max()))
    assert errs[1] < 0.5 * errs[0] and errs[1] < 2e-2, errs


def test_readme_example_unchanged():
    """torchsde's README example (diagonal Ito, f and g methods, default method srk, default Brownian motion)."""
    batch_size, state_size, t_size = 8, 4, 6

    class ReadmeSDE(torch.nn.Module):
        noise_type = "diagonal"
        sde_type = "ito"

        def __init__(self):
            super().__init__()
            self.mu = torch.nn.Linear(state_size, state_size)
            self.sigma = torch.nn.Linear(state_size, state_size)

        def f(self, t, y):
            return self.mu(y)

        def g(self, t, y):
            return self.sigma(y)

    torch.manual_seed(0)
    sde = ReadmeSDE()
    y0 = torch.full(size=(batch_size, state_size), fill_value=0.1)
    ts = torch.linspace(0, 1, t_size)
    ys = nts.sdeint(sde, y0, ts)
    assert ys.shape == (t_size, batch_size, state_size)
    assert torch.equal(ys[0], y0) and bool(torch.isfinite(ys).all())
    # Seeded from torch's generator: the same seed, the same path.
    torch.manual_seed(1)
    a = nts.sdeint(sde, y0, ts, dt=0.05)
    torch.manual_seed(1)
    b = nts.sdeint(sde, y0, ts, dt=0.05)
    assert torch.equal(a, b)
    # The same default path as torchsde would need its own generator draws; check the statistics instead: the
    # spread of y(1) over 4096 paths of dy = 0 dt + 0.5 dW (Euler exact here) is 0.5.
    class Noise(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return torch.zeros_like(y)

        def g(self, t, y):
            return torch.full_like(y, 0.5)

    y_end = nts.sdeint(Noise(), torch.zeros(4096, 1, dtype=F64), [0.0, 1.0], dt=0.1, method="euler")[-1]
    assert abs(float(y_end.std()) - 0.5) < 0.03
    assert neurodyn.sdeint is nts.sdeint and neurodyn.sdeint_adjoint is nts.sdeint_adjoint


def test_errors_as_torchsde():
    """ValueErrors for what torchsde rejects (with its messages); the adaptive-Euler warning."""
    y0 = _y0()
    ito = SDE("diagonal", "ito")
    strat = SDE("diagonal", "stratonovich")
    general = SDE("general", "ito")
    cases = [
        (lambda lib: lib.sdeint(ito, y0, TS, method="heun"), "solver is for type"),
        (lambda lib: lib.sdeint(strat, y0, TS, method="srk"), "solver is for type"),
        (lambda lib: lib.sdeint(general, y0, TS, method="milstein"), "noise type general"),
        (lambda lib: lib.sdeint(ito, y0, TS, method="nope"), "Expected method"),
        (lambda lib: lib.sdeint(ito, y0[0], TS), "2-dimensional"),
        (lambda lib: lib.sdeint(ito, y0, torch.tensor([0.0, 0.5, 0.25], dtype=F64)), "strictly increasing"),
        (lambda lib: lib.sdeint(ito, y0, TS, method="srk",
                                bm=lib.BrownianInterval(0.0, 1.0, size=(B, D), dtype=F64)),
         "levy_area_approximation"),
        (lambda lib: lib.sdeint_adjoint(lambda: None, y0, TS), "nn.Module"),
    ]
    for call, msg in cases:
        for lib in (torchsde, nts):
            with pytest.raises(ValueError, match=msg):
                call(lib)
    with pytest.raises(ValueError, match="Expected noise type"):
        nts.BaseSDE(noise_type="weird", sde_type="ito")
    assert nts.SDEIto("diagonal").sde_type == "ito" and nts.SDEStratonovich("scalar").sde_type == "stratonovich"
    with pytest.warns(UserWarning, match="Euler"):
        nts.sdeint(ito, y0, TS, method="euler", adaptive=True, dt=0.05, rtol=1e-2, atol=1e-2)
    s = nts.settings
    assert s.METHODS.all() == torchsde.settings.METHODS.all()
    for name in ("NOISE_TYPES", "SDE_TYPES", "LEVY_AREA_APPROXIMATIONS"):
        assert getattr(s, name).all() == getattr(torchsde.settings, name).all()


@pytest.mark.parametrize("method,kind", [("euler", "ito"), ("midpoint", "stratonovich"),
                                         ("reversible_heun", "stratonovich")])
def test_outputs_between_steps_as_torchsde(method, kind):
    """Output times off the dt grid: torchsde's linear interpolation between step ends, reproduced to 1e-10."""
    ts = torch.tensor([0.0, 0.3, 0.55, 1.0], dtype=F64)
    sde = SDE("diagonal", kind)
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(B, D), dtype=F64, entropy=3)
    with torch.no_grad():
        ref = torchsde.sdeint(sde, _y0(), ts, bm=bm, method=method, dt=1 / 64)
        ours = nts.sdeint(sde, _y0(), ts, bm=bm, method=method, dt=1 / 64)
    assert float((ours - ref).abs().max()) < 1e-10


def test_logqp_adjoint():
    """sdeint_adjoint with logqp=True (the latent SDE's loss): gradients of ys and the KL term equal torchsde's
    adjoint and approach sdeint's discrete gradient."""
    sde = SDE("diagonal", "stratonovich")
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(B, D + 1), dtype=F64, entropy=3)
    res = []
    for fn in (nts.sdeint, nts.sdeint_adjoint, torchsde.sdeint_adjoint):
        sde.zero_grad()
        ys, kl = fn(sde, _y0(), TS, bm=bm, method="midpoint", dt=1 / 128, logqp=True)
        (ys.sum() + kl.sum()).backward()
        res.append(torch.cat([p.grad.flatten() for p in sde.parameters()]))
    assert float((res[1] - res[2]).abs().max()) < 1e-10 * float(res[2].abs().max())
    assert float((res[1] - res[0]).abs().max()) < 2e-3 * float(res[0].abs().max())


class _StateFreeNoise(torch.nn.Module):
    """Ito SDE, diagonal noise whose diffusion depends on a parameter but not on the state (as in a latent SDE with
    a shared noise scale, with a noise-free log-ratio channel)."""

    noise_type, sde_type = "diagonal", "ito"

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[0.8, -0.5], [0.3, 0.4]], dtype=F64))
        self.s = torch.nn.Parameter(torch.tensor([0.4, 0.0], dtype=F64))

    def f(self, t, y):
        return torch.tanh(y @ self.w) - 0.5 * y

    def g(self, t, y):
        return self.s.expand(y.size(0), 2)


def test_adjoint_of_ito_sde_whose_diffusion_ignores_the_state():
    """The Ito-to-Stratonovich drift correction of the adjoint is zero when g does not depend on y; sdeint_adjoint
    used to fail there (autograd.grad of a g without y in its graph). Gradients vs torchsde's direct and adjoint
    gradients on the same Brownian path."""
    y0 = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-0.3, 0.7]], dtype=F64)
    ts = torch.linspace(0.0, 1.0, 5, dtype=F64)
    grads = {}
    for name, sdeint in (("ours", nts.sdeint_adjoint), ("direct", torchsde.sdeint),
                         ("theirs", torchsde.sdeint_adjoint)):
        sde = _StateFreeNoise()
        bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(3, 2), dtype=F64, entropy=7)
        ys = sdeint(sde, y0, ts, bm=bm, method="euler", dt=2.0 ** -8)
        grads[name] = torch.cat([g.reshape(-1) for g in torch.autograd.grad((ys[-1] ** 2).sum(), [sde.w, sde.s])])
    assert grads["ours"].abs().max() > 0.1
    for ref in ("direct", "theirs"):
        assert float((grads["ours"] - grads[ref]).norm() / grads[ref].norm()) < 2e-2
