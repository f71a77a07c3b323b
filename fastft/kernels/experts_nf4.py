"""A Triton grouped GEMM over 4-bit NF4 expert weights, dequantising each weight tile in the kernel.

The rows of ``a`` are sorted by expert: expert ``e`` owns rows ``offs[e-1] .. offs[e] - 1``
(``offs`` int32 ``[E]``, the cumulative end offsets ``torch._grouped_mm`` takes, on the device).
Expert ``e``'s weight ``W_e [out, in]`` is stored as :mod:`fastft.ops.experts_nf4` stacks it: row
``e`` of ``packed`` (uint8 ``[E, out*in/2]``) holds bitsandbytes' packed nibbles of ``W_e``
flattened row-major (high nibble first), row ``e`` of ``absmax`` its block scales (fp32, or uint8
indices into ``code2`` with that expert's ``absmax2[e]`` / ``offset[e]``: double quantisation).
Two forms, both with fp32 accumulation and the result in ``a``'s dtype:

* forward (``grad=False``): ``y[rows of e] = a[rows of e] @ W_e^T``, ``a (M, in) -> (M, out)``;
* data gradient (``grad=True``): ``y[rows of e] = a[rows of e] @ W_e``, ``a (M, out) -> (M, in)``.

(gpt-oss' ``transposed`` experts store the same ``[out, in]`` slices, so the kernel never sees
that flag: only which of the two products the experts op wants.)

Program -> work, with no host synchronisation: grid axis 0 is a bound on the number of
``BLOCK_M``-row tiles that is known on the host, ``ceil(M / BLOCK_M) + E`` (each expert's last tile
may be partial, so ``sum_e ceil(m_e / BLOCK_M) < M / BLOCK_M + E``), axis 1 the ``BLOCK_N``-column
tiles of the output. Every program loads the ``E`` offsets (one ``[E]`` vector, a few hundred bytes
that stay in L1/L2), forms each expert's tile count and their inclusive prefix sum with
``tl.cumsum``, and takes as its expert the number of prefix sums ``<=`` its tile id: tile ``t``
belongs to the first expert whose prefix sum exceeds ``t``, and is that expert's
``t - (its first tile)``-th. Experts with no rows own no tile; programs past the last tile return
at once (at most ``E`` of them per column tile). No tile table is built by extra launches.

Each loop step of a program loads a ``[BLOCK_M, BLOCK_K]`` tile of ``a`` and decodes the
matching weight tile from its packed bytes with :func:`fastft.kernels.nf4_kernels.
_decode_tile_interleaved` (the dense NF4 GEMM's decoder, scales through ``_load_scale``, double
quantisation decoded per block in-kernel), rounds it once to ``a``'s dtype (as dequantise-then-GEMM
does) and feeds ``tl.dot``. In the forward form the weight tile is ``W_e[n tile, k tile]`` (the
dense kernel's, transposed into the dot); in the gradient form it is ``W_e[k tile, n tile]``, the
same decoder with the roles of rows and columns exchanged (its "columns" are the output columns
``in``, its rows the reduction rows ``out``), so it feeds ``tl.dot`` untransposed. Both need every
quantisation block inside one row of ``W_e`` (``in % blocksize == 0``, true of every real model's
experts), so the scale of ``(n, k)`` is ``absmax[e, n * in / blocksize + k // blocksize]``: one per
tile row where the blocksize is a multiple of the tile's width, else gathered per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4 import _FLOATS, _check_runnable, _input_precision, _launch, _upcast_dot
from .nf4_kernels import _decode_tile_interleaved

__all__ = ["nf4_grouped_mm_triton", "grouped_tiles"]


@triton.jit
def _expert_of_tile(
    offs_ptr,  # int32 [E] cumulative end row of each expert
    tile,  # this program's row-tile id
    E,  # experts
    BLOCK_M: tl.constexpr,  # rows per tile
    E_POW2: tl.constexpr,  # E rounded up to a power of two
):
    """``(e, row0, row_end)``: the expert that row tile ``tile`` belongs to (``e >= E`` for a tile
    past the last: the program has nothing to do), the tile's first row and its expert's end row."""
    ie = tl.arange(0, E_POW2)
    ok = ie < E
    ends = tl.load(offs_ptr + ie, mask=ok, other=0)
    starts = tl.load(offs_ptr + ie - 1, mask=ok & (ie > 0), other=0)
    tiles = tl.where(ok, tl.maximum(ends - starts, 0) + BLOCK_M - 1, 0) // BLOCK_M
    cum = tl.cumsum(tiles, axis=0)  # inclusive: the end tile of each expert
    e = tl.sum((cum <= tile).to(tl.int32), axis=0)
    mine = ie == e
    first = tl.sum(tl.where(mine, cum - tiles, 0), axis=0)
    row0 = tl.sum(tl.where(mine, starts, 0), axis=0) + (tile - first) * BLOCK_M
    row_end = tl.sum(tl.where(mine, ends, 0), axis=0)
    return e, row0, row_end


@triton.jit
def _nf4_grouped_gemm_kernel(
    a_ptr,  # (M, K) rows sorted by expert, fp32/bf16/fp16: the tl.dot operand dtype
    stride_am,  # elements between rows of a
    stride_ak,  # elements between columns of a
    packed_ptr,  # uint8 [E, out*in/2]: expert e's W_e (out, in) nibbles, row-major, high nibble first
    absmax_ptr,  # [E, nblocks] fp32 scales (DQ: uint8 indices into code2)
    absmax2_ptr,  # (DQ) fp32 [E, nblocks2] second-level scales
    code2_ptr,  # (DQ) fp32 [256] second-level code
    offset_ptr,  # (DQ) fp32 [E] offsets
    code_ptr,  # (16,) fp32 NF4 table
    offs_ptr,  # int32 [E] cumulative end row of each expert
    out_ptr,  # (M, N) out, in a's dtype
    stride_om,  # elements between rows of out
    stride_on,  # elements between columns of out
    E,  # experts
    N,  # output columns: out (forward) or in (GRAD)
    K,  # reduction: in (forward) or out (GRAD)
    W_IN,  # in: the row length of W_e (a multiple of BLOCKSIZE)
    stride_pe,  # bytes between experts of packed
    stride_se,  # elements between experts of absmax
    stride_s2e,  # (DQ) elements between experts of absmax2
    GRAD: tl.constexpr,  # a @ W_e (data gradient) instead of a @ W_e^T
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0 (GRAD: no mask along the decoded tile's columns)
    ROW_SCALE: tl.constexpr,  # BLOCKSIZE is a multiple of the decoded tile's width: one scale per row
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision: "ieee"/"tf32" for fp32 operands, else None
    UPCAST_DOT: tl.constexpr,  # tl.dot on fp32 copies of the (rounded) operands (interpreter + bf16)
    DQ: tl.constexpr,  # double-quantised absmax, decoded in-kernel per block
    BLOCKSIZE2: tl.constexpr,  # blocks per second-level scale
    BLOCKSIZE: tl.constexpr,  # elements per quantisation block
    BLOCK_M: tl.constexpr,  # rows per tile (all of one expert)
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # reduction per loop step (even, >= 16)
    E_POW2: tl.constexpr,  # E rounded up to a power of two
):
    e, row0, row_end = _expert_of_tile(offs_ptr, tl.program_id(0), E, BLOCK_M, E_POW2)
    if e >= E:  # past the last row tile
        return
    e64 = e.to(tl.int64)
    packed_ptr += e64 * stride_pe
    absmax_ptr += e64 * stride_se
    if DQ:
        absmax2_ptr += e64 * stride_s2e
        offset_ptr += e64
    rm = row0.to(tl.int64) + tl.arange(0, BLOCK_M)  # int64: row * stride overflows int32
    m_ok = rm < row_end
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a_mask = m_ok[:, None]
        else:
            a_mask = m_ok[:, None] & (k0 + rk < K)[None, :]
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + rk)[None, :] * stride_ak, mask=a_mask, other=0.0)
        if GRAD:  # W_e[k0 : k0 + BLOCK_K, n tile]: rows k of W_e, columns n (BLOCK_N wide)
            rows = k0 + rk.to(tl.int64)
            w = _decode_tile_interleaved(
                packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                rows, rows < K, tl.program_id(1) * BLOCK_N, W_IN,
                EVEN_N, ROW_SCALE, DQ, BLOCKSIZE2, BLOCKSIZE, BLOCK_N,
            ).to(a.dtype)  # (BLOCK_K, BLOCK_N), rounded once  # fmt: skip
        else:  # W_e[n tile, k0 : k0 + BLOCK_K], transposed into the dot
            w = tl.trans(
                _decode_tile_interleaved(
                    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                    rn, n_ok, k0, W_IN,
                    EVEN_K, ROW_SCALE, DQ, BLOCKSIZE2, BLOCKSIZE, BLOCK_K,
                ).to(a.dtype)
            )  # (BLOCK_K, BLOCK_N)  # fmt: skip
        if UPCAST_DOT:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


# --------------------------------------------------------------------------------------
# tiles and launcher
# --------------------------------------------------------------------------------------
# GPU tiles: (grad, 16-bit or fp32) -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The
# rows of a tile are one expert's, so BLOCK_M bounds the padding of each expert's last tile (64:
# at most 63 wasted rows per expert and column tile). 16-bit operands run wgmma with an fp32
# accumulator; the decoded weight tile lives in registers before shared memory, which is what
# limits the K step (BLOCK_K 32 divides every bitsandbytes blocksize, so the forward form reads
# one scale per weight row and step). The gradient form's decoded tile is BLOCK_K rows of
# BLOCK_N columns: BLOCK_N 64 keeps one scale per tile row for blocksizes >= 64 (bitsandbytes'
# default; 32 gathers them per element). fp32 (IEEE) tl.dot runs on FMAs from registers: the
# dense kernel's 64 x 64 x 16. Checked with ptxas for sm_90 (tests/test_experts_nf4_triton.py),
# not timed on a GPU yet.
_GROUPED_CONFIG = {
    (False, "16bit"): (64, 128, 32, 8, 3),
    (True, "16bit"): (64, 64, 32, 8, 3),
    (False, "fp32"): (64, 64, 16, 8, 2),
    (True, "fp32"): (64, 64, 16, 8, 2),
}
# The CPU interpreter runs each program in Python: small tiles, so that tests reach several row
# tiles per expert, several column tiles and loop steps with small shapes. Tests may change it.
_GROUPED_INTERPRET = (16, 16, 32)  # BLOCK_M, BLOCK_N, BLOCK_K


def grouped_tiles(grad: bool, dtype: torch.dtype, interpret: bool) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` of :func:`nf4_grouped_mm_triton`."""
    if interpret:
        return (*_GROUPED_INTERPRET, 4, 1)
    return _GROUPED_CONFIG[(bool(grad), "fp32" if dtype == torch.float32 else "16bit")]


