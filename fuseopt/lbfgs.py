"""L-BFGS: limited-memory BFGS (Nocedal & Wright, Numerical Optimization, 2nd ed., ch. 7), with an
optional strong-Wolfe line search (ch. 3).

Not an elementwise rule (closure, line search, flat-vector history): ``_step`` is plain torch code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fuseopt.optimizer import Optimizer

__all__ = ["LBFGS"]

# Wolfe constants of the line search (N&W's usual choice for quasi-Newton methods).
_C1 = 1e-4  # sufficient decrease (Armijo)
_C2 = 0.9  # curvature
# torch's line search stops shrinking its bracket below this width (times max |d|); it does not use
# the group's ``tolerance_change`` for this, so neither do we.
_BRACKET_TOL = 1e-9
# A curvature pair (s, y) enters the history only where s.y exceeds this (keeps H positive definite).
_MIN_CURVATURE = 1e-10


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    r"""Minimiser of the cubic through ``(x1, f1)``, ``(x2, f2)`` with slopes ``g1``, ``g2``.

    N&W eq. (3.59), written from the right-hand end point :math:`x_b` of the pair:

    .. math::
        d_1 = g_1 + g_2 - 3\frac{f_1 - f_2}{x_1 - x_2},\quad d_2 = \sqrt{d_1^2 - g_1 g_2},\quad
        x^* = x_b - (x_b - x_a)\frac{g_b + d_2 - d_1}{g_b - g_a + 2 d_2}

    The result is clamped to ``bounds`` (default: the interval between the two points); where the
    cubic has no real minimiser (:math:`d_1^2 < g_1 g_2`) it is the middle of ``bounds``.
    """
    if bounds is None:
        bounds = (x1, x2) if x1 <= x2 else (x2, x1)
    lower, upper = bounds
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if not d2_square >= 0:  # also a NaN discriminant: bisect
        return (lower + upper) / 2.0
    d2 = d2_square.sqrt()
    (xa, ga), (xb, gb) = ((x1, g1), (x2, g2)) if x1 <= x2 else ((x2, g2), (x1, g1))
    x_min = xb - (xb - xa) * ((gb + d2 - d1) / (gb - ga + 2 * d2))
    return min(max(x_min, lower), upper)


def _strong_wolfe(phi, t, d, f0, g0, gtd0, max_ls=25):
    r"""Find a step ``t`` along ``d`` that satisfies the strong Wolfe conditions.

    .. math::
        f(x + t d) \le f_0 + c_1 t\, g_0^\top d, \qquad |\nabla f(x + t d)^\top d| \le c_2 |g_0^\top d|

    N&W Algorithm 3.5: extrapolate (by cubic interpolation, within ``[t + 0.01 (t - t_prev),
    10 t]``) until an interval brackets an acceptable step, then Algorithm 3.6 ("zoom"): shrink the
    bracket by cubic interpolation, kept at least 10% of its width from its ends when progress
    stalls. ``phi(t)`` returns the loss (float) and flat gradient at ``x + t d``; at most ``max_ls``
    evaluations follow the first one.

    Returns:
        ``(loss, flat_grad, t, evaluations)`` at the accepted (or best bracketed) step.
    """
    d_norm = d.abs().max()
    g0 = g0.clone(memory_format=torch.contiguous_format)
    # A point of the search is [t, loss, flat grad, directional derivative].
    start = [0, f0, g0, gtd0]
    f_new, g_new = phi(t)
    evals = 1
    gtd_new = g_new.dot(d)

    def armijo_fails(t, f):
        return f > (f0 + _C1 * t * gtd0)

    def curvature_holds(gtd):
        return abs(gtd) <= -_C2 * gtd0

    # ---- bracketing phase: previous point ``prev``, trial point (t, f_new, g_new, gtd_new)
    prev = start
    found = False
    iters = 0
    while iters < max_ls:
        if armijo_fails(t, f_new) or (iters > 1 and f_new >= prev[1]):
            bracket = [
                prev,
                [t, f_new, g_new.clone(memory_format=torch.contiguous_format), gtd_new],
            ]
            break
        if curvature_holds(gtd_new):
            bracket = [[t, f_new, g_new, gtd_new]]
            found = True
            break
        if gtd_new >= 0:  # slope turned uphill: a minimiser lies between prev and t
            bracket = [
                prev,
                [t, f_new, g_new.clone(memory_format=torch.contiguous_format), gtd_new],
            ]
            break
        # still going downhill and decreasing: extrapolate further
        t_next = _cubic_interpolate(
            prev[0], prev[1], prev[3], t, f_new, gtd_new, bounds=(t + 0.01 * (t - prev[0]), t * 10)
        )
        prev = [t, f_new, g_new.clone(memory_format=torch.contiguous_format), gtd_new]
        t = t_next
        f_new, g_new = phi(t)
        evals += 1
        gtd_new = g_new.dot(d)
        iters += 1
    if iters == max_ls:
        # out of evaluations: bracket the start and the last trial, keeping their slopes unknown
        # (no zoom step can follow to need them)
        bracket = [[0, f0, g0, None], [t, f_new, g_new, None]]

    # ---- zoom phase: bracket[lo] is the lowest point so far, bracket[hi] the other end
    lo, hi = (0, 1) if bracket[0][1] <= bracket[-1][1] else (1, 0)
    stalled = False
    while not found and iters < max_ls:
        a, b = bracket[0][0], bracket[1][0]
        if abs(b - a) * d_norm < _BRACKET_TOL:
            break
        t = _cubic_interpolate(a, bracket[0][1], bracket[0][3], b, bracket[1][1], bracket[1][3])
        # Safeguard: a trial next to an end point makes little progress; move it to 10% of the
        # width from that end if it lies outside, or if the previous trial already stalled.
        left, right = min(a, b), max(a, b)
        margin = 0.1 * (right - left)
        if min(right - t, t - left) < margin:
            if stalled or t >= right or t <= left:
                t = right - margin if abs(t - right) < abs(t - left) else left + margin
                stalled = False
            else:
                stalled = True
        else:
            stalled = False

        f_new, g_new = phi(t)
        evals += 1
        gtd_new = g_new.dot(d)
        iters += 1
        point = [t, f_new, g_new.clone(memory_format=torch.contiguous_format), gtd_new]
        if armijo_fails(t, f_new) or f_new >= bracket[lo][1]:
            bracket[hi] = point  # no better than the low end: it becomes the high end
            lo, hi = (0, 1) if bracket[0][1] <= bracket[1][1] else (1, 0)
        else:
            if curvature_holds(gtd_new):
                found = True
            elif gtd_new * (bracket[hi][0] - bracket[lo][0]) >= 0:
                bracket[hi] = bracket[lo]  # the minimiser lies on the other side of the new point
            bracket[lo] = point

    t, f_new, g_new, _ = bracket[lo]
    return f_new, g_new, t, evals


class LBFGS(Optimizer):
    r"""Implements the L-BFGS algorithm.

    Heavily inspired by `minFunc <https://www.cs.ubc.ca/~schmidtm/Software/minFunc.html>`_.
    With :math:`s_i = x_{i+1} - x_i`, :math:`y_i = g_{i+1} - g_i`, :math:`\rho_i = 1 / y_i^\top s_i`
    (a pair is kept only where :math:`y_i^\top s_i > 10^{-10}`, at most ``history_size`` of them),
    each iteration of a step computes the direction by the two-loop recursion:

    .. math::
       \begin{aligned}
            &q \leftarrow -g_k;\quad \text{for } i = k-1, \dots, k-m:\;
                \alpha_i \leftarrow \rho_i s_i^\top q,\; q \leftarrow q - \alpha_i y_i      \\
            &r \leftarrow \gamma_k q,\quad \gamma_k = \frac{s_{k-1}^\top y_{k-1}}{y_{k-1}^\top y_{k-1}}
                \quad (\gamma = 1 \text{ before the first pair})                             \\
            &\text{for } i = k-m, \dots, k-1:\; \beta \leftarrow \rho_i y_i^\top r,\;
                r \leftarrow r + (\alpha_i - \beta) s_i                                     \\
            &d_k = r,\quad x_{k+1} = x_k + t_k d_k
       \end{aligned}

    The step length :math:`t_k` is ``lr`` (times :math:`\min(1, 1 / \|g\|_1)` on the very first
    iteration), or, with ``line_search_fn="strong_wolfe"``, the result of a line search from that
    guess satisfying the strong Wolfe conditions (:math:`c_1 = 10^{-4}`, :math:`c_2 = 0.9`). A step
    runs up to ``max_iter`` iterations and ``max_eval`` closure evaluations, and stops early when
    :math:`\|g\|_\infty \le` ``tolerance_grad``, or when the directional derivative, the update
    :math:`\|t_k d_k\|_\infty` or the loss change fall below ``tolerance_change``.

    The state (``func_evals``, ``n_iter``, ``d``, ``t``, ``old_dirs``, ``old_stps``, ``ro``,
    ``H_diag``, ``prev_flat_grad``, ``prev_loss``, ``al``) is kept on the first param, and state
    dicts are those of :class:`torch.optim.LBFGS`. Complex params are optimized as pairs of reals;
    sparse gradients are made dense.

    .. warning::
        There can be only one param group, and all params must be on one device.

    .. note::
        This optimizer is memory-hungry: it keeps ``param_bytes * (history_size + 1)`` bytes of
        history. If that does not fit, reduce ``history_size`` or use another algorithm.

    Args:
        params (iterable): iterable of parameters to optimize.
        lr (float, Tensor, optional): learning rate (default: 1)
        max_iter (int, optional): maximal number of iterations per optimization step (default: 20)
        max_eval (int, optional): maximal number of function evaluations per optimization step
            (default: max_iter * 1.25)
        tolerance_grad (float, optional): termination tolerance on first order optimality
            (default: 1e-7)
        tolerance_change (float, optional): termination tolerance on function value/parameter
            changes (default: 1e-9)
        history_size (int, optional): update history size (default: 100)
        line_search_fn (str, optional): either ``"strong_wolfe"`` or None (default: None)
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = dict(
            lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change, history_size=history_size,
            line_search_fn=line_search_fn,
        )  # fmt: skip
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")

    # Read from the group on every use (torch caches the list at construction): a deep copy, an
    # unpickled optimizer or one that loaded a state dict then needs no fix-up.
    @property
    def _params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    # ------------------------------------------------------------------ flat-vector helpers
    def _gather_flat_grad(self) -> Tensor:
        """All gradients as one real vector (zeros for a missing grad, complex as real pairs)."""
        pieces = []
        for p in self._params:
            if p.grad is None:
                flat = p.new(p.numel()).zero_()
            elif p.grad.is_sparse:
                flat = p.grad.to_dense().view(-1)
            else:
                flat = p.grad.view(-1)
            pieces.append(torch.view_as_real(flat).view(-1) if torch.is_complex(flat) else flat)
        return torch.cat(pieces, 0)

    def _add_grad(self, step_size, update: Tensor) -> None:
        """``params += step_size * update``, ``update`` being a flat vector laid out as the grads."""
        offset = 0
        for p in self._params:
            real = torch.view_as_real(p) if torch.is_complex(p) else p
            n = real.numel()
            real.add_(update[offset : offset + n].view_as(real), alpha=step_size)
            offset += n
        if offset != update.numel():
            raise AssertionError(f"Expected offset {offset} to equal {update.numel()}")

    def _clone_param(self) -> list[Tensor]:
        return [p.clone(memory_format=torch.contiguous_format) for p in self._params]

    def _set_param(self, values: list[Tensor]) -> None:
        for p, value in zip(self._params, values, strict=True):
            p.copy_(value)

    def _directional_evaluate(self, closure, x, t, d) -> tuple[float, Tensor]:
        """Loss and flat gradient at ``x + t d``; the params are put back to ``x`` afterwards."""
        self._add_grad(t, d)
        with torch.enable_grad():
            loss = closure()
        loss = float(loss)  # outside grad mode: torch warns converting a grad-requiring tensor
        flat_grad = self._gather_flat_grad()
        self._set_param(x)
        return loss, flat_grad

    # --------------------------------------------------------------------------------- step
    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        r"""Perform a single optimization step (up to ``max_iter`` L-BFGS iterations).

        Args:
            closure (Callable): a closure that re-evaluates the model and returns the loss;
                required, as in torch.
        """
        # Defined only for torch's signature (the closure is required, and omitting it raises
        # torch's TypeError); the base class runs the hooks around it.
        loss = self._step(closure)
        self._record_plain_step()
        return loss

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        """L-BFGS iterations from the state on the first param; returns the first loss."""
        if len(self.param_groups) != 1:
            raise AssertionError(
                f"Expected exactly one param_group, but got {len(self.param_groups)}"
            )
        group = self.param_groups[0]
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.dim() != 0:
            lr = lr.squeeze()  # a 1-element tensor lr acts as a 0-dim one
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
        line_search_fn, history_size = group["line_search_fn"], group["history_size"]

        # LBFGS's state is global; it lives on the first param so that load_state_dict casts it.
        state = self.state[self._params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        with torch.enable_grad():
            orig_loss = closure()
        loss = float(orig_loss)
        current_evals = 1
        state["func_evals"] += 1
        flat_grad = self._gather_flat_grad()
        if flat_grad.abs().max() <= tolerance_grad:
            return orig_loss  # already optimal: nothing changes but the evaluation count

        d, t = state.get("d"), state.get("t")
        old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
        H_diag = state.get("H_diag")
        prev_flat_grad, prev_loss = state.get("prev_flat_grad"), state.get("prev_loss")

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1

            # ---- direction
            if state["n_iter"] == 1:  # the very first iteration: steepest descent
                d = flat_grad.neg()
                old_dirs, old_stps, ro = [], [], []
                H_diag = 1
            else:
                y = flat_grad.sub(prev_flat_grad)
                s = d.mul(t)
                ys = y.dot(s)
                if ys > _MIN_CURVATURE:
                    if len(old_dirs) == history_size:  # forget the oldest pair
                        old_dirs.pop(0)
                        old_stps.pop(0)
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    H_diag = ys / y.dot(y)  # initial inverse Hessian gamma * I (N&W eq. 7.20)
                d = self._two_loop(state, flat_grad, old_dirs, old_stps, ro, H_diag, history_size)

            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(flat_grad)
            prev_loss = loss

            # ---- step length: a cautious first step, then the unit (lr-scaled) quasi-Newton step
            if state["n_iter"] == 1:
                t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr
            else:
                t = lr
            gtd = flat_grad.dot(d)
            if gtd > -tolerance_change:
                break  # not a descent direction (any more)

            evals = 0
            if line_search_fn is not None:
                if line_search_fn != "strong_wolfe":
                    raise RuntimeError("only 'strong_wolfe' is supported")
                x_init = self._clone_param()

                def phi(t, x_init=x_init, d=d):
                    return self._directional_evaluate(closure, x_init, t, d)

                loss, flat_grad, t, evals = _strong_wolfe(
                    phi, t, d, loss, flat_grad, gtd, max_ls=max_eval - current_evals
                )
                self._add_grad(t, d)
                opt_cond = flat_grad.abs().max() <= tolerance_grad
            else:
                self._add_grad(t, d)
                opt_cond = False
                # The last iteration does not evaluate the new point: with stochastic closures
                # that evaluation would be wasted, and the next step starts with one anyway.
                if n_iter != max_iter:
                    with torch.enable_grad():
                        loss = closure()
                    loss = float(loss)
                    flat_grad = self._gather_flat_grad()
                    opt_cond = flat_grad.abs().max() <= tolerance_grad
                    evals = 1
            current_evals += evals
            state["func_evals"] += evals

            # ---- stopping tests
            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if d.mul(t).abs().max() <= tolerance_change:  # the update is negligible
                break
            if abs(loss - prev_loss) < tolerance_change:  # the loss stopped changing
                break

        state["d"] = d
        state["t"] = t
        state["old_dirs"] = old_dirs
        state["old_stps"] = old_stps
        state["ro"] = ro
        state["H_diag"] = H_diag
        state["prev_flat_grad"] = prev_flat_grad
        state["prev_loss"] = prev_loss
        return orig_loss

    @staticmethod
    def _two_loop(state, flat_grad, old_dirs, old_stps, ro, H_diag, history_size) -> Tensor:
        """The two-loop recursion (N&W Algorithm 7.4): the L-BFGS direction ``-H g`` in one buffer."""
        if "al" not in state:  # the alphas live in the state, as in torch
            state["al"] = [None] * history_size
        al = state["al"]
        q = flat_grad.neg()
        for i in reversed(range(len(old_dirs))):
            al[i] = old_stps[i].dot(q) * ro[i]
            q.add_(old_dirs[i], alpha=-al[i])
        r = torch.mul(q, H_diag)
        for i in range(len(old_dirs)):
            be_i = old_dirs[i].dot(r) * ro[i]
            r.add_(old_stps[i], alpha=al[i] - be_i)
        return r
