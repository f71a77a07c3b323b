"""lora_linear's triton backend (dropout fused into the rank-r kernels), under TRITON_INTERPRET=1.

The oracle is ``lora_linear_reference(..., mask=dropout_mask_triton(seed, ...))`` with the
seed the op draws (``torch.randint(0, 2**62, (1,))`` on the CPU generator).
"""

import pytest
import torch
from _aot import run_compile_script

from fastft import backends
from fastft.kernels import lora as klora
from fastft.kernels.lora import dropout_mask_triton, lora_dA, lora_dx_add_, lora_xa
from fastft.ops import lora_linear, lora_linear_reference
from fastft.ops.lora import OP_LORA

TOL32 = dict(atol=1e-5, rtol=1e-5)
# one bf16 rounding: the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest), so up to 1 ulp
BF16_ULP = 2**-7


def _inputs(
    lead,
    in_f,
    out_f,
    r,
    *,
    dtype=torch.float32,
    adapter_dtype=None,
    fifo=False,
    bias=True,
    lora_bias=False,
    train_w=False,
):
    g = torch.Generator().manual_seed(3)
    adt = adapter_dtype or dtype

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).requires_grad_(True)

    x = rnd(*lead, in_f)
    w = rnd(*((in_f, out_f) if fifo else (out_f, in_f)), scale=0.2).detach().requires_grad_(train_w)
    b = rnd(out_f) if bias else None
    A = rnd(r, in_f, dt=adt, scale=0.3)
    B = rnd(out_f, r, dt=adt, scale=0.3)
    lb = rnd(out_f, dt=adt) if lora_bias else None
    return x, w, b, A, B, lb


def _seed_the_op_draws(k):
    torch.manual_seed(k)
    return int(torch.randint(0, 2**62, (1,)).item())


def _grads(y, tensors, go):
    live = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(y, live, go)


def _run_triton(k, x, w, A, B, scaling, p, **kw):
    """The op on the triton backend, and the scaled mask it used (None for p == 0)."""
    torch.manual_seed(k)
    y = lora_linear(x, w, A, B, scaling, dropout_p=p, backend="triton", **kw)
    mask = dropout_mask_triton(_seed_the_op_draws(k), tuple(x.shape), p, x.device) if p else None
    return y, mask


# --------------------------------------------------------------------------------------
# the op against the reference with the same mask
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("lead, r", [((37,), 8), ((37,), 1), ((37,), 20), ((3, 5), 8)])
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("extras", ["none", "bias+lora_bias+train_w"])
def test_matches_reference_fp32(lead, r, fifo, extras):
    x, w, b, A, B, lb = _inputs(
        lead, 29, 41, r, fifo=fifo, bias=extras != "none", lora_bias="lora_bias" in extras, train_w="train_w" in extras
    )
    y, mask = _run_triton(11, x, w, A, B, 0.7, 0.25, bias=b, lora_bias=lb, fan_in_fan_out=fifo)
    ref = lora_linear_reference(x, w, A, B, 0.7, bias=b, lora_bias=lb, mask=mask, fan_in_fan_out=fifo)
    torch.testing.assert_close(y, ref, **TOL32)
    go = torch.randn_like(ref)
    tensors = (x, w, b, A, B, lb)
    got, want = _grads(y, tensors, go), _grads(ref, tensors, go)
    assert len(got) == len(want) == sum(t is not None and t.requires_grad for t in tensors)
    for g, e in zip(got, want):  # dX and dA use the mask again: the same one as forward
        torch.testing.assert_close(g, e, **TOL32)


@pytest.mark.parametrize("r", [1, 8])
def test_p0_matches_reference(r):
    x, w, b, A, B, lb = _inputs((2, 9), 29, 41, r, lora_bias=True, train_w=True)
    y, mask = _run_triton(2, x, w, A, B, 1.3, 0.0, bias=b, lora_bias=lb)
    assert mask is None
    ref = lora_linear_reference(x, w, A, B, 1.3, bias=b, lora_bias=lb)
    torch.testing.assert_close(y, ref, **TOL32)
    go = torch.randn_like(ref)
    for g, e in zip(_grads(y, (x, w, b, A, B, lb), go), _grads(ref, (x, w, b, A, B, lb), go)):
        torch.testing.assert_close(g, e, **TOL32)


