"""Repeat calls of the compiled whole loop without Dynamo's frame machinery (``neurodyn.compile.entries``): the
entry's guards are still checked, so whatever makes Dynamo compile a new variant (Python state the field reads, its
``training`` flag where it reads it, a tensor's dtype, shape or ``requires_grad``) still does, and results equal
those of Dynamo's own call bit for bit."""

import pytest
import torch
from torch import nn

import neurodyn
from neurodyn.compile import entries as entries_mod
from neurodyn.compile import loop as loop_mod

F64 = torch.float64
T = torch.linspace(0, 2, 5, dtype=F64)
Y0 = torch.tensor([[0.3, -0.2]], dtype=F64)


class Scaled(nn.Module):
    """dy/dt = +-tanh(y W) (+ 1 while training): Python state the compiled loop reads. (A bool: a changed Python
    float makes Dynamo's recompilation of the loop fail and the solve step in Python, on main as well.)"""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(2, 2, generator=g, dtype=F64))
        self.negate = True

    def forward(self, t, y):
        out = -torch.tanh(y @ self.w) if self.negate else torch.tanh(y @ self.w)
        return out + 1.0 if self.training else out


def _count_direct(monkeypatch):
    """Counts of the entries' calls that ran a program (``ran``) and that left it to Dynamo (``left``)."""
    counts = {"ran": 0, "left": 0}
    orig = entries_mod.Entries.__call__

    def counting(self, args, entries=None):
        out = orig(self, args, entries)
        counts["ran" if out is not None else "left"] += 1
        return out

    monkeypatch.setattr(entries_mod.Entries, "__call__", counting)
    return counts


def _solve(field, y0=Y0, **kw):
    with torch.no_grad():
        sol = neurodyn.solve(field, y0, T, method="rk4", step_size=0.05, compile=True, **kw)
    assert sol.stats["compiled"] == "loop"
    return sol


def _eager(field, y0=Y0):
    with torch.no_grad():
        return neurodyn.solve(field, y0, T, method="rk4", step_size=0.05).ys


