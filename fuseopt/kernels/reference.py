"""Reference backend: the rule evaluated per tensor with torch ops; the oracle for the fast backends.

The vocabulary maps one to one onto ATen ops, so this path is bitwise equal to torch.optim's
for-loop implementation. It is also the ``differentiable=True`` path: ``update`` is out of place and
the write-back (``copy_``) is recorded by autograd.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fuseopt import _quant, _storage


def _grad_valued(x) -> bool:
    """A tensor coefficient that autograd tracks (``differentiable=True``, a tensor ``lr`` that
    requires grad): ATen's ``alpha``/``value`` take numbers only."""
    return isinstance(x, torch.Tensor) and x.requires_grad


def _add(a, b, alpha=1):
    """``a + alpha * b``."""
    return a + alpha * b if _grad_valued(alpha) else torch.add(a, b, alpha=alpha)


def _addcmul(a, b, c, value=1):
    """``a + value * b * c``."""
    return a + value * b * c if _grad_valued(value) else torch.addcmul(a, b, c, value=value)


def _addcdiv(a, b, c, value=1):
    """``a + value * b / c``."""
    return a + value * b / c if _grad_valued(value) else torch.addcdiv(a, b, c, value=value)


class TorchOps:
    """The ops vocabulary on tensors (see :mod:`fuseopt.kernels.trace` for the traced meaning)."""

    add = staticmethod(_add)  # a + alpha * b
    addcmul = staticmethod(_addcmul)  # a + value * b * c
    addcdiv = staticmethod(_addcdiv)  # a + value * b / c
    lerp = staticmethod(torch.lerp)  # a + w * (b - a)
    sqrt = staticmethod(torch.sqrt)
    maximum = staticmethod(torch.maximum)
    minimum = staticmethod(torch.minimum)
    abs = staticmethod(torch.abs)
    sign = staticmethod(torch.sign)
    clamp = staticmethod(torch.clamp)
    gt = staticmethod(torch.gt)
    lt = staticmethod(torch.lt)
    eq = staticmethod(torch.eq)
    where = staticmethod(torch.where)
    detach = staticmethod(torch.detach)  # no gradient flows back through the result


class _InPlace:
    """A value of a param whose tensors differ in dtype (a state the user cast to bfloat16, a
    float64 grad set through ``.data``), on the for-loop path.

    torch's for-loop updates a param's states in place, so each op on a state (or on a value
    computed from one) stores its result in the state's dtype. It updates the param in place too
    (``param.add_``, ``param.mul_``: the ops and the scalar products here), but takes a param
    minus a tensor out of place (ASGD's ``param.sub(ax)``), and every op on the grad out of place
    (promoted). ``kind`` says which of the three a value comes from; a result whose first tensor
    operand is a state's or the param's is rounded to that operand's dtype.
    """

    __slots__ = ("t", "kind")

    def __init__(self, t: torch.Tensor, kind: str) -> None:
        self.t, self.kind = t, kind

    def keep(self, out):
        """``out`` as the result of an op whose first tensor operand is this value."""
        if self.kind != "grad" and isinstance(out, torch.Tensor) and out.dtype != self.t.dtype:
            if not torch.can_cast(out.dtype, self.t.dtype):  # torch's in-place op refuses too
                raise RuntimeError(
                    f"result type {out.dtype} can't be cast to the desired output type "
                    f"{self.t.dtype}"
                )
            out = out.to(self.t.dtype)
        return _InPlace(out, self.kind)

    def _binary(self, out, other):
        if self.kind == "param" and isinstance(other, _InPlace):
            return _InPlace(out, "grad")  # a temporary: torch's param.sub(x) is out of place
        return self.keep(out)

    def __neg__(self):
        return self.keep(-self.t)

    def __add__(self, o):
        return self._binary(self.t + _raw(o), o)

    def __radd__(self, o):
        return self.keep(_raw(o) + self.t)

    def __sub__(self, o):
        return self._binary(self.t - _raw(o), o)

    def __rsub__(self, o):
        return self.keep(_raw(o) - self.t)

    def __mul__(self, o):
        return self._binary(self.t * _raw(o), o)

    def __rmul__(self, o):
        return self.keep(_raw(o) * self.t)

    def __truediv__(self, o):
        return self._binary(self.t / _raw(o), o)

    def __rtruediv__(self, o):
        return self.keep(_raw(o) / self.t)


