"""Progress and control during a solve (issue 17, part 4): ``solve(progress=...)``, ``solve(callback=...)``, manual
stepping (``neurodyn.init`` / ``neurodyn.step``) and the trainer's bar."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

import neurodyn
from neurodyn import progress as progress_mod
from neurodyn.errors import InputError, InputTypeError, MaxStepsReached
from neurodyn.progress import Progress, SolveProgress, progress_bar

F64 = torch.float64


class Counted:
    """``dy/dt = -k (y - cos t)`` (k = 1: mildly damped; k = 200: stiff), counting its evaluations."""

    def __init__(self, k: float = 1.0):
        self.k = k
        self.calls = 0

    def __call__(self, t, y):
        self.calls += 1
        return -self.k * (y - torch.cos(t))


def exact(k: float, t: float, y0: float) -> float:
    """The closed form of ``dy/dt = -k (y - cos t)``, ``y(0) = y0``."""
    a = k / (k * k + 1.0)
    particular = a * (k * math.cos(t) + math.sin(t))
    return particular + (y0 - a * k) * math.exp(-k * t)


def y0_t(t1: float = 3.0, n: int = 4):
    return torch.tensor([1.0, -0.5], dtype=F64), torch.linspace(0.0, t1, n, dtype=F64)


def attempts(k: float, y0, t, **kw):
    """The solve's attempted steps through ``callback``: (t, y clone, h, accepted) each."""
    seq = []
    sol = neurodyn.solve(Counted(k), y0, t, callback=lambda tt, y, h, a: seq.append((tt, y.clone(), h, a)), **kw)
    return sol, seq


def stepped(k: float, y0, t, **kw):
    """The same solve stepped by hand: the state and (t, y, h, accepted) after every step()."""
    state = neurodyn.init(Counted(k), y0, t, **kw)
    seq = []
    while not state.done:
        neurodyn.step(state)
        seq.append((state.t, state.y.clone(), state.h, state.accepted))
    return state, seq


# ----------------------------------------------------------------------------------------------
# callback
# ----------------------------------------------------------------------------------------------
def test_callback_sequence_matches_the_solution_stats_and_the_closed_form():
    """Every attempt is reported once: accepted ones count sol.stats['steps'], rejected ones 'rejected' (forced
    here by a first step of 2.0), the accepted steps tile [0, 3], and the reported states are the solution."""
    y0, t = y0_t()
    sol, seq = attempts(1.0, y0, t, method="dopri5", rtol=1e-8, atol=1e-10, first_step=2.0)
    acc = [s for s in seq if s[3]]
    rej = [s for s in seq if not s[3]]
    assert len(acc) == sol.stats["steps"] and len(rej) == sol.stats["rejected"] >= 1
    assert math.isclose(sum(s[2] for s in acc), 3.0, rel_tol=1e-14)
    t_now = 0.0
    for tt, y, h, a in seq:  # rejected: the start again; accepted: the end t + h
        assert tt == (t_now + h if a else t_now) or (a and tt == 3.0 and math.isclose(t_now + h, 3.0))
        if a:
            t_now = tt
            ref = torch.tensor([exact(1.0, tt, 1.0), exact(1.0, tt, -0.5)], dtype=F64)
            assert torch.allclose(y, ref, atol=1e-7)
        assert y.shape == y0.shape
    assert acc[-1][0] == 3.0 and torch.equal(acc[-1][1], sol.ys[-1])


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
def test_callback_follows_the_forward_solve_only(gradient):
    """With the adjoint and checkpoint gradients the callback sees the forward attempts, not the backward solve
    or the replays: as many calls as the forward's steps + rejections, the same sequence as the direct solve."""
    lin = torch.nn.Linear(2, 2, dtype=F64)
    y0, t = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True), torch.linspace(0, 1, 3, dtype=F64)
    seq = []
    sol = neurodyn.solve(lambda tt, y: torch.tanh(lin(y)), y0, t, gradient=gradient, rtol=1e-7, atol=1e-9,
                         params=list(lin.parameters()), callback=lambda tt, y, h, a: seq.append((tt, h, a)))
    sol.ys.sum().backward()
    assert len(seq) == sol.stats["steps"] + sol.stats["rejected"]
    ref = []
    neurodyn.solve(lambda tt, y: torch.tanh(lin(y)), y0.detach(), t, rtol=1e-7, atol=1e-9,
                   callback=lambda tt, y, h, a: ref.append((tt, h, a)))
    assert seq == ref


