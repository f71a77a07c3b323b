"""NF4 (fastft.ops.nf4): byte-compatibility with bitsandbytes, dequant, nf4_matmul, validation.

Findings these tests pin down (bitsandbytes 0.50.2, CPU):
* quantize: packed bytes, absmax, offset, absmax2 and code2 are identical to bnb for
  fp32/bf16/fp16 and every blocksize bnb accepts (32..4096), with and without double quant.
* dequantize: bit-exact (not just within 1 ulp) with bnb's dequantize_4bit in every dtype,
  wherever bnb's own CPU kernel is right. bnb's native CPU dequant kernel (AVX512 build)
  is wrong when the last dim is not a multiple of the blocksize (and < 2048, even last
  dim); there fastft equals bnb's pure-PyTorch reference (``_dequantize_4bit_compute``).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fastft import backends
from fastft.ops import nf4 as nf4mod
from fastft.ops.nf4 import (
    OP_DEQUANT,
    OP_NF4_MATMUL,
    NF4State,
    as_nf4_state,
    dequantize_nf4,
    dequantize_nf4_torch,
    nf4_code,
    nf4_matmul,
    nf4_matmul_reference,
    nf4_matmul_torch,
    quantize_nf4,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    except Exception:  # pragma: no cover - bnb is a dev dependency
        bnb = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# (64,128): aligned; (33,7): odd numel and odd last dim; (5,): smaller than a block;
# (40,768): many blocks, 768 not a multiple of 512/1024; (3,5,7): 3-D; (1,1): one element
SHAPES = ((64, 128), (33, 7), (5,), (40, 768), (3, 5, 7), (1, 1), (2, 4100))


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (0.02 + torch.rand(shape, generator=g))
    return w.to(dtype)


def _bnb_quant(w, bs, dq):
    return bnbF.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type="nf4")


def _bnb_dequant_reference(packed, state: NF4State, dtype):
    """bitsandbytes' pure-PyTorch dequant (its default backend), without torch.compile."""
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    code = bnbF.get_4bit_type("nf4", device="cpu")
    return fn(packed.reshape(-1), state.absmax_fp32(), code, state.blocksize, state.shape, dtype)


def _bnb_cpu_dequant_is_right(shape, bs):
    # Where bnb's dequantize_4bit runs its native CPU kernel (even last dim, bs < 2048; the
    # other cases go through its torch.compile'd reference, too slow to compile in a test)
    # and that kernel is right: rows hold whole blocks, or the tensor is a single block.
    native = shape[-1] % 2 == 0 and bs < 2048
    return native and (shape[-1] % bs == 0 or math.prod(shape) <= bs)


# --------------------------------------------------------------------------------------
# format: identical to bitsandbytes
# --------------------------------------------------------------------------------------
@needs_bnb
def test_tables_match_bnb():
    assert torch.equal(nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4mod.dynamic_code(), bnbF.create_dynamic_map())


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bytes_and_absmax_match_bnb(dtype, double_quant):
    for i, shape in enumerate(SHAPES):
        for bs in BLOCKSIZES:
            w = _weight(shape, dtype, seed=i * 100 + bs)
            p_ref, s_ref = _bnb_quant(w, bs, double_quant)
            p, s = quantize_nf4(w, blocksize=bs, double_quant=double_quant)
            where = f"shape={shape} bs={bs}"
            assert p.dtype == torch.uint8 and p.shape == (math.ceil(w.numel() / 2), 1), where
            assert torch.equal(p, p_ref), where
            assert s.shape == w.shape and s.dtype == dtype and s.blocksize == bs
            assert s.double_quant == double_quant
            assert torch.equal(s.absmax, s_ref.absmax), where
            assert torch.equal(s.code, s_ref.code)
            if double_quant:
                assert s.absmax.dtype == torch.uint8
                assert torch.equal(s.offset, s_ref.offset), where
                assert torch.equal(s.absmax2, s_ref.state2.absmax), where
                assert torch.equal(s.code2, s_ref.state2.code)
                assert s.blocksize2 == s_ref.state2.blocksize == 256


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
def test_special_weights_match_bnb(double_quant):
    """All-zero blocks, a constant weight (absmax - mean == 0 everywhere), many blocks (absmax2 > 1 block)."""
    z = _weight((16, 256), torch.float32)
    z[3] = 0.0
    z[5, :64] = 0.0
    cases = [z, torch.full((8, 64), 0.5), torch.zeros(4, 64), _weight((640, 256), torch.bfloat16, 7)]
    for w in cases:
        for bs in (32, 64):
            p_ref, s_ref = _bnb_quant(w, bs, double_quant)
            p, s = quantize_nf4(w, blocksize=bs, double_quant=double_quant)
            assert torch.equal(p, p_ref)
            assert torch.equal(s.absmax, s_ref.absmax)
            if double_quant:
                assert torch.equal(s.absmax2, s_ref.state2.absmax)
                assert torch.equal(s.offset, s_ref.offset)
            assert torch.equal(s.absmax_fp32(), _bnb_absmax(s_ref))


