"""Measurements beside the step time: extra memory of a step, the first step of a new process,
a step right after a matmul (do torch's and numba's thread pools get in each other's way?), and
a step under ``torch.compile``.

Used by ``fuseopt bench --probes``; each function also works on its own.
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import torch

__all__ = [
    "compiled_step",
    "first_step_seconds",
    "format_probes",
    "run_probes",
    "step_after_matmul",
    "step_peak_bytes",
]


def _rss_peak_supported() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def step_peak_bytes(opt: Any) -> dict[str, int | None]:
    """Peak memory one ``opt.step()`` adds on top of what existed before it (state already made).

    Returns ``torch``: the peak of torch's CPU allocator during the step (allocations and frees as
    torch's profiler records them; what a foreach step's temporaries cost), and ``rss``: the rise
    of the process's peak resident set (Linux; None elsewhere), which also sees memory that
    bypasses torch (numpy, numba). A step that allocates nothing model-sized shows ~0 in both.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    rss = None
    if _rss_peak_supported():
        # a steady step: the second step with a state is checked in full and the third reuses
        # that check, whose first use loads its reader once (numba code, a self-test)
        opt.step()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
        before = _read_status("VmRSS")
        opt.step()
        rss = max(0, _read_status("VmHWM") - before)
    return {"torch": peak, "rss": rss}


_FIRST_STEP = r"""
import json, sys, time
start = time.perf_counter()
import torch
import {module} as lib
imported = time.perf_counter()
params = [torch.zeros(s, dtype=getattr(torch, {dtype!r}), requires_grad=True) for s in {shapes!r}]
for p in params:
    p.grad = torch.full_like(p, 1e-3)
opt = getattr(lib, {name!r})(params, **{kwargs!r})
t0 = time.perf_counter()
opt.step()
t1 = time.perf_counter()
opt.step()
t2 = time.perf_counter()
opt.step()
t3 = time.perf_counter()
print(json.dumps(dict(import_s=imported - start, first_s=t1 - t0, second_s=t2 - t1, third_s=t3 - t2)))
"""