def test_only_needed_gradients():
    x, w, b, A, B, _ = _inputs((37,), 29, 41, 8)
    x, b = x.detach(), b.detach()  # frozen input and base: dX is never formed, dA still needs the mask
    y, mask = _run_triton(4, x, w, A, B, 1.0, 0.3, bias=b)
    go = torch.randn_like(y)
    y.backward(go)
    A2, B2 = A.detach().requires_grad_(), B.detach().requires_grad_()
    ref = lora_linear_reference(x, w, A2, B2, 1.0, bias=b, mask=mask)
    gA, gB = torch.autograd.grad(ref, (A2, B2), go)
    torch.testing.assert_close(A.grad, gA, **TOL32)
    torch.testing.assert_close(B.grad, gB, **TOL32)
    assert w.grad is None


# --------------------------------------------------------------------------------------
# low precision: judged against an fp32 oracle, relative to the torch reference in that dtype
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, adapter_dtype",
    [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
)
@pytest.mark.parametrize("precision", ["activation", "peft"])
def test_low_precision_within_reference_error(dtype, adapter_dtype, precision):
    """The activation precision against PEFT's computation in the activation dtype (its adapters
    cast there); the PEFT precision against PEFT's promotion of ``x`` to the adapters' dtype."""
    x, w, b, A, B, _ = _inputs((48,), 40, 24, 16, dtype=dtype, adapter_dtype=adapter_dtype)
    y, mask = _run_triton(5, x, w, A, B, 2.0, 0.1, bias=b, precision=precision)
    assert y.dtype == dtype
    f32 = [t.detach().float().requires_grad_(t.requires_grad) for t in (x, w, b, A, B)]
    oracle = lora_linear_reference(f32[0], f32[1], f32[3], f32[4], 2.0, bias=f32[2], mask=mask)
    plain = lora_linear_reference(x, w, A, B, 2.0, bias=b, mask=mask, precision=precision)
    err, base = (y.float() - oracle).abs().max(), (plain.float() - oracle).abs().max()
    assert err <= 2 * base + 1e-3
    go = torch.randn_like(oracle)
    ours = _grads(y, (x, b, A, B), go.to(dtype))
    theirs = _grads(plain, (x, b, A, B), go.to(dtype))
    exact = _grads(oracle, (f32[0], f32[2], f32[3], f32[4]), go)
    for got, pl, orc, leaf in zip(ours, theirs, exact, (x, b, A, B)):
        assert got.dtype == leaf.dtype
        assert (got.float() - orc).abs().max() <= 2 * (pl.float() - orc).abs().max() + 1e-2


# --------------------------------------------------------------------------------------
# the mask
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_statistics(p):
    m = dropout_mask_triton(123, (200, 300), p, "cpu")
    assert m.dtype == torch.float32 and m.shape == (200, 300)
    vals = m.unique()
    assert len(vals) == 2 and vals[0] == 0.0 and abs(vals[1].item() - 1.0 / (1.0 - p)) < 1e-6
    assert abs((m > 0).float().mean().item() - (1.0 - p)) < 0.01
    assert abs(m.mean().item() - 1.0) < 0.02
    # rows and columns are not correlated the trivial way: both look like the whole
    assert abs((m[0] > 0).float().mean().item() - (1.0 - p)) < 0.1
    assert abs((m[:, 0] > 0).float().mean().item() - (1.0 - p)) < 0.1


def test_mask_seed_and_layout():
    m = dropout_mask_triton(7, (37, 29), 0.3, "cpu")
    torch.testing.assert_close(m, dropout_mask_triton(7, (37, 29), 0.3, "cpu"), atol=0, rtol=0)  # deterministic
    assert not torch.equal(m, dropout_mask_triton(8, (37, 29), 0.3, "cpu"))  # seeds differ
    # the mask is a function of (row, col) of the [N, in] view: [..., in] gives the same one
    torch.testing.assert_close(dropout_mask_triton(7, (1, 37, 29), 0.3, "cpu").view(37, 29), m, atol=0, rtol=0)
    # a row's mask does not depend on how many rows follow (each kernel tile regenerates its part)
    torch.testing.assert_close(dropout_mask_triton(7, (5, 29), 0.3, "cpu"), m[:5], atol=0, rtol=0)
    mb = dropout_mask_triton(7, (37, 29), 0.3, "cpu", torch.bfloat16)
    assert mb.dtype == torch.bfloat16 and torch.equal(mb > 0, m > 0)
    torch.testing.assert_close(mb, m.bfloat16(), atol=0, rtol=BF16_ULP)
    assert torch.equal(dropout_mask_triton(7, (5, 3), 0.0, "cpu"), torch.ones(5, 3))


