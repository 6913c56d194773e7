"""Fused CPU backend: a rule's traced graph compiled into one parallel numba kernel.

One launch covers every tensor of a batch: the kernel gets a table of data pointers (operand x
tensor), a table of chunks ``(tensor, start, stop)`` that it walks with ``prange``, and the host
scalars as a float64 array read at run time. Generated sources are written to a cache directory
and compiled with ``cache=True``, so a new process loads the machine code instead of compiling.
Set ``FUSEOPT_CACHE_DIR`` to choose that directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from functools import cache, lru_cache

import numpy as np
import torch

from fuseopt.kernels.trace import Graph, trace

CHUNK = 1 << 16  # elements per work item: large enough to amortise, small enough to balance threads
SERIAL_BELOW = CHUNK  # steps over fewer elements (all tensors together) run on one thread
# param dtype -> (how the kernel reads the storage, the type it computes in). 16-bit floats are
# read as their bits and widened in registers: math in float32, one rounding back per store.
DTYPES = {
    torch.float32: ("float32", "float32"),
    torch.float64: ("float64", "float64"),
    torch.bfloat16: ("bf16", "float32"),
    torch.float16: ("f16", "float32"),
}


@cache
def available() -> bool:
    """Whether numba can be imported."""
    return importlib.util.find_spec("numba") is not None


def supports(dtype: torch.dtype) -> bool:
    """Whether this backend has kernels for params of ``dtype`` (on CPU)."""
    return dtype in DTYPES


# ------------------------------------------------------------------------------------- codegen
def _expr(op: str, a: list[str], T: str) -> str:
    if op == "neg":
        return f"-{a[0]}"
    if op in ("add", "sub", "mul", "div"):
        return f"{a[0]} {dict(add='+', sub='-', mul='*', div='/')[op]} {a[1]}"
    if op == "fma":
        return f"fma({a[0]}, {a[1]}, {a[2]})"
    if op == "lerp":
        return f"lerp({a[0]}, {a[1]}, {a[2]}, ONE)"
    if op == "sign":
        return f"sign({a[0]}, ONE, ZERO)"
    if op in ("sqrt", "maximum", "minimum", "clamp", "abs"):
        return f"{op}({', '.join(a)})"
    if op in ("gt", "lt", "eq"):
        return f"{a[0]} {dict(gt='>', lt='<', eq='==')[op]} {a[1]}"
    if op == "where":
        return f"{a[1]} if {a[0]} else {a[2]}"
    raise ValueError(f"numba backend: unknown op {op!r}")


def _exact(graph: Graph, dtype: torch.dtype) -> set[int]:
    """Nodes whose value a tensor of ``dtype`` holds exactly: a loaded operand, a constant it can
    represent, a sign change or select among such. Storing them needs no rounding."""
    exact: set[int] = set()
    for i, (op, args) in enumerate(graph.nodes):
        if (
            op == "input"
            or (op == "const" and float(torch.tensor(args[0], dtype=dtype)) == args[0])
            or (op in ("neg", "abs") and args[0] in exact)
            or (op == "where" and args[1] in exact and args[2] in exact)
        ):
            exact.add(i)
    return exact


def source(graph: Graph, operands: tuple[str, ...], dtype: torch.dtype) -> str:
    """Python source of the kernel for ``graph`` on tensors of ``dtype`` (a key of ``DTYPES``)."""
    storage, compute = DTYPES[dtype]
    T = f"np.{compute}"
    if storage in ("bf16", "f16"):
        pointer, load, store = "uint16", f"load_{storage}({{}})", f"store_{storage}({{}})"
    else:
        pointer, load, store = storage, "{}", "{}"
    hoisted = [f"    ONE = {T}(1.0)", f"    ZERO = {T}(0.0)"]
    body, arrays = [], []
    for i, (op, args) in enumerate(graph.nodes):
        if op == "input":
            k = operands.index(args[0])
            arrays.append(
                f"        a{k} = numba.carray(PTR(ptrs[{k}, t] + lo * SIZE), n)  # {args[0]}"
            )
            body.append(f"            v{i} = {load.format(f'a{k}[j]')}")
        elif op == "scalar":
            hoisted.append(
                f"    v{i} = {T}(scal[{list(graph.scalars).index(args[0])}])  # {args[0]}"
            )
        elif op == "const":
            hoisted.append(f"    v{i} = {T}({args[0]!r})")
        else:
            body.append(f"            v{i} = {_expr(op, [f'v{x}' for x in args], T)}")
    # bfloat16's rounding costs more vector instructions than most update rules: skip it where
    # the value is already a bfloat16 (Rprop's ``prev`` is the grad or 0)
    exact = _exact(graph, dtype) if storage == "bf16" else set()
    for name, node in graph.outputs.items():
        put = "store_bf16_exact({})" if node in exact else store
        body.append(f"            a{operands.index(name)}[j] = {put.format(f'v{node}')}")
    loop = [
        "        t = chunks[c, 0]",
        "        lo = chunks[c, 1]",
        "        n = chunks[c, 2] - lo",
        # Arrays start at the chunk and the loop at 0: numba then knows j >= 0 (no wraparound
        # code), and LLVM vectorises the loop.
        *arrays,
        "        for j in range(n):",
        *body,
    ]
    return "\n".join(
        [
            "# Generated by fuseopt.kernels.numba_cpu; do not edit.",
            "import numba",
            "import numpy as np",
            "from fuseopt.kernels._numba_ops import clamp, fma, lerp, maximum, minimum, sign, sqrt",
            *(
                [f"from fuseopt.kernels._numba_ops import load_{storage}, store_{storage}"]
                if pointer == "uint16"
                else []
            ),
            *(["from fuseopt.kernels._numba_ops import store_bf16_exact"] if exact else []),
            f"from fuseopt.kernels._numba_ops import ptr_{pointer} as PTR",
            "",
            "",
            '@numba.njit(parallel=True, cache=True, nogil=True, error_model="numpy")',
            "def kernel(ptrs, chunks, scal):",
            f"    SIZE = {dtype.itemsize}",
            *hoisted,
            "    for c in numba.prange(chunks.shape[0]):",
            *loop,
            "",
        ]
    )


def cache_dir() -> str:
    """Where generated kernel sources and numba's compiled code live."""
    path = os.environ.get("FUSEOPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fuseopt", "kernels"
    )
    try:
        os.makedirs(path, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = os.path.join(tempfile.gettempdir(), f"fuseopt-kernels-{os.getuid()}")
    os.makedirs(path, exist_ok=True)
    return path


@cache
def import_source(src: str, prefix: str):
    """Write generated ``src`` to :func:`cache_dir` (once; the name hashes the source) and import
    it as a module (kernel compilers read real files: numba's cache, Triton's ``inspect``)."""
    name = prefix + hashlib.sha1(src.encode()).hexdigest()[:20]
    path = os.path.join(cache_dir(), name + ".py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(src)
        os.replace(tmp, path)  # atomic: concurrent processes never see a half-written file
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if os.environ.get("FUSEOPT_DUMP_KERNELS"):
        print(f"fuseopt: kernel {path}", file=sys.stderr)
    return module


@cache
def kernel(rule, flags, operands: tuple[str, ...], dtype: torch.dtype):
    """The compiled kernel for ``rule`` with ``flags`` on ``operands`` of ``dtype``, and the names
    of the scalars it takes, in order."""
    graph = trace(rule, flags, operands)
    return import_source(source(graph, operands, dtype), "fuseopt_kernel_").kernel, tuple(
        graph.scalars
    )


# -------------------------------------------------------------------------------------- launch
@lru_cache(maxsize=256)
def chunk_table(numels: tuple[int, ...], chunk: int = CHUNK) -> np.ndarray:
    """``(tensor, start, stop)`` rows of at most ``chunk`` elements covering every tensor once,
    in order (the work items of a launch; also the Triton backend's)."""
    sizes = np.asarray(numels, dtype=np.int64)
    counts = -(-sizes // chunk)
    tensor = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.arange(len(tensor), dtype=np.int64) - first) * chunk
    stop = np.minimum(start + chunk, sizes[tensor])
    return np.ascontiguousarray(np.stack([tensor, start, stop], axis=1))


# numba picks its threading layer (tbb, else OpenMP, else workqueue). Measured here in a loop of
# torch matmuls and steps (resnet18, Adam, 2 cores), OpenMP kept pace with torch's fused step while
# workqueue was ~30% slower. workqueue cannot run two kernels at once: launches are serialised.
_launch_lock = threading.Lock()


def _launch(fn, *args, serial: bool = False) -> None:
    """Run ``fn`` with torch's thread count (``torch.set_num_threads``), never more; on one
    thread if ``serial`` (a small step: waking the pool would cost more than it saves)."""
    import numba

    wanted = torch.get_num_threads()
    n = 1 if serial else max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    fn(*args)
    # numba's OpenMP layer shares torch's OpenMP runtime and resets its thread count when it
    # starts (and may again): put torch's back, or a torch.set_num_threads(1) would be lost.
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


def bump_steps(steps: list[torch.Tensor]) -> list[float] | None:
    """Add 1 to CPU float ``step`` tensors in one call; None where they do not qualify."""
    dtype = steps[0].dtype
    if dtype not in (torch.float32, torch.float64) or not all(
        s.dtype == dtype and s.is_cpu for s in steps
    ):
        return None
    return bump_at(np.array([s.data_ptr() for s in steps], dtype=np.int64), dtype).tolist()


def bump_at(ptrs: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Add 1 to the float32 or float64 scalars at addresses ``ptrs``; return the new values."""
    from fuseopt.kernels import _numba_ops

    bump = _numba_ops.bump_steps32 if dtype == torch.float32 else _numba_ops.bump_steps64
    return bump(ptrs)


def table(params: list, grads: list, states: dict[str, list]) -> tuple:
    """What a launch over these tensors needs besides the scalars: the pointer table (param, grad,
    then the states, one row each), the chunk table, and whether the step is small enough to run
    on one thread."""
    lists = [params, grads, *states.values()]
    ptrs = np.array([[t.data_ptr() for t in lst] for lst in lists], dtype=np.int64)
    numels = tuple(p.numel() for p in params)
    return ptrs, chunk_table(numels), sum(numels) < SERIAL_BELOW


def launch(rule, flags, scalars: dict, operands: tuple, dtype: torch.dtype, tables: tuple) -> None:
    """Run the kernel of ``rule`` on ``operands`` of ``dtype`` over :func:`table`'s ``tables``."""
    fn, names = kernel(rule, flags, operands, dtype)
    scal = np.array([float(scalars[name]) for name in names], dtype=np.float64)
    ptrs, chunks, serial = tables
    with _launch_lock:
        _launch(fn, ptrs, chunks, scal, serial=serial)


def run(rule, flags, scalars: dict, params: list, grads: list, states: dict[str, list]) -> None:
    """Apply ``rule`` to all tensors in one kernel launch (tensors must be dense, like the param)."""
    operands = ("param", "grad", *states)
    launch(rule, flags, scalars, operands, params[0].dtype, table(params, grads, states))
