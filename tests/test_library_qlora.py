"""LoRA over a 4-bit NF4 base as torch.library operators (issue 15): opcheck, and torch.compile.

``fastft::lora_nf4_linear`` / ``_bwd`` pass ``torch.library.opcheck`` (schema, autograd
registration, fake tensor, aot dispatch) for every LoRA x NF4 backend pair that runs on this CPU
(torch, the C++ NF4 kernels when they build, Triton in the interpreter), fp32 and bf16, with and
without dropout and double quantisation (the interpreted Triton pair on six covering cases). The public :func:`lora_linear` with a ``quant_state``
equals the formula on the dequantised weight, has no graph break, and compiles with
``fullgraph=True`` to its eager result and gradients; so does a tiny Llama quantised by
:func:`fastft.quantize` (or by bitsandbytes), wrapped by PEFT LoRA with dropout and patched.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _bnb import bnb_quantize
from _compile import model_step, no_graph_breaks, step_breaks, step_compiles_to_eager

import fastft
from fastft import backends
from fastft.kernels import nf4_cpu as k_cpp
from fastft.ops import dropout_mask, lora_linear, lora_linear_reference
from fastft.ops.nf4 import _op_state, dequantize_nf4, quantize_nf4

cpp_ok, _ = k_cpp.available()
# (LoRA products backend, NF4 dequant-matmul backend)
PAIRS = [("torch", "torch"), ("auto", "auto")]
if cpp_ok:
    PAIRS.append(("torch", "cpp"))
if backends.interpreting():
    PAIRS.append(("triton", "triton"))
VARIANTS = ["plain", "double_quant", "cached"]


def _quantized(variant, n, k, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return quantize_nf4(w, blocksize=64, double_quant=variant != "plain", cache_absmax=variant == "cached")


def _seeded(fn):
    def run(*a, **kw):
        torch.manual_seed(0)
        return fn(*a, **kw)

    return run


# --------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------
CASES = ["fp32", "bf16_activation", "bf16_peft"]
# The interpreted Triton pair is ~10x the others' time: six of its 18 (variant, case, dropout) cases,
# every variant, case and dropout twice and each (variant, dropout) / (case, dropout) pair once.
_TRITON_CASES = {
    ("plain", "fp32", 0.2), ("plain", "bf16_peft", 0.0), ("double_quant", "bf16_activation", 0.2),
    ("double_quant", "fp32", 0.0), ("cached", "bf16_peft", 0.2), ("cached", "bf16_activation", 0.0),
}  # fmt: skip
OPCHECK = [
    pytest.param(pair, v, c, p, id=f"{'+'.join(pair)}-{v}-{c}-{'dropout' if p else 'nodrop'}")
    for pair in PAIRS
    for v in VARIANTS
    for c in CASES
    for p in (0.0, 0.2)
    if pair != ("triton", "triton") or (v, c, p) in _TRITON_CASES
]


@pytest.mark.parametrize("pair, variant, case, p", OPCHECK)
def test_lora_nf4_opcheck(pair, variant, case, p):
    backend, nf4_backend = pair
    dt = torch.float32 if case == "fp32" else torch.bfloat16
    precision = "peft" if case == "bf16_peft" else "activation"
    N, K, r = 40, 128, 4
    packed, state = _quantized(variant, N, K)
    flat = _op_state(state)
    x = torch.randn(13, K, dtype=dt, requires_grad=True)
    b = torch.randn(N, dtype=dt, requires_grad=True)
    A = torch.randn(r, K, requires_grad=True)
    B = torch.randn(N, r, requires_grad=True)
    lb = torch.randn(N, requires_grad=True)
    seed = torch.tensor([12345])
    tensors, (bs, bs2) = flat[:5], flat[5:]
    args = (x, packed, *tensors, b, A, B, lb, bs, bs2, N, K, 0.5, p, seed, precision, backend, nf4_backend)
    torch.library.opcheck(torch.ops.fastft.lora_nf4_linear.default, args)
    _, xa = torch.ops.fastft.lora_nf4_linear(*[a.detach() if torch.is_tensor(a) else a for a in args])
    dy = torch.randn(13, N, dtype=dt)
    for needs in ([True] * 5, [False, False, True, True, False]):
        bwd = (dy, x.detach(), packed, *tensors, A.detach(), B.detach(), xa, bs, bs2, N, K, 0.5, p, seed, precision)
        torch.library.opcheck(torch.ops.fastft.lora_nf4_linear_bwd.default, (*bwd, backend, nf4_backend, needs))


# --------------------------------------------------------------------------------------
# the public function: the formula on the dequantised weight; fullgraph == eager
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_nf4_matches_formula(variant, p):
    N, K = 40, 128
    packed, state = _quantized(variant, N, K)
    x = torch.randn(2, 6, K, requires_grad=True)
    b = torch.randn(N, requires_grad=True)
    A = torch.randn(4, K, requires_grad=True)
    B = torch.randn(N, 4, requires_grad=True)
    torch.manual_seed(1)
    y = lora_linear(x, packed, A, B, 0.7, bias=b, dropout_p=p, quant_state=state, backend="torch")
    torch.manual_seed(1)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # the seed the call drew: the mask it used
    mask = dropout_mask(seed, (12, K), p, "cpu").view(2, 6, K) if p > 0 else None
    w = dequantize_nf4(packed, state, dtype=torch.float32)
    ref = lora_linear_reference(x, w, A, B, 0.7, bias=b, mask=mask)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(y.square().sum(), (x, b, A, B))
    want = torch.autograd.grad(ref.square().sum(), (x, b, A, B))
    for g, e in zip(got, want):  # 1e-4 relative to the gradient's scale (sums of squares)
        torch.testing.assert_close(g, e, atol=1e-4 * float(e.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "+".join(p))
def test_lora_nf4_fullgraph(pair, variant):
    backend = pair[1] if pair[0] == pair[1] else "auto"  # the public function takes one backend for both
    N, K = 40, 128
    packed, state = _quantized(variant, N, K)
    x = torch.randn(2, 5, K, requires_grad=True)
    b = torch.randn(N, requires_grad=True)
    A = torch.randn(4, K, requires_grad=True)
    B = torch.randn(N, 4, requires_grad=True)

    def fn(x, b, A, B):
        return lora_linear(x * 1.5, packed, A, B, 2.0, bias=b, dropout_p=0.25, quant_state=state, backend=backend)

    no_graph_breaks(fn, x, b, A, B, one_graph=True)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):  # the dropout seed comes from the generator: same seed, same mask
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, b, A, B)]
        y = _seeded(f)(*leaves)
        results.append((y.detach(), torch.autograd.grad(y.square().sum(), leaves)))
    (ye, ge), (yc, gc) = results
    torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_lora_nf4_forced_backend_refuses_eagerly():
    packed, state = quantize_nf4(torch.randn(24, 96), blocksize=64)  # K not a multiple of the blocksize
    x = torch.randn(3, 96)
    A, B = torch.randn(4, 96), torch.randn(24, 4)
    if backends.interpreting():  # a fused NF4 backend forced on a layout it cannot read
        with pytest.raises(ValueError, match="not a multiple of blocksize"):
            lora_linear(x, packed, A, B, 1.0, quant_state=state, backend="triton")
    for forced in ("cuda", "cpp"):  # no LoRA products on cuda here; no cpp LoRA backend at all
        with pytest.raises(backends.BackendUnavailable, match=f"lora_linear: backend '{forced}'"):
            lora_linear(x, packed, A, B, 1.0, quant_state=state, backend=forced)
    y = lora_linear(x, packed, A, B, 1.0, quant_state=state)  # auto: dequantise + GEMM inside the op
    torch.testing.assert_close(y, x @ dequantize_nf4(packed, state).t() + x @ A.t() @ B.t(), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------
# QLoRA: a tiny Llama on a 4-bit base + PEFT LoRA with dropout, patched: its training step
# --------------------------------------------------------------------------------------


# the model step on the default format and on bitsandbytes' bytes; every format (plain, cached) is the op tests'
@pytest.mark.parametrize("variant", ["double_quant", "bitsandbytes"])
def test_qlora_patched_llama_step_compiles_fullgraph(variant):
    from peft import LoraConfig, get_peft_model

    from fastft.testing import tiny_batch, tiny_model

    warnings.filterwarnings("ignore")
    batch = tiny_batch(256, seq=12)
    model = tiny_model("llama")
    if variant == "bitsandbytes":
        bnb_quantize(model)
    else:
        fastft.quantize(model, double_quant=True, cache_absmax=variant == "cached")
    cfg = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1, init_lora_weights=False)
    model = get_peft_model(model, cfg).train()
    report = fastft.patch(model)
    fused = [p for p in report.patched if p.feature == "lora"]
    assert fused and all("4-bit NF4" in p.detail for p in fused)
    model_step(model)(**batch)  # the first call checks the loss convention (and validates the states), eagerly
    breaks, reasons = step_breaks(model, batch)
    assert breaks == 0, reasons
    eager_grads = step_compiles_to_eager(model, batch, wrap=_seeded, some_grads=True)
    assert any("lora_A" in n for n in eager_grads) and all("lora_" in n for n in eager_grads)
