"""The Triton kernels against torch.optim's for-loop: on CPU tensors through Triton's interpreter,
and, where torch sees a GPU, compiled on CUDA tensors (the tests taking ``device``).

``FUSEOPT_FUSED_BACKEND=triton`` sends CPU params to the Triton backend and ``TRITON_INTERPRET=1``
makes ``@triton.jit`` interpret the generated kernels (read when a kernel module is loaded, so
both are set before the first kernel is built); CUDA params take the backend without either. The
interpreter rounds like the GPU except for ``tl.fma`` (a multiply and an add there), so float32
uses the fused kernels' tolerance of test_parity on both devices. Half-precision params compute in
float32 and round once per stored value, where torch's for-loop on the same dtype rounds after
every op: see ``HALF_TOL``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from algorithms import ALGORITHMS, BY_NAME, cases
from conftest import CUDA_ONLY, clone_params, make_grads, make_params
from conftest import run_steps as _run
from test_parity import TOL, _compare

import fuseopt
from fuseopt._dispatch import amp_scaling
from fuseopt.kernels import triton_gpu

pytest.importorskip("triton")

STEPS = 7  # torch's choice: RAdam's rectification starts at step 6
# Several chunks and loop iterations at the interpreter's block sizes (64, 128) on the CPU, and at
# the compiled kernels' (1024, 8192) on CUDA.
SHAPES = [(4, 3), (7,), (2, 3, 2), (), (0,), "transposed", (300,)]
CUDA_SHAPES = SHAPES[:-1] + [(20_000,)]


@pytest.fixture(autouse=True)
def _triton_on_cpu(request, monkeypatch):
    """CPU tensors: the interpreter (tests without ``device`` run there); CUDA tensors: the
    compiled kernels (the ``device`` fixture keeps the interpreter off)."""
    if "device" in request.fixturenames and request.getfixturevalue("device") != "cpu":
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")


@pytest.fixture
def launches(monkeypatch):
    """The arguments of every Triton launch (one per batch) so far."""
    calls = []
    run = triton_gpu.run
    monkeypatch.setattr(triton_gpu, "run", lambda *a, **k: (calls.append(a), run(*a, **k))[1])
    return calls


def _problem(dtype, steps=STEPS, device="cpu"):
    shapes = SHAPES if device == "cpu" else CUDA_SHAPES
    params = make_params(dtype, shapes=shapes, device=device)
    return params, clone_params(params), make_grads(params, steps)


@pytest.mark.parametrize(
    ("algo", "kwargs"), [pytest.param(a, kw, id=f"{a.name}-{d}") for a, d, kw in cases()]
)
def test_float32_parity(algo, kwargs, launches):
    """Every algorithm and option set of the parity table, fused=True, one launch per step."""
    params, ref_params, grads = _problem(torch.float32)
    opt = _run(algo.ours, params, grads, **kwargs, fused=True)
    ref = _run(algo.theirs, ref_params, grads, **kwargs, foreach=False)
    _compare(opt, ref, params, ref_params, False, torch.float32)
    assert len(launches) == STEPS
    assert all(len(call[0].numels) == len(params) for call in launches)  # transposed too


@pytest.mark.parametrize("name", ["Adam", "Adagrad", "ASGD", "NAdam", "RAdam", "Adamax"])
def test_device_steps_give_float64_scalars(name, monkeypatch):
    """fused=True on a GPU keeps each ``step`` on the device as float32 and the kernels read it
    there; the per-step scalars (bias corrections, RAdam's rectification) are then computed from
    it widened to float64, as torch's fused kernels compute them in double. Here the CPU steps
    are taken for device steps: float64 params must match torch's for-loop at the float64
    tolerance (float32 scalars missed it by 1e-9 to 3e-6)."""
    from fuseopt import _plan

    monkeypatch.setattr(_plan, "_device_step", lambda e: e.backend == "triton")
    params, ref_params, grads = _problem(torch.float64)
    opt = _run(BY_NAME[name].ours, params, grads, fused=True)
    ref = _run(BY_NAME[name].theirs, ref_params, grads, foreach=False)
    assert all(s["step"].dtype == torch.float32 for s in opt.state.values())
    _compare(opt, ref, params, ref_params, False, torch.float64)


def test_kernel_cache_keeps_the_modes_apart(monkeypatch):
    """One process may build a kernel compiled for the GPU and the same kernel interpreted (the
    CUDA tests and the CPU ones): each mode has its own, never the other's."""
    args = (BY_NAME["SGD"].ours.rule, _sgd_flags(), ("param", "grad"), torch.float32, False)
    interpreted = triton_gpu.kernel(*args)[0]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compiled = triton_gpu.kernel(*args)[0]
    assert compiled is not interpreted and compiled is triton_gpu.kernel(*args)[0]
    assert "interp" in interpreted.__module__ and "interp" not in compiled.__module__


def _sgd_flags():
    from fuseopt.rule import Flags

    group = dict(maximize=False, weight_decay=0.0, momentum=0.0, nesterov=False)
    return Flags(BY_NAME["SGD"].ours.rule.flags(group, False, None, {}))


def test_default_is_triton_and_float64(launches):
    """With the switch, the default implementation is the Triton kernel; float64 computes in
    float64 (scalars through the device table)."""
    params, ref_params, grads = _problem(torch.float64)
    kwargs = dict(weight_decay=0.1, amsgrad=True)
    opt = _run(fuseopt.Adam, params, grads, **kwargs)
    ref = _run(torch.optim.Adam, ref_params, grads, **kwargs, foreach=False)
    _compare(opt, ref, params, ref_params, False, torch.float64)
    assert len(launches) == STEPS


def test_complex_runs_on_the_real_view():
    params, ref_params, grads = _problem(torch.complex64)
    opt = _run(fuseopt.Adam, params, grads, fused=True)
    ref = _run(torch.optim.Adam, ref_params, grads, foreach=False)
    _compare(opt, ref, params, ref_params, False, torch.complex64)


# Half precision: the kernel computes in float32 and rounds each stored value once per step. The
# oracle does the same with torch: its for-loop on float32 copies, rounding params and state to
# the dtype after each step. (torch's for-loop on the half dtype itself rounds after every op and
# breaks down where float16 cannot hold eps=1e-8 or centered RMSprop cancels.) Both sides round
# float32 values that may differ by an ulp (sqrt, fma), so a value may land one unit of the
# dtype's last place away and carry that on: rtol is the dtype's eps (one to two such units), and
# atol one unit at the params' scale (|p| ~ 1), which an additive update (Rprop, SGD) keeps
# while it carries the param towards 0.
HALF_TOL = {
    torch.bfloat16: dict(rtol=2**-7, atol=2**-7),
    torch.float16: dict(rtol=2**-10, atol=2**-10),
}


def _run_rounded(cls, params, grads, dtype, **kwargs):
    """torch's step in float32 on ``params``, each stored value rounded to ``dtype`` after it."""
    opt = cls(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.float()
        opt.step()
        with torch.no_grad():
            for p in params:
                p.copy_(p.to(dtype))
                for value in opt.state[p].values():
                    if torch.is_tensor(value) and value.dim():
                        value.copy_(value.to(dtype))
    return opt


@pytest.mark.parametrize("dtype", list(HALF_TOL), ids=str)
@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
def test_half_precision(algo, dtype):
    """float16/bfloat16 params (and state) with the richest option set of each algorithm."""
    desc, kwargs = algo.configs()[-1]
    params, ref_params, grads = _problem(dtype)
    ref_params = [p.detach().float().requires_grad_() for p in ref_params]
    opt = _run(algo.ours, params, grads, **kwargs, fused=True)
    ref = _run_rounded(algo.theirs, ref_params, grads, dtype, **kwargs, foreach=False)
    for p, q in zip(params, ref_params):
        assert p.dtype == dtype
        torch.testing.assert_close(p.detach().float(), q.detach(), **HALF_TOL[dtype])
    theirs = ref.state_dict()["state"]
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            if key == "step":
                assert torch.equal(value, theirs[i][key])
            elif torch.is_tensor(value) and value.dim():
                assert value.dtype == dtype
                torch.testing.assert_close(value.float(), theirs[i][key], **HALF_TOL[dtype])


CAPTURABLE = [a for a in ALGORITHMS if a.name not in ("SGD", "Adagrad")]  # torch's capturable ones


@pytest.mark.parametrize("algo", CAPTURABLE, ids=lambda a: a.name)
def test_capturable(algo, launches, device):
    """capturable=True: scalars computed from the device steps (no host read of them), all params
    in one launch (RAdam, whose flags read the step, one launch per param), torch's numbers."""
    desc, kwargs = algo.configs()[-1]
    kwargs = {k: v for k, v in kwargs.items() if not torch.is_tensor(v)}
    params, ref_params, grads = _problem(torch.float32, device=device)
    opt = _run(algo.ours, params, grads, **kwargs, capturable=True)
    ref = _run(algo.theirs, ref_params, grads, **kwargs, foreach=False)
    _compare_capturable(opt, ref, params, ref_params)
    per_step = len(params) if algo.name == "RAdam" else 1
    assert len(launches) == STEPS * per_step
    if algo.name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam"):  # bias corrections
        assert any(torch.is_tensor(v) for v in launches[-1][0].scalars.values())


# capturable without a host read: NAdam and ASGD (host scalar state) and RAdam (a flag from the
# step) still read one
NO_HOST_READ = ["Adam", "AdamW", "Adamax", "Adadelta", "RMSprop", "Rprop"]


@pytest.mark.parametrize("name", NO_HOST_READ)
def test_capturable_step_reads_nothing_back(name, monkeypatch, device):
    """A capturable step never reads a tensor back to the host (what a CUDA graph forbids)."""
    desc, kwargs = BY_NAME[name].configs()[-1]
    params, _, grads = _problem(torch.float32, steps=3, device=device)
    opt = BY_NAME[name].ours(params, **kwargs, capturable=True)

    def host_read(*args, **kwargs):
        raise AssertionError("host read")

    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        with monkeypatch.context() as m:
            for method in ("item", "tolist", "__float__", "__bool__", "numpy"):
                m.setattr(torch.Tensor, method, host_read)
            opt.step()


@pytest.mark.parametrize("device", CUDA_ONLY, indirect=True)
@pytest.mark.parametrize("name", NO_HOST_READ)
def test_capturable_step_replays_in_a_cuda_graph(name, device):
    """A capturable step captured in a CUDA graph (where any host read or sync fails) and replayed
    gives the eager steps' params and state, bitwise: each replay bumps the device steps and
    computes its scalars from them again."""
    algo = BY_NAME[name]
    desc, kwargs = algo.configs()[-1]
    kwargs = {k: v for k, v in kwargs.items() if not torch.is_tensor(v)}
    params, twins, grads = _problem(torch.float32, steps=5, device=device)
    eager = _run(algo.ours, twins, grads, **kwargs, capturable=True)
    opt = algo.ours(params, **kwargs, capturable=True)
    static = [g.clone() for g in grads[0]]  # a graph reads the grads it was captured with
    for p, g in zip(params, static):
        p.grad = g
    side = torch.cuda.Stream()  # warm-up (state, device tables) off the default stream, as
    side.wait_stream(torch.cuda.current_stream())  # torch's CUDA-graph recipe does
    with torch.cuda.stream(side):
        for step_grads in grads[:2]:
            torch._foreach_copy_(static, step_grads)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()  # recorded, not run
    for step_grads in grads[2:]:
        torch._foreach_copy_(static, step_grads)
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(params, twins):
        assert torch.equal(p.detach(), q.detach())
    theirs = eager.state_dict()["state"]
    for i, state in opt.state_dict()["state"].items():
        assert list(state) == list(theirs[i])
        for key, value in state.items():
            assert torch.equal(value, theirs[i][key]), key
        assert state["step"].item() == len(grads)  # two warm-up steps and three replays


def test_capturable_params_with_different_steps(device):
    """Stacked steps give each tensor its own bias corrections."""
    params, ref_params, grads = _problem(torch.float32, device=device)
    opt = fuseopt.Adam(params, capturable=True)
    ref = torch.optim.Adam(ref_params, foreach=False)
    for i, step_grads in enumerate(grads):
        for j, (p, q, g) in enumerate(zip(params, ref_params, step_grads)):
            skip = j == 0 and i % 2  # the first param has no grad every other step
            p.grad = None if skip else g.clone()
            q.grad = None if skip else g.clone()
        opt.step()
        ref.step()
    _compare_capturable(opt, ref, params, ref_params)


def _compare_capturable(opt, ref, params, ref_params):
    """``_compare``, the groups differing only by the ``capturable`` flag the test chose."""
    for group in opt.param_groups:
        assert group["capturable"]
        group["capturable"] = False
    _compare(opt, ref, params, ref_params, False, torch.float32)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Adagrad", "RMSprop", "NAdam"])
def test_grad_scale_and_found_inf(name, device):
    """GradScaler's attributes: grads divided by ``grad_scale`` in the kernel; a step with
    ``found_inf`` leaves params, state and the step count unchanged."""
    algo = BY_NAME[name]
    desc, kwargs = algo.configs()[-1]
    kwargs = {k: v for k, v in kwargs.items() if not torch.is_tensor(v)}
    params, ref_params, grads = _problem(torch.float32, device=device)
    opt = algo.ours(params, **kwargs, fused=True)
    assert opt._step_supports_amp_scaling
    ref = algo.theirs(ref_params, **kwargs, foreach=False)
    scale = torch.tensor(1024.0, device=device)  # (GradScaler's are on the params' device)
    for step_grads in grads:
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g * scale, g.clone()
        opt.grad_scale, opt.found_inf = scale, torch.tensor(0.0, device=device)
        opt.step()
        ref.step()
    _compare(opt, ref, params, ref_params, False, torch.float32)
    before = ([p.detach().clone() for p in params], opt.state_dict())
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.found_inf = torch.tensor(1.0, device=device)
    opt.step()
    del opt.grad_scale, opt.found_inf
    for p, q in zip(params, before[0]):
        assert torch.equal(p.detach(), q)
    after = opt.state_dict()["state"]
    for i, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(after[i][key], value), key


def test_grad_scaler_end_to_end(device):
    """torch.amp.GradScaler drives fuseopt's fused step (no unscale pass of its own) to the same
    params as torch's for-loop Adam under the same scaler, inf steps included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=gen).to(device)
    results = []
    for cls, flags in ((fuseopt.Adam, dict(fused=True)), (torch.optim.Adam, dict(foreach=False))):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3).to(device)  # (initialised on the CPU: the same weights)
        opt = cls(model.parameters(), lr=0.01, **flags)
        # (what GradScaler reads: torch's for-loop has no such attribute)
        assert getattr(opt, "_step_supports_amp_scaling", False) == (cls is fuseopt.Adam)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
        for i in range(4):
            loss = model(x).square().mean() * (float("inf") if i == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        results.append((list(model.parameters()), opt.state_dict()["state"][0]["step"]))
    for p, q in zip(results[0][0], results[1][0]):
        assert p.device.type == device
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    assert results[0][1].item() == results[1][1].item() == 3


def test_amp_scaling_where_fused_kernels_run(monkeypatch):
    """GradScaler hands the scaling to the fused kernels, Triton's and (as torch's fused CPU
    optimizers) numba's; never to foreach or plain-code optimizers (tests/test_amp.py runs it)."""
    p = torch.zeros(3, requires_grad=True)
    assert amp_scaling(fuseopt.Adam([p], fused=True))
    assert amp_scaling(fuseopt.Adam([p]))  # the default is the Triton kernel here
    assert not amp_scaling(fuseopt.Adam([p], foreach=True))
    assert not fuseopt.LBFGS([p])._step_supports_amp_scaling
    monkeypatch.delenv("FUSEOPT_FUSED_BACKEND")
    assert amp_scaling(fuseopt.Adam([p], fused=True))  # numba
    opt = fuseopt.Adam([p], foreach=True)
    p.grad = torch.ones(3)
    opt.grad_scale = torch.tensor(2.0)
    with pytest.raises(AssertionError, match="Expected grad_scale and found_inf to be None"):
        opt.step()
    assert not opt.state  # nothing changed


def test_without_triton_the_numba_kernel_runs(monkeypatch, launches):
    """Where Triton cannot be imported, the switch is ignored: CPU params take the numba kernel."""
    monkeypatch.setattr(triton_gpu, "available", lambda: False)
    params, ref_params, grads = _problem(torch.float32)
    opt = _run(fuseopt.Adam, params, grads, fused=True)
    ref = _run(torch.optim.Adam, ref_params, grads, foreach=False)
    _compare(opt, ref, params, ref_params, False, torch.float32)
    assert not launches and opt._step_supports_amp_scaling  # (numba's kernel unscales too)
    half = torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)
    half.grad = torch.ones_like(half)
    fuseopt.Adam([half], lr=0.5, fused=True).step()  # bfloat16 too: numba's kernel
    assert not launches and torch.equal(half, torch.full_like(half, -0.5))