@pytest.mark.parametrize("seed", [1, 2**31 + 5, 2**62 - 1])
@pytest.mark.parametrize("block", [16, 32])
def test_each_kernel_uses_exactly_the_mask(seed, block, monkeypatch):
    """Identity operands make each kernel print its mask; tiles of any size draw the same one."""
    monkeypatch.setattr(klora, "_BLOCK_INTERPRET", block)
    monkeypatch.setattr(klora, "_MAX_BLOCK_R_INTERPRET", block)
    N, K, p = 37, 29, 0.4
    M = dropout_mask_triton(seed, (N, K), p, "cpu")
    x = torch.ones(N, K)
    torch.testing.assert_close(lora_xa(x, torch.eye(K), seed, p), M, atol=0, rtol=0)  # r = K
    t = torch.randn(N, K)
    torch.testing.assert_close(lora_dx_add_(torch.zeros(N, K), t, torch.eye(K), seed, p), t * M, atol=0, rtol=0)
    torch.testing.assert_close(lora_dA(torch.eye(N), x, seed, p), M, atol=0, rtol=0)  # r = N, split over rows


def test_kernels_match_plain_math_with_strides_and_dtypes():
    N, K, R, seed, p = 37, 29, 20, 99, 0.2
    x = torch.randn(K, N).t()  # non-contiguous [N, K]
    A = torch.randn(R, K)
    t = torch.randn(N, R)
    M = dropout_mask_triton(seed, (N, K), p, "cpu")
    xd = x * M
    torch.testing.assert_close(lora_xa(x, A, seed, p), xd @ A.t(), **TOL32)
    torch.testing.assert_close(lora_dA(t, x, seed, p), t.t() @ xd, **TOL32)
    dx0 = torch.randn(N, K)
    torch.testing.assert_close(lora_dx_add_(dx0.clone(), t, A, seed, p), dx0 + (t @ A) * M, **TOL32)
    # mixed dtypes: bf16 x with fp32 adapters -> fp32 out; dx in its own dtype
    xb = x.bfloat16()
    got = lora_xa(xb, A, seed, p)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, (xb.float() * M) @ A.t(), **TOL32)
    dxb = torch.zeros(N, K, dtype=torch.bfloat16)
    assert lora_dx_add_(dxb, t, A, seed, p) is dxb
    torch.testing.assert_close(dxb, ((t @ A) * M).bfloat16(), atol=1e-5, rtol=BF16_ULP)
    # p == 0: no mask
    torch.testing.assert_close(lora_xa(x, A, seed, 0.0), x @ A.t(), **TOL32)


def test_dropout_is_unbiased_over_draws():
    x, w, b, A, B, _ = _inputs((4,), 16, 8, 4)
    x, A, B = x.detach(), A.detach(), B.detach()
    clean = lora_linear(x, w, A, B, 1.0, bias=b).detach()
    torch.manual_seed(0)
    draws = torch.stack(
        [lora_linear(x, w, A, B, 1.0, bias=b, dropout_p=0.5, backend="triton").detach() for _ in range(300)]
    )
    assert draws.var(0).mean() > 1e-3
    torch.testing.assert_close(draws.mean(0), clean, atol=0.15, rtol=0.1)


def test_neither_the_mask_nor_the_dropped_input_is_saved():
    x, w, b, A, B, _ = _inputs((37,), 29, 41, 8)
    y = lora_linear(x, w, A, B, 1.0, bias=b, dropout_p=0.3, backend="triton")
    node = y.grad_fn
    while "lora_linear" not in type(node).__name__:
        node = node.next_functions[0][0]
    big = [s for s in node.saved_tensors if s.numel() >= x.numel()]
    assert [s.data_ptr() for s in big if s.shape == (37, 29)] == [x.data_ptr()]
    assert all(s.data_ptr() in (x.data_ptr(), w.data_ptr()) for s in big)


# --------------------------------------------------------------------------------------
# dispatch and checks
# --------------------------------------------------------------------------------------
def test_float64_runs_the_torch_products():
    """The kernels take fp32/bf16/fp16; float64 on the triton backend keeps the torch mask throughout."""
    from fastft.ops import dropout_mask

    x, w, b, A, B, _ = _inputs((37,), 29, 41, 8, dtype=torch.float64)
    y, _ = _run_triton(3, x, w, A, B, 0.5, 0.2, bias=b)
    mask = dropout_mask(_seed_the_op_draws(3), (37, 29), 0.2, "cpu", torch.float64)
    ref = lora_linear_reference(x, w, A, B, 0.5, bias=b, mask=mask)
    torch.testing.assert_close(y, ref)
    go = torch.randn_like(ref)
    for g, e in zip(_grads(y, (x, b, A, B), go), _grads(ref, (x, b, A, B), go)):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------------------
