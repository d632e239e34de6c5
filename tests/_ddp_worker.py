"""Worker for the DistributedDataParallel test (tests/test_integration.py): two gloo processes
on CPU train the same model on halves of one batch.

Kept in its own module so that spawned processes import only this, not the test file.
Shape vocabulary: N batch, T time, I input, H hidden.
"""

import gc
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import handlstm_cuda as hl

N, T, I, H = 4, 5, 3, 6
STEPS = 3
LR = 0.5


class Regressor(torch.nn.Module):
    """Two-layer LSTM and a linear head on the last step: (N, T, I) -> (N, 1)."""

    def __init__(self):
        super().__init__()
        self.rnn = hl.LSTM(I, H, num_layers=2, batch_first=True, dtype=torch.float64)
        self.head = torch.nn.Linear(H, 1, dtype=torch.float64)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def make_model_and_batch():
    """The same initial model and the combined batch (x (N, T, I), y (N, 1)) in every process."""
    torch.manual_seed(0)
    model = Regressor()
    x = torch.randn(N, T, I, dtype=torch.float64)
    y = torch.randn(N, 1, dtype=torch.float64)
    return model, x, y


def train(model, x, y):
    """STEPS of plain SGD on the mean squared error; returns the model."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def run(rank, world_size, init_file, out_path):
    """One DDP process: trains on its shard of the batch; rank 0 saves the final state."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    ddp = None
    try:
        model, x, y = make_model_and_batch()
        shard = slice(rank * N // world_size, (rank + 1) * N // world_size)
        # DDP averages gradients over processes; with equal shards and a mean loss that is the
        # gradient of the mean loss over the combined batch.
        ddp = DistributedDataParallel(model)
        train(ddp, x[shard], y[shard])
        if rank == 0:
            torch.save(model.state_dict(), out_path)
        # Both ranks leave together: a rank that tears gloo down while its peer is still
        # talking to it can abort the peer.
        dist.barrier()
    finally:
        # DDP's reducer keeps the process group and gloo work objects (holding tensors) alive
        # past destroy_process_group. Left to interpreter shutdown, their destruction can take
        # the GIL from a gloo thread while Python is being finalised, which aborts the worker:
        # the likely cause of the rare "terminate called without an active exception" seen on
        # the 2-core CI machine with torch 2.13's CPU wheel (not reproduced in 40 runs under
        # load here). So free them here, while Python is fully alive.
        del ddp
        gc.collect()
        dist.destroy_process_group()
    # Everything the test checks is saved and both ranks are done with gloo, so leave without
    # the interpreter's shutdown and C++ static destructors: a gloo thread still joinable there
    # is what std::terminate's "terminate called without an active exception" reports, and it
    # says nothing about DDP with our op. An error above still leaves through the exception (the
    # parent then reports it), never through this exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
