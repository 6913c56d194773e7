"""Backends that evaluate an update rule: ``reference`` (per tensor), ``foreach`` (tensor lists) and
``numba`` (fused CPU kernel). Each module has ``run(rule, flags, scalars, params, grads, states)``;
the kernel modules are imported only when first used, so ``import fuseopt`` stays light.
"""

from __future__ import annotations

import importlib

BACKENDS = {
    "reference": "fuseopt.kernels.reference",
    "foreach": "fuseopt.kernels.foreach",
    "numba": "fuseopt.kernels.numba_cpu",
}


def get(name: str):
    """The backend module called ``name``."""
    return importlib.import_module(BACKENDS[name])
