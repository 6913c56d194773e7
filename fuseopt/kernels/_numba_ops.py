"""Scalar helpers for generated numba kernels, matching ATen's CPU formulas (see ``ops.py``).

Imported by the generated kernel modules, so they are module-level and cache-safe.
"""

import importlib.util
import math
import sys

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


def _lazy_blas_probe() -> None:
    """Load numba's ``arraymath`` without importing SciPy.

    At its first compile numba imports ``arraymath``, which imports ``scipy.linalg`` (0.1-0.3 s of
    a new process's first step) only to set a "BLAS is available" flag. Here the flag comes from
    whether SciPy is installed; numba's real check still runs when a kernel uses BLAS.
    """
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return  # already paid for, or numba has already looked
    from numba.np import linalg

    real = linalg.ensure_blas

    def installed():
        if importlib.util.find_spec("scipy") is None:
            raise ImportError("scipy is not installed")

    linalg.ensure_blas = installed
    try:
        from numba.np import arraymath
    finally:
        linalg.ensure_blas = real
    arraymath.ensure_blas = real


_lazy_blas_probe()


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (LLVM's ``llvm.fma``), as ATen's vectorised CPU kernels compute."""
    if not (a == b == c and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [t], ir.FunctionType(t, [t, t, t]))
        return builder.call(fn, args)

    return a(a, a, a), codegen


def _pointer_cast(nbtype):
    @intrinsic
    def cast(typingctx, addr):
        """Reinterpret an int64 address as a typed pointer (one kernel walks many tensors)."""
        if not isinstance(addr, types.Integer):
            return None
        ret = types.CPointer(nbtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], ir.PointerType(context.get_data_type(nbtype)))

        return ret(addr), codegen

    return cast


ptr_float32 = _pointer_cast(types.float32)
ptr_float64 = _pointer_cast(types.float64)
ptr_uint16 = _pointer_cast(types.uint16)  # bfloat16 and float16 storage: numba has no bfloat16
ptr_uint8 = _pointer_cast(types.uint8)  # 8-bit states' codes

_I16, _I32, _F32 = ir.IntType(16), ir.IntType(32), ir.FloatType()


@intrinsic
def load_bf16(typingctx, bits):
    """The float32 value of bfloat16 ``bits`` (exact: bfloat16 is float32's upper half)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], _I32), _I32(16))
        return builder.bitcast(wide, _F32)

    return types.float32(bits), codegen


def _bf16_bits(builder, x, upper):
    """The 16 bits a bfloat16 store writes for float32 ``x`` whose result is ``upper`` (an i32):
    0xFFFF for NaN, as ATen's vectorised conversion, else ``upper``."""
    nan = builder.fcmp_unordered("uno", x, x)
    return builder.trunc(builder.select(nan, _I32(0xFFFF), upper), _I16)


@intrinsic
def store_bf16(typingctx, x):
    """``x`` rounded to bfloat16 bits, to nearest even; NaN becomes 0xFFFF (as ATen's vectorised
    conversion, what ``tensor.bfloat16()`` gives)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], _I32)
        odd = builder.and_(builder.lshr(bits, _I32(16)), _I32(1))  # ties go to the even neighbour
        rounded = builder.lshr(builder.add(bits, builder.add(odd, _I32(0x7FFF))), _I32(16))
        return _bf16_bits(builder, args[0], rounded)

    return types.uint16(x), codegen


@intrinsic
def store_bf16_exact(typingctx, x):
    """The bfloat16 bits of ``x``, a value bfloat16 holds exactly (a loaded operand, a select among
    such): its upper half, no rounding; NaN becomes 0xFFFF as in :func:`store_bf16`."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        upper = builder.lshr(builder.bitcast(args[0], _I32), _I32(16))
        return _bf16_bits(builder, args[0], upper)

    return types.uint16(x), codegen


@intrinsic
def store_bf16_sr(typingctx, x, noise):
    """``x`` rounded stochastically to bfloat16 bits: ``noise`` (16 random bits, an uint32) added
    to its bits, then the low half cut off. Rounds away from zero with probability equal to the
    fraction of the gap below ``x`` (unbiased); inf stays inf, NaN becomes 0xFFFF."""
    if x != types.float32 or noise != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], _I32)
        upper = builder.lshr(builder.add(bits, args[1]), _I32(16))
        return _bf16_bits(builder, args[0], upper)

    return types.uint16(x, noise), codegen


