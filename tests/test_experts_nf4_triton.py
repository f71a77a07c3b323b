"""The Triton grouped GEMM over 4-bit NF4 expert weights (fastft.kernels.experts_nf4), under TRITON_INTERPRET=1.

Oracle: each expert's weight dequantised by the torch reference (``ExpertsWeight4bit.dequantize``
with ``backend="torch"``), then one ``torch.mm`` per expert over its sorted rows. fp32 is held
tight; bf16 against the fp32 oracle, relative to the error of plain bf16 dequantise-then-mm.
Small shapes: the interpreter runs every program in Python (the whole file has a ~20 s budget).
"""

import pytest
import torch
from _aot import run_compile_script

import fastft.ops.experts as op
from fastft import backends
from fastft.kernels import experts_nf4 as kx
from fastft.nn import ExpertsWeight4bit
from fastft.ops.experts import OP_EXPERTS_NF4, ExpertsActivation, experts

BF16_ULP = 2**-7  # the interpreter truncates fp32 -> bf16: up to one ulp per rounding
ROUTINGS = {"ragged": [5, 0, 23, 1], "one_expert": [0, 0, 37, 0]}  # empty experts, odd counts, > 1 row tile


def _weight(E, out_f, in_f, *, dq=True, transposed=False, blocksize=32, cache=False, seed=0):
    """A 4-bit expert weight and its fp32 ``[E, out, in]`` dequantisation (torch reference)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, out_f, in_f, generator=g) * 0.1
    q = ExpertsWeight4bit.from_weight(
        w.transpose(1, 2) if transposed else w,
        transposed=transposed,
        blocksize=blocksize,
        double_quant=dq,
        cache_absmax=cache,
    )
    d = q.dequantize(torch.float32, backend="torch")
    return q, (d.transpose(1, 2) if transposed else d).contiguous()


def _per_expert(a, dense, counts, grad, dtype=None):
    """``a_e @ W_e^T`` (``grad``: ``a_e @ W_e``) per expert, with ``W_e`` cast to ``dtype`` (default a's)."""
    dtype = dtype or a.dtype
    out = a.new_empty(a.shape[0], dense.shape[2] if grad else dense.shape[1])
    s = 0
    for e, c in enumerate(counts):
        w = dense[e].to(dtype)
        out[s : s + c] = a[s : s + c] @ (w if grad else w.t())
        s += c
    return out


def _offs(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def _run(a, q, counts, grad):
    return op._gmm_nf4_triton(a, q, _offs(counts), grad)


# --------------------------------------------------------------------------------------
# the kernel against dequantise-then-mm
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize(
    "routing, dq, transposed",
    [("ragged", False, False), ("one_expert", True, True)],
    ids=["ragged-fp32_absmax", "one_expert-dq-transposed"],
)
def test_fp32_matches_dequant_then_mm(routing, dq, transposed, grad):
    """Experts with no rows and odd row counts (fp32 absmax), one expert taking every row (double
    quantisation, gpt-oss' transposed layout); both GEMM forms; 48 x 64 weights: several row tiles,
    column tiles and loop steps of the interpreter's 16 x 16 x 32 tiles."""
    counts = ROUTINGS[routing]
    q, dense = _weight(len(counts), 48, 64, dq=dq, transposed=transposed)
    a = torch.randn(sum(counts), 48 if grad else 64)
    got = _run(a, q, counts, grad)
    assert got.shape == (sum(counts), 64 if grad else 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, _per_expert(a, dense, counts, grad), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
def test_bf16_against_fp32_oracle(grad):
    """bf16 rows: the decoded tile is rounded to bf16 once, as dequantise-then-mm does; judged against
    the fp32 oracle relative to plain bf16's own error (one more ulp of the largest output: the
    interpreter truncates where a GPU rounds)."""
    counts = ROUTINGS["ragged"]
    q, dense = _weight(len(counts), 48, 64)
    a = torch.randn(sum(counts), 48 if grad else 64).bfloat16()
    got = _run(a, q, counts, grad)
    assert got.dtype == torch.bfloat16
    oracle = _per_expert(a.float(), dense, counts, grad)
    plain = _per_expert(a, dense, counts, grad)  # bf16 weights, bf16 mm
    err, base = (got.float() - oracle).abs().max(), (plain.float() - oracle).abs().max()
    assert err <= 2 * base + BF16_ULP * oracle.abs().max(), (err, base)


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
def test_per_element_scales_ragged_edges_cached_scales(grad, monkeypatch):
    """Tiles wider than the blocksize (scales gathered per element), K and N not multiples of the
    tile (masked steps and columns), the decoded-scale cache (``cache_absmax``), strided rows."""
    monkeypatch.setattr(kx, "_GROUPED_INTERPRET", (16, 64, 64))  # blocksize 32 < 64 in both forms
    counts = [3, 17, 0, 9]
    q, dense = _weight(len(counts), 40, 96, cache=True, seed=1)
    assert q.scales() is not None
    n_in = 40 if grad else 96
    a = torch.randn(n_in, sum(counts)).t()  # non-contiguous
    got = _run(a, q, counts, grad)
    torch.testing.assert_close(got, _per_expert(a, dense, counts, grad), rtol=1e-5, atol=1e-5)


def test_fp16_and_a_row_tile_bound_with_surplus_programs():
    """fp16 rows; every expert a single partial tile, so most of the grid's ceil(M / 16) + E row
    programs are surplus and must leave the output alone (rows past offs[-1] untouched)."""
    counts = [1, 2, 1, 3]
    q, dense = _weight(len(counts), 32, 32, dq=True)
    a = torch.randn(sum(counts) + 2, 32).half()  # two trailing rows no expert owns
    got = op._gmm_nf4_triton(a, q, _offs(counts), False)
    oracle = _per_expert(a[:7].float(), dense, counts, False)
    torch.testing.assert_close(got[:7].float(), oracle, atol=2e-3, rtol=2e-3)


# --------------------------------------------------------------------------------------
# the experts op with the Triton backend forced (the interpreter)
# --------------------------------------------------------------------------------------
@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = kx.nf4_grouped_mm_triton

    def counting(*args, **kwargs):
        calls.append(kwargs.get("grad", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(kx, "nf4_grouped_mm_triton", counting)
    return calls


def test_experts_op_forward_backward_triton_vs_torch(kernel_calls, monkeypatch):
    """The whole block (routing, both weight GEMMs forward, both data-grad GEMMs backward) on the
    Triton grouped GEMM against the same op on the torch path (dequantise, then GEMM), fp32, one tiny
    gpt-oss-like config (transposed weights, biases, its activation): output and the grads of x, the
    routing weights and the biases; an expert with no token."""
    transposed = True
    monkeypatch.setenv("FASTFT_BACKEND", "torch")  # the torch path's dequantisation: no C++ extension load
    E, T, K, H, IN = 4, 7, 2, 32, 32
    q1, _ = _weight(E, 2 * IN, H, transposed=transposed, seed=2)
    q2, _ = _weight(E, H, IN, transposed=transposed, seed=3)
    act = ExpertsActivation("gpt_oss") if transposed else ExpertsActivation("silu")
    x = torch.randn(T, H, requires_grad=True)
    idx = torch.tensor([[0, 2]] * 3 + [[2, 3]] * 3 + [[3, 0]])  # expert 1: no token
    w = torch.rand(T, K).requires_grad_()
    biases = [(torch.randn(E, n) * 0.1).requires_grad_() for n in (2 * IN, H)] if transposed else [None, None]
    leaves = [t for t in (x, w, *biases) if t is not None]
    dout = torch.randn(T, H)
    res = {}
    for backend in ("torch", "triton"):
        out = experts(x, idx, w, q1, q2, *biases, act=act, transposed=transposed, backend=backend)
        res[backend] = [out, *torch.autograd.grad(out, leaves, dout)]
    assert kernel_calls == [False, False, True, True]  # gate_up, down; then dout W2^T, dh W1^T
    for got, want in zip(res["triton"], res["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backend_selection_and_errors(kernel_calls, monkeypatch):
    """``experts_nf4`` is (triton, torch): auto on a CPU is torch (the chunked path, no kernel); a
    forced triton on a weight the kernel cannot read (in_features not a multiple of the blocksize)
    is a ValueError naming it, before any kernel; without the interpreter a BackendUnavailable;
    under ``_wgemm`` such a weight falls back to the torch path."""
    assert backends.registered_ops()[OP_EXPERTS_NF4] == ("triton", "torch")
    assert backends.select(OP_EXPERTS_NF4, "cpu", "auto").backend == "torch"
    monkeypatch.setenv("FASTFT_BACKEND", "torch")  # (the dequantisation's backend: no C++ extension load)
    E, T, H, IN = 2, 3, 32, 16
    q1, _ = _weight(E, 2 * IN, H)
    q2, d2 = _weight(E, H, IN)  # in_features 16 < blocksize 32
    x, idx, w = torch.randn(T, H), torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1)
    experts(x, idx, w, q1, q2)
    assert kernel_calls == []
    with pytest.raises(ValueError, match=r"down_proj: in_features 16 .* blocksize 32"):
        experts(x, idx, w, q1, q2, backend="triton")
    assert kernel_calls == []
    a = torch.randn(5, 16)
    got = op._wgemm(a, q2, torch.tensor([2, 5], dtype=torch.int32), torch.float32, False, gemm="triton")
    torch.testing.assert_close(got, _per_expert(a, d2, [2, 3], False), rtol=1e-5, atol=1e-5)
    assert kernel_calls == []
    with pytest.raises(ValueError, match="multiple of an even blocksize"):
        kx.nf4_grouped_mm_triton(
            a, torch.tensor([2, 5], dtype=torch.int32), q2.weight, q2.absmax, q2.code,
            out_features=32, in_features=16, blocksize=32,
        )  # fmt: skip
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backends.BackendUnavailable, match="CUDA"):
        experts(x, idx, w, q1, q2, backend="triton")


def _launcher(**kw):
    q, _ = _weight(2, 32, 32, dq=False)
    args = dict(a=torch.randn(4, 32), offs=torch.tensor([1, 4], dtype=torch.int32), packed=q.weight.data,
                absmax=q.absmax, code=q.code, out_features=32, in_features=32, blocksize=32)  # fmt: skip
    args.update(kw)
    return kx.nf4_grouped_mm_triton(**args)


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(a=torch.randn(4, 32).double()), TypeError, "a must be float32"),
        (dict(a=torch.randn(4, 16)), ValueError, r"a must be \(rows, 32\)"),
        (dict(offs=torch.tensor([1, 4])), TypeError, "offs must be torch.int32"),
        (dict(offs=torch.tensor([4], dtype=torch.int32)), ValueError, r"offs must have shape \(2,\)"),
        (dict(packed=torch.zeros(2, 511, dtype=torch.uint8)), ValueError, r"packed must have shape \(2, 512\)"),
        (dict(absmax=torch.ones(2, 32).half()), TypeError, "absmax must be torch.float32"),
        (dict(blocksize=0), ValueError, "blocksize must be a positive int"),
        (dict(absmax2=torch.ones(2, 1)), TypeError, "absmax must be torch.uint8"),
        (dict(offs=torch.tensor([3, 1], dtype=torch.int32)), ValueError, "offs must be non-decreasing"),
        (dict(offs=torch.tensor([1, 5], dtype=torch.int32)), ValueError, r"end rows in \[0, 4\]"),
    ],
)
def test_launcher_checks(kw, err, match):
    with pytest.raises(err, match=match):
        _launcher(**kw)


# --------------------------------------------------------------------------------------
# compiled for a GPU: ahead of time here (no GPU needed)
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
from fastft.kernels import experts_nf4 as k

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
fn = k._nf4_grouped_gemm_kernel
SMEM_SM90 = 227 * 1024  # the most shared memory a block may use on sm_90

for a_dt, grad, dq, bs in [("*bf16", False, True, 64), ("*bf16", True, True, 32), ("*fp32", False, True, 64),
                           ("*fp32", True, True, 64)]:
    bm, bn, bk, warps, stages = k._GROUPED_CONFIG[(grad, "fp32" if a_dt == "*fp32" else "16bit")]
    ptrs = dict(a_ptr=a_dt, packed_ptr="*u8", absmax_ptr="*u8" if dq else "*fp32", absmax2_ptr="*fp32",
                code2_ptr="*fp32", offset_ptr="*fp32", code_ptr="*fp32", offs_ptr="*i32", out_ptr=a_dt)
    const = dict(GRAD=grad, EVEN_K=True, EVEN_N=True, ROW_SCALE=bs % (bn if grad else bk) == 0,
                 INPUT_PRECISION="ieee" if a_dt == "*fp32" else None, UPCAST_DOT=False, DQ=dq, BLOCKSIZE2=256,
                 BLOCKSIZE=bs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, E_POW2=128)
    sig = {a: "constexpr" if a in const else ptrs.get(a, "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in ptrs}
    what = (a_dt, "grad" if grad else "fwd", "dq" if dq else "fp32 absmax", bs, (bm, bn, bk, warps, stages))
    try:
        c = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": stages})
    except Exception as exc:
        if "ptxas" in str(exc).lower():
            print("SKIP: no ptxas to assemble with:", exc)
            sys.exit(0)
        raise
    assert c.asm.get("ptx"), what
    assert 0 < c.metadata.shared <= SMEM_SM90, (what, c.metadata.shared)
    if "cubin" in c.asm and os.path.exists(cuobjdump):  # the tile configs must not spill registers
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(c.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        assert "STACK:0 " in usage and "LOCAL:0 " in usage, (what, usage)
        regs = usage.split("REG:")[1].split()[0]
        print(what, "registers", regs, "shared", c.metadata.shared)
print("OK")
"""


def test_grouped_kernel_compiles_for_gpu_without_spills():
    """Compile the grouped GEMM ahead of time for sm_90 at the launcher's GPU tiles (bf16 and fp32,
    both forms, double quantisation; the bf16 gradient form at blocksize 32, scales gathered per
    element, its register-heaviest case): no register spills (cuobjdump), shared memory within
    sm_90's. A fresh process (this one interprets). Four compiles: the file's time budget."""
    run_compile_script(_COMPILE_SCRIPT, timeout=300)


# --------------------------------------------------------------------------------------
# on a real GPU
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(backends.interpreting(), reason="set FASTFT_GPU_TESTS=1 (interpreter off) to run")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_device_against_dequant_then_mm(dtype):
    """Realistic sizes on the device: both forms against dequantise-then-mm per expert, and the
    experts op under auto picking the kernel and agreeing with its torch path."""
    torch.backends.cuda.matmul.allow_tf32 = False
    dev, E, H, IN = "cuda", 8, 1024, 1408
    counts = [700, 0, 1, 333, 64, 1500, 17, 481]
    g = torch.Generator(device=dev).manual_seed(0)
    w1 = (torch.randn(E, 2 * IN, H, device=dev, generator=g) * 0.02).to(dtype)
    q1 = ExpertsWeight4bit.from_weight(w1)
    dense = q1.dequantize(torch.float32)
    rel = lambda a, b: ((a.float() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for grad in (False, True):
        a = torch.randn(sum(counts), 2 * IN if grad else H, device=dev, generator=g).to(dtype)
        got = op._gmm_nf4_triton(a, q1, _offs(counts).to(dev), grad)
        assert rel(got, _per_expert(a.float(), dense, counts, grad)) < tol
    assert backends.select(OP_EXPERTS_NF4, dev).backend == "triton"
    q2 = ExpertsWeight4bit.from_weight((torch.randn(E, H, IN, device=dev, generator=g) * 0.02).to(dtype))
    x = torch.randn(2048, H, device=dev, generator=g).to(dtype).requires_grad_()
    idx = torch.randint(0, E, (2048, 2), device=dev, generator=g)
    w = torch.rand(2048, 2, device=dev, generator=g).to(dtype)
    res = {}
    for backend in ("triton", "torch"):
        out = experts(x, idx, w, q1, q2, backend=backend)
        res[backend] = (out, *torch.autograd.grad(out, x, torch.ones_like(out)))
    for a, b in zip(res["triton"], res["torch"]):
        assert rel(a, b.float()) < tol
    assert op._nf4_gemm_backend(dev, (("w", q1),), dtype, "auto", rows=16 * E) == "triton"
    assert op._nf4_gemm_backend(dev, (("w", q1),), dtype, "auto", rows=4096) == "torch"  # 512 rows per expert


def test_auto_runs_the_kernel_only_for_few_rows_per_expert(monkeypatch):
    """Where the kernel is available (CUDA), "auto" picks it up to NF4_TRITON_MAX_ROWS_PER_EXPERT routed
    rows per expert and dequantise-then-GEMM above; a forced "triton" runs it at any size."""
    q = ExpertsWeight4bit.from_weight(torch.randn(4, 64, 64))
    real = backends.select
    monkeypatch.setattr(op.backends, "select", lambda o, d, b="auto": real(o, d, "triton"))  # as on CUDA
    cap = op.NF4_TRITON_MAX_ROWS_PER_EXPERT * 4
    assert op._nf4_gemm_backend("cpu", (("w", q),), torch.float32, "auto", rows=cap) == "triton"
    assert op._nf4_gemm_backend("cpu", (("w", q),), torch.float32, "auto", rows=cap + 1) == "torch"
    assert op._nf4_gemm_backend("cpu", (("w", q),), torch.float32, "triton", rows=cap + 1) == "triton"
