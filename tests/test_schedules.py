"""fuseopt.schedules: closed-form values, continuity, monotonicity, ranges, join and validation."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuseopt import schedules as sch


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def half_cos(a: float, b: float, t: float) -> float:
    """Closed form of a half cosine from ``a`` to ``b`` at fraction ``t``."""
    return b + (a - b) * (1 + math.cos(math.pi * t)) / 2


# ---------------------------------------------------------------- closed forms at key steps


def test_constant():
    f = sch.constant(0.5)
    assert [f(0), f(7), f(2.5), f(10**9)] == [0.5] * 4
    assert type(sch.constant(3)(0)) is float


def test_linear():
    f = sch.linear(1.0, 3.0, 4)
    assert f(0) == 1.0
    assert f(1) == 1.5
    assert f(2) == 2.0
    assert f(2.5) == 2.25  # float steps interpolate
    assert f(4) == 3.0
    assert f(5) == f(100) == f(math.inf) == 3.0  # clamped past the end
    assert all(type(f(s)) is float for s in (0, 2, 9))


def test_linear_zero_steps_is_end():
    f = sch.linear(1.0, 3.0, 0)
    assert f(0) == f(1) == 3.0


def test_cosine():
    f = sch.cosine(2.0, 0.5, 10)
    assert f(0) == 2.0
    assert close(f(5), 1.25)  # midpoint: the mean
    for s in (1, 3, 7.5, 9):
        assert close(f(s), half_cos(2.0, 0.5, s / 10))
    assert f(10) == f(11) == f(10**6) == 0.5


def test_warmup_cosine():
    peak, total, warm, start, end = 1e-3, 110, 10, 1e-5, 1e-6
    f = sch.warmup_cosine(peak, total, warm, start=start, end=end)
    assert f(0) == start
    assert close(f(4), start + (peak - start) * 4 / 10)
    assert f(10) == peak  # end of warm-up
    assert close(f(60), (peak + end) / 2)  # mid-cosine
    for s in (11, 35, 99.5):
        assert close(f(s), half_cos(peak, end, (s - warm) / (total - warm)))
    assert f(110) == end
    assert f(111) == f(10**7) == end


def test_warmup_cosine_defaults():
    f = sch.warmup_cosine(1.0, 100)
    assert f(0) == 1.0  # no warm-up: cosine from peak
    assert close(f(50), 0.5)
    assert f(100) == f(200) == 0.0


def test_warmup_cosine_all_warmup():
    f = sch.warmup_cosine(2.0, 10, 10, start=1.0, end=0.5)
    assert close(f(5), 1.5)
    assert f(9.999) < 2.0
    assert f(10) == f(11) == 0.5  # no cosine left: end at total_steps


@pytest.mark.parametrize(
    "decay, shape",
    [
        ("linear", lambda t: t),
        ("cosine", lambda t: (1 - math.cos(math.pi * t)) / 2),
        ("sqrt", math.sqrt),
    ],
)
def test_wsd(decay, shape):
    peak, total, warm, dec, start, end = 2.0, 100, 10, 20, 0.5, 0.1
    f = sch.wsd(peak, total, warm, dec, start=start, end=end, decay=decay)
    assert f(0) == start
    assert close(f(5), (start + peak) / 2)
    assert f(10) == peak  # end of warm-up
    assert f(10) == f(50) == f(79) == f(79.9) == peak  # plateau
    assert f(80) == peak  # decay starts at the peak
    for s in (81, 85, 90, 97.5, 99):
        t = (s - 80) / 20
        assert close(f(s), peak + (end - peak) * shape(t))
    assert f(100) == f(101) == f(10**6) == end


def test_wsd_sqrt_midpoint():
    f = sch.wsd(1.0, 100, decay_steps=50, decay="sqrt")
    assert close(f(75), 1 - math.sqrt(0.5))


def test_wsd_default_decay_is_a_fifth():
    f = sch.wsd(1.0, 1000)
    assert f(0) == f(799) == f(800) == 1.0  # no warm-up by default; plateau to 800
    assert close(f(900), 0.5)
    assert f(1000) == 0.0


@pytest.mark.parametrize(
    "fraction, total, start_decay",
    [(0.1, 1000, 900), (1.0, 50, 0), (0.25, 10, 8), (0.001, 10, 9)],  # 2.5 -> 2; at least 1
)
def test_wsd_fraction(fraction, total, start_decay):
    f = sch.wsd(1.0, total, decay_steps=fraction)
    assert f(start_decay) == 1.0
    assert f(start_decay + 0.5) < 1.0
    assert f(total) == 0.0


def test_wsd_zero_decay_steps_drops_at_the_end():
    f = sch.wsd(1.0, 10, 2, decay_steps=0, end=0.25)
    assert f(9.9) == 1.0
    assert f(10) == 0.25


def test_join_restarts_counters():
    seen = []

    def record(tag):
        def f(step):
            seen.append((tag, step))
            return float(step)

        return f

    j = sch.join([record("a"), record("b"), record("c")], [10, 25])
    assert [j(0), j(9), j(10), j(24.5), j(25), j(40)] == [0.0, 9.0, 0.0, 14.5, 0.0, 15.0]
    assert seen == [("a", 0), ("a", 9), ("b", 0), ("b", 14.5), ("c", 0), ("c", 15)]


def test_join_builds_warmup_cosine():
    j = sch.join([sch.linear(0.0, 1.0, 10), sch.cosine(1.0, 0.0, 90)], [10])
    w = sch.warmup_cosine(1.0, 100, 10)
    assert all(j(s) == w(s) for s in [0, 3, 9.5, 10, 11, 55, 99, 100, 150])


def test_join_single_schedule():
    f = sch.linear(0.0, 1.0, 4)
    j = sch.join([f], [])
    assert [j(s) for s in range(6)] == [f(s) for s in range(6)]


def test_join_boundary_zero_skips_the_first():
    j = sch.join([sch.constant(1.0), sch.constant(2.0)], [0])
    assert j(0) == 2.0


def test_steps_resume_without_state():
    # the same step, asked in any order, gives the same value
    f = sch.wsd(1.0, 100, 10, 0.3, decay="cosine")
    forward = [f(s) for s in range(120)]
    assert [f(s) for s in reversed(range(120))] == forward[::-1]
    assert [f(s) for s in range(50, 120)] == forward[50:]


# ---------------------------------------------------------------- properties

values = st.floats(-10.0, 10.0, allow_nan=False, allow_subnormal=False)
totals = st.integers(1, 10_000)
fractions = st.floats(0.0, 1.0)


def _steps_in(total: int):
    return st.floats(0.0, 1.5 * total, allow_nan=False)


def _check_monotone_between(f, a, b, s0, s1):
    """``f`` moves from ``a`` to ``b`` without turning back, over ``s0 <= s1``."""
    v0, v1 = f(s0), f(s1)
    assert (v0 <= v1) if a <= b else (v0 >= v1)


@settings(max_examples=150, deadline=None)
@given(a=values, b=values, steps=st.integers(0, 1000), u=fractions, w=fractions)
def test_ramps_bounded_and_monotone(a, b, steps, u, w):
    s0, s1 = sorted((u * 1.2 * steps, w * 1.2 * steps))
    for factory in (sch.linear, sch.cosine):
        f = factory(a, b, steps)
        for s in (s0, s1):
            assert min(a, b) <= f(s) <= max(a, b)
        _check_monotone_between(f, a, b, s0, s1)


@settings(max_examples=150, deadline=None)
@given(
    peak=values,
    start=values,
    end=values,
    total=totals,
    warm_frac=fractions,
    data=st.data(),
)
def test_warmup_cosine_bounded_and_monotone(peak, start, end, total, warm_frac, data):
    warm = int(warm_frac * total)
    f = sch.warmup_cosine(peak, total, warm, start=start, end=end)
    lo, hi = min(start, end, peak), max(start, end, peak)
    s0, s1 = sorted(data.draw(st.tuples(_steps_in(total), _steps_in(total))))
    for s in (s0, s1):
        assert lo <= f(s) <= hi
    if s1 < warm:
        _check_monotone_between(f, start, peak, s0, s1)
    elif s0 >= warm:
        _check_monotone_between(f, peak, end, s0, s1)
    assert f(total) == end
    if warm < total:
        assert f(warm) == peak


@settings(max_examples=150, deadline=None)
@given(
    peak=values,
    start=values,
    end=values,
    total=totals,
    warm_frac=fractions,
    decay_frac=fractions,
    decay=st.sampled_from(["linear", "cosine", "sqrt"]),
    data=st.data(),
)
def test_wsd_bounded_and_monotone(peak, start, end, total, warm_frac, decay_frac, decay, data):
    warm = int(warm_frac * total)
    dec = int(decay_frac * (total - warm))
    f = sch.wsd(peak, total, warm, dec, start=start, end=end, decay=decay)
    lo, hi = min(start, end, peak), max(start, end, peak)
    s0, s1 = sorted(data.draw(st.tuples(_steps_in(total), _steps_in(total))))
    for s in (s0, s1):
        assert lo <= f(s) <= hi
    if s1 < warm:
        _check_monotone_between(f, start, peak, s0, s1)
    elif s0 >= warm:
        _check_monotone_between(f, peak, end, s0, s1)
    assert f(total) == end
    if warm < total - dec:
        assert f(warm) == peak
    if dec > 0:
        assert f(total - dec) == peak  # the decay starts from the peak


@settings(max_examples=100, deadline=None)
@given(
    peak=values,
    start=values,
    end=values,
    total=st.integers(2, 10_000),
    warm_frac=fractions,
    decay=st.sampled_from(["linear", "cosine", "sqrt"]),
)
def test_continuity_at_boundaries(peak, start, end, total, warm_frac, decay):
    # just before each boundary the value is within a small step of the value at it
    warm = max(1, int(warm_frac * (total - 1)))
    dec = total - warm
    eps = 1e-9
    scale = max(abs(peak), abs(start), abs(end), 1.0)
    tol = 1e-6 * scale
    f = sch.warmup_cosine(peak, total, warm, start=start, end=end)
    assert abs(f(warm - eps) - f(warm)) <= tol
    assert abs(f(total - eps) - f(total)) <= tol
    g = sch.wsd(peak, total, warm, dec, start=start, end=end, decay=decay)
    assert abs(g(warm - eps) - g(warm)) <= tol
    # sqrt's slope is infinite at the start of the decay: a bigger gap right there
    assert abs(g(warm + eps) - g(warm)) <= (1e-3 * scale if decay == "sqrt" else tol)
    assert abs(g(total - eps) - g(total)) <= tol


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: sch.linear(0.0, 1.0, -1), "steps"),
        (lambda: sch.cosine(0.0, 1.0, -5), "steps"),
        (lambda: sch.constant(math.nan), "value"),
        (lambda: sch.linear(math.inf, 1.0, 3), "start"),
        (lambda: sch.cosine(0.0, -math.inf, 3), "end"),
        (lambda: sch.warmup_cosine(1.0, 0), "total_steps"),
        (lambda: sch.warmup_cosine(1.0, -3), "total_steps"),
        (lambda: sch.warmup_cosine(1.0, 10, 11), "warmup_steps"),
        (lambda: sch.warmup_cosine(1.0, 10, -1), "warmup_steps"),
        (lambda: sch.warmup_cosine(math.nan, 10), "peak"),
        (lambda: sch.wsd(1.0, 0), "total_steps"),
        (lambda: sch.wsd(1.0, 10, 11), "warmup_steps"),
        (lambda: sch.wsd(1.0, 10, -1), "warmup_steps"),
        (lambda: sch.wsd(1.0, 10, 4, 7), "decay_steps"),
        (lambda: sch.wsd(1.0, 10, 0, -1), "decay_steps"),
        (lambda: sch.wsd(1.0, 10, 0, 0.0), "decay_steps"),
        (lambda: sch.wsd(1.0, 10, 0, 1.5), "decay_steps"),
        (lambda: sch.wsd(1.0, 10, 0, -0.2), "decay_steps"),
        (lambda: sch.wsd(1.0, 10, 0, math.nan), "decay_steps"),
        (lambda: sch.wsd(1.0, 10, 5, 0.6), "decay_steps"),
        (lambda: sch.wsd(1.0, 10, decay="exp"), "decay"),
        (lambda: sch.wsd(1.0, 10, start=math.inf), "start"),
        (lambda: sch.join([], []), "schedules"),
        (lambda: sch.join([sch.constant(1.0)] * 2, []), "boundaries"),
        (lambda: sch.join([sch.constant(1.0)] * 2, [1, 2]), "boundaries"),
        (lambda: sch.join([sch.constant(1.0)] * 3, [5, 5]), "boundaries"),
        (lambda: sch.join([sch.constant(1.0)] * 3, [5, 2]), "boundaries"),
        (lambda: sch.join([sch.constant(1.0)] * 2, [-1]), "boundaries[0]"),
        (lambda: sch.join([sch.constant(1.0)] * 2, [math.inf]), "boundaries[0]"),
    ],
)
def test_value_errors_name_the_argument(make, name):
    with pytest.raises(ValueError, match=rf"(?<![\w\[]){re.escape(name)}(?![\w\[])") as info:
        make()
    # the message also states what is accepted
    assert any(
        c in str(info.value) for c in ("<", ">", "(0, 1]", "one of", "finite", "least", "exactly")
    )


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: sch.linear(0.0, 1.0, 2.5), "steps"),
        (lambda: sch.linear(0.0, 1.0, True), "steps"),
        (lambda: sch.constant("1"), "value"),
        (lambda: sch.warmup_cosine(1.0, 10.0), "total_steps"),
        (lambda: sch.wsd(1.0, 10, 2.0), "warmup_steps"),
        (lambda: sch.wsd(1.0, 10, decay_steps="3"), "decay_steps"),
        (lambda: sch.join([1.0], []), r"schedules\[0\]"),
        (lambda: sch.join([sch.constant(1.0)] * 2, ["3"]), r"boundaries\[0\]"),
    ],
)
def test_type_errors_name_the_argument(make, name):
    with pytest.raises(TypeError, match=name):
        make()


@pytest.mark.parametrize(
    "f",
    [
        sch.constant(1.0),
        sch.linear(0.0, 1.0, 3),
        sch.cosine(0.0, 1.0, 3),
        sch.warmup_cosine(1.0, 10, 2),
        sch.wsd(1.0, 10, 2),
        sch.join([sch.constant(1.0)] * 2, [3]),
    ],
)
def test_bad_steps(f):
    for bad in (-1, -0.5, math.nan):
        with pytest.raises(ValueError, match=r"step must be >= 0"):
            f(bad)
    for bad in ("3", None, True):
        with pytest.raises(TypeError, match="step"):
            f(bad)