@intrinsic
def mag_bits(typingctx, x):
    """The bits of ``abs(x)`` (float32) as an uint32: ordered as the magnitudes are, NaN above
    inf (an integer max over them is the float max, NaN-propagating, and vectorises)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.and_(builder.bitcast(args[0], _I32), _I32(0x7FFFFFFF))

    return types.uint32(x), codegen


@numba.njit(inline="always")
def umax(a, b):
    """The larger of two uint32."""
    return a if a > b else b


@intrinsic
def bits_f32(typingctx, bits):
    """The float32 whose bits are the uint32 ``bits``."""
    if bits != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _F32)

    return types.float32(bits), codegen


# -------------------------------------------------------------------------------- 8-bit states
def _quant_map(signed: bool) -> np.ndarray:
    """The dynamic map (float32, 256) of :mod:`fuseopt._quant`, a module-owned constant (numba
    freezes it into the kernels) whose size is checked: every index a kernel forms (a code) is
    inside it (K10)."""
    from fuseopt import _quant

    qmap = _quant.dynamic_map(signed).numpy().astype(np.float32)
    if qmap.shape != (256,):
        raise AssertionError("fuseopt: 8-bit quantization map of unexpected size")
    qmap.setflags(write=False)
    return qmap


QMAP_S = _quant_map(True)  # signed states
QMAP_U = _quant_map(False)  # unsigned (second moments)


def _encoder(signed: bool):
    """The code of a scaled value in the signed or unsigned map: :func:`fuseopt._quant.encode`'s
    float32 operations, in its order, on one value (its constants written into the source; the
    chain of comparisons compiles to vector selects)."""
    from fuseopt import _quant

    g = _quant.grid(signed)
    f32 = "np.float32({!r})".format
    lines = [
        "def code(y):",
        "    a = abs(y)",
        f"    s, w, n, f0 = {f32(g.scale[0])}, {f32(g.width[0])}, {f32(g.cells[0])}, {f32(g.first[0])}",
    ]
    for k, split in enumerate(g.splits, start=1):
        lines += [
            f"    if a > {f32(split)}:",
            f"        s, w, n, f0 = {f32(g.scale[k])}, {f32(g.width[k])}, {f32(g.cells[k])}, "
            f"{f32(g.first[k])}",
        ]
    lines += [
        "    cell = np.floor((a * s - np.float32(0.1)) * w)",
        "    cell = min(max(cell, np.float32(0.0)), n - np.float32(1.0))",
        "    pos = f0 + cell",
        f"    pos = np.float32(0.0) if a <= {f32(g.lower)} else pos",
        f"    pos = {f32(g.top)} if a > {f32(g.upper)} else pos",
    ]
    zero = f32(float(g.zero))
    if signed:
        lines.append(f"    c = {zero} + pos if y >= np.float32(0.0) else {zero} - min(pos, {zero})")
    else:
        lines.append("    c = pos")
    lines += ["    c = np.float32(0.0) if y != y else c", "    return np.uint8(np.int32(c))"]
    scope = {"np": np}
    exec("\n".join(lines), scope)  # (our own source, built from the map's constants)
    return numba.njit(inline="always")(scope["code"])


code_s = _encoder(True)
code_s.__doc__ = "The code of the scaled float32 value ``y`` in the signed map."
code_u = _encoder(False)
code_u.__doc__ = "The code of the scaled float32 value ``y`` in the unsigned map."


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(inline="always")
def _mix(z):
    """splitmix64's finaliser: a bijection of the 64-bit ``z`` whose output bits all depend on
    every input bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def sr_key(seed, t, k):
    """The key (an uint32) of the random stream of operand ``k`` of tensor ``t`` under a
    launch's ``seed``: the upper half of a 64-bit mix (once per chunk; the per-element hash,
    :func:`sr_bits`, works in 32-bit lanes)."""
    z = _mix(seed + (np.uint64(t) * np.uint64(64) + np.uint64(k) + np.uint64(1)) * _GOLDEN)
    return np.uint32(z >> np.uint64(32))


_MURMUR = (0x85EBCA6B, 0xC2B2AE35)  # murmur3's 32-bit finaliser's multipliers
_GOLDEN32 = 0x9E3779B9


@intrinsic
def sr_bits(typingctx, key, i):
    """16 random bits (an uint32) for element ``i`` of the stream ``key``, counter-based: any
    element, in any order, on any thread, gets the same bits. The low 32 bits of ``i`` times the
    golden ratio, xor ``key``, through murmur3's 32-bit finaliser (a bijection: over 2**32
    consecutive elements every 16-bit value comes equally often); its upper half. In 32-bit
    integer ops, as Triton's ``sr_noise``: 16 lanes to an AVX-512 vector (a 64-bit hash took
    a bfloat16 AdamW step with three stochastic stores from 5.4 to 9.1 ms on 16.8M elements;
    this, 7.0)."""
    if key != types.uint32 or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        b = builder
        index = b.trunc(args[1], _I32) if args[1].type.width > 32 else args[1]
        x = b.xor(b.mul(index, _I32(_GOLDEN32)), args[0])
        for shift, factor in zip((16, 13), _MURMUR):
            x = b.mul(b.xor(x, b.lshr(x, _I32(shift))), _I32(factor))
        x = b.xor(x, b.lshr(x, _I32(16)))
        return b.lshr(x, _I32(16))

    return types.uint32(key, i), codegen


@intrinsic
def load_f16(typingctx, bits):
    """The float32 value of IEEE half ``bits`` (exact; one instruction with F16C)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)

    return types.float32(bits), codegen


@intrinsic
def store_f16(typingctx, x):
    """``x`` rounded to IEEE half bits, to nearest even (as c10::Half)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return types.uint16(x), codegen


