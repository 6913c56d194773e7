"""``fuseopt demo``: the same start and batches for every run, the table, the picture, the errors."""

from __future__ import annotations

import math
import sys

import pytest
from conftest import check_png, run_cli

from fuseopt import demo

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def data():
    return demo.load_digits()


def table_rows(out: str) -> list[list[str]]:
    """The table's rows, split into cells (run names and numbers hold no spaces)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("train loss:"))
    return [line.split() for line in lines[start:end]]


def test_digits_split_is_fixed(data):
    x_train, y_train, x_test, y_test = data
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64)
    assert 0 <= x_train.min() and x_train.max() <= 1
    assert set(y_test.tolist()) == set(range(10))
    again = demo.load_digits()
    assert all((a == b).all() for a, b in zip(data, again))


def test_runs_share_the_start_and_the_batches(data):
    first = demo.train(demo.Run("Adam"), "fuseopt", data, epochs=1, progress=False)
    second = demo.train(demo.Run("Adam"), "fuseopt", data, epochs=1, progress=False)
    other_seed = demo.train(demo.Run("Adam"), "fuseopt", data, epochs=1, seed=1, progress=False)
    assert first.steps == len(first.losses) == math.ceil(1437 / demo.BATCH_SIZE)
    assert first.losses == second.losses
    assert first.losses[0] != other_seed.losses[0]
    sgd = demo.train(demo.Run("SGD"), "fuseopt", data, epochs=1, progress=False)
    assert sgd.losses[0] == first.losses[0]  # the same initial weights and first batch
    assert sgd.losses[1] != first.losses[1]
    assert 0 < first.step_s < first.wall_s
    assert first.losses[-1] < 0.7 * first.losses[0]  # it learns


def test_threads_hold_while_training(data):
    import torch

    from fuseopt.optimizer import register_optimizer_step_pre_hook

    before = torch.get_num_threads()
    seen = []
    handle = register_optimizer_step_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        torch.set_num_threads(2)
        result = demo.train(demo.Run("NAdam"), "fuseopt", data, 1, progress=False, threads=1)
    finally:
        handle.remove()
        torch.set_num_threads(before)
    assert len(seen) == 2 + result.steps  # the warm-up's two steps, then the run's
    assert set(seen[2:]) == {1}


def test_default_runs_cover_the_issue():
    runs = demo.parse_runs(demo.DEFAULT_RUNS)
    assert {r.algorithm for r in runs} >= {"SGD", "Adam", "AdamW", "RMSprop", "NAdam"}
    assert demo.ALGORITHMS["SGD"]["momentum"] > 0
    assert any(r.scheduler and r.ema for r in runs)


@pytest.mark.parametrize("library", ["fuseopt", "torch"])
def test_every_optimizer_and_scheduler_builds(library):
    for algorithm in demo.ALGORITHMS:
        for scheduler in [None, *demo.SCHEDULERS]:
            model = demo.make_model(0)
            run = demo.Run(algorithm, scheduler, ema=True)
            opt, sched, ema = demo._build(run, library, model, total_steps=100)
            assert type(opt).__name__ == algorithm
            assert type(opt).__module__.startswith(library)
            assert (sched is None) == (scheduler is None)
            if scheduler is not None and library == "fuseopt":
                assert type(sched).__module__.startswith("fuseopt")
            assert ema.module is not model and type(ema).__module__.startswith(library)


def test_parse_runs():
    assert demo.parse_runs("sgd, adamw+onecyclelr+ema") == [
        demo.Run("SGD"),
        demo.Run("AdamW", "OneCycleLR", True),
    ]
    assert demo.parse_runs("Adam,SGD+LinearLR", scheduler="WSDLR") == [
        demo.Run("Adam", "WSDLR"),
        demo.Run("SGD", "LinearLR"),
    ]
    assert demo.Run("AdamW", "WSDLR", True).name == "AdamW+WSDLR+EMA"


def test_compare_torch_table_and_picture(tmp_path, capsys):
    path = tmp_path / "demo.png"
    argv = ["demo", "--optimizers", "SGD,AdamW+WarmupCosineLR+EMA", "--epochs", "2"]
    code, out, err = run_cli(capsys, *argv, "--compare-torch", "-o", str(path))
    assert code == 0
    check_png(path, min_size=(300, 700))
    header = next(line for line in out.splitlines() if line.startswith("run "))
    columns = ["run", "library", "train loss", "test acc", "wall s", "step s", "ms/step"]
    assert all(c in header for c in [*columns, "max |Δloss|"])
    rows = table_rows(out)
    assert [r[:2] for r in rows] == [
        ["SGD", "fuseopt"],
        ["SGD", "torch"],
        ["AdamW+WarmupCosineLR+EMA", "fuseopt"],
        ["AdamW+WarmupCosineLR+EMA", "torch"],
    ]
    for ours, theirs in (rows[0:2], rows[2:4]):
        assert len(ours) == 8 and len(theirs) == 7  # the difference is on fuseopt's line
        assert float(ours[7]) < 1e-5  # the same algorithm: the curves differ by rounding only
        assert ours[2] == theirs[2] and ours[3] == theirs[3]  # train loss, test acc
        loss, acc = float(ours[2]), float(ours[3].rstrip("%"))
        assert 0 < loss < 2.3 and 50 < acc <= 100  # learned something in two epochs
        assert all(float(v) > 0 for v in ours[4:7])
    assert out.splitlines()[-1] == f"wrote {path}"
    # a progress bar per run and library, to stderr
    for run in ("SGD", "AdamW+WarmupCosineLR+EMA"):
        for library in ("fuseopt", "torch"):
            assert f"{run} ({library})" in err
    assert "epoch 2/2" in err


def test_no_plot_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--optimizers", "RMSprop", "--epochs", "1", "--no-plot", "--no-progress"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and err == ""
    assert [r[:2] for r in table_rows(out)] == [["RMSprop", "fuseopt"]]
    assert "max |Δloss|" not in out and "wrote" not in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizers", "SGD,Adamm"], "unknown optimizer 'Adamm' in --optimizers 'Adamm'; "),
        (["--optimizers", "LBFGS"], "valid optimizers: SGD, Adam, AdamW, RMSprop, NAdam"),
        (["--optimizers", "Adam+Cosine"], "unknown scheduler 'Cosine' in --optimizers"),
        (["--optimizers", "Adam+Cosine"], "valid schedulers: WarmupCosineLR, WSDLR, OneCycleLR"),
        (["--scheduler", "StepLR"], "unknown scheduler 'StepLR' in --scheduler; valid"),
        (["--optimizers", ","], "--optimizers names no optimizer; valid optimizers: SGD"),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        (["--batch-size", "-3"], "--batch-size must be at least 1, got -3"),
        (["-o", "/nonexistent-folder/demo.png"], "cannot write -o/--output '/nonexistent-folder/"),
        (["-o", "demo.txt"], "unknown image format 'txt'; valid suffixes: "),
    ],
)
def test_errors(capsys, argv, message):
    code, out, err = run_cli(capsys, "demo", *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == ""


def test_missing_scikit_learn_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now raises ImportError
    code, out, err = run_cli(capsys, "demo", "--epochs", "1", "--no-plot")
    assert code == 1 and out == ""
    assert 'needs scikit-learn for its data set (digits): pip install "fuseopt[demo]"' in err
    assert "Traceback" not in err


def test_missing_matplotlib_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    code, _, err = run_cli(capsys, "demo", "--epochs", "1")
    assert code == 2
    assert 'needs matplotlib: pip install "fuseopt[demo]" (or use --no-plot)' in err
