"""NF4 in one launch: an NF4State is validated once, and an ``nf4_matmul`` / ``dequantize_nf4``
call is a fixed number of kernel launches whatever the double quantisation (the kernels
decode the 8-bit absmax themselves; no PyTorch op touches the weight or its statistics).

Launches are counted with the ``_launch`` hook every kernel module routes its launches (and
torch GEMMs) through; the PyTorch ops outside the launches are recorded with a small
``TorchDispatchMode`` (the kernels' own inner work is not, see ``_Record``).
"""

from __future__ import annotations

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from fastft import backends
from fastft.kernels import nf4 as k_triton
from fastft.kernels import nf4_cpu as k_cpp
from fastft.nn import Linear4bit
from fastft.ops import nf4 as nf4mod
from fastft.ops import nf4_state
from fastft.ops.nf4 import (
    NF4State,
    as_nf4_state,
    dequantize_nf4,
    nf4_matmul,
    nf4_matmul_reference,
    prepare_state,
    quantize_nf4,
)

cpp_ok, cpp_why = k_cpp.available()
needs_cpp = pytest.mark.skipif(not cpp_ok, reason=f"C++ NF4 kernels unavailable: {cpp_why}")
needs_interp = pytest.mark.skipif(not backends.interpreting(), reason="needs TRITON_INTERPRET=1 (a CPU run)")

# views and allocations are not compute: every other aten op outside a launch is recorded
_FREE = {"empty", "empty_strided", "view", "_unsafe_view", "reshape", "as_strided", "t", "detach", "alias"}