def test_callback_exception_propagates_and_stops_the_solve():
    """An exception raised in the callback leaves solve unchanged (the user's type), and no more evaluations."""
    class Stop(Exception):
        pass

    f = Counted()
    calls = []

    def cb(tt, y, h, a):
        calls.append(f.calls)
        if len(calls) == 3:
            raise Stop("enough")

    y0, t = y0_t()
    with pytest.raises(Stop, match="enough"):
        neurodyn.solve(f, y0, t, method="tsit5", callback=cb)
    assert f.calls == calls[-1]  # nothing evaluated after the raising call
    assert len(calls) == 3


def test_callback_with_fixed_steps_and_events():
    """rk4 on the grid: one accepted call per step; a terminal event: the calls stop at the event's step."""
    y0, t = y0_t(n=7)
    sol, seq = attempts(1.0, y0, t, method="rk4")
    assert [s[0] for s in seq] == pytest.approx(t[1:].tolist(), abs=1e-15) and all(s[3] for s in seq)
    assert len(seq) == sol.stats["steps"] == 6
    ev = neurodyn.Event(lambda tt, y: y[0] - 0.6, terminal=True)
    sol, seq = attempts(1.0, y0, t, events=[ev], rtol=1e-9, atol=1e-11)
    assert sol.status == "event" and len(seq) == sol.stats["steps"] + sol.stats["rejected"]
    assert seq[-1][0] >= float(sol.event_t) > seq[-2][0]  # the last step holds the event


# ----------------------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------------------
FIELDS = re.compile(r"(\d+\.\d)%  t=(\S+)  steps=(\d+)  rejected=(\d+)  nfe=(\d+)")


def test_text_progress_lines_follow_the_solve():
    """Every draw shows the fraction of [t0, t1] covered by t, and the steps, rejections and NFE so far; the last
    line is the solution's stats and status (also integrating backward in time)."""
    for t1 in (3.0, -3.0):
        out = io.StringIO()
        meter = SolveProgress(desc="cos", backend="text", stream=out, delay=0.0, interval=0.0, tty=False)
        f = Counted()
        t = torch.tensor([0.0, t1], dtype=F64)
        sol = neurodyn.solve(f, torch.ones(2, dtype=F64), t, first_step=2.0, rtol=1e-8, atol=1e-10, progress=meter)
        lines = out.getvalue().splitlines()
        assert len(lines) == sol.stats["steps"] + sol.stats["rejected"] + 1  # one per attempt, then the close
        assert all(line.startswith("cos  [") for line in lines)
        parsed = [FIELDS.search(line).groups() for line in lines]
        for pct, tt, *_ in parsed:
            assert float(pct) == pytest.approx(100 * float(tt) / t1, abs=0.051)
        pct, tt, steps, rej, nfe = parsed[-1]
        assert (float(pct), float(tt)) == (100.0, t1)
        assert (int(steps), int(rej), int(nfe)) == (sol.stats["steps"], sol.stats["rejected"], sol.stats["nfe"])
        assert int(rej) >= 1 and "  success  " in lines[-1]
        assert "eta" in lines[len(lines) // 2] and "eta" not in lines[-1]


def test_progress_throttle_and_delay(monkeypatch):
    """A fake clock: nothing before `delay`, then at most one draw per `interval`; a short solve shows nothing."""
    now = [100.0]

    def clock():
        now[0] += 0.3  # every reading: 0.3 s later
        return now[0]

    monkeypatch.setattr(progress_mod.time, "perf_counter", clock)
    out = io.StringIO()
    meter = SolveProgress(backend="text", stream=out, delay=1.0, interval=1.0, tty=False)
    meter.start(0.0, 10.0)  # clock 100.3: first draw due at 101.3
    for i in range(1, 21):
        meter.update(0.5 * i, 0.5, True, 6 * i)  # readings 100.6, 100.9, ...
    meter.close("success")
    lines = out.getvalue().splitlines()
    # draws at readings >= 101.3 then >= 1 s after the last draw: 101.4, 102.6, 103.8, 105.0, 106.2; then close
    assert len(lines) == 6
    assert [FIELDS.search(x).group(3) for x in lines] == ["4", "8", "12", "16", "20", "20"]
    out2 = io.StringIO()
    quiet = SolveProgress(backend="text", stream=out2, delay=1e6)
    quiet.start(0.0, 1.0)
    for i in range(50):
        quiet.update(i / 50, 0.02, True, i)
    quiet.close("success")
    assert out2.getvalue() == "" and quiet.draws == 0


def test_progress_true_writes_to_stderr_only_for_long_solves(capsys):
    """progress=True: a solve shorter than the 0.5 s delay prints nothing; the meter's stream defaults to stderr."""
    y0, t = y0_t()
    sol = neurodyn.solve(Counted(), y0, t, progress=True)
    assert sol.status == "success"
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""
    meter = SolveProgress(backend="text", delay=0.0, interval=0.0)
    neurodyn.solve(Counted(), y0, t, progress=meter)
    cap = capsys.readouterr()
    assert cap.out == "" and "100.0%" in cap.err and "success" in cap.err


def test_tqdm_progress_shows_fraction_stats_and_eta():
    pytest.importorskip("tqdm")
    out = io.StringIO()
    meter = SolveProgress(desc="tq", backend="tqdm", stream=out, delay=0.0, interval=0.0)
    sol = neurodyn.solve(Counted(), *y0_t(), progress=meter)
    frames = [f for f in out.getvalue().split("\r") if f.strip()]
    assert frames[-1].startswith("tq: 100.0%")
    assert f"steps={sol.stats['steps']}" in frames[-1] and f"nfe={sol.stats['nfe']}" in frames[-1]
    assert "success" in frames[-1] and "<" in frames[-1]  # tqdm's [elapsed<remaining]


def test_progress_meter_closes_on_failure_and_error():
    """The meter's close() gets the failure status, or "error" when the solve raised something else."""
    class Meter:
        def __init__(self):
            self.calls = []

        def start(self, t0, t1):
            self.calls.append(("start", t0, t1))

        def update(self, t, h, accepted, nfe):
            self.calls.append(("update", accepted))

        def close(self, status):
            self.calls.append(("close", status))

    m = Meter()
    y0, t = y0_t()
    with pytest.raises(MaxStepsReached):
        neurodyn.solve(Counted(), y0, t, max_steps=3, progress=m)
    assert m.calls[0] == ("start", 0.0, 3.0) and m.calls[-1] == ("close", "max_steps_reached")
    assert len([c for c in m.calls if c[0] == "update"]) == 3
    m = Meter()

    def boom(tt, y, h, a):
        raise KeyError("x")

    with pytest.raises(KeyError):
        neurodyn.solve(Counted(), y0, t, progress=m, callback=boom)
    assert m.calls[-1] == ("close", "error")


def test_bad_progress_and_callback_are_refused_before_any_work():
    y0, t = y0_t()
    f = Counted()
    with pytest.raises(TypeError, match="progress must be True, False or a meter"):
        neurodyn.solve(f, y0, t, progress="x")
    with pytest.raises(InputTypeError, match="callback must be callable"):
        neurodyn.solve(f, y0, t, callback=3)
    with pytest.raises(InputError, match="per_sample_steps"):
        neurodyn.solve(f, y0.expand(3, 2).contiguous(), t, per_sample_steps=True, callback=print)
    assert f.calls == 0
    with pytest.raises(InputError, match="backend"):
        SolveProgress(backend="rich")
    with pytest.raises(InputError, match="delay"):
        SolveProgress(delay=-1)
    with pytest.raises(InputError, match="backend"):
        progress_bar(3, backend="bar")
    assert issubclass(InputTypeError, InputError) and issubclass(InputTypeError, TypeError)


# ----------------------------------------------------------------------------------------------
# manual stepping
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, kw", [
    (1.0, dict(method="dopri5", rtol=1e-8, atol=1e-10, first_step=2.0)),  # explicit adaptive, with rejections
    (200.0, dict(method="kvaerno5", rtol=1e-6, atol=1e-8)),               # implicit adaptive
    (200.0, dict(method="radau", rtol=1e-6, atol=1e-8)),
    (1.0, dict(method="rk4", step_size=0.1)),                             # fixed step
    (1.0, dict(method="tsit5", rtol=1e-7, atol=1e-9, dense=True)),
])
def test_manual_stepping_is_bitwise_the_solve(k, kw):
    """Stepping to the end reproduces solve(): the same attempts (t, y, h, accepted) bit for bit, the same outputs,
    stats and status; the end state is the closed form."""
    y0, t = y0_t()
    sol, ref = attempts(k, y0, t, **kw)
    state, seq = stepped(k, y0, t, **kw)
    assert len(seq) == len(ref) == sol.stats["steps"] + sol.stats["rejected"]
    for (ta, ya, ha, aa), (tb, yb, hb, ab) in zip(seq, ref):
        assert (ta, ha, aa) == (tb, hb, ab) and torch.equal(ya, yb)
    assert state.status == "success" and state.done and state.t == 3.0
    assert torch.equal(state.y, sol.ys[-1]) and torch.equal(state.solution.ys, sol.ys)
    assert state.solution.stats == sol.stats
    assert (state.steps, state.rejected, state.nfe) == (sol.stats["steps"], sol.stats["rejected"], sol.stats["nfe"])
    ref_end = torch.tensor([exact(k, 3.0, 1.0), exact(k, 3.0, -0.5)], dtype=F64)
    assert torch.allclose(state.y, ref_end, atol=1e-5)
    if kw.get("dense"):
        tq = torch.tensor([0.3, 1.7, 2.9], dtype=F64)
        assert torch.equal(state.solution.evaluate(tq), sol.evaluate(tq))


def test_stepping_state_fields_dense_output_and_iteration():
    """Between steps: t, y, h, h_next, accepted; evaluate() inside the last step is the method's dense output
    (the value solve writes at an output time there) and close to the closed form."""
    y0, t = y0_t(n=31)  # outputs every 0.1
    sol = neurodyn.solve(Counted(), y0, t, method="dopri5", rtol=1e-9, atol=1e-11)
    state = neurodyn.init(Counted(), y0, t, method="dopri5", rtol=1e-9, atol=1e-11)
    assert (state.t, state.h, state.accepted, state.h_next, state.status) == (0.0, 0.0, None, None, "running")
    assert torch.equal(state.y, y0) and state.nfe == 1
    checked = 0
    for s in state:
        if not s.done and s.accepted:
            t_prev = s.t - s.h
            assert s.h_next is not None and s.h_next > 0
            inside = [i for i in range(1, 31) if t_prev < t[i].item() < s.t]
            for i in inside:
                assert torch.equal(s.evaluate(t[i].item()), sol.ys[i])
                ref = torch.tensor([exact(1.0, t[i].item(), 1.0), exact(1.0, t[i].item(), -0.5)], dtype=F64)
                assert torch.allclose(s.evaluate(t[i]).reshape(2), ref, atol=1e-8)
                checked += 1
            with pytest.raises(InputError, match="last accepted step"):
                s.evaluate(s.t + 1.0)
    assert checked >= 10 and state.status == "success"
    with pytest.raises(InputError, match="has ended"):
        neurodyn.step(state)
    with pytest.raises(InputError, match="after the solve ended"):
        state.evaluate(2.0)


