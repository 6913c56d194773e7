"""Storage formats of params and states: ``state_dtype=``, ``stochastic_rounding=``, ``kahan_sum=``,
``state_bits=``.

They change how values are *stored*, never an algorithm's math: every backend loads each operand
in its own dtype, evaluates the rule in float32, and rounds once per store:

- ``state_dtype``: the rule's state tensors (:class:`~fuseopt.rule.Zeros`, ``Fill``, ``Clone``,
  ``FirstValue``; never ``step`` nor scalar states) are kept in this dtype (bfloat16 moments of
  float32 params, or float32 moments of bfloat16 params);
- ``stochastic_rounding``: a bfloat16 store (states, and bfloat16 params) rounds up or down at
  random, with the probability of each given by the distance to it (unbiased: the expected stored
  value is the float32 value). The random bits come from a per-step seed drawn from a generator the
  optimizer holds, seeded from torch's default generator when the option is first seen (a run is
  reproducible given ``torch.manual_seed`` before the optimizer is built);
- ``kahan_sum``: a bfloat16 param carries the rounding error of its last store in a bfloat16
  buffer, state ``kahan_comp``, added to its next update (Kahan summation).
- ``state_bits=8``: the states the algorithm offers in 8 bits (:attr:`~fuseopt.rule.StateSpec.
  signed`: Adam's and AdamW's moments, SGD's momentum, Lion's and AdEMAMix's moments) are kept
  blockwise quantized (:mod:`fuseopt._quant`): ``state[name]`` holds uint8 codes in the param's
  shape, ``state[name + "_absmax"]`` a float32 scale per block of 256 elements; params of fewer
  than ``min_8bit_size`` elements (a group key, default 4096, as bitsandbytes'), and params that
  are not contiguous, keep full-precision states. Each step dequantizes, runs the rule in
  float32 and quantizes the new values again.

A group option is present only where it was asked for, so that groups stay torch's. The plan
(:mod:`fuseopt._plan`) routes an entry of such a group to the kernels with a dtype per operand;
the for-loop and foreach backends widen the operands to float32, run the rule with torch's ops
and round on the write-back, so that they remain the oracle of the fused kernels.
"""

from __future__ import annotations

from typing import Any

import torch

from fuseopt import _dtensor
from fuseopt.rule import Flags, Rule, ScalarState

__all__ = ["options", "check_group", "widened", "COMPUTE"]

#: the state dtypes offered, and the params they may be given to (real, computed in float32)
STATE_DTYPES = (torch.float32, torch.bfloat16)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COMPUTE = torch.float32  # what an entry with a storage format computes in
KAHAN = "kahan_comp"  # the state key of a bfloat16 param's compensation
# group keys, only where asked (``min_8bit_size``: a key users set in a group, with state_bits)
OPTIONS = ("state_dtype", "stochastic_rounding", "kahan_sum", "state_bits", "min_8bit_size")
STATE_BITS = (8,)  # besides None: full precision


