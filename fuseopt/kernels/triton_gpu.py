"""Fused CUDA backend: a rule's traced graph compiled into one Triton kernel per batch.

The graph is the one the numba backend compiles (:func:`fuseopt.kernels.trace.trace`); only the
spelling differs. One launch covers every tensor of a batch, as torch's ``multi_tensor_apply``
does: the kernel gets a device table of data addresses (operand x tensor, int64) and a table of
chunks ``(tensor, start, stop)``; program ``c`` walks chunk ``c``, loads its tensor's addresses
from the table and casts them to typed pointers. Values are loaded in their storage dtype and
computed in float32 (float64 for float64 params); float16/bfloat16 are rounded back once, on
store.

Host scalars reach the kernel as float32 arguments, or, where one of them is a tensor
(``capturable``, a tensor ``lr``) or the params are float64, as a float64 device table with one
row per tensor (or one shared row), so a captured step reads them from the device and never syncs.
With GradScaler (``grad_scale``/``found_inf``), the kernel divides the grad by the scale and
leaves everything unchanged where ``found_inf`` is set.

Triton is imported only when a kernel is first built. ``TRITON_INTERPRET=1`` runs the same kernels
on CPU tensors (Triton's interpreter): set ``FUSEOPT_FUSED_BACKEND=triton`` to dispatch CPU params
here, which is how the tests check every algorithm without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache, lru_cache

import numpy as np
import torch

from fuseopt.kernels.numba_cpu import chunk_table, import_source, per_operand
from fuseopt.kernels.trace import Graph, trace

BLOCK = 1024  # elements per vector step of a program
CHUNK = 8 * BLOCK  # elements per program: enough programs for one large tensor to fill a GPU
# Triton's interpreter runs each program in numpy: small blocks keep it fast, and let small test
# tensors span several chunks and loop iterations.
INTERPRET_BLOCK, INTERPRET_CHUNK = 64, 128
QBLOCK = 256  # the vector step of a launch with 8-bit states: one quantization block
# storage type of the pointers, compute type; bfloat16 is read as its bits (bf16_load/bf16_store)
DTYPES = {
    torch.float32: ("tl.float32", "tl.float32"),
    torch.float16: ("tl.float16", "tl.float32"),
    torch.bfloat16: ("tl.uint16", "tl.float32"),
    torch.float64: ("tl.float64", "tl.float64"),
    torch.uint8: ("tl.uint8", None),  # an 8-bit state's codes (never a param's dtype)
}


@cache
def available() -> bool:
    """Whether Triton can be imported."""
    return importlib.util.find_spec("triton") is not None


def supports(dtype: torch.dtype) -> bool:
    """Whether this backend has kernels for params of ``dtype``."""
    return dtype in DTYPES and DTYPES[dtype][1] is not None


def on_cpu() -> bool:
    """Whether ``FUSEOPT_FUSED_BACKEND=triton`` asks for Triton on CPU tensors (its interpreter)."""
    return os.environ.get("FUSEOPT_FUSED_BACKEND", "").lower() == "triton"


def wanted(device: torch.device) -> bool:
    """Whether the fused kernels for params on ``device`` are this backend's."""
    if device.type == "cuda":
        return available()
    return device.type == "cpu" and on_cpu() and available()


