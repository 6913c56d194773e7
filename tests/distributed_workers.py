"""What the processes of ``test_distributed.py`` run (a module of its own, so that the spawned
children import only this, not pytest's test module).

Every worker trains a tiny float64 MLP on a fixed batch of 12 rows, split evenly over the ranks (2
or 3), with every elementwise fuseopt algorithm, and saves what the parent checks to
``{out}/{rank}.pt``. An exception in a worker makes ``spawn`` fail, which fails the test.
"""

from __future__ import annotations

import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# One option set per algorithm, with the options that change its kernel (momentum, amsgrad,
# centered, decoupled decay, ...), so the comparisons cover more than the defaults.
ALGOS = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("Adadelta", dict(lr=0.5, rho=0.5, weight_decay=0.01)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1)),
    ("Adamax", dict(lr=0.01, weight_decay=0.01)),
    ("ASGD", dict(lr=0.05, t0=2, lambd=0.01)),
    ("NAdam", dict(lr=0.01, weight_decay=0.01, decoupled_weight_decay=True)),
    ("RAdam", dict(lr=0.01, betas=(0.9, 0.99))),  # rectified from step 6 on
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
    ("Rprop", dict(lr=0.01)),
]
IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
ROWS = 12  # divisible by 2 and by 3: every rank gets an equal share of the batch
STEPS = 8


def free_port() -> int:
    """A TCP port on the loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined in a gloo group."""
    import fuseopt

    mp.spawn(_entry, args=(fn, world, free_port(), fuseopt.__file__, args), nprocs=world)


def _entry(rank: int, fn, world: int, port: int, fuseopt_file: str, args: tuple) -> None:
    torch.set_num_threads(1)  # the machine's cores are shared by all ranks
    import fuseopt

    # the children must test the same fuseopt as the parent (a worktree, not an installed copy)
    assert fuseopt.__file__ == fuseopt_file, (fuseopt.__file__, fuseopt_file)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        fn(rank, world, *args)
        # DDP and FSDP modules sit in reference cycles: free them (and the collectives they hold)
        # now, not at interpreter exit after the group is gone; and no rank tears the group down
        # while another still talks to it.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- data
def make_model() -> torch.nn.Module:
    """The same float64 MLP in every process. Under FSDP2 on 3 ranks its shards are uneven (8 rows
    as 3 + 3 + 2, 3 rows as 1 + 1 + 1)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


def make_batch(world: int = 1, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch (all of it for ``world=1``)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(ROWS, 3, generator=gen, dtype=torch.float64)
    return x.chunk(world)[rank], y.chunk(world)[rank]


def train(model, opt, x, y, steps: int) -> None:
    """``steps`` steps on the mean squared error: the mean over ranks of the ranks' means (what
    DDP and FSDP average) is the mean over the whole batch."""
    for _ in range(steps):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def single_process(name: str, kwargs: dict, steps: int = STEPS, params=None):
    """Reference: the unsharded model trained on the whole batch in this process."""
    import fuseopt

    model = make_model()
    chosen = list(model.parameters()) if params is None else params(model)
    opt = getattr(fuseopt, name)(chosen, **kwargs)
    train(model, opt, *make_batch(), steps)
    return model, opt


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _layout(state: dict) -> dict:
    """What ``torch.distributed.checkpoint`` sees of a param's state: per key, type, placements,
    dtype and shape."""
    return {
        k: (type(v).__name__, str(getattr(v, "placements", None)), v.dtype, tuple(v.shape))
        for k, v in state.items()
    }


# ------------------------------------------------------------------------------------- workers
def ddp_worker(rank: int, world: int, out: str) -> None:
    """DDP: every algorithm (default implementation, the fused kernel) from the same init."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fuseopt

    x, y = make_batch(world, rank)
    results = {}
    for name, kwargs in ALGOS:
        model = make_model()
        ddp = DDP(model)
        train(ddp, getattr(fuseopt, name)(ddp.parameters(), **kwargs), x, y, STEPS)
        results[name] = [p.detach().clone() for p in model.parameters()]
    torch.save(results, os.path.join(out, f"{rank}.pt"))