@numba.njit(inline="always")
def lerp(a, b, w, one):
    """ATen's two-sided lerp: ``a + w*(b-a)`` for ``|w| < 0.5``, else ``b - (b-a)*(1-w)``, FMA."""
    d = b - a
    if abs(w) < 0.5:
        return fma(w, d, a)
    return fma(-d, one - w, b)


@numba.njit(inline="always")
def maximum(a, b):
    """``torch.maximum``: NaN if either operand is NaN."""
    if a != a or b != b:
        return a + b
    return a if a > b else b


@numba.njit(inline="always")
def minimum(a, b):
    """``torch.minimum``: NaN if either operand is NaN."""
    if a != a or b != b:
        return a + b
    return a if a < b else b


@numba.njit(inline="always")
def sign(a, one, zero):
    """``torch.sign``: 1, -1, or 0 (also for NaN and -0.0); ``one``/``zero`` carry the type."""
    if a > 0:
        return one
    if a < 0:
        return -one
    return zero


@numba.njit(inline="always")
def clamp(a, lo, hi):
    """``torch.clamp(a, lo, hi)``: NaN stays NaN; ``lo > hi`` gives ``hi``."""
    if a != a:
        return a
    return min(max(a, lo), hi)


@numba.njit(inline="always")
def sqrt(a):
    """Square root (correctly rounded; torch's vectorised fp32 sqrt is within 1 ulp of it)."""
    return math.sqrt(a)


@numba.njit(cache=True, nogil=True)
def read_steps(ptrs, double):
    """The scalars at ``ptrs`` (the ``step`` tensors: float64 if ``double``, else float32), as
    float64."""
    out = np.empty(len(ptrs))
    for i in range(len(ptrs)):
        if double:
            out[i] = numba.carray(ptr_float64(ptrs[i]), 1)[0]
        else:
            out[i] = numba.carray(ptr_float32(ptrs[i]), 1)[0]
    return out


@numba.njit(cache=True, nogil=True)
def bump_steps(ptrs, double):
    """Add 1 to the scalars at ``ptrs`` (the ``step`` tensors: float64 if ``double``, else
    float32), in their dtype."""
    for i in range(len(ptrs)):
        if double:
            x = numba.carray(ptr_float64(ptrs[i]), 1)
            x[0] += 1.0
        else:
            y = numba.carray(ptr_float32(ptrs[i]), 1)
            y[0] += np.float32(1.0)


# ------------------------------------------------------------------------- tensor facts, in bulk
ptr_int64 = _pointer_cast(types.int64)
# columns of a facts row (fuseopt._facts.COLUMNS): data address, dtype (c10::ScalarType), on the
# CPU, strided, contiguous, storage bytes, storage offset, dim, then up to MAXDIM sizes
MAXDIM = 8
NFACTS = 8 + MAXDIM


@intrinsic
def call_getter(typingctx, fn, handle, out):
    """Call the C function at address ``fn`` as ``int32 fn(handle, out)`` (pointers passed as
    64-bit integers): one ``aoti_torch_get_*`` getter of torch's C shim."""
    if not all(isinstance(x, types.Integer) for x in (fn, handle, out)):
        return None

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(ir.IntType(32), [i64, i64])
        a = [builder.sext(x, i64) if x.type.width < 64 else x for x in args]
        return builder.call(builder.inttoptr(a[0], fnty.as_pointer()), a[1:])

    return types.int32(fn, handle, out), codegen


@numba.njit(cache=True)
def read_facts(getters, impls, out):
    """One row of facts per tensor, read through torch's C shim (``getters``: the addresses of
    aoti_torch_get_data_ptr, get_dtype, get_device_type, get_layout, is_contiguous,
    get_storage_size, get_storage_offset, get_dim, get_sizes). ``impls`` holds each tensor's
    TensorImpl address: the address of ``impls[i]`` is then an ``at::Tensor*`` (an at::Tensor is
    one pointer to its TensorImpl), the handle the shim takes; the caller keeps the tensors
    alive. A getter that fails (a tensor with no storage) leaves its row with dim -1."""
    slot = np.zeros(1, np.int64)
    s = slot.ctypes.data
    base = impls.ctypes.data
    for i in range(impls.shape[0]):
        h = base + 8 * i
        row = out[i]
        row[:] = 0
        failed = False
        for k in range(8):
            slot[0] = 0
            if call_getter(getters[k], h, s) != 0:
                failed = True
                break
            v = slot[0]
            if k == 1:
                v = v & 0xFFFFFFFF  # an int32 written in the low half
            elif k == 2 or k == 3:  # CPU and strided are 0 in c10's enums
                v = 1 if (v & 0xFFFFFFFF) == 0 else 0
            elif k == 4:
                v = v & 0xFF  # a bool
            row[k] = v
        if failed:
            row[7] = -1
            continue
        dim = row[7]
        if dim > MAXDIM:
            continue
        slot[0] = 0
        if call_getter(getters[8], h, s) != 0:
            row[7] = -1
            continue
        if dim > 0:
            sizes = numba.carray(ptr_int64(slot[0]), dim)
            for d in range(dim):
                row[8 + d] = sizes[d]
