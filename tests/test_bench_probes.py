"""The benchmark's probes (step memory, first step of a new process, threads) and ``--dtype``."""

from __future__ import annotations

import os

import pytest
import torch

import fuseopt
from fuseopt import bench, bench_probes

N = 1 << 20  # 4 MiB of float32 per tensor: far above any bookkeeping


def _adam(lib, **flags):
    params = [torch.zeros(N, requires_grad=True) for _ in range(2)]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt = lib.Adam(params, **flags)
    opt.step()
    return opt


def test_foreach_step_allocates_a_model_sized_temporary_and_fused_nothing():
    model_bytes = 2 * N * 4
    foreach = bench_probes.step_peak_bytes(_adam(torch.optim, foreach=True))
    fused = bench_probes.step_peak_bytes(_adam(fuseopt, fused=True))
    assert foreach["torch"] >= model_bytes  # torch's foreach Adam: sqrt(v) and friends
    assert fused["torch"] == 0  # no torch tensor created during the step
    if fused["rss"] is not None:
        assert fused["rss"] < model_bytes / 8  # nothing model-sized outside torch either


def test_first_step_runs_in_a_new_process_with_the_callers_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEOPT_CACHE_DIR", str(tmp_path))
    result = bench_probes.first_step_seconds("Adam", {"lr": 0.01}, shapes=((8, 8),))
    assert set(result) == {"import_s", "first_s", "second_s", "third_s", "extra_s"}
    assert result["extra_s"] == pytest.approx(result["first_s"] - result["third_s"])
    assert any(f.endswith(".py") for f in os.listdir(tmp_path)), "the child compiled into it"


def test_step_after_matmul_reports_both_medians():
    times = bench_probes.step_after_matmul(_adam(fuseopt, fused=True), size=64, repeats=3)
    assert set(times) == {"after_step_s", "after_matmul_s"}
    assert all(t > 0 for t in times.values())


def test_compiled_step_probe():
    """The step under torch.compile: fuseopt's compiled step, its eager step and torch's
    compiled step, each measured after the compiling call; in the probes table."""
    result = bench_probes.compiled_step("Adam", {"lr": 0.01}, [(16, 8), (8,)], repeats=3)
    assert set(result) == {"fuseopt_eager_s", "fuseopt_compiled_s", "torch_compiled_s"}
    assert result["fuseopt_eager_s"] > 0 and result["fuseopt_compiled_s"] > 0
    assert result["torch_compiled_s"] is None or result["torch_compiled_s"] > 0
    row = {"algorithm": "Adam", "param_bytes": 0, "fuseopt_fused": None, "torch_foreach": None,
           "torch_fused": None, "compiled": result}  # fmt: skip
    last = bench_probes.format_probes([row]).splitlines()[-1].split()
    assert last[-3] == f"{result['fuseopt_compiled_s'] * 1e3:.3f}"


def test_probes_table_and_bfloat16_rows():
    rows = bench_probes.run_probes(
        [(64, 64)], {"Adam": bench.ALGORITHMS["Adam"]}, torch.bfloat16, first_step=False,
        compiled=False,
    )  # fmt: skip
    (row,) = rows
    assert row["dtype"] == "bfloat16" and row["param_bytes"] == 64 * 64 * 2
    assert row["fuseopt_fused"]["torch"] == 0
    table = bench_probes.format_probes(rows)
    assert "Adam" in table.splitlines()[-1] and "fused MiB" in table


def test_bench_dtype_counts_bytes_of_that_dtype():
    rows = bench.run({"tiny": [[256, 256]]}, ["Adam"], ["fused"], steps=1, dtype=torch.bfloat16)
    ours = next(r for r in rows if r["library"] == "fuseopt")
    assert ours["dtype"] == "bfloat16"
    moved = 256 * 256 * 7 * 2  # Adam streams 7 tensors of 2 bytes per element
    assert ours["gbps"] == pytest.approx(moved / (ours["ms"] * 1e6))


def test_x_bound_uses_the_bandwidth_measured_around_the_rows_steps():
    """This VM's bandwidth drifts within a run: each row's bound comes from calibration passes
    run around its own steps, not from the figure measured at the start."""
    rows = bench.run({"tiny": [[64, 64]]}, ["SGD"], ["fused"], steps=2, progress=False)
    assert all(r["bandwidth_gbps"] > 0 for r in rows)
    ours = next(r for r in rows if r["library"] == "fuseopt")
    table = bench.format_table(rows, bandwidth=1e9)  # a start-of-run figure no row uses
    assert table.splitlines()[-1].endswith(f"{ours['bandwidth_gbps'] / ours['gbps']:.2f}x")
