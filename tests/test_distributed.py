"""fuseopt under torch.distributed: DDP, FSDP2 (DTensor params), ZeroRedundancyOptimizer and
torch.distributed.checkpoint, each in one spawn of 2 (or 3) gloo processes on CPU that runs every
elementwise algorithm (see ``distributed_workers.py``); the dispatch of DTensor params also in this
process, on a 1-rank group.

Tolerance: the model is float64. DDP and FSDP average the ranks' gradients of the mean loss over
their half (third) of the batch, which rounds differently from the gradient of the mean over the
whole batch, by a few units in the last place; eight steps carry that to differences of at most
~1e-15 absolute, 2e-14 relative in params and state (measured: 7e-16 and 1.5e-14, RMSprop).
``rtol=1e-12, atol=1e-14`` (the float64 fused-kernel tolerance of ``test_parity.py``) bounds it
with room. What runs twice the same way (every rank's copy under DDP, a checkpoint resumed on as
many ranks, Muon given the same grads) must be bitwise equal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_workers import (
    ALGOS,
    IMPLS,
    STEPS,
    dcp_worker,
    ddp_worker,
    free_port,
    fsdp_worker,
    load_results,
    single_process,
    spawn,
    zero_worker,
)

import fuseopt

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

TOL = dict(rtol=1e-12, atol=1e-14)
# Loading a state dict casts floating state to the param's dtype, in torch.optim as here, so the
# float32 0-dim states of ASGD (eta, mu) and NAdam (mu_product) come back as float64 and round
# differently from then on: a resumed run differs from an uninterrupted one by float32 rounding.
SCALAR_STATE = {"ASGD", "NAdam"}
SCALAR_STATE_TOL = dict(rtol=1e-6, atol=1e-8)
ROOT = Path(__file__).resolve().parent.parent


def _params(model) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()]


def _assert_close(ours, theirs) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


@pytest.fixture
def one_rank_mesh():
    """A 1-rank gloo group in this process, and its device mesh: DTensors without spawning."""
    from torch.distributed.tensor import init_device_mesh

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_dtensor_backends_in_process(one_rank_mesh, monkeypatch):
    """The fused kernel steps a DTensor whose grad is sharded like it (bitwise as on plain
    tensors); a grad placed otherwise goes through foreach."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from fuseopt.kernels import numba_cpu

    launches = []
    run = numba_cpu.run
    monkeypatch.setattr(numba_cpu, "run", lambda launch: launches.append(len(launch.numels)) or run(launch))
    gen = torch.Generator().manual_seed(0)
    value, grad = (torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    plain = torch.nn.Parameter(value.clone())
    plain.grad = grad.clone()
    fuseopt.Adam([plain], lr=0.1).step()
    launches.clear()
    for grad_placement, expected_launches in ((Shard(0), [1]), (Replicate(), [])):
        p = torch.nn.Parameter(distribute_tensor(value.clone(), one_rank_mesh, [Shard(0)]))
        p.grad = distribute_tensor(grad.clone(), one_rank_mesh, [grad_placement])
        opt = fuseopt.Adam([p], lr=0.1)
        opt.step()
        assert launches == expected_launches
        launches.clear()
        assert opt.state[p]["exp_avg"].placements == (Shard(0),)
        assert not isinstance(opt.state[p]["step"], type(p))
        if expected_launches:  # the same kernel on the same numbers
            assert torch.equal(p.full_tensor(), plain.detach())
        else:
            torch.testing.assert_close(p.full_tensor(), plain.detach(), **TOL)


def test_dtensor_state_of_another_dtype_never_reaches_the_kernel(one_rank_mesh):
    """A state DTensor placed like its param but of another dtype (a wrong checkpoint) would be
    read as the param's dtype by the flat kernel: it goes through DTensor's own ops instead."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from fuseopt import _dtensor

    value = torch.randn(6, 2, dtype=torch.float64)
    p = torch.nn.Parameter(distribute_tensor(value, one_rank_mesh, [Shard(0)]))
    g = distribute_tensor(torch.ones_like(value), one_rank_mesh, [Shard(0)])
    state = {"exp_avg": distribute_tensor(torch.zeros_like(value), one_rank_mesh, [Shard(0)])}
    assert _dtensor.shards_fit(p, g, state, ["exp_avg"])
    state["exp_avg"] = distribute_tensor(torch.zeros(6, 2), one_rank_mesh, [Shard(0)])  # float32
    assert not _dtensor.shards_fit(p, g, state, ["exp_avg"])


def test_dtensor_keeps_its_devices_kernel(one_rank_mesh, monkeypatch):
    """A DTensor whose shards fit takes the kernel of its device's backend on its local shard,
    never another: here Triton (interpreted, as on a GPU), not numba, whose kernels read host
    memory (K2: a numba launch holds only CPU tensors)."""
    pytest.importorskip("triton")
    from torch.distributed.tensor import Shard, distribute_tensor

    from fuseopt.kernels import numba_cpu, triton_gpu

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")
    runs = []
    for module in (numba_cpu, triton_gpu):
        run = module.run
        monkeypatch.setattr(
            module, "run", lambda launch, m=module, r=run: runs.append(m.__name__) or r(launch)
        )
    value, grad = torch.randn(6, 40), torch.randn(6, 40)
    plain = torch.nn.Parameter(value.clone())
    plain.grad = grad.clone()
    fuseopt.Adam([plain], lr=0.1, fused=True).step()
    p = torch.nn.Parameter(distribute_tensor(value.clone(), one_rank_mesh, [Shard(0)]))
    p.grad = distribute_tensor(grad.clone(), one_rank_mesh, [Shard(0)])
    fuseopt.Adam([p], lr=0.1, fused=True).step()
    assert runs == ["fuseopt.kernels.triton_gpu"] * 2
    assert torch.equal(p.full_tensor(), plain.detach())


DTENSOR_STORAGE = [
    (torch.float32, dict(state_dtype=torch.bfloat16)),
    (torch.float32, dict(state_dtype=torch.bfloat16, stochastic_rounding=True)),
    (torch.bfloat16, dict(kahan_sum=True)),
    (torch.bfloat16, dict(state_dtype=torch.float32, stochastic_rounding=True)),
]


@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
@pytest.mark.parametrize("dtype, options", DTENSOR_STORAGE)
def test_dtensor_storage_options(one_rank_mesh, monkeypatch, impl, dtype, options):
    """The storage options on DTensor params step as on plain ones, bit for bit (stochastic
    rounding's bits included: a shard draws them as the whole tensor does on one rank); the
    fused step runs the kernel on the local shards, states of the group's ``state_dtype``
    included (they took DTensor's ops before)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from fuseopt.kernels import numba_cpu

    launches = []
    run = numba_cpu.run
    monkeypatch.setattr(numba_cpu, "run", lambda launch: launches.append(1) or run(launch))
    flags = {"forloop": dict(foreach=False), "foreach": dict(foreach=True)}.get(impl, {})
    flags = flags or dict(fused=True)
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(6, 40, generator=gen).to(dtype)
    grads = [torch.randn(6, 40, generator=gen).to(dtype) for _ in range(3)]
    results = []
    for sharded in (False, True):
        p = torch.nn.Parameter(value.clone())
        if sharded:
            p = torch.nn.Parameter(distribute_tensor(value.clone(), one_rank_mesh, [Shard(0)]))
        torch.manual_seed(3)  # (the stochastic rounding's seeds)
        opt = fuseopt.AdamW([p], lr=0.1, **flags, **options)
        for g in grads:
            p.grad = distribute_tensor(g, one_rank_mesh, [Shard(0)]) if sharded else g.clone()
            opt.step()
        state = {k: _dtensor_full(v) for k, v in opt.state[p].items()}
        results.append((_dtensor_full(p.detach()), state))
    (plain, plain_state), (ours, our_state) = results
    assert torch.equal(plain, ours)
    assert plain_state.keys() == our_state.keys()
    assert all(torch.equal(plain_state[k], our_state[k]) for k in plain_state)
    assert len(launches) == (6 if impl == "fused" else 0)  # 3 steps, plain then sharded


def _dtensor_full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def test_dtensor_state_bits_refused(one_rank_mesh):
    """8-bit states would be quantized in blocks of each rank's shard: a DTensor param that
    ``state_bits=8`` would keep in 8 bits is refused at its step, before anything changes; one
    under ``min_8bit_size`` keeps full-precision states, as on one process."""
    from torch.distributed.tensor import Shard, distribute_tensor

    value = torch.randn(64, 80)
    big = torch.nn.Parameter(distribute_tensor(value.clone(), one_rank_mesh, [Shard(0)]))
    small = torch.nn.Parameter(distribute_tensor(torch.ones(8, 4), one_rank_mesh, [Shard(0)]))
    opt = fuseopt.AdamW([small, big], state_bits=8)
    for p in (small, big):
        p.grad = distribute_tensor(torch.ones(p.shape), one_rank_mesh, [Shard(0)])
    with pytest.raises(RuntimeError, match="state_bits=8 does not support DTensor params"):
        opt.step()
    assert torch.equal(big.full_tensor(), value)
    assert torch.equal(small.full_tensor(), torch.ones(8, 4))
    assert not opt.state
    alone = fuseopt.AdamW([small], state_bits=8)
    alone.step()
    assert alone.state[small]["exp_avg"].dtype == torch.float32
    assert not torch.equal(small.full_tensor(), torch.ones(8, 4))


def test_ddp_equals_single_process_training(tmp_path):
    spawn(ddp_worker, 2, str(tmp_path))
    ranks = load_results(str(tmp_path), 2)
    for name, kwargs in ALGOS:
        for a, b in zip(ranks[0][name], ranks[1][name]):
            assert torch.equal(a, b), f"{name}: the ranks' params differ"
        model, _ = single_process(name, kwargs)
        _assert_close(ranks[0][name], _params(model))


def test_fsdp2_dtensor_params(tmp_path):
    spawn(fsdp_worker, 2, str(tmp_path))
    ranks = load_results(str(tmp_path), 2)
    for name, kwargs in ALGOS:
        model, opt = single_process(name, kwargs)
        ref_state = [opt.state[p] for p in model.parameters()]
        for impl in IMPLS:
            got = ranks[0][name, impl]
            _assert_close(got["params"], _params(model))
            for ours, theirs in zip(got["state"], ref_state):
                assert ours.keys() == theirs.keys(), name
                _assert_close(list(ours.values()), list(theirs.values()))
            # state as torch.optim keeps it for DTensor params (tensors sharded like the param,
            # ``step`` a plain tensor), so distributed checkpoints see the same
            if ranks[0][name, "torch"] is not None:
                assert got["layout"] == ranks[0][name, "torch"]["layout"], name
            for rank in ranks:
                launches = rank[name, impl]["launches"]
                if impl == "fused":  # one launch a step, on this rank's local shards
                    assert launches == [tuple(rank[name, impl]["local_numels"])] * STEPS, name
                else:
                    assert launches == [], name
    assert sum(ranks[0][name, "torch"] is None for name, _ in ALGOS) <= 1
    # rank 1 holds other shards than rank 0, yet gathers the same full tensors
    assert ranks[0]["Adam", "fused"]["local_numels"] != [p.numel() for p in model.parameters()]
    for name, _ in ALGOS:
        _assert_close(ranks[1][name, "fused"]["params"], ranks[0][name, "fused"]["params"])

    # Muon gathers each matrix for Newton-Schulz: the numbers of unsharded training, bit for bit
    # where the grads are the same (a bfloat16 momentum buffer normalised in place, as torch does)
    for dtype in (torch.float32, torch.bfloat16):
        for rank in ranks:
            assert rank["Muon", dtype] == dict(param=True, buffer=True), dtype
    model, _ = single_process("Muon", dict(lr=0.02), params=lambda m: [m[0].weight, m[2].weight])
    _assert_close(ranks[0]["Muon"], [model[0].weight.detach(), model[2].weight.detach()])
    # Adafactor's factored moments need whole tensors: a clear error, and nothing changed
    message, n_states = ranks[0]["Adafactor"]
    assert "Adafactor does not support DTensor parameters" in message
    assert n_states == 0


def test_zero_redundancy_optimizer(tmp_path):
    spawn(zero_worker, 2, str(tmp_path))
    ranks = load_results(str(tmp_path), 2)
    kwargs = dict(lr=0.01, weight_decay=0.1, amsgrad=True)
    # each rank's local fuseopt.AdamW optimizes part of the params only
    assert 0 < ranks[0]["local_params"] < 4 and ranks[0]["local_params"] + ranks[1][
        "local_params"
    ] == len(_params(single_process("AdamW", kwargs, steps=0)[0]))
    model, _ = single_process("AdamW", kwargs)
    for rank in ranks:
        _assert_close(rank["final"], _params(model))
        # resuming from the consolidated state dict: as if never interrupted, bit for bit
        for a, b in zip(rank["resumed"], rank["final"]):
            assert torch.equal(a, b)
    # the consolidated state dict is single-process AdamW's at half time
    saved = torch.load(tmp_path / "zero.pt", weights_only=False)["optim"]
    _, opt = single_process("AdamW", kwargs, steps=STEPS // 2)
    expected = opt.state_dict()
    assert saved["state"].keys() == expected["state"].keys()
    for i, state in expected["state"].items():
        assert list(saved["state"][i]) == list(state)
        for key, value in state.items():
            torch.testing.assert_close(saved["state"][i][key], value, **TOL)
    group = {k: v for k, v in saved["param_groups"][0].items() if k != "params"}
    assert group.items() <= {**expected["param_groups"][0]}.items()
    # add_param_group: as a single-process optimizer built with both groups
    model, _ = single_process(
        "AdamW",
        kwargs,
        params=lambda m: [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.02}],
    )
    for rank in ranks:
        _assert_close(rank["groups"], _params(model))


def test_distributed_checkpoint_resume_and_reshard(tmp_path):
    runs = {}
    for world in (2, 3):  # 2 ranks save, then load; 3 ranks load (resharding)
        out = tmp_path / f"world{world}"
        out.mkdir()
        spawn(dcp_worker, world, str(out), world == 2)
        runs[world] = load_results(str(out), world)[0]
    for name, _ in ALGOS:
        uninterrupted = runs[2][name, "uninterrupted"]
        for world, got in runs.items():
            # every param's step count is back (SGD keeps none)
            assert set(got[name, "steps"]) == ({STEPS // 2} if name != "SGD" else set()), name
            resumed = got[name, "resumed"]
            if name in SCALAR_STATE:
                for a, b in zip(resumed, uninterrupted):
                    torch.testing.assert_close(a, b, **SCALAR_STATE_TOL)
            elif world == 2:  # the same shards and the same reductions: bit for bit
                for a, b in zip(resumed, uninterrupted):
                    assert torch.equal(a, b), name
            else:  # resharded: the grads are averaged over thirds, not halves
                _assert_close(resumed, uninterrupted)


def test_example_script():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "distributed.py")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from the checkpoint: identical to uninterrupted training" in result.stdout
