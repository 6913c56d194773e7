"""The benchmark runs every (algorithm, library, implementation) and reports what it measured.

No timing thresholds: these tests check the harness, not the speed of the machine they run on.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import subprocess
import sys
from importlib import resources

import pytest
import torch

from fuseopt import bench, cli

TINY = {"tiny": [[10, 10], [5]]}


@pytest.fixture(scope="module")
def tiny_rows():
    return bench.run(TINY, steps=2, progress=False)


def test_run_covers_every_combination(tiny_rows):
    combos = {(r["algorithm"], r["library"], r["impl"]) for r in tiny_rows}
    expected = set(itertools.product(bench.ALGORITHMS, bench.LIBRARIES, bench.IMPLEMENTATIONS))
    assert combos == expected
    assert len(tiny_rows) == len(expected)


def test_rows_have_positive_times_and_finite_ratios(tiny_rows):
    for r in tiny_rows:
        if r["error"] is not None:  # torch has fused kernels for few algorithms; fuseopt for all
            # (and a reference package with one implementation, lion-pytorch's or prodigyopt's
            # for-loop, has no foreach one)
            reference = bench.ALGORITHMS[r["algorithm"]].reference
            assert r["library"] == "torch" and (
                r["impl"] == "fused" or (reference and r["impl"] == "foreach")
            ), r
            assert r["impl"] in r["error"]
            continue
        assert r["workload"] == "tiny"
        assert r["numel"] == 105 and r["tensors"] == 2
        assert len(r["times_ms"]) == 2 and all(t > 0 for t in r["times_ms"])
        assert r["ms"] > 0
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert math.isfinite(r["gbps"]) and r["gbps"] > 0


def test_ratio_is_relative_to_the_best_torch_implementation(tiny_rows):
    for algo in bench.ALGORITHMS:
        torch_rows = [r for r in tiny_rows if r["algorithm"] == algo and r["library"] == "torch"]
        assert min(r["ratio"] for r in torch_rows if r["ratio"]) == pytest.approx(1.0)


# Bytes of optimizer state per param element of the tiny workload, counted from what each
# optimizer keeps (torch's layout): float32 moments (4 bytes each, 2 for bfloat16 ones), and a
# float32 step tensor per param (4 bytes) where the algorithm counts steps.
STATE_PER_ELEMENT = {  # (torch, fuseopt) bytes per element, step tensor or not
    "SGD": (4, 4, False),  # momentum_buffer
    "Adam": (8, 8, True),  # exp_avg, exp_avg_sq
    "AdamW": (8, 8, True),
    "AdamW+clip": (8, 8, True),
    "AdamW+bf16": (8, 4, True),  # torch's columns: float32 AdamW; fuseopt: bfloat16 moments
    "AdamW+bf16+SR": (8, 4, True),  # (the rounding's generator is not state)
    "AdamW+8bit": (8, 8, True),  # params under 4,096 elements keep float32 moments
    # options for bfloat16 params: with float32 ones, float32 AdamW's state
    "AdamW+kahan": (8, 8, True),
    "AdamW+SR": (8, 8, True),
    "AdamW+f32": (8, 8, True),
    "Adagrad": (4, 4, True),  # sum
    "RMSprop": (4, 4, True),  # square_avg
}


def expected_state_bytes(algorithm: str, library: str, shapes=TINY["tiny"]) -> int:
    torch_bytes, ours, step = STATE_PER_ELEMENT[algorithm]
    per_element = torch_bytes if library == "torch" else ours
    return sum(per_element * math.prod(s) + 4 * step for s in shapes)


@pytest.mark.parametrize("algorithm", STATE_PER_ELEMENT)
def test_state_size_matches_an_independent_count(tiny_rows, algorithm):
    rows = [r for r in tiny_rows if r["algorithm"] == algorithm and r["error"] is None]
    assert {r["library"] for r in rows} == set(bench.LIBRARIES)
    for r in rows:
        expected = expected_state_bytes(algorithm, r["library"])
        assert r["state_bytes"] == expected, r
        assert r["state_mib"] == expected / 2**20
        assert r["state_bytes_per_param"] == expected / 105


def test_state_size_is_the_same_in_every_implementation(tiny_rows):
    sizes = {}
    for r in tiny_rows:
        if r["error"] is None:
            sizes.setdefault((r["algorithm"], r["library"]), set()).add(r["state_bytes"])
    assert all(len(s) == 1 and min(s) > 0 for s in sizes.values()), sizes
    for algorithm in bench.ALGORITHMS:
        assert sizes[algorithm, "torch"] and sizes[algorithm, "fuseopt"]


def test_8bit_state_size_matches_an_independent_count():
    """``state_bits=8``: a param of 4,096 elements or more keeps each moment as one byte per
    element and a float32 scale per block of 256 (the last block partial); a smaller one keeps
    float32 moments; torch's columns keep float32 AdamW's."""
    shapes = [(70, 70), (5,)]  # 4,900 elements: 20 blocks, the last of 36
    rows = bench.run({"t": shapes}, ["AdamW+8bit"], steps=1, progress=False)
    assert len(rows) == 6 and all(r["error"] is None for r in rows)
    steps = 4 * len(shapes)
    expected = {
        "torch": 8 * (4900 + 5) + steps,
        "fuseopt": 2 * (4900 * 1 + math.ceil(4900 / 256) * 4) + 8 * 5 + steps,
    }
    assert expected["fuseopt"] == 2 * (4900 + 20 * 4) + 40 + 8
    for r in rows:
        assert r["state_bytes"] == expected[r["library"]], r
        assert r["state_bytes_per_param"] == expected[r["library"]] / 4905
    assert {r["library"]: r["moved_bytes_per_param"] for r in rows} == {
        "torch": 28,
        "fuseopt": 16 + 16 / 256,
    }


def test_moved_bytes_per_param(tiny_rows):
    """fuseopt's row moves the bytes its row declares; torch's columns time the plain class,
    so a row with storage options counts the plain class's bytes for torch (bfloat16 moments:
    20 bytes per param against float32 AdamW's 28)."""
    for r in tiny_rows:
        algorithm = bench.ALGORITHMS[r["algorithm"]]
        expected = algorithm.bytes_per_element
        if r["library"] == "torch" and algorithm.options:
            expected = bench.ALGORITHMS[algorithm.optimizer].bytes_per_element
        assert r["moved_bytes_per_param"] == expected
        if r["error"] is None:
            assert r["gbps"] == pytest.approx(expected * 105 / (r["ms"] * 1e6))
    bf16 = {r["library"]: r["moved_bytes_per_param"] for r in tiny_rows
            if r["algorithm"] == "AdamW+bf16"}  # fmt: skip
    assert bf16 == {"torch": 28, "fuseopt": 20}