def _raw(x):
    return x.t if isinstance(x, _InPlace) else x


def _in_place(fn, mask: bool = False):
    """``fn`` of :class:`TorchOps` on :class:`_InPlace` values; masks are plain tensors."""

    def op(*args, **kwargs):
        out = fn(*map(_raw, args), **{k: _raw(v) for k, v in kwargs.items()})
        if mask:
            return out
        first = next((a for a in args if isinstance(a, _InPlace)), None)
        return first.keep(out) if first is not None else out

    return staticmethod(op)


class InPlaceOps:
    """The ops vocabulary on :class:`_InPlace` values (torch's in-place rounding)."""

    add, addcmul, addcdiv = _in_place(_add), _in_place(_addcmul), _in_place(_addcdiv)
    lerp, sqrt = _in_place(torch.lerp), _in_place(torch.sqrt)
    maximum, minimum = _in_place(torch.maximum), _in_place(torch.minimum)
    abs, sign, clamp = _in_place(torch.abs), _in_place(torch.sign), _in_place(torch.clamp)
    gt, lt, eq = _in_place(torch.gt, True), _in_place(torch.lt, True), _in_place(torch.eq, True)
    detach = _in_place(torch.detach)
    # torch.where's result: that of the value operands (the first one that is a tensor)
    where = staticmethod(
        lambda c, a, b: next(
            (x for x in (a, b) if isinstance(x, _InPlace)), _InPlace(torch.empty(0), "grad")
        ).keep(torch.where(_raw(c), _raw(a), _raw(b)))
    )


def update(rule, flags, s, p, g, state: dict, odd: bool) -> dict:
    """``rule.update`` on one param's tensors (states missing on a first step are None)."""
    if not odd:
        return rule.apply(TorchOps, flags, s, p, g, **state)
    wrapped = {k: None if v is None else _InPlace(v, "state") for k, v in state.items()}
    out = rule.apply(InPlaceOps, flags, s, _InPlace(p, "param"), _InPlace(g, "grad"), **wrapped)
    return {k: _raw(v) for k, v in out.items()}


class _Placeholders(SimpleNamespace):
    """Scalars where those not known yet read as 1.0."""

    def __getattr__(self, name: str) -> float:
        return 1.0


def check(launch) -> None:
    """Run the rule of ``launch``'s odd params (tensors of several dtypes) on meta tensors, which
    hold no data: torch's dtype and shape errors, raised before the step changes anything. (The
    clip coefficient and per-tensor scalars come after every group is planned: any number does
    for meta tensors.)"""
    s = _Placeholders(**launch.scalars)
    names = launch.operands[2:]
    quant = dict(launch.quant)

    def meta(t, dtype=None):
        if t is None:
            return None
        if t.is_complex():
            t = torch.view_as_real(t)
        return torch.empty_like(t, device="meta", dtype=dtype)

    for i, odd in enumerate(launch.odd):
        if odd:  # (an 8-bit state's codes: the rule reads their float32 values)
            state = {
                n: meta(launch.tensors[2 + k][i], _storage.COMPUTE if n in quant else None)
                for k, n in enumerate(names)
            }
            p, g = meta(launch.tensors[0][i]), meta(launch.tensors[1][i])
            with torch.no_grad():
                update(launch.rule, launch.flags, s, p, g, state, True)


def _per_tensor(scalars: dict) -> list:
    """The scalars that hold one value per tensor (1-D tensors): ``[(name, values)]``."""
    return [(k, v) for k, v in scalars.items() if isinstance(v, torch.Tensor) and v.dim() == 1]


def _widened(t):
    """``t`` in the compute type of a storage format (float32): a copy where it is stored in
    another dtype."""
    return None if t is None or t.dtype == _storage.COMPUTE else t.to(_storage.COMPUTE)


def unpack(state: dict, home: dict, quant: dict) -> dict:
    """``state`` (``{name: tensor}`` of one param) with each 8-bit state (``quant``: ``{name:
    signed}``) read as its float32 values (:func:`fuseopt._quant.dequantize`, the scales from
    the param's state dict ``home``); a missing first value stays None."""
    out = dict(state)
    for name, signed in quant.items():
        codes = out.get(name)
        if codes is not None:
            out[name] = _quant.dequantize(codes, home[_quant.absmax_key(name)], signed)
    return out