def options(
    state_dtype: Any, stochastic_rounding: Any, kahan_sum: Any, state_bits: Any = None
) -> dict:
    """The group options for a constructor's storage arguments, checked: only those asked for
    (none by default), so that the groups stay torch's."""
    if state_bits is not None and (isinstance(state_bits, bool) or state_bits not in STATE_BITS):
        raise ValueError(f"Invalid state_bits: {state_bits} (8, or None for full precision)")
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(
            f"Invalid state_dtype: {state_dtype} (torch.float32 or torch.bfloat16, or None for "
            "the param's dtype)"
        )
    for name, value in (("stochastic_rounding", stochastic_rounding), ("kahan_sum", kahan_sum)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    out: dict[str, Any] = {}
    if state_dtype is not None:
        out["state_dtype"] = state_dtype
    if stochastic_rounding:
        out["stochastic_rounding"] = True
    if kahan_sum:
        out["kahan_sum"] = True
    if state_bits is not None:
        out["state_bits"] = state_bits
    return out


def asked(group: dict) -> bool:
    """Whether ``group`` asks for any storage format."""
    return (
        group.get("state_dtype") is not None
        or bool(group.get("stochastic_rounding"))
        or bool(group.get("kahan_sum"))
        or group.get("state_bits") is not None
    )


def check_group(rule, group: dict) -> None:
    """A clear error, when a group is added, for storage options its optimizer or params cannot
    take."""
    if "min_8bit_size" in group:
        size = group["min_8bit_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"Invalid min_8bit_size: {size!r} (an int >= 0)")
    if not asked(group):
        return
    if rule is None:
        raise ValueError(
            "state_dtype, stochastic_rounding, kahan_sum and state_bits apply to elementwise "
            "optimizers only"
        )
    options(
        group.get("state_dtype"), group.get("stochastic_rounding", False),
        group.get("kahan_sum", False), group.get("state_bits"),
    )  # fmt: skip
    if group.get("differentiable"):
        raise ValueError(
            "state_dtype, stochastic_rounding, kahan_sum and state_bits are not supported with "
            "differentiable=True"
        )
    if group.get("state_bits") is not None:
        _check_bits(rule, group)
    if group.get("stochastic_rounding") and group.get("capturable"):
        raise ValueError(
            "stochastic_rounding=True is not supported with capturable=True: its seed is drawn "
            "on the host at every step"
        )
    sd = group.get("state_dtype")
    if sd is not None:
        tensors = [s for s in rule.state if not isinstance(s, ScalarState) and s.wanted(group)]
        if not tensors:
            raise ValueError(
                f"state_dtype={sd}: this optimizer keeps no elementwise state with these options"
            )
    for p in group["params"]:
        if p.dtype == torch.float16:
            for name in ("kahan_sum", "stochastic_rounding"):
                if group.get(name):  # (they would leave its store rounded to nearest, silently)
                    raise ValueError(
                        f"{name}=True applies to bfloat16 params and stores, got a float16 "
                        "param, whose store would round to nearest (float16 training keeps "
                        "float32 params; or train in bfloat16)"
                    )
        if p.dtype not in PARAM_DTYPES:
            given = [n for n in ("state_dtype", "stochastic_rounding", "kahan_sum", "state_bits")
                     if group.get(n) not in (None, False)]  # fmt: skip
            raise ValueError(
                f"{', '.join(given)}: these storage options (state_dtype, stochastic_rounding, "
                "kahan_sum, state_bits) need float32, bfloat16 or float16 params (computed in "
                f"float32), got a param of {p.dtype}"
            )


def _check_bits(rule, group: dict) -> None:
    """Errors for ``state_bits=8`` where the algorithm, or its options, keep no state it may
    quantize, or step in a way 8-bit states do not support."""
    if not any(getattr(s, "signed", None) is not None and s.wanted(group) for s in rule.state):
        raise ValueError(
            "state_bits=8 is offered by Adam, AdamW, SGD with momentum, Lion and AdEMAMix "
            "(this optimizer, with these options, keeps no state it may store in 8 bits)"
        )
    if group.get("capturable"):
        raise ValueError(
            "state_bits=8 is not supported with capturable=True (its kernels are not capturable)"
        )
    if type(rule).reduces is not Rule.reduces:
        try:
            reduces = rule.reduces(Flags(rule.flags(group, False, 1.0, {})))
        except (KeyError, TypeError):
            reduces = False
        if reduces:  # (the first pass would read the codes as values)
            raise ValueError(
                "state_bits=8 is not supported with options whose step first sums over its "
                "tensors (cautious=True)"
            )


def widened(group: dict, p: torch.Tensor) -> bool:
    """Whether ``p``'s entry computes in float32 with a dtype per operand (a storage format)."""
    return asked(group) and p.dtype in PARAM_DTYPES


def state_dtype(group: dict, p: torch.Tensor) -> torch.dtype:
    """The dtype of ``p``'s new state tensors."""
    sd = group.get("state_dtype")
    return p.dtype if sd is None or p.dtype not in PARAM_DTYPES else sd


def kahan(group: dict, p: torch.Tensor) -> bool:
    """Whether ``p``'s update is compensated (``kahan_sum`` on a bfloat16 param)."""
    return bool(group.get("kahan_sum")) and p.dtype == torch.bfloat16


def check_sparse(rule, group: dict, p: torch.Tensor, states: tuple, param_store: bool) -> None:
    """Errors, raised before a step with a sparse grad of ``p`` changes anything, for the storage
    options its sparse step cannot honour: an 8-bit state (quantized in blocks of the whole
    tensor), and stochastic rounding of a bfloat16 store of the sparse step, whose random bits
    could not be those of the dense step. ``states``: the state tensors the sparse step
    stores; ``param_store``: whether it stores the param too (Adagrad's plain code; SGD's
    for-loop rounds the param as a dense step does, with its random bits)."""
    from fuseopt import _quant  # (it needs nothing of this module; imported where used)

    if _quant.quantized(rule, group, p):
        raise RuntimeError(
            "state_bits=8 option is not compatible with sparse gradients: 8-bit states are "
            "quantized in blocks of the whole tensor (keep this param's states in full "
            "precision: state_bits=None, or a min_8bit_size above its size)"
        )
    if not group.get("stochastic_rounding"):
        return
    stored = [f"state {n!r}" for n in states if state_dtype(group, p) == torch.bfloat16]
    if param_store and p.dtype == torch.bfloat16 and not kahan(group, p):
        stored.insert(0, "param")
    if stored:
        raise RuntimeError(
            "stochastic_rounding option is not compatible with sparse gradients where the "
            f"sparse step stores a bfloat16 {' and '.join(stored)}: it cannot draw the random "
            "bits of the dense step (stochastic_rounding=False rounds it to nearest; or store it "
            "in float32)"
        )


# ------------------------------------------------------------------------ torch's ops (oracle)
def sr_bits(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 ``x`` rounded stochastically to bfloat16: 16 random low bits added, then cut
    off (an exact bfloat16 value, as float32). NaN and inf stay as they are. A DTensor is
    rounded shard by shard, each rank its own (the noise is drawn for its local shard)."""
    if _dtensor.is_dtensor(x):
        rounded = sr_bits(x.to_local(), generator)
        return type(x).from_local(
            rounded, x.device_mesh, x.placements, run_check=False, shape=x.shape,
            stride=x.stride(),
        )  # fmt: skip
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=generator)
    out = ((bits + noise) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), out, x)


def write(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None) -> None:
    """``target.copy_(value)``; stochastically rounded where ``generator`` is given and
    ``target`` is bfloat16 (``value`` float32). A sparse ``value`` (SGD's momentum under a
    sparse grad) is coalesced first, so that each element is stored once, rounded once (see
    :func:`check_sparse`: such a store is never stochastic)."""
    if value.is_sparse:
        # (its repeated indices summed in float32 here: copied as they are, each piece would
        # be rounded to the state's dtype on its own, and summed again in it when read)
        value = value.coalesce()
    elif generator is not None and target.dtype == torch.bfloat16 and value.dtype == COMPUTE:
        value = sr_bits(value.contiguous(), generator)
    target.copy_(value)


def seed_generator(seed: int) -> torch.Generator:
    """A CPU generator for the for-loop's random bits of one launch."""
    return torch.Generator().manual_seed(seed)


def added(opt, group: dict) -> None:
    """Check a group just added to ``opt`` (:func:`check_group`) and, where it is the first to
    ask for ``stochastic_rounding``, seed ``opt``'s generator from torch's default one (so that
    ``torch.manual_seed`` before building the optimizer makes its runs reproducible; other
    optimizers draw nothing, and leave torch's random stream as torch's would)."""
    check_group(opt.rule, group)
    if group.get("stochastic_rounding") and "_storage_rng" not in opt.__dict__:
        seed = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
        opt._storage_rng = torch.Generator().manual_seed(seed)


def draw_seed(opt) -> int:
    """The seed of one launch's stochastic rounding: the next number of ``opt``'s generator
    (below 2**52: exact as the float64 the numba kernels read their scalars in)."""
    rng = opt.__dict__.get("_storage_rng")
    if rng is None:  # (a group given the option after construction, e.g. by load_state_dict)
        added(opt, {"params": [], "stochastic_rounding": True})
        rng = opt._storage_rng
    return int(torch.randint(0, 1 << 52, (), dtype=torch.int64, generator=rng))


def kahan_write(p: torch.Tensor, new: torch.Tensor, comp: torch.Tensor) -> None:
    """Store float32 ``new`` into bfloat16 param ``p`` with Kahan summation: the compensation
    ``comp`` joins the update, ``p`` takes the sum rounded to nearest, and ``comp`` what that
    rounding lost (the fused kernels' arithmetic, op for op)."""
    rounded, lost = kahan_sum(p, new, comp)
    comp.copy_(lost)
    p.copy_(rounded)


def kahan_sum(
    old: torch.Tensor, new: torch.Tensor, comp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Kahan store of float32 ``new`` over the bfloat16 values ``old`` with their
    compensation ``comp``, written nowhere: ``(stored, lost)``, the value to store (in ``old``'s
    dtype, rounded to nearest) and the new compensation (float32). :func:`kahan_write` on whole
    tensors; a sparse grad's step on the rows it touches."""
    wide = old.float()
    y = (new - wide) + comp.float()
    rounded = (wide + y).to(old.dtype)
    return rounded, y - (rounded.float() - wide)


def carry_options(ours: dict, saved: dict) -> None:
    """Give a loaded group ``saved`` our group's storage options where it has none (a torch
    checkpoint loaded into an optimizer that keeps bfloat16 states: its states are converted, and
    the format stays); a saved option wins, as every option of a loaded group does."""
    for key in OPTIONS:
        if key in ours and key not in saved:
            saved[key] = ours[key]


def loaded_dtype(param: torch.Tensor, value: torch.Tensor, key, state_dtype) -> torch.dtype:
    """The dtype a loaded floating state ``value`` of ``param`` takes: the group's
    ``state_dtype`` for a tensor shaped like the param (an elementwise state; not a bfloat16
    param's ``kahan_comp``), else the param's (torch's)."""
    if (
        state_dtype is not None
        and param.dtype in PARAM_DTYPES
        and key != KAHAN
        and value.shape == param.shape
    ):
        return state_dtype
    return param.dtype