def _bnb_absmax(qs):
    if qs.state2 is None:
        return qs.absmax
    return bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset


# --------------------------------------------------------------------------------------
# dequantisation, both directions
# --------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequant_bit_exact_with_bnb(dtype, double_quant):
    out_dtypes = (dtype, torch.float32) if dtype != torch.float32 else (dtype, torch.bfloat16)
    for i, shape in enumerate(SHAPES):
        for bs in BLOCKSIZES:
            w = _weight(shape, dtype, seed=i + bs)
            p_ref, s_ref = _bnb_quant(w, bs, double_quant)
            p, s = quantize_nf4(w, blocksize=bs, double_quant=double_quant)
            assert torch.equal(s.absmax_fp32(), _bnb_absmax(s_ref))
            for od in out_dtypes:
                mine_of_bnb = dequantize_nf4(p_ref, s_ref, dtype=od)  # fastft reads bnb's state
                mine = dequantize_nf4(p, s, dtype=od, backend="torch")
                assert mine.shape == w.shape and mine.dtype == od
                assert torch.equal(mine, mine_of_bnb)
                assert torch.equal(mine, _bnb_dequant_reference(p, s, od)), f"{shape} {bs} {od}"
                if _bnb_cpu_dequant_is_right(shape, bs):
                    s_ref.dtype = od
                    theirs_of_mine = bnbF.dequantize_4bit(p, s.to_bnb() if od == dtype else _with_dtype(s, od))
                    assert torch.equal(bnbF.dequantize_4bit(p_ref, s_ref), mine), f"{shape} {bs} {od}"
                    assert torch.equal(theirs_of_mine, mine), f"{shape} {bs} {od}"
            s_ref.dtype = dtype
            assert dequantize_nf4(p, s).dtype == dtype  # default: the original dtype


def _with_dtype(s: NF4State, dtype) -> object:
    qs = s.to_bnb()
    qs.dtype = dtype
    return qs


@needs_bnb
def test_bnb_cpu_dequant_quirk_documented():
    """bnb's native CPU dequant disagrees with its own format when rows split blocks;
    fastft follows the format (bnb's reference implementation and quantiser)."""
    w = _weight((64, 96), torch.float32)
    p, s = quantize_nf4(w, blocksize=64, double_quant=False)
    ref = _bnb_dequant_reference(p, s, torch.float32)
    assert torch.equal(dequantize_nf4(p, s), ref)
    # the round trip is accurate under fastft's reading
    assert (dequantize_nf4(p, s) - w).abs().max() <= s.absmax.max() * _max_half_gap()


def _max_half_gap() -> float:
    c = nf4_code().double()
    return float(((c[1:] - c[:-1]) / 2).max())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_error_bound(dtype, double_quant):
    w = _weight((48, 320), dtype, seed=3)
    for bs in (32, 64, 256, 1024):
        p, s = quantize_nf4(w, blocksize=bs, double_quant=double_quant)
        d = dequantize_nf4(p, s, dtype=torch.float32)
        n = w.numel()
        true = quantize_nf4(w, blocksize=bs, double_quant=False)[1].absmax
        used = s.absmax_fp32()
        # q was picked against the true absmax a, dequantised with a~ (= a without double quant):
        # |W - code * a~| <= a * max_half_gap + |a - a~| * max|code|
        per = true.repeat_interleave(bs)[:n].view(w.shape)
        slack = (used - true).abs().repeat_interleave(bs)[:n].view(w.shape) + 1e-6 * per
        err = (d - w.float()).abs()
        assert (err <= per * _max_half_gap() + slack).all()


