"""Fused CPU backend: a rule's traced graph compiled into one parallel numba kernel.

One launch covers every tensor of a batch: the kernel gets a table of data pointers (operand x
tensor), a table of chunks ``(tensor, start, stop)`` that it walks with ``prange``, and the host
scalars as a float64 array read at run time. The tables come from a
:class:`fuseopt._plan.Launch`, whose tensors the plan checked (what a kernel may assume is listed
there); nothing here reads a tensor. Generated sources are written to a cache directory and
compiled with ``cache=True``, so a new process loads the machine code instead of compiling. Set
``FUSEOPT_CACHE_DIR`` to choose that directory.

A process forked after a parallel launch (``multiprocessing``'s default on Linux) cannot use
numba's OpenMP pool again (GNU OpenMP is not fork-safe: numba stops the child). There, launches
run the same kernel compiled without ``parallel``, its chunks spread over a few Python threads
(the kernels release the GIL); the parent keeps its pool.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
import threading
from functools import cache, lru_cache

import numpy as np
import torch

from fuseopt.kernels.trace import Graph, trace

CHUNK = 1 << 16  # elements per work item: large enough to amortise, small enough to balance threads
BLOCK = 256  # elements per scale of an 8-bit state (fuseopt._quant.BLOCK; CHUNK is a multiple)
# K10: a chunk holds whole blocks, and a block's scale is element ``start >> 8`` of its tensor's
assert CHUNK % BLOCK == 0 and BLOCK == 1 << 8
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


def per_operand(operands, dtype) -> tuple[torch.dtype, ...]:
    """The dtype of each operand: ``dtype`` as given (a tuple, one per operand: a storage
    format, see :mod:`fuseopt._storage`), or the one dtype of every operand."""
    return tuple(dtype) if isinstance(dtype, tuple) else (dtype,) * len(operands)


def _exact(graph: Graph, operands, dtypes) -> set[int]:
    """Nodes whose value a bfloat16 tensor holds exactly: a loaded bfloat16 operand, a constant
    it can represent, a sign change or select among such. Storing them needs no rounding."""
    exact: set[int] = set()
    for i, (op, args) in enumerate(graph.nodes):
        if (
            (op == "input" and dtypes[operands.index(args[0])] == torch.bfloat16)
            or (op == "const" and float(torch.tensor(args[0], dtype=torch.bfloat16)) == args[0])
            or (op in ("neg", "abs") and args[0] in exact)
            or (op == "where" and args[1] in exact and args[2] in exact)
        ):
            exact.add(i)
    return exact


def source(
    graph: Graph, operands: tuple[str, ...], dtype, parallel: bool = True, sr: bool = False,
    kahan: bool = False, quant: tuple = (),
) -> str:  # fmt: skip
    """Python source of the kernel for ``graph`` on tensors of ``dtype`` (a key of ``DTYPES``, or
    a tuple of them, one per operand: each is loaded and stored in its own, the arithmetic is in
    the param's compute type); ``parallel=False``: the same loop on the calling thread
    (``prange`` is then ``range``); ``sr``: bfloat16 stores round stochastically, with the seed
    the kernel reads after the scalars (:func:`kernel` names it ``sr_seed``); ``kahan``: the last
    operand after the rule's (no input of ``graph``) is the compensation of a bfloat16 param,
    added to its update and given the rounding error of its store (Kahan summation); ``quant``:
    ``((name, signed), ...)``, the 8-bit states (uint8 codes), whose float32 scales are the last
    operands, in this order (see :func:`_quant_lines`)."""
    return _source(graph, operands, dtype, parallel, reduce=False, sr=sr, kahan=kahan, quant=quant)


def reduce_source(graph: Graph, operands: tuple[str, ...], dtype, parallel: bool = True) -> str:
    """Python source of a rule's reduction kernel ``reduce(ptrs, chunks, scal, out)``: for chunk
    ``c``, ``out[c, k]`` = the float64 sum over its elements of the ``k``-th output of ``graph``
    (a traced :meth:`~fuseopt.rule.Rule.reduce`). It reads its operands and writes nothing else.
    ``reassoc`` lets LLVM vectorise the sums (it may also reassociate a chain of the rule's own
    adds or products: a reduction feeds a per-tensor scalar, not a stored value)."""
    return _source(graph, operands, dtype, parallel, reduce=True)


def _store(k: int, value: str, storage: str, compute: str, exact: bool, sr: bool):
    """How operand ``k`` (of ``storage``) stores ``value`` (of ``compute``): the expression, and
    the helpers it calls."""
    if storage == "bf16" and exact:
        return f"store_bf16_exact({value})", {"store_bf16_exact"}
    if storage == "bf16" and sr:  # (a random stream per operand and tensor, see sr_key)
        return f"store_bf16_sr({value}, sr_bits(key{k}, lo + j))", {"store_bf16_sr", "sr_bits"}
    if storage in ("bf16", "f16"):
        return f"store_{storage}({value})", {f"store_{storage}"}
    return (value if storage == compute else f"np.{storage}({value})"), set()


def _kahan_store(graph: Graph, node: int, storages, pointers, compute, kc: int) -> list[str]:
    """The lines that store the param's new value ``v{node}`` with Kahan summation: the
    compensation (operand ``kc``) joins the update, the param takes the sum rounded to
    nearest, and the compensation what that rounding lost (exact in float32: the param and its
    rounded sum are close)."""
    old = f"v{graph.inputs['param']}"
    load_c = f"load_{storages[kc]}(a{kc}[j])" if pointers[kc] == "uint16" else f"a{kc}[j]"
    store_c = f"store_{storages[kc]}(kc)" if pointers[kc] == "uint16" else "kc"
    if pointers[kc] != "uint16" and storages[kc] != compute:
        store_c = f"np.{storages[kc]}(kc)"
    return [
        f"            ky = (v{node} - {old}) + {load_c}",
        f"            kbits = store_bf16({old} + ky)",
        "            a0[j] = kbits",
        f"            kc = ky - (load_bf16(kbits) - {old})",
        f"            a{kc}[j] = {store_c}",
    ]


def _quant_lines(graph: Graph, operands, quant: tuple, T: str):
    """What 8-bit states change in an update kernel whose chunks are walked a block
    (:data:`BLOCK` elements, one scale) at a time (``lo``, ``n``: the block's start and size):
    ``(before, loads, stores, after)``, the lines before the block's loop, the expressions
    that read and write an operand there, and the lines after it.

    Operand ``k`` of ``quant`` holds its codes (uint8); its scales are an operand after the
    others (``quant``'s order). Before the loop, the block's values are dequantized into a
    float32 buffer ``q{k}``: the map's value times the block's scale, as
    :func:`fuseopt._quant.dequantize` (a loop of its own: it vectorises, a table gather, and
    leaves the main loop fewer arrays to prove apart). The main loop reads ``q{k}`` and writes
    the new value back into it; after it, the block's largest magnitude (an integer max over
    the magnitudes' bits: the float max, NaN above inf; vectorises) is the new scale, and each
    code is the nearest to the value times the scale's reciprocal (0 for a block of zeros),
    found through the tables of :func:`fuseopt._quant.tables`."""
    before, loads, stores, after = [], {}, {}, []
    n_ops = len(operands)
    for i, (name, signed) in enumerate(quant):
        k, s = operands.index(name), n_ops - len(quant) + i
        mark = "S" if signed else "U"
        before += [
            f"            a{k} = numba.carray(ptr_uint8(ptrs[{k}, t] + lo), n)  # {name}",
            f"            m{k} = numba.carray(ptr_float32(ptrs[{s}, t] + (lo >> 8) * 4), 1)",
        ]
        if name in graph.inputs:
            before += [
                f"            s{k} = m{k}[0]  # {operands[s]}",
                "            for j in range(n):",
                f"                q{k}[j] = QMAP_{mark}[a{k}[j]] * s{k}",
            ]
            loads[k] = f"q{k}[j]"
        if name in graph.outputs:
            stores[k] = f"q{k}[j] = {{}}"
            after += [
                f"            x{k} = np.uint32(0)",
                "            for j in range(n):",
                f"                x{k} = umax(x{k}, mag_bits(q{k}[j]))",
                f"            amax = bits_f32(x{k})",
                f"            m{k}[0] = amax",
                "            inv = ONE / amax if amax > ZERO else ZERO",
                "            for j in range(n):",
                f"                a{k}[j] = code_{mark.lower()}(q{k}[j] * inv)",
            ]
    return before, loads, stores, after


def _source(
    graph: Graph, operands, dtype, parallel: bool, reduce: bool, sr: bool = False,
    kahan: bool = False, quant: tuple = (),
) -> str:  # fmt: skip
    """The update kernel (``graph``'s outputs stored into its operands) or, ``reduce``, the
    reduction kernel (summed per chunk): the same loads and arithmetic either way. Each operand
    is read through a pointer of its own storage type, widened to the compute type on load;
    8-bit states (``quant``, update kernels only) are read and written a block at a time
    (:func:`_quant_lines`)."""
    dtypes = per_operand(operands, dtype)
    compute = DTYPES[dtypes[0]][1]  # (the param's)
    T = f"np.{compute}"
    storages = ["uint8" if d == torch.uint8 else DTYPES[d][0] for d in dtypes]
    pointers = ["uint16" if st in ("bf16", "f16") else st for st in storages]
    per_block, q_loads, q_stores, q_after = _quant_lines(graph, operands, quant, T)
    hoisted = [
        f"    ONE = {T}(1.0)", f"    ZERO = {T}(0.0)", "    per = 1 if scal.shape[0] > 1 else 0",
    ]  # fmt: skip
    helpers: set[str] = set()
    body, arrays, per_chunk = [], [], []
    for i, (op, args) in enumerate(graph.nodes):
        if op == "input":
            k = operands.index(args[0])
            helpers.add(f"ptr_{pointers[k]}")
            at = f"ptr_{pointers[k]}(ptrs[{k}, t] + lo * {dtypes[k].itemsize})"
            load = f"a{k}[j]"
            if k in q_loads:  # (an 8-bit state: its block's values, see _quant_lines)
                body.append(f"            v{i} = {q_loads[k]}")
                continue
            arrays.append(f"        a{k} = numba.carray({at}, n)  # {args[0]}")
            if pointers[k] == "uint16":
                load = f"load_{storages[k]}({load})"
                helpers.add(f"load_{storages[k]}")
            body.append(f"            v{i} = {load}")
        elif op == "scalar":  # (a row per tensor where some scalar is per tensor, else one)
            per_chunk.append(
                f"        v{i} = {T}(scal[r, {list(graph.scalars).index(args[0])}])  # {args[0]}"
            )
        elif op == "const":
            hoisted.append(f"    v{i} = {T}({args[0]!r})")
        else:
            body.append(f"            v{i} = {_expr(op, [f'v{x}' for x in args], T)}")
    outputs = list(graph.outputs.items())
    if reduce:
        inits = [f"        acc{k} = 0.0" for k in range(len(outputs))]
        body += [
            f"            acc{k} += np.float64(v{node})" for k, (_, node) in enumerate(outputs)
        ]
        tail = [f"        out[c, {k}] = acc{k}  # {name}" for k, (name, _) in enumerate(outputs)]
        head = [
            f"@numba.njit(parallel={parallel}, cache=True, nogil=True, "
            'error_model="numpy", fastmath={"reassoc"})',
            "def reduce(ptrs, chunks, scal, out):",
        ]
    else:
        # bfloat16's rounding costs more vector instructions than most update rules: skip it
        # where the value is already a bfloat16 (Rprop's ``prev`` is the grad or 0)
        exact = _exact(graph, operands, dtypes) if "bf16" in storages else set()
        kc = len(operands) - 1 - len(quant)  # (a compensation: after the rule's operands)
        if kahan:  # (the param's store, below, is compensated)
            helpers.add(f"ptr_{pointers[kc]}")
            at = f"ptr_{pointers[kc]}(ptrs[{kc}, t] + lo * {dtypes[kc].itemsize})"
            arrays.append(f"        a{kc} = numba.carray({at}, n)  # {operands[kc]}")
        for name, node in outputs:
            k = operands.index(name)
            if k in q_stores:  # (an 8-bit state: its codes after the block, see _quant_lines)
                body.append(f"            {q_stores[k].format(f'v{node}')}")
                continue
            if kahan and name == "param":
                body += _kahan_store(graph, node, storages, pointers, compute, kc)
                helpers |= {"load_bf16", "store_bf16"} | (
                    {f"load_{storages[-1]}", f"store_{storages[-1]}"}
                    if pointers[-1] == "uint16" else set()
                )  # fmt: skip
                continue
            put, used = _store(k, f"v{node}", storages[k], compute, node in exact, sr)
            helpers |= used
            if "sr_bits" in used:
                per_chunk.append(f"        key{k} = sr_key(seed, t, {k})")
                helpers.add("sr_key")
            body.append(f"            a{k}[j] = {put}")
        if sr:  # (the seed follows the scalars in the table's first row)
            hoisted.append(f"    seed = np.uint64(scal[0, {len(graph.scalars)}])  # sr_seed")
        inits, tail = [], []
        if quant:
            helpers |= {"ptr_uint8", "ptr_float32", "mag_bits", "umax", "bits_f32"}
            helpers |= {"QMAP_S", "QMAP_U", "code_s", "code_u"}
        head = [
            f'@numba.njit(parallel={parallel}, cache=True, nogil=True, error_model="numpy")',
            "def kernel(ptrs, chunks, scal):",
        ]
    imports = [
        "# Generated by fuseopt.kernels.numba_cpu; do not edit.",
        "import numba",
        "import numpy as np",
        "from fuseopt.kernels._numba_ops import clamp, fma, lerp, maximum, minimum, sign, sqrt",
        *(f"from fuseopt.kernels._numba_ops import {h}" for h in sorted(helpers)),
        "",
        "",
    ]
    chunk_head = [
        "    for c in numba.prange(chunks.shape[0]):",
        "        t = chunks[c, 0]",
        "        lo = chunks[c, 1]",
        "        n = chunks[c, 2] - lo",
        "        r = t * per",
    ]
    if quant:  # the chunk a block at a time: ``lo`` and ``n`` are the block's
        indent = "    "
        return "\n".join(
            [
                *imports, *head, *hoisted, *chunk_head, *per_chunk,
                "        start, stop = lo, lo + n",
                *(f"        q{operands.index(n)} = np.empty({BLOCK}, np.float32)" for n, _ in quant),
                f"        for lo in range(start, stop, {BLOCK}):",
                f"            n = min(stop - lo, {BLOCK})",
                *(indent + line for line in arrays),
                *per_block,
                "            for j in range(n):",
                *(indent + line for line in body),
                *q_after,
                "",
            ]
        )  # fmt: skip
    return "\n".join(
        [
            *imports,
            *head,
            *hoisted,
            *chunk_head,
            *per_chunk,
            # Arrays start at the chunk and the loop at 0: numba then knows j >= 0 (no
            # wraparound code), and LLVM vectorises the loop.
            *arrays,
            *inits,
            "        for j in range(n):",
            *body,
            *tail,
            "",
        ]
    )


def norm_source(dtype: torch.dtype, kind: str, parallel: bool = True) -> str:
    """Python source of the reduction kernel ``reduce(ptrs, chunks, p, out)``: for each chunk
    ``c`` of the tensors at ``ptrs`` (of ``dtype``), ``out[c]`` = the sum of ``x * x`` (``kind``
    "sq"), of ``|x|`` ("abs"), of ``|x| ** p`` ("pow"), or the max of ``|x|`` ("max", NaN
    sticky), or of ``x * 0`` ("finite": 0, or NaN where any element is inf or NaN), accumulated
    in float64. ``reassoc`` lets LLVM vectorise the sums (the order is then the vector lanes',
    fixed for a machine); NaN and inf still propagate."""
    storage, _ = DTYPES[dtype]
    if storage in ("bf16", "f16"):
        pointer, load = "uint16", f"load_{storage}(a[j])"
    else:
        pointer, load = storage, "a[j]"
    step = {
        "sq": "acc += x * x",
        "abs": "acc += abs(x)",
        "pow": "acc += abs(x) ** p",
        "max": "ax = abs(x)\n            if ax > acc or ax != ax:\n                acc = ax",
        "finite": "acc += x * 0.0",
    }[kind]
    return "\n".join(
        [
            "# Generated by fuseopt.kernels.numba_cpu; do not edit.",
            "import numba",
            "import numpy as np",
            *(
                [f"from fuseopt.kernels._numba_ops import load_{storage}"]
                if pointer == "uint16"
                else []
            ),
            f"from fuseopt.kernels._numba_ops import ptr_{pointer} as PTR",
            "",
            "",
            f"@numba.njit(parallel={parallel}, cache=True, nogil=True, "
            'error_model="numpy", fastmath={"reassoc"})',
            "def reduce(ptrs, chunks, p, out):",
            f"    SIZE = {dtype.itemsize}",
            "    for c in numba.prange(chunks.shape[0]):",
            "        t = chunks[c, 0]",
            "        lo = chunks[c, 1]",
            "        n = chunks[c, 2] - lo",
            "        a = numba.carray(PTR(ptrs[t] + lo * SIZE), n)",
            "        acc = 0.0",
            "        for j in range(n):",
            f"            x = np.float64({load})",
            f"            {step}",
            "        out[c] = acc",
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
def kernel(
    rule, flags, operands: tuple[str, ...], dtype, parallel: bool = True, sr: bool = False,
    kahan: bool = False, quant: tuple = (),
):  # fmt: skip
    """The compiled kernel for ``rule`` with ``flags`` on ``operands`` of ``dtype`` (one, or one
    per operand), and the names of the scalars it takes, in order (``sr_seed`` last where
    ``sr``: stochastic rounding of its bfloat16 stores; ``kahan``: the last operand is the
    bfloat16 param's compensation; ``quant``: the 8-bit states, see :func:`source`). Its machine
    code is built here (numba's first call would build it otherwise): a plan asks for it before
    the step changes anything."""
    from numba import types as nt  # (imported here: ``import fuseopt`` stays light)

    # (the rule's operands: a compensation and 8-bit scales come after them)
    graph = trace(rule, flags, operands[: len(operands) - int(kahan) - len(quant)])
    if isinstance(dtype, tuple) and len(set(dtype)) == 1:
        dtype = dtype[0]  # (the same source, and kernel, as a launch of one dtype)
    src = source(graph, operands, dtype, parallel, sr, kahan, quant)
    fn = import_source(src, "fuseopt_kernel_").kernel
    signature = (nt.int64[:, ::1], nt.int64[:, ::1], nt.float64[:, ::1])
    wanted = torch.get_num_threads()
    fn.compile(signature)
    if torch.get_num_threads() != wanted:  # numba's OpenMP layer may start here: see _launch
        torch.set_num_threads(wanted)
    return fn, tuple(graph.scalars) + (("sr_seed",) if sr else ())


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
_forked = False  # set in a child forked from this process (os.register_at_fork below)
_child_pool = None


def _after_fork_in_child() -> None:
    global _forked, _child_pool, _launch_lock
    _forked, _child_pool = True, None
    _launch_lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


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


def _launch_in_child(fn, ptrs, chunks, scal, serial: bool) -> None:
    """A launch in a forked child: ``fn`` is the serial kernel; its chunks are split over
    torch's thread count of Python threads (each call releases the GIL)."""
    global _child_pool
    n = 1 if serial else min(torch.get_num_threads(), len(chunks))
    if n <= 1:
        fn(ptrs, chunks, scal)
        return
    if _child_pool is None or _child_pool._max_workers < n - 1:
        from concurrent.futures import ThreadPoolExecutor

        _child_pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="fuseopt")
    parts = [np.ascontiguousarray(chunks[k::n]) for k in range(n)]
    done = [_child_pool.submit(fn, ptrs, part, scal) for part in parts[1:]]
    fn(ptrs, parts[0], scal)
    for future in done:
        future.result()


@cache
def norm_kernel(dtype: torch.dtype, kind: str, parallel: bool = True):
    """The compiled reduction kernel of :func:`norm_source`."""
    from numba import types as nt

    fn = import_source(norm_source(dtype, kind, parallel), "fuseopt_norm_").reduce
    wanted = torch.get_num_threads()
    fn.compile((nt.int64[::1], nt.int64[:, ::1], nt.float64, nt.float64[::1]))
    if torch.get_num_threads() != wanted:  # (see kernel)
        torch.set_num_threads(wanted)
    return fn


def grad_norms(ptrs: np.ndarray, numels: tuple[int, ...], dtype: torch.dtype, p: float | None):
    """The ``p``-norm (``math.inf``: the max norm) of each tensor of ``dtype`` at ``ptrs`` (grads
    of a launch the plan checked: dense, inside their storage), as float64; ``p=None``: 0 for
    each tensor whose elements are all finite, NaN for the others."""
    if p is None:
        kind = "finite"
    else:
        kind = "max" if p == math.inf else {2.0: "sq", 1.0: "abs"}.get(p, "pow")
    fn = norm_kernel(dtype, kind, not _forked)
    chunks = chunk_table(numels)
    out = np.empty(len(chunks), dtype=np.float64)
    with _launch_lock:
        if _forked:  # (the serial kernel: a reduction's chunks write their own slots)
            fn(ptrs, chunks, float(p or 0.0), out)
        else:
            _launch(fn, ptrs, chunks, float(p or 0.0), out, serial=sum(numels) < SERIAL_BELOW)
    n = len(numels)
    if kind == "max":
        per_tensor = np.zeros(n)
        with np.errstate(invalid="ignore"):  # (a NaN grad: the norm is NaN, as torch's)
            np.maximum.at(per_tensor, chunks[:, 0], out)
        return per_tensor
    per_tensor = np.bincount(chunks[:, 0], weights=out, minlength=n)
    if kind == "finite":
        return per_tensor
    if kind == "sq":
        return np.sqrt(per_tensor)
    return per_tensor if kind == "abs" else per_tensor ** (1.0 / p)


@cache
def reduce_kernel(rule, flags, operands: tuple[str, ...], dtype: torch.dtype, parallel=True):
    """The compiled reduction kernel of ``rule`` with ``flags`` (:func:`reduce_source`), the
    names of the scalars it takes and of its sums, in order."""
    from numba import types as nt

    from fuseopt.kernels.trace import trace_reduce

    graph = trace_reduce(rule, flags, operands)
    if isinstance(dtype, tuple) and len(set(dtype)) == 1:
        dtype = dtype[0]
    fn = import_source(reduce_source(graph, operands, dtype, parallel), "fuseopt_reduce_").reduce
    wanted = torch.get_num_threads()
    fn.compile((nt.int64[:, ::1], nt.int64[:, ::1], nt.float64[:, ::1], nt.float64[:, ::1]))
    if torch.get_num_threads() != wanted:  # (see kernel)
        torch.set_num_threads(wanted)
    return fn, tuple(graph.scalars), tuple(graph.outputs)


def reduce(launch) -> dict[str, np.ndarray]:
    """The rule's per-tensor sums over ``launch`` (a launch the plan checked: its address table
    and scalars), float64, one value per tensor; reads only."""
    ops, dtypes = launch.operands, launch.dtypes
    if launch.kahan:  # (the compensation, the last row of the table, is no operand of the rule)
        ops, dtypes = ops[:-1], dtypes[:-1]
    fn, names, sums = reduce_kernel(launch.rule, launch.flags, ops, dtypes, not _forked)
    if not sums:
        return {}
    scal = scalar_table([launch.scalars[name] for name in names], len(launch.numels))
    chunks = chunk_table(launch.numels)
    out = np.zeros((len(chunks), len(sums)), dtype=np.float64)
    table = launch.address_table()
    with _launch_lock:
        if _forked:  # (the serial kernel: each chunk writes its own row)
            fn(table, chunks, scal, out)
        else:
            _launch(fn, table, chunks, scal, out, serial=sum(launch.numels) < SERIAL_BELOW)
    n = len(launch.numels)
    return {
        name: np.bincount(chunks[:, 0], weights=out[:, k], minlength=n)
        for k, name in enumerate(sums)
    }


def read_at(ptrs: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The float32 or float64 scalars at addresses ``ptrs`` (``step`` tensors the plan checked),
    as float64."""
    from fuseopt.kernels import _numba_ops

    return _numba_ops.read_steps(ptrs, dtype == torch.float64)


def bumped(values: np.ndarray, dtype: torch.dtype) -> list[float]:
    """``values + 1`` computed in ``dtype`` (what :func:`bump_at` will store), as floats."""
    kind = np.float32 if dtype == torch.float32 else np.float64
    return (values.astype(kind) + kind(1)).astype(np.float64).tolist()


def bump_at(ptrs: np.ndarray, dtype: torch.dtype) -> None:
    """Add 1 to the float32 or float64 scalars at addresses ``ptrs`` (checked ``step`` tensors)."""
    from fuseopt.kernels import _numba_ops

    _numba_ops.bump_steps(ptrs, dtype == torch.float64)


def scalar_table(values: list, n: int) -> np.ndarray:
    """The host scalars as the kernels read them: a float64 row, or a row per tensor (``n``)
    where some scalar holds a value per tensor (a 1-D tensor, e.g. LARS's trust ratios)."""
    per_tensor = [np.asarray(v, dtype=np.float64) for v in values]
    if any(v.ndim == 1 for v in per_tensor):
        # (a kernel reads row t of the table for tensor t: exactly one row per tensor)
        if any(v.ndim == 1 and len(v) != n for v in per_tensor):
            raise ValueError(f"a per-tensor scalar without one value for each of {n} tensors")
        table = np.empty((n, len(values)), dtype=np.float64)
        for k, v in enumerate(per_tensor):
            table[:, k] = v
        return table
    return np.array([[float(v) for v in values]], dtype=np.float64).reshape(1, len(values))


def run(launch) -> None:
    """Run ``launch`` (a :class:`fuseopt._plan.Launch` the plan checked) in one kernel call."""
    fn, names = kernel(
        launch.rule, launch.flags, launch.operands, launch.dtypes, not _forked, launch.sr,
        launch.kahan, launch.quant,
    )  # fmt: skip
    scal = scalar_table([launch.scalars[name] for name in names], len(launch.numels))
    chunks = chunk_table(launch.numels)
    serial = sum(launch.numels) < SERIAL_BELOW
    table = launch.address_table()
    with _launch_lock:
        if _forked:
            _launch_in_child(fn, table, chunks, scal, serial)
        else:
            _launch(fn, table, chunks, scal, serial=serial)
