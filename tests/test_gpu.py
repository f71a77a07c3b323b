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
@pytest.mark.parametrize("M", [1, 8, 40, 300])  # GEMV, GEMV, fused GEMM, dequantise + cuBLAS
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


def test_qlora_on_4bit_experts_patch_on_device():
    """LoRA on 4-bit MoE experts (PEFT target_parameters, then fastft.quantize): the fused op on the device
    against PEFT's own forward on the dequantised experts (unpatched: quantize's transient-copy forward)."""
    import sys

    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_experts import _batch, _model

    model = _model("qwen3_moe").to(DEV)
    model.config._experts_implementation = "eager"
    targets = ["experts.gate_up_proj", "experts.down_proj"]
    cfg = LoraConfig(r=8, target_modules="all-linear", target_parameters=targets, init_lora_weights=False)
    model = get_peft_model(model, cfg).train()
    fastft.quantize(model)
    batch = {k: v.to(DEV) for k, v in _batch(model).items()}
    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any("experts" in n for n in ref_grads)
    model.zero_grad()
    report = fastft.patch(model)
    assert any("4-bit (NF4) base" in p.detail for p in report.patched)
    out = model(**batch)
    out.loss.backward()
    assert not report.fallbacks
    torch.testing.assert_close(out.loss, ref, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert _rel(p.grad, ref_grads[n]) < 1e-3, n


# --------------------------------------------------------------------------------------
# CUDA C++ NF4 kernels (csrc/cuda, fastft.kernels.nf4_cuda), forced with backend="cuda".
# The first test JIT-builds the extension (a minute or two, cached afterwards) unless
# fastft._C_cuda was built ahead of time.
# --------------------------------------------------------------------------------------
def _nf4_cuda_or_skip():
    from fastft.kernels import nf4_cuda

    ok, why = nf4_cuda.available()
    assert ok, why  # on a GPU machine with nvcc + ninja the build must work
    return nf4_cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocksize", [((1536, 1024), 64), ((1001,), 64), ((4096, 4096), 256), ((77, 96), 32)])
def test_nf4_cuda_dequant_on_device(dtype, shape, blocksize):
    from fastft.ops import dequantize_nf4, quantize_nf4

    _nf4_cuda_or_skip()
    w = torch.randn(*shape, device=DEV) * 0.05
    packed, state = quantize_nf4(w, blocksize=blocksize)
    got = dequantize_nf4(packed, state, dtype=dtype, backend="cuda")
    ref = dequantize_nf4(packed, state, dtype=dtype, backend="torch")
    assert got.dtype == dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=0)  # bit-exact


