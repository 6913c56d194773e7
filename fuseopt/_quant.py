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

The quantizer here is the spec: the nearest code, ties to the lower one; ``x * (1 / absmax)``
scales a block (as bitsandbytes does), and a block of zeros (``absmax == 0``) stores the code of
0. A block holding inf or NaN stores ``absmax`` inf or NaN (its scaled values are 0, or NaN where
the value was not finite: code 0) and dequantizes to non-finite values, as a float32 state would
stay non-finite.

The fused kernels cannot search a 256-entry table per element at memory speed. They find the same
code in two reads (:func:`tables`): a table indexed by the top bits of the scaled value's float32
pattern gives the lowest code its bucket can round to; the buckets are narrow enough that at most
one midpoint between codes falls inside one, so one comparison with that midpoint finishes the
search. :func:`quantize_by_table` is that method written with torch's ops, and the tests hold it
equal to :func:`quantize` on every bucket's edges.
"""

from __future__ import annotations

from functools import cache

import torch

__all__ = [
    "BLOCK", "MIN_SIZE", "dynamic_map", "quantize", "dequantize", "blocks", "tables", "zero_code",
]  # fmt: skip

BLOCK = 256  # elements per block (one absmax each)
MIN_SIZE = 4096  # params with fewer elements keep full-precision states (bitsandbytes' default)
_EXPONENTS = 7  # decimal exponents 10**0 ... 10**-6


def blocks(numel: int) -> int:
    """The number of blocks (``absmax`` elements) of a state of ``numel`` elements."""
    return -(-numel // BLOCK)


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
    one element per block. The nearest code, ties to the lower (plain torch: the spec)."""
    y, absmax = _scaled(x)
    mids = _midpoints(signed).to(y.device)
    codes = torch.searchsorted(mids, y.contiguous(), right=False)
    codes = torch.where(torch.isnan(y), 0, codes)  # (the kernels' tables give NaN code 0)
    codes = codes.reshape(-1)[: x.numel()].to(torch.uint8).reshape(x.shape)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float32 values of ``codes`` (uint8, any shape) under their blocks' ``absmax``."""
    n = codes.numel()
    values = dynamic_map(signed, codes.device)[codes.reshape(-1).long()]
    values = torch.nn.functional.pad(values, (0, -n % BLOCK)).view(-1, BLOCK) * absmax[:, None]
    return values.reshape(-1)[:n].reshape(codes.shape)


# ----------------------------------------------------------------- the fused kernels' method
def _shift(signed: bool) -> int:
    # bucket = the float32 pattern's top bits: sign, exponent and 7 mantissa bits (signed: a
    # bucket is 0.78% wide, under the 1.4% between the signed map's closest codes), or exponent
    # and 8 mantissa bits (unsigned: 0.39%, under its 0.70%): 2**16 and 2**17 buckets (the upper
    # half of the unsigned table, negative values, is read only for a NaN with its sign set)
    return 16 if signed else 15


@cache
def _tables(signed: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    shift = _shift(signed)
    mids = _midpoints(signed)
    buckets = torch.arange(1 << (32 - shift), dtype=torch.int64)
    first = (buckets << shift).to(torch.int32).view(torch.float32)  # (int64 -> int32 wraps)
    last = ((buckets << shift) | ((1 << shift) - 1)).to(torch.int32).view(torch.float32)

    def nearest(v):
        return torch.searchsorted(mids, v.contiguous(), right=False)

    lo, hi = nearest(first), nearest(last)
    finite = torch.isfinite(first) & torch.isfinite(last)
    low = torch.minimum(lo, hi)
    # every bucket of finite values spans at most two codes: one comparison decides
    assert bool(((lo - hi).abs()[finite] <= 1).all())
    low = torch.where(finite, low, torch.zeros_like(low))
    # the midpoint above each code; above the last code, +inf (nothing rounds past it)
    above = torch.cat([mids, torch.tensor([float("inf")])])
    return low.to(torch.uint8), above, shift


def tables(
    signed: bool, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The fused kernels' quantization tables: ``(lowest, above, shift)``; the code of a scaled
    value ``y`` is ``c + (y > above[c])`` where ``c = lowest[bits(y) >> shift]`` (``bits``: the
    float32 pattern read as unsigned)."""
    low, above, shift = _tables(bool(signed))
    return low.to(device), above.to(device), shift


def quantize_by_table(y: torch.Tensor, signed: bool) -> torch.Tensor:
    """The codes of already scaled float32 values ``y`` found as the kernels find them (torch's
    ops), for the tests."""
    low, above, shift = tables(signed, y.device)
    bits = y.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    c = low[(bits >> shift)].long()
    return (c + (y > above[c]).long()).to(torch.uint8)


# ------------------------------------------------------------------- which states are 8-bit
def absmax_key(name: str) -> str:
    """The state key of the block scales of the 8-bit state ``name``."""
    return f"{name}_absmax"


def quantized(rule, group: dict, p: torch.Tensor) -> dict[str, bool]:
    """``{state name: signed}`` for the states of ``p`` kept in 8 bits: those its rule offers
    (:attr:`~fuseopt.rule.StateSpec.signed`) and its group's options want, in a group with
    ``state_bits=8``, for a contiguous param of at least ``min_8bit_size`` elements (the
    group's, else :data:`MIN_SIZE`); empty otherwise."""
    if rule is None or group.get("state_bits") != 8:
        return {}
    if p.numel() < group.get("min_8bit_size", MIN_SIZE) or not p.is_contiguous():
        # (blocks run in the flat order of a contiguous state: a param laid out otherwise keeps
        # full-precision states, as a small one does)
        return {}
    return {
        s.name: s.signed
        for s in rule.state
        if getattr(s, "signed", None) is not None and _wanted(s, group)
    }


def _wanted(spec, group: dict) -> bool:
    """``spec.wanted(group)``; False for a group without the options it reads (another
    algorithm's, loaded from its checkpoint: its step raises torch's KeyError, not this)."""
    try:
        return spec.wanted(group)
    except KeyError:
        return False