class _Record(TorchDispatchMode):
    """Aten ops run outside the kernel launches (the ``_launch`` hook turns this mode off inside)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "fastft":
            # a fastft operator (torch.library) is a wrapper, not compute: what counts is what its
            # implementation runs, so run that (the Python function) with this mode on again
            with self:
                return OPDEFS[f"fastft::{name}"]._init_fn(*args, **(kwargs or {}))
        if name not in _FREE and not func.is_view:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches(monkeypatch):
    """Count the launches of every NF4 kernel module; inside a launch no op is recorded."""
    seen: list[str] = []

    def counting(module):
        inner = module._launch

        def _launch(fn, *args, **kwargs):
            seen.append(f"{module.__name__.rsplit('.', 1)[-1]}:{getattr(fn, '__name__', type(fn).__name__)}")
            with _disable_current_modes():
                return inner(fn, *args, **kwargs)

        monkeypatch.setattr(module, "_launch", _launch)

    for module in (k_triton, k_cpp):
        counting(module)
    return seen


@pytest.fixture
def validations(monkeypatch):
    calls = []
    inner = nf4_state._validate_state

    def counting(state):
        calls.append(state)
        return inner(state)

    monkeypatch.setattr(nf4_state, "_validate_state", counting)
    return calls


def _weight(n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05).to(dtype)


# --------------------------------------------------------------------------------------
# validated once
# --------------------------------------------------------------------------------------
def test_a_state_is_validated_once_however_many_calls(validations):
    packed, state = quantize_nf4(_weight(48, 128), blocksize=64)
    x = torch.randn(3, 128)
    for _ in range(5):
        nf4_matmul(x, packed, state, backend="torch")
        nf4_matmul(x, packed, state)
        dequantize_nf4(packed, state)
    assert len(validations) == 1
    # replacing a tensor of the state validates (and prepares) it again, once
    state.absmax = state.absmax.clone()
    nf4_matmul(x, packed, state)
    nf4_matmul(x, packed, state)
    assert len(validations) == 2
    # a bad replacement is caught at the next call, before any kernel
    state.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match="state.absmax has"):
        nf4_matmul(x, packed, state)


def test_a_linear4bit_layer_validates_its_state_once(validations):
    layer = Linear4bit.from_linear(torch.nn.Linear(128, 40))
    x = torch.randn(2, 5, 128)
    for _ in range(4):
        layer(x)
    assert len(validations) == 1
    assert layer.quant_state is layer.quant_state
    layer.load_state_dict(layer.state_dict())  # buffers overwritten in place: validated again
    layer(x)
    assert len(validations) == 2


def test_a_bnb_quant_state_is_converted_and_validated_once(validations):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    packed, qs = bnbF.quantize_4bit(_weight(32, 128), blocksize=64, compress_statistics=True, quant_type="nf4")
    assert as_nf4_state(qs) is as_nf4_state(qs)
    x = torch.randn(4, 128)
    for _ in range(3):
        nf4_matmul(x, packed, qs)
    assert len(validations) == 1
    qs.absmax = qs.absmax.clone()  # as QuantState.to() does: a new NF4State, validated again
    assert as_nf4_state(qs).absmax is qs.absmax
    nf4_matmul(x, packed, qs)
    assert len(validations) == 2


def test_prepared_state_holds_the_undecoded_double_quantisation():
    packed, state = quantize_nf4(_weight(16, 256))
    prep = prepare_state(state)
    assert prep.absmax.dtype == torch.uint8 and prep.absmax is not None
    assert set(prep.nested) == {"absmax2", "code2", "offset", "blocksize2"}
    assert prep.nested["offset"].shape == (1,)
    _, cached = quantize_nf4(_weight(16, 256), cache_absmax=True)
    assert prepare_state(cached).nested == {} and prepare_state(cached).absmax.dtype == torch.float32
    assert cached.extra_bits_per_weight == 0.5 and state.extra_bits_per_weight == 0.0
    assert torch.equal(cached.absmax_cache, state.absmax_fp32())


# --------------------------------------------------------------------------------------
# one launch, whatever the double quantisation
# --------------------------------------------------------------------------------------
_VARIANTS = ("plain", "double_quant", "cached")


def _state(variant, n, k, blocksize=64):
    w = _weight(n, k)
    packed, state = quantize_nf4(
        w, blocksize=blocksize, double_quant=variant != "plain", cache_absmax=variant == "cached"
    )
    return packed, state


def _count(launches, fn):
    rec = _Record()
    del launches[:]
    with rec:
        out = fn()
    return out, list(launches), rec.ops


# (x dtype, M) -> launches of the cpp backend: the fused kernel, or dequantise + torch GEMM
_CPP_EXPECTED = {
    (torch.float32, 1): 1,
    (torch.float32, 16): 1,
    (torch.float32, 100): 1,  # panels dequantised inside the one call
    (torch.bfloat16, 1): 1,
    (torch.bfloat16, 16): 1,  # bf16 panels + torch GEMM inside the one call
    (torch.float16, 16): 2,  # dequantise to fp16 + torch GEMM
}


@needs_cpp
@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize(("dtype", "M"), sorted(_CPP_EXPECTED, key=str))
def test_cpp_matmul_launches_are_fixed(launches, variant, dtype, M):
    N, K = 40, 256
    packed, state = _state(variant, N, K)
    x = torch.randn(M, K).to(dtype)
    nf4_matmul(x, packed, state, backend="cpp")  # validation and preparation happen here, once
    y, seen, ops = _count(launches, lambda: nf4_matmul(x, packed, state, backend="cpp"))
    assert len(seen) == _CPP_EXPECTED[(dtype, M)], seen
    assert ops == [], ops  # no PyTorch op decodes the absmax (or anything else) around the kernels
    ref = nf4_matmul_reference(x.float(), packed, state)
    torch.testing.assert_close(y.float(), ref, **({} if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)))


@needs_cpp
@pytest.mark.parametrize("variant", _VARIANTS)
def test_cpp_dequant_is_one_launch_and_bit_exact(launches, variant):
    packed, state = _state(variant, 24, 512)
    ref = dequantize_nf4(packed, state, dtype=torch.bfloat16, backend="torch")
    got, seen, ops = _count(launches, lambda: dequantize_nf4(packed, state, dtype=torch.bfloat16, backend="cpp"))
    assert len(seen) == 1 and ops == [], (seen, ops)
    assert torch.equal(got, ref)


@needs_interp
@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize(("M", "expected"), [(1, 1), (5, 1), (24, 1), (80, 2)])
def test_triton_matmul_launches_are_fixed(launches, variant, M, expected):
    N, K = 24, 128
    packed, state = _state(variant, N, K, blocksize=32)
    x = torch.randn(M, K)
    nf4_matmul(x, packed, state, backend="triton")
    y, seen, ops = _count(launches, lambda: nf4_matmul(x, packed, state, backend="triton"))
    assert len(seen) == expected, seen
    assert ops == [], ops
    torch.testing.assert_close(y, nf4_matmul_reference(x, packed, state), atol=1e-5, rtol=1e-5)


@needs_interp
@pytest.mark.parametrize("variant", _VARIANTS)
def test_triton_dequant_is_one_launch_and_bit_exact(launches, variant):
    packed, state = _state(variant, 10, 320)
    ref = dequantize_nf4(packed, state, dtype=torch.float32, backend="torch")
    for dtype in (torch.float32, torch.bfloat16):
        got, seen, ops = _count(
            launches, lambda dtype=dtype: dequantize_nf4(packed, state, dtype=dtype, backend="triton")
        )
        assert len(seen) == 1 and ops == [], (seen, ops)
        if dtype == torch.float32:
            assert torch.equal(got, ref)  # the in-kernel decode of the scales is exact
        else:  # the interpreter's bf16 store truncates (numpy has no bf16): within one bf16 ulp
            torch.testing.assert_close(got.float(), ref, atol=1e-6, rtol=2**-7)


@needs_cpp
def test_backward_is_one_dequant_and_one_gemm(launches):
    packed, state = _state("double_quant", 40, 256)
    x = torch.randn(3, 256, requires_grad=True)
    y = nf4_matmul(x, packed, state, backend="cpp")
    del launches[:]
    y.sum().backward()
    assert len(launches) == 1  # the dequantisation; the GEMM dY W is torch's
    xr = x.detach().clone().requires_grad_()
    nf4_matmul_reference(xr, packed, state).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


# --------------------------------------------------------------------------------------
# the GEMV policy
# --------------------------------------------------------------------------------------
@needs_cpp
def test_gemv_policy_picks_the_small_batch_backend(launches, monkeypatch):
    packed, state = _state("double_quant", 40, 256)
    monkeypatch.setattr(nf4mod, "GEMV_POLICY", {"cpu": "torch"})
    x = torch.randn(nf4mod.GEMV_MAX_M, 256)
    y = nf4_matmul(x, packed, state)
    assert launches == []  # M <= GEMV_MAX_M: the policy's backend (here the torch reference)
    torch.testing.assert_close(y, nf4_matmul_reference(x, packed, state))
    nf4_matmul(torch.randn(nf4mod.GEMV_MAX_M + 1, 256), packed, state)
    assert len(launches) == 1  # above it: the "auto" order (cpp)
    del launches[:]
    nf4_matmul(x, packed, state, backend="cpp")  # a forced backend overrides the policy
    assert len(launches) == 1


def test_gemv_policy_names_a_registered_backend():
    for device_type, backend in nf4mod.GEMV_POLICY.items():
        assert device_type in ("cuda", "cpu")
        assert backend in backends.registered_ops()[nf4mod.OP_NF4_MATMUL]


def test_state_helpers_keep_the_cache():
    _, state = quantize_nf4(_weight(8, 64), cache_absmax=True)
    moved = state.to("cpu")
    assert moved.absmax_cache is not None and torch.equal(moved.absmax_cache, state.absmax_cache)
    plain = NF4State(state.shape, state.dtype, state.blocksize, state.absmax_cache, state.code)
    assert plain.with_absmax_cache() is plain  # no double quantisation: nothing to cache


# --------------------------------------------------------------------------------------
# 8 < M <= 64: the GEMM tiled by M with split-K (a reduction step)
# --------------------------------------------------------------------------------------
@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("M", "programs"), [(9, 64), (24, 1000), (40, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_split_k_gemm_matches_the_reference(launches, monkeypatch, dtype, M, programs, with_bias):
    monkeypatch.setattr(k_triton, "SPLIT_K_PROGRAMS", programs)
    monkeypatch.setattr(k_triton, "SPLIT_K_MIN_STEPS", 1)
    N, K = 24, 352  # K not a multiple of BLOCK_K * SPLIT_K: a short last split
    packed, state = _state("double_quant", N, K, blocksize=32)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    y = nf4_matmul(x, packed, state, bias, backend="triton")
    tiles = -(-M // k_triton._GEMM_INTERPRET[0]) * -(-N // k_triton._GEMM_INTERPRET[1])
    split = k_triton._split_k(tiles, K, k_triton._GEMM_INTERPRET[2], x.device)
    assert len(launches) == (1 if split == 1 else 2), (split, launches)
    assert (split > 1) == (programs > tiles)
    ref = nf4_matmul_reference(x.float(), packed, state, bias)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    else:  # bf16 rule: error vs the fp32 oracle within 2x that of PyTorch's own bf16 product, plus
        # one ulp of the largest output: the interpreter truncates bf16 stores (see test_nf4_triton)
        pt = nf4_matmul_reference(x, packed, state, bias)
        err, base = (y.float() - ref).abs().max(), (pt.float() - ref).abs().max()
        assert err <= 2 * base + 2**-7 * ref.abs().max(), (err, base)


def test_the_harness_times_providers_interleaved():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "_harness.py"
    spec = importlib.util.spec_from_file_location("_harness_for_test", path)
    H = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(H)
    order: list[str] = []
    fns = {n: (lambda n=n: order.append(n)) for n in ("a", "b", "c")}
    out = H.time_interleaved(fns, warmup=1, reps=3, inner=2)
    assert set(out) == {"a", "b", "c"} and all(out[n]["reps"] == 3 and out[n]["inner"] == 2 for n in out)
    timed = order[3:]  # after one warmup call each: every repetition runs all three, order rotated
    assert timed == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a", "c", "c", "a", "a", "b", "b"]
    assert out["a"]["interleaved_with"] == ["b", "c"]