def test_bfloat16_params_options_count_their_own_bytes():
    """With bfloat16 params, each storage option's row counts what its step keeps and moves:
    a Kahan compensation (2 bytes kept, 4 moved per element), float32 moments (8 kept; 16
    moved), stochastic rounding of the param's store (nothing more); torch's columns time
    plain AdamW on the same bfloat16 params (4 kept, 14 moved)."""
    names = ["AdamW", "AdamW+kahan", "AdamW+SR", "AdamW+f32"]
    rows = bench.run(TINY, names, impls=["fused"], steps=1, dtype=torch.bfloat16, progress=False)
    assert len(rows) == 2 * len(names)
    ours = {  # (moved, kept) bytes per element
        "AdamW": (14, 4), "AdamW+kahan": (18, 6), "AdamW+SR": (14, 4), "AdamW+f32": (22, 8),
    }  # fmt: skip
    for r in rows:
        moved, kept = (14, 4) if r["library"] == "torch" else ours[r["algorithm"]]
        assert r["error"] is None, r
        assert r["moved_bytes_per_param"] == moved, r
        steps = 4 * len(TINY["tiny"])  # a float32 step tensor per param
        assert r["state_bytes"] == kept * 105 + steps, r


def test_state_bytes_counts_each_tensor_once():
    """Every tensor in ``optimizer.state``, nested ones too, one held twice once; numbers and
    strings are not memory the bench counts."""
    shared = torch.zeros(3, dtype=torch.float64)  # 24 bytes

    class Fake:
        state = {
            "a": {"m": torch.zeros(10), "step": torch.tensor(1.0), "lr": 0.1, "name": "x"},
            "b": {"codes": torch.zeros(7, dtype=torch.uint8), "pair": [shared, (shared, 2)]},
        }

    assert bench.state_bytes(Fake()) == 40 + 4 + 7 + 24