# ------------------------------------------------------------------------------------- codegen
# Helpers with ATen's formulas, in every generated module (an interpreted kernel cannot call a
# compiled helper, nor the other way round, so they are jitted with the kernel).
_HELPERS = '''
@triton.jit
def add(a, b):
    """The combine function of the reduction kernels' sums (tl.reduce)."""
    return a + b


@triton.jit
def umax(a, b):
    """The larger of two unsigned ints (a combine function: ``tl.max``, a library function, is
    not callable from a kernel Triton's interpreter runs unless it was imported interpreting)."""
    return tl.maximum(a, b)


@triton.jit
def lerp(a, b, w):
    """ATen's two-sided lerp, with FMA."""
    d = b - a
    return tl.where(tl.abs(w) < 0.5, tl.fma(w, d, a), tl.fma(-d, 1.0 - w, b))


@triton.jit
def sign(a):
    """torch.sign: 1, -1, or 0 (also for NaN)."""
    return tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, 0.0)).to(a.dtype)


@triton.jit
def clamp(a, lo, hi):
    """torch.clamp with scalar bounds: NaN stays NaN, lo > hi gives hi."""
    return tl.where(a != a, a, tl.minimum(tl.maximum(a, lo), hi))


@triton.jit
def bf16_load(ptr, offs, mask):
    """bfloat16 bits to float32 (exact)."""
    bits = tl.load(ptr + offs, mask=mask).to(tl.uint32)
    return (bits << 16).to(tl.float32, bitcast=True)


@triton.jit
def bf16_store(ptr, offs, x, mask):
    """float32 to bfloat16 bits, rounded to nearest even as c10::BFloat16 (also in the
    interpreter, whose own conversion truncates)."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    tl.store(ptr + offs, r.to(tl.uint16), mask=mask)


@triton.jit
def bf16_rne(x):
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), as float32: what
    ``bf16_store`` stores."""
    u = x.to(tl.uint32, bitcast=True)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return tl.where(x != x, x, r.to(tl.float32, bitcast=True))


@triton.jit
def sr_mix(z):
    """splitmix64's finaliser on uint64 ``z`` (numba's kernels use the same: the same bits)."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def sr_key(seed, t, k):
    """The key (uint32) of the random stream of operand ``k`` of tensor ``t`` under a launch's
    seed: the upper half of a 64-bit mix, as numba's ``sr_key``."""
    z = sr_mix(seed.to(tl.uint64) + (t.to(tl.uint64) * 64 + k + 1) * 0x9E3779B97F4A7C15)
    return (z >> 32).to(tl.uint32)


@triton.jit
def sr_noise(key, offs):
    """16 random bits (uint32) per element offset: numba's ``sr_bits``, op for op (the low
    32 bits of the offset times the golden ratio, xor the key, murmur3's 32-bit finaliser, its
    upper half)."""
    x = (offs.to(tl.uint32) * 0x9E3779B9) ^ key
    x = (x ^ (x >> 16)) * 0x85EBCA6B
    x = (x ^ (x >> 13)) * 0xC2B2AE35
    return (x ^ (x >> 16)) >> 16


@triton.jit
def bf16_store_sr(ptr, offs, x, mask, key):
    """float32 to bfloat16 bits, rounded stochastically: 16 random bits (``sr_noise`` of the
    stream ``key`` and the element's offset) added below the kept half, then cut off."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + sr_noise(key, offs)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    tl.store(ptr + offs, r.to(tl.uint16), mask=mask)
'''


def _expr(op: str, a: list[str], f64: bool) -> str:
    if op == "neg":
        return f"-{a[0]}"
    if op in ("add", "sub", "mul"):
        return f"{a[0]} {dict(add='+', sub='-', mul='*')[op]} {a[1]}"
    if op == "div":  # Triton's `/` on float32 is approximate (div.full.f32); on float64 it is not
        return f"{a[0]} / {a[1]}" if f64 else f"tl.div_rn({a[0]}, {a[1]})"
    if op == "fma":
        return f"tl.fma({a[0]}, {a[1]}, {a[2]})"
    if op == "sqrt":  # correctly rounded, as CUDA's sqrtf (tl.sqrt on float32 is approximate)
        return f"tl.sqrt({a[0]})" if f64 else f"tl.sqrt_rn({a[0]})"
    if op in ("maximum", "minimum"):
        return f"tl.{op}({a[0]}, {a[1]}, propagate_nan=tl.PropagateNan.ALL)"
    if op == "abs":
        return f"tl.abs({a[0]})"
    if op in ("lerp", "sign", "clamp"):
        return f"{op}({', '.join(a)})"
    if op in ("gt", "lt", "eq"):
        return f"{a[0]} {dict(gt='>', lt='<', eq='==')[op]} {a[1]}"
    if op == "where":
        return f"tl.where({a[0]}, {a[1]}, {a[2]})"
    raise ValueError(f"triton backend: unknown op {op!r}")


