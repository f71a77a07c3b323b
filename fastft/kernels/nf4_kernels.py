"""The Triton programs (``@triton.jit``) behind :mod:`fastft.kernels.nf4`: NF4 dequantisation,
the dequant-GEMM (with its split-K reduction) and the GEMV, plus the scale / tile decoding
helpers they share.

The layout they read, the algorithms and the tile choices are described in
:mod:`fastft.kernels.nf4`, whose launchers check, allocate and launch them; they are re-exported
there. Moved out of that module, unchanged.
"""

from __future__ import annotations

import triton
import triton.language as tl


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _load_scale(
    absmax_ptr,  # fp32 scales, or (DQ) uint8 indices into code2
    absmax2_ptr,  # (DQ) fp32 second-level scales, one per BLOCKSIZE2 blocks
    code2_ptr,  # (DQ) fp32 [256] second-level code
    offset_ptr,  # (DQ) fp32 [1] mean subtracted before the second quantisation
    idx,  # int64 block indices, any shape
    mask,  # which idx are real (the rest give 0)
    DQ: tl.constexpr,  # the absmax is double-quantised: decode it here
    BLOCKSIZE2: tl.constexpr,  # blocks per second-level scale
):
    """The fp32 scale of quantisation block ``idx``: ``absmax[idx]``, or decoded in-kernel
    ``code2[absmax[idx]] * absmax2[idx // BLOCKSIZE2] + offset`` (0 where masked)."""
    if DQ:
        q = tl.load(absmax_ptr + idx, mask=mask, other=0).to(tl.int32)
        prod = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + idx // BLOCKSIZE2, mask=mask, other=0.0)
        return tl.where(mask, prod + tl.load(offset_ptr), 0.0)
    else:
        return tl.load(absmax_ptr + idx, mask=mask, other=0.0)


@triton.jit
def _dequant_kernel(
    packed_ptr,  # (ceil(numel / 2),) uint8: element 2i in the high nibble of byte i, 2i + 1 in the low
    absmax_ptr,  # (ceil(numel / BLOCKSIZE),) fp32 scale per quantisation block (DQ: uint8 indices)
    absmax2_ptr,  # (DQ) fp32 second-level scales
    code2_ptr,  # (DQ) fp32 [256] second-level code
    offset_ptr,  # (DQ) fp32 [1] offset
    code_ptr,  # (16,) fp32 NF4 table
    out_ptr,  # (numel,) out: code[nib] * absmax, fp32/bf16/fp16
    numel,  # number of weight elements
    nbytes,  # ceil(numel / 2)
    DQ: tl.constexpr,  # double-quantised absmax, decoded here
    BLOCKSIZE2: tl.constexpr,  # blocks per second-level scale
    BLOCKSIZE: tl.constexpr,  # elements per quantisation block (even: both nibbles of a byte share it)
    BLOCK: tl.constexpr,  # bytes per program (power of two)
):
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: 2 * byte overflows int32
    byte_ok = byte < nbytes
    b = tl.load(packed_ptr + byte, mask=byte_ok, other=0)
    hi = (b >> 4).to(tl.int32)
    lo = (b & 0xF).to(tl.int32)
    scale = _load_scale(
        absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, (2 * byte) // BLOCKSIZE, byte_ok, DQ, BLOCKSIZE2
    )
    w_hi = tl.load(code_ptr + hi) * scale
    w_lo = tl.load(code_ptr + lo) * scale
    w = tl.interleave(w_hi, w_lo)  # (2 * BLOCK,): element 2i then 2i + 1
    offs = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=offs < numel)


