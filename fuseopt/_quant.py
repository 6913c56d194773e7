"""8-bit blockwise quantization of optimizer states (``state_bits=8``).

Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization": a state tensor is cut into
blocks of :data:`BLOCK` elements, in its flat order, from its first element; each block keeps its
largest magnitude (``absmax``, float32) and each element the index (one byte) of the code of the
*dynamic map* nearest to ``value / absmax``. The dynamic map ("dynamic tree" quantization) spends
its 8 bits on a sign (signed map), a decimal exponent 10**-k (k = 0..6) and a linear fraction in
[0.1, 1] whose resolution shrinks as k grows: values that differ by orders of magnitude within a
block keep a few significant bits each. Second moments, never negative, use the unsigned map (one
more fraction bit per exponent). The maps are bitsandbytes' (``create_dynamic_map``), value for
value (tested).

The quantizer here is the spec, written with torch's ops, and every kernel computes it with the
same float32 operations, bit for bit. ``x * (1 / absmax)`` scales a block (as bitsandbytes does);
a block of zeros (``absmax == 0``) stores the code of 0. A scaled value ``y`` then takes the code
of the dynamic map's cell it lies in, found by arithmetic rather than by searching the map (a
table read per element would cost the fused kernels more than the rest of the step: measured,
numba's 8-bit AdamW step 1.9 ns per element with two table reads per code, 1.24 with this): its decade is the number of the splits
between decades (the midpoints between the last code of a decade and the first of the next, and
around 0 and 1) that it exceeds, and within a decade its fraction cell is
``floor((|y| * 10**(6-k) - 0.1) * cells / 0.9)``, clamped to the decade. Since a decade's codes
are the midpoints of equal cells, that is the nearest code, except for values within float32
rounding of a boundary between two codes (5 of 57 million values swept in the tests), which
may take the code above; bitsandbytes' own CPU quantizer is farther from nearest (0.15% of values).
A NaN takes code 0. A block holding inf or NaN stores ``absmax`` inf or NaN (its scaled values
are 0, or NaN where the value was not finite) and dequantizes to non-finite values, as a float32
state would stay non-finite.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import torch

from fuseopt import _dtensor

__all__ = [
    "BLOCK", "MIN_SIZE", "dynamic_map", "quantize", "dequantize", "encode", "blocks", "grid",
    "zero_code",
]  # fmt: skip

BLOCK = 256  # elements per block (one absmax each)
MIN_SIZE = 4096  # params with fewer elements keep full-precision states (bitsandbytes' default)
_EXPONENTS = 7  # decimal exponents 10**0 ... 10**-6


def blocks(numel: int) -> int:
    """The number of blocks (``absmax`` elements) of a state of ``numel`` elements."""
    return -(-numel // BLOCK)


def layout(p: torch.Tensor) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The dtype and shape of each half of an 8-bit state of ``p``: its ``codes`` (uint8, the
    param's shape) and its ``absmax`` (float32, one element per block)."""
    return {
        "codes": (torch.uint8, tuple(p.shape)),
        "absmax": (torch.float32, (blocks(p.numel()),)),
    }


@cache
def _map(signed: bool) -> torch.Tensor:
    parts = []
    for i in range(_EXPONENTS):
        # the fraction's cells: [0.1, 1] cut into 2**i (signed) or 2**(i+1) pieces, each cell
        # represented by its midpoint, scaled by the decade 10**(i-6) (in float32)
        cells = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, cells + 1, dtype=torch.float32)
        values = (edges[:-1] + edges[1:]) / 2 * (10.0 ** (i - _EXPONENTS + 1))
        parts += [values, -values] if signed else [values]
    parts.append(torch.tensor([0.0, 1.0]))
    out = torch.cat(parts).sort().values
    assert out.numel() == 256 and bool((out.diff() > 0).all())
    return out


@cache
def zero_code(signed: bool) -> int:
    """The code of 0.0 in the signed or unsigned map."""
    return int((_map(bool(signed)) == 0).nonzero()[0, 0])


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 codes (float32, ascending) of the signed or unsigned dynamic map."""
    return _map(bool(signed)).to(device)


def _midpoints(signed: bool) -> torch.Tensor:
    code = _map(signed)
    return (code[:-1] + code[1:]) / 2


def _scaled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (any shape) as float32 blocks ``(blocks, BLOCK)``, zero-padded, each multiplied by
    the reciprocal of its absmax (0 for a block of zeros); and the absmax."""
    flat = x.detach().reshape(-1).to(torch.float32)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)
    absmax = flat.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1 / absmax, torch.zeros_like(absmax))
    return flat * inv[:, None], absmax


def quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` quantized: ``(codes, absmax)``, codes uint8 in ``x``'s shape, absmax float32 with
    one element per block (the spec: see the module's docstring)."""
    y, absmax = _scaled(x)
    codes = encode(y, signed).reshape(-1)[: x.numel()].reshape(x.shape)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float32 values of ``codes`` (uint8, any shape) under their blocks' ``absmax``."""
    n = codes.numel()
    values = dynamic_map(signed, codes.device)[codes.reshape(-1).long()]
    values = torch.nn.functional.pad(values, (0, -n % BLOCK)).view(-1, BLOCK) * absmax[:, None]
    return values.reshape(-1)[:n].reshape(codes.shape)


# ------------------------------------------------------------------------------- the encoder
class Grid(NamedTuple):
    """The constants of the encoder of one map (all exact in float32): ``lower``, the split
    between 0 and the smallest positive code; ``splits[k - 1]``, between decade ``k - 1`` and
    decade ``k`` (k = 1..6); ``upper``, between the largest code below 1 and 1; per decade,
    ``scale`` (10**(6-k)), ``width`` (cells / 0.9 in float32), ``cells`` and ``first`` (the
    position of its first code among the non-negative codes, 0 being 0.0); ``top``, the
    position of 1.0; ``zero``, the code of 0.0 (a position ``P`` is code ``zero + P``, or
    ``zero - min(P, zero)`` for a negative value in the signed map)."""

    lower: float
    splits: tuple[float, ...]
    upper: float
    scale: tuple[float, ...]
    width: tuple[float, ...]
    cells: tuple[float, ...]
    first: tuple[float, ...]
    top: float
    zero: int


@cache
def grid(signed: bool) -> Grid:
    """The encoder's constants of the signed or unsigned map, read off the map itself."""
    signed = bool(signed)
    mids = _midpoints(signed)
    zero = zero_code(signed)
    cells = [2**k if signed else 2 ** (k + 1) for k in range(_EXPONENTS)]
    first = [c if signed else c - 1 for c in cells]  # signed: 1, 2, 4, ...; unsigned: 1, 3, 7, ...
    # the split below each decade's first code: the midpoint between it and the code before
    splits = tuple(float(mids[zero + f - 1]) for f in first)
    width = torch.tensor(cells, dtype=torch.float32) * torch.tensor(1 / 0.9, dtype=torch.float32)
    top = 255 - zero
    code = _map(signed)
    for k, (f, n) in enumerate(zip(first, cells)):  # (the map is what the grid says)
        assert (
            10.0 ** (k - 7)
            < float(code[zero + f])
            <= float(code[zero + f + n - 1])
            < 10.0 ** (k - 6)
        )
    assert float(code[zero + top]) == 1.0
    return Grid(
        lower=splits[0], splits=splits[1:], upper=float(mids[254]),
        scale=tuple(10.0 ** (6 - k) for k in range(_EXPONENTS)), width=tuple(width.tolist()),
        cells=tuple(float(n) for n in cells), first=tuple(float(f) for f in first),
        top=float(top), zero=zero,
    )  # fmt: skip


def encode(y: torch.Tensor, signed: bool) -> torch.Tensor:
    """The codes (uint8) of scaled float32 values ``y``: the kernels' arithmetic, op for op."""
    g = grid(signed)
    a = y.abs()
    s = torch.full_like(a, g.scale[0])
    w, n, f0 = (torch.full_like(a, v[0]) for v in (g.width, g.cells, g.first))
    for k, split in enumerate(g.splits, start=1):
        past = a > split
        s = torch.where(past, g.scale[k], s)
        w = torch.where(past, g.width[k], w)
        n = torch.where(past, g.cells[k], n)
        f0 = torch.where(past, g.first[k], f0)
    cell = ((a * s - 0.1) * w).floor()
    cell = torch.minimum(torch.maximum(cell, torch.zeros_like(cell)), n - 1)
    pos = torch.where(a > g.upper, g.top, torch.where(a <= g.lower, 0.0, f0 + cell))
    if signed:
        code = torch.where(
            y >= 0, g.zero + pos, g.zero - torch.minimum(pos, torch.full_like(pos, g.zero))
        )
    else:
        code = pos
    return torch.where(torch.isnan(y), 0.0, code).to(torch.uint8)


# ------------------------------------------------------------------- which states are 8-bit
def absmax_key(name: str) -> str:
    """The state key of the block scales of the 8-bit state ``name``."""
    return f"{name}_absmax"


def quantized(rule, group: dict, p: torch.Tensor) -> dict[str, bool]:
    """``{state name: signed}`` for the states of ``p`` kept in 8 bits: those its rule offers
    (:attr:`~fuseopt.rule.StateSpec.signed`) and its group's options want, in a group with
    ``state_bits=8``, for a contiguous param of at least ``min_8bit_size`` elements (the
    group's, else :data:`MIN_SIZE`); empty otherwise. Raises for a DTensor param such a
    group would keep in 8 bits (before any state is made: a step's plan asks first)."""
    if rule is None or group.get("state_bits") != 8:
        return {}
    if p.numel() < group.get("min_8bit_size", MIN_SIZE) or not p.is_contiguous():
        # (blocks run in the flat order of a contiguous state: a param laid out otherwise keeps
        # full-precision states, as a small one does)
        return {}
    out = {
        s.name: s.signed
        for s in rule.state
        if getattr(s, "signed", None) is not None and _wanted(s, group)
    }
    if out and _dtensor.is_dtensor(p):
        raise RuntimeError(
            "state_bits=8 does not support DTensor params (FSDP2's fully_shard, tensor "
            "parallelism): its blocks of 256 elements would follow each rank's shard, and its "
            "checkpoints could not be resharded; state_dtype=torch.bfloat16 halves the state "
            "of such params"
        )
    return out


def _wanted(spec, group: dict) -> bool:
    """``spec.wanted(group)``; False for a group without the options it reads (another
    algorithm's, loaded from its checkpoint: its step raises torch's KeyError, not this)."""
    try:
        return spec.wanted(group)
    except KeyError:
        return False
