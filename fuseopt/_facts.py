"""What the fused kernels assume of the tensors they walk, and how a step reads it.

The kernels read and write raw addresses; :mod:`fuseopt._plan` establishes, at every step and
before any address is read, what they assume (K1-K6 there), from the facts here: per tensor for a
step checked in full (:func:`entry_check`, :func:`storage_problem`, :func:`standard_step`), and
in bulk for a step that re-checks a group it has seen (:func:`read`): one row of facts per tensor,
``COLUMNS``.

:func:`read` takes one of two readers, which give the same rows:

- :func:`read_python`: torch's Python accessors, one C-level ``map`` over the tensors per column;
- :func:`read_shim`: torch's C shim for compiled code (``aoti_torch_get_*``, the stable C ABI of
  AOTInductor), called from one numba loop over the tensors' TensorImpl addresses (``_cdata``):
  about 20x fewer Python calls, which over many small tensors are most of a step.

The shim reader is used only where :func:`shim_works` found, on first use, that both readers
give the same rows for probe tensors of every layout a step meets (views at an offset,
transposed, sliced, 0-dim, empty, each dtype); ``FUSEOPT_FACTS=python`` turns it off. Neither
reads the negative or conjugate bit (the shim has no getter for them): callers read it with
``is_neg``.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from itertools import repeat
from operator import attrgetter, is_
from typing import Any

import numpy as np
import torch

STEP_DTYPES = (torch.float32, torch.float64)
# facts of a tensor, one column each (what kernels/_numba_ops.read_facts writes)
COLUMNS = (
    "data_ptr",
    "dtype",
    "cpu",
    "strided",
    "contiguous",
    "storage_bytes",
    "storage_offset",
    "dim",
)
MAXDIM = 8  # sizes of up to this many dims follow; a row with more is never equal to a kept one
NFACTS = len(COLUMNS) + MAXDIM
# c10::ScalarType codes, as the shim gives them (the Python reader uses the same numbers)
_DTYPE_CODES = {
    torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4,
    torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.complex32: 8,
    torch.complex64: 9, torch.complex128: 10, torch.bool: 11, torch.bfloat16: 15,
}  # fmt: skip


def _extent(t: torch.Tensor) -> int:
    """Elements from ``t``'s first to its last addressed element (strides are never negative)."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def storage_problem(t: torch.Tensor) -> str | None:
    """K4: why ``t``'s storage does not hold every byte ``t`` addresses, or None.

    torch keeps this true when a tensor is made or re-pointed, but a storage can shrink under it
    (``untyped_storage().resize_()``); then any op, torch's own too, would go outside it.
    """
    if t.layout != torch.strided or t.device.type == "meta" or t.numel() == 0:
        return None
    need = (t.storage_offset() + _extent(t)) * t.element_size()
    have = t.untyped_storage().nbytes()
    if need > have:
        return f"its storage holds {have} bytes, but its shape, strides and offset reach {need}"
    return None


def self_overlapping(t: torch.Tensor) -> bool:
    """Whether strided ``t`` repeats an element (a stride of 0 over a dim of several elements):
    torch's in-place ops refuse to write such a tensor."""
    return t.layout == torch.strided and any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride()))


def dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (any dim order): the kernels walk its storage as a flat array."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def span(t: torch.Tensor) -> tuple[int, int] | None:
    """The byte range ``[start, stop)`` that strided ``t`` addresses; None when it has no
    elements or no address (other layouts, meta)."""
    if t.layout != torch.strided or t.device.type == "meta" or t.numel() == 0:
        return None
    start = t.data_ptr()
    return start, start + _extent(t) * t.element_size()