def _evaluate(graph: Graph, operands, dtype, table: bool, unscale: bool, quant: tuple = ()):
    """The lines that evaluate ``graph``'s nodes in a kernel, for an update or a reduction:
    ``(hoisted, body)``, before and inside the loop over a chunk's blocks. ``dtype``: one, or one
    per operand (each loaded in its own; the arithmetic in the param's compute type).
    ``unscale``: the grad is divided by GradScaler's scale where the kernel's ``SCALE`` says so.
    ``quant``: the 8-bit states (see :func:`source`), read as their map's value times their
    block's scale."""
    dtypes = per_operand(operands, dtype)
    compute = DTYPES[dtypes[0]][1]
    f64 = dtypes[0] == torch.float64
    names = list(graph.scalars)
    hoisted, body = [], []
    for k, name in enumerate(operands):
        storage = DTYPES[dtypes[k]][0]
        hoisted.append(
            f"    a{k} = tl.load(ptrs + {k} * NT + t).to(tl.pointer_type({storage}))  # {name}"
        )
    used = {x for op, a in graph.nodes if op not in ("input", "scalar", "const") for x in a}
    used |= set(graph.outputs.values())
    for i, (op, a) in enumerate(graph.nodes):
        if op == "input":
            if i not in used:
                continue  # e.g. a FirstValue state on its first step: never read
            k = operands.index(a[0])
            if a[0] in dict(quant):
                q, s = _quant_operand(operands, quant, a[0])
                load = f"tl.load(qf + {q} + tl.load(a{k} + offs, mask=m, other=0).to(tl.int32))"
                # (a step past the chunk's end reads no scale: there may be none)
                load = f"{load} * tl.load(a{s} + ((lo + off) >> 8), mask=lo + off < hi, other=0.0)"
            elif dtypes[k] == torch.bfloat16:
                load = f"bf16_load(a{k}, offs, m)"
            else:
                load = f"tl.load(a{k} + offs, mask=m).to({compute})"
            body.append(f"        v{i} = {load}")
            if a[0] == "grad" and unscale:  # GradScaler: unscale first, as torch's fused kernels
                unscaled = _expr("div", [f"v{i}", "scale"], f64)
                body.append(f"        if SCALE:\n            v{i} = {unscaled}")
        elif op == "scalar":
            k = names.index(a[0])
            value = f"tl.load(scal + t * scal_stride + {k})" if table else f"s{k}"
            hoisted.append(f"    v{i} = tl.cast({value}, {compute})  # {a[0]}")
        elif op == "const":
            hoisted.append(f"    v{i} = tl.full([BLOCK], {a[0]!r}, {compute})")
        else:
            body.append(f"        v{i} = {_expr(op, [f'v{x}' for x in a], f64)}")
    return hoisted, body


# 8-bit states (fuseopt._quant): the kernel's table ``qf`` (float32), the signed map then the
# unsigned one, 256 codes each
_QF = {True: 0, False: 256}  # signed -> offset of its map in qf


def _quant_operand(operands, quant: tuple, name: str) -> tuple[int, int]:
    """``(offset of its map in qf, operand index of its scales)`` of the 8-bit state ``name``:
    the scales are the last operands, in ``quant``'s order."""
    i = [n for n, _ in quant].index(name)
    return _QF[dict(quant)[name]], len(operands) - len(quant) + i


def _encoder(signed: bool) -> str:
    """The source of the jitted helper ``encode_s`` (or ``encode_u``): the code of scaled float32
    values in the signed (unsigned) map, :func:`fuseopt._quant.encode`'s float32 operations in
    its order (its constants written into the source)."""
    from fuseopt import _quant

    g = _quant.grid(signed)
    lines = [
        "@triton.jit",
        f"def encode_{'s' if signed else 'u'}(y):",
        "    a = tl.abs(y)",
        f"    s = tl.full(y.shape, {g.scale[0]!r}, tl.float32)",
        f"    w = tl.full(y.shape, {g.width[0]!r}, tl.float32)",
        f"    n = tl.full(y.shape, {g.cells[0]!r}, tl.float32)",
        f"    f0 = tl.full(y.shape, {g.first[0]!r}, tl.float32)",
    ]
    for k, split in enumerate(g.splits, start=1):
        lines += [
            f"    past = a > {split!r}",
            f"    s = tl.where(past, {g.scale[k]!r}, s)",
            f"    w = tl.where(past, {g.width[k]!r}, w)",
            f"    n = tl.where(past, {g.cells[k]!r}, n)",
            f"    f0 = tl.where(past, {g.first[k]!r}, f0)",
        ]
    lines += [
        "    cell = tl.floor((a * s - 0.1) * w)",
        "    cell = tl.minimum(tl.maximum(cell, 0.0), n - 1.0)",
        f"    pos = tl.where(a > {g.upper!r}, {g.top!r}, tl.where(a <= {g.lower!r}, 0.0, f0 + cell))",
    ]
    zero = float(g.zero)
    if signed:
        lines.append(
            f"    c = tl.where(y >= 0.0, {zero!r} + pos, {zero!r} - tl.minimum(pos, {zero!r}))"
        )
    else:
        lines.append("    c = pos")
    lines += ["    c = tl.where(y != y, 0.0, c)", "    return c.to(tl.int32)", ""]
    return "\n".join(lines)


