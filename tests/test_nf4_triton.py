"""NF4 dequantisation and matmul kernels (fastft.kernels.nf4), under TRITON_INTERPRET=1.

The oracle is plain PyTorch on the same packed tensors: unpack the nibbles (high first),
look them up in the table, scale by the block's absmax; the matmul is ``x @ W.T``.
"""

import pytest
import torch
from _aot import run_compile_script

from fastft import backends
from fastft.kernels import nf4 as knf4
from fastft.kernels.nf4 import dequantize_nf4_triton, nf4_matmul_triton
from fastft.ops.nf4 import dequantize_nf4_torch, nf4_code

# the NF4 table and the reference: the package's own (one reference per op)
NF4_CODE = nf4_code()
TOL32 = dict(atol=1e-5, rtol=1e-5)
# one bf16 rounding: the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest), so up to 1 ulp
BF16_ULP = 2**-7


def _quant_state(numel, blocksize, seed=0):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), generator=g, dtype=torch.uint8)
    absmax = torch.rand(-(-numel // blocksize), generator=g) * 2 + 0.05
    return packed, absmax, NF4_CODE.clone()


def dequant_reference(packed, absmax, code, blocksize, numel):
    """fp32 ``W[j] = code[nib(j)] * absmax[j // blocksize]``, 1-D (the package's torch reference)."""
    return dequantize_nf4_torch(packed, absmax, code, blocksize, numel, torch.float32)


def matmul_reference(x, packed, absmax, code, blocksize, N, K, bias=None):
    """Dequantise to x's dtype, then ``x @ W.T (+ bias)`` in x's dtype."""
    w = dequant_reference(packed, absmax, code, blocksize, N * K).view(N, K).to(x.dtype)
    y = x @ w.t()
    return y if bias is None else y + bias.to(x.dtype)


# --------------------------------------------------------------------------------------
# dequantisation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("numel", [1, 2, 333, 1000, 4097])
def test_dequant_fp32_exact(numel, blocksize):
    packed, absmax, code = _quant_state(numel, blocksize, seed=numel)
    got = dequantize_nf4_triton(packed, absmax, code, blocksize, numel, torch.float32)
    assert got.shape == (numel,) and got.dtype == torch.float32
    torch.testing.assert_close(got, dequant_reference(packed, absmax, code, blocksize, numel), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequant_16bit(dtype):
    numel, blocksize = 777, 64
    packed, absmax, code = _quant_state(numel, blocksize, seed=5)
    got = dequantize_nf4_triton(packed, absmax, code, blocksize, numel, dtype)
    assert got.dtype == dtype
    ref = dequant_reference(packed, absmax, code, blocksize, numel)
    rtol = BF16_ULP if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(got.float(), ref, atol=1e-6, rtol=rtol)


def test_dequant_nibble_order_and_blocks():
    """Byte 0x0F: element 0 (high nibble) = code[0], element 1 (low) = code[15]; blocks scale apart."""
    packed = torch.tensor([0x0F, 0xF0, 0x87], dtype=torch.uint8)
    absmax = torch.tensor([2.0, 3.0, 5.0])
    got = dequantize_nf4_triton(packed, absmax, NF4_CODE, 2, 5)
    want = torch.tensor([-2.0, 2.0, 3.0, -3.0, 5.0 * NF4_CODE[8].item()])
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_dequant_empty():
    got = dequantize_nf4_triton(torch.empty(0, dtype=torch.uint8), torch.empty(0), NF4_CODE, 64, 0)
    assert got.shape == (0,)


# --------------------------------------------------------------------------------------
# matmul: GEMV (M <= 8) and GEMM (M > 8)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 3, 8, 9, 37])
@pytest.mark.parametrize("N, K, blocksize", [(48, 128, 32), (48, 128, 128), (33, 64, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_fp32(M, N, K, blocksize, with_bias):
    packed, absmax, code = _quant_state(N * K, blocksize, seed=M + N)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g)
    bias = torch.randn(N, generator=g) if with_bias else None
    got = nf4_matmul_triton(x, packed, absmax, code, blocksize, N, K, bias)
    assert got.shape == (M, N) and got.dtype == torch.float32
    ref = matmul_reference(x, packed, absmax, code, blocksize, N, K, bias)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("M", [1, 3, 8, 9, 37])
@pytest.mark.parametrize("N, K, blocksize", [(48, 128, 64), (33, 64, 32)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_bf16_against_fp32_oracle(M, N, K, blocksize, with_bias):
    packed, absmax, code = _quant_state(N * K, blocksize, seed=M)
    g = torch.Generator().manual_seed(M + 1)
    x = torch.randn(M, K, generator=g).bfloat16()
    bias = torch.randn(N, generator=g).bfloat16() if with_bias else None
    got = nf4_matmul_triton(x, packed, absmax, code, blocksize, N, K, bias)
    assert got.shape == (M, N) and got.dtype == torch.bfloat16
    oracle = matmul_reference(x.float(), packed, absmax, code, blocksize, N, K, None if bias is None else bias.float())
    plain = matmul_reference(x, packed, absmax, code, blocksize, N, K, bias)
    err, base = (got.float() - oracle).abs().max(), (plain.float() - oracle).abs().max()
    # the kernel rounds W and y to bf16 like the reference, but the interpreter truncates (W's
    # errors then share a sign, and y's can reach 1 ulp): allow one more ulp of the largest output
    assert err <= 2 * base + BF16_ULP * oracle.abs().max(), (err, base)


def test_matmul_fp16():
    M, N, K, blocksize = 11, 40, 64, 64
    packed, absmax, code = _quant_state(N * K, blocksize)
    x = torch.randn(M, K).half()
    for rows in (x[:2], x):  # GEMV and GEMM
        got = nf4_matmul_triton(rows, packed, absmax, code, blocksize, N, K)
        assert got.dtype == torch.float16
        oracle = matmul_reference(rows.float(), packed, absmax, code, blocksize, N, K)
        torch.testing.assert_close(got.float(), oracle, atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("tiles", ["per_byte_scales", "ragged_k"])
def test_matmul_other_tilings(tiles, monkeypatch):
    """BLOCK_K above the blocksize (scales gathered per byte), and K not a multiple of BLOCK_K."""
    if tiles == "per_byte_scales":  # blocksize 32 < BLOCK_K 64
        N, K, blocksize = 40, 128, 32
        monkeypatch.setattr(knf4, "_GEMM_INTERPRET", (16, 16, 64))
        monkeypatch.setattr(knf4, "_GEMV_INTERPRET", (16, 64))
    else:  # K = 96 with BLOCK_K 64: the last step is half masked
        N, K, blocksize = 24, 96, 32
        monkeypatch.setattr(knf4, "_GEMM_INTERPRET", (16, 32, 64))
        monkeypatch.setattr(knf4, "_GEMV_INTERPRET", (8, 64))
    packed, absmax, code = _quant_state(N * K, blocksize, seed=3)
    bias = torch.randn(N)
    for M in (2, 19):
        x = torch.randn(M, K)
        got = nf4_matmul_triton(x, packed, absmax, code, blocksize, N, K, bias)
        torch.testing.assert_close(got, matmul_reference(x, packed, absmax, code, blocksize, N, K, bias), **TOL32)


def test_matmul_strided_x_and_bias_dtype():
    M, N, K, blocksize = 10, 24, 64, 64
    packed, absmax, code = _quant_state(N * K, blocksize, seed=7)
    x = torch.randn(K, M).t()  # non-contiguous [M, K]
    bias = torch.randn(N).bfloat16()  # any float bias dtype
    ref = matmul_reference(x, packed, absmax, code, blocksize, N, K, bias.float())
    torch.testing.assert_close(nf4_matmul_triton(x, packed, absmax, code, blocksize, N, K, bias), ref, **TOL32)
    torch.testing.assert_close(nf4_matmul_triton(x[:4], packed, absmax, code, blocksize, N, K, bias), ref[:4], **TOL32)


def test_matmul_equals_dequant_then_matmul():
    M, N, K, blocksize = 5, 32, 128, 64
    packed, absmax, code = _quant_state(N * K, blocksize, seed=11)
    x = torch.randn(M, K)
    w = dequantize_nf4_triton(packed, absmax, code, blocksize, N * K).view(N, K)
    torch.testing.assert_close(nf4_matmul_triton(x, packed, absmax, code, blocksize, N, K), x @ w.t(), **TOL32)


def test_matmul_empty():
    packed, absmax, code = _quant_state(16 * 64, 64)
    assert nf4_matmul_triton(torch.ones(0, 64), packed, absmax, code, 64, 16, 64).shape == (0, 16)
    e = torch.empty(0, dtype=torch.uint8)
    bias = torch.arange(3.0)
    got = nf4_matmul_triton(torch.ones(2, 0), e, torch.empty(0), code, 64, 3, 0, bias)
    torch.testing.assert_close(got, bias.expand(2, 3))


# --------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------
def _call(**kw):
    N, K, bs = 8, 64, 64
    packed, absmax, code = _quant_state(N * K, bs)
    args = dict(x2d=torch.ones(2, K), packed=packed, absmax=absmax, code=code, blocksize=bs, N=N, K=K, bias=None)
    args.update(kw)
    return nf4_matmul_triton(**args)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: _call(packed=torch.zeros(256, dtype=torch.int8)), TypeError, "packed must be torch.uint8"),
        (lambda: _call(packed=torch.zeros(255, dtype=torch.uint8)), ValueError, "packed must have 256"),
        (lambda: _call(absmax=torch.ones(8).half()), TypeError, "absmax must be torch.float32"),
        (lambda: _call(absmax=torch.ones(7)), ValueError, "absmax must have 8"),
        (lambda: _call(code=torch.ones(15)), ValueError, "code must have 16"),
        (lambda: _call(code=torch.ones(32)[::2]), ValueError, "contiguous"),
        (lambda: _call(x2d=torch.ones(2, 32)), ValueError, "x2d shape"),
        (lambda: _call(x2d=torch.ones(2, 64).double()), TypeError, "x2d must be float32"),
        (lambda: _call(x2d=torch.ones(64)), ValueError, "2-D"),
        (lambda: _call(blocksize=48, absmax=torch.ones(11)), ValueError, "multiple of blocksize"),
        (lambda: _call(blocksize=3), ValueError, "even"),
        (lambda: _call(blocksize=0), ValueError, "blocksize must be a positive int"),
        (lambda: _call(N=-1), ValueError, "N must be"),
        (lambda: _call(bias=torch.ones(9)), ValueError, "bias must be"),
        (lambda: _call(bias=torch.ones(8, dtype=torch.int32)), ValueError, "bias must be"),
        (
            lambda: dequantize_nf4_triton(*_quant_state(10, 4), 4, 10, torch.float64),
            TypeError,
            "out_dtype",
        ),
        (lambda: dequantize_nf4_triton(*_quant_state(10, 4), 4, 12), ValueError, "packed must have 6"),
    ],
)
def test_launcher_checks(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_cpu_without_interpreter_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    packed, absmax, code = _quant_state(8 * 64, 64)
    with pytest.raises(backends.BackendUnavailable, match="CUDA"):
        dequantize_nf4_triton(packed, absmax, code, 64, 8 * 64)
    with pytest.raises(backends.BackendUnavailable, match="CUDA"):
        nf4_matmul_triton(torch.ones(2, 64), packed, absmax, code, 64, 8, 64)
    with pytest.raises(backends.BackendUnavailable, match="CUDA"):
        nf4_matmul_triton(torch.ones(20, 64), packed, absmax, code, 64, 8, 64)


# --------------------------------------------------------------------------------------
# compiled for a GPU: ahead of time here (no GPU needed)
# --------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import itertools, os, subprocess, sys, tempfile
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print("SKIP: Triton's compiler API is not where this test expects it:", exc)
    sys.exit(0)
from fastft.kernels import nf4 as k

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_(fn, ptrs, constexprs, num_warps, num_stages=3, what=(), **options):
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in ptrs:
            sig[arg] = ptrs[arg]
        else:
            sig[arg] = "i32"
    try:
        # pointers 16-byte aligned, as torch allocates them (a launch specialises on it)
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names) if arg in ptrs}
        c = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages, **options})
    except Exception as exc:
        if "ptxas" in str(exc).lower():
            print("SKIP: no ptxas to assemble with:", exc)
            sys.exit(0)
        raise
    assert c.asm.get("ptx"), what
    if "cubin" in c.asm and os.path.exists(cuobjdump):  # the tile configs must not spill registers
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(c.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        assert "STACK:0 " in usage, (what, usage)
        print(what, usage.split("Function")[-1].strip().split(":", 1)[-1].strip())


def scales(dq):  # the scale pointers and constexprs: fp32 absmax, or the double quantisation decoded in-kernel
    ptrs = dict(absmax_ptr="*u8" if dq else "*fp32", absmax2_ptr="*fp32", code2_ptr="*fp32", offset_ptr="*fp32")
    return ptrs, dict(DQ=dq, BLOCKSIZE2=256)


for out, dq in itertools.product(("*fp32", "*bf16"), (False, True)):
    sp, sc = scales(dq)
    compile_(k._dequant_kernel, dict(packed_ptr="*u8", code_ptr="*fp32", out_ptr=out, **sp),
             dict(BLOCKSIZE=64, BLOCK=k._DEQUANT_BLOCK, **sc), k._DEQUANT_WARPS, what=("dequant", out, dq),
             enable_fp_fusion=False)
for x_dt, dq in itertools.product(("*bf16", "*fp16", "*fp32"), (False, True)):
    sp, common = scales(dq)
    ptrs = dict(x_ptr=x_dt, packed_ptr="*u8", code_ptr="*fp32", bias_ptr=x_dt, out_ptr=x_dt, **sp)
    for blocksize in (32, 64, 128):
        key = "fp32" if x_dt == "*fp32" else "16bit"
        for bm, (bn, bk, warps, stages) in k._GEMM_SMALL_M_CONFIG[key].items():
            for split in (1, 4):
                compile_(k._nf4_gemm_kernel, ptrs, dict(
                    HAS_BIAS=True, EVEN_K=True, ROW_SCALE=blocksize % bk == 0, SPLIT_K=split,
                    INPUT_PRECISION="ieee" if x_dt == "*fp32" else None, UPCAST_DOT=False,
                    BLOCKSIZE=blocksize, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **common), warps, stages,
                    what=("gemm", x_dt, blocksize, dq, bm, split))
        for block_m, (bn, bk, warps) in k._GEMV_CONFIG.items():
            compile_(k._nf4_gemv_kernel, ptrs, dict(
                HAS_BIAS=True, EVEN_K=True, ROW_SCALE=blocksize % bk == 0, ROUND_W=x_dt != "*fp32",
                BLOCKSIZE=blocksize, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, **common), warps,
                what=("gemv", x_dt, blocksize, block_m, dq))
for out in ("*fp32", "*bf16"):
    compile_(k._splitk_reduce_kernel, dict(ws_ptr="*fp32", bias_ptr=out, out_ptr=out),
             dict(HAS_BIAS=True, SPLIT_K=4, BLOCK=1024), 4, what=("splitk reduce", out))
print("OK")
"""


@pytest.mark.slow
def test_kernels_compile_for_gpu_without_spills():
    """Compile the kernels ahead of time for sm_90 (no GPU needed), at the launchers' GPU tile
    configs: catches what the interpreter lets through, and register spills (via cuobjdump).
    In a fresh process: the kernels of this one are already defined as interpreted."""
    run_compile_script(_COMPILE_SCRIPT, timeout=600)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_large_m_dequantises_then_gemm(monkeypatch, dtype):
    """Above FUSED_GEMM_MAX_M rows the weight is dequantised into x's dtype and torch's GEMM
    runs (as bitsandbytes does): the same numbers as dequantise-then-matmul, bias included."""
    monkeypatch.setattr(knf4, "FUSED_GEMM_MAX_M", 16)
    M, N, K, blocksize = 37, 24, 128, 64
    packed, absmax, code = _quant_state(N * K, blocksize, seed=5)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N)
    w = dequantize_nf4_triton(packed, absmax, code, blocksize, N * K, dtype).view(N, K)
    got = nf4_matmul_triton(x, packed, absmax, code, blocksize, N, K, bias)
    assert got.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got, torch.addmm(bias.to(dtype), x, w.t()), rtol=0, atol=0)
    ref = matmul_reference(x.float(), packed, absmax, code, blocksize, N, K, bias)
    torch.testing.assert_close(got.float(), ref, **(TOL32 if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)))
    # at the threshold the fused kernel still runs, and agrees
    fused = nf4_matmul_triton(x[:16], packed, absmax, code, blocksize, N, K, bias)
    torch.testing.assert_close(
        fused.float(), ref[:16], **(TOL32 if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2))
    )
