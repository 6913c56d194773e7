"""The 8-bit blockwise quantizer (fuseopt._quant): bitsandbytes' dynamic maps, the spec quantizer
against a plain nearest-code reference written here, and the kernels' table method (torch's ops
and numba's) equal to the spec."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fuseopt import _quant


def _bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("signed", [True, False])
def test_maps_are_bitsandbytes(signed):
    bnb = _bnb()
    theirs = bnb.functional.create_dynamic_map(signed=signed).float()
    ours = _quant.dynamic_map(signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, theirs.sort().values)
    assert bool((ours.diff() > 0).all())
    assert float(ours[_quant.zero_code(signed)]) == 0.0


def _plain(x: torch.Tensor, signed: bool):
    """Nearest code by distance (float64), ties to the lower code; scale ``x * (1 / absmax)``
    per block of 256, 0 for a block of zeros: one element at a time."""
    code = _quant.dynamic_map(signed).double().tolist()
    flat = x.reshape(-1).float()
    codes, absmax = [], []
    for start in range(0, flat.numel(), 256):
        block = flat[start : start + 256]
        m = block.abs().max()
        inv = (1 / m) if float(m) > 0 else torch.tensor(0.0)
        absmax.append(float(m))
        for v in (block * inv).tolist():
            best = 0
            for i in range(1, 256):
                if abs(v - code[i]) < abs(v - code[best]):
                    best = i
            codes.append(best)
    return torch.tensor(codes, dtype=torch.uint8).reshape(x.shape), torch.tensor(absmax)


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_is_nearest_code(signed):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, generator=gen) * torch.logspace(-6, 0, 300)  # (not a multiple of 256)
    if not signed:
        x = x.abs()
    x.view(-1)[512:768] = 0.0  # a block of zeros (the third: blocks run in flat order)
    codes, absmax = _quant.quantize(x, signed)
    want_codes, want_absmax = _plain(x, signed)
    assert float(want_absmax[2]) == 0.0
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (_quant.blocks(x.numel()),)
    assert torch.equal(absmax, want_absmax)
    assert torch.equal(codes, want_codes)
    back = _quant.dequantize(codes, absmax, signed)
    blocks = torch.nn.functional.pad(back.reshape(-1), (0, -x.numel() % 256)).view(-1, 256)
    code = _quant.dynamic_map(signed)
    want = code[want_codes.reshape(-1).long()]
    want = torch.nn.functional.pad(want, (0, -x.numel() % 256)).view(-1, 256) * want_absmax[:, None]
    assert torch.equal(blocks, want)
    # the error of one element is at most half the widest gap between codes, times its scale
    gap = code.diff().max() / 2
    per = torch.repeat_interleave(absmax, 256)[: x.numel()].reshape(x.shape)
    assert bool(((back - x).abs() <= gap * per * (1 + 1e-6)).all())


def test_block_of_zeros_and_ties():
    for signed in (True, False):
        codes, absmax = _quant.quantize(torch.zeros(300), signed)
        assert bool((codes == _quant.zero_code(signed)).all()) and not absmax.any()
        code = _quant.dynamic_map(signed)
        mid = (code[100:101] + code[101:102]) / 2  # exactly between two codes: the lower
        x = torch.cat([mid, torch.ones(1)])  # absmax 1: the scaled value is the midpoint
        assert int(_quant.quantize(x, signed)[0][0]) == 100


def _edges(signed: bool) -> torch.Tensor:
    """The first and last float32 of every bucket of the tables, and both neighbours of every
    midpoint between codes (finite ones)."""
    _, _, shift = _quant.tables(signed)
    b = torch.arange(1 << (32 - shift), dtype=torch.int64)
    first = (b << shift).to(torch.int32).view(torch.float32)
    last = ((b << shift) | ((1 << shift) - 1)).to(torch.int32).view(torch.float32)
    mids = _quant._midpoints(signed)
    near = [
        mids,
        torch.nextafter(mids, torch.tensor(2.0)),
        torch.nextafter(mids, torch.tensor(-2.0)),
    ]
    out = torch.cat([first, last, *near])
    out = out[torch.isfinite(out)]
    return out if signed else out[out >= 0]


@pytest.mark.parametrize("signed", [True, False])
def test_table_method_is_the_spec(signed):
    y = _edges(signed)
    spec = torch.searchsorted(_quant._midpoints(signed), y, right=False)
    assert torch.equal(_quant.quantize_by_table(y, signed).long(), spec)


@pytest.mark.parametrize("signed", [True, False])
def test_numba_codes_are_the_spec(signed):
    numba = pytest.importorskip("numba")
    from fuseopt.kernels import _numba_ops

    code = _numba_ops.code_s if signed else _numba_ops.code_u

    @numba.njit
    def codes(y, out):
        for j in range(y.shape[0]):
            out[j] = code(y[j])

    y = _edges(signed)
    out = np.empty(y.numel(), dtype=np.uint8)
    codes(y.numpy(), out)
    spec = torch.searchsorted(_quant._midpoints(signed), y, right=False)
    assert torch.equal(torch.from_numpy(out).long(), spec)
    # the kernels' map tables are the spec's
    qmap = _numba_ops.QMAP_S if signed else _numba_ops.QMAP_U
    assert torch.equal(torch.from_numpy(qmap.copy()), _quant.dynamic_map(signed))


def test_kernel_blocks_are_the_spec():
    from fuseopt.kernels import numba_cpu

    assert numba_cpu.BLOCK == _quant.BLOCK and numba_cpu.CHUNK % _quant.BLOCK == 0
