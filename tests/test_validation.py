"""Bad input raises neurodyn.InputError (a ValueError) before any real work is done."""

from __future__ import annotations

import math

import pytest
import torch
from problems import ADAPTIVE_METHODS, FIXED_METHODS

import neurodyn

ALL_METHODS = FIXED_METHODS + ADAPTIVE_METHODS
F64 = torch.float64


class Counting:
    """A vector field that counts its calls; ``out`` maps y to what it returns (default -y)."""

    def __init__(self, out=None):
        self.calls = 0
        self.out = out or (lambda y: -y)

    def __call__(self, t, y):
        self.calls += 1
        return self.out(y)


def assert_input_error(*, y0=None, t=None, func=None, max_calls=1, match=None, **kwargs):
    func = func or Counting()
    y0 = torch.ones(3, dtype=F64) if y0 is None else y0
    t = torch.tensor([0.0, 1.0], dtype=F64) if t is None else t
    with pytest.raises(neurodyn.InputError, match=match) as info:
        neurodyn.solve(func, y0, t, **kwargs)
    assert isinstance(info.value, ValueError)
    assert str(info.value), "empty message"
    assert func.calls <= max_calls, f"func was called {func.calls} times before the error"
    return info.value


def test_hierarchy():
    assert issubclass(neurodyn.InputError, ValueError)
    for cls in (neurodyn.MaxStepsReached, neurodyn.StepSizeUnderflow, neurodyn.NonFiniteError):
        assert issubclass(cls, neurodyn.SolveFailure)


# ------------------------------------------------------------------------------------------ times
BAD_TIMES = {
    "non_monotonic": torch.tensor([0.0, 1.0, 0.5], dtype=F64),
    "non_monotonic_backward": torch.tensor([1.0, 0.0, 0.5], dtype=F64),
    "repeated": torch.tensor([0.0, 1.0, 1.0], dtype=F64),
    "nan": torch.tensor([0.0, float("nan"), 2.0], dtype=F64),
    "inf": torch.tensor([0.0, float("inf")], dtype=F64),
    "neg_inf_start": torch.tensor([float("-inf"), 0.0], dtype=F64),
    "two_dim": torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=F64),
    "zero_dim": torch.tensor(1.0, dtype=F64),
    "length_one": torch.tensor([0.0], dtype=F64),
    "empty": torch.zeros(0, dtype=F64),
    "integer": torch.tensor([0, 1, 2]),
    "float32_for_float64_state": torch.tensor([0.0, 1.0], dtype=torch.float32),
}


@pytest.mark.parametrize("name", list(BAD_TIMES))
def test_bad_times(name):
    assert_input_error(t=BAD_TIMES[name])


def test_t_float64_for_float32_state():
    assert_input_error(y0=torch.ones(3, dtype=torch.float32), t=torch.tensor([0.0, 1.0], dtype=F64))


def test_t_float64_for_complex64_state():
    assert_input_error(y0=torch.ones(3, dtype=torch.complex64), t=torch.tensor([0.0, 1.0], dtype=F64))


def test_t_float32_for_complex128_state():
    assert_input_error(y0=torch.ones(3, dtype=torch.complex128), t=torch.tensor([0.0, 1.0], dtype=torch.float32))


def test_device_mismatch_meta():
    assert_input_error(y0=torch.ones(3, dtype=F64, device="meta"), max_calls=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch_cuda():
    assert_input_error(y0=torch.ones(3, dtype=F64, device="cuda"), max_calls=1)


# -------------------------------------------------------------------------------- what func returns
BAD_RETURNS = {
    "shorter": lambda y: -y[:-1],
    "extra_dim": lambda y: -y[None],
    "scalar": lambda y: -y.sum(),
    "float32": lambda y: (-y).float(),
    "complex": lambda y: (-y).to(torch.complex128),
}


@pytest.mark.parametrize("name", list(BAD_RETURNS))
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_func_returns_wrong_shape_or_dtype(name, method):
    func = Counting(BAD_RETURNS[name])
    assert_input_error(func=func, method=method, max_calls=1)
    assert func.calls == 1


def test_func_returns_real_for_complex_state():
    func = Counting(lambda y: (-y).real)
    assert_input_error(y0=torch.ones(3, dtype=torch.complex128), func=func)


# -------------------------------------------------------------------------------------- tolerances
@pytest.mark.parametrize("kw", [{"rtol": -1e-6}, {"atol": -1e-9}, {"rtol": float("nan")}, {"atol": float("inf")},
                                {"rtol": float("inf")}, {"atol": float("nan")}], ids=str)
def test_bad_tolerances(kw):
    assert_input_error(max_calls=1, **kw)


# ----------------------------------------------------------------------------------------- methods
def test_unknown_method_lists_valid_ones():
    err = assert_input_error(method="dopri6", max_calls=1)
    for m in ALL_METHODS:
        assert m in str(err), f"{m!r} not listed in {str(err)!r}"


def test_unknown_option():
    func = Counting()
    with pytest.raises((neurodyn.InputError, TypeError)):
        neurodyn.solve(func, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), stepsize=0.1)
    assert func.calls <= 1


@pytest.mark.parametrize("method", FIXED_METHODS)
@pytest.mark.parametrize("h", [0.0, -0.1, float("nan")])
def test_fixed_step_size_not_positive(method, h):
    assert_input_error(method=method, step_size=h)


@pytest.mark.parametrize("n", [0, -1])
def test_max_steps_below_one(n):
    assert_input_error(max_steps=n)


def test_bad_on_failure():
    assert_input_error(on_failure="ignore")


def test_bad_gradient_mode():
    assert_input_error(gradient="telepathy")


# ------------------------------------------------------------------------------------------ odeint
def test_odeint_unknown_method_lists_valid_ones():
    with pytest.raises(neurodyn.InputError) as info:
        neurodyn.odeint(Counting(), torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="rk45")
    assert isinstance(info.value, ValueError)
    for m in ("dopri5", "rk4", "euler", "bosh3"):
        assert m in str(info.value)


def test_odeint_unknown_option_lists_valid_ones():
    with pytest.raises(neurodyn.InputError) as info:
        neurodyn.odeint(Counting(), torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                        method="dopri5", options={"stepsize": 0.1})
    assert isinstance(info.value, ValueError)
    assert "stepsize" in str(info.value)
    assert "first_step" in str(info.value) and "max_num_steps" in str(info.value), str(info.value)


def test_odeint_bad_times():
    with pytest.raises(neurodyn.InputError):
        neurodyn.odeint(Counting(), torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0, 0.5], dtype=F64))


def test_valid_call_is_not_rejected():
    """Control: the defaults used by assert_input_error are valid."""
    func = Counting()
    sol = neurodyn.solve(func, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert sol.success and math.isclose(float(sol.ys[-1, 0]), math.exp(-1.0), rel_tol=1e-6)
