"""Benchmark ``optimizer.step()``: fuseopt's implementations side by side with torch.optim's.

``python -m fuseopt.bench`` (or ``fuseopt bench``) times every algorithm of :data:`ALGORITHMS` in
every implementation of :data:`IMPLEMENTATIONS` (for-loop, foreach, fused), for fuseopt and for
torch.optim, on the parameter shapes of real models (``workloads.json``: gpt2-small, resnet18,
many-small), in float32 (or ``--dtype``). It prints ms/step, each fuseopt implementation's time
relative to torch's best implementation, the memory of each library's optimizer state (MiB and
bytes per param: every tensor in ``optimizer.state`` after the warm-up steps), and the bytes moved
per param and effective memory bandwidth of the fastest fuseopt implementation.

Method: for each (workload, algorithm, implementation), torch's and fuseopt's optimizers are built
on fresh params (zeros) with small random grads; two warm-up steps each (the first compiles numba
kernels and creates state, the second runs the steady-state variant, e.g. SGD's momentum after its
first step); then ``steps`` steps of each, alternating between the two libraries, are timed with
:func:`time.perf_counter`, and the median is reported. Both are freed before the next pair is built
(Adam on gpt2-small holds ~2 GB per optimizer in float32). With ``--device cuda`` the params live
on the GPU and each timed step is bracketed by ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

import fuseopt
from fuseopt._console import Progress, check_output
from fuseopt.rule import Flags, Rule

__all__ = [
    "ALGORITHMS",
    "IMPLEMENTATIONS",
    "LIBRARIES",
    "build_parser",
    "environment",
    "format_table",
    "load_workloads",
    "main",
    "run",
    "state_bytes",
]


@dataclass(frozen=True)
class Algorithm:
    """One benchmarked algorithm: a class name that both fuseopt and torch.optim export.

    With ``max_grad_norm``, each step clips the grads to that global norm: fuseopt inside its
    step (the option of that name), torch as its users do, ``clip_grad_norm_(foreach=True)``
    just before its step; ``optimizer`` then names the class (``name`` is the row's). ``options``
    are fuseopt's alone (its storage formats, ``state_dtype=``): torch's columns time the plain
    class, the baseline those options are measured against."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    bytes_per_element: float = 0  # float32 bytes read + written per param element and step
    max_grad_norm: float | None = None
    optimizer: str = ""
    reference: str = ""  # the package timed in torch's columns where torch.optim lacks the class
    # fuseopt-only constructor options (storage formats): the torch columns time the plain class
    options: Mapping[str, Any] = field(default_factory=dict)
    # bytes read + written per element with bfloat16 params where the options make them other
    # than ``bytes_per_element`` halved (a compensation, float32 moments); 0: halved
    bf16_bytes: float = 0

    def make(self, library: str, params: list, flags: Mapping[str, Any]) -> Callable[[], Any]:
        """The step function of ``library``'s optimizer over ``params`` with ``flags``."""
        return self.build(library, params, flags)[1]

    def build(
        self, library: str, params: list, flags: Mapping[str, Any]
    ) -> tuple[Any, Callable[[], Any]]:
        """``library``'s optimizer over ``params`` with ``flags``, and its step function."""
        module = LIBRARIES[library]
        if library == "torch" and self.reference:
            if flags.get("fused"):
                raise TypeError(f"{self.reference} has no fused {self.name}")
            try:
                module = importlib.import_module(self.reference)
            except ImportError as e:
                raise TypeError(f"{self.reference} is not installed") from e
        cls = getattr(module, self.optimizer or self.name)
        if module is not LIBRARIES[library] and "foreach" not in inspect.signature(cls).parameters:
            # a reference with one implementation (lion-pytorch, prodigyopt): a for-loop
            if flags.get("foreach"):
                raise TypeError(f"{self.reference} has no foreach {self.name}")
            flags = {}
        extra = {} if library == "torch" else dict(self.options)
        if self.max_grad_norm is not None and library == "fuseopt":
            extra["max_grad_norm"] = self.max_grad_norm
        opt = cls(params, **self.kwargs, **flags, **extra)
        if callable(getattr(opt, "train", None)):  # Schedule-Free steps only in train mode
            opt.train()
        if self.max_grad_norm is None or library == "fuseopt":
            return opt, opt.step

        def clipped_step() -> None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
            opt.step()

        return opt, clipped_step

    def moved_per_element(self, library: str, dtype: torch.dtype = torch.float32) -> float | None:
        """Bytes ``library``'s step reads and writes per param element with params of
        ``dtype``: the row's own for fuseopt; for torch, whose columns time the plain class,
        that class's row's where the row has storage options (None where no row names it)."""
        if library == "torch" and self.options:
            plain = ALGORITHMS.get(self.optimizer or self.name)
            known = plain is not None and not plain.options
            return plain.moved_per_element(library, dtype) if known else None
        if dtype == torch.bfloat16 and self.bf16_bytes:
            return self.bf16_bytes
        return (self.bytes_per_element * dtype.itemsize / 4) or None  # (0: not counted)


BF16_STATES = {"state_dtype": torch.bfloat16}
STATE_BITS_8 = {"state_bits": 8}  # (params under 4,096 elements keep float32 states)

# One line per algorithm. bytes_per_element counts the tensors a fused kernel must stream.
ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("SGD", {"lr": 1e-3, "momentum": 0.9}, 5 * 4),  # read p, g, buf; write p, buf
        Algorithm("Adam", {"lr": 1e-3}, 7 * 4),  # read p, g, m, v; write p, m, v
        Algorithm("AdamW", {"lr": 1e-3}, 7 * 4),  # as Adam (the decay reads p, already counted)
        Algorithm("Adadelta", {}, 7 * 4),  # read p, g, square_avg, acc_delta; write three
        Algorithm("Adagrad", {}, 5 * 4),  # read p, g, sum; write p, sum
        Algorithm("Adamax", {}, 7 * 4),  # read p, g, exp_avg, exp_inf; write three
        Algorithm("ASGD", {}, 5 * 4),  # read p, g, ax; write p, ax
        Algorithm("NAdam", {}, 7 * 4),  # as Adam
        Algorithm("RAdam", {}, 7 * 4),  # as Adam
        Algorithm("RMSprop", {}, 5 * 4),  # read p, g, square_avg; write p, square_avg
        Algorithm("Rprop", {}, 7 * 4),  # read p, g, prev, step_size; write three
        # + one read of the grads for their norm (torch: that read, then a read and a write)
        Algorithm("AdamW+clip", {"lr": 1e-3}, 8 * 4, max_grad_norm=1.0, optimizer="AdamW"),
        # bfloat16 moments (state_dtype): read p, g (4 bytes each), m, v (2); write p (4), m, v (2)
        # (with bfloat16 params: AdamW's 14)
        Algorithm(
            "AdamW+bf16",
            {"lr": 1e-3},
            20,
            optimizer="AdamW",
            options=BF16_STATES,
            bf16_bytes=7 * 2,
        ),
        Algorithm(
            "AdamW+bf16+SR",
            {"lr": 1e-3},
            20,
            optimizer="AdamW",
            options={**BF16_STATES, "stochastic_rounding": True},
            bf16_bytes=7 * 2,
        ),
        # 8-bit moments (state_bits=8): read p, g (4 bytes each), m, v (1); write p (4), m, v
        # (1); and each block's two float32 absmax, read and written (16 bytes per 256 elements);
        # bfloat16 params: p, g, p' 2 bytes each
        Algorithm(
            "AdamW+8bit",
            {"lr": 1e-3},
            16 + 16 / 256,
            optimizer="AdamW",
            options=STATE_BITS_8,
            bf16_bytes=3 * 2 + 4 + 16 / 256,
        ),
        # options for bfloat16 params (with float32 params they change nothing: 28 bytes). Kahan
        # summation: read p, g, m, v, compensation; write p, m, v, compensation (2 bytes each)
        Algorithm(
            "AdamW+kahan",
            {"lr": 1e-3},
            7 * 4,
            optimizer="AdamW",
            options={"kahan_sum": True},
            bf16_bytes=9 * 2,
        ),
        # the param's store rounded stochastically: as AdamW
        Algorithm(
            "AdamW+SR",
            {"lr": 1e-3},
            7 * 4,
            optimizer="AdamW",
            options={"stochastic_rounding": True},
        ),
        # float32 moments of bfloat16 params: read p, g (2 bytes each), m, v (4); write p (2),
        # m, v (4)
        Algorithm(
            "AdamW+f32",
            {"lr": 1e-3},
            7 * 4,
            optimizer="AdamW",
            options={"state_dtype": torch.float32},
            bf16_bytes=3 * 2 + 4 * 4,
        ),
        # a first pass reads p and g for their norms; then read p, g, buf; write p, buf
        Algorithm("LARS", {"lr": 1e-3}, 7 * 4, reference="pytorch_optimizer"),
        # a first pass reads p, g, m, v for the norms; then read them again, write p, m, v
        Algorithm("Lamb", {"lr": 1e-3}, 11 * 4, reference="pytorch_optimizer"),
        # beyond torch.optim (issue 18); the torch columns time the reference package
        # read p, g, m; write p, m
        Algorithm("Lion", {"lr": 1e-4}, 5 * 4, reference="lion_pytorch"),
        # read p, g, m, v; write p, m, v (the first step writes only v)
        Algorithm("ADOPT", {"lr": 1e-3}, 7 * 4, reference="pytorch_optimizer"),
        # read p, g, m, v, diff, previous grad; write all but g
        Algorithm("Adan", {"lr": 1e-3}, 11 * 4, reference="pytorch_optimizer"),
        # read p, g, m, v, slow; write p, m, v, slow
        Algorithm("AdEMAMix", {"lr": 1e-3}, 9 * 4, reference="pytorch_optimizer"),
        # read p, g, z(, v); write p, z(, v)
        Algorithm("SGDScheduleFree", {"lr": 1e-3}, 5 * 4, reference="schedulefree"),
        Algorithm("AdamWScheduleFree", {"lr": 1e-3}, 7 * 4, reference="schedulefree"),
        Algorithm("RAdamScheduleFree", {"lr": 1e-3}, 7 * 4, reference="schedulefree"),
        # a first pass reads p, g, s, p0 for <g, p0 - p> and |s|; then read p, g, s, p0, m, v;
        # write p, s, m, v
        Algorithm("Prodigy", {}, 14 * 4, reference="prodigyopt"),
    )
}

