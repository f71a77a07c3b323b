"""Triton kernels for the rank-``r`` products of :func:`fastft.ops.lora.lora_linear` with dropout fused.

With dropout ``p > 0`` the LoRA branch needs ``x * M`` (``M`` the scaled keep-mask) three
times: in forward for ``x A^T`` and in backward for ``dX += (t A) * M`` and
``dA = t^T (x * M)``. PEFT materialises the dropped copy of ``x`` and its mask; these
kernels never store either: every tile regenerates its part of the mask from the seed
with Triton's Philox counter RNG. One call gives four 32-bit words, used for four consecutive
columns of the ``[N, in]`` input (a quarter of a call per element)::

    w0..w3 = tl.randint4x(seed, row * ceil(in / 4) + col // 4)     (int64 counter)
    u      = uniform float of word (w0, w2, w1, w3)[col % 4]        (fp32 in [0, 1))
    M      = (u >= p) / (1 - p)

so the forward and every backward kernel see the same mask, whatever their tiling. The seed
is a ``(1,)`` int64 tensor read on the device (the op draws it with torch's generator on the
device: no host synchronisation, and a CUDA-graph replay draws a new one); an int is accepted
too (copied to the device).
:func:`dropout_mask_triton` materialises that very mask (tests and the reference use it).

* :func:`lora_xa` ``(x [N, in], A [r, in]) -> (x * M) A^T  [N, r]`` in ``A``'s dtype;
* :func:`lora_dx_add_` ``dx [N, in] += (t [N, r] A [r, in]) * M`` in place;
* :func:`lora_dA` ``(t [N, r], x [N, in]) -> t^T (x * M)  [r, in]`` in ``t``'s dtype,
  the reduction over ``N`` split across programs (fp32 partials summed after) so that
  short-and-wide shapes still fill the GPU.

The masked product is formed in fp32, the ``tl.dot`` operands are in the adapter's dtype
(``A``'s, as the reference casts ``x`` to it; fp32 adapters give fp32 operands, run in
IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` says otherwise, like
``torch.mm``), accumulation is fp32. The big GEMMs of the layer stay with cuBLAS.
No host synchronisation.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backends import BackendUnavailable, interpreting
from ..ledger import record_kernel

__all__ = ["lora_xa", "lora_dx_add_", "lora_dA", "dropout_mask_triton"]

# Tiles, per kernel: (BLOCK_N rows, BLOCK_K in-features, largest BLOCK_R, num_warps). Every
# four elements of an (N, in) tile share one 10-round Philox call; the tiles stay at 8 elements
# per thread; the rank tile is r rounded up to a power of two >= 16 (tl.dot's minimum), capped
# (a larger r loops, or adds programs along r). Picked so that ptxas reports no register
# spills for sm_90 with fp32 and bf16 adapters (not tuned on a GPU yet). fp32 operands run
# tl.dot on FMAs (IEEE, like torch.mm), whose operand tiles live in registers: dA's are smaller.
_CONFIG = {
    "xa": (64, 32, 128, 8),
    "dx": (64, 32, 64, 8),
    "dA": (64, 32, 128, 8),
    "dA_fp32": (16, 64, 64, 8),
}
# The CPU interpreter runs each program in Python: tests reach the multi-tile, ragged-edge,
# multi-rank-block and split paths with small shapes. Tests may change these.
_BLOCK_INTERPRET = 16
_MAX_BLOCK_R_INTERPRET = 16
_MASK_TILE = (16, 128)  # (rows, columns) per program of the mask kernel
_MASK_TILE_INTERPRET = (8, 32)
# dA: at most this many programs split the reduction over rows (each then covers >= 4 row tiles)
_MAX_SPLIT_INTERPRET = 2


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _scaled_keep(seed, rn, k_start, K, p, scale, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The scaled keep-mask of rows ``rn`` (int64, ``(BLOCK_N,)``) and columns
    ``k_start + arange(BLOCK_K)`` (``k_start`` a multiple of 4): ``scale`` where ``u >= p``, else 0.

    One Philox call gives four 32-bit words, used for four consecutive columns: element
    ``(row, col)`` takes word ``col % 4`` of the call at counter ``row * ceil(K / 4) + col // 4``.
    So the RNG work is a quarter of one call per element, and every kernel, whatever its
    tiling, regenerates the same mask."""
    kq = k_start // 4 + tl.arange(0, BLOCK_K // 4)
    counter = rn[:, None] * ((K + 3) // 4) + kq[None, :]  # (BLOCK_N, BLOCK_K // 4) int64
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    # (BLOCK_N, BLOCK_K // 4, 2, 2) -> (BLOCK_N, BLOCK_K): columns 4q..4q+3 take w0, w2, w1, w3
    words = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (BLOCK_N, BLOCK_K))
    u = tl.random.uint_to_uniform_float(words)
    return tl.where(u >= p, scale, 0.0)


