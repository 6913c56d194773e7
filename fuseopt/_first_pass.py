"""The step's first pass, before anything changes: global grad-norm clipping
(``max_grad_norm=``), skipping a step whose grads are not finite (``skip_if_nonfinite=``), and
a rule's per-tensor sums (:meth:`fuseopt.rule.Rule.reduce`: LARS, Lamb, cautious Adam, Prodigy).

A step that clips gives the numbers of ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm,
norm_type, error_if_nonfinite, foreach=True)`` followed by the step, over the params of every
group that clips (one norm over all of them, as one call over all their params), but it writes no
grad: after every group is planned (checked) and before anything changes, one pass reads each grad
once for its norm, and the rule multiplies each grad by the clip coefficient as it reads it
(:meth:`fuseopt.rule.Rule.apply`). Bytes moved: one read of the grads more than the step, where
``clip_grad_norm_`` reads them twice and writes them once.

The norms: numba's reduction kernel over the grads' addresses in the plan's launches (what the
plan checked for the step's kernel, K1-K5 of :mod:`fuseopt._plan`, holds for the reduction too:
it reads the grad rows and nothing else), accumulated in float64; torch's ``_foreach_norm`` for
the grads of every other backend, as ``clip_grad_norm_`` computes them. The host math after them
is torch's, on the same tensors: the total norm of the per-tensor norms, the non-finite check,
``max_norm / (total + 1e-6)`` clamped to 1.

``skip_if_nonfinite=True`` (optax's ``apply_if_finite``): where a grad of a group that sets it
holds an inf or a NaN, no group steps: params, state and step counts stay as they are, and
``opt.stepped`` says so. A finite total norm of the clipping groups settles it without another
pass (a sum of finite squares is finite only if each is); else one pass of ``x * 0`` sums (NaN
exactly where an element is inf or NaN).

A rule's sums: each launch whose flags ask for them (:meth:`~fuseopt.rule.Rule.reduces`) gets
the per-tensor sums of :meth:`~fuseopt.rule.Rule.reduce` (numba's or Triton's reduction kernel
over the launch's checked addresses, float64; torch's ops elsewhere), and the rule's
:meth:`~fuseopt.rule.Rule.step_scalars` turns the sums of every launch of the step, all groups
together, into each launch's scalars (by default :meth:`~fuseopt.rule.Rule.tensor_scalars` per
launch: LARS's trust ratios; Prodigy totals them into one step size, ``shares_sums``). It may
skip the step (nothing changes), and hand back a function that writes the step's group values:
that runs with the first plan's step bumps, so only where the step runs, after every check.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fuseopt import _compile

__all__ = ["clips", "options", "prepare"]


def check(max_grad_norm: Any, norm_type: Any, error_if_nonfinite: Any) -> None:
    """A clear error for clipping options outside their range."""
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise TypeError(
            f"max_grad_norm must be a number or None, got {type(max_grad_norm).__name__}"
        )
    if not 0.0 < max_grad_norm < math.inf:
        raise ValueError(
            f"Invalid max_grad_norm value: {max_grad_norm} (a positive finite number, or None "
            "for no clipping)"
        )
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise TypeError(f"norm_type must be a number, got {type(norm_type).__name__}")
    if not norm_type > 0.0:  # (NaN too)
        raise ValueError(f"Invalid norm_type value: {norm_type} (a positive number, or inf)")
    if not isinstance(error_if_nonfinite, bool):
        raise TypeError(
            f"error_if_nonfinite must be a bool, got {type(error_if_nonfinite).__name__}"
        )


def options(
    max_grad_norm: Any, norm_type: Any, error_if_nonfinite: Any, skip_if_nonfinite: Any = False
) -> dict:
    """The group options for a constructor's arguments, checked: only those asked for (none by
    default), so that the groups stay torch's."""
    if not isinstance(skip_if_nonfinite, bool):
        raise TypeError(
            f"skip_if_nonfinite must be a bool, got {type(skip_if_nonfinite).__name__}"
        )
    out = {"skip_if_nonfinite": True} if skip_if_nonfinite else {}
    if max_grad_norm is None:
        return out
    check(max_grad_norm, norm_type, error_if_nonfinite)
    return dict(
        max_grad_norm=float(max_grad_norm), norm_type=float(norm_type),
        error_if_nonfinite=error_if_nonfinite, **out,
    )  # fmt: skip


def clips(group: dict) -> bool:
    """Whether ``group``'s params take part in the step's clipping."""
    return group.get("max_grad_norm") is not None