def _check_tensor(name, t, dtype, shape, device) -> None:
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got dtype {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but a is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def nf4_grouped_mm_triton(
    a: torch.Tensor,
    offs: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    *,
    out_features: int,
    in_features: int,
    blocksize: int,
    grad: bool = False,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize2: int = 256,
) -> torch.Tensor:
    """The grouped GEMM of expert-sorted rows ``a`` with their NF4 experts, in ``a``'s dtype.

    ``grad=False``: ``a (M, in) -> (M, out)``, each expert's rows times ``W_e^T``; ``grad=True``:
    ``a (M, out) -> (M, in)``, times ``W_e``. ``offs`` int32 ``[E]``: the end row of each expert
    (non-decreasing, the last ``<= M``; rows past it are left unwritten; checked on CPU tensors only),
    on ``a``'s device.
    ``packed`` uint8 ``[E, out*in/2]``, ``absmax`` ``[E, out*in/blocksize]`` fp32, or uint8 with
    ``absmax2`` fp32 ``[E, ceil(nblocks / blocksize2)]``, ``code2`` fp32 ``[256]``, ``offset`` fp32
    ``[E]`` (double quantisation); ``code`` fp32 ``[16]``; ``in_features % blocksize == 0``.
    ``a`` fp32/bf16/fp16, any strides. One launch, no host synchronisation."""
    # check
    if not torch.is_tensor(a):
        raise TypeError(f"a must be a tensor, got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise TypeError(f"a must be float32, bfloat16 or float16, got dtype {a.dtype}")
    for name, v in (("out_features", out_features), ("in_features", in_features), ("blocksize", blocksize)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if blocksize % 2 or in_features % blocksize:
        raise ValueError(
            f"in_features = {in_features} must be a multiple of an even blocksize (got {blocksize}): "
            "the kernel reads quantisation blocks that lie within the rows of each expert's weight"
        )
    n_out, n_in = (in_features, out_features) if grad else (out_features, in_features)
    if a.dim() != 2 or a.shape[1] != n_in:
        form = "a @ W_e (grad)" if grad else "a @ W_e^T"
        raise ValueError(
            f"a must be (rows, {n_in}) for {form} with W_e ({out_features}, {in_features}), got {tuple(a.shape)}"
        )
    if not torch.is_tensor(packed) or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 [E, {out_features * in_features // 2}] tensor")
    E, dev = packed.shape[0], a.device
    n = out_features * in_features
    nb = n // blocksize
    dq = absmax2 is not None or code2 is not None or offset is not None
    _check_tensor("packed", packed, torch.uint8, (E, n // 2), dev)
    _check_tensor("absmax", absmax, torch.uint8 if dq else torch.float32, (E, nb), dev)
    _check_tensor("code", code, torch.float32, (16,), dev)
    _check_tensor("offs", offs, torch.int32, (E,), dev)
    if dq:
        if isinstance(blocksize2, bool) or not isinstance(blocksize2, int) or blocksize2 < 1:
            raise ValueError(f"blocksize2 must be a positive int, got {blocksize2!r}")
        _check_tensor("absmax2", absmax2, torch.float32, (E, -(-nb // blocksize2)), dev)
        _check_tensor("code2", code2, torch.float32, (256,), dev)
        _check_tensor("offset", offset, torch.float32, (E,), dev)
    if E == 0:
        raise ValueError("packed must hold at least one expert, got E = 0")
    if dev.type == "cpu":  # host memory: check the offsets (on a GPU that would be a sync per GEMM)
        ends = offs.tolist()
        if any(hi < lo for lo, hi in zip([0] + ends, ends)) or ends[-1] > a.shape[0]:
            raise ValueError(f"offs must be non-decreasing end rows in [0, {a.shape[0]}], got {ends}")
    _check_runnable(dev, "nf4_grouped_mm_triton")

    # allocate
    M = a.shape[0]
    out = torch.empty((M, n_out), device=dev, dtype=a.dtype)
    if M == 0:
        return out

    # launch
    from ..backends import interpreting

    block_m, block_n, block_k, num_warps, num_stages = grouped_tiles(grad, a.dtype, interpreting())
    width = block_n if grad else block_k  # columns of the decoded weight tile
    s2 = (absmax2, code2, offset) if dq else (absmax, absmax, absmax)  # placeholders, never read
    grid = (triton.cdiv(M, block_m) + E, triton.cdiv(n_out, block_n))
    _launch(
        _nf4_grouped_gemm_kernel[grid],
        a,
        a.stride(0),
        a.stride(1),
        packed,
        absmax,
        *s2,
        code,
        offs,
        out,
        out.stride(0),
        out.stride(1),
        E,
        n_out,
        n_in,
        in_features,
        packed.stride(0),
        absmax.stride(0),
        absmax2.stride(0) if dq else 0,
        GRAD=bool(grad),
        EVEN_K=n_in % block_k == 0,
        EVEN_N=n_out % block_n == 0,
        ROW_SCALE=blocksize % width == 0,
        INPUT_PRECISION=_input_precision(a.dtype),
        UPCAST_DOT=_upcast_dot(a.dtype),
        DQ=dq,
        BLOCKSIZE2=int(blocksize2) if dq else 256,
        BLOCKSIZE=blocksize,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        E_POW2=triton.next_power_of_2(E),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