def test_registered_triton_first_auto_is_torch_on_cpu():
    assert backends.registered_ops()[OP_LORA] == ("triton", "torch")
    assert backends.select(OP_LORA, "cpu", "auto").backend == "torch"
    assert backends.select(OP_LORA, "cpu", "triton").backend == "triton"  # interpreter, forced


def test_triton_without_interpreter_on_cpu_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b, A, B, _ = _inputs((4,), 8, 6, 2)
    with pytest.raises(backends.BackendUnavailable, match="triton"):
        lora_linear(x, w, A, B, 1.0, dropout_p=0.1, backend="triton")
    with pytest.raises(backends.BackendUnavailable, match="CUDA"):
        dropout_mask_triton(1, (4, 8), 0.1, "cpu")
    with pytest.raises(backends.BackendUnavailable, match="CUDA"):
        lora_xa(x.detach(), A.detach(), 1, 0.1)
    # auto quietly takes torch
    lora_linear(x, w, A, B, 1.0, dropout_p=0.1).sum().backward()


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: lora_xa(torch.ones(4, 8), torch.ones(2, 7), 1, 0.1), ValueError, "A shape"),
        (lambda: lora_xa(torch.ones(4, 8), torch.ones(2, 8), 1, 1.0), ValueError, "p must be"),
        (lambda: lora_xa(torch.ones(4, 8), torch.ones(2, 8), -1, 0.1), ValueError, "seed must be"),
        (lambda: lora_xa(torch.ones(4, 8).double(), torch.ones(2, 8), 1, 0.1), TypeError, "float32"),
        (lambda: lora_dx_add_(torch.ones(4, 8), torch.ones(4, 3), torch.ones(2, 8), 1, 0.1), ValueError, "t shape"),
        (lambda: lora_dA(torch.ones(5, 2), torch.ones(4, 8), 1, 0.1), ValueError, "t shape"),
        (lambda: lora_dA(torch.ones(4, 2, 1), torch.ones(4, 8), 1, 0.1), ValueError, "2-D"),
    ],
)
def test_launcher_checks(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_empty_inputs():
    assert lora_xa(torch.ones(0, 8), torch.ones(2, 8), 1, 0.1).shape == (0, 2)
    assert torch.equal(lora_dA(torch.ones(0, 2), torch.ones(0, 8), 1, 0.1), torch.zeros(2, 8))
    assert dropout_mask_triton(1, (0, 3), 0.1, "cpu").shape == (0, 3)


# --------------------------------------------------------------------------------------
# compiled for a GPU: ahead of time here (no GPU needed), on the device when there is one
# --------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import os, subprocess, sys, tempfile
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print("SKIP: Triton's compiler API is not where this test expects it:", exc)
    sys.exit(0)
from fastft.kernels import lora as k

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
KERNELS = {
    "xa": (k._lora_xa_kernel, dict(x_ptr="X", a_ptr="A", out_ptr="A", seed_ptr="*i64")),
    "dx": (k._lora_dx_add_kernel, dict(dx_ptr="X", t_ptr="A", a_ptr="A", seed_ptr="*i64")),
    "dA": (k._lora_dA_kernel, dict(t_ptr="A", x_ptr="X", out_ptr="*fp32", seed_ptr="*i64")),
}
for x_dt, a_dt in [("*bf16", "*fp32"), ("*fp32", "*fp32"), ("*bf16", "*bf16"), ("*fp16", "*fp16")]:
    for R in (8, 256):
        for name, (fn, ptrs) in KERNELS.items():
            cfg = "dA_fp32" if name == "dA" and a_dt == "*fp32" else name
            block_n, block_k, max_r, num_warps = k._CONFIG[cfg]
            constexprs = dict(
                HAS_DROPOUT=True, INPUT_PRECISION="ieee" if a_dt == "*fp32" else None, UPCAST_DOT=False,
                BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=max(16, min(triton.next_power_of_2(R), max_r)),
            )
            sig = {}
            for arg in fn.arg_names:
                if arg in constexprs:
                    sig[arg] = "constexpr"
                elif arg in ptrs:
                    sig[arg] = {"X": x_dt, "A": a_dt}.get(ptrs[arg], ptrs[arg])
                elif arg in ("p", "scale"):
                    sig[arg] = "fp32"
                else:
                    sig[arg] = "i64" if arg.startswith("stride") or arg == "seed" else "i32"
            try:
                c = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": num_warps})
            except Exception as exc:
                if "ptxas" in str(exc).lower():
                    print("SKIP: no ptxas to assemble with:", exc)
                    sys.exit(0)
                raise
            assert c.asm.get("ptx"), (name, x_dt, a_dt, R)
            if "cubin" in c.asm and os.path.exists(cuobjdump):  # the tile configs must not spill registers
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(c.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
                assert "STACK:0 " in usage, (name, x_dt, a_dt, R, usage)
mask_sig = {"out_ptr": "*bf16", "N": "i32", "K": "i32", "seed_ptr": "*i64", "p": "fp32", "scale": "fp32",
            "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
mask_const = {"BLOCK_N": k._MASK_TILE[0], "BLOCK_K": k._MASK_TILE[1]}
triton.compile(ASTSource(k._dropout_mask_kernel, mask_sig, mask_const), target=GPUTarget("cuda", 90, 32))
print("OK")
"""


@pytest.mark.slow
def test_kernels_compile_for_gpu_without_spills():
    """Compile the kernels ahead of time for sm_90 (no GPU needed), at the launchers' GPU tile
    configs: catches what the interpreter lets through, and register spills (via cuobjdump).
    In a fresh process: the kernels of this one are already defined as interpreted."""
    run_compile_script(_COMPILE_SCRIPT, timeout=600)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(backends.interpreting(), reason="set FASTFT_GPU_TESTS=1 (interpreter off) to run")
@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("r", [16, 200])
def test_on_device_against_reference_with_the_same_mask(dtype, adapter_dtype, r):
    torch.backends.cuda.matmul.allow_tf32 = False
    dev, N, fin, fout, p, k = "cuda", 1000, 1000, 1536, 0.1, 21
    assert backends.select(OP_LORA, dev).backend == "triton"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, fin, device=dev, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(fout, fin, device=dev, generator=g) * 0.02).to(dtype)
    A = (torch.randn(r, fin, device=dev, generator=g) * 0.02).to(adapter_dtype).requires_grad_(True)
    B = (torch.randn(fout, r, device=dev, generator=g) * 0.02).to(adapter_dtype).requires_grad_(True)
    torch.manual_seed(k)
    y = lora_linear(x, w, A, B, 2.0, dropout_p=p)
    mask = dropout_mask_triton(_seed_the_op_draws(k), (N, fin), p, dev)
    assert abs((mask > 0).float().mean().item() - (1 - p)) < 0.01
    f32 = [t.detach().float().requires_grad_(t.requires_grad) for t in (x, w, A, B)]
    ref = lora_linear_reference(*f32, 2.0, mask=mask)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    rel = lambda a, b: ((a.float() - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()  # noqa: E731
    assert rel(y, ref) < tol
    go = torch.randn_like(ref)
    got = _grads(y, (x, A, B), go.to(dtype))
    want = _grads(ref, (f32[0], f32[2], f32[3]), go)
    for a, b in zip(got, want):
        assert rel(a, b) < tol


def test_seed_on_the_device_gives_the_int_seeds_mask():
    """The op hands the kernels a (1,) int64 seed drawn on the device (no host sync; fresh at
    every CUDA-graph replay): it selects the same mask as the same int."""
    x, a = torch.randn(37, 24), torch.randn(8, 24)
    s = torch.tensor([2**40 + 3], dtype=torch.int64)
    torch.testing.assert_close(lora_xa(x, a, s, 0.3), lora_xa(x, a, 2**40 + 3, 0.3), rtol=0, atol=0)
    torch.testing.assert_close(
        dropout_mask_triton(s, (37, 24), 0.3, "cpu"), dropout_mask_triton(2**40 + 3, (37, 24), 0.3, "cpu")
    )
    t = torch.randn(37, 8)
    torch.testing.assert_close(lora_dA(t, x, s, 0.3), lora_dA(t, x, 2**40 + 3, 0.3), rtol=0, atol=0)
    with pytest.raises(ValueError, match="int64"):
        lora_xa(x, a, torch.tensor([3], dtype=torch.int32), 0.3)
    with pytest.raises(ValueError, match="seed"):
        lora_xa(x, a, torch.tensor([3, 4]), 0.3)