def _settings(groups: list[dict]) -> tuple[float, float, bool]:
    """The one (max_grad_norm, norm_type, error_if_nonfinite) of the clipping ``groups``."""
    found = set()
    for group in groups:
        if group.get("capturable"):
            raise ValueError(
                "max_grad_norm is not supported with capturable=True: the clip coefficient is "
                "read on the host"
            )
        norm_type = group.get("norm_type", 2.0)
        error = group.get("error_if_nonfinite", False)
        check(group["max_grad_norm"], norm_type, error)
        found.add((float(group["max_grad_norm"]), float(norm_type), error))
    if len(found) > 1:
        raise ValueError(
            "max_grad_norm, norm_type and error_if_nonfinite must be the same in every param "
            f"group that clips (one norm over all of their grads), got {sorted(found)}"
        )
    return found.pop()


def _launches(plans: list) -> list:
    return [launch for _, plan in plans for _, _, launches in plan.rounds for launch in launches]


def prepare(plans: list) -> tuple[torch.Tensor | None, bool]:
    """For the step's ``plans`` (``(group, GroupPlan)``, all checked, nothing run): the total
    grad norm of the groups that clip (None where none clips), with every launch of theirs
    given its ``clip_coef``, and whether the step is to be skipped (a non-finite grad in a group
    with ``skip_if_nonfinite``, or the rule's :meth:`~fuseopt.rule.Rule.step_scalars` says so);
    every launch with its rule's scalars. Reads only; raises (``error_if_nonfinite``, the rule's
    checks) before anything changes."""
    total = _clip(plans)
    if _tensor_scalars(plans):
        return total, True
    guarded = [(group, plan) for group, plan in plans if group.get("skip_if_nonfinite")]
    if not guarded:
        return total, False
    if total is not None and bool(torch.isfinite(total)):
        covered = {id(group) for group, _ in plans if clips(group)}
        if all(id(group) in covered for group, _ in guarded):
            return total, False  # (finite: every grad it summed is)
    return total, _nonfinite(_launches(guarded))


def _tensor_scalars(plans: list) -> bool:
    """Each launch of a rule with reductions (LARS's norms) gets the scalars they give (after
    clipping: the sums see the grads as the update does), from the rule's
    :meth:`~fuseopt.rule.Rule.step_scalars` over every launch of the step at once; returns
    whether the rule asks to skip the step. What it hands back to write where the step runs
    (group values) joins the first plan's step bumps, which run exactly when the plans run."""
    if not plans:
        return False
    rule = plans[0][1].rule
    launches, batches = [], []
    for group, plan in plans:
        for launch in _launches([(group, plan)]):
            reduces = launch.backend != "sparse" and rule.reduces(launch.flags)
            sums = _sums(launch) if reduces else {}
            if sums or rule.shares_sums:
                launches.append(launch)
                batches.append((group, launch.flags, launch.scalars, sums, launch.ndims))
    if not batches:
        return False
    out = rule.step_scalars(_compile.groups(plans[0][1].opt), batches)
    if out is None:
        return True
    scalars, commit = out
    for launch, values in zip(launches, scalars, strict=True):
        launch.scalars.update(values)
    if commit is not None:
        plans[0][1].rounds[0][1].append(commit)  # (a plan has a round: it has a launch)
    return False


def _sums(launch) -> dict[str, torch.Tensor]:
    """The rule's per-tensor sums over ``launch``: numba's or Triton's reduction kernel over the
    launch's checked addresses, torch's ops over the tensors of the for-loop and foreach."""
    from types import SimpleNamespace

    from fuseopt.kernels import numba_cpu
    from fuseopt.kernels.reference import TorchOps

    if launch.backend == "numba":
        return {k: torch.from_numpy(v) for k, v in numba_cpu.reduce(launch).items()}
    if launch.backend == "triton":
        from fuseopt.kernels import triton_gpu

        return triton_gpu.reduce(launch)
    names = launch.operands[2:-1] if launch.kahan else launch.operands[2:]  # (the rule's)
    rows: dict[str, list] = {}
    s = SimpleNamespace(**launch.scalars)
    for i, (p, g) in enumerate(zip(launch.tensors[0], launch.tensors[1])):
        state = {n: launch.tensors[2 + k][i] for k, n in enumerate(names)}
        if launch.wide:  # a storage format: in float32, as the kernels read it
            p, g = p.float(), g.float()
            state = {n: None if t is None else t.float() for n, t in state.items()}
        if p.is_complex():
            p, g = torch.view_as_real(p), torch.view_as_real(g)
            state = {n: None if t is None else torch.view_as_real(t) for n, t in state.items()}
        out = launch.rule.reduce_apply(TorchOps, launch.flags, s, p, g, **state)
        for name, value in out.items():
            # (in float32 or float64, as the tensor: a float64 sum of float32 values, as numba's,
            # takes torch three times as long)
            wide = torch.float32 if value.dtype.itemsize < 4 else value.dtype
            rows.setdefault(name, []).append(value.sum(dtype=wide).to(torch.float64))
    return {name: torch.stack(values) for name, values in rows.items()}


