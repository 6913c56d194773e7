"""Trace a rule's ``update`` on symbols into a small expression graph that kernel backends compile.

Operands are :class:`Sym` nodes; Python operators and the :class:`SymOps` vocabulary record nodes in
a :class:`Graph`. Host scalars become ``scalar`` nodes named by the attribute the rule reads, so the
kernel takes them at run time (a new ``lr`` never recompiles).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any


@dataclass
class Graph:
    """Nodes in evaluation order: ``(op, args)``; args are node ids, or literals for ``const``."""

    nodes: list[tuple[str, tuple]] = field(default_factory=list)
    inputs: dict[str, int] = field(default_factory=dict)  # operand name -> node id
    scalars: dict[str, int] = field(default_factory=dict)  # scalar name -> node id
    outputs: dict[str, int] = field(default_factory=dict)  # operand name -> node id

    def add(self, op: str, *args: Any) -> Sym:
        """Append a node; return its symbol."""
        self.nodes.append((op, args))
        return Sym(self, len(self.nodes) - 1)


class Sym:
    """A traced value; arithmetic records nodes (operators mean torch's plain, unfused ops)."""

    __slots__ = ("graph", "id")

    def __init__(self, graph: Graph, id: int) -> None:
        self.graph, self.id = graph, id

    def _arg(self, other: Any) -> int:
        if isinstance(other, Sym):
            return other.id
        return self.graph.add("const", float(other)).id

    def _bin(self, op: str, a: Any, b: Any) -> Sym:
        return self.graph.add(op, self._arg(a), self._arg(b))

    def __neg__(self) -> Sym:
        return self.graph.add("neg", self.id)

    def __add__(self, o: Any) -> Sym:
        return self._bin("add", self, o)

    def __radd__(self, o: Any) -> Sym:
        return self._bin("add", o, self)

    def __sub__(self, o: Any) -> Sym:
        return self._bin("sub", self, o)

    def __rsub__(self, o: Any) -> Sym:
        return self._bin("sub", o, self)

    def __mul__(self, o: Any) -> Sym:
        return self._bin("mul", self, o)

    def __rmul__(self, o: Any) -> Sym:
        return self._bin("mul", o, self)

    def __truediv__(self, o: Any) -> Sym:
        if isinstance(o, Sym) and self.is_scalar() and not o.is_scalar():
            return o.__rtruediv__(self)  # a host scalar over a tensor: torch's rdiv, below
        return self._bin("div", self, o)

    def is_scalar(self) -> bool:
        """Whether this is a host scalar or a constant (not a per-element value)."""
        return self.graph.nodes[self.id][0] in ("scalar", "const")

    def __rtruediv__(self, o: Any) -> Sym:
        # torch's ``scalar / tensor`` is ``tensor.reciprocal() * scalar``: two roundings
        return self._bin("mul", self._bin("div", 1.0, self), o)


class SymScalars:
    """The ``s`` argument of ``update`` while tracing: each attribute read is a runtime scalar."""

    def __init__(self, graph: Graph) -> None:
        self._graph = graph

    def __getattr__(self, name: str) -> Sym:
        graph = self._graph
        if name not in graph.scalars:
            graph.scalars[name] = graph.add("scalar", name).id
        return Sym(graph, graph.scalars[name])


class SymOps:
    """The ops vocabulary on symbols (same names and meaning as :class:`~.reference.TorchOps`)."""

    @staticmethod
    def add(a: Sym, b: Sym, alpha: Any = 1) -> Sym:
        """``a + alpha * b``, rounded once (ATen: ``fma(b, alpha, a)``)."""
        return a.graph.add("fma", b.id, a._arg(alpha), a.id)

    @staticmethod
    def addcmul(a: Sym, b: Sym, c: Sym, value: Any = 1) -> Sym:
        """``a + value * b * c`` (ATen: ``fma(value * b, c, a)``)."""
        return a.graph.add("fma", (b * value).id, c.id, a.id)

    @staticmethod
    def addcdiv(a: Sym, b: Sym, c: Sym, value: Any = 1) -> Sym:
        """``a + value * b / c`` (ATen: ``a + (value * b) / c``)."""
        return a + (b * value) / c

    @staticmethod
    def lerp(a: Sym, b: Sym, w: Any) -> Sym:
        """ATen's two-sided lerp from ``a`` to ``b`` by ``w``."""
        return a.graph.add("lerp", a.id, b.id, a._arg(w))

    @staticmethod
    def sqrt(a: Sym) -> Sym:
        """Square root."""
        return a.graph.add("sqrt", a.id)

    @staticmethod
    def maximum(a: Sym, b: Sym) -> Sym:
        """Elementwise maximum, NaN-propagating."""
        return a.graph.add("maximum", a.id, b.id)

    @staticmethod
    def minimum(a: Sym, b: Sym) -> Sym:
        """Elementwise minimum, NaN-propagating."""
        return a.graph.add("minimum", a.id, b.id)

    @staticmethod
    def abs(a: Sym) -> Sym:
        """Absolute value."""
        return a.graph.add("abs", a.id)

    @staticmethod
    def sign(a: Sym) -> Sym:
        """``torch.sign``: -1, 0 or 1 (0 for NaN)."""
        return a.graph.add("sign", a.id)

    @staticmethod
    def clamp(a: Sym, lo: Any, hi: Any) -> Sym:
        """``torch.clamp(a, lo, hi)`` with scalar bounds, NaN-propagating."""
        return a.graph.add("clamp", a.id, a._arg(lo), a._arg(hi))

    @staticmethod
    def gt(a: Sym, b: Any) -> Sym:
        """The mask ``a > b``."""
        return a.graph.add("gt", a.id, a._arg(b))

    @staticmethod
    def lt(a: Sym, b: Any) -> Sym:
        """The mask ``a < b``."""
        return a.graph.add("lt", a.id, a._arg(b))

    @staticmethod
    def eq(a: Sym, b: Any) -> Sym:
        """The mask ``a == b``."""
        return a.graph.add("eq", a.id, a._arg(b))

    @staticmethod
    def where(cond: Sym, a: Any, b: Any) -> Sym:
        """``a`` where ``cond`` holds, else ``b`` (either may be a scalar)."""
        return cond.graph.add("where", cond.id, cond._arg(a), cond._arg(b))

    @staticmethod
    def detach(a: Sym) -> Sym:
        """``a``, through which no gradient flows (kernels compute no gradients: ``a`` itself)."""
        return a


def _traced(method, flags, operands: tuple[str, ...]) -> tuple[Graph, dict]:
    """A new graph with an input per operand, and what ``method`` (a rule's ``apply`` or
    ``reduce_apply``) returns on them."""
    graph = Graph()
    syms = {}
    for name in operands:
        syms[name] = graph.add("input", name)
        graph.inputs[name] = syms[name].id
    state = {k: syms[k] for k in operands[2:]}
    return graph, method(SymOps, flags, SymScalars(graph), syms["param"], syms["grad"], **state)


@cache
def trace_reduce(rule, flags, operands: tuple[str, ...]) -> Graph:
    """Trace ``rule.reduce`` (through :meth:`~fuseopt.rule.Rule.reduce_apply`): the graph's
    outputs are the per-tensor sums it names, in order."""
    graph, out = _traced(rule.reduce_apply, flags, operands)
    for name, value in out.items():
        graph.outputs[name] = value.id
    return graph


@cache
def trace(rule, flags, operands: tuple[str, ...]) -> Graph:
    """Trace ``rule.update`` for one flag combination; ``operands`` = param, grad, then state names."""
    graph, out = _traced(rule.apply, flags, operands)
    for name, value in out.items():
        if value is not None and not (
            isinstance(value, Sym) and value.id == graph.inputs.get(name)
        ):
            graph.outputs[name] = value.id
    return graph