def test_generated_source_is_shared_and_readable():
    """The Triton kernel comes from the traced graph the numba kernel uses; its source spells the
    vocabulary with correctly rounded division and sqrt."""
    from fuseopt.kernels.trace import trace

    rule, ops = fuseopt.Adam.rule, ("param", "grad", "exp_avg", "exp_avg_sq")
    flags = rule.flags(
        dict(amsgrad=False, maximize=False, weight_decay=0, decoupled_weight_decay=False),
        False,
        1,
        {},
    )
    from fuseopt.rule import Flags

    graph = trace(rule, Flags(flags), ops)
    src = triton_gpu.source(graph, ops, torch.bfloat16, table=False)
    assert "tl.sqrt_rn(" in src and "tl.div_rn(" in src and "lerp(" in src
    assert "bf16_store(" in src and src.count("tl.load(ptrs + ") == len(ops)


# (dtype, scalars from the device table) per algorithm, in turn: every dtype and both scalar paths
_COMPILED = [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)]


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
def test_kernel_compiles_for_sm90(algo, launches, monkeypatch):
    """The interpreter forgives what the compiler may not: each algorithm's kernel (its richest
    option set, GradScaler on) compiles to PTX for an H100 (sm_90) without a GPU, with
    correctly rounded division and sqrt (no ``.approx``) and the rule's FMAs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    desc, kwargs = algo.configs()[-1]
    params, _, grads = _problem(torch.float32, steps=2)
    _run(algo.ours, params, grads, **kwargs, fused=True)
    launch = launches[-1][0]
    rule, flags, operands = launch.rule, launch.flags, launch.operands
    dtype, table = _COMPILED[ALGORITHMS.index(algo) % len(_COMPILED)]
    graph = triton_gpu.trace(rule, flags, operands)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fn = triton_gpu.import_source(
        triton_gpu.source(graph, operands, dtype, table), "fuseopt_triton_"
    ).kernel
    signature = {"ptrs": "*i64", "chunks": "*i64", "NT": "i32"}
    if table:
        signature.update(scal="*fp64", scal_stride="i32")
    else:
        signature.update({f"s{k}": "fp32" for k in range(len(graph.scalars))})
    signature.update(grad_scale="*fp32", found_inf="*fp32", seed="i64")
    constexprs = dict(SCALE=True, INF=True, BLOCK=triton_gpu.BLOCK, CHUNK=triton_gpu.CHUNK)
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    import triton

    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"enable_fp_fusion": False},
    )
    ptx = compiled.asm["ptx"]
    assert ".approx" not in ptx
    if any(op in ("fma", "lerp") for op, _ in graph.nodes):
        assert "fma.rn.f32" in ptx
    if any(op == "sqrt" for op, _ in graph.nodes):
        assert "sqrt.rn.f32" in ptx


def test_imports_triton_lazily():
    """``import fuseopt`` and a CPU step without the switch never import Triton."""
    code = (
        "import sys, torch, fuseopt\n"
        "p = torch.zeros(3, requires_grad=True); p.grad = torch.ones(3)\n"
        "fuseopt.Adam([p]).step()\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "FUSEOPT_FUSED_BACKEND"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize(
    ("make", "dtype"),
    [
        (lambda ps: fuseopt.LARS(ps, weight_decay=0.1, fused=True), torch.float32),
        (lambda ps: fuseopt.Lamb(ps, weight_decay=0.1, fused=True), torch.bfloat16),
        (lambda ps: fuseopt.AdamW(ps, cautious=True, fused=True), torch.float32),
    ],
    ids=["LARS", "Lamb", "cautious-AdamW"],
)
def test_reduction_kernel_compiles_for_sm90(make, dtype, monkeypatch):
    """A rule's first pass (its sums, one program per chunk, float64 accumulators) compiles to
    PTX for an H100 without a GPU, with correctly rounded division and sqrt."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fuseopt._plan import launch_flags
    from fuseopt.kernels.trace import trace_reduce

    params = make_params(torch.float32, shapes=[(4, 3), (7,)])
    opt = make(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # (the flags and operands of a real step)
    rule, group = opt.rule, opt.param_groups[0]
    flags = launch_flags(rule, group, False, 2.0, {})
    operands = ("param", "grad", *(s.name for s in rule.state if s.wanted(group)))
    graph = trace_reduce(rule, flags, operands)
    assert graph.outputs  # the rule has sums to take
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fn = triton_gpu.import_source(
        triton_gpu.reduce_source(graph, operands, dtype), "fuseopt_triton_reduce_"
    ).sums
    signature = {"ptrs": "*i64", "chunks": "*i64", "NT": "i32", "scal": "*fp64",
                 "scal_stride": "i32", "out": "*fp64"}  # fmt: skip
    constexprs = dict(NOUT=len(graph.outputs), BLOCK=triton_gpu.BLOCK, CHUNK=triton_gpu.CHUNK)
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"enable_fp_fusion": False},
    )
    assert ".approx" not in compiled.asm["ptx"]