def _nonfinite(launches: list) -> bool:
    """Whether a grad of ``launches`` holds an inf or a NaN."""
    from fuseopt.kernels import numba_cpu

    for launch in launches:
        if launch.backend == "numba":
            table = launch.address_table()
            flags = numba_cpu.grad_norms(
                np.ascontiguousarray(table[1]), launch.numels, launch.dtype, None
            )
            if np.isnan(flags).any():
                return True
            continue
        for g in launch.grads:
            values = g._values() if g.is_sparse else g
            if not bool(torch.isfinite(values).all()):
                return True
    return False


def _clip(plans: list) -> torch.Tensor | None:
    """The total grad norm of the groups that clip, each of their launches given its
    ``clip_coef``; None where no group clips."""
    clipping = [(group, plan) for group, plan in plans if clips(group)]
    if not clipping:
        return None
    max_norm, norm_type, error_if_nonfinite = _settings([group for group, _ in clipping])
    launches = _launches(clipping)
    pieces = _norms(launches, norm_type)
    if not pieces:
        return torch.tensor(0.0)  # (as clip_grad_norm_ without grads)
    device = pieces[0].device
    total = torch.linalg.vector_norm(torch.cat([p.to(device) for p in pieces]), norm_type)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    coef = max_norm / (total + 1e-6)
    value = torch.clamp(coef, max=1.0).item()
    for launch in launches:
        launch.scalars["clip_coef"] = value
    return total


def _norms(launches: list, norm_type: float) -> list[torch.Tensor]:
    """The per-tensor norms of the launches' grads, each param's once (a param listed twice is in
    two rounds), as 1-D tensors in the grads' dtypes."""
    from fuseopt.kernels import numba_cpu

    pieces = []
    seen_addresses: set = set()
    seen_grads: set = set()
    by_kind: dict[tuple, list[torch.Tensor]] = {}  # (device, dtype) -> grads, in order
    for launch in launches:
        if launch.backend == "sparse":
            raise RuntimeError("max_grad_norm does not support sparse gradients")
        if launch.shards:  # the norm of a sharded grad needs the other ranks' shards
            raise NotImplementedError(
                "max_grad_norm with DTensor (FSDP2) params is not supported yet: clip with "
                "torch.nn.utils.clip_grad_norm_ before the step"
            )
        if launch.backend == "numba" and (norm_type == 2.0 or not launch.real_view):
            # (a complex param's kernel walks its real view: only its 2-norm is the same)
            table = launch.address_table()
            keep = []
            for i, key in enumerate(zip(table[0].tolist(), launch.numels)):
                if key not in seen_addresses:
                    seen_addresses.add(key)
                    keep.append(i)
            if not keep:
                continue
            rows = table[1] if len(keep) == table.shape[1] else table[1][keep]
            numels = tuple(launch.numels[i] for i in keep)
            if norm_type == math.inf and 0 in numels:  # (torch's error: max of nothing)
                raise RuntimeError(
                    "_foreach_norm cannot compute the infinity norm on an empty tensor because "
                    "the operation does not have an identity"
                )
            sums = numba_cpu.grad_norms(np.ascontiguousarray(rows), numels, launch.dtype, norm_type)
            pieces.append(torch.from_numpy(sums).to(launch.dtype))
            continue
        for g in launch.grads:
            if g.is_sparse:  # (SGD's sparse grads step in a for-loop launch)
                raise RuntimeError("max_grad_norm does not support sparse gradients")
            if id(g) not in seen_grads:
                seen_grads.add(id(g))
                by_kind.setdefault((g.device, g.dtype), []).append(g)
    for grads in by_kind.values():
        pieces.append(torch.stack(torch._foreach_norm(grads, norm_type)))
    return pieces
