"""Pure-bfloat16 training with and without compensation: ``python -m fuseopt.bf16_convergence``.

An MLP (64-256-256-10) learns scikit-learn's bundled digits with AdamW at a small learning rate
(1e-4): the same initial weights and minibatches for four runs, float32 params, then bfloat16
params, grads and states (the forward pass too) stored to nearest, with ``kahan_sum=True``, and
with ``stochastic_rounding=True``. Adam's updates are about ``lr`` per element, below half a
bfloat16 ulp of most weights (|w| ~ 0.06: ulp 2**-12..2**-11), so to-nearest stores lose most of
them and the plain bfloat16 run stalls; the compensated ones keep them and follow float32. The
command prints the full-batch train loss of each run.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

import fuseopt

VARIANTS = {
    "float32": (torch.float32, {}),
    "bfloat16": (torch.bfloat16, {}),
    "bfloat16 + kahan_sum": (torch.bfloat16, dict(kahan_sum=True)),
    "bfloat16 + stochastic_rounding": (torch.bfloat16, dict(stochastic_rounding=True)),
}


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: 1,797 images of 8x8 pixels scaled to [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def train(variant: str, steps: int = 300, lr: float = 1e-4, batch: int = 256, data=None) -> float:
    """Train the MLP with the options of ``variant`` (a key of ``VARIANTS``); the full-batch
    train loss at the end."""
    dtype, options = VARIANTS[variant]
    x, y = data if data is not None else digits()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).to(dtype)
    opt = fuseopt.AdamW(model.parameters(), lr=lr, weight_decay=0.0, **options)
    gen = torch.Generator().manual_seed(1)
    x = x.to(dtype)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]).float(), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(x).float(), y).item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args(argv)
    data = digits()
    print(f"AdamW lr={args.lr}, {args.steps} steps of 256 digits; full-batch train loss")
    for variant in VARIANTS:
        start = time.perf_counter()
        loss = train(variant, args.steps, args.lr, data=data)
        print(f"  {variant:<32} {loss:.4f}   ({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