def first_step_seconds(
    name: str,
    kwargs: dict | None = None,
    *,
    library: str = "fuseopt",
    dtype: str = "float32",
    shapes: tuple = ((256, 256), (256,)),
) -> dict[str, float]:
    """Time the first ``step()`` of ``library.name`` in a new Python process.

    Returns ``import_s`` (importing torch and the library), ``first_s``, ``second_s`` and
    ``third_s`` (the first three steps), and ``extra_s``: ``first_s`` minus ``third_s``, the
    cost of the first step beyond a steady one (kernel loading from the on-disk cache, state
    creation). The child inherits the environment (``FUSEOPT_CACHE_DIR`` included).
    """
    code = _FIRST_STEP.format(
        module="torch.optim" if library == "torch" else library,
        name=name,
        kwargs=dict(kwargs or {}),
        dtype=dtype,
        shapes=[list(s) for s in shapes],
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["extra_s"] = result["first_s"] - result["third_s"]
    return result


def step_after_matmul(opt: Any, size: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Median seconds of ``opt.step()`` right after a torch matmul and right after another step.

    torch's intra-op pool and numba's keep their threads spinning for a while after a parallel
    region; if the two pools fought over the cores, the step after a matmul would be slower.
    """
    a = torch.randn(size, size)
    after_step, after_matmul = [], []
    opt.step()
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        after_step.append(time.perf_counter() - start)
        a @ a
        start = time.perf_counter()
        opt.step()
        after_matmul.append(time.perf_counter() - start)
    after_step.sort()
    after_matmul.sort()
    return {"after_step_s": after_step[repeats // 2], "after_matmul_s": after_matmul[repeats // 2]}


_COMPILED_STEP = r"""
import json, time, torch, fuseopt

def make():
    params = [torch.zeros(s, dtype=getattr(torch, {dtype!r}), requires_grad=True) for s in {shapes!r}]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    return params

def median(step):
    times = []
    for _ in range({repeats}):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[{repeats} // 2]

out = {{}}
ours = getattr(fuseopt, {name!r})(make(), **{kwargs!r})
ours.step()
out["fuseopt_eager_s"] = median(ours.step)
compiled = torch.compile(lambda: ours.step(), fullgraph=True)
compiled()
out["fuseopt_compiled_s"] = median(compiled)
try:
    theirs = getattr(torch.optim, {name!r})(make(), **{kwargs!r})
    theirs_compiled = torch.compile(theirs.step)
    theirs_compiled()
    out["torch_compiled_s"] = median(theirs_compiled)
except Exception:  # torch's compiler may refuse an algorithm or a dtype
    out["torch_compiled_s"] = None
print(json.dumps(out))
"""


def compiled_step(
    name: str, kwargs: dict[str, Any], shapes, dtype: torch.dtype = torch.float32, repeats: int = 9
) -> dict[str, float | None]:
    """Median seconds of one step under ``torch.compile``, after the compiling first call, in a
    new process (the compiler's imports and worker threads stay out of this one): fuseopt's
    default step eagerly and as ``torch.compile(lambda: opt.step())``, and torch's default step
    compiled as its compiled-optimizer tutorial does (``torch.compile(opt.step)``; None where
    that fails)."""
    code = _COMPILED_STEP.format(
        name=name, kwargs=dict(kwargs), dtype=str(dtype)[6:], repeats=repeats,
        shapes=[list(s) for s in shapes],
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=900
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_probes(
    shapes: list[tuple[int, ...]],
    algorithms: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    first_step: bool = True,
    compiled: bool = True,
) -> list[dict[str, Any]]:
    """Per algorithm: the extra memory of a step (fuseopt fused, torch foreach and fused), the
    extra cost of a new process's first step (fuseopt's default and torch's default),
    fuseopt's fused step right after a matmul over one right after a step, and (``compiled``)
    the step under ``torch.compile``, fuseopt's and torch's (:func:`compiled_step`).

    ``algorithms`` maps names to :class:`fuseopt.bench.Algorithm` (name and constructor kwargs).
    """
    import fuseopt
    from fuseopt.bench import _make_params

    rows = []
    for name, algorithm in algorithms.items():
        if algorithm.max_grad_norm is not None or algorithm.reference or algorithm.options:
            # (the timing table only)
            continue
        row: dict[str, Any] = {"algorithm": name, "dtype": str(dtype)[6:]}
        numel = sum(math.prod(s) for s in shapes)
        row["param_bytes"] = numel * dtype.itemsize
        for key, lib, flags in (
            ("fuseopt_fused", fuseopt, {"fused": True}),
            ("torch_foreach", torch.optim, {"foreach": True}),
            ("torch_fused", torch.optim, {"fused": True}),
        ):
            try:
                opt = getattr(lib, name)(
                    _make_params(shapes, dtype=dtype), **algorithm.kwargs, **flags
                )
                opt.step()  # state exists before the measured step
            except (RuntimeError, TypeError, ValueError):
                row[key] = None
                continue
            row[key] = step_peak_bytes(opt)
            if key == "fuseopt_fused":
                row["after_matmul"] = step_after_matmul(opt)
            del opt
            gc.collect()
        if first_step:
            for lib in ("fuseopt", "torch"):
                row[f"first_step_{lib}"] = first_step_seconds(
                    name, dict(algorithm.kwargs), library=lib, dtype=str(dtype)[6:]
                )
        if compiled:
            row["compiled"] = compiled_step(name, dict(algorithm.kwargs), shapes, dtype)
        rows.append(row)
    return rows


def _mib(value: dict | None, key: str) -> str:
    if value is None or value.get(key) is None:
        return "n/a"
    return f"{value[key] / 2**20:.1f}"


def _compiled_cells(compiled: dict | None) -> list[str]:
    keys = ("fuseopt_compiled_s", "fuseopt_eager_s", "torch_compiled_s")
    if compiled is None:
        return ["n/a"] * len(keys)
    return ["n/a" if compiled[k] is None else f"{compiled[k] * 1e3:.3f}" for k in keys]


def format_probes(rows: list[dict[str, Any]]) -> str:
    """The probe results as a text table."""
    cols = [
        ("algorithm", 9),
        ("params MiB", 10),
        ("fused MiB", 9),
        ("fused RSS", 9),
        ("foreach MiB", 11),
        ("t.fused MiB", 11),
        ("1st step s", 10),
        ("torch 1st s", 11),
        ("matmul ratio", 12),
        ("compiled ms", 11),
        ("eager ms", 8),
        ("t.compiled ms", 13),
    ]
    head = " ".join(f"{name:>{w}}" for name, w in cols)
    lines = [
        "peak extra memory of one step (fuseopt fused: torch allocator, RSS; torch foreach, torch "
        "fused: allocator); first step's extra seconds in a new process (fuseopt default, torch "
        "default); fused step after a matmul / after a step; a step under torch.compile "
        "(fuseopt's default compiled, and eager; torch's default compiled)",
        head,
        "-" * len(head),
    ]
    for r in rows:
        first = [
            f"{r[k]['extra_s']:.3f}" if r.get(k) else "n/a"
            for k in ("first_step_fuseopt", "first_step_torch")
        ]
        mm = r.get("after_matmul")
        cells = [
            r["algorithm"],
            f"{r['param_bytes'] / 2**20:.1f}",
            _mib(r["fuseopt_fused"], "torch"),
            _mib(r["fuseopt_fused"], "rss"),
            _mib(r["torch_foreach"], "torch"),
            _mib(r["torch_fused"], "torch"),
            *first,
            f"{mm['after_matmul_s'] / mm['after_step_s']:.2f}x" if mm else "n/a",
            *_compiled_cells(r.get("compiled")),
        ]
        lines.append(" ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, cols)))
    return "\n".join(lines)