# The constructor flags that select an implementation, the same for fuseopt and torch.optim.
IMPLEMENTATIONS: dict[str, dict[str, bool]] = {
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}

LIBRARIES: dict[str, Any] = {"torch": torch.optim, "fuseopt": fuseopt}

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

QUICK_WORKLOADS = ("many-small", "resnet18")
QUICK_STEPS = 3
DEFAULT_STEPS = 10
WARMUP_STEPS = 2
# bytes a step moves above which each round of timed steps gets its own bandwidth pass
CALIBRATE_EACH_ROUND_ABOVE = 64 << 20


# ------------------------------------------------------------------------------------ workloads
def load_workloads() -> dict[str, list[tuple[int, ...]]]:
    """The named workloads of ``workloads.json``: name -> list of parameter shapes."""
    text = resources.files("fuseopt").joinpath("workloads.json").read_text()
    return {
        name: [tuple(p["shape"]) for p in spec["params"]] for name, spec in json.loads(text).items()
    }


def _resolve(
    workloads: Iterable[str] | Mapping[str, Sequence[Sequence[int]]] | None,
) -> dict[str, list[tuple[int, ...]]]:
    """Workload names (or a name -> shapes mapping, used as given) to name -> shapes."""
    if isinstance(workloads, str):
        workloads = [workloads]
    if isinstance(workloads, Mapping):
        return {name: [tuple(s) for s in shapes] for name, shapes in workloads.items()}
    known = load_workloads()
    names = list(known) if workloads is None else list(workloads)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown workload {unknown[0]!r}; valid workloads: {', '.join(known)}")
    return {n: known[n] for n in names}