@triton.jit
def _decode_tile(
    packed_ptr,  # uint8 bytes of W viewed as (N, K / 2)
    absmax_ptr,  # fp32 scales viewed as (N, K / BLOCKSIZE) (DQ: uint8 indices)
    absmax2_ptr,  # (DQ) fp32 second-level scales
    code2_ptr,  # (DQ) fp32 [256] second-level code
    offset_ptr,  # (DQ) fp32 [1] offset
    code_ptr,  # (16,) fp32 NF4 table
    rn,  # (BLOCK_N,) int64 output columns (rows of W)
    n_ok,  # (BLOCK_N,) rn < N
    k0,  # first k of the tile (a multiple of BLOCK_K)
    K,  # in_features (even)
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    ROW_SCALE: tl.constexpr,  # BLOCKSIZE % BLOCK_K == 0: one scale per row covers the tile
    DQ: tl.constexpr,  # double-quantised absmax, decoded here
    BLOCKSIZE2: tl.constexpr,  # blocks per second-level scale
    BLOCKSIZE: tl.constexpr,  # elements per quantisation block (divides K)
    BLOCK_K: tl.constexpr,  # weights per row of the tile
):
    """The tile ``W[rn, k0 : k0 + BLOCK_K]`` decoded in fp32 as (high, low) nibble halves, each
    ``(BLOCK_N, BLOCK_K / 2)``: ``high[:, j]`` is column ``k0 + 2j``, ``low[:, j]`` column ``k0 + 2j + 1``.
    Masked-out weights are 0."""
    rb = tl.arange(0, BLOCK_K // 2)
    kb = k0 // 2 + rb  # byte column
    if EVEN_K:
        mask = n_ok[:, None]
    else:
        mask = n_ok[:, None] & (kb < K // 2)[None, :]
    b = tl.load(packed_ptr + rn[:, None] * (K // 2) + kb[None, :], mask=mask, other=0)
    hi = (b >> 4).to(tl.int32)
    lo = (b & 0xF).to(tl.int32)
    if ROW_SCALE:
        scale = _load_scale(
            absmax_ptr,
            absmax2_ptr,
            code2_ptr,
            offset_ptr,
            rn * (K // BLOCKSIZE) + k0 // BLOCKSIZE,
            n_ok,
            DQ,
            BLOCKSIZE2,
        )[:, None]
    else:
        scale = _load_scale(
            absmax_ptr,
            absmax2_ptr,
            code2_ptr,
            offset_ptr,
            rn[:, None] * (K // BLOCKSIZE) + (2 * kb[None, :]) // BLOCKSIZE,
            mask,
            DQ,
            BLOCKSIZE2,
        )
    w_hi = tl.load(code_ptr + hi) * scale
    w_lo = tl.load(code_ptr + lo) * scale
    return w_hi, w_lo


@triton.jit
def _decode_tile_interleaved(
    packed_ptr,  # uint8 bytes of W viewed as (N, K / 2)
    absmax_ptr,  # fp32 scales viewed as (N, K / BLOCKSIZE) (DQ: uint8 indices)
    absmax2_ptr,  # (DQ) fp32 second-level scales
    code2_ptr,  # (DQ) fp32 [256] second-level code
    offset_ptr,  # (DQ) fp32 [1] offset
    code_ptr,  # (16,) fp32 NF4 table
    rn,  # (BLOCK_N,) int64 output columns (rows of W)
    n_ok,  # (BLOCK_N,) rn < N
    k0,  # first k of the tile (a multiple of BLOCK_K)
    K,  # in_features (even)
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    ROW_SCALE: tl.constexpr,  # BLOCKSIZE % BLOCK_K == 0: one scale per row covers the tile
    DQ: tl.constexpr,  # double-quantised absmax, decoded here
    BLOCKSIZE2: tl.constexpr,  # blocks per second-level scale
    BLOCKSIZE: tl.constexpr,  # elements per quantisation block (divides K)
    BLOCK_K: tl.constexpr,  # weights per row of the tile
):
    """The tile ``W[rn, k0 : k0 + BLOCK_K]`` decoded in fp32, ``(BLOCK_N, BLOCK_K)`` in column
    order: the same values as :func:`_decode_tile`'s halves interleaved. The nibble indices are
    interleaved (not the decoded weights), so that the tile fed to ``tl.dot`` comes from a gather
    rather than a join + reshape: Triton 3.6 turns join + reshape + trans + dot into an illegal
    shared-memory layout ("Illegal shared layout ... collapsed shapePerCTA") for 16-bit tiles."""
    rb = tl.arange(0, BLOCK_K // 2)
    kb = k0 // 2 + rb  # byte column
    if EVEN_K:
        mask = n_ok[:, None]
    else:
        mask = n_ok[:, None] & (kb < K // 2)[None, :]
    b = tl.load(packed_ptr + rn[:, None] * (K // 2) + kb[None, :], mask=mask, other=0)
    nib = tl.interleave(b >> 4, b & 0xF).to(tl.int32)  # (BLOCK_N, BLOCK_K): column k0 + 2j high, k0 + 2j + 1 low
    if ROW_SCALE:
        scale = _load_scale(
            absmax_ptr,
            absmax2_ptr,
            code2_ptr,
            offset_ptr,
            rn * (K // BLOCKSIZE) + k0 // BLOCKSIZE,
            n_ok,
            DQ,
            BLOCKSIZE2,
        )[:, None]
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            kmask = n_ok[:, None]
        else:
            kmask = n_ok[:, None] & (rk < K)[None, :]
        scale = _load_scale(
            absmax_ptr,
            absmax2_ptr,
            code2_ptr,
            offset_ptr,
            rn[:, None] * (K // BLOCKSIZE) + rk[None, :] // BLOCKSIZE,
            kmask,
            DQ,
            BLOCKSIZE2,
        )
    return tl.load(code_ptr + nib) * scale


@triton.jit
def _nf4_gemm_kernel(
    x_ptr,  # (M, K) input, fp32/bf16/fp16; its dtype is the tl.dot operand dtype
    stride_xm,  # elements between rows of x
    stride_xk,  # elements between columns of x
    packed_ptr,  # (N * K / 2,) uint8 NF4 nibbles of W (N, K), row-major, high nibble first
    absmax_ptr,  # (N * K / BLOCKSIZE,) fp32 scale per quantisation block (DQ: uint8 indices)
    absmax2_ptr,  # (DQ) fp32 second-level scales
    code2_ptr,  # (DQ) fp32 [256] second-level code
    offset_ptr,  # (DQ) fp32 [1] offset
    code_ptr,  # (16,) fp32 NF4 table
    bias_ptr,  # (N,) bias, any float dtype (read only when HAS_BIAS)
    out_ptr,  # (M, N) out: x @ W^T (+ bias), in x's dtype; SPLIT_K > 1: (SPLIT_K, M, N) fp32 partial sums
    stride_om,  # elements between rows of out
    stride_on,  # elements between columns of out
    M,  # rows of x
    N,  # out_features (rows of W)
    K,  # in_features (columns of x and W; a multiple of BLOCKSIZE)
    K_PER,  # in_features per split (a multiple of BLOCK_K; K when SPLIT_K == 1)
    HAS_BIAS: tl.constexpr,  # add bias (SPLIT_K == 1 only: the reduction adds it otherwise)
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    ROW_SCALE: tl.constexpr,  # BLOCKSIZE % BLOCK_K == 0: one scale per row and tile
    SPLIT_K: tl.constexpr,  # programs along K (grid axis 2); > 1 writes fp32 partials for _splitk_reduce_kernel
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision: "ieee"/"tf32" for fp32 operands, else None
    UPCAST_DOT: tl.constexpr,  # run tl.dot on fp32 copies of the (rounded) operands (interpreter + bf16)
    DQ: tl.constexpr,  # double-quantised absmax, decoded in-kernel per block
    BLOCKSIZE2: tl.constexpr,  # blocks per second-level scale
    BLOCKSIZE: tl.constexpr,  # elements per quantisation block
    BLOCK_M: tl.constexpr,  # rows of x per program
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # in_features per loop step (even, >= 16)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: row * stride overflows int32
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: n * K overflows int32
    m_ok = rm < M
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            x_mask = m_ok[:, None]
        else:
            x_mask = m_ok[:, None] & (k0 + rk < K)[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk, mask=x_mask, other=0.0)
        w = _decode_tile_interleaved(
            packed_ptr,
            absmax_ptr,
            absmax2_ptr,
            code2_ptr,
            offset_ptr,
            code_ptr,
            rn,
            n_ok,
            k0,
            K,
            EVEN_K,
            ROW_SCALE,
            DQ,
            BLOCKSIZE2,
            BLOCKSIZE,
            BLOCK_K,
        ).to(x.dtype)  # (BLOCK_N, BLOCK_K), rounded once
        wt = tl.trans(w)
        if UPCAST_DOT:
            x, wt = x.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(x, wt, acc, input_precision=INPUT_PRECISION)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )
    else:  # fp32 partial sum of this K range: workspace (SPLIT_K, M, N), contiguous
        tl.store(
            out_ptr + pid_k.to(tl.int64) * M * N + rm[:, None] * N + rn[None, :],
            acc,
            mask=m_ok[:, None] & n_ok[None, :],
        )


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr,  # (SPLIT_K, M * N) fp32 partial sums
    bias_ptr,  # (N,) bias, any float dtype (read only when HAS_BIAS)
    out_ptr,  # (M, N) out, contiguous, in x's dtype
    MN,  # M * N
    N,  # out_features
    HAS_BIAS: tl.constexpr,  # add bias
    SPLIT_K: tl.constexpr,  # partial sums per output
    BLOCK: tl.constexpr,  # outputs per program
):
    """``out = sum_s ws[s] (+ bias)``, summed in fp32 in a fixed order (deterministic), rounded once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _nf4_gemv_kernel(
    x_ptr,  # (M, K) input, fp32/bf16/fp16 (upcast to fp32)
    stride_xm,  # elements between rows of x
    stride_xk,  # elements between columns of x
    packed_ptr,  # (N * K / 2,) uint8 NF4 nibbles of W (N, K), row-major, high nibble first
    absmax_ptr,  # (N * K / BLOCKSIZE,) fp32 scale per quantisation block (DQ: uint8 indices)
    absmax2_ptr,  # (DQ) fp32 second-level scales
    code2_ptr,  # (DQ) fp32 [256] second-level code
    offset_ptr,  # (DQ) fp32 [1] offset
    code_ptr,  # (16,) fp32 NF4 table
    bias_ptr,  # (N,) bias, any float dtype (read only when HAS_BIAS)
    out_ptr,  # (M, N) out: x @ W^T (+ bias), in x's dtype
    stride_om,  # elements between rows of out
    stride_on,  # elements between columns of out
    M,  # rows of x (<= BLOCK_M)
    N,  # out_features (rows of W)
    K,  # in_features (columns of x and W; a multiple of BLOCKSIZE)
    HAS_BIAS: tl.constexpr,  # add bias
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    ROW_SCALE: tl.constexpr,  # BLOCKSIZE % BLOCK_K == 0: one scale per row and tile
    ROUND_W: tl.constexpr,  # round decoded weights to x's dtype first (as dequantise-then-matmul does)
    DQ: tl.constexpr,  # double-quantised absmax, decoded in-kernel per block
    BLOCKSIZE2: tl.constexpr,  # blocks per second-level scale
    BLOCKSIZE: tl.constexpr,  # elements per quantisation block
    BLOCK_M: tl.constexpr,  # M rounded up to a power of two (<= 8): all rows in one program
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # in_features per loop step (even)
):
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: n * K overflows int32
    m_ok = rm < M
    n_ok = rn < N
    rb = tl.arange(0, BLOCK_K // 2)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_even = k0 + 2 * rb  # the columns of the high nibbles; +1 for the low ones
        if EVEN_K:
            x_mask = m_ok[:, None]
        else:
            x_mask = m_ok[:, None] & (k_even < K)[None, :]
        x_hi = tl.load(x_rows + k_even[None, :] * stride_xk, mask=x_mask, other=0.0)
        x_lo = tl.load(x_rows + (k_even + 1)[None, :] * stride_xk, mask=x_mask, other=0.0)
        w_hi, w_lo = _decode_tile(
            packed_ptr,
            absmax_ptr,
            absmax2_ptr,
            code2_ptr,
            offset_ptr,
            code_ptr,
            rn,
            n_ok,
            k0,
            K,
            EVEN_K,
            ROW_SCALE,
            DQ,
            BLOCKSIZE2,
            BLOCKSIZE,
            BLOCK_K,
        )
        if ROUND_W:
            w_hi = w_hi.to(x_ptr.dtype.element_ty).to(tl.float32)
            w_lo = w_lo.to(x_ptr.dtype.element_ty).to(tl.float32)
        acc += x_hi.to(tl.float32)[:, None, :] * w_hi[None, :, :]
        acc += x_lo.to(tl.float32)[:, None, :] * w_lo[None, :, :]
    y = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
        y.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )
