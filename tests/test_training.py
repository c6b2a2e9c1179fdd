"""neurodyn.Trainer: exact resume, atomic checkpoints, logs, determinism, DDP (2 CPU processes, gloo)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import neurodyn
from neurodyn.training import COLUMNS, CheckpointError, atomic_save

F64 = torch.float64
HERE = Path(__file__).resolve().parent
N, BATCH = 40, 8  # 5 steps per epoch: step 12 is in the middle of the third epoch


def build(init_seed=0, gradient="direct"):
    """A float64 NeuralODE, Adam, StepLR. With gradient="direct" the vector field has dropout (so the torch RNG
    state matters for an exact resume); the adjoint would redraw the masks backward, so not there."""
    neurodyn.seed_everything(init_seed)
    drop = [torch.nn.Dropout(0.1)] if gradient == "direct" else []
    f = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), *drop, torch.nn.Linear(16, 2)).to(F64)
    model = neurodyn.NeuralODE(f, method="rk4", step_size=0.25, gradient=gradient)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    return model, opt, sched


def data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, 2, generator=g, dtype=F64)
    return x, torch.tanh(x.flip(-1))


def mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def make_trainer(log_dir, max_steps=20, seed=0, init_seed=0, resume=False, loss_fn=mse, gradient="direct", **kw):
    model, opt, sched = build(init_seed, gradient)
    kw.setdefault("checkpoint_every", 5)
    kw.setdefault("progress", False)
    return neurodyn.Trainer(model, opt, loss_fn, train_data=data(), batch_size=BATCH, max_steps=max_steps,
                            scheduler=sched, log_dir=log_dir, seed=seed, grad_clip=1.0, resume=resume, **kw)


def params(trainer):
    return [p.detach().clone() for p in trainer.module.parameters()]


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 20-step run."""
    tr = make_trainer(tmp_path_factory.mktemp("ref"))
    history = tr.fit()
    return {"params": params(tr), "losses": [r["loss"] for r in history], "history": history, "trainer": tr}


# ----------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop", [12, 10])  # mid-epoch (epoch 2, batch 2) and exactly at an epoch boundary
def test_resume_reproduces_uninterrupted_run(reference, tmp_path, stop):
    first = make_trainer(tmp_path, max_steps=stop)
    first.fit()
    assert first.step == stop and (first.epoch, first.batch_in_epoch) == divmod(stop, N // BATCH)
    # a fresh model (different init), optimizer and scheduler: everything comes from the checkpoint
    resumed = make_trainer(tmp_path, max_steps=20, init_seed=99, resume=True)
    assert resumed.step == stop and resumed.resumed_from == stop
    history = resumed.fit()
    assert resumed.step == 20
    for p, q in zip(params(resumed), reference["params"], strict=True):
        assert torch.equal(p, q)
    assert [r["loss"] for r in history] == reference["losses"]
    assert [r["lr"] for r in history] == [r["lr"] for r in reference["history"]]
    _, rows = read_csv(tmp_path / "metrics.csv")
    assert [int(r[0]) for r in rows] == list(range(1, 21))
    assert [float(r[2]) for r in rows] == reference["losses"]  # csv floats round-trip exactly


def test_resume_after_crash_truncates_logs(reference, tmp_path):
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt("simulated kill during step 15")
        return mse(model, batch)

    crashed = make_trainer(tmp_path, max_steps=20, loss_fn=crashing, checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 12
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 14  # steps 13, 14 are lost work

    resumed = make_trainer(tmp_path, max_steps=20, init_seed=5, resume=True, checkpoint_every=4)
    history = resumed.fit()
    assert [r["step"] for r in history] == list(range(1, 21))
    assert [r["loss"] for r in history] == reference["losses"]
    for p, q in zip(params(resumed), reference["params"], strict=True):
        assert torch.equal(p, q)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 21))
    _, rows = read_csv(tmp_path / "metrics.csv")
    assert [int(r[0]) for r in rows] == list(range(1, 21))
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_from"] == 12


def test_resume_without_checkpoint_starts_fresh(reference, tmp_path):
    tr = make_trainer(tmp_path, resume=True)
    assert tr.step == 0 and tr.resumed_from is None
    assert [r["loss"] for r in tr.fit()] == reference["losses"]
    with pytest.raises(FileNotFoundError):
        make_trainer(tmp_path, resume=tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------------
# Atomic checkpoints
# ----------------------------------------------------------------------------------------------
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, max_steps=5, checkpoint_every=0)
    tr.fit()
    path = Path(tr.save_checkpoint())
    old = path.read_bytes()
    tr.max_steps = 8
    tr.fit()  # checkpoint_every=0: nothing written

    def failing_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        tr.save_checkpoint()
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []

    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):  # half a file, then the process "dies"
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint()
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert torch.load(path, weights_only=False)["step"] == 5

    tr.save_checkpoint()
    assert torch.load(path, weights_only=False)["step"] == 8
    atomic_save({"a": torch.arange(3)}, tmp_path / "x.pt")
    assert torch.equal(torch.load(tmp_path / "x.pt")["a"], torch.arange(3))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_a_checkpoint"])