def test_nf4_cuda_dequant_scalar_paths_on_device():
    from fastft.ops.nf4 import dequantize_nf4_torch, nf4_code

    nf4_cuda = _nf4_cuda_or_skip()
    code = nf4_code(DEV)
    numel = 1001
    packed = torch.randint(0, 256, ((numel + 1) // 2,), device=DEV, dtype=torch.uint8)
    # blocksize 7: no 16-element groups share a scale -> one thread per element
    absmax = torch.rand(-(-numel // 7), device=DEV) + 0.1
    got = nf4_cuda.dequantize_nf4_cuda(packed, absmax, code, 7, numel, torch.float32)
    torch.testing.assert_close(got, dequantize_nf4_torch(packed, absmax, code, 7, numel, torch.float32), rtol=0, atol=0)
    # packed at an odd address -> no 64-bit loads
    absmax = torch.rand(-(-numel // 64), device=DEV) + 0.1
    buf = torch.empty(packed.numel() + 1, device=DEV, dtype=torch.uint8)
    buf[1:] = packed
    got = nf4_cuda.dequantize_nf4_cuda(buf[1:], absmax, code, 64, numel, torch.bfloat16)
    ref = dequantize_nf4_torch(packed, absmax, code, 64, numel, torch.bfloat16)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert nf4_cuda.dequantize_nf4_cuda(packed[:0], absmax[:0], code, 64, 0, torch.float16).numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 4, 8, 33])
@pytest.mark.parametrize("N,K,blocksize", [(1536, 1024, 64), (4096, 4096, 64), (1000, 14336, 128), (8, 96, 32)])
def test_nf4_cuda_matmul_on_device(dtype, M, N, K, blocksize):
    from fastft.ops import dequantize_nf4, nf4_matmul, quantize_nf4

    _nf4_cuda_or_skip()
    w = torch.randn(N, K, device=DEV) * 0.05
    packed, state = quantize_nf4(w, blocksize=blocksize)
    w32 = dequantize_nf4(packed, state, dtype=torch.float32, backend="torch")
    wd = dequantize_nf4(packed, state, dtype=dtype, backend="torch")
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    b = torch.randn(N, device=DEV, dtype=dtype)
    got = nf4_matmul(x, packed, state, b, backend="cuda")
    assert got.dtype == dtype and got.shape == (M, N)
    ref32 = x.float() @ w32.T + b.float()  # the GEMV's own arithmetic (fp32 weights)
    ref = x.float() @ wd.float().T + b.float()  # bnb's (weights rounded to x's dtype)
    assert _rel(got, ref) < (1e-4 if dtype == torch.float32 else 2e-2)
    if M <= 8:
        assert _rel(got, ref32) < (1e-5 if dtype == torch.float32 else 1e-2)
    nobias = nf4_matmul(x, packed, state, backend="cuda")
    assert _rel(nobias, ref - b.float()) < (1e-4 if dtype == torch.float32 else 2e-2)
    # gradient in x and bias through the CUDA dequant
    xg = x.detach().clone().requires_grad_(True)
    bg = b.detach().clone().requires_grad_(True)
    gy = torch.randn(M, N, device=DEV, dtype=dtype)
    dx, db = torch.autograd.grad(nf4_matmul(xg, packed, state, bg, backend="cuda"), (xg, bg), gy)
    assert _rel(dx, gy.float() @ wd.float()) < (1e-4 if dtype == torch.float32 else 2e-2)
    assert _rel(db, gy.float().sum(0)) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_cuda_gemv_byte_path_on_device(dtype):
    from fastft.ops.nf4 import dequantize_nf4_torch, nf4_code

    nf4_cuda = _nf4_cuda_or_skip()
    code = nf4_code(DEV)
    for N, K, bs, shift in ((37, 30, 6, 0), (64, 1024, 64, 1)):  # K % 32 != 0; x at an odd address
        packed = torch.randint(0, 256, (N * K // 2,), device=DEV, dtype=torch.uint8)
        absmax = torch.rand(N * K // bs, device=DEV) + 0.1
        w32 = dequantize_nf4_torch(packed, absmax, code, bs, N * K, torch.float32).view(N, K)
        for M in (1, 3, 8):
            buf = torch.randn(M * K + shift, device=DEV).to(dtype)
            x = buf[shift:].view(M, K)
            bias = torch.randn(N, device=DEV)
            got = nf4_cuda.nf4_matmul_cuda(x, packed, absmax, code, bs, N, K, bias)
            ref = x.float() @ w32.T + bias
            assert got.dtype == dtype
            assert _rel(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2), (N, K, M)
    x0 = torch.empty(0, 30, device=DEV, dtype=dtype)
    assert nf4_cuda.nf4_matmul_cuda(x0, packed[: 37 * 15], absmax[: 37 * 5], code, 6, 37, 30, None).shape == (0, 37)


def test_nf4_cuda_rejects_bad_inputs_on_device():
    from fastft.ops.nf4 import nf4_code

    nf4_cuda = _nf4_cuda_or_skip()
    code = nf4_code(DEV)
    packed = torch.zeros(64 * 32, device=DEV, dtype=torch.uint8)
    absmax = torch.ones(64, device=DEV)
    x = torch.randn(2, 64, device=DEV)
    with pytest.raises(ValueError, match="CUDA"):
        nf4_cuda.nf4_matmul_cuda(x, packed.cpu(), absmax, code, 64, 64, 64)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        nf4_cuda.nf4_matmul_cuda(torch.randn(2, 96, device=DEV), packed[: 32 * 48], absmax[:48], code, 64, 32, 96)
    with pytest.raises(ValueError, match="absmax"):
        nf4_cuda.dequantize_nf4_cuda(packed, absmax[:3], code, 64, 64 * 64, torch.float32)
    with pytest.raises(ValueError, match="x must be on"):
        nf4_cuda.nf4_matmul_cuda(x.cpu(), packed, absmax, code, 64, 64, 64)


_BINDING_CHECKS = """
import torch
from fastft.kernels import nf4_cuda
from fastft.ops.nf4 import nf4_code
mod = nf4_cuda._module()
code = nf4_code("cuda")
packed = torch.zeros(64 * 32, device="cuda", dtype=torch.uint8)
absmax = torch.ones(64, device="cuda")
x = torch.randn(2, 64, device="cuda")
calls = [
    lambda: mod.nf4_gemv(x, packed.cpu(), absmax, code, 64, 64, 64, None),
    lambda: mod.nf4_gemv(torch.randn(9, 64, device="cuda"), packed, absmax, code, 64, 64, 64, None),
    lambda: mod.nf4_gemv(torch.randn(2, 96, device="cuda"), packed[:1536], absmax[:48], code, 64, 32, 96, None),
    lambda: mod.nf4_dequantize(packed, absmax[:3], code, 64, 64 * 64, torch.float32),
]
for call in calls:
    try:
        call()
    except (RuntimeError, ValueError) as exc:
        print("raised:", str(exc).splitlines()[0])
    else:
        raise SystemExit("no error")
print("OK")
"""


def test_nf4_cuda_binding_checks_raise_not_crash():
    """The C++ checks themselves (the Python wrapper bypassed) raise Python exceptions; in a
    subprocess, so a crash fails this test instead of the whole run."""
    import subprocess
    import sys

    _nf4_cuda_or_skip()
    proc = subprocess.run([sys.executable, "-c", _BINDING_CHECKS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.stdout.strip().endswith("OK") and proc.stdout.count("raised:") == 4, proc.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_swiglu_rope_triton_on_device(dtype):
    from fastft.ops import (
        geglu,
        geglu_reference,
        rms_norm,
        rms_norm_reference,
        rope,
        rope_reference,
        swiglu,
        swiglu_reference,
    )

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    x = torch.randn(4, 333, 1536, device=DEV, dtype=dtype, requires_grad=True)
    w = torch.randn(1536, device=DEV, dtype=dtype, requires_grad=True)
    for offset in (0.0, 1.0):
        y = rms_norm(x, w, 1e-6, offset=offset)
        assert backends.select("rms_norm", DEV).backend == "triton"
        assert _rel(y, rms_norm_reference(x, w, 1e-6, offset=offset)) < tol
        g1 = torch.autograd.grad(y.float().sum(), (x, w))
        g2 = torch.autograd.grad(rms_norm_reference(x, w, 1e-6, offset=offset).float().sum(), (x, w))
        assert all(_rel(a, b) < 10 * tol for a, b in zip(g1, g2))
    gate, up = torch.randn(2, 3, 2, 4096, device=DEV, dtype=dtype, requires_grad=True).unbind(2)
    assert _rel(swiglu(gate, up), swiglu_reference(gate, up)) < tol
    assert _rel(geglu(gate, up), geglu_reference(gate, up)) < tol
    q = torch.randn(2, 8, 100, 128, device=DEV, dtype=dtype)
    k = torch.randn(2, 2, 100, 128, device=DEV, dtype=dtype)
    cos, sin = torch.randn(2, 100, 128, device=DEV, dtype=dtype), torch.randn(2, 100, 128, device=DEV, dtype=dtype)
    for got, want in zip(rope(q, k, cos, sin), rope_reference(q, k, cos, sin)):
        assert _rel(got, want) < tol


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_activation_precision_on_device(p):
    """bf16 x with fp32 adapters (the default): fp32 dA/dB straight from the GEMMs (out_dtype), no
    activation-sized conversion, within 2x PEFT's own bf16 error; the grouped op agrees."""
    from fastft.ledger import Ledger
    from fastft.ops.lora_group import LoraMember, lora_linear_group

    g = torch.Generator(device=DEV).manual_seed(0)
    N, fin, fout, r = 2048, 1024, 1536, 16
    x = torch.randn(N, fin, device=DEV, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(fout, fin, device=DEV, generator=g) * 0.02).bfloat16()
    A = (torch.randn(r, fin, device=DEV, generator=g) * 0.02).requires_grad_(True)
    B = (torch.randn(fout, r, device=DEV, generator=g) * 0.02).requires_grad_(True)
    with Ledger(min_numel=N * fin) as led:
        y = lora_linear(x, w, A, B, 2.0)
        y.backward(torch.ones_like(y))
    assert not [c for c in led.conversions_at_least(N * fin) if c.src.dtype.is_floating_point], led.table()
    assert A.grad.dtype == B.grad.dtype == torch.float32
    f32 = [t.detach().float().requires_grad_(True) for t in (x, w, A, B)]
    oracle = lora_linear_reference(*f32, 2.0)
    plain = lora_linear_reference(x, w, A.detach().bfloat16(), B.detach().bfloat16(), 2.0)
    assert (y.float() - oracle).abs().max() <= 2 * (plain.float() - oracle).abs().max()
    torch.manual_seed(3)
    ys = lora_linear_group(x, [LoraMember(w, A, B, 2.0, dropout_p=p), LoraMember(w, A, B, 0.5, dropout_p=p)])
    torch.manual_seed(3)
    ref = [lora_linear(x, w, A, B, 2.0, dropout_p=p), lora_linear(x, w, A, B, 0.5, dropout_p=p)]
    for a, b in zip(ys, ref):
        assert _rel(a, b) < 2e-2


def test_lora_dropout_cuda_graph_replay_draws_fresh_masks():
    """The dropout seed lives in a device tensor drawn by torch's graph-safe generator: every replay
    of a captured forward+backward uses a new mask, forward and backward the same one."""
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(512, 256, device=DEV, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(384, 256, device=DEV, generator=g) * 0.05).bfloat16()
    A = torch.randn(16, 256, device=DEV, generator=g).mul_(0.05).requires_grad_(True)
    B = torch.randn(384, 16, device=DEV, generator=g).mul_(0.05).requires_grad_(True)
    zeros_w = torch.zeros_like(w)

    def step():
        y = lora_linear(x, zeros_w, A, B, 1.0, dropout_p=0.5)  # base 0: y is the LoRA branch only
        y.backward(torch.ones_like(y))
        return y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    A.grad = None
    with torch.cuda.graph(graph):
        y_static = step()
    outs, grads = [], []
    for _ in range(3):
        A.grad.zero_()
        graph.replay()
        outs.append(y_static.clone())
        grads.append(A.grad.clone())
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    assert not torch.equal(grads[0], grads[1])
    del w
