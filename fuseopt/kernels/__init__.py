"""Backends that evaluate an update rule: ``reference`` (per tensor), ``foreach`` (tensor lists),
``numba`` (fused CPU kernel) and ``triton`` (fused CUDA kernel). Each module has ``run(launch)``
for a :class:`fuseopt._plan.Launch`; the kernel modules are imported only when first used, and
numba and Triton only when a kernel is built, so ``import fuseopt`` stays light.
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


def run(backend: str, rule, flags, scalars: dict, params: list, grads: list, states: dict) -> None:
    """Apply ``rule`` once to lists of tensors outside an optimizer (weight averaging, tests):
    ``params`` and ``states`` (name -> list) are written in place. A kernel backend gets them
    only through :func:`fuseopt._plan.kernel_launch`, which checks what the kernel assumes
    (``ValueError`` where it does not hold)."""
    from fuseopt import _plan  # (the plan imports this package)

    if backend in ("numba", "triton"):
        launch = _plan.kernel_launch(rule, flags, scalars, params, grads, states, backend)
    else:
        tensors = [list(params), list(grads), *map(list, states.values())]
        launch = _plan.Launch(backend, rule, flags, scalars, ("param", "grad", *states), tensors)
    get(backend).run(launch)