def _quant_store(operands, quant: tuple, name: str, value: str) -> list[str]:
    """The lines that store the new values ``value`` of the 8-bit state ``name`` over one block
    (the loop's ``BLOCK`` is the quantization block): the block's largest magnitude (an integer
    max over the magnitudes' bits: NaN above inf, as the numba kernels) is its new scale, and
    each code is that of the value times the scale's reciprocal (0 for a block of zeros), by
    :func:`fuseopt._quant.encode`'s arithmetic (``encode_s``/``encode_u``)."""
    signed = dict(quant)[name]
    k, (_, s) = operands.index(name), _quant_operand(operands, quant, name)
    return [
        f"        w{k} = tl.where(m, {value}, 0.0).to(tl.float32)",
        f"        amax{k} = tl.reduce(w{k}.to(tl.uint32, bitcast=True) & 0x7FFFFFFF, 0, umax)",
        f"        amax{k} = amax{k}.to(tl.float32, bitcast=True)",
        f"        inv{k} = tl.where(amax{k} > 0.0, tl.div_rn(1.0, amax{k}), 0.0)",
        f"        c{k} = encode_{'s' if signed else 'u'}(w{k} * inv{k})",
        f"        tl.store(a{k} + offs, c{k}.to(tl.uint8), mask=m)",
        f"        tl.store(a{s} + ((lo + off) >> 8), amax{k}, mask=lo + off < hi)",
    ]