def _pick(names: Iterable[str] | None, table: Mapping[str, Any], what: str) -> list[str]:
    """Validate ``names`` against ``table`` (case-insensitively); None means all, in table order."""
    if names is None:
        return list(table)
    if isinstance(names, str):
        names = [names]
    lower = {k.lower(): k for k in table}
    picked = []
    for name in names:
        if name.lower() not in lower:
            raise ValueError(f"unknown {what} {name!r}; valid {what}s: {', '.join(table)}")
        picked.append(lower[name.lower()])
    return picked


# ------------------------------------------------------------------------------------- timing
def _make_params(
    shapes: list[tuple[int, ...]],
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
        p.grad = torch.randn(shape, generator=gen).mul_(1e-3).to(device, dtype)
        params.append(p)
    return params


def state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, step counters, 8-bit codes and
    their scales, ...): the memory the optimizer's state holds. A tensor held twice counts once.
    """
    seen: set[int] = set()
    total = 0
    stack = list(optimizer.state.values())
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            if id(value) not in seen:
                seen.add(id(value))
                total += value.nbytes
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return total


def _synchronizer(device: str):
    """What waits for the device's queued work (a CUDA step returns before it runs)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _time_pair(
    algorithm: Algorithm,
    impl: str,
    shapes: list[tuple[int, ...]],
    steps: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    calibration: _Calibration | None = None,
    calibrate_each_round: bool = False,
) -> dict[str, Any]:
    """Seconds per step of ``steps`` timed steps for each library, after the warm-up steps.

    Both libraries' optimizers live at once and their steps alternate, so that a slow spell of a
    shared machine (memory bandwidth here drifts by tens of percent) hits both alike. A library
    whose optimizer cannot be built or stepped gets the exception instead of times. With
    ``calibration``, a bandwidth pass runs just before and just after the timed steps, or before
    each round of steps with ``calibrate_each_round``: ``"calibration"`` holds the GB/s the
    machine gave then. ``"state_bytes"`` maps each library that ran to :func:`state_bytes` of its
    optimizer after the warm-up steps.
    """
    opts: dict[str, Any] = {}
    results: dict[str, Any] = {"state_bytes": {}}
    try:
        for library in LIBRARIES:
            try:
                opt, step = algorithm.build(
                    library, _make_params(shapes, dtype=dtype, device=device),
                    IMPLEMENTATIONS[impl],
                )  # fmt: skip
                for _ in range(WARMUP_STEPS):
                    step()
                size = state_bytes(opt)
            except (RuntimeError, ValueError, TypeError) as e:
                results[library] = e
            else:
                opts[library] = step
                results[library] = []
                results["state_bytes"][library] = size
            finally:
                # the step function keeps a working optimizer alive; a failed one is freed now
                opt = step = None
        sync = _synchronizer(device)
        # Calibrate just before and after the timed steps; between rounds only for steps larger
        # than the caches (a calibration pass evicts them: small workloads would be timed cold).
        gbps = [calibration()] if calibration is not None else []
        for _ in range(steps):
            if calibrate_each_round and calibration is not None:
                gbps.append(calibration())
            for library, step in opts.items():
                sync()
                start = time.perf_counter()
                step()
                sync()
                results[library].append(time.perf_counter() - start)
        if calibration is not None:
            results["calibration"] = [*gbps, calibration()]
        return results
    finally:
        # Free the state and tensors now: the next pair may need the memory (gpt2-small).
        opts.clear()
        gc.collect()


