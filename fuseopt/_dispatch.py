"""Which implementation steps a param, and how its state starts.

Which backend runs is decided per step from the group's flags and never written into the group
(torch keeps the user's ``None``):

- ``differentiable=True`` or a sparse grad: reference (autograd sees the step; sparse math per tensor);
- ``fused=True``: the fused kernel of the device, or torch's error where there is none;
- ``foreach=True``: foreach;
- ``foreach=False`` or ``fused=False`` (and the other not True): reference, torch's for-loop;
- both None: numba on CPU (float32, float64, bfloat16, float16 and complex) when numba is
  importable, foreach on other devices, reference otherwise. This default differs from torch's
  (for-loop on CPU): fused is faster.

Triton (``kernels/triton_gpu.py``) is the fused backend of CUDA params (float32, float16, bfloat16,
float64), and their default when Triton is importable; ``FUSEOPT_FUSED_BACKEND=triton`` makes it
the fused backend of CPU params too (Triton's interpreter, ``TRITON_INTERPRET=1``: for tests).

What a step then does with the group, and everything it checks first, is :mod:`fuseopt._plan`.
"""

from __future__ import annotations

import torch

from fuseopt import _quant, _storage
from fuseopt.kernels import numba_cpu, triton_gpu
from fuseopt.rule import Clone, Fill, ScalarState, Zeros, to_scalar

CAPTURABLE_DEVICES = ["cuda", "xpu", "hpu"]
KERNELS = ("numba", "triton")  # the backends that walk raw addresses


def scalar_dtype(fused: bool | None = None) -> torch.dtype:
    """dtype of the ``step`` tensor, as torch chooses it."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def check_fused(p: torch.Tensor) -> None:
    """torch's error for ``fused=True`` on a param the fused kernels do not cover."""
    if _triton(p):
        return
    if not (p.device.type == "cpu" and p.layout == torch.strided and _fusable(p.dtype)):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of supported "
            "devices: ['cpu'] with dtype float32, float64, bfloat16 or float16 (or "
            "complex64/complex128), "
            f"but {p.dtype} and {p.device.type}"
        )


def _fusable(dtype: torch.dtype) -> bool:
    """Whether the CPU kernels cover params of ``dtype`` (complex runs on its real view)."""
    return dtype != torch.complex32 and numba_cpu.supports(dtype.to_real())


def _triton(p: torch.Tensor) -> bool:
    """Whether the Triton kernels are the fused (and default) implementation for ``p``."""
    return (
        p.layout == torch.strided
        and triton_gpu.wanted(p.device)
        and triton_gpu.supports(p.dtype.to_real())
    )


def backend_for(group: dict, p: torch.Tensor, sparse: bool) -> str:
    """The backend that steps ``p`` (with a ``sparse`` grad or not) under ``group``'s flags;
    torch's error for ``fused=True`` where no fused kernel applies."""
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused:
        if sparse:
            raise RuntimeError("`fused=True` does not support sparse gradients")
        check_fused(p)
    if group.get("differentiable") or sparse:
        return "reference"
    if fused:
        return "triton" if _triton(p) else "numba"
    if foreach:
        return "foreach"
    if fused is None and foreach is None:
        if _triton(p):
            return "triton"
        if p.device.type == "cpu":
            # other layouts (CSR, mkldnn) have no flat storage for a kernel to walk
            fusable = p.layout == torch.strided and _fusable(p.dtype)
            return "numba" if fusable and numba_cpu.available() else "reference"
        return "foreach"
    return "reference"