def source(
    graph: Graph, operands: tuple[str, ...], dtype, table: bool, sr: bool = False,
    kahan: bool = False, quant: tuple = (),
) -> str:  # fmt: skip
    """Python source of the Triton kernel for ``graph`` on tensors of ``dtype`` (one, or one per
    operand); ``table``: the scalars come from a device table instead of kernel arguments;
    ``sr``: bfloat16 stores round stochastically (the ``seed`` argument: one random stream per
    operand and tensor, the numba kernels' hash); ``kahan``: the last operand (no input of
    ``graph``) is a bfloat16 param's compensation (Kahan summation, as the numba kernels);
    ``quant``: ``((name, signed), ...)``, the 8-bit states (uint8 codes), whose float32 scales
    are the last operands in this order; the kernel then takes the maps ``qf`` and its ``BLOCK``
    must be the quantization block (:func:`run` launches it so)."""
    dtypes = per_operand(operands, dtype)
    names = list(graph.scalars)
    args = ["scal, scal_stride"] if table else [f"s{k}" for k in range(len(names))]
    if quant:
        args.append("qf")
    hoisted, body = _evaluate(graph, operands, dtypes, table, unscale=True, quant=quant)
    for name, node in graph.outputs.items():
        k = operands.index(name)
        if name in dict(quant):
            body += _quant_store(operands, quant, name, f"v{node}")
            continue
        if kahan and name == "param":
            kc = len(operands) - 1 - len(quant)
            if dtypes[kc] == torch.bfloat16:
                load_c, store_c = f"bf16_load(a{kc}, offs, m)", f"bf16_store(a{kc}, offs, kc, m)"
            else:
                load_c = f"tl.load(a{kc} + offs, mask=m).to(tl.float32)"
                store_c = f"tl.store(a{kc} + offs, kc.to({DTYPES[dtypes[kc]][0]}), mask=m)"
            body += [
                "        kold = bf16_load(a0, offs, m)",
                f"        ky = (v{node} - kold) + {load_c}",
                "        ks = kold + ky",
                "        bf16_store(a0, offs, ks, m)",
                "        kc = ky - (bf16_rne(ks) - kold)",
                f"        {store_c}",
            ]
            continue
        if dtypes[k] == torch.bfloat16 and sr:
            hoisted.append(f"    key{k} = sr_key(seed, t, {k})")
            body.append(f"        bf16_store_sr(a{k}, offs, v{node}, m, key{k})")
        elif dtypes[k] == torch.bfloat16:
            body.append(f"        bf16_store(a{k}, offs, v{node}, m)")
        else:
            storage = DTYPES[dtypes[k]][0]
            body.append(f"        tl.store(a{k} + offs, v{node}.to({storage}), mask=m)")
    compute = DTYPES[dtypes[0]][1]
    return "\n".join(
        [
            "# Generated by fuseopt.kernels.triton_gpu; do not edit.",
            "import triton",
            "import triton.language as tl",
            _HELPERS,
            *(_encoder(signed) for signed in sorted({signed for _, signed in quant})),
            "",
            '@triton.jit(do_not_specialize=["NT", "seed"])',
            f"def kernel(ptrs, chunks, NT, {', '.join(args)}, grad_scale, found_inf, seed,",
            "           SCALE: tl.constexpr, INF: tl.constexpr, BLOCK: tl.constexpr,",
            "           CHUNK: tl.constexpr):",
            "    c = tl.program_id(0)",
            "    t = tl.load(chunks + 3 * c)",
            "    lo = tl.load(chunks + 3 * c + 1)",
            "    hi = tl.load(chunks + 3 * c + 2)",
            "    if INF:  # a step with an inf/NaN grad changes nothing: mask every access",
            "        hi = tl.where(tl.load(found_inf) == 0, hi, lo)",
            "    if SCALE:",
            f"        scale = tl.cast(tl.load(grad_scale), {compute})",
            *hoisted,
            "    for off in tl.range(0, CHUNK, BLOCK):",
            "        offs = lo + off + tl.arange(0, BLOCK)",
            "        m = offs < hi",
            *body,
            "",
        ]
    )