def test_stepping_gradients_events_failures_and_independence():
    """Autograd through manual steps gives solve's gradient; a terminal event ends the state at solve's event
    time; a failure raises solve's exception with the partial solution; two states stepped in turn are
    independent."""
    lin = torch.nn.Linear(2, 2, dtype=F64)
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    field = lambda tt, y: torch.tanh(lin(y))  # noqa: E731
    sol = neurodyn.solve(field, y0, t, rtol=1e-8, atol=1e-10)
    g_ref = torch.autograd.grad(sol.ys.sum(), (y0, lin.weight))
    state = neurodyn.init(field, y0, t, rtol=1e-8, atol=1e-10)
    for _ in state:
        pass
    g = torch.autograd.grad(state.solution.ys.sum(), (y0, lin.weight))
    assert all(torch.equal(a, b) for a, b in zip(g, g_ref))

    y0, t = y0_t()
    ev = neurodyn.Event(lambda tt, y: y[0] - 0.6, terminal=True)
    sol = neurodyn.solve(Counted(), y0, t, events=[ev], rtol=1e-9, atol=1e-11)
    state, _ = stepped(1.0, y0, t, events=[ev], rtol=1e-9, atol=1e-11)
    assert state.status == "event" and torch.equal(state.solution.event_t, sol.event_t)
    assert state.t == sol.t_final and torch.equal(state.y, sol.y_final)

    state = neurodyn.init(Counted(), y0, t, max_steps=4)
    for _ in range(3):
        neurodyn.step(state)
    with pytest.raises(MaxStepsReached) as err:
        neurodyn.step(state)
    assert state.done and state.status == "max_steps_reached" and err.value.solution is state.solution
    state = neurodyn.init(Counted(), y0, t, max_steps=4, on_failure="return")
    for _ in state:
        pass
    assert state.status == "max_steps_reached" and state.steps == 4

    a = neurodyn.init(Counted(), y0, t, method="kvaerno5", rtol=1e-6)
    b = neurodyn.init(Counted(200.0), y0, t, method="kvaerno5", rtol=1e-6)
    while not (a.done and b.done):
        for s in (a, b):
            if not s.done:
                s.step()
    assert torch.equal(a.solution.ys, neurodyn.solve(Counted(), y0, t, method="kvaerno5", rtol=1e-6).ys)
    assert torch.equal(b.solution.ys, neurodyn.solve(Counted(200.0), y0, t, method="kvaerno5", rtol=1e-6).ys)


def test_init_refuses_what_it_cannot_do_before_any_work():
    y0, t = y0_t()
    f = Counted()
    with pytest.raises(InputTypeError, match="unknown option"):
        neurodyn.init(f, y0, t, methd="rk4")
    with pytest.raises(InputError, match="gradient='adjoint'"):
        neurodyn.init(f, y0, t, gradient="adjoint")
    with pytest.raises(InputError, match="compile"):
        neurodyn.init(f, y0, t, compile=True)
    with pytest.raises(InputError, match="progress"):
        neurodyn.init(f, y0, t, progress=True)
    with pytest.raises(InputError, match="t.detach"):
        neurodyn.init(f, y0, t.clone().requires_grad_(True))
    with pytest.raises(InputError, match="rtol"):
        neurodyn.init(f, y0, t, rtol=-1.0)
    with pytest.raises(TypeError, match="SolveState"):
        neurodyn.step("state")
    assert f.calls == 0
    s = neurodyn.init(f, y0, t, gradient="direct")
    with pytest.raises(InputError, match="before an accepted step"):
        s.evaluate(0.0)
    assert f.calls == 1  # init evaluates dy/dt at t0 (as solve does), nothing more