def test_state_helpers():
    w = _weight((16, 64), torch.bfloat16)
    p, s = quantize_nf4(w, blocksize=64)
    assert s.numel == 1024 and s.nblocks == 16
    s2 = s.to("cpu")
    assert isinstance(s2, NF4State) and s2 is not s and torch.equal(s2.absmax, s.absmax)
    assert as_nf4_state(s) is s
    with pytest.raises(TypeError, match="NF4State or a bitsandbytes QuantState"):
        as_nf4_state(object())
    p0, s0 = quantize_nf4(w, blocksize=64, double_quant=False)
    assert torch.equal(p0, p)
    assert (s.absmax_fp32() - s0.absmax).abs().max() < 0.02 * s0.absmax.max()
    # the low-level contract
    flat = dequantize_nf4_torch(p, s.absmax_fp32(), s.code, 64, 1024, torch.float32)
    assert flat.shape == (1024,) and torch.equal(flat.view(16, 64), dequantize_nf4(p, s, dtype=torch.float32))


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_to_bnb_round_trip(double_quant):
    w = _weight((32, 192), torch.float16)
    p_ref, s_ref = _bnb_quant(w, 64, double_quant)
    s = NF4State.from_bnb(s_ref)
    back = s.to_bnb()
    assert isinstance(back, bnbF.QuantState)
    assert back == s_ref  # QuantState.__eq__ compares every field, state2 included
    assert back.quant_type == "nf4" and back.nested == double_quant
    s_again = NF4State.from_bnb(back)
    for f in ("shape", "dtype", "blocksize", "blocksize2"):
        assert getattr(s_again, f) == getattr(s, f)
    for f in ("absmax", "code", "offset", "absmax2", "code2"):
        a, b = getattr(s_again, f), getattr(s, f)
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(bnbF.dequantize_4bit(p_ref, back), bnbF.dequantize_4bit(p_ref, s_ref))
    fp4 = bnbF.quantize_4bit(w, blocksize=64, quant_type="fp4")[1]
    with pytest.raises(ValueError, match="quant_type='fp4'"):
        NF4State.from_bnb(fp4)


@needs_bnb
def test_bnb_linear4bit_layer():
    lin = torch.nn.Linear(128, 48)
    l4 = bnb.nn.Linear4bit(128, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    l4.load_state_dict(lin.state_dict())
    l4 = l4.to("cpu")
    qs = l4.weight.quant_state
    p, s = quantize_nf4(lin.weight.detach(), blocksize=qs.blocksize)
    assert torch.equal(p, l4.weight.data) and torch.equal(s.absmax, qs.absmax)
    x = torch.randn(5, 128)
    with torch.no_grad():
        torch.testing.assert_close(nf4_matmul(x, l4.weight, qs, l4.bias), l4(x), rtol=1e-5, atol=1e-5)
    assert as_nf4_state(qs).double_quant


# --------------------------------------------------------------------------------------
# nf4_matmul
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 7, 64, 300])
def test_nf4_matmul_matches_dequant_matmul(batch, dtype):
    N, K = 96, 256
    w = _weight((N, K), torch.bfloat16, seed=batch)
    p, s = quantize_nf4(w, blocksize=64)
    b = torch.randn(N, dtype=dtype)
    wd = dequantize_nf4(p, s, dtype=dtype)
    for x in (torch.randn(batch, K, dtype=dtype), torch.randn(2, batch, K, dtype=dtype)):
        for bias in (None, b):
            for be in ("auto", "torch"):
                y = nf4_matmul(x, p, s, bias, backend=be)
                assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
                ref = x.float() @ wd.float().T + (0 if bias is None else bias.float())  # fp32 reference
                if dtype == torch.float32:
                    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
                else:  # bf16 output (and bf16 bias add, as bnb): error relative to the terms' size
                    mag = x.float().abs() @ wd.float().abs().T + (0 if bias is None else bias.float().abs())
                    assert ((y.float() - ref).abs() <= 2**-7 * mag + 1e-3).all()


