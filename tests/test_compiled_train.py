"""Compiled training steps (``compile=True`` with an autograd graph, ``neurodyn.compile.train``): the whole loop
compiled forward and backward gives the gradient of ``gradient="direct"`` without compiling (to rounding) and of
finite differences; where it does not apply (captured tensors, random draws, more steps than kept) the solve
steps in Python with the same gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neurodyn
from neurodyn.compile import policy, train


class Field(nn.Module):
    def __init__(self, hidden: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1, self.l2 = nn.Linear(2, hidden).double(), nn.Linear(hidden, 2).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) - 0.1 * y


def _grads(field, enc, x, t, compile, **kw):
    field.zero_grad()
    enc.zero_grad()
    x.grad = None
    y0 = enc(x)  # y0 behind a graph of its own (an encoder): the gradient goes through it
    sol = neurodyn.solve(field, y0, t, compile=compile, **{**KW, **kw})
    loss = sol.ys.pow(2).sum() + sol.ys[-1, 0, 1] * 0.5
    loss.backward()
    return sol, [x.grad.clone(), *(p.grad.clone() for p in (*field.parameters(), *enc.parameters()))]


# An adaptive training program with few stages (bosh3: the same loop as dopri5's with a smaller graph, ~2x quicker to
# compile); tests/test_compiled_loop.py runs dopri5's no-graph loop by default. The direct case runs in the default
# suite, so CI exercises the compiled training step; the checkpoint case (the same program) is slow.
KW = dict(method="bosh3", rtol=1e-6, atol=1e-8)
@pytest.mark.parametrize("gradient", ["direct", pytest.param("checkpoint", marks=pytest.mark.slow)])
def test_compiled_training_step_matches_eager(monkeypatch, gradient):
    monkeypatch.setattr(policy, "FORCE", "compiled")  # the path, not whether compiling pays here
    field, enc = Field(), nn.Linear(2, 2).double()
    x = torch.tensor([[0.4, -0.7]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0, 1.7, 2.5], dtype=torch.float64)
    ref_sol, ref = _grads(field, enc, x, t, False)
    sol, got = _grads(field, enc, x, t, True, gradient=gradient)
    assert sol.stats["compiled"] == "loop" and sol.stats["gradient"] == gradient
    assert sol.stats["steps"] == ref_sol.stats["steps"]
    torch.testing.assert_close(sol.ys, ref_sol.ys, rtol=0, atol=1e-13)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    # Cached: a second step compiles nothing and gives the same gradient.
    sol2, got2 = _grads(field, enc, x, t, True, gradient=gradient)
    assert sol2.stats["compiled"] == "loop"
    for a, b in zip(got2, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Once verified, dy/dt at t0 is evaluated inside the compiled programs only: no eager evaluation at the start and
    # no graph of the field around the compiled backward (the field's tanh would show; the encoder has none).
    starts = _count_start_evaluations(monkeypatch)
    field.zero_grad()
    sol3 = neurodyn.solve(field, enc(x), t, **KW, compile=True, gradient=gradient)
    loss = sol3.ys.pow(2).sum() + sol3.ys[-1, 0, 1] * 0.5
    assert starts() == 0 and sol3.stats["compiled"] == "loop" and sol3.stats["nfe"] == sol.stats["nfe"]
    names = _graph_node_names(loss)
    assert not any("Tanh" in name for name in names), names
    assert sum("RecordedSolve" in name for name in names) == 1
    loss.backward()
    for a, p in zip(got[1:5], field.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=0, atol=0)
    # NaN in dy/dt at t0 (a weight set to NaN: the same compiled program): the eager loop's status, message and
    # counts, from inside the compiled loop.
    kept = field.l2.bias[0].item()
    with torch.no_grad():
        field.l2.bias[0] = float("nan")
    try:
        bad = neurodyn.solve(field, enc(x), t, **KW, compile=True, gradient=gradient,
                             on_failure="return")
        assert starts() == 0
        ref_bad = neurodyn.solve(field, enc(x), t, **KW, on_failure="return")
        assert bad.status == ref_bad.status == "non_finite"
        assert bad.message == ref_bad.message and "initial time" in bad.message
        for key in ("nfe", "steps", "rejected", "initial_step"):
            assert bad.stats[key] == ref_bad.stats[key], key
        torch.testing.assert_close(bad.ys, ref_bad.ys, rtol=0, atol=0, equal_nan=True)
        with pytest.raises(neurodyn.SolveFailure, match="initial time"):
            neurodyn.solve(field, enc(x), t, **KW, compile=True, gradient=gradient)
    finally:
        with torch.no_grad():
            field.l2.bias[0] = kept



# A second program (rk4, fixed steps) compiled for the check against finite differences: ~15 s more, slow.
@pytest.mark.slow
@pytest.mark.parametrize("gradient", ["direct", "checkpoint"])
def test_compiled_training_step_matches_finite_differences(monkeypatch, gradient):
    monkeypatch.setattr(policy, "FORCE", "compiled")
    field, enc = Field(), nn.Linear(2, 2).double()
    x = torch.tensor([[0.4, -0.7]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0, 1.7, 2.5], dtype=torch.float64)
    # Finite differences of the same discrete solve (fixed steps: the step sizes do not move with the parameter).
    w = field.l1.weight
    sol_fixed, g_fixed = _grads(field, enc, x, t, True, gradient=gradient, method="rk4", step_size=0.05)
    assert sol_fixed.stats["compiled"] == "loop"
    _, g_fixed_eager = _grads(field, enc, x, t, False, method="rk4", step_size=0.05)
    for a, b in zip(g_fixed, g_fixed_eager):  # rk4: not FSAL, Hermite dense output
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    eps = 1e-6
    with torch.no_grad():
        def loss():
            ys = neurodyn.solve(field, enc(x), t, method="rk4", step_size=0.05).ys
            return float(ys.pow(2).sum() + ys[-1, 0, 1] * 0.5)
        w0 = w[0, 1].item()
        w[0, 1] = w0 + eps
        up = loss()
        w[0, 1] = w0 - eps
        down = loss()
        w[0, 1] = w0
    fd = (up - down) / (2 * eps)
    assert abs(g_fixed[1][0, 1].item() - fd) <= 1e-7 * max(1.0, abs(fd))


def _count_start_evaluations(monkeypatch):
    """Count the eager evaluations of dy/dt at the initial time (gradients.direct's checked call)."""
    from neurodyn.gradients import direct

    n = [0]
    checked = direct.check_derivative

    def counting(f0, y0):
        n[0] += 1
        return checked(f0, y0)

    monkeypatch.setattr(direct, "check_derivative", counting)

    def count():
        out, n[0] = n[0], 0
        return out

    return count


def _graph_node_names(root):
    """The names of the autograd nodes behind ``root``."""
    names, seen, stack = [], set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(nf for nf, _ in node.next_functions)
    return names


def test_only_the_fields_own_tensors_may_need_gradients():
    field = Field()
    y0 = torch.tensor([[0.1, 0.2]], dtype=torch.float64, requires_grad=True)
    t0 = torch.zeros((), dtype=torch.float64)
    assert train.own_tensors_only(field, y0, field(t0, y0))
    # y0 behind an encoder: the encoder's weights are not the field's, and are not walked.
    enc = nn.Linear(2, 2).double()
    y_enc = enc(y0)
    assert train.own_tensors_only(field, y_enc, field(t0, y_enc))
    # A captured tensor requiring grad: the compiled backward would miss it.
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    assert not train.own_tensors_only(field, y0, field(t0, y0) * scale)
    assert train.capacity({}, ("k",), field, y0, field(t0, y0) * scale) is None
    assert train.capacity({}, ("k",), lambda t, y: -y, y0, -y0) is None  # not a module: no named tensors


def test_capacity_grows_past_a_solve_that_took_more_steps():
    per_func: dict = {}
    field = Field()
    y0 = torch.tensor([[0.1, 0.2]], dtype=torch.float64)
    k0 = field(torch.zeros((), dtype=torch.float64), y0)
    assert train.capacity(per_func, ("k",), field, y0, k0) == train.FIRST_CAPACITY
    train.grow(per_func, ("k",), train.FIRST_CAPACITY + 1)
    assert train.capacity(per_func, ("k",), field, y0, k0) == 4 * train.FIRST_CAPACITY
    big = torch.zeros(1, train.MAX_RECORD_ELEMENTS // 8)  # too large a state to keep 1024 steps of
    assert train.capacity(per_func, ("k",), field, big, k0) is None


class Noisy(Field):
    def forward(self, t, y):
        return super().forward(t, y) + 1e-3 * torch.randn_like(y)


@pytest.mark.slow
def test_random_draws_and_captured_tensors_step_in_python(monkeypatch):
    monkeypatch.setattr(policy, "FORCE", "compiled")
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y0 = torch.tensor([[0.4, -0.7]], dtype=torch.float64)
    noisy = Noisy()
    sol = neurodyn.solve(noisy, y0, t, compile=True)
    sol.ys.sum().backward()
    assert sol.stats["compiled"] == "step"  # the recorded forward drew random numbers: not replayable
    sol = neurodyn.solve(noisy, y0, t, compile=True)
    assert sol.stats["compiled"] == "step"  # remembered: not recorded again


class Scaled(Field):
    """Reads a tensor that is neither a parameter nor a buffer of its own (a plain attribute)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.tensor(1.5, dtype=torch.float64)

    def forward(self, t, y):
        return super().forward(t, y) * self.scale


class Dropping(Field):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.2)

    def forward(self, t, y):
        return self.l2(self.drop(torch.tanh(self.l1(y)))) - 0.1 * y


@pytest.mark.slow
def test_checks_run_again_for_a_new_variant_of_the_compiled_program(monkeypatch):
    # Verified compiled programs skip the eager evaluation at t0 and its checks; a change of the field's Python state
    # (a captured tensor starting to need gradients) compiles a new variant, which is checked again: Python steps,
    # with the eager gradients.
    monkeypatch.setattr(policy, "FORCE", "compiled")
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    y0 = torch.tensor([[0.4, -0.7]], dtype=torch.float64)
    field = Scaled()
    for _ in range(3):
        sol = neurodyn.solve(field, y0, t, compile=True)
        sol.ys.sum().backward()
        assert sol.stats["compiled"] == "loop"
    field.scale.requires_grad_(True)
    sol = neurodyn.solve(field, y0, t, compile=True)
    sol.ys.sum().backward()
    assert sol.stats["compiled"] == "step"
    got = field.scale.grad.clone()
    field.scale.grad = None
    neurodyn.solve(field, y0, t).ys.sum().backward()
    torch.testing.assert_close(got, field.scale.grad, rtol=1e-11, atol=1e-13)


@pytest.mark.slow
def test_train_mode_dropout_after_verified_eval_solves_steps_in_python(monkeypatch):
    # eval() solves verify their variant; train() compiles a new one, which draws random numbers: noticed on its first
    # (checked) solve, which steps in Python.
    monkeypatch.setattr(policy, "FORCE", "compiled")
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    y0 = torch.tensor([[0.4, -0.7]], dtype=torch.float64)
    kw = dict(method="rk4", step_size=0.1, compile=True)  # fixed steps: a field with dropout is a random one
    dropping = Dropping().eval()
    for _ in range(3):
        sol = neurodyn.solve(dropping, y0, t, **kw)
        sol.ys.sum().backward()
        assert sol.stats["compiled"] == "loop"
    dropping.train()
    sol = neurodyn.solve(dropping, y0, t, **kw)
    assert sol.stats["compiled"] == "step"


@pytest.mark.slow
def test_checkpoint_hidden_tensor_check_left_to_the_compiled_step(monkeypatch):
    # gradient="checkpoint" with compile=True: prepare leaves the hidden-tensor check at t0 to the solve, which makes it
    # only where the compiled training step does not run (that step checks the field's tensors itself, once per
    # compiled variant). A cached step makes no check evaluation; a captured tensor that starts to need gradients, or
    # a buffer requiring grad, raises the same InputError as without compile=True.
    from neurodyn.gradients import checkpoint

    monkeypatch.setattr(policy, "FORCE", "compiled")
    calls = [0]
    real = checkpoint.check_hidden_tensors

    def counting(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(checkpoint, "check_hidden_tensors", counting)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    y0 = torch.tensor([[0.4, -0.7]], dtype=torch.float64)
    field = Scaled()
    for _ in range(3):
        field.zero_grad()
        sol = neurodyn.solve(field, y0, t, compile=True, gradient="checkpoint")
        sol.ys.sum().backward()
        assert sol.stats["compiled"] == "loop" and sol.stats["gradient"] == "checkpoint"
    assert calls[0] == 0
    got = [p.grad.clone() for p in field.parameters()]
    field.zero_grad()
    neurodyn.solve(field, y0, t, gradient="checkpoint").ys.sum().backward()
    for a, p in zip(got, field.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-11, atol=1e-13)
    field.scale.requires_grad_(True)
    with pytest.raises(neurodyn.InputError, match=r"params="):
        neurodyn.solve(field, y0, t, compile=True, gradient="checkpoint")
    with pytest.raises(neurodyn.InputError, match=r"params="):
        neurodyn.solve(field, y0, t, gradient="checkpoint")
    assert calls[0] == 1
    shifted = Shifted()
    with pytest.raises(neurodyn.InputError, match=r"params="):
        neurodyn.solve(shifted, y0, t, compile=True, gradient="checkpoint")
    assert calls[0] == 2


class Shifted(Field):
    """Reads a buffer requiring grad (the checkpoint replay differentiates parameters only)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.full((2,), 0.1, dtype=torch.float64, requires_grad=True))

    def forward(self, t, y):
        return super().forward(t, y) + self.shift
