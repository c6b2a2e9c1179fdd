"""The vector field's result is checked at every call (issue 12, item 5): a later wrong shape or a non-tensor is
a clear InputError naming the time, never silently wrong rows or a torch-internal error."""

from __future__ import annotations

import pytest
import torch

import neurodyn
from neurodyn.errors import InputError

F64 = torch.float64


def _field(bad):
    def f(t, y):
        if float(t.reshape(-1)[0]) < 0.5:
            return -y
        return bad(y)
    return f


BROADCASTABLE = lambda y: (-y).sum(-1, keepdim=True)  # noqa: E731  (2,) state -> (1,): broadcasts silently
NONE = lambda y: None  # noqa: E731


@pytest.mark.parametrize("bad, match", [(BROADCASTABLE, r"returned shape \(1,\) at t="),
                                        (NONE, "returned NoneType at t=")])
@pytest.mark.parametrize("method, grad, kw", [("dopri5", False, {}), ("dopri5", True, {}), ("tsit5", False, {}),
                                              ("rk4", False, {"step_size": 0.1}), ("radau", False, {}),
                                              ("bdf", False, {}), ("leapfrog", False, {"step_size": 0.1}),
                                              ("adams", False, {})])
def test_a_later_bad_output_is_an_input_error(bad, match, method, grad, kw):
    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=grad)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(InputError, match=match):
        neurodyn.solve(_field(bad), y0, t, method=method, **kw)


@pytest.mark.parametrize("bad, match", [(lambda y: (-y).sum(-1, keepdim=True), r"returned shape \(3, 1\) at t="),
                                        (NONE, "returned NoneType at t=")])
def test_per_sample_rows_check_every_output(bad, match):
    y0 = torch.ones(3, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(InputError, match=match):
        neurodyn.solve(_field(bad), y0, t, per_sample_steps=True)


def test_good_fields_are_unaffected():
    """The check is metadata only: the solution of y' = -y is still exp(-t) to the tolerance."""
    t = torch.linspace(0, 1, 5, dtype=F64)
    sol = neurodyn.solve(lambda t, y: -y, torch.ones(2, dtype=F64), t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sol.ys[:, 0], torch.exp(-t), rtol=1e-8, atol=0)
