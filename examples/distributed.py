"""fuseopt with FSDP2 and a distributed checkpoint, on 2 CPU processes (gloo).

    python examples/distributed.py

Each process holds half of every parameter (``fully_shard``); ``fuseopt.AdamW`` steps the DTensor
params with its fused kernel on the local shards. Halfway through, the model and optimizer are
saved with ``torch.distributed.checkpoint``; a fresh model and optimizer load that checkpoint and
train the second half again, which ends exactly where uninterrupted training ended.
"""

from __future__ import annotations

import gc
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

import fuseopt

WORLD = 2
STEPS = 20


def build():
    """A small MLP sharded over the ranks, and its optimizer."""
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
        torch.nn.Linear(64, 1),
    )  # fmt: skip
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, fuseopt.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)


def batches(rank: int):
    """This rank's batches of a toy regression task (each rank sees its own data)."""
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randn(32, 16, generator=gen)
        yield x, x.sin().sum(dim=1, keepdim=True)


def train(model, opt, data, steps: int) -> float:
    loss = torch.zeros(())
    for _, (x, y) in zip(range(steps), data):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


def worker(rank: int, port: int, ckpt: str) -> None:
    """One rank: join the group, run, leave it cleanly."""
    torch.set_num_threads(1)  # the ranks share this machine's cores
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        run(rank, ckpt)
        gc.collect()  # free the sharded modules (reference cycles) while the group still exists
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(rank: int, ckpt: str) -> None:
    """Train, checkpoint halfway, train on; then resume from the checkpoint and compare."""
    model, opt = build()
    param = next(model.parameters())
    data = batches(rank)
    first = train(model, opt, data, 1)
    half = train(model, opt, data, STEPS // 2 - 1)
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt),
    }
    dcp.save(state, checkpoint_id=ckpt)
    last = train(model, opt, data, STEPS - STEPS // 2)
    final = [p.full_tensor() for p in model.parameters()]

    # A fresh start from the checkpoint, fed the same second half of the data.
    model, opt = build()
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt),
    }
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    data = batches(rank)
    for _ in range(STEPS // 2):
        next(data)
    train(model, opt, data, STEPS - STEPS // 2)
    same = all(torch.equal(a, p.full_tensor()) for a, p in zip(final, model.parameters()))
    if rank == 0:
        print(
            f"{WORLD} ranks, {type(param).__name__} params (rank 0 holds "
            f"{param.to_local().shape[0]} of {param.shape[0]} rows of the first weight)"
        )
        print(f"loss: step 1 {first:.4f}, step {STEPS // 2} {half:.4f}, step {STEPS} {last:.4f}")
        print(f"checkpoint saved at step {STEPS // 2} in {ckpt}")
        if same:
            print("resumed from the checkpoint: identical to uninterrupted training")
        else:
            print("resumed from the checkpoint: DIFFERENT from uninterrupted training")
    if not same:
        raise SystemExit(1)  # the spawning parent then fails too


def main() -> None:
    with socket.socket() as s:  # a free port on the loopback for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(port, os.path.join(tmp, "checkpoint")), nprocs=WORLD)


if __name__ == "__main__":
    main()