def test_nf4_matmul_backward():
    N, K = 40, 128
    p, s = quantize_nf4(_weight((N, K), torch.float32), blocksize=32)
    x = torch.randn(3, 5, K, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    y = nf4_matmul(x, p, s, bias, backend="torch")
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    b2 = bias.detach().clone().requires_grad_()
    nf4_matmul_reference(x2, p, s, b2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, b2.grad)


def test_nf4_matmul_torch_contract():
    N, K = 24, 64
    p, s = quantize_nf4(_weight((N, K), torch.float32), blocksize=32)
    x = torch.randn(9, K)
    y = nf4_matmul_torch(x, p, s.absmax_fp32(), s.code, 32, N, K, None)
    assert y.shape == (9, N)
    torch.testing.assert_close(y, x @ dequantize_nf4(p, s).T)


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nf4_matmul_vs_bnb_matmul_4bit(dtype, double_quant):
    N, K = 80, 256
    w = _weight((N, K), dtype, seed=11)
    p_ref, s_ref = _bnb_quant(w, 64, double_quant)
    bias = torch.randn(N, dtype=dtype)
    for batch in (1, 7):
        x = torch.randn(batch, K, dtype=dtype)
        ref = bnb.matmul_4bit(x, p_ref.t(), s_ref, bias=bias)
        y = nf4_matmul(x, p_ref, s_ref, bias)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
        torch.testing.assert_close(y, ref.to(dtype), **tol)


# --------------------------------------------------------------------------------------
# backends and validation
# --------------------------------------------------------------------------------------
def test_backends_registered():
    ops = backends.registered_ops()
    assert ops[OP_DEQUANT] == ("triton", "cuda", "cpp", "torch")
    assert ops[OP_NF4_MATMUL] == ("triton", "cuda", "cpp", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert backends.select(OP_NF4_MATMUL, "cpu", "auto").backend in ("cpp", "torch")
    p, s = quantize_nf4(_weight((8, 64), torch.float32), blocksize=64)
    if not torch.cuda.is_available() and not backends.interpreting():
        with pytest.raises(backends.BackendUnavailable):
            nf4_matmul(torch.randn(2, 64), p, s, backend="triton")
        with pytest.raises(backends.BackendUnavailable):
            dequantize_nf4(p, s, backend="triton")


def test_bad_inputs():
    w = _weight((16, 96), torch.float32)
    p, s = quantize_nf4(w, blocksize=32)
    x = torch.randn(3, 96)
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="power of two in \\[32, 4096\\], got 48"):
        quantize_nf4(w, blocksize=48)
    for bad in (16, 8192):
        with pytest.raises(ValueError, match="power of two"):
            quantize_nf4(w, blocksize=bad)
    with pytest.raises(TypeError, match="packed must be uint8"):
        dequantize_nf4(p.to(torch.int8), s)
    with pytest.raises(ValueError, match="packed has 767 bytes"):
        dequantize_nf4(p[:-1], s)
    with pytest.raises(ValueError, match="packed has 767 bytes"):
        nf4_matmul(x, p[:-1], s)
    with pytest.raises(ValueError, match="state.blocksize must be a power of two"):
        dequantize_nf4(p, NF4State(s.shape, s.dtype, 100, s.absmax, s.code, s.offset, s.absmax2, s.code2))
    # K not a multiple of blocksize: valid NF4 (see test_nf4_matmul_blocks_across_rows)
    w2 = _weight((8, 96), torch.float32)
    p2, s2 = quantize_nf4(w2, blocksize=64)
    assert dequantize_nf4(p2, s2).shape == (8, 96)
    with pytest.raises(ValueError, match="x shape \\(3, 95\\)"):
        nf4_matmul(torch.randn(3, 95), p, s)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        nf4_matmul(torch.ones(3, 96, dtype=torch.long), p, s)
    with pytest.raises(ValueError, match="bias must have shape \\(16,\\)"):
        nf4_matmul(x, p, s, torch.zeros(15))
    p3, s3 = quantize_nf4(_weight((2, 4, 64), torch.float32), blocksize=64)
    with pytest.raises(ValueError, match="2-D weight"):
        nf4_matmul(torch.randn(1, 64), p3, s3)
    with pytest.raises(ValueError, match="backend= must be one of"):
        nf4_matmul(x, p, s, backend="nope")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_nf4_matmul_blocks_across_rows(dtype, bias):
    """K not a multiple of the blocksize (GPT-2's 3072 x 768 is fine, a 96- or 1000-wide layer is
    not): bitsandbytes quantises the flat weight, so blocks run across rows. "auto" dequantises
    and runs the GEMM (same numbers as the reference, forward and backward); an explicitly
    requested fused backend refuses with a clear error instead of reading the wrong blocks."""
    w = _weight((24, 96), dtype, seed=3)
    packed, state = quantize_nf4(w, blocksize=64)
    x = torch.randn(2, 5, 96, dtype=dtype, requires_grad=True)
    b = torch.randn(24, dtype=dtype, requires_grad=True) if bias else None
    got = nf4_matmul(x, packed, state, b)
    assert got.shape == (2, 5, 24) and got.dtype == dtype
    xr = x.detach().clone().requires_grad_()
    br = b.detach().clone().requires_grad_() if bias else None
    ref = nf4_matmul_reference(xr, packed, state, br)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, ref, **tol)
    g = torch.randn_like(got)
    got.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    if bias:
        torch.testing.assert_close(b.grad, br.grad, **tol)
    torch.testing.assert_close(nf4_matmul(x.detach(), packed, state, None, backend="torch"),
                               x.detach() @ dequantize_nf4(packed, state, dtype=dtype).T, **tol)  # fmt: skip
    for name in ("cpp", "triton"):
        try:
            backends.select(OP_NF4_MATMUL, "cpu", name)
        except backends.BackendUnavailable:
            continue
        with pytest.raises(ValueError, match="K=96 is not a multiple of blocksize=64: the fused"):
            nf4_matmul(x.detach(), packed, state, backend=name)
