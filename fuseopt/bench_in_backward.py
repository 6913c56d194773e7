"""Peak memory and time of a training step with the step inside backward
(:func:`fuseopt.step_in_backward`) and with the normal fused step, on a ~100M-param model on CPU.

``python -m fuseopt.bench_in_backward`` runs each mode in fresh processes, alternating them
(``--repeats`` pairs), and prints a table (``--json``: one JSON line per run as well).

How memory is measured, two ways, each over one steady training step (``zero_grad``, forward,
backward, ``step``) after warm-up steps that made the optimizer's state:

- ``torch``: the peak of the bytes held by live torch tensors, from the allocation and free
  events that torch's profiler records (``profile_memory=True``) during the step, added to what
  lived before it (params, state, inputs). Exact for tensors, blind to allocator slack and to
  memory outside torch; the same events as :func:`fuseopt.bench_probes.step_peak_bytes`.
  (``tracemalloc`` sees none of it: torch allocates outside Python's allocator; torch keeps no
  CPU allocator statistics.)
- ``rss``: the process's peak resident set during the step (Linux: ``VmHWM`` of
  ``/proc/self/status``, reset to the current RSS by writing 5 to ``/proc/self/clear_refs`` just
  before the step), what the OS holds for the whole process: it includes the interpreter and
  libraries, and memory glibc keeps after a free (a freed grad below glibc's mmap threshold may
  stay resident), so it moves with the torch number but not byte for byte. One process per run,
  so that neither mode inherits the other's heap.

Time: per step, the forward, the backward (with the steps inside, in that mode), ``opt.step()``
(a no-op in that mode) and, inside backward, the time spent in the per-param steps themselves
(each one timed around the step of its one-param group). The machine's load moves these by tens
of percent: compare runs of one invocation, and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

import fuseopt

__all__ = ["make_model", "measure", "run"]

MODES = ("normal", "inside")


class _GPT(torch.nn.Module):
    """A GPT-2-shaped decoder stack (pre-norm blocks, output layer tied to the embedding)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(
                dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.norm(h) @ self.tok.weight.t()  # (the tied output layer)


def make_model(
    vocab: int = 16384, dim: int = 768, layers: int = 12, heads: int = 12, seq: int = 64
) -> torch.nn.Module:
    """The benchmark's model: 12 blocks of GPT-2 small's width with a 16k vocabulary, 97.7M
    params in 148 tensors (``seq`` positions)."""
    return _GPT(vocab, dim, layers, heads, seq)


def _tensor_bytes(tensors) -> int:
    storages = {}
    for t in tensors:
        if torch.is_tensor(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(
    mode: str,
    iters: int = 3,
    warmup: int = 3,
    batch: int = 1,
    seq: int = 64,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """One run in this process: ``mode`` ``"normal"`` (``backward()``, then the fused
    ``opt.step()``) or ``"inside"`` (:func:`fuseopt.step_in_backward`), AdamW ``fused=True``, on
    ``threads`` threads (torch's and the kernels'; None: as they are).

    Returns the params' and state's bytes, the torch and RSS peaks of one step (see the module
    docstring) and the median seconds of ``iters`` timed steps per phase."""
    from torch.profiler import ProfilerActivity, profile

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = make_model(seq=seq)
    params = list(model.parameters())
    opt = fuseopt.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randint(0, 16384, (batch, seq + 1), generator=gen) for _ in range(4)]
    inner: list[float] = []
    if mode == "inside":
        handle = fuseopt.step_in_backward(opt)
        one = handle._step_one

        def timed(view):  # (the bench's own probe: each param's step, timed)
            t = time.perf_counter()
            one(view)
            inner.append(time.perf_counter() - t)

        handle._step_one = timed

    def step(i: int) -> tuple[float, float, float]:
        x = data[i % len(data)]
        opt.zero_grad()
        t0 = time.perf_counter()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    for i in range(warmup):
        step(i)
    phases, in_steps, faults = [], [], []
    for i in range(iters):
        inner.clear()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        phases.append(step(i))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        in_steps.append(sum(inner))
    state = [t for s in opt.state.values() for t in s.values()]
    held = _tensor_bytes(params) + _tensor_bytes(state)
    live = held + _tensor_bytes(data)
    # (the normal step's grads of the last step are freed first, outside the measured step: the
    # profiler did not see them made, and the RSS before the step must not count them)
    opt.zero_grad()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(0)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = rise = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        rise = max(rise, current)
    rss = rss_rise = None
    if os.access("/proc/self/clear_refs", os.W_OK):
        opt.zero_grad()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status("VmRSS")
        step(1)
        rss = _status("VmHWM")
        rss_rise = rss - before
    forward, backward, opt_step = (statistics.median(p[k] for p in phases) for k in range(3))
    in_backward = statistics.median(in_steps) if mode == "inside" else None
    malloc_env = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
    return dict(
        mode=mode, params=sum(p.numel() for p in params), tensors=len(params),
        params_state_bytes=held, torch_peak_bytes=live + rise, torch_rise_bytes=rise,
        rss_peak_bytes=rss, rss_rise_bytes=rss_rise, forward_s=forward, backward_s=backward,
        step_s=opt_step, steps_in_backward_s=in_backward,
        page_faults=statistics.median(faults), threads=torch.get_num_threads(), batch=batch,
        seq=seq, malloc_env=malloc_env,
    )  # fmt: skip


def run(
    repeats: int = 3,
    iters: int = 3,
    batch: int = 1,
    seq: int = 64,
    threads: int | None = None,
    env: dict[str, str] | None = None,
) -> list[dict]:
    """``repeats`` pairs of runs, one fresh process each, the modes alternating (so that a
    change of the machine's load falls on both); ``env`` is added to the processes' environment
    (glibc's ``MALLOC_*`` settings, say)."""
    rows = []
    child_env = dict(os.environ, **(env or {}))
    for r in range(repeats):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            args = [sys.executable, "-m", "fuseopt.bench_in_backward", "--child", mode]
            args += ["--iters", str(iters), "--batch", str(batch), "--seq", str(seq)]
            if threads is not None:
                args += ["--threads", str(threads)]
            out = subprocess.run(
                args, check=True, capture_output=True, text=True, env=child_env
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:,.0f}"


def format_rows(rows: list[dict]) -> str:
    """A table: one line per run, then the medians per mode."""
    head = (
        f"{'mode':<8}{'torch peak MiB':>16}{'rise MiB':>10}{'RSS peak MiB':>14}{'RSS rise':>10}"
        f"{'fwd ms':>8}{'bwd ms':>8}{'step() ms':>11}{'in-bwd steps ms':>17}{'faults':>9}"
    )
    lines = [head, "-" * len(head)]

    def line(label, r):
        return (
            f"{label:<8}{_mib(r['torch_peak_bytes']):>16}{_mib(r['torch_rise_bytes']):>10}"
            f"{_mib(r['rss_peak_bytes']):>14}{_mib(r['rss_rise_bytes']):>10}"
            f"{_ms(r['forward_s']):>8}{_ms(r['backward_s']):>8}{_ms(r['step_s']):>11}"
            f"{_ms(r['steps_in_backward_s']):>17}{r['page_faults']:>9,.0f}"
        )

    for r in rows:
        lines.append(line(r["mode"], r))
    lines.append("medians:")
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        med = {
            k: (statistics.median(r[k] for r in mine) if mine[0][k] is not None else None)
            for k in mine[0]
            if k.endswith(("_bytes", "_s", "faults"))
        }
        lines.append(line(mode, med))
    first = rows[0]
    lines.append(
        f"{first['params'] / 1e6:.1f}M params in {first['tensors']} tensors, AdamW fused=True, "
        f"batch {first['batch']} x {first['seq']} tokens, {first['threads']} threads; params and "
        f"state {first['params_state_bytes'] / 2**20:,.0f} MiB; faults: minor page faults per "
        f"step; {first['malloc_env'] or 'glibc malloc defaults'}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch's thread count")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="add to the environment of the runs (e.g. MALLOC_MMAP_THRESHOLD_=...)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="also print each run as JSON")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kwargs = dict(batch=args.batch, seq=args.seq, threads=args.threads)
        print(json.dumps(measure(args.child, args.iters, **kwargs)))
        return
    env = dict(item.split("=", 1) for item in args.env)
    rows = run(args.repeats, args.iters, args.batch, args.seq, args.threads, env)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    print(format_rows(rows))


if __name__ == "__main__":
    main()