# ----------------------------------------------------------------------------------------------
# training bars
# ----------------------------------------------------------------------------------------------
def test_text_bar_shows_eta_and_progress_bar_picks_tqdm():
    out = io.StringIO()
    bar = Progress(10, desc="e", stream=out, tty=False)
    for _ in range(5):
        bar.update()
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("e   5/10") and "eta" in line
    bar.close()
    pytest.importorskip("tqdm")
    out = io.StringIO()
    with progress_bar(4, desc="fit", stream=out) as bar:
        assert type(bar).__name__ == "_TqdmProgress"
        for i in range(4):
            bar.update(loss=1.0 / (i + 1))
    last = [f for f in out.getvalue().split("\r") if f.strip()][-1]
    assert last.startswith("fit: 100%") and "4/4" in last and "loss=0.2500" in last and "<00:00" in last
    assert isinstance(progress_bar(4, stream=io.StringIO(), backend="text"), Progress)


def test_without_tqdm_auto_falls_back_to_text(monkeypatch, capsys):
    """tqdm is optional: with it absent, backend="auto" gives the text meter and the text bar."""
    monkeypatch.setattr(progress_mod, "_TQDM", [False])
    assert not progress_mod.has_tqdm()
    meter = SolveProgress(delay=0.0, interval=0.0)
    assert meter.backend == "text"
    sol = neurodyn.solve(Counted(), *y0_t(), progress=meter)
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("solve  [####################]  100.0%")
    assert f"nfe={sol.stats['nfe']}" in err
    assert isinstance(progress_bar(3, stream=io.StringIO()), Progress)
    with pytest.raises(InputError, match="needs tqdm"):
        SolveProgress(backend="tqdm")


@pytest.mark.slow
def test_callback_with_compile_runs_compiled_steps():
    """compile=True with a callback: compiled steps in the eager loop (not the whole compiled loop), every attempt
    reported, the outputs the eager solve's to rounding."""
    lin = torch.nn.Linear(2, 2, dtype=F64)
    y0, t = torch.ones(2, dtype=F64), torch.linspace(0, 1, 3, dtype=F64)
    with torch.no_grad():
        seq = []
        sol = neurodyn.solve(lambda tt, y: torch.tanh(lin(y)), y0, t, compile=True,
                             callback=lambda tt, y, h, a: seq.append((tt, h, a)))
        ref = neurodyn.solve(lambda tt, y: torch.tanh(lin(y)), y0, t)
    assert sol.stats["compiled"] in ("step", "eager")
    assert len(seq) == sol.stats["steps"] + sol.stats["rejected"] and seq[-1][0] == 1.0
    assert torch.allclose(sol.ys, ref.ys, atol=1e-12)


def test_validation_warnings_point_at_the_callers_line():
    """solve's checks moved into prepare(): their warnings still name the line calling solve / init."""
    import warnings

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        neurodyn.solve(lambda tt, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), rtol=1e-9)
        neurodyn.init(lambda tt, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), rtol=1e-9)
    assert [x.category for x in w] == [neurodyn.PrecisionWarning] * 2
    assert all(x.filename == __file__ for x in w) and w[1].lineno == w[0].lineno + 1


def test_trainer_bar_is_tqdm_with_eta_when_installed(capsys, monkeypatch):
    """Trainer(progress=True): tqdm's bar on stdout (rate, ETA, the loss/NFE postfix); text without tqdm."""
    pytest.importorskip("tqdm")

    def trainer():
        lin = torch.nn.Linear(2, 2, dtype=F64)
        model = neurodyn.NeuralODE(lin, method="rk4", step_size=0.5)
        x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
        return neurodyn.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                lambda m, b: (m(b[0]) - b[1]).pow(2).mean(), train_data=(x, x.flip(-1)),
                                batch_size=4, max_steps=4, log_dir=None, seed=0, progress=True, checkpoint_every=0)

    trainer().fit()
    frames = [f for f in capsys.readouterr().out.split("\r") if f.strip()]
    assert frames[-1].startswith("train: 100%") and "4/4" in frames[-1]
    assert "<00:00" in frames[-1] and "loss=" in frames[-1] and "nfe=8+" in frames[-1]
    assert "<" in frames[1] and "it/s" in frames[-1]  # elapsed<remaining (the ETA), rate
    monkeypatch.setattr(progress_mod, "_TQDM", [False])
    trainer().fit()
    out = capsys.readouterr().out
    assert "train  4/4" in out and "loss=" in out