def new_state(rule, group: dict, p: torch.Tensor, specs, grad: torch.Tensor | None = None) -> dict:
    """A new param's state, in torch's keys and dtypes: ``step`` and the rule's tensors
    (a :class:`~fuseopt.rule.FirstValue` is made by the first update that writes it); the
    tensors in the group's ``state_dtype`` where it has one, 8-bit (codes and block scales,
    :func:`zero_codes`) where ``state_bits=8`` quantizes them (:func:`fuseopt._quant.quantized`),
    and a bfloat16 param's ``kahan_comp`` where the group asks for ``kahan_sum``
    (:mod:`fuseopt._storage`)."""
    state = {}
    if rule.has_step:
        on_device = bool(group.get("capturable") or group.get("fused"))
        state["step"] = (
            torch.zeros((), dtype=scalar_dtype(group.get("fused")), device=p.device)
            if on_device
            else torch.tensor(0.0, dtype=scalar_dtype())
        )
    dtype = _storage.state_dtype(group, p)
    bits8 = _quant.quantized(rule, group, p)
    for spec in specs:
        if spec.name in bits8 and isinstance(spec, Zeros):
            state[spec.name], state[_quant.absmax_key(spec.name)] = zero_codes(p, bits8[spec.name])
        elif isinstance(spec, ScalarState):
            value = group[spec.key] if spec.key else spec.value
            device = p.device if spec.on_param_device or group.get("capturable") else "cpu"
            state[spec.name] = torch.as_tensor(value, dtype=scalar_dtype(), device=device).clone()
        elif isinstance(spec, Zeros):
            state[spec.name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        elif isinstance(spec, Clone):
            state[spec.name] = p.detach().clone(memory_format=torch.preserve_format).to(dtype)
        elif isinstance(spec, Fill):
            value = to_scalar(group[spec.key])
            if p.is_complex():  # the real and imaginary parts are two independent reals
                value = complex(value, value)
            like = grad if spec.like_grad and grad is not None and not grad.is_sparse else p
            fill_dtype = dtype if dtype != p.dtype else like.dtype
            state[spec.name] = torch.full_like(
                like, value, dtype=fill_dtype, memory_format=torch.preserve_format
            )
    if _storage.kahan(group, p):
        state[_storage.KAHAN] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def empty_codes(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised codes and scales for ``p`` (contiguous, as :func:`fuseopt._quant.layout`
    says; for a first value the step writes in full)."""
    return tuple(
        torch.empty(shape, dtype=dtype, device=p.device)
        for dtype, shape in _quant.layout(p).values()
    )


def zero_codes(p: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An 8-bit state of zeros for ``p``: the code of 0.0 and a zero scale per block."""
    codes, absmax = empty_codes(p)
    return codes.fill_(_quant.zero_code(signed)), absmax.zero_()


def init_state(opt, group: dict, params) -> None:
    """Create the state of ``params`` now (torch's Adagrad does it at construction)."""
    specs = [s for s in opt.rule.state if s.wanted(group)]
    for p in params:
        if not opt.state[p]:
            opt.state[p].update(new_state(opt.rule, group, p, specs))


def _reduces(opt) -> bool:
    """Whether a step of ``opt`` may run its rule's first pass (LARS, Lamb, cautious Adam)."""
    from fuseopt.rule import Flags, Rule

    rule = opt.rule
    if type(rule).reduces is Rule.reduces:  # (no rule of this kind ever reduces)
        return False
    try:
        return any(rule.reduces(Flags(rule.flags(g, False, 1.0, {}))) for g in opt.param_groups)
    except (KeyError, TypeError):  # (a group that cannot step: the step will say so)
        return True


def amp_scaling(opt) -> bool:
    """Whether every param of ``opt`` steps in the fused kernels (numba's or Triton's), which
    unscale grads and skip inf steps themselves: torch's ``_step_supports_amp_scaling``, read by
    GradScaler (torch answers yes for its fused optimizers, on CPU too)."""
    if opt.rule is None or any(g.get("max_grad_norm") is not None for g in opt.param_groups):
        return False  # (a norm over scaled grads would be wrong: GradScaler unscales first)
    if _reduces(opt):
        return False  # (the first pass's sums read the grads as GradScaler left them: likewise)
    try:
        return all(
            backend_for(g, p, False) in KERNELS for g in opt.param_groups for p in g["params"]
        )
    except RuntimeError:  # fused=True on a param no fused kernel covers: step() will say so
        return False
