"""The storage-options convergence run (fuseopt.storage_convergence): its numbers, its loss
curves and its plot."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

from fuseopt import storage_convergence as demo


@pytest.fixture(scope="module")
def data():
    return demo.digits()


def test_smaller_states_reach_the_float32_loss(data):
    """The convergence run (300 steps): plain bfloat16 stalls (its loss more than 1.5x
    float32's), Kahan summation, stochastic rounding and 8-bit moments land within 10% of
    float32's loss (measured: float32 0.441, bfloat16 0.979, Kahan 0.445, SR 0.437, 8-bit
    0.418)."""
    loss = {v: demo.train(v, steps=300, data=data) for v in demo.VARIANTS}
    f32 = loss["float32"]
    assert loss["bfloat16"] > 1.5 * f32
    for variant in ("bfloat16 + kahan_sum", "bfloat16 + stochastic_rounding"):
        assert abs(loss[variant] - f32) < 0.1 * f32, variant
    assert abs(loss["float32 + state_bits=8"] - f32) < 0.1 * f32


@pytest.mark.parametrize(
    "variant", ["float32", "bfloat16 + stochastic_rounding", "float32 + state_bits=8"]
)
def test_curve_points_and_its_end_is_the_runs_loss(data, variant):
    """A point before the first step, every ``every`` steps and after the last; measuring the
    loss changes nothing in the run: its last point is :func:`train`'s loss, bit for bit."""
    curve = demo.train_curve(variant, steps=25, data=data, every=10)
    assert [step for step, _ in curve] == [0, 10, 20, 25]
    assert curve[-1][1] == demo.train(variant, steps=25, data=data)
    assert curve[-1][1] < curve[0][1]  # (it learns)
    # every run starts from the same weights: float32's and bfloat16's first losses are close
    assert curve[0][1] == pytest.approx(demo.train_curve("float32", 1, data=data)[0][1], 0.02)


def test_quick_run_writes_the_plot(tmp_path, capsys):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "curves.png"
    assert demo.main(["--steps", "4", "--every", "2", "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert all(variant in out for variant in demo.VARIANTS) and f"wrote {path}" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib_image.imread(path)  # a PNG matplotlib can read back
    assert pixels.shape[:2] == (380, 640) and pixels.std() > 0  # not a blank picture


def test_svg_plot(tmp_path):
    pytest.importorskip("matplotlib")
    curves = {"float32": [(0, 2.3), (5, 1.0)], "bfloat16": [(0, 2.3), (5, 1.5)]}
    path = tmp_path / "curves.svg"
    demo.plot(curves, "title", path)
    text = path.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text and "float32: 1.000" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--every", "0"], "--every must be at least 1, got 0"),
        (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (["--plot", "curves.xyz"], "unknown image format 'xyz'; valid suffixes: "),
        (["--plot", "missing/curves.png"], "its folder 'missing' does not exist"),
    ],
)
def test_bad_arguments_fail_before_training(monkeypatch, tmp_path, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "digits", lambda: pytest.fail("trained despite a bad argument"))
    with pytest.raises(SystemExit) as info:
        demo.main(args)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_a_plot_that_cannot_be_written_after_all(monkeypatch, tmp_path, capsys):
    """The folder checked at the start may be gone by the end: exit status 1, the error names
    --plot."""

    def fail(*args):
        raise PermissionError("gone")

    monkeypatch.setattr(demo, "plot", fail)
    assert demo.main(["--steps", "1", "--plot", str(tmp_path / "c.png")]) == 1
    assert "error: cannot write --plot: gone" in capsys.readouterr().err
