"""Argument docs shared by the algorithms' docstrings (torch's wording, fuseopt's defaults)."""

params = """params (iterable): iterable of parameters or named_parameters to optimize
            or iterable of dicts defining parameter groups. When using named_parameters,
            all parameters in all groups should be named"""
foreach = """foreach (bool, optional): whether the foreach (multi-tensor) implementation is
            used. If unspecified by the user (so foreach is None), fuseopt runs its fused
            kernel where it has one for the device and dtype (default: None)"""
fused = """fused (bool, optional): whether the fused implementation (one numba kernel per step
            on CPU, for float32, float64, bfloat16 and float16, the 16-bit ones computed in
            float32 and rounded once) is used. If unspecified (None), fuseopt picks it on CPU
            for those dtypes, unlike torch, whose CPU default is the for-loop. On CUDA, the fused
            implementation (and the default, when Triton is importable) is one Triton kernel
            per step, for float32, float16, bfloat16 and float64 (default: None)"""
maximize = """maximize (bool, optional): maximize the objective with respect to the params,
            instead of minimizing (default: False)"""
capturable = """capturable (bool, optional): whether this instance is safe to capture in a
            graph (CUDA graphs): step counters stay on the device (default: False)"""
differentiable = """differentiable (bool, optional): whether autograd should occur through the
            optimizer step; runs the reference implementation with grad enabled (default: False)"""

clipping = """max_grad_norm (float, optional): clip the grads to this total norm inside the step,
            with the numbers of ``torch.nn.utils.clip_grad_norm_`` over the params of every
            group that clips followed by the step, but no grad is written; the total norm is
            then ``opt.grad_norm`` (default: None, no clipping)
        norm_type (float, optional): the p of the clipping p-norm, ``inf`` for the max norm
            (default: 2.0)
        error_if_nonfinite (bool, optional): raise, before anything changes, where the total
            norm is inf or NaN (default: False)
        skip_if_nonfinite (bool, optional): where a grad holds an inf or a NaN, change nothing
            (params, state, step counts) and set ``opt.stepped`` to False (default: False)"""

storage = """state_dtype (torch.dtype, optional): keep the state tensors (moments; never ``step``)
            in this dtype: ``torch.bfloat16`` for float32 params, or ``torch.float32`` for
            bfloat16 params; every implementation computes in float32 and rounds once per
            store (default: None, the param's dtype, as torch)
        stochastic_rounding (bool, optional): round bfloat16 stores (states and params)
            stochastically, unbiased, from a generator seeded by torch's at construction
            (default: False)
        kahan_sum (bool, optional): keep a bfloat16 param's rounding error in a bfloat16
            state ``kahan_comp`` and add it to its next update (Kahan summation; float32 params
            are unaffected) (default: False)
        state_bits (int, optional): 8: keep the states the algorithm offers in 8 bits
            (Adam's, AdamW's, Lion's and AdEMAMix's moments, SGD's momentum), blockwise
            quantized as bitsandbytes' 8-bit optimizers (Dettmers et al. 2022): uint8 codes of
            the dynamic map and a float32 scale per block of 256 elements (state
            ``<name>_absmax``); params of fewer than ``min_8bit_size`` elements (a group key,
            default 4096) or not contiguous keep full-precision states (default: None)"""


def fill(doc: str) -> str:
    """Replace ``{name}`` placeholders by the shared docs above (LaTeX braces stay untouched)."""
    for name, text in list(globals().items()):
        if isinstance(text, str) and not name.startswith("_"):
            doc = doc.replace("{" + name + "}", text)
    return doc
