"""Worker of ``tests/test_training.py::test_ddp_matches_single_process`` (not a test module itself).

Started twice as ``python tests/ddp_worker.py OUT`` with the environment torchrun would give (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT): the :class:`neurodyn.Trainer` initialises the process group itself
(gloo on CPU), wraps the model in DistributedDataParallel and shards the data. Each rank touches
``OUT/init{rank}`` once the process group has formed. Rank 0 writes ``OUT/result.pt`` (step-1 gradients and
parameters, final parameters, logged losses) and the trainer's logs/checkpoint in ``OUT/logs``; every rank
writes ``OUT/rank{r}.pt`` with its final parameters. Then the same training runs from a DataLoader with a
``DistributedSampler`` (rank 0 adds its parameters and losses to ``result.pt``).

The test imports :func:`make_problem` and :data:`STEPS` to run the same training in one process on the full
batch.
"""

from __future__ import annotations

import faulthandler
import os
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import neurodyn

F64 = torch.float64
N = 16  # samples: one global batch, so every step sees the whole data set whatever the order
STEPS = 3


def make_problem(seed: int = 0):
    """Model (float64 NeuralODE on a fixed rk4 grid: identical steps on any batch), optimizer, data."""
    neurodyn.seed_everything(seed)
    f = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(F64)
    model = neurodyn.NeuralODE(f, t=(0.0, 1.0), method="rk4", step_size=0.25)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N, 2, generator=g, dtype=F64)
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    y = x @ rot.T
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt, x, y


def recorder(store: dict):
    """An ``on_step`` callback keeping the gradients and parameters after step 1."""

    def on_step(trainer, row):
        if row["step"] == 1:
            store["grads1"] = [p.grad.detach().clone() for p in trainer.module.parameters()]
            store["params1"] = [p.detach().clone() for p in trainer.module.parameters()]

    return on_step


def main(out: str) -> None:
    # the test kills the workers after 120 s: print where each one stands before that, into its log
    faulthandler.dump_traceback_later(100, exit=False)
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, opt, x, y = make_problem()
    store: dict = {}
    trainer = neurodyn.Trainer(model, opt, torch.nn.MSELoss(), train_data=(x, y), batch_size=N // world,
                               max_steps=STEPS, log_dir=os.path.join(out, "logs"), checkpoint_every=2, seed=0,
                               progress=False, on_step=recorder(store))
    assert trainer.distributed and trainer.world_size == world, (trainer.distributed, trainer.world_size)
    open(os.path.join(out, f"init{trainer.rank}"), "w").close()
    assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    history = trainer.fit()
    params = [p.detach().clone() for p in trainer.module.parameters()]
    torch.save({"params": params, "rank": trainer.rank}, os.path.join(out, f"rank{trainer.rank}.pt"))

    # The same training from a DataLoader sharded by a DistributedSampler; without one the Trainer refuses it.
    model, opt, x, y = make_problem()
    ds = TensorDataset(x, y)
    try:
        neurodyn.Trainer(model, opt, torch.nn.MSELoss(), train_data=DataLoader(ds, batch_size=N // world),
                         max_steps=STEPS, progress=False)
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    sampler = DistributedSampler(ds, shuffle=True, seed=0)
    via_loader = neurodyn.Trainer(model, opt, torch.nn.MSELoss(),
                                  train_data=DataLoader(ds, batch_size=N // world, sampler=sampler),
                                  max_steps=STEPS, progress=False, checkpoint_every=0)
    loader_history = via_loader.fit()
    if trainer.rank == 0:
        torch.save({"grads1": store["grads1"], "params1": store["params1"], "params": params,
                    "losses": [r["loss"] for r in history], "world_size": trainer.world_size,
                    "loader_params": [p.detach().clone() for p in via_loader.module.parameters()],
                    "loader_losses": [r["loss"] for r in loader_history], "loader_refused": refused,
                    "loader_epochs": [r["epoch"] for r in loader_history]},
                   os.path.join(out, "result.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