@pytest.mark.parametrize(
    "dtypes", [(torch.float32, torch.float32, torch.bfloat16, torch.bfloat16),
               (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)]
)  # fmt: skip
def test_storage_kernel_compiles_for_sm90(dtypes, monkeypatch):
    """A storage format's kernel (a dtype per operand, stochastic rounding's hash)
    compiles to PTX for an H100 without a GPU: Adam's moments in one dtype, the param in
    another."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fuseopt._plan import launch_flags

    opt = fuseopt.Adam([torch.zeros(2)])
    flags = launch_flags(opt.rule, opt.param_groups[0], False, 1.0, {})
    operands = ("param", "grad", "exp_avg", "exp_avg_sq")
    graph = triton_gpu.trace(opt.rule, flags, operands)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    src = triton_gpu.source(graph, operands, dtypes, table=False, sr=True)
    fn = triton_gpu.import_source(src, "fuseopt_triton_").kernel
    signature = {"ptrs": "*i64", "chunks": "*i64", "NT": "i32"}
    signature.update({f"s{k}": "fp32" for k in range(len(graph.scalars))})
    signature.update(grad_scale="*fp32", found_inf="*fp32", seed="i64")
    constexprs = dict(SCALE=True, INF=True, BLOCK=triton_gpu.BLOCK, CHUNK=triton_gpu.CHUNK)
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"enable_fp_fusion": False},
    )
    ptx = compiled.asm["ptx"]
    assert "ld.global.b16" in ptx or "ld.global.u16" in ptx  # (the bfloat16 operands' bits)
    assert "mul.lo.s64" in ptx or "mul.lo.u64" in ptx  # (the stream's key, once per tensor)
    assert "mul.lo.s32" in ptx or "mul.lo.u32" in ptx  # (the hash of each element)