def test_table_shows_the_state_of_each_library(tiny_rows):
    table = bench.format_table(tiny_rows, bandwidth=50.0).splitlines()
    assert "state MiB" in table[0] and "state B/param" in table[0]
    (line,) = [x for x in table if x.split()[:2] == ["tiny", "AdamW+bf16"]]
    per_param = [f"{expected_state_bytes('AdamW+bf16', lib) / 105:.2f}" for lib in bench.LIBRARIES]
    assert per_param == ["8.08", "4.08"]
    assert " ".join(per_param) in " ".join(line.split())
    assert line.split()[-3] == "20"  # moved bytes per param of fuseopt's fastest
    assert line.endswith("x")  # (x bound stays last)


def test_subsets_of_algorithms_and_impls():
    rows = bench.run(TINY, algorithms=["sgd"], impls=["fused"], steps=1, progress=False)
    assert [(r["algorithm"], r["library"], r["impl"]) for r in rows] == [
        ("SGD", "torch", "fused"),
        ("SGD", "fuseopt", "fused"),
    ]


@pytest.mark.parametrize("above, passes", [(1 << 40, 2), (0, 2 + 3)])
def test_large_steps_get_a_bandwidth_pass_each_round(monkeypatch, above, passes):
    """A step larger than the caches is paired with its own bandwidth pass each round (the
    bandwidth drifts within seconds); a small one only gets passes before and after its steps."""
    calls = []
    real = bench._Calibration.__call__

    def counted(self):
        calls.append(real(self))
        return calls[-1]

    monkeypatch.setattr(bench._Calibration, "__call__", counted)
    monkeypatch.setattr(bench, "CALIBRATE_EACH_ROUND_ABOVE", above)
    rows = bench.run(TINY, algorithms=["sgd"], impls=["fused"], steps=3, progress=False)
    assert len(calls) == 1 + passes  # the first call is the constructor's (it compiles)
    assert rows[0]["bandwidth_gbps"] == pytest.approx(statistics.median(calls[1:]))


def test_an_implementation_that_fails_is_reported_not_fatal(monkeypatch):
    # A negative lr makes both libraries refuse to build the optimizer, as torch does for a
    # fused kernel it lacks: the row says why, the run and the table go on.
    monkeypatch.setitem(bench.ALGORITHMS, "SGD", bench.Algorithm("SGD", {"lr": -1.0}, 20))
    rows = bench.run(TINY, algorithms="SGD", impls="fused", steps=1, progress=False)
    assert len(rows) == 2
    for r in rows:
        assert r["ms"] is None and r["ratio"] is None
        assert "Invalid learning rate" in r["error"]
    assert "n/a" in bench.format_table(rows)


def test_clipping_row_clips_in_each_library_as_its_users_do():
    """``AdamW+clip``: fuseopt's step clips inside (its grads unwritten), torch's row runs
    ``clip_grad_norm_`` before its step (the grads written), and both end at the same params."""
    algorithm = bench.ALGORITHMS["AdamW+clip"]
    runs = {}
    for library in bench.LIBRARIES:
        params = bench._make_params([(50, 40), (300,)])
        for p in params:
            p.grad.mul_(1e3)  # (a norm of ~50: clipped to 1)
        grads = [p.grad.clone() for p in params]
        step = algorithm.make(library, params, {"foreach": False})
        step()
        runs[library] = (params, grads)
    (ours, our_grads), (theirs, their_grads) = runs["fuseopt"], runs["torch"]
    assert all(torch.equal(p.grad, g) for p, g in zip(ours, our_grads))
    assert not any(torch.equal(p.grad, g) for p, g in zip(theirs, their_grads))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)  # (a rounding of the norm)


