"""The Triton kernels compiled for a real GPU (skipped without CUDA).

Run on a GPU machine with the interpreter off::

    FASTFT_GPU_TESTS=1 python -m pytest -q tests/test_gpu.py

The CPU suite checks the same kernels under TRITON_INTERPRET=1; this file checks that
they compile and agree with the references on the device, at realistic sizes.
"""

import os

import pytest
import torch

import fastft
from fastft import backends
from fastft.ops import (
    cross_entropy,
    cross_entropy_reference,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    lora_linear,
    lora_linear_reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("FASTFT_GPU_TESTS", "0") != "1", reason="set FASTFT_GPU_TESTS=1 (interpreter off) to run"
    ),
]

DEV = "cuda"


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}, {"reduction": "none"}, {"reduction": "sum"}]
)
def test_cross_entropy_triton_on_device(dtype, opts):
    assert backends.select("cross_entropy", DEV).backend == "triton"
    x = torch.randn(1000, 32003, device=DEV, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 32003, (1000,), device=DEV)
    t[::7] = -100
    got = cross_entropy(x, t, **opts)
    ref = cross_entropy_reference(x.float(), t, **opts)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    go = torch.randn_like(got)
    (g1,) = torch.autograd.grad(got, x, go)
    (g2,) = torch.autograd.grad(cross_entropy_reference(x, t, **opts), x, go)
    assert g1.dtype == dtype
    assert _rel(g1, g2) < (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_cross_entropy_on_device(dtype, reduction):
    N, H, V = 4096, 1024, 50257
    h = (torch.randn(N, H, device=DEV) * 0.5).to(dtype).requires_grad_(True)
    w = (torch.randn(V, H, device=DEV) * 0.02).to(dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), device=DEV)
    t[:100] = -100
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = fused_linear_cross_entropy(h, w, t, reduction=reduction)
    go = torch.randn_like(got)
    gh, gw = torch.autograd.grad(got, (h, w), go)
    fused_peak = torch.cuda.max_memory_allocated() - base
    hf, wf = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    ref = fused_linear_cross_entropy_reference(hf, wf, t, reduction=reduction)
    rh, rw = torch.autograd.grad(ref, (hf, wf), go)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert _rel(got, ref) < tol
    assert _rel(gh, rh) < tol and _rel(gw, rw) < tol
    assert gh.dtype == dtype and gw.dtype == dtype
    assert fused_peak < N * V * 4  # never the full fp32 logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_on_device(dtype, p):
    N, fin, fout, r = 2048, 1024, 1536, 16
    x = torch.randn(N, fin, device=DEV, dtype=dtype, requires_grad=True)
    w = torch.randn(fout, fin, device=DEV, dtype=dtype) * 0.02
    A = (torch.randn(r, fin, device=DEV) * 0.02).requires_grad_(True)
    B = (torch.randn(fout, r, device=DEV) * 0.02).requires_grad_(True)
    y = lora_linear(x, w, A, B, 2.0)
    ref = lora_linear_reference(x, w, A, B, 2.0)
    assert _rel(y, ref) < (1e-4 if dtype == torch.float32 else 2e-2)
    if p:
        torch.manual_seed(0)
        y1 = lora_linear(x, w, A, B, 2.0, dropout_p=p)
        y1.float().square().sum().backward()
        assert x.grad is not None and A.grad is not None and torch.isfinite(A.grad).all()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_patched_tiny_model_on_device(family):
    from peft import LoraConfig, get_peft_model

    from fastft.testing import tiny_batch, tiny_model

    model = tiny_model(family, vocab_size=512).to(DEV)
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).train()
    batch = {k: v.to(DEV) for k, v in tiny_batch(512, batch=2, seq=64).items()}
    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    report = fastft.patch(model)
    assert "triton" in str(report)
    out = model(**batch)
    out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert _rel(p.grad, ref_grads[n]) < 1e-3, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 8, 300])
def test_nf4_kernels_on_device(dtype, M):
    from fastft.ops import dequantize_nf4, nf4_matmul, quantize_nf4

    assert backends.select("nf4_matmul", DEV).backend == "triton"
    w = torch.randn(1536, 1024, device=DEV) * 0.05
    packed, state = quantize_nf4(w, blocksize=64)
    wd = dequantize_nf4(packed, state, dtype=dtype)
    torch.testing.assert_close(wd, dequantize_nf4(packed, state, dtype=dtype, backend="torch"), rtol=0, atol=0)
    x = torch.randn(M, 1024, device=DEV, dtype=dtype)
    b = torch.randn(1536, device=DEV, dtype=dtype)
    got = nf4_matmul(x, packed, state, b)
    ref = x.float() @ wd.float().T + b.float()
    assert _rel(got, ref) < (1e-4 if dtype == torch.float32 else 2e-2)


def test_qlora_patch_on_device():
    from peft import LoraConfig, get_peft_model

    from fastft.testing import tiny_batch, tiny_model

    model = fastft.quantize(tiny_model("llama", vocab_size=512).to(DEV))
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).train()
    batch = {k: v.to(DEV) for k, v in tiny_batch(512, batch=2, seq=64).items()}
    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fastft.patch(model)
    out = model(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert _rel(p.grad, ref_grads[n]) < 1e-3, n
