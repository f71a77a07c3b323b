"""fastft's NF4 ops as torch.library operators (issue 15): opcheck, and torch.compile fullgraph.

``torch.library.opcheck`` (schema, autograd registration, fake tensor, aot dispatch) for
``fastft::dequantize_nf4`` and ``fastft::nf4_matmul`` on every backend that runs on this CPU
(torch, cpp when it builds, triton in the interpreter), fp32 and bf16, with and without double
quantisation (and the fp32 absmax cache), odd shapes (K not a multiple of the blocksize,
an odd number of weights). Then :func:`nf4_matmul` forward + backward has no graph break and
compiles with ``fullgraph=True`` to the eager result and x / bias gradients (the NF4 weight is
frozen), and so does a tiny Llama quantised with :func:`fastft.quantize` and patched.
"""

from __future__ import annotations

import pytest
import torch
from _bnb import bnb_quantize
from _compile import compiled_matches_eager, model_step, no_graph_breaks, step_breaks, step_compiles_to_eager

import fastft  # noqa: F401  (registers the operators)
from fastft import backends
from fastft.kernels import nf4_cpu as k_cpp
from fastft.ops.nf4 import _op_state, dequantize_nf4, nf4_matmul, nf4_matmul_reference, quantize_nf4

cpp_ok, _ = k_cpp.available()
BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not cpp_ok, reason="C++ NF4 kernels unavailable"))]
if backends.interpreting():
    BACKENDS.append("triton")
VARIANTS = ["plain", "double_quant", "cached"]


