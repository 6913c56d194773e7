"""The fused EMA/SWA updates equal torch's (bitwise: the same ATen lerp rounding)."""

from __future__ import annotations

import pytest
import torch

from fuseopt._averaging import ema_update, swa_update


def _pairs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (70_001,), (), (0,)]
    avg = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    cur = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    return avg, cur


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.999, 1.0])
def test_ema_equals_torch_foreach_lerp(dtype, decay):
    ours, cur = _pairs(dtype)
    theirs = [a.clone() for a in ours]
    ema_update(ours, cur, decay)
    torch._foreach_lerp_(theirs, cur, 1 - decay)  # what torch's get_ema_multi_avg_fn does
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [0, 1, 7, torch.tensor(3), torch.tensor(6)], ids=str)
def test_swa_equals_torch(dtype, n):
    from torch.optim.swa_utils import get_swa_multi_avg_fn

    ours, cur = _pairs(dtype, seed=1)
    theirs = [a.clone() for a in ours]
    swa_update(ours, cur, n)
    get_swa_multi_avg_fn()(theirs, cur, n)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
