"""The 8-bit blockwise quantizer (fuseopt._quant): bitsandbytes' dynamic maps, the spec quantizer
against a plain nearest-code reference written here (equal but within float32 rounding of a
boundary between codes), and numba's encoder equal to the spec bit for bit."""

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
    _assert_nearest_but_at_boundaries(codes, want_codes, x, absmax, signed)
    want_codes = codes  # (the dequantized values: those of the codes found)
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


def _assert_nearest_but_at_boundaries(codes, nearest, x, absmax, signed):
    """``codes`` equal the nearest codes but for scaled values within 2 float32 ulps of a
    midpoint between codes, which take one of the two codes."""
    y = (x.reshape(-1) * torch.repeat_interleave(1 / absmax, 256)[: x.numel()]).float()
    mids = _quant._midpoints(signed)
    i = torch.searchsorted(mids, y).clamp(1, 254)
    dist = torch.minimum((y - mids[i]).abs(), (y - mids[i - 1]).abs())
    ulp = torch.nextafter(y.abs(), torch.tensor(2.0)) - y.abs()
    differ = codes.reshape(-1) != nearest.reshape(-1)
    assert bool((dist[differ] <= 2 * ulp[differ]).all())
    assert int((codes.int() - nearest.int()).abs().max()) <= 1


def test_block_of_zeros_and_edges():
    for signed in (True, False):
        codes, absmax = _quant.quantize(torch.zeros(300), signed)
        assert bool((codes == _quant.zero_code(signed)).all()) and not absmax.any()
        code = _quant.dynamic_map(signed)
        mid = (code[100:101] + code[101:102]) / 2  # (within rounding of) a cell's edge: either
        x = torch.cat([mid, torch.ones(1)])  # absmax 1: the scaled value is the midpoint
        assert int(_quant.quantize(x, signed)[0][0]) in (100, 101)
        # NaN takes code 0, the ends of the map are reached, -1 is the signed map's lowest code
        special = torch.tensor([float("nan"), 1.0, -1.0, 0.0, -0.0])
        got = _quant.encode(special, signed).tolist()
        assert got[:2] == [0, 255] and got[3] == got[4] == _quant.zero_code(signed)
        assert got[2] == (0 if signed else 255)


def _sweep(signed: bool) -> torch.Tensor:
    """Scaled values to check the encoder on: every 37th float32 from 0 to just above 1 (and
    their negatives, signed), every midpoint between codes and its two neighbours, and the
    special values."""
    y = torch.arange(0, 0x3F810000, 37, dtype=torch.int64).to(torch.int32).view(torch.float32)
    mids = _quant._midpoints(signed)
    near = [
        mids,
        torch.nextafter(mids, torch.tensor(2.0)),
        torch.nextafter(mids, torch.tensor(-2.0)),
    ]
    y = torch.cat([y, *near])
    if signed:
        y = torch.cat([y, -y])
    return torch.cat([y, torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])])


@pytest.mark.parametrize("signed", [True, False])
def test_encode_is_nearest_but_at_boundaries(signed):
    """Over 29-58 million float32 values: the nearest code (ties low) but for values within one
    ulp of a midpoint between two codes (a handful), which take the code above."""
    y = _sweep(signed)
    y = y[torch.isfinite(y) & (y.abs() <= 1)]
    got = _quant.encode(y, signed).long()
    mids = _quant._midpoints(signed)
    nearest = torch.searchsorted(mids, y, right=False)
    differ = got != nearest
    assert int((got - nearest).abs().max()) <= 1
    # (a regular sweep meets a boundary rarely: most differences are the midpoints themselves
    # and their neighbours, which the sweep holds on purpose, 3 x 255 per sign)
    assert int(differ.sum()) <= 50 + 3 * 255 * (2 if signed else 1)
    i = nearest[differ].clamp(max=254)
    at = torch.minimum((y[differ] - mids[i]).abs(), (y[differ] - mids[(i - 1).clamp(min=0)]).abs())
    ulp = torch.nextafter(y[differ].abs(), torch.tensor(2.0)) - y[differ].abs()
    assert bool((at <= ulp).all())


@pytest.mark.parametrize("signed", [True, False])
def test_numba_codes_are_the_spec(signed):
    numba = pytest.importorskip("numba")
    from fuseopt.kernels import _numba_ops

    code = _numba_ops.code_s if signed else _numba_ops.code_u

    @numba.njit
    def codes(y, out):
        for j in range(y.shape[0]):
            out[j] = code(y[j])

    y = _sweep(signed)
    out = np.empty(y.numel(), dtype=np.uint8)
    codes(y.numpy(), out)
    assert torch.equal(torch.from_numpy(out), _quant.encode(y, signed))
    # the kernels' map is the spec's
    qmap = _numba_ops.QMAP_S if signed else _numba_ops.QMAP_U
    assert torch.equal(torch.from_numpy(qmap.copy()), _quant.dynamic_map(signed))


@pytest.mark.parametrize("signed", [True, False])
def test_grid_is_read_off_the_map(signed):
    """The encoder's constants: each decade's codes are the midpoints of its equal cells, and its
    splits are the midpoints between the decades' neighbouring codes."""
    g = _quant.grid(signed)
    code = _quant.dynamic_map(signed).double()
    for k in range(7):
        n, first = int(g.cells[k]), int(g.first[k])
        lo, width = 0.1 * 10.0 ** (k - 6), 0.9 * 10.0 ** (k - 6) / n
        centers = [lo + (j + 0.5) * width for j in range(n)]
        got = code[g.zero + first : g.zero + first + n].tolist()
        assert got == pytest.approx(centers, rel=1e-6)
        split = g.lower if k == 0 else g.splits[k - 1]
        assert split == pytest.approx(float(code[g.zero + first] + code[g.zero + first - 1]) / 2)
    assert float(code[g.zero + int(g.top)]) == 1.0


def test_kernel_blocks_are_the_spec():
    from fuseopt.kernels import numba_cpu

    assert numba_cpu.BLOCK == _quant.BLOCK and numba_cpu.CHUNK % _quant.BLOCK == 0