def fsdp_worker(rank: int, world: int, out: str) -> None:
    """FSDP2: every algorithm x implementation steps DTensor params; Muon and Adafactor too."""
    from torch.distributed.fsdp import fully_shard

    import fuseopt
    from fuseopt.kernels import numba_cpu

    launches = []  # the fused kernel's launches: the numels of the tensors each one walked
    run = numba_cpu.run

    def counting_run(launch):
        launches.append(tuple(launch.numels))
        return run(launch)

    numba_cpu.run = counting_run

    def sharded():
        model = make_model()
        for layer in (model[0], model[2]):
            fully_shard(layer)
        return fully_shard(model)

    x, y = make_batch(world, rank)
    results = {}
    for name, kwargs in ALGOS:
        for impl, flags in IMPLS.items():
            model = sharded()
            opt = getattr(fuseopt, name)(model.parameters(), **kwargs, **flags)
            before = len(launches)
            train(model, opt, x, y, STEPS)
            state = [opt.state[p] for p in model.parameters()]
            results[name, impl] = dict(
                params=[_full(p.detach()) for p in model.parameters()],
                state=[{k: _full(v) for k, v in s.items()} for s in state],
                layout=[_layout(s) for s in state],
                launches=launches[before:],
                local_numels=[p.to_local().numel() for p in model.parameters()],
            )
        # torch.optim on the same DTensors: the state layout DCP must see (None where neither
        # of torch's implementations can step DTensors: its Rprop for-loop writes through a mask)
        results[name, "torch"] = None
        for foreach in (False, True):
            model = sharded()
            theirs = getattr(torch.optim, name)(model.parameters(), **kwargs, foreach=foreach)
            try:
                train(model, theirs, x, y, 1)
            except RuntimeError:
                continue
            layout = [_layout(theirs.state[p]) for p in model.parameters()]
            results[name, "torch"] = dict(layout=layout)
            break

    model = sharded()
    opt = fuseopt.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
    train(model, opt, x, y, STEPS)
    results["Muon"] = [_full(p.detach()) for p in model.parameters() if p.ndim == 2]

    # Muon on matrices sharded unevenly (7 rows), given the same grads as unsharded copies
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for dtype, nesterov in ((torch.float32, True), (torch.bfloat16, False)):
        gen = torch.Generator().manual_seed(0)
        value = torch.randn(7, 4, generator=gen).to(dtype)
        plain = torch.nn.Parameter(value.clone())
        dt = torch.nn.Parameter(distribute_tensor(value.clone(), mesh, [Shard(0)]))
        opts = [fuseopt.Muon([p], lr=0.02, nesterov=nesterov) for p in (plain, dt)]
        for _ in range(3):
            grad = torch.randn(7, 4, generator=gen).to(dtype)
            plain.grad, dt.grad = grad.clone(), distribute_tensor(grad, mesh, [Shard(0)])
            for opt in opts:
                opt.step()
        buffers = [opt.state[p]["momentum_buffer"] for opt, p in zip(opts, (plain, dt))]
        results["Muon", dtype] = dict(
            param=torch.equal(dt.full_tensor(), plain.detach()),
            buffer=torch.equal(buffers[1].full_tensor(), buffers[0]),
        )

    model = sharded()
    opt = fuseopt.Adafactor(model.parameters())
    torch.nn.functional.mse_loss(model(x), y).backward()
    try:
        opt.step()
        results["Adafactor"] = None
    except NotImplementedError as e:
        results["Adafactor"] = (str(e), len(opt.state))  # nothing created on failure
    torch.save(results, os.path.join(out, f"{rank}.pt"))


def zero_worker(rank: int, world: int, out: str) -> None:
    """ZeroRedundancyOptimizer over fuseopt.AdamW: train, consolidate and save the state dict at
    half time, train on; then a fresh ZeRO loads the saved state and trains the second half again."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fuseopt

    kwargs = dict(lr=0.01, weight_decay=0.1, amsgrad=True)
    x, y = make_batch(world, rank)
    half = STEPS // 2
    model = make_model()
    ddp = DDP(model)
    zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=fuseopt.AdamW, **kwargs)
    assert isinstance(zero.optim, fuseopt.AdamW)
    train(ddp, zero, x, y, half)
    zero.consolidate_state_dict(to=0)
    checkpoint = os.path.join(out, "zero.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "optim": zero.state_dict()}, checkpoint)
    else:  # only the rank it was consolidated to holds the whole state
        try:
            zero.state_dict()
            raise AssertionError("state_dict() without consolidation on this rank")
        except RuntimeError:
            pass
    local_params = sum(len(g["params"]) for g in zero.optim.param_groups)
    train(ddp, zero, x, y, STEPS - half)
    final = [p.detach().clone() for p in model.parameters()]
    dist.barrier()  # the checkpoint is written

    saved = torch.load(checkpoint, weights_only=False)
    model = make_model()
    model.load_state_dict(saved["model"])
    ddp = DDP(model)
    zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=fuseopt.AdamW, **kwargs)
    zero.load_state_dict(saved["optim"])
    train(ddp, zero, x, y, STEPS - half)
    resumed = [p.detach().clone() for p in model.parameters()]

    # A group added after construction (ZeRO repartitions, the local optimizers add their part).
    model = make_model()
    ddp = DDP(model)
    zero = ZeroRedundancyOptimizer(model[0].parameters(), optimizer_class=fuseopt.AdamW, **kwargs)
    zero.add_param_group({"params": list(model[2].parameters()), "lr": 0.02})
    train(ddp, zero, x, y, STEPS)
    groups = [p.detach().clone() for p in model.parameters()]
    torch.save(
        dict(final=final, resumed=resumed, local_params=local_params, groups=groups),
        os.path.join(out, f"{rank}.pt"),
    )


def _dcp_models():
    """One FSDP2 model and fuseopt optimizer (default implementation) per algorithm."""
    from torch.distributed.fsdp import fully_shard

    import fuseopt

    pairs = {}
    for name, kwargs in ALGOS:
        model = make_model()
        fully_shard(model[0])
        fully_shard(model)
        pairs[name] = model, getattr(fuseopt, name)(model.parameters(), **kwargs)
    return pairs


def dcp_worker(rank: int, world: int, out: str, save: bool) -> None:
    """torch.distributed.checkpoint: with ``save``, train half the steps, save every model and
    optimizer (one checkpoint holds them all), train on. Then fresh models and optimizers, sharded
    over this run's ranks, load the checkpoint and train the second half again."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def state_of(pairs):
        return {
            name: {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, o)}
            for name, (m, o) in pairs.items()
        }

    x, y = make_batch(world, rank)
    ckpt = os.path.join(os.path.dirname(out), "ckpt")
    results = {}
    if save:
        pairs = _dcp_models()
        for model, opt in pairs.values():
            train(model, opt, x, y, STEPS // 2)
        dcp.save(state_of(pairs), checkpoint_id=ckpt)
        for name, (model, opt) in pairs.items():
            train(model, opt, x, y, STEPS - STEPS // 2)
            results[name, "uninterrupted"] = [_full(p.detach()) for p in model.parameters()]

    pairs = _dcp_models()
    state = state_of(pairs)
    dcp.load(state, checkpoint_id=ckpt)
    for name, (model, opt) in pairs.items():
        set_model_state_dict(model, state[name]["model"])
        set_optimizer_state_dict(model, opt, state[name]["optim"])
        steps = [float(opt.state[p]["step"]) for p in model.parameters() if "step" in opt.state[p]]
        train(model, opt, x, y, STEPS - STEPS // 2)
        results[name, "resumed"] = [_full(p.detach()) for p in model.parameters()]
        results[name, "steps"] = steps
    torch.save(results, os.path.join(out, f"{rank}.pt"))


def load_results(out: str, world: int) -> list:
    """What each rank saved, in rank order."""
    return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False) for r in range(world)]