def _quantized(variant, n, k, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return quantize_nf4(w, blocksize=blocksize, double_quant=variant != "plain", cache_absmax=variant == "cached")


# --------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 128), (24, 96), (7, 33)], ids=["k_mult", "k_not_mult", "odd_numel"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_nf4_opcheck(backend, dtype, variant, shape):
    packed, state = _quantized(variant, *shape)
    absmax, code, absmax2, code2, offset, bs, bs2 = _op_state(state)
    n = shape[0] * shape[1]
    args = (packed, absmax, code, absmax2, code2, offset, bs, bs2, n, dtype, backend)
    torch.library.opcheck(torch.ops.fastft.dequantize_nf4.default, args)
    got = torch.ops.fastft.dequantize_nf4(*args)
    want = dequantize_nf4(packed, state, dtype=dtype, backend="torch").reshape(-1)
    # fp32: bit for bit; bf16: one bf16 rounding apart at most (the Triton interpreter casts
    # fp32 -> bf16 by its own rounding, see test_nf4_triton.py)
    torch.testing.assert_close(got, want, atol=0, rtol=0 if dtype == torch.float32 else 2**-7)


@pytest.mark.parametrize("M", [3, 17])
@pytest.mark.parametrize("shape", [(40, 128), (24, 96)], ids=["k_mult", "k_not_mult"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_nf4_matmul_opcheck(backend, dtype, variant, shape, M):
    N, K = shape
    packed, state = _quantized(variant, N, K)
    absmax, code, absmax2, code2, offset, bs, bs2 = _op_state(state)
    # the op itself falls back to dequantise + GEMM for K % blocksize under any backend choice;
    # the public function is the one that refuses an explicit fused backend there
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    for bias in (None, torch.randn(N, dtype=dtype, requires_grad=True)):
        args = (x, packed, absmax, code, absmax2, code2, offset, bias, bs, bs2, N, K, backend)
        torch.library.opcheck(torch.ops.fastft.nf4_matmul.default, args)
        y = torch.ops.fastft.nf4_matmul(*args)
        ref = nf4_matmul_reference(x.detach().float(), packed, state, None if bias is None else bias.detach().float())
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.03)
        torch.testing.assert_close(y.float(), ref, **tol)


# --------------------------------------------------------------------------------------
# torch.compile: no graph break, fullgraph == eager
# --------------------------------------------------------------------------------------
# K not a multiple of the blocksize: "auto" (dequantise + GEMM inside the op) and "torch";
# an explicit fused backend refuses it eagerly (tested in test_nf4.py)
_RUNNABLE = ["auto", "torch"] + (["cpp"] if cpp_ok else []) + (["triton"] if backends.interpreting() else [])
_FULLGRAPH_CASES = [((40, 128), b) for b in _RUNNABLE] + [((24, 96), "auto"), ((24, 96), "torch")]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape,backend", _FULLGRAPH_CASES)
def test_nf4_matmul_fullgraph(shape, backend, variant):
    N, K = shape
    packed, state = _quantized(variant, N, K)
    x = torch.randn(2, 5, K, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)

    def fn(x, bias):
        y = nf4_matmul(x * 2.0, packed, state, bias, backend=backend)
        return (y.relu() + dequantize_nf4(packed, state, dtype=x.dtype, backend=backend).sum(1)).sum(-1)

    no_graph_breaks(fn, x, bias, one_graph=True)
    compiled_matches_eager(fn, [x, bias], atol=1e-4, rtol=1e-4, some_grads=True)


def test_nf4_matmul_bf16_fullgraph():
    packed, state = _quantized("double_quant", 40, 128)
    x = torch.randn(9, 128, dtype=torch.bfloat16, requires_grad=True)

    def fn(x):
        return nf4_matmul(x, packed, state)

    no_graph_breaks(fn, x, one_graph=True)
    compiled_matches_eager(fn, [x], atol=0, rtol=0, some_grads=True)


# --------------------------------------------------------------------------------------
# a tiny Llama quantised with fastft.quantize, patched, no LoRA: its training step
# --------------------------------------------------------------------------------------


# the model step on the default format and on bitsandbytes' bytes; every format (plain, cached) is the op tests'
@pytest.mark.parametrize("variant", ["double_quant", "bitsandbytes"])
def test_quantized_patched_llama_step_compiles_fullgraph(variant):
    import warnings

    from fastft.nn import Linear4bit
    from fastft.testing import tiny_batch, tiny_model

    warnings.filterwarnings("ignore")
    batch = tiny_batch(256, seq=12)
    model = tiny_model("llama")
    if variant == "bitsandbytes":  # bnb's Linear4bit, its forward replaced by fastft's (BnbNF4Forward)
        bnb_quantize(model)
    else:
        fastft.quantize(model, double_quant=variant != "plain", cache_absmax=variant == "cached")
        assert sum(isinstance(m, Linear4bit) for m in model.modules()) > 0
    for name, p in model.named_parameters():  # train the norms only (the NF4 weights are frozen buffers)
        p.requires_grad_("norm" in name)
    report = fastft.patch(model)
    assert "loss" in report.features()
    if variant == "bitsandbytes":
        assert any("bitsandbytes NF4 Linear4bit -> fastft" in p.detail for p in report.patched)
    model_step(model)(**batch)  # the first call checks the loss convention (and validates the states), eagerly
    breaks, reasons = step_breaks(model, batch)
    assert breaks == 0, reasons
    eager_grads = step_compiles_to_eager(model, batch)
    assert eager_grads and all("norm" in n for n in eager_grads)


@pytest.mark.parametrize(
    "shape", [(40, 128), (24, 96), (7, 33), (3, 700)], ids=["k_mult", "k_not_mult", "odd", "dq_tail"]
)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_nf4_opcheck(dtype, double_quant, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    for blocksize in (32, 64):
        args = (w, blocksize, double_quant)
        torch.library.opcheck(torch.ops.fastft.quantize_nf4.default, args)
        packed, absmax, absmax2, offset = torch.ops.fastft.quantize_nf4(*args)
        packed2, state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        torch.testing.assert_close(packed, packed2, atol=0, rtol=0)
        torch.testing.assert_close(absmax, state.absmax, atol=0, rtol=0)
        assert (absmax2.numel() > 0) == double_quant == state.double_quant


def test_quantize_then_matmul_fullgraph():
    """Quantising inside the compiled function too (e.g. a weight quantised on the fly)."""
    w = torch.randn(40, 128)
    x = torch.randn(6, 128, requires_grad=True)

    def fn(x):
        packed, state = quantize_nf4(w, double_quant=True)
        return nf4_matmul(x, packed, state)

    no_graph_breaks(fn, x, one_graph=True)
    compiled_matches_eager(fn, [x], atol=0, rtol=0, some_grads=True)
