"""neurodyn.Trainer with a DataLoader (plain and torchdata's StatefulDataLoader), logger hooks (a fake logger,
TensorBoard's SummaryWriter), process-wide flags left alone, and the NFE / solver-statistics helpers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import neurodyn
from neurodyn.training import CheckpointError, count_nfe, solver_stats

F64 = torch.float64
N, BATCH = 40, 8  # 5 batches per epoch: step 12 is the third epoch's second batch, step 10 an epoch boundary


def build(init_seed=0, dropout=True):
    """A float64 NeuralODE; with dropout in its field, the torch RNG state matters for an exact resume."""
    torch.manual_seed(init_seed)
    drop = [torch.nn.Dropout(0.1)] if dropout else []
    f = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), *drop, torch.nn.Linear(16, 2)).to(F64)
    model = neurodyn.NeuralODE(f, method="rk4", step_size=0.25)
    return model, torch.optim.Adam(model.parameters(), lr=2e-2)


def data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, 2, generator=g, dtype=F64)
    return x, torch.tanh(x.flip(-1))


def mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def loader(kind="plain", shuffle=True):
    """``plain``: torch's DataLoader, its order drawn from the global RNG at every epoch start; ``plain+gen``:
    with its own generator; ``stateful``: torchdata's StatefulDataLoader (its sampler seeds a generator when it
    is built: give it one, else the order depends on the RNG state at construction)."""
    if kind == "stateful":
        tdl = pytest.importorskip("torchdata.stateful_dataloader")
        return tdl.StatefulDataLoader(TensorDataset(*data()), batch_size=BATCH, shuffle=shuffle,
                                      generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3) if kind == "plain+gen" else None
    return DataLoader(TensorDataset(*data()), batch_size=BATCH, shuffle=shuffle, generator=gen)


def trainer_on(train_data, log_dir=None, max_steps=17, resume=False, dropout=True, **kw):
    model, opt = build(dropout=dropout)
    kw.setdefault("progress", False)
    if not isinstance(train_data, DataLoader):
        kw.setdefault("batch_size", BATCH)
    return neurodyn.Trainer(model, opt, mse, train_data=train_data, max_steps=max_steps, log_dir=log_dir, seed=0,
                            resume=resume, **kw)


def params(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.module.parameters()])


def test_dataloader_gives_the_tensor_path_losses():
    """Same batches in the same order (no shuffling) and a model drawing no random numbers: bitwise the same
    losses, NFE and parameters. (A DataLoader draws a seed from torch's global RNG at every epoch start, so a
    model with dropout sees other masks than on the tensor path.)"""
    a = trainer_on(data(), shuffle=False, dropout=False)
    b = trainer_on(loader(shuffle=False), dropout=False)
    ha, hb = a.fit(), b.fit()
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    assert [r["nfe_forward"] for r in hb] == [16] * 17  # rk4, 4 steps
    assert [(r["step"], r["epoch"]) for r in ha] == [(r["step"], r["epoch"]) for r in hb]
    assert hb[-1]["epoch"] == 3 and b.epoch == 3 and b.batch_in_epoch == 2  # 17 = 3 epochs of 5 + 2
    assert torch.equal(params(a), params(b))
    assert b.evaluate(loader(shuffle=False))["loss"] == pytest.approx(b.evaluate(data(), batch_size=BATCH)["loss"],
                                                                       rel=1e-12)


def test_dataloader_epochs_and_shuffling():
    """epochs= counts passes over the loader; a shuffling loader visits every sample once per epoch."""
    seen = []
    t = trainer_on(loader(), max_steps=None, epochs=2,
                   on_step=lambda tr, row: None)
    orig = t.loss_fn

    def spy(model, batch):
        seen.append(batch[0])
        return orig(model, batch)

    t.loss_fn = spy
    h = t.fit()
    assert len(h) == 10 and t.epoch == 2
    x = data()[0]
    for e in range(2):
        got = torch.cat(seen[5 * e:5 * e + 5])
        assert torch.equal(got[got[:, 0].argsort()], x[x[:, 0].argsort()])
    assert not torch.equal(torch.cat(seen[:5]), x)  # shuffled


@pytest.mark.parametrize("kind", ["plain", "plain+gen", "stateful"])
@pytest.mark.parametrize("stop", [12, 10])  # mid-epoch, and exactly at an epoch boundary
def test_dataloader_resume_reproduces_uninterrupted_run(tmp_path, kind, stop):
    ref = trainer_on(loader(kind), tmp_path / "ref", checkpoint_every=0)
    ref_hist = ref.fit()
    first = trainer_on(loader(kind), tmp_path / "run", max_steps=stop)
    first.fit()  # writes the checkpoint at `stop`
    resumed = trainer_on(loader(kind), tmp_path / "run", resume=True)
    assert resumed.step == stop and resumed.batch_in_epoch == stop % 5
    hist = resumed.fit()
    assert [r["loss"] for r in hist] == [r["loss"] for r in ref_hist]
    assert torch.equal(params(resumed), params(ref))


def test_plain_checkpoint_mid_epoch_refused_by_a_stateful_loader(tmp_path):
    pytest.importorskip("torchdata.stateful_dataloader")
    trainer_on(loader("plain"), tmp_path, max_steps=7).fit()
    with pytest.raises(CheckpointError, match="plain DataLoader"):
        trainer_on(loader("stateful"), tmp_path, resume=True)


def test_dataloader_bad_settings():
    with pytest.raises(ValueError, match="the DataLoader's batch_size is 8"):
        trainer_on(loader(), batch_size=4)
    with pytest.raises(ValueError, match="set shuffle on the DataLoader"):
        trainer_on(loader(), shuffle=False)
    with pytest.raises(ValueError, match="batch_size is needed"):
        neurodyn.Trainer(*build(), mse, train_data=data(), max_steps=1)


class Stream(IterableDataset):
    """13 samples, no len(): batches 8 + 5 per pass."""

    def __iter__(self):
        x, y = data()
        return iter(zip(x[:13], y[:13]))


def test_iterable_loader_without_len():
    with pytest.raises(ValueError, match="no len"):
        trainer_on(DataLoader(Stream(), batch_size=BATCH), max_steps=None, epochs=1)
    t = trainer_on(DataLoader(Stream(), batch_size=BATCH), max_steps=5)
    sizes = []
    orig = t.loss_fn
    t.loss_fn = lambda m, b: sizes.append(b[0].shape[0]) or orig(m, b)
    h = t.fit()
    assert sizes == [8, 5, 8, 5, 8]
    assert [r["epoch"] for r in h] == [0, 0, 1, 1, 2]


class FakeLogger:
    def __init__(self):
        self.calls = []
        self.flushed = 0

    def log_metrics(self, metrics, step):
        self.calls.append((step, dict(metrics)))

    def flush(self):
        self.flushed += 1


def test_loggers_get_every_step():
    lg = FakeLogger()
    t = trainer_on(data(), max_steps=6, loggers=[lg], grad_clip=10.0)
    h = t.fit()
    assert [s for s, _ in lg.calls] == [1, 2, 3, 4, 5, 6]
    for (_, m), row in zip(lg.calls, h):
        assert m == {k: float(row[k]) for k in ("loss", "lr", "nfe_forward", "nfe_backward", "grad_norm",
                                                "step_time", "epoch")}
    assert lg.flushed == 1
    with pytest.raises(TypeError, match=r"loggers\[1\] \(object\) has neither log_metrics"):
        trainer_on(data(), loggers=[lg, object()])


def test_summary_writer_logger(tmp_path):
    tb = pytest.importorskip("torch.utils.tensorboard")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = tb.SummaryWriter(log_dir=str(tmp_path))
    h = trainer_on(data(), max_steps=4, loggers=[writer]).fit()
    writer.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert {"loss", "lr", "nfe_forward", "nfe_backward", "step_time", "epoch"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("loss")
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in h], rel=1e-6)  # stored as float32
    assert [e.value for e in acc.Scalars("nfe_forward")] == [16.0] * 4


def test_lightning_csv_logger_as_trainer_logger(tmp_path):
    """Lightning's CSVLogger fits the protocol as it is; fit's end saves its file."""
    loggers = pytest.importorskip("lightning.pytorch.loggers")
    import csv

    lg = loggers.CSVLogger(str(tmp_path), name="run", version=0)
    h = trainer_on(data(), max_steps=3, loggers=[lg]).fit()
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [float(r["loss"]) for r in rows] == [r["loss"] for r in h]


def _flags():
    c = torch.backends.cudnn
    return (c.deterministic, c.benchmark, torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


def test_process_flags_untouched_unless_asked():
    before = _flags()
    torch.backends.cudnn.benchmark = not before[1]  # a non-default value the trainer must leave alone
    try:
        mine = _flags()
        trainer_on(data(), max_steps=2).fit()
        assert _flags() == mine
        during = []
        trainer_on(data(), max_steps=2, deterministic=True, on_step=lambda tr, row: during.append(_flags())).fit()
        assert during == [(True, False, True, True)] * 2
        assert _flags() == mine  # restored
    finally:
        torch.backends.cudnn.benchmark = before[1]
    neurodyn.seed_everything(0)
    assert _flags() == before


class CountingField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return torch.tanh(self.lin(y))


def test_count_nfe_and_solver_stats_count_each_solve_once():
    """An AugmentedNeuralODE forwards its inner NeuralODE's counters: counted once (it used to be twice)."""
    f = CountingField()
    anode = neurodyn.AugmentedNeuralODE(f, in_dim=2, aug_dim=1, method="rk4", step_size=0.25)
    model = torch.nn.Sequential(anode, torch.nn.Linear(3, 1))
    model(torch.randn(5, 2)).sum().backward()
    assert f.calls == 16
    assert count_nfe(model) == (16, 0)
    s = solver_stats(model)
    assert (s["solves"], s["nfe_forward"], s["steps"], s["rejected"], s["status"]) == (1, 16, 4, 0, "success")

    f2 = CountingField()
    ode = neurodyn.NeuralODE(f2, method="dopri5", rtol=1e-9, atol=1e-9, gradient="adjoint", t=(0.0, 3.0))
    with torch.no_grad():
        f2.lin.weight.mul_(4.0)
    ode(torch.randn(5, 3)).sum().backward()
    s = solver_stats(ode)
    assert s["nfe_forward"] + s["nfe_backward"] == f2.calls - 1  # minus the adjoint's one-off hidden-tensor probe
    assert (s["nfe_forward"], s["nfe_backward"]) == count_nfe(ode)
    assert s["steps"] > 0 and s["status_code"] == 0
    assert solver_stats(torch.nn.Linear(2, 2))["status"] is None
