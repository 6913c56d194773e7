"""Backends that evaluate an update rule: ``reference`` (per tensor), ``foreach`` (tensor lists),
``numba`` (fused CPU kernel) and ``triton`` (fused CUDA kernel). Each module has
``run(rule, flags, scalars, params, grads, states)``; the kernel modules are imported only when
first used, and numba and Triton only when a kernel is built, so ``import fuseopt`` stays light.
"""

from __future__ import annotations

import importlib

BACKENDS = {
    "reference": "fuseopt.kernels.reference",
    "foreach": "fuseopt.kernels.foreach",
    "numba": "fuseopt.kernels.numba_cpu",
    "triton": "fuseopt.kernels.triton_gpu",
}


def get(name: str):
    """The backend module called ``name``."""
    return importlib.import_module(BACKENDS[name])
