"""neurodyn.integrations.lightning: the SolverStatsCallback in a real Lightning training run (CPU), checked
against an independent count of the vector field's calls; checkpoint save / reload / resume; lazy import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import neurodyn

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import Logger  # noqa: E402

from neurodyn.integrations.lightning import SolverStatsCallback  # noqa: E402

N, BATCH = 32, 8


@pytest.fixture
def one_thread():
    """One intra-op thread: CPU bfloat16 matmuls of these tiny layers take ~20 ms each with 2 threads on a busy
    machine (oneDNN's threading), 7 us with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class CountingField(torch.nn.Module):
    """``f(t, z) = tanh(W z)`` (scaled so that dopri5 rejects steps), counting its calls."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.calls = 0

    def forward(self, t, z):
        self.calls += 1
        return 3.0 * torch.tanh(self.lin(z))


class LitODE(L.LightningModule):
    """The recipe of docs/lightning.md, plus an independent record of the field's calls per step."""

    def __init__(self, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.field = CountingField()
        self.ode = neurodyn.NeuralODE(self.field, t=(0.0, 2.0), method="dopri5", rtol=1e-4, atol=1e-6,
                                      gradient="adjoint")
        self.head = torch.nn.Linear(2, 1)
        self.counted: list[tuple[int, int]] = []  # (forward calls, backward calls) per step
        self._c0 = self._c1 = 0

    def forward(self, x):
        return self.head(self.ode(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self._c0 = self.field.calls
        loss = torch.nn.functional.mse_loss(self(x), y)
        self._c1 = self.field.calls
        self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # the adjoint's solve makes one extra call before integrating (its hidden-tensor check, not a solver
        # evaluation: NeuralODE.nfe_forward excludes it)
        self.counted.append((self._c1 - self._c0 - 1, self.field.calls - self._c1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class Recorder(Logger):
    """A Lightning logger keeping every log_metrics call."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 2, generator=g)
    return DataLoader(TensorDataset(x, x[:, :1] * x[:, 1:]), batch_size=BATCH, shuffle=False)


def fit(model, max_epochs, root, ckpt_path=None):
    """``max_epochs`` epochs of 4 batches (stopping on epochs, the checkpoint is at an epoch end: Lightning
    resumes a plain DataLoader exactly only there)."""
    rec, cb = Recorder(), SolverStatsCallback()
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=rec, callbacks=[cb],
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), deterministic=False)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer, rec, cb


def solver_rows(rec):
    return [(step, m) for step, m in rec.rows if "solver/nfe_forward" in m]


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_callback_logs_against_counted_nfe_and_resumes_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = LitODE()
    trainer, rec, cb = fit(model, 2, tmp_path)  # two epochs of 4 batches
    rows = solver_rows(rec)
    assert [s for s, _ in rows] == list(range(8))
    assert len(model.counted) == 8
    total = 0
    for (_, m), (fwd, bwd) in zip(rows, model.counted):
        assert m["solver/nfe_forward"] == fwd and m["solver/nfe_backward"] == bwd
        assert bwd > 0  # the adjoint's backward solve
        # dopri5 (first same as last): 2 evaluations to start (f(t0) and the initial step's probe), then 6 per
        # attempted step, accepted or rejected
        assert fwd == 2 + 6 * (m["solver/steps"] + m["solver/rejected"])
        assert m["solver/status"] == 0.0 and cb.status_name(m["solver/status"]) == "success"
        total += fwd + bwd
        assert m["solver/nfe_total"] == total
    assert sum(m["solver/rejected"] for _, m in rows) > 0  # the field is stiff enough to reject steps
    assert cb.last["status"] == "success"

    # checkpoint: reload (parameters equal), and resume training (parameters as in an uninterrupted run)
    path = tmp_path / "eight.ckpt"
    trainer.save_checkpoint(path)
    reloaded = LitODE.load_from_checkpoint(path)
    assert torch.equal(params(reloaded), params(model))

    torch.manual_seed(0)
    straight = LitODE()
    fit(straight, 3, tmp_path / "straight")

    resumed = LitODE()
    trainer2, rec2, cb2 = fit(resumed, 3, tmp_path / "resumed", ckpt_path=str(path))
    assert trainer2.global_step == 12
    rows2 = solver_rows(rec2)
    assert [s for s, _ in rows2] == [8, 9, 10, 11]
    assert torch.equal(params(resumed), params(straight))
    # the callback's running total came back from the checkpoint
    assert rows2[-1][1]["solver/nfe_total"] == total + sum(f + b for f, b in resumed.counted)


def test_lazy_import_and_missing_lightning_names_the_extra():
    """``import neurodyn`` (and neurodyn.integrations) imports no Lightning; without Lightning, importing the
    integration raises an ImportError naming the extra. One subprocess (Lightning blocked in it)."""
    code = ("import sys, neurodyn, neurodyn.integrations\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
            "for m in ('lightning', 'lightning.pytorch', 'pytorch_lightning'): sys.modules[m] = None\n"
            "try:\n    import neurodyn.integrations.lightning\n"
            "except ImportError as e:\n    print('ImportError:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()
    assert first == "[]"
    assert second.startswith("ImportError:") and 'pip install "neurodyn[lightning]"' in second


class _Stub(torch.nn.Module):
    """Stands for a LightningModule: holds a NeuralODE and records log_dict calls."""

    def __init__(self, ode):
        super().__init__()
        self.ode = ode
        self.logged = []

    def log_dict(self, metrics, **kwargs):
        self.logged.append((dict(metrics), kwargs))


def test_failed_solve_status_is_logged():
    """A solve that runs out of steps (on_failure="return") logs status 1 = "max_steps_reached"."""
    ode = neurodyn.NeuralODE(CountingField(), t=(0.0, 5.0), method="dopri5", rtol=1e-8, atol=1e-8, max_steps=3,
                             on_failure="return")
    stub = _Stub(ode)
    ode(torch.randn(4, 2))
    cb = SolverStatsCallback(prefix="ode/")
    cb.on_train_batch_end(None, stub, None, None, 0)
    (metrics, kwargs), = stub.logged
    assert metrics["ode/status"] == 1.0 and cb.status_name(metrics["ode/status"]) == "max_steps_reached"
    assert metrics["ode/steps"] == 3 and metrics["ode/nfe_forward"] == ode.field.func.calls
    assert kwargs["on_step"] is True and kwargs["on_epoch"] is False
    assert cb.last["status"] == "max_steps_reached"
    cb.on_train_batch_end(None, _Stub(torch.nn.Linear(2, 2)), None, None, 1)  # no solve: nothing logged
    assert len(stub.logged) == 1


class _DtypeField(CountingField):
    """Also records (state dtype, dtype its linear layer computes in)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def forward(self, t, z):
        self.seen.add((z.dtype, self.lin(z).dtype))
        return super().forward(t, z)


def test_bf16_mixed_precision_trainer(tmp_path, one_thread):
    """L.Trainer(precision="bf16-mixed") (autocast on CPU): the field computes in bfloat16 on a float32 state,
    the solves succeed, the parameters stay float32 and are updated."""
    torch.manual_seed(0)
    model = LitODE()
    model.field = _DtypeField()
    model.ode = neurodyn.NeuralODE(model.field, t=(0.0, 2.0), method="dopri5", rtol=1e-3, atol=1e-4,
                                   gradient="adjoint")
    before = params(model).clone()
    cb = SolverStatsCallback()
    L.Trainer(max_epochs=1, precision="bf16-mixed", accelerator="cpu", devices=1, logger=False, callbacks=[cb],
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=str(tmp_path)).fit(model, loader())
    assert model.field.seen == {(torch.float32, torch.bfloat16)}
    assert cb.last["status"] == "success" and cb.last["nfe_backward"] > 0
    after = params(model)
    assert after.dtype == torch.float32 and bool(torch.isfinite(after).all()) and not torch.equal(after, before)
