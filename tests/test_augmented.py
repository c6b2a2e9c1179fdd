"""``neurodyn.AugmentedNeuralODE``: shapes, exactness of zero augmentation, gradients vs finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neurodyn
from neurodyn import AugmentedNeuralODE, InputError, NeuralODE

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: intra-op threads only add contention on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mlp(dim: int, hidden: int = 8, seed: int = 0, dtype: torch.dtype = F64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim)).to(dtype)


def test_exported():
    assert neurodyn.AugmentedNeuralODE is AugmentedNeuralODE
    assert "AugmentedNeuralODE" in neurodyn.__all__


@pytest.mark.parametrize("augmentation", ["zero", "learned"])
@pytest.mark.parametrize("out_dim", [None, 3])
def test_shapes(augmentation, out_dim):
    model = AugmentedNeuralODE(_mlp(2 + 4), in_dim=2, aug_dim=4, augmentation=augmentation, out_dim=out_dim,
                               rtol=1e-5, atol=1e-7).to(F64)
    x = torch.randn(5, 2, dtype=F64)
    assert model.augment(x).shape == (5, 6)
    y = model(x)
    assert y.shape == (5, out_dim if out_dim is not None else 6)
    assert model.nfe_forward > 0
    assert model.state_dim == 6
    # more leading dimensions are just a bigger batch
    assert model(torch.randn(3, 5, 2, dtype=F64)).shape == (3, 5, out_dim if out_dim is not None else 6)


def test_trajectory_output_applies_head_at_every_time():
    t = torch.linspace(0, 1, 4, dtype=F64)
    model = AugmentedNeuralODE(_mlp(3), in_dim=1, aug_dim=2, out_dim=1, t=t, output="trajectory").to(F64)
    x = torch.randn(7, 1, dtype=F64)
    y = model(x)
    assert y.shape == (4, 7, 1)
    # at t0 the state is the augmented input
    torch.testing.assert_close(y[0], model.head(model.augment(x)))


def test_aug_dim_zero_is_a_plain_node():
    f = _mlp(2)
    model = AugmentedNeuralODE(f, in_dim=2, aug_dim=0, rtol=1e-6, atol=1e-8)
    x = torch.randn(4, 2, dtype=F64)
    assert torch.equal(model(x), NeuralODE(f, rtol=1e-6, atol=1e-8)(x))


def test_zero_augmentation_equals_node_on_padded_input_exactly():
    f = _mlp(5)
    kw = dict(method="dopri5", rtol=1e-6, atol=1e-8)
    anode = AugmentedNeuralODE(f, in_dim=2, aug_dim=3, augmentation="zero", **kw)
    node = NeuralODE(f, **kw)
    x = torch.randn(6, 2, dtype=F64)
    padded = torch.cat([x, torch.zeros(6, 3, dtype=F64)], -1)
    y_a, y_n = anode(x), node(padded)
    assert torch.equal(y_a, y_n)
    assert anode.nfe_forward == node.nfe_forward
    # the gradients match too
    (g_a,) = torch.autograd.grad(anode(x).sum(), f[0].weight)
    (g_n,) = torch.autograd.grad(node(padded).sum(), f[0].weight)
    assert torch.equal(g_a, g_n)


def test_learned_augmentation_starts_at_zero_and_trains():
    f = _mlp(4)
    model = AugmentedNeuralODE(f, in_dim=2, aug_dim=2, augmentation="learned", out_dim=1).to(F64)
    x = torch.randn(5, 2, dtype=F64)
    assert torch.equal(model.augment(x)[:, 2:], torch.zeros(5, 2, dtype=F64))
    model(x).sum().backward()
    assert model.augment_map.weight.grad is not None
    assert model.augment_map.weight.grad.abs().sum() > 0


def test_autonomous_and_time_dependent_fields():
    class TimeField(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3).to(F64)

        def forward(self, t, z):
            return self.lin(z) * torch.cos(t)

    model = AugmentedNeuralODE(TimeField(), in_dim=1, aug_dim=2)
    assert model(torch.randn(2, 1, dtype=F64)).shape == (2, 3)


def _finite_difference_check(model: nn.Module, x: torch.Tensor, eps: float = 1e-6) -> int:
    """Compare autograd gradients of a scalar loss (w.r.t. every parameter entry and the input) with
    central differences; returns the model's ``nfe_backward`` of that backward pass."""
    w = torch.linspace(0.5, 1.5, model(x).numel(), dtype=F64).reshape(model(x).shape)

    def loss(inp: torch.Tensor) -> torch.Tensor:
        return (model(inp) * w).sum()

    x = x.clone().requires_grad_(True)
    model.zero_grad()
    value = loss(x)
    value.backward()
    nfe_backward = model.nfe_backward  # read now: the finite differences below re-solve
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    with torch.no_grad():
        for p in [*params, x]:
            grad = p.grad.clone()
            fd = torch.zeros_like(p)
            flat, fd_flat = p.view(-1), fd.view(-1)
            for i in range(flat.numel()):
                old = float(flat[i])
                flat[i] = old + eps
                up = float(loss(x))
                flat[i] = old - eps
                down = float(loss(x))
                flat[i] = old
                fd_flat[i] = (up - down) / (2 * eps)
            torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-7)
    return nfe_backward


@pytest.mark.parametrize("augmentation", ["zero", "learned"])
@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_gradients_match_finite_differences(augmentation, gradient):
    torch.manual_seed(1)
    f = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    model = AugmentedNeuralODE(f, in_dim=1, aug_dim=2, augmentation=augmentation, out_dim=2,
                               rtol=1e-10, atol=1e-12, gradient=gradient).to(F64)
    if model.augment_map is not None:  # move off the zero initialisation so its gradient path is exercised
        with torch.no_grad():
            model.augment_map.weight.normal_()
            model.augment_map.bias.normal_()
    x = torch.randn(3, 1, dtype=F64)
    nfe_backward = _finite_difference_check(model, x)
    assert (nfe_backward > 0) == (gradient == "adjoint")


def test_gradcheck_input():
    f = _mlp(3, hidden=4, seed=2)
    model = AugmentedNeuralODE(f, in_dim=1, aug_dim=2, augmentation="learned", out_dim=1, rtol=1e-10,
                               atol=1e-12).to(F64)
    x = torch.randn(2, 1, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_validation():
    f = _mlp(3)
    with pytest.raises(InputError):
        AugmentedNeuralODE(f, in_dim=0, aug_dim=2)
    with pytest.raises(InputError):
        AugmentedNeuralODE(f, in_dim=1, aug_dim=-1)
    with pytest.raises(InputError):
        AugmentedNeuralODE(f, in_dim=1, aug_dim=2, augmentation="random")
    with pytest.raises(InputError):
        AugmentedNeuralODE(f, in_dim=1, aug_dim=2, out_dim=1, output="solution")
    model = AugmentedNeuralODE(f, in_dim=1, aug_dim=2)
    with pytest.raises(InputError):
        model(torch.randn(4, 2, dtype=F64))