def test_table_names_every_algorithm(tiny_rows):
    table = bench.format_table(tiny_rows)
    for name in [*bench.ALGORITHMS, *bench.IMPLEMENTATIONS, "tiny", "GB/s"]:
        assert name in table


def test_workloads_json_matches_its_declared_sizes():
    declared = json.loads((resources.files("fuseopt") / "workloads.json").read_text())
    workloads = bench.load_workloads()
    assert set(workloads) == {"gpt2-small", "resnet18", "many-small"}
    for name, shapes in workloads.items():
        assert len(shapes) == declared[name]["tensors"]
        assert sum(math.prod(s) for s in shapes) == declared[name]["numel"]


def test_unknown_workload_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown workload 'nope'.*gpt2-small.*many-small"):
        bench.run(["nope"], steps=1, progress=False)


def test_unknown_algorithm_and_impl_are_errors():
    with pytest.raises(ValueError, match="valid algorithms: SGD, Adam, AdamW"):
        bench.run(TINY, algorithms=["Adamax9"], steps=1, progress=False)
    with pytest.raises(ValueError, match="valid implementations: for-loop, foreach, fused"):
        bench.run(TINY, impls=["triton"], steps=1, progress=False)


def test_cli_unknown_workload_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(["--workloads", "nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown workload 'nope'" in err and "gpt2-small" in err


def test_unwritable_json_path_fails_before_timing(tmp_path, capsys):
    path = tmp_path / "missing" / "out.json"
    with pytest.raises(SystemExit) as info:
        bench.main(["--workloads", "many-small", "--json", str(path)])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert f"cannot write --json {str(path)!r}: its folder" in captured.err
    assert "does not exist" in captured.err
    assert captured.out == ""  # nothing was timed


def test_main_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    args = ["--workloads", "many-small", "--impls", "fused", "--steps", "1", "--json", str(path)]
    assert bench.main(args) == 0
    data = json.loads(path.read_text())
    rows = data["results"]
    assert {(r["algorithm"], r["library"], r["impl"]) for r in rows} == set(
        itertools.product(bench.ALGORITHMS, bench.LIBRARIES, ["fused"])
    )
    assert all(r["workload"] == "many-small" for r in rows)
    assert all(r["ms"] > 0 for r in rows if r["library"] == "fuseopt")
    adamw = {r["library"]: r for r in rows if r["algorithm"] == "AdamW"}
    shapes = bench.load_workloads()["many-small"]
    numel = sum(math.prod(s) for s in shapes)
    for r in adamw.values():  # float32 moments and a step tensor per param
        assert r["state_bytes"] == 8 * numel + 4 * len(shapes)
        assert r["state_bytes_per_param"] == pytest.approx(8 + 4 * len(shapes) / numel)
    assert data["environment"]["torch"] and data["environment"]["bandwidth_gbps"] > 0
    out = capsys.readouterr().out
    assert all(name in out for name in bench.ALGORITHMS)


def test_python_m_fuseopt_bench():
    cmd = [sys.executable, "-m", "fuseopt", "bench", "--workloads", "many-small", "--steps", "1"]
    cmd += ["--impls", "fused"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in bench.ALGORITHMS:
        assert name in proc.stdout
    # Progress goes to stderr (tqdm's bar, or plain lines without tqdm), the table to stdout.
    total = len(bench.ALGORITHMS) * len(bench.LIBRARIES)
    assert f"{total}/{total}" in proc.stderr
    assert f"{total}/{total}" not in proc.stdout


def test_progress_without_tqdm_prints_a_line_per_configuration(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    rows = bench.run(TINY, algorithms=["SGD", "Adam"], impls=["fused"], steps=1)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(rows) == 4
    assert err[0].startswith("[1/4] bench: tiny SGD torch fused: ")
    assert err[-1].startswith("[4/4] bench: tiny Adam fuseopt fused: ")
    assert all(line.endswith("ms/step") for line in err)


def test_cli_unknown_subcommand_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["nope"])
    assert info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_cli_forwards_to_bench(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--help"])
    assert info.value.code == 0
    assert "fuseopt bench" in capsys.readouterr().out