def pack(home: dict, name: str, value: torch.Tensor, signed: bool) -> None:
    """Store float32 ``value`` as the 8-bit state ``name`` of the state dict ``home``: its codes
    and scales (:func:`fuseopt._quant.quantize`), written into the tensors there (made where the
    state is a first value)."""
    codes, absmax = _quant.quantize(value, signed)
    key = _quant.absmax_key(name)
    if home.get(name) is None:
        home[name], home[key] = codes, absmax
    else:
        home[name].copy_(codes)
        home[key].copy_(absmax)


def run(launch) -> None:
    """Apply the rule of ``launch`` (a :class:`fuseopt._plan.Launch`) to each param in turn,
    writing params and states in place; a state a first update creates goes in its state dict.

    A ``wide`` launch (a storage format, :mod:`fuseopt._storage`) computes in float32 from its
    operands widened, and rounds once as it writes each result back (stochastically for
    bfloat16 where ``sr``): the fused kernels' arithmetic, with torch's ops. Its 8-bit states
    (``launch.quant``) are dequantized before the rule and quantized again after it
    (:mod:`fuseopt._quant`'s spec: the kernels' oracle)."""
    rule, flags = launch.rule, launch.flags
    wide = launch.wide
    rng = _storage.seed_generator(launch.scalars["sr_seed"]) if launch.sr else None
    s = SimpleNamespace(**launch.scalars)
    per_tensor = _per_tensor(launch.scalars)
    names = launch.operands[2:]
    if launch.kahan:  # (the last operand is the param's compensation, no state of the rule)
        names = names[:-1]
    differentiable = torch.is_grad_enabled()
    quant = dict(launch.quant)
    for i, (p, g) in enumerate(zip(launch.tensors[0], launch.tensors[1])):
        if per_tensor:  # (each param its own value of a per-tensor scalar, e.g. LARS's trust)
            s = SimpleNamespace(**{**launch.scalars, **{k: float(v[i]) for k, v in per_tensor}})
        home = launch.states[i] if launch.states is not None else None
        if home is not None:  # read now: an earlier round may have made a first value
            state = {n: home.get(n) for n in names}
        else:
            state = {n: launch.tensors[2 + k][i] for k, n in enumerate(names)}
        if quant:
            state = unpack(state, home, quant)
        complex_ = p.is_complex()
        if complex_:  # as torch: complex math is real math on the (re, im) view
            p, g = torch.view_as_real(p), torch.view_as_real(g)
            state = {n: None if t is None else torch.view_as_real(t) for n, t in state.items()}
        odd = bool(launch.odd and launch.odd[i])
        if wide:
            out = update(rule, flags, s, _widened(p) if p.dtype != _storage.COMPUTE else p,
                         _widened(g) if g.dtype != _storage.COMPUTE else g,
                         {k: v if v is None or v.dtype == _storage.COMPUTE else _widened(v)
                          for k, v in state.items()}, False)  # fmt: skip
            for name, value in out.items():
                target = p if name == "param" else state.get(name)
                if value is None or value is target:
                    continue
                if name in quant:
                    pack(home, name, value, quant[name])
                    continue
                if name == "param" and launch.kahan:
                    _storage.kahan_write(p, value, home[_storage.KAHAN])
                    continue
                if target is None:  # a first value, in the group's state dtype
                    home[name] = torch.empty_like(value, dtype=wide)
                    target = home[name]
                _storage.write(target, value, rng)
            continue
        if differentiable:
            # autograd may save the inputs for backward: the write-back below must not touch them
            inputs = {k: None if v is None else v.clone() for k, v in state.items()}
            out = update(rule, flags, s, p.clone(), g, inputs, odd)
        else:
            out = update(rule, flags, s, p, g, state, odd)
        for name, value in out.items():
            if value is None:
                continue
            if name in quant:
                pack(home, name, value.to(_storage.COMPUTE), quant[name])
                continue
            target = p if name == "param" else state.get(name)
            if target is None:  # a first value: torch's first buffer is a detached clone
                first = torch.clone(value).detach()
                home[name] = torch.view_as_complex(first) if complex_ else first
            elif value is not target:
                target.copy_(value)