def overlap(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    return a is not None and b is not None and a[0] < b[1] and b[0] < a[1]


def broadcasts(shape, to) -> bool:
    """Whether ``shape`` broadcasts to ``to`` (what an in-place op on a ``to`` tensor takes)."""
    try:
        return torch.broadcast_shapes(shape, to) == to
    except RuntimeError:
        return False


def kind_problem(t: torch.Tensor, p: torch.Tensor, also=None) -> str | None:
    """K2 for a grad or state ``t`` of param ``p``: why it is not of ``p``'s kind (its dtype, or
    ``also``: a state's storage format), or None."""
    if t.layout != torch.strided:
        return f"layout {t.layout}"
    if t.device != p.device:
        return f"device {t.device}, the param's is {p.device}"
    if t.dtype != p.dtype and (also is None or t.dtype != also):
        return f"dtype {t.dtype}, the param's is {p.dtype}"
    if t.is_neg() or t.is_conj():
        return "the negative or conjugate bit set"
    return None


def entry_check(p, g, tensors: dict[str, torch.Tensor], also=None) -> tuple[str | None, Any]:
    """K2, K3 and K5 within one param's kernel operands: ``(problem, grad)``.

    ``p``, ``g`` and ``tensors`` (its states) are what the kernel walks (real views, local
    shards); a state may be of dtype ``also`` (a storage format). ``problem`` says why they
    cannot take the kernel (None: they can); ``grad`` is ``g``, or a copy of it laid out like
    ``p`` where only its layout or a neg/conj bit was in the way.
    """
    if p.layout != torch.strided or p.is_neg() or p.is_conj() or not dense(p):
        return "the param is not a dense strided tensor", g
    for name, t in tensors.items():
        problem = kind_problem(t, p, also)
        if problem is None and t.stride() != p.stride():
            problem = f"strides {t.stride()}, the param's are {p.stride()}"
        if problem is not None:
            return f"state {name!r} has {problem}", g
    if g.shape != p.shape:
        return f"the grad has shape {tuple(g.shape)}", g
    problem = kind_problem(g, p)
    if problem is not None and not (g.layout == torch.strided and g.dtype == p.dtype):
        return f"the grad has {problem}", g
    if g.device != p.device:
        return f"the grad has device {g.device}", g
    if problem is not None or g.stride() != p.stride() or not dense(g):
        g = torch.empty_like(p).copy_(g)  # laid out like the param; the bits resolved
    spans = [span(t) for t in (p, *tensors.values())]
    written = [s for s in spans if s is not None]
    for i, a in enumerate(written):
        if any(overlap(a, b) for b in written[i + 1 :]) or overlap(a, span(g)):
            return "its param, grad and states share memory", g
    return None, g


def bits_problem(p, g, written: list, packed: dict[str, tuple]) -> str | None:
    """K10 for one param's 8-bit states on a kernel: why ``packed`` (``{name: (codes,
    absmax)}``) cannot be walked beside param ``p`` (what the kernel walks: ``g`` its grad,
    ``written`` its other written tensors, for which K2-K5 hold), or None.

    The kernel reads codes as flat uint8 arrays in the param's flat order, one block of
    :data:`~fuseopt._quant.BLOCK` per ``absmax`` element, so: a contiguous param; codes uint8,
    contiguous, of the param's shape; ``absmax`` float32, contiguous, exactly one element per
    block; all on the param's device, without the negative bit, and no byte of them reached
    through another tensor of the param (its grad included)."""
    from fuseopt import _quant

    if not p.is_contiguous():
        return "the param is not contiguous (its 8-bit states' blocks run in flat order)"
    want = _quant.layout(p)
    for name, pair in packed.items():
        for what, t in zip(want, pair):
            dtype, shape = want[what]
            if (
                t.layout != torch.strided
                or t.dtype != dtype
                or t.shape != shape
                or t.device != p.device
                or not t.is_contiguous()
                or t.is_neg()
            ):
                return (
                    f"the {what} of 8-bit state {name!r}: not a contiguous {dtype} {tuple(shape)}"
                )
    spans = [span(t) for pair in packed.values() for t in pair]
    others = [span(t) for t in written] + [span(g)]
    for i, a in enumerate(spans):
        if any(overlap(a, b) for b in spans[i + 1 :] + others):
            return "its 8-bit states share memory with another of its tensors"
    return None


def standard_step(step: torch.Tensor) -> bool:
    """K6: a counter the host may bump through its address."""
    return (
        step.is_cpu
        and step.numel() == 1
        and step.dtype in STEP_DTYPES
        and step.layout == torch.strided
        and not step.is_neg()
        and storage_problem(step) is None
    )


# ------------------------------------------------------------------------------ reading in bulk
_PTR, _OFFSET, _DIM = torch.Tensor.data_ptr, torch.Tensor.storage_offset, torch.Tensor.dim
_CONTIGUOUS = torch.Tensor.is_contiguous
_STORAGE, _NBYTES = torch.Tensor.untyped_storage, torch.UntypedStorage.nbytes
_DTYPE, _SHAPE, _IS_CPU, _LAYOUT, _CDATA = map(
    attrgetter, ("dtype", "shape", "is_cpu", "layout", "_cdata")
)


def read_python(tensors: list[torch.Tensor]) -> np.ndarray:
    """The facts of ``tensors`` (``COLUMNS``, then sizes), through torch's Python accessors;
    RuntimeError for a tensor without storage."""
    n = len(tensors)
    out = np.zeros((n, NFACTS), dtype=np.int64)
    if not n:
        return out
    out[:, 0] = np.fromiter(map(_PTR, tensors), np.int64, n)
    out[:, 1] = np.fromiter(map(_DTYPE_CODES.get, map(_DTYPE, tensors), repeat(-1)), np.int64, n)
    out[:, 2] = np.fromiter(map(_IS_CPU, tensors), np.int64, n)
    out[:, 3] = np.fromiter(map(is_, map(_LAYOUT, tensors), repeat(torch.strided)), np.int64, n)
    out[:, 4] = np.fromiter(map(_CONTIGUOUS, tensors), np.int64, n)
    out[:, 5] = np.fromiter(map(_NBYTES, map(_STORAGE, tensors)), np.int64, n)
    out[:, 6] = np.fromiter(map(_OFFSET, tensors), np.int64, n)
    dims = np.fromiter(map(_DIM, tensors), np.int64, n)
    out[:, 7] = dims
    for i, shape in enumerate(map(_SHAPE, tensors)):
        if 0 < len(shape) <= MAXDIM:
            out[i, 8 : 8 + len(shape)] = shape
    return out


_SHIM_GETTERS = (
    "aoti_torch_get_data_ptr", "aoti_torch_get_dtype", "aoti_torch_get_device_type",
    "aoti_torch_get_layout", "aoti_torch_is_contiguous", "aoti_torch_get_storage_size",
    "aoti_torch_get_storage_offset", "aoti_torch_get_dim", "aoti_torch_get_sizes",
)  # fmt: skip


@cache
def _getters() -> np.ndarray | None:
    """The addresses of the shim's getters in the loaded libtorch, or None."""
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            break
    else:
        return None
    try:
        lib = ctypes.CDLL(path)  # (already loaded by torch: this is a handle to it)
        return np.array(
            [ctypes.cast(getattr(lib, g), ctypes.c_void_p).value for g in _SHIM_GETTERS],
            dtype=np.int64,
        )
    except (OSError, AttributeError):
        return None


def read_shim(tensors: list[torch.Tensor]) -> np.ndarray:
    """The facts of ``tensors`` through torch's C shim (see the module docstring); a tensor
    without storage gets dim -1. The tensors stay alive (the caller holds them) throughout."""
    from fuseopt.kernels import _numba_ops

    n = len(tensors)
    impls = np.fromiter(map(_CDATA, tensors), np.int64, n)
    out = np.empty((n, NFACTS), dtype=np.int64)
    _numba_ops.read_facts(_getters(), impls, out)
    return out


def _probes() -> list[torch.Tensor]:
    """Tensors of every layout and kind a step meets."""
    base = torch.arange(60, dtype=torch.float32)
    out = [
        base, base[7:19], base.view(3, 4, 5), base.view(3, 4, 5).transpose(0, 2), base[::3],
        base[5], torch.zeros(0), torch.zeros(2, 0, 3), base.view(6, 10)[1:, 2:7],
        torch.zeros((1,) * (MAXDIM + 1)),
    ]  # fmt: skip
    out += [torch.zeros(2, 3, dtype=d) for d in _DTYPE_CODES if d is not torch.complex32]
    return out


@cache
def shim_works() -> bool:
    """Whether :func:`read_shim` may be used here: the getters exist, and both readers agree on
    :func:`_probes` (else, or with ``FUSEOPT_FACTS=python``, :func:`read_python` is)."""
    if os.environ.get("FUSEOPT_FACTS", "").lower() == "python" or _getters() is None:
        return False
    try:
        from fuseopt.kernels import numba_cpu

        if not numba_cpu.available():
            return False
        probes = _probes()
        return bool(np.array_equal(read_shim(probes), read_python(probes)))
    except Exception:  # a shim that does not behave as expected: the Python reader, always
        return False


def read(tensors: list[torch.Tensor]) -> np.ndarray:
    """The facts of ``tensors``, one row each (``COLUMNS``, then sizes), by the fastest reader
    that works here."""
    return read_shim(tensors) if shim_works() else read_python(tensors)