def test_damaged_checkpoint_error_names_file(reference, tmp_path, damage):
    """A checkpoint cut short (disk full, partial copy), overwritten, empty or holding something else: resume
    raises CheckpointError naming the file and what to do, and the intact file resumes exactly."""
    make_trainer(tmp_path, max_steps=10).fit()
    path = tmp_path / "checkpoint.pt"
    intact = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(intact[: len(intact) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError) as err:
        make_trainer(tmp_path, resume=True)
    msg = str(err.value)
    assert str(path) in msg and "elete it" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="checkpoint.pt"):  # the explicit-path form too
        make_trainer(tmp_path / "other", resume=path)

    path.write_bytes(intact)
    tr = make_trainer(tmp_path, resume=True)
    assert tr.step == 10
    assert [r["loss"] for r in tr.fit()] == reference["losses"]


@pytest.mark.parametrize("change", [{"seed": 1}, {"batch_size": BATCH // 2}, {"seed": 3, "batch_size": 4}])
def test_resume_with_other_seed_or_batch_size_is_refused(reference, tmp_path, change):
    """The data order of a continuation depends on the seed and the batch size: a checkpoint written with
    other values is refused (nothing restored), the same values resume the reference run exactly."""
    make_trainer(tmp_path, max_steps=10).fit()
    model, opt, sched = build(0)
    fresh = [p.detach().clone() for p in model.parameters()]
    kw = {"seed": 0, "batch_size": BATCH, **change}
    with pytest.raises(CheckpointError) as err:
        neurodyn.Trainer(model, opt, mse, train_data=data(), max_steps=20, scheduler=sched, log_dir=tmp_path,
                         grad_clip=1.0, resume=True, progress=False, **kw)
    msg = str(err.value)
    assert str(tmp_path / "checkpoint.pt") in msg
    for name in change:
        assert f"{name}=" in msg
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh))  # refused before restoring anything

    tr = make_trainer(tmp_path, resume=True)
    assert [r["loss"] for r in tr.fit()] == reference["losses"]


# ----------------------------------------------------------------------------------------------
# Logs, progress bar, evaluate
# ----------------------------------------------------------------------------------------------
def test_logs_columns_and_counts(tmp_path, capsys):
    tr = make_trainer(tmp_path, max_steps=None, epochs=2, gradient="adjoint", progress=True)
    history = tr.fit()
    assert tr.step == 10 == len(history) and tr.epoch == 2 and tr.batch_in_epoch == 0
    header, rows = read_csv(tmp_path / "metrics.csv")
    assert tuple(header) == COLUMNS
    assert len(rows) == 10 and [int(r[0]) for r in rows] == list(range(1, 11))
    assert [int(r[1]) for r in rows] == [0] * 5 + [1] * 5
    jl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(jl) == 10 and all(set(r) == set(COLUMNS) for r in jl)
    assert jl == history
    for r in jl:
        # rk4, 4 steps of 4 stages; solve() makes one more call for its hidden-tensor check when gradient != direct
        assert r["nfe_forward"] in (16, 17)
        assert r["nfe_backward"] > 0  # adjoint solve
        assert r["step_time"] > 0 and r["grad_norm"] is not None and r["loss"] > 0
    assert [r["lr"] for r in jl] == [2e-2] * 7 + [1e-2] * 3  # StepLR(7, 0.5), stepped per step
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["steps_logged"] == 10
    assert summary["final_loss"] == history[-1]["loss"]
    assert summary["nfe_forward_total"] == sum(r["nfe_forward"] for r in jl)
    assert summary["nfe_backward_total"] == sum(r["nfe_backward"] for r in jl) > 0
    assert (tmp_path / "checkpoint.pt").exists()
    out = capsys.readouterr().out
    assert "10/10" in out and "loss=" in out and "nfe=" in out and "ms" in out


def test_nfe_summed_over_submodules_and_evaluate(tmp_path):
    neurodyn.seed_everything(0)
    a = neurodyn.NeuralODE(torch.nn.Linear(2, 2).to(F64), method="rk4", step_size=0.5)
    b = neurodyn.NeuralODE(torch.nn.Linear(2, 2).to(F64), method="rk4", step_size=0.25)
    model = torch.nn.Sequential(a, torch.nn.Linear(2, 2).to(F64), b)
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = neurodyn.Trainer(model, opt, torch.nn.MSELoss(), train_data=(x, y), batch_size=20, max_steps=2,
                          log_dir=tmp_path, progress=False)
    assert all(r["nfe_forward"] == 8 + 16 for r in tr.fit())
    ev = tr.evaluate((x, y), batch_size=16)
    with torch.no_grad():
        expected = float((model(x) - y).pow(2).mean())
    assert ev["samples"] == N and ev["batches"] == 3 and ev["nfe_forward"] == 24
    assert ev["loss"] == pytest.approx(expected, rel=1e-12)
    assert tr.module.training


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------
def test_same_seed_same_run(reference, tmp_path):
    again = make_trainer(tmp_path / "a")
    assert [r["loss"] for r in again.fit()] == reference["losses"]
    for p, q in zip(params(again), reference["params"], strict=True):
        assert torch.equal(p, q)
    other = make_trainer(tmp_path / "b", seed=1)
    assert [r["loss"] for r in other.fit()] != reference["losses"]


# ----------------------------------------------------------------------------------------------
# DistributedDataParallel: 2 processes on gloo == one process on the full batch
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Two gloo worker processes with a 120 s deadline: `make test` runs it after the parallel part, alone (beside a second
# test process on 2 cores a worker was once stuck in a collective past the deadline).
@pytest.mark.serial
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available in this torch build")
def test_ddp_matches_single_process(tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(HERE))

    # Two worker processes with the environment torchrun gives them (RANK, WORLD_SIZE, MASTER_ADDR/PORT). The
    # test owns both processes (torchrun would start them in sessions of their own, beyond a timeout's reach),
    # writes their output to files (a pipe held open by a stuck worker would block the test), and kills them
    # after the timeout.
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2")
    if os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs, logs_out = [], []
    for rank in range(2):
        log = open(tmp_path / f"worker{rank}.log", "w")  # noqa: SIM115 - closed below
        logs_out.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path)],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2"),
            stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 120
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs_out:
            log.close()
    output = "\n".join(f"--- rank {r} ---\n" + (tmp_path / f"worker{r}.log").read_text()[-3000:] for r in range(2))
    initialised = [(tmp_path / f"init{r}").exists() for r in range(2)]
    if not all(initialised) and any(p.returncode == -signal.SIGKILL for p in procs):
        pytest.skip(f"the gloo process group did not form within 120 s on this machine (loopback networking); "
                    f"initialised ranks: {initialised}\n{output}")
    for proc in procs:
        assert proc.returncode == 0, output

    ddp = torch.load(tmp_path / "result.pt")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert ddp["world_size"] == 2
    for p, q in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(p, q)  # DDP keeps the replicas identical

    model, opt, x, y = ddp_worker.make_problem()
    store: dict = {}
    single = neurodyn.Trainer(model, opt, torch.nn.MSELoss(), train_data=(x, y), batch_size=ddp_worker.N,
                              max_steps=ddp_worker.STEPS, log_dir=tmp_path / "single", seed=0, progress=False,
                              on_step=ddp_worker.recorder(store))
    single.fit()
    assert not single.distributed
    for key in ("grads1", "params1"):
        for p, q in zip(ddp[key], store[key], strict=True):
            assert p.dtype == F64
            assert torch.allclose(p, q, rtol=0, atol=1e-10), (key, (p - q).abs().max())
    for p, q in zip(ddp["params"], params(single), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-10)
    # from a DataLoader with a DistributedSampler: the same run (every global batch is the whole data set)
    assert "needs a DistributedSampler" in ddp["loader_refused"]
    assert ddp["loader_losses"] == pytest.approx(ddp["losses"], rel=1e-12)
    assert ddp["loader_epochs"] == [0, 1, 2]
    for p, q in zip(ddp["loader_params"], params(single), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-10)
    assert ddp["losses"] == pytest.approx([r["loss"] for r in single.history], abs=1e-10)

    # rank 0 alone logged and checkpointed; the checkpoint loads into a plain (non-DDP) trainer
    logs = tmp_path / "logs"
    _, rows = read_csv(logs / "metrics.csv")
    assert len(rows) == ddp_worker.STEPS
    assert json.loads((logs / "summary.json").read_text())["world_size"] == 2
    model2, opt2, _, _ = ddp_worker.make_problem(seed=3)
    plain = neurodyn.Trainer(model2, opt2, torch.nn.MSELoss(), train_data=(x, y), batch_size=ddp_worker.N,
                             max_steps=ddp_worker.STEPS, log_dir=logs, seed=0, progress=False, resume=True)
    assert plain.step == ddp_worker.STEPS
    for p, q in zip(params(plain), ddp["params"], strict=True):
        assert torch.equal(p, q)