def run(
    workloads: Iterable[str] | Mapping[str, Sequence[Sequence[int]]] | None = None,
    algorithms: Iterable[str] | None = None,
    impls: Iterable[str] | None = None,
    steps: int = DEFAULT_STEPS,
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Time every (workload, algorithm, library, implementation); return one dict per result.

    Args:
        workloads: names from ``workloads.json``, or a mapping name -> list of shapes (e.g.
            ``{"tiny": [[10, 10], [5]]}``); None means all named workloads.
        algorithms: names from :data:`ALGORITHMS`; None means all.
        impls: names from :data:`IMPLEMENTATIONS`; None means all.
        steps: timed steps per configuration (after the warm-up steps).
        dtype: of params, grads and states (float32, float64, bfloat16, float16).
        progress: show a progress bar on stderr (tqdm's if installed, else one line per
            configuration).
        device: where the params live (``"cpu"``, ``"cuda"``).

    Each row has ``workload, algorithm, library, impl, numel, tensors, steps, ms`` (median ms/step),
    ``times_ms``, ``ratio`` (``ms`` over the best torch ``ms`` of the same workload and algorithm),
    ``gbps`` (effective GB/s: ``moved_bytes_per_param`` times ``numel`` per step),
    ``moved_bytes_per_param`` (bytes a step reads and writes per param element, None where the
    bench does not know them), ``state_bytes`` (:func:`state_bytes` of the optimizer after the
    warm-up steps), ``state_mib`` (the same in MiB), ``state_bytes_per_param`` (``state_bytes /
    numel``) and ``error`` (None, or why the implementation could not run; then ``ms``, ``ratio``,
    ``gbps`` and the state's sizes are None).

    Raises:
        ValueError: an unknown workload, algorithm or implementation name, or ``steps < 1``.
    """
    shapes_by_name = _resolve(workloads)
    algos = _pick(algorithms, ALGORITHMS, "algorithm")
    impl_names = _pick(impls, IMPLEMENTATIONS, "implementation")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    total = len(shapes_by_name) * len(algos) * len(LIBRARIES) * len(impl_names)
    # Updated between timed pairs only, so drawing the bar never falls inside a timed step.
    bar = Progress(total, "bench", enabled=progress)
    calibration = _Calibration(device)
    rows: list[dict[str, Any]] = []
    for workload, shapes in shapes_by_name.items():
        numel = sum(math.prod(s) for s in shapes)
        for algo_name in algos:
            algorithm = ALGORITHMS[algo_name]
            group = []
            per_element = {
                library: algorithm.moved_per_element(library, dtype) for library in LIBRARIES
            }
            moved = numel * per_element["fuseopt"]
            # Bandwidth drifts within seconds here: a step far larger than the caches is paired
            # with a pass of its own; a smaller one would then be timed cold, so it is not.
            each_round = moved > CALIBRATE_EACH_ROUND_ABOVE
            for impl in impl_names:
                timed = _time_pair(
                    algorithm, impl, shapes, steps, dtype, device, calibration, each_round
                )
                for library in LIBRARIES:
                    row: dict[str, Any] = dict(
                        workload=workload,
                        algorithm=algo_name,
                        dtype=str(dtype)[6:],
                        library=library,
                        impl=impl,
                        numel=numel,
                        tensors=len(shapes),
                        steps=steps,
                        ms=None,
                        times_ms=[],
                        ratio=None,
                        gbps=None,
                        bandwidth_gbps=statistics.median(timed["calibration"]),
                        moved_bytes_per_param=per_element[library],
                        state_bytes=None,
                        state_mib=None,
                        state_bytes_per_param=None,
                        error=None,
                    )
                    times = timed[library]
                    if isinstance(times, Exception):
                        # A library without this implementation (e.g. no fused kernel for a
                        # later algorithm): report it in the table rather than abort the run.
                        row["error"] = f"{type(times).__name__}: {times}"
                    else:
                        row["times_ms"] = [t * 1e3 for t in times]
                        row["ms"] = statistics.median(row["times_ms"])
                        if per_element[library] is not None:
                            row["gbps"] = numel * per_element[library] / (row["ms"] * 1e6)
                        size = timed["state_bytes"][library]
                        row["state_bytes"], row["state_mib"] = size, size / 2**20
                        row["state_bytes_per_param"] = size / numel if numel else None
                    group.append(row)
                    result = f"{row['ms']:.3f} ms/step" if row["error"] is None else "n/a"
                    bar.update(note=f"{workload} {algo_name} {library} {impl}: {result}")
            torch_ms = [r["ms"] for r in group if r["library"] == "torch" and r["ms"] is not None]
            if torch_ms:
                for r in group:
                    if r["ms"] is not None:
                        r["ratio"] = r["ms"] / min(torch_ms)
            rows.extend(group)
    bar.close()
    return rows


class _ReadModifyWrite(Rule):
    """The calibration pass: ``param += grad`` (read two buffers, write one), no step count."""

    has_step = False

    def update(self, ops, f, s, param, grad):
        return dict(param=param + grad)


class _Calibration:
    """A fused read-modify-write pass (the optimizers' own kernel machinery, 12 bytes per
    element) over float32 buffers far larger than the caches; calling it returns the GB/s of one
    pass: the bandwidth an elementwise optimizer step could have had at that moment."""

    def __init__(self, device: str = "cpu", numel: int = 1 << 24) -> None:
        from fuseopt._plan import kernel_launch
        from fuseopt.kernels import numba_cpu, triton_gpu

        cuda = torch.device(device).type == "cuda"
        self.backend = triton_gpu if cuda else numba_cpu
        self.a, self.b = torch.ones(numel, device=device), torch.ones(numel, device=device)
        self.sync, self.rule = _synchronizer(device), _ReadModifyWrite()
        self.launch = kernel_launch(
            self.rule, Flags(), {}, [self.a], [self.b], {}, "triton" if cuda else "numba"
        )
        self()  # the first pass compiles (or loads) the kernel

    def __call__(self) -> float:
        self.sync()
        start = time.perf_counter()
        self.backend.run(self.launch)
        self.sync()
        return 12 * self.a.numel() / (time.perf_counter() - start) / 1e9


def measure_bandwidth(numel: int = 1 << 25, repeats: int = 7, device: str = "cpu") -> float:
    """Memory bandwidth in GB/s: the best of ``repeats`` passes of :class:`_Calibration` (the
    floor any elementwise optimizer step meets)."""
    calibration = _Calibration(device, numel)
    return max(calibration() for _ in range(repeats))


# -------------------------------------------------------------------------------------- report
def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "n/a"
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _fastest(rows: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The row of least ``ms`` among those that ran (None if none did)."""
    ran = [r for r in rows if r and r["ms"] is not None]
    return min(ran, key=lambda r: r["ms"]) if ran else None


def format_table(rows: list[dict[str, Any]], bandwidth: float | None = None) -> str:
    """The results as a text table: one line per (workload, algorithm).

    ``state MiB`` and ``state B/param`` give the optimizer state of torch's fastest and
    fuseopt's fastest implementation (every tensor in ``optimizer.state`` after the warm-up
    steps, step counters included; per param element); ``moved`` the bytes the fastest fuseopt
    step reads and writes per param element, from which ``GB/s`` is computed. With
    ``bandwidth`` (GB/s, :func:`measure_bandwidth`), a last column gives the fastest fuseopt
    time over the bandwidth bound (bytes moved per step / bandwidth).
    """
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    index = {(r["workload"], r["algorithm"], r["library"], r["impl"]): r for r in rows}
    keys = list(dict.fromkeys((r["workload"], r["algorithm"]) for r in rows))
    w_name = max([len("workload"), *(len(w) for w, _ in keys)])
    w_algo = max([len("algorithm"), *(len(a) for _, a in keys)])
    sections = ("torch ms/step", "fuseopt ms/step", "fuseopt / torch best")
    states = ("state MiB", "state B/param")
    # Columns wide enough for the impl names, and for the section titles over few columns.
    w = max(9, *(len(i) for i in impls), -(-(max(map(len, sections)) + 1) // len(impls)) - 1)
    block = len(impls) * (w + 1) - 1
    w_s = 7  # each state column (torch, fuseopt)
    fastest = [f"{'impl':>{w}}", f"{'moved':>5}", f"{'GB/s':>6}"]
    if bandwidth:
        fastest.append(f"{'x bound':>7}")
    head1 = " ".join(
        [
            " " * w_name,
            " " * w_algo,
            *(f"{s:^{block}}" for s in sections),
            *(f"{s:^{2 * w_s + 1}}" for s in states),
            f"{'fastest fuseopt':^{len(' '.join(fastest))}}",
        ]
    )
    head2 = " ".join(
        [
            f"{'workload':<{w_name}}",
            f"{'algorithm':<{w_algo}}",
            *(f"{i:>{w}}" for _ in sections for i in impls),
            *(f"{lib:>{w_s}}" for _ in states for lib in LIBRARIES),
            *fastest,
        ]
    )
    lines = [head1, head2, "-" * len(head2)]
    for workload, algo in keys:
        cells = [f"{workload:<{w_name}}", f"{algo:<{w_algo}}"]
        for library in ("torch", "fuseopt"):
            for impl in impls:
                r = index.get((workload, algo, library, impl))
                cells.append(f"{_fmt_ms(r and r['ms']):>{w}}")
        for impl in impls:
            r = index.get((workload, algo, "fuseopt", impl))
            ratio = r and r["ratio"]
            cells.append(f"{'n/a' if ratio is None else f'{ratio:.2f}x':>{w}}")
        best = {
            library: _fastest(index.get((workload, algo, library, i)) for i in impls)
            for library in LIBRARIES
        }
        for library in LIBRARIES:
            mib = best[library] and best[library]["state_mib"]
            cells.append(f"{_fmt_ms(mib):>{w_s}}")
        for library in LIBRARIES:
            per = best[library] and best[library]["state_bytes_per_param"]
            cells.append(f"{'n/a' if per is None else f'{per:.2f}':>{w_s}}")
        ours = best["fuseopt"]
        moved = ours and ours["moved_bytes_per_param"]
        gbps = ours and ours["gbps"]
        cells.append(f"{ours['impl'] if ours else 'n/a':>{w}}")
        cells.append(f"{'n/a' if moved is None else f'{moved:.3g}':>5}")
        cells.append(f"{'n/a' if gbps is None else f'{gbps:.1f}':>6}")
        if bandwidth:
            # the bandwidth measured around this row's steps where the run has it
            bw = ours and (ours.get("bandwidth_gbps") or bandwidth)
            cells.append(f"{'n/a':>7}" if not gbps else f"{bw / gbps:>6.2f}x")
        lines.append(" ".join(cells))
    # torch has fused kernels for few algorithms: one line for those, then any other failure
    no_fused = [
        r for r in rows if r["error"] and "unexpected keyword argument 'fused'" in r["error"]
    ]
    if no_fused:
        names = ", ".join(dict.fromkeys(f"{r['algorithm']}" for r in no_fused))
        lines.append(f"n/a: {no_fused[0]['library']} has no fused implementation of {names}")
    lines.extend(
        f"n/a: {r['workload']} {r['algorithm']} {r['library']} {r['impl']}: {r['error']}"
        for r in rows
        if r["error"] and r not in no_fused
    )
    for name in dict.fromkeys(r["algorithm"] for r in rows):
        algorithm = ALGORITHMS.get(name)
        if algorithm is not None and algorithm.reference:
            lines.append(f"{name}: torch.optim has none; its torch columns time "
                         f"{algorithm.reference}'s")  # fmt: skip
    return "\n".join(lines)


def environment(device: str = "cpu") -> dict[str, Any]:
    """What the numbers depend on: versions, CPU (or GPU), threads."""
    try:
        import numba

        numba_version = numba.__version__
    except ImportError:
        numba_version = None
    return dict(
        fuseopt=fuseopt.__version__,
        torch=torch.__version__,
        numba=numba_version,
        python=platform.python_version(),
        machine=platform.machine(),
        processor=platform.processor(),
        torch_threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        device=torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
    )


# ----------------------------------------------------------------------------------------- CLI
def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``python -m fuseopt.bench`` / ``fuseopt bench``."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m fuseopt.bench",
        description="Time optimizer.step() of fuseopt against torch.optim.",
    )
    parser.add_argument(
        "--workloads",
        type=_csv,
        help=f"comma-separated workloads (default: all): {', '.join(load_workloads())}",
    )
    parser.add_argument(
        "--algorithms",
        type=_csv,
        help=f"comma-separated algorithms (default: all): {', '.join(ALGORITHMS)}",
    )
    parser.add_argument(
        "--impls",
        type=_csv,
        help=f"comma-separated implementations (default: all): {', '.join(IMPLEMENTATIONS)}",
    )
    parser.add_argument(
        "--steps", type=int, help=f"timed steps per configuration (default: {DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads(N) before timing; numba follows torch (default: torch's). "
        "On a busy machine, 1 thread avoids timing the scheduler instead of the optimizer",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="dtype of params, grads and states (default: float32)",
    )
    parser.add_argument(
        "--probes",
        action="store_true",
        help="also measure, on the first workload: the extra memory of a step (fuseopt fused, "
        "torch foreach/fused), the first step of a new process, a step right after a matmul",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the params live (default: cpu); cuda times the Triton kernels",
    )
    parser.add_argument("--json", metavar="PATH", help="also write all results as JSON to PATH")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{' and '.join(QUICK_WORKLOADS)} only, {QUICK_STEPS} steps "
        "(explicit --workloads/--steps still win)",
    )
    return parser


def _check_device(device: str) -> None:
    """Raise a ValueError naming --device unless ``device`` is the CPU or a CUDA device here."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device!r}: this torch sees no CUDA device")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {device!r}: CUDA devices here are cuda:0..cuda:{count - 1}")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry point: run the benchmark, print the table, optionally write JSON."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    workloads = args.workloads or (list(QUICK_WORKLOADS) if args.quick else None)
    steps = args.steps if args.steps is not None else QUICK_STEPS if args.quick else DEFAULT_STEPS
    try:
        # Validate names up front: a typo should fail now, not after minutes of timing.
        _resolve(workloads)
        _pick(args.algorithms, ALGORITHMS, "algorithm")
        _pick(args.impls, IMPLEMENTATIONS, "implementation")
        if steps < 1:
            raise ValueError(f"--steps must be at least 1, got {steps}")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        cpus = os.cpu_count() or 1
        if args.threads is not None and args.threads > cpus:  # 100000 threads crash torch
            raise ValueError(f"--threads must be at most {cpus} (the CPUs), got {args.threads}")
        _check_device(args.device)
        if args.json:
            check_output(args.json, "--json")
    except ValueError as e:
        parser.error(str(e))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(args.device)  # before the run: the load average must not count the benchmark
    if env["load_average"] is not None and env["load_average"] >= 1.0:
        # Each parallel region waits for its slowest thread: when another process holds a core,
        # every region of every step waits for a time slice (torch runs one region per tensor
        # and op, numba one per step), so the timings measure the scheduler, not the optimizer.
        print(
            f"warning: load average {env['load_average']:.1f} on {env['cpus']} CPUs; "
            "other processes will make the timings noisy (try --threads 1)",
            file=sys.stderr,
        )
    env["bandwidth_gbps"] = measure_bandwidth(device=args.device)
    dtype = DTYPES[args.dtype]
    rows = run(workloads, args.algorithms, args.impls, steps, dtype=dtype, device=args.device)
    print(
        f"optimizer.step(), {args.dtype}{'' if args.device == 'cpu' else ' on ' + env['device']}, "
        f"median of {steps} steps; torch {env['torch']}, "
        f"numba {env['numba']}, {env['torch_threads']} threads; bandwidth {env['bandwidth_gbps']:.1f} "
        "GB/s at the start (x bound: fastest fuseopt time / time of its bytes at the bandwidth "
        "measured around its steps; moved: bytes its step reads and writes per param; state: "
        "every tensor in optimizer.state after the warm-up steps, of torch's and fuseopt's "
        "fastest implementation)"
    )
    print(format_table(rows, env["bandwidth_gbps"]))
    probes = None
    if args.probes:
        from fuseopt import bench_probes

        first = next(iter(_resolve(workloads).items()))
        algos = {n: ALGORITHMS[n] for n in _pick(args.algorithms, ALGORITHMS, "algorithm")}
        probes = bench_probes.run_probes(first[1], algos, dtype)
        print(f"\nprobes on {first[0]}, {args.dtype}:")
        print(bench_probes.format_probes(probes))
    if args.json:
        try:
            with open(args.json, "w") as f:
                result = {"environment": env, "steps": steps, "results": rows, "probes": probes}
                json.dump(result, f, indent=1)
                f.write("\n")
        except OSError as e:  # checked at the start, but the disk may have changed since
            print(f"{parser.prog}: error: cannot write --json: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