def test_repeat_solves_run_the_entry_and_follow_python_state(monkeypatch):
    field = Scaled().eval()
    counts = _count_direct(monkeypatch)
    first = _solve(field)
    again = _solve(field)
    assert counts["ran"] >= 1  # the repeat solve ran the compiled entry directly
    assert torch.equal(first.ys, again.ys)
    assert torch.allclose(again.ys, _eager(field), rtol=1e-10, atol=1e-12)
    # Python state the field reads (a flag and its training flag, changed together: one more compiled variant, ~10 s):
    # the entry's guards fail, Dynamo compiles a new variant, the result follows it
    field.negate = False
    field.train()
    ran = counts["ran"]
    changed = _solve(field)
    assert torch.allclose(changed.ys, _eager(field), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(changed.ys, first.ys)
    # back to the first state: its entry runs again, with the first result
    field.eval()
    field.negate = True
    back = _solve(field)
    assert torch.equal(back.ys, first.ys)
    assert counts["ran"] > ran


def test_entries_equal_dynamos_call_and_refuse_other_states(monkeypatch):
    field = Scaled().eval()
    _solve(field)
    _solve(field)
    per_func = loop_mod._CACHE[field]
    fns = [v for k, v in per_func.items() if isinstance(k, tuple) and len(k) == 4 and hasattr(v, "entries")]
    assert len(fns) == 1
    fn = fns[0]
    calls = [args for args in _captured_args(monkeypatch, field)]
    args = calls[-1]
    with torch.no_grad():
        direct = fn.entries(args)
        dynamo = fn(*args)
        assert direct is not None
        assert all(torch.equal(a, b) for a, b in zip(direct, dynamo))
        # another dtype of an input, or an input of another shape: no entry's guards pass (Dynamo's path)
        assert fn.entries((args[0], args[1].float(), *args[2:])) is None
        assert fn.entries((*args[:4], args[4][:1], *args[5:])) is None
        # under another stance Dynamo would not run the entry as it is
        with torch.compiler.set_stance("force_eager"):
            assert fn.entries(args) is None
        # torch._dynamo.config.disable stops Dynamo compiling, not running an entry whose guards pass: nor this
        assert len(fn.entries.cache()) == 1
        with torch._dynamo.config.patch(disable=True):
            direct, dynamo = fn.entries(args, fn.entries.cache()), fn(*args)
            assert direct is not None and all(torch.equal(a, b) for a, b in zip(direct, dynamo))


def _captured_args(monkeypatch, field):
    """The arguments of the compiled loop's calls during one more solve."""
    seen = []
    orig = entries_mod.Entries.__call__

    def keep(self, args, entries=None):
        seen.append(args)
        return orig(self, args, entries)

    monkeypatch.setattr(entries_mod.Entries, "__call__", keep)
    _solve(field)
    monkeypatch.setattr(entries_mod.Entries, "__call__", orig)
    return seen


def test_own_constant_guards_leave_out_only_the_loops_own_closure():
    class Entry:
        def __init__(self, name):
            self.name = name

    names = ["plan", "plan.a_rows[1][0]", "e_row[0][1]", "pid.safety", "n_out", "f", "f.__closure__[0].cell_contents",
             "tensors[0]", "cv", "planned", "G['torch']"]
    kept = loop_mod._own_constant_guards([Entry(n) for n in names])
    assert kept == [False, False, False, False, False, True, True, True, True, True, True]


# --------------------------------------------------------------------------- the compiled per-sample row loop
class Rows(nn.Module):
    """dy/dt = +-k * y per row (k a buffer: one rate per row; the sign Python state the compiled loop reads)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k", torch.linspace(0.5, 3.0, 16, dtype=F64).view(16, 1))
        self.negate = True

    def forward(self, t, y):
        return -self.k * y if self.negate else self.k * y


Y0_ROWS = torch.linspace(0.5, 1.5, 32, dtype=F64).view(16, 2)


def _solve_rows(field, **kw):
    with torch.no_grad():
        sol = neurodyn.solve(field, Y0_ROWS, T, rtol=1e-7, atol=1e-9, per_sample_steps=True, **kw)
    if kw.get("compile"):
        assert sol.stats["compiled"] == "row-loop"
    return sol


def _row_loop(field):
    from neurodyn.compile import rows as rows_mod

    fns = [v for k, v in rows_mod._CACHE[field].items() if isinstance(k, tuple) and k[0] == "loop"]
    assert len(fns) == 1
    return fns[0]


def test_row_loop_repeat_solves_run_the_entry_equal_to_dynamos_call(monkeypatch):
    field = Rows()
    counts = _count_direct(monkeypatch)
    first = _solve_rows(field, compile=True)
    assert counts["ran"] == 0 and counts["left"] == 1  # the first call compiles through Dynamo
    again = _solve_rows(field, compile=True)
    assert counts["ran"] == 1  # the repeat solve ran the compiled entry directly
    assert torch.equal(first.ys, again.ys) and first.stats["nfe"] == again.stats["nfe"]
    eager = _solve_rows(field)
    assert torch.allclose(again.ys, eager.ys, rtol=1e-9, atol=1e-12)
    assert torch.allclose(again.ys[-1], Y0_ROWS * torch.exp(-2.0 * field.k), rtol=1e-5)
    # the entry's result equals Dynamo's call of the same program on the same arguments, bit for bit
    fn = _row_loop(field)
    seen = []
    orig = entries_mod.Entries.__call__

    def keep(self, args, entries=None):
        seen.append(tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
        return orig(self, args, entries)

    monkeypatch.setattr(entries_mod.Entries, "__call__", keep)
    _solve_rows(field, compile=True)
    monkeypatch.setattr(entries_mod.Entries, "__call__", orig)
    args = seen[-1]
    with torch.no_grad():  # (each call on fresh copies: the program writes its output buffer, args[3], in place)
        direct = fn.entries(tuple(a.clone() for a in args))
        dynamo = fn(*[a.clone() for a in args])
        assert direct is not None
        for a, b in zip(direct, dynamo):  # (the output buffer's unused block holds NaN)
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        # an input of another dtype: no entry's guards pass (Dynamo's path)
        assert fn.entries((args[0].float(), *args[1:])) is None


@pytest.mark.slow
def test_row_loop_entries_follow_python_state(monkeypatch):
    field = Rows()
    counts = _count_direct(monkeypatch)
    first = _solve_rows(field, compile=True)
    field.negate = False  # the entry's guards fail: Dynamo compiles a new variant, the result follows it
    changed = _solve_rows(field, compile=True)
    assert torch.allclose(changed.ys, _solve_rows(field).ys, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(changed.ys, first.ys)
    ran = counts["ran"]
    field.negate = True  # back: the first entry runs again, with the first result
    back = _solve_rows(field, compile=True)
    assert counts["ran"] > ran
    assert torch.equal(back.ys, first.ys)


def test_row_loop_own_constant_guards_leave_out_only_its_own_closure():
    from neurodyn.compile import rows as rows_mod

    class Entry:
        def __init__(self, name):
            self.name = name

    names = ["att", "att.c[1]", "att.pid.safety", "cols", "log_control", "blend", "int32", "shape[0]", "state_names",
             "choose_first", "func", "func.__closure__[0].cell_contents", "tensors[0]", "sv", "attempt", "G['torch']"]
    kept = rows_mod._own_constant_guards([Entry(n) for n in names])
    assert kept == [False] * 10 + [True] * 6