def reduce_source(graph: Graph, operands: tuple[str, ...], dtype: torch.dtype) -> str:
    """Python source of a rule's reduction kernel (a traced :meth:`~fuseopt.rule.Rule.reduce`):
    program ``c`` stores in ``out[c, k]`` the float64 sum over its chunk of the ``k``-th output,
    reading its operands only. Scalars come from the device table."""
    hoisted, body = _evaluate(graph, operands, dtype, table=True, unscale=False)
    outputs = list(graph.outputs.items())
    hoisted += [f"    acc{k} = tl.full([BLOCK], 0.0, tl.float64)" for k in range(len(outputs))]
    body += [
        f"        acc{k} += tl.where(m, v{node}.to(tl.float64), 0.0)  # {name}"
        for k, (name, node) in enumerate(outputs)
    ]
    stores = [
        f"    tl.store(out + c * NOUT + {k}, tl.reduce(acc{k}, 0, add))"
        for k in range(len(outputs))
    ]
    return "\n".join(
        [
            "# Generated by fuseopt.kernels.triton_gpu; do not edit.",
            "import triton",
            "import triton.language as tl",
            _HELPERS,
            "",
            '@triton.jit(do_not_specialize=["NT"])',
            "def sums(ptrs, chunks, NT, scal, scal_stride, out, NOUT: tl.constexpr,",
            "         BLOCK: tl.constexpr, CHUNK: tl.constexpr):",
            "    c = tl.program_id(0)",
            "    t = tl.load(chunks + 3 * c)",
            "    lo = tl.load(chunks + 3 * c + 1)",
            "    hi = tl.load(chunks + 3 * c + 2)",
            *hoisted,
            "    for off in tl.range(0, CHUNK, BLOCK):",
            "        offs = lo + off + tl.arange(0, BLOCK)",
            "        m = offs < hi",
            *body,
            *stores,
            "",
        ]
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel(
    rule, flags, operands: tuple[str, ...], dtype, table: bool, sr: bool = False,
    kahan: bool = False, quant: tuple = (),
):  # fmt: skip
    """The Triton kernel for ``rule`` with ``flags`` on ``operands`` of ``dtype``, and the names of
    the scalars it takes, in order: compiled, or interpreted under ``TRITON_INTERPRET=1`` (one
    cache entry per mode: a process may run both, and each kernel reads only its own kind of
    addresses)."""
    if isinstance(dtype, tuple) and len(set(dtype)) == 1:
        dtype = dtype[0]
    return _kernel(rule, flags, operands, dtype, table, _interpreting(), sr, kahan, quant)


@cache
def _kernel(
    rule, flags, operands, dtype, table, interpreting: bool, sr=False, kahan=False, quant=(),
):  # fmt: skip
    # (the rule's operands: a compensation and 8-bit scales come after them)
    graph = trace(rule, flags, operands[: len(operands) - int(kahan) - len(quant)])
    src = source(graph, operands, dtype, table, sr, kahan, quant)
    # @triton.jit reads TRITON_INTERPRET when the module runs: one module per mode
    prefix = "fuseopt_triton_interp_" if interpreting else "fuseopt_triton_"
    return import_source(src, prefix).kernel, tuple(graph.scalars)


def reduce_kernel(rule, flags, operands: tuple[str, ...], dtype: torch.dtype):
    """The Triton reduction kernel of ``rule`` with ``flags`` (:func:`reduce_source`), the names
    of its scalars and of its sums, in order (one per mode, as :func:`kernel`)."""
    if isinstance(dtype, tuple) and len(set(dtype)) == 1:
        dtype = dtype[0]
    return _reduce_kernel(rule, flags, operands, dtype, _interpreting())


@cache
def _reduce_kernel(rule, flags, operands, dtype, interpreting: bool):
    from fuseopt.kernels.trace import trace_reduce

    graph = trace_reduce(rule, flags, operands)
    prefix = "fuseopt_triton_reduce_interp_" if interpreting else "fuseopt_triton_reduce_"
    module = import_source(reduce_source(graph, operands, dtype), prefix)
    return module.sums, tuple(graph.scalars), tuple(graph.outputs)


# -------------------------------------------------------------------------------------- launch
@lru_cache(maxsize=256)
def _chunks(numels: tuple[int, ...], device: torch.device, chunk: int) -> torch.Tensor:
    """``(tensor, start, stop)`` rows covering every tensor, on ``device`` (cached: a captured
    CUDA graph keeps reading the same table)."""
    rows = chunk_table(numels, chunk)
    if not len(rows):  # only empty tensors: one program that does nothing (a grid cannot be 0)
        rows = np.zeros((1, 3), dtype=np.int64)
    return torch.tensor(rows, dtype=torch.int64).to(device)


@lru_cache(maxsize=16)
def _quant_maps(device: torch.device) -> tuple[torch.Tensor]:
    """The 8-bit kernels' maps ``(qf,)`` on ``device`` (see ``_QF``), kept for the process: a
    module-owned constant whose size is checked here, so that every index a kernel forms (a
    code, below 256, plus a map's offset) is inside it (K10)."""
    from fuseopt import _quant

    qf = torch.cat([_quant.dynamic_map(True), _quant.dynamic_map(False)]).to(torch.float32)
    if qf.numel() != 512:
        raise AssertionError("fuseopt: 8-bit quantization maps of unexpected size")
    return (qf.to(device),)


@lru_cache(maxsize=256)
def _pointers(addresses: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The address table (operand-major), on ``device``; cached while the tensors stay put."""
    return torch.tensor(addresses, dtype=torch.int64).to(device)


def _scalar_table(values: list, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Scalars as a float64 device table: ``(table, row stride)``; stride 0 when all tensors share
    one row. Tensor scalars stay on the device (no host read); a 1-D one has a value per tensor."""
    cols = [
        v.to(device=device, dtype=torch.float64)
        if torch.is_tensor(v)
        else torch.full((), float(v), dtype=torch.float64, device=device)
        for v in values
    ]
    if any(c.dim() == 1 for c in cols):
        return torch.stack([c.expand(n) for c in cols], dim=1).contiguous(), len(cols)
    return (torch.stack(cols) if cols else torch.zeros(1, dtype=torch.float64, device=device)), 0


def run(launch) -> None:
    """Run ``launch`` (a :class:`fuseopt._plan.Launch` the plan checked) in one kernel call.

    A scalar given as a 1-D tensor holds one value per tensor (``capturable`` steps stacked).
    ``launch.grad_scale``/``found_inf``: GradScaler's 0-dim tensors, as torch's fused kernels
    take them.
    """
    rule, flags, scalars = launch.rule, launch.flags, launch.scalars
    operands, dtype = launch.operands, launch.dtype
    device = launch.tensors[0][0].device
    grad_scale, found_inf = launch.grad_scale, launch.found_inf
    values = list(scalars.values())
    table = dtype == torch.float64 or any(torch.is_tensor(v) for v in values)
    quant = launch.quant
    fn, names = kernel(
        rule, flags, operands, launch.dtypes, table, launch.sr, launch.kahan, quant
    )  # fmt: skip
    ptrs = _pointers(tuple(launch.address_table().ravel().tolist()), device)
    block, chunk = (INTERPRET_BLOCK, INTERPRET_CHUNK) if _interpreting() else (BLOCK, CHUNK)
    if quant:  # a quantization block per vector step; chunks of whole blocks
        block, chunk = QBLOCK, max(chunk, QBLOCK)
    chunks = _chunks(launch.numels, device, chunk)
    if table:
        scal, stride = _scalar_table([scalars[n] for n in names], len(launch.numels), device)
        scalar_args = (scal, stride)
    else:
        scalar_args = tuple(float(scalars[n]) for n in names)
    if quant:
        scalar_args += _quant_maps(device)
    fn[(chunks.shape[0],)](
        ptrs, chunks, len(launch.numels), *scalar_args,
        ptrs if grad_scale is None else grad_scale.to(device),
        ptrs if found_inf is None else found_inf.to(device),
        int(launch.scalars.get("sr_seed", 0)) if launch.sr else 0,
        SCALE=grad_scale is not None, INF=found_inf is not None, BLOCK=block, CHUNK=chunk,
        enable_fp_fusion=False,  # FMAs exactly where the rule has them, as the numba kernels
    )  # fmt: skip


def reduce(launch) -> dict[str, torch.Tensor]:
    """The rule's per-tensor sums over ``launch`` (a launch the plan checked), float64 on the
    host, one value per tensor: one program per chunk, then the chunks' sums added on the host
    in chunk order (an atomic add on the device would make their order, and the bits, vary)."""
    ops, dtypes = launch.operands, launch.dtypes
    if launch.kahan:  # (the compensation, the last row of the table, is no operand of the rule)
        ops, dtypes = ops[:-1], dtypes[:-1]
    fn, names, sums = reduce_kernel(launch.rule, launch.flags, ops, dtypes)
    if not sums:
        return {}
    device = launch.tensors[0][0].device
    n = len(launch.numels)
    ptrs = _pointers(tuple(launch.address_table().ravel().tolist()), device)
    block, chunk = (INTERPRET_BLOCK, INTERPRET_CHUNK) if _interpreting() else (BLOCK, CHUNK)
    chunks = _chunks(launch.numels, device, chunk)
    scal, stride = _scalar_table([launch.scalars[name] for name in names], n, device)
    if not names:  # (a table the kernel never reads)
        scal, stride = torch.zeros(1, dtype=torch.float64, device=device), 0
    out = torch.zeros((chunks.shape[0], len(sums)), dtype=torch.float64, device=device)
    fn[(chunks.shape[0],)](
        ptrs, chunks, n, scal, stride, out, NOUT=len(sums), BLOCK=block, CHUNK=chunk,
        enable_fp_fusion=False,
    )  # fmt: skip
    rows, tensor = out.cpu().numpy(), chunks[:, 0].cpu().numpy()
    return {
        name: torch.from_numpy(np.bincount(tensor, weights=rows[:, k], minlength=n))
        for k, name in enumerate(sums)
    }