@triton.jit
def _dropout_mask_kernel(
    out_ptr,  # (N, K) out: the scaled keep-mask, contiguous, any float dtype
    N,  # rows
    K,  # columns (the mask's row length: in_features)
    seed_ptr,  # (1,) int64 Philox seed, read on the device (a CUDA-graph replay sees a fresh one)
    p,  # dropout probability in [0, 1)
    scale,  # 1 / (1 - p)
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # columns per program (a multiple of 4)
):
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * BLOCK_K
    rk = k_start + tl.arange(0, BLOCK_K)
    m = _scaled_keep(tl.load(seed_ptr), rn, k_start, K, p, scale, BLOCK_N, BLOCK_K)
    ok = (rn[:, None] < N) & (rk[None, :] < K)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], m.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _lora_xa_kernel(
    x_ptr,  # (N, K) input x, any float dtype
    stride_xn,  # elements between rows of x
    stride_xk,  # elements between columns of x
    a_ptr,  # (R, K) lora_A; its dtype is the tl.dot operand dtype
    stride_ar,  # elements between rows of A
    stride_ak,  # elements between columns of A
    out_ptr,  # (N, R) out: (x * M) A^T, in A's dtype
    stride_on,  # elements between rows of out
    stride_or,  # elements between columns of out
    N,  # rows of x
    K,  # in_features (columns of x; the mask's row length)
    R,  # rank
    seed_ptr,  # (1,) int64 Philox seed on the device (read only when HAS_DROPOUT)
    p,  # dropout probability (read only when HAS_DROPOUT)
    scale,  # 1 / (1 - p) (read only when HAS_DROPOUT)
    HAS_DROPOUT: tl.constexpr,  # p > 0: multiply x by the regenerated mask
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision: "ieee"/"tf32" for fp32 operands, else None
    UPCAST_DOT: tl.constexpr,  # run tl.dot on fp32 copies of the (rounded) operands (interpreter + bf16)
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # in_features per loop step
    BLOCK_R: tl.constexpr,  # ranks per program (power of two >= 16)
):
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: row * K overflows int32
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rn < N
    r_ok = rr < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(
            x_ptr + rn[:, None] * stride_xn + rk[None, :] * stride_xk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_DROPOUT:
            x = x * _scaled_keep(tl.load(seed_ptr), rn, k0, K, p, scale, BLOCK_N, BLOCK_K)
        a = tl.load(  # (BLOCK_K, BLOCK_R) = A^T tile
            a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
            mask=k_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        xo = x.to(a.dtype)
        if UPCAST_DOT:
            xo, a = xo.to(tl.float32), a.to(tl.float32)
        acc = tl.dot(xo, a, acc, input_precision=INPUT_PRECISION)
    tl.store(
        out_ptr + rn[:, None] * stride_on + rr[None, :] * stride_or,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & r_ok[None, :],
    )


@triton.jit
def _lora_dx_add_kernel(
    dx_ptr,  # (N, K) in/out: dx += (t A) * M, any float dtype
    stride_dn,  # elements between rows of dx
    stride_dk,  # elements between columns of dx
    t_ptr,  # (N, R) t = s * dY B, any float dtype (cast to A's dtype for tl.dot)
    stride_tn,  # elements between rows of t
    stride_tr,  # elements between columns of t
    a_ptr,  # (R, K) lora_A; its dtype is the tl.dot operand dtype
    stride_ar,  # elements between rows of A
    stride_ak,  # elements between columns of A
    N,  # rows of dx
    K,  # in_features (columns of dx; the mask's row length)
    R,  # rank (the reduction dimension)
    seed_ptr,  # (1,) int64 Philox seed on the device (read only when HAS_DROPOUT)
    p,  # dropout probability (read only when HAS_DROPOUT)
    scale,  # 1 / (1 - p) (read only when HAS_DROPOUT)
    HAS_DROPOUT: tl.constexpr,  # p > 0: multiply t A by the regenerated mask
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision: "ieee"/"tf32" for fp32 operands, else None
    UPCAST_DOT: tl.constexpr,  # run tl.dot on fp32 copies of the (rounded) operands (interpreter + bf16)
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # in_features per program
    BLOCK_R: tl.constexpr,  # ranks per loop step (power of two >= 16)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: row * K overflows int32
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rn < N
    k_ok = rk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        a = tl.load(
            a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
            mask=r_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        t = tl.load(
            t_ptr + rn[:, None] * stride_tn + rr[None, :] * stride_tr,
            mask=row_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        t = t.to(a.dtype)
        if UPCAST_DOT:
            t, a = t.to(tl.float32), a.to(tl.float32)
        acc = tl.dot(t, a, acc, input_precision=INPUT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * _scaled_keep(tl.load(seed_ptr), rn, pid_k * BLOCK_K, K, p, scale, BLOCK_N, BLOCK_K)
    io_mask = row_ok[:, None] & k_ok[None, :]
    d_ptrs = dx_ptr + rn[:, None] * stride_dn + rk[None, :] * stride_dk
    d = tl.load(d_ptrs, mask=io_mask, other=0.0).to(tl.float32)
    tl.store(d_ptrs, (d + acc).to(dx_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _lora_dA_kernel(
    t_ptr,  # (N, R) t = s * dY B; its dtype is the tl.dot operand dtype
    stride_tn,  # elements between rows of t
    stride_tr,  # elements between columns of t
    x_ptr,  # (N, K) input x, any float dtype
    stride_xn,  # elements between rows of x
    stride_xk,  # elements between columns of x
    out_ptr,  # (SPLIT, R, K) out: t^T (x * M) over this program's rows (t's dtype, or fp32 partials)
    stride_os,  # elements between splits of out (unused when the grid has one split)
    stride_or,  # elements between rows of out
    stride_ok,  # elements between columns of out
    N,  # rows of x and t (the reduction dimension)
    K,  # in_features (the mask's row length)
    R,  # rank
    rows_per_split,  # rows each split reduces over (a multiple of BLOCK_N)
    seed_ptr,  # (1,) int64 Philox seed on the device (read only when HAS_DROPOUT)
    p,  # dropout probability (read only when HAS_DROPOUT)
    scale,  # 1 / (1 - p) (read only when HAS_DROPOUT)
    HAS_DROPOUT: tl.constexpr,  # p > 0: multiply x by the regenerated mask
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision: "ieee"/"tf32" for fp32 operands, else None
    UPCAST_DOT: tl.constexpr,  # run tl.dot on fp32 copies of the (rounded) operands (interpreter + bf16)
    BLOCK_N: tl.constexpr,  # rows per loop step
    BLOCK_K: tl.constexpr,  # in_features per program
    BLOCK_R: tl.constexpr,  # ranks per program (power of two >= 16)
):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok = rk < K
    r_ok = rr < R
    start = pid_s.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, N)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)  # int64: row * K overflows int32
        row_ok = rn < end
        t = tl.load(
            t_ptr + rn[:, None] * stride_tn + rr[None, :] * stride_tr,
            mask=row_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        x = tl.load(
            x_ptr + rn[:, None] * stride_xn + rk[None, :] * stride_xk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_DROPOUT:
            x = x * _scaled_keep(tl.load(seed_ptr), rn, pid_k * BLOCK_K, K, p, scale, BLOCK_N, BLOCK_K)
        xo = x.to(t.dtype)
        if UPCAST_DOT:
            t, xo = t.to(tl.float32), xo.to(tl.float32)
        acc = tl.dot(tl.trans(t), xo, acc, input_precision=INPUT_PRECISION)
    tl.store(
        out_ptr + pid_s * stride_os + rr[:, None] * stride_or + rk[None, :] * stride_ok,
        acc.to(out_ptr.dtype.element_ty),
        mask=r_ok[:, None] & k_ok[None, :],
    )


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------
def _check_runnable(device: torch.device, what: str) -> None:
    if device.type != "cuda" and not interpreting():
        raise BackendUnavailable(
            f"{what}: Triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to interpret)"
        )


def _check_float(name: str, t: torch.Tensor, dim: int) -> None:
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got dtype {t.dtype}")


def _check_dropout(seed, p, device=None) -> tuple[torch.Tensor, float, float]:
    """(seed as a (1,) int64 tensor on ``device``, p, 1 / (1 - p)). A seed drawn on the device
    (``torch.randint(0, 2**62, (1,), device=...)``, what the op passes) is used as it is: no host
    round trip, and a CUDA-graph replay draws a new one; an int seed is copied there."""
    if torch.is_tensor(seed):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(
                f"seed must be a (1,) int64 tensor or an int, got {seed.dtype} of shape {tuple(seed.shape)}"
            )
        if device is not None and seed.device.type != torch.device(device).type:
            raise ValueError(f"seed is on {seed.device} but the input is on {device}")
    elif isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63) or a (1,) int64 tensor, got {seed!r}")
    else:
        seed = torch.tensor([seed], dtype=torch.int64, device=device)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise ValueError(f"p must be a number in [0, 1), got {p!r}")
    return seed.reshape(1), float(p), 1.0 / (1.0 - float(p))


def _same_device(ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {ref.device}")


def _input_precision(dtype: torch.dtype) -> str | None:
    """tl.dot precision for ``dtype`` operands: for fp32 what torch.mm uses (IEEE fp32 unless
    TF32 is allowed); None (Triton's default, tensor cores) for 16-bit operands."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot multiplies bf16 operands as raw integers (numpy has no bf16):
    there, run it on fp32 copies of the bf16-rounded operands (same products, fp32 accumulate)."""
    return dtype == torch.bfloat16 and interpreting()


def _config(kernel: str, R: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_R, num_warps) for ``kernel`` at rank ``R``."""
    if interpreting():
        block_n = block_k = _BLOCK_INTERPRET
        max_r, num_warps = _MAX_BLOCK_R_INTERPRET, 4
    else:
        block_n, block_k, max_r, num_warps = _CONFIG[kernel]
    return block_n, block_k, max(16, min(triton.next_power_of_2(R), max_r)), num_warps


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(row_tiles: int, other_programs: int, device: torch.device) -> int:
    """Programs along the rows for dA: enough for ~2 waves, each reducing over >= 4 row tiles."""
    if interpreting() or device.type != "cuda":
        return max(1, min(_MAX_SPLIT_INTERPRET, row_tiles))
    want = triton.cdiv(2 * _sm_count(device.index if device.index is not None else 0), other_programs)
    return max(1, min(want, row_tiles // 4))


def dropout_mask_triton(seed: int, shape, p: float, device, dtype=torch.float32) -> torch.Tensor:
    """The scaled keep-mask (``0`` or ``1/(1-p)``, contiguous ``shape``) the kernels use for ``seed``.

    Element ``(row, col)`` of the ``[N, in]`` view (``[..., in]`` is flattened to it) takes
    word ``col % 4`` of the Philox call at counter ``row * ceil(in / 4) + col // 4``.
    """
    # check
    device = torch.device(device)
    seed, p, scale = _check_dropout(seed, p, device)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,)))
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    _check_runnable(device, "dropout_mask_triton")

    # allocate
    out = torch.empty(shape, device=device, dtype=dtype)
    if out.numel() == 0:
        return out
    K = shape[-1] if shape else 1
    N = out.numel() // K

    # launch
    bn, bk = _MASK_TILE_INTERPRET if interpreting() else _MASK_TILE
    grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    with record_kernel("dropout_mask", (), (out,)) as launch:
        if launch:
            _dropout_mask_kernel[grid](out, N, K, seed, p, scale, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return out


def lora_xa(x2d: torch.Tensor, A: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``(x2d * M) @ A.T`` ``[N, r]`` in ``A``'s dtype, ``M`` the mask of :func:`dropout_mask_triton`.

    ``x2d`` ``[N, in]`` (fp32/bf16/fp16, any strides), ``A`` ``[r, in]``; ``p == 0`` means no mask.
    """
    # check
    _check_float("x2d", x2d, 2)
    _check_float("A", A, 2)
    N, K = x2d.shape
    R = A.shape[0]
    if A.shape[1] != K:
        raise ValueError(f"A shape {tuple(A.shape)} must be [r, in] with in = {K} (x2d shape {tuple(x2d.shape)})")
    _same_device(x2d, A=A)
    seed, p, scale = _check_dropout(seed, p, x2d.device)
    _check_runnable(x2d.device, "lora_xa")

    # allocate
    out = torch.empty((N, R), device=x2d.device, dtype=A.dtype)
    if N == 0 or R == 0:
        return out
    if K == 0:
        return out.zero_()

    # launch
    block_n, block_k, block_r, num_warps = _config("xa", R)
    grid = (triton.cdiv(N, block_n), triton.cdiv(R, block_r))
    with record_kernel("lora_xa", (x2d, A), (out,)) as launch:
        if launch:
            _lora_xa_kernel[grid](
                x2d,
                x2d.stride(0),
                x2d.stride(1),
                A,
                A.stride(0),
                A.stride(1),
                out,
                out.stride(0),
                out.stride(1),
                N,
                K,
                R,
                seed,
                p,
                scale,
                HAS_DROPOUT=p > 0.0,
                INPUT_PRECISION=_input_precision(A.dtype),
                UPCAST_DOT=_upcast_dot(A.dtype),
                BLOCK_N=block_n,
                BLOCK_K=block_k,
                BLOCK_R=block_r,
                num_warps=num_warps,
            )
    return out


def lora_dx_add_(dx: torch.Tensor, t: torch.Tensor, A: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``dx += (t @ A) * M`` in place (computed in fp32, stored in ``dx``'s dtype); returns ``dx``.

    ``dx`` ``[N, in]``, ``t`` ``[N, r]``, ``A`` ``[r, in]``; ``M`` the mask of
    :func:`dropout_mask_triton` for an ``[N, in]`` input; ``p == 0`` means no mask.
    """
    # check
    _check_float("dx", dx, 2)
    _check_float("t", t, 2)
    _check_float("A", A, 2)
    N, K = dx.shape
    R = A.shape[0]
    if A.shape[1] != K:
        raise ValueError(f"A shape {tuple(A.shape)} must be [r, in] with in = {K} (dx shape {tuple(dx.shape)})")
    if tuple(t.shape) != (N, R):
        raise ValueError(f"t shape {tuple(t.shape)} must be [N, r] = [{N}, {R}]")
    _same_device(dx, t=t, A=A)
    seed, p, scale = _check_dropout(seed, p, dx.device)
    _check_runnable(dx.device, "lora_dx_add_")

    # allocate (nothing: in place)
    if N == 0 or K == 0 or R == 0:
        return dx

    # launch
    block_n, block_k, block_r, num_warps = _config("dx", R)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    with record_kernel("lora_dx_add_", (dx, t, A), (dx,)) as launch:
        if launch:
            _lora_dx_add_kernel[grid](
                dx,
                dx.stride(0),
                dx.stride(1),
                t,
                t.stride(0),
                t.stride(1),
                A,
                A.stride(0),
                A.stride(1),
                N,
                K,
                R,
                seed,
                p,
                scale,
                HAS_DROPOUT=p > 0.0,
                INPUT_PRECISION=_input_precision(A.dtype),
                UPCAST_DOT=_upcast_dot(A.dtype),
                BLOCK_N=block_n,
                BLOCK_K=block_k,
                BLOCK_R=block_r,
                num_warps=num_warps,
            )
    return dx


def lora_dA(t: torch.Tensor, x2d: torch.Tensor, seed: int, p: float, *, out_dtype=None) -> torch.Tensor:
    """``t.T @ (x2d * M)`` ``[r, in]`` in ``out_dtype`` (default ``t``'s: the branch's), accumulated in fp32.

    ``t`` ``[N, r]``, ``x2d`` ``[N, in]``; ``M`` the mask of :func:`dropout_mask_triton`;
    ``p == 0`` means no mask. ``out_dtype=torch.float32`` gives fp32 gradients of fp32 adapters
    from a 16-bit branch without rounding them to 16 bits first.
    """
    # check
    _check_float("t", t, 2)
    _check_float("x2d", x2d, 2)
    N, K = x2d.shape
    R = t.shape[1]
    if t.shape[0] != N:
        raise ValueError(f"t shape {tuple(t.shape)} must be [N, r] with N = {N} (x2d shape {tuple(x2d.shape)})")
    _same_device(x2d, t=t)
    seed, p, scale = _check_dropout(seed, p, x2d.device)
    _check_runnable(x2d.device, "lora_dA")
    out_dtype = t.dtype if out_dtype is None else out_dtype
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")

    # allocate
    if N == 0 or K == 0 or R == 0:
        return torch.zeros((R, K), device=x2d.device, dtype=out_dtype)
    block_n, block_k, block_r, num_warps = _config("dA_fp32" if t.dtype == torch.float32 else "dA", R)
    k_tiles, r_tiles, row_tiles = triton.cdiv(K, block_k), triton.cdiv(R, block_r), triton.cdiv(N, block_n)
    split = _splits(row_tiles, k_tiles * r_tiles, x2d.device)
    rows_per_split = triton.cdiv(row_tiles, split) * block_n
    split = triton.cdiv(N, rows_per_split)  # no empty split
    if split == 1:
        out = torch.empty((1, R, K), device=x2d.device, dtype=out_dtype)
    else:  # fp32 partials, summed below
        out = torch.empty((split, R, K), device=x2d.device, dtype=torch.float32)

    # launch
    with record_kernel("lora_dA", (t, x2d), (out,)) as launch:
        if launch:
            _lora_dA_kernel[(k_tiles, split, r_tiles)](
                t,
                t.stride(0),
                t.stride(1),
                x2d,
                x2d.stride(0),
                x2d.stride(1),
                out,
                out.stride(0),
                out.stride(1),
                out.stride(2),
                N,
                K,
                R,
                rows_per_split,
                seed,
                p,
                scale,
                HAS_DROPOUT=p > 0.0,
                INPUT_PRECISION=_input_precision(t.dtype),
                UPCAST_DOT=_upcast_dot(t.dtype),
                BLOCK_N=block_n,
                BLOCK_K=block_k,
                BLOCK_R=block_r,
                num_warps=num_warps,
            )
    return out[0] if split == 1 else out.sum(0).to(out_dtype)
