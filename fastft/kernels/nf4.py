"""Triton kernels for 4-bit NF4 weights (bitsandbytes' layout): dequantisation and matmul.

The low-level contract, on plain tensors, for a weight ``W`` of ``numel`` elements (an
``[N, K]`` weight flattened row-major for the matmul):

* ``packed`` uint8, ``ceil(numel / 2)`` bytes, contiguous: byte ``i`` holds flat element
  ``2i`` in its HIGH nibble and ``2i + 1`` in its LOW nibble (an odd ``numel`` leaves the
  last low nibble unused);
* ``absmax`` float32, ``ceil(numel / blocksize)`` scales, contiguous; or, double-quantised,
  uint8 indices with the keywords ``absmax2`` (fp32 ``[ceil(nblocks / blocksize2)]``),
  ``code2`` (fp32 ``[256]``), ``offset`` (fp32 ``[1]``) and ``blocksize2``: every kernel
  decodes the scale of a block it touches itself, ``code2[absmax[b]] * absmax2[b // blocksize2]
  + offset`` (a gather from a 1 KiB table that stays in L1), so a call is one launch whatever
  the double quantisation (no PyTorch kernels decode the absmax first);
* ``code`` float32 ``[16]``, the NF4 table.

::

    W[j] = code[nib(j)] * scale(j // blocksize)

The dequantisation kernel is compiled without FP contraction so that the decoded scale
(product, then offset) is bit-identical to bitsandbytes' two-kernel decode; the GEMV / GEMM
kernels allow it (their results are judged by tolerance against dequantise-then-matmul).

* :func:`dequantize_nf4_triton` writes ``W`` (1-D, fp32/bf16/fp16). Memory-bound: each
  program reads a contiguous run of bytes, decodes both nibbles of each (a gather from the
  16-entry table, which stays in L1) and writes the two outputs interleaved.
* :func:`nf4_matmul_triton` ``y = x2d @ W.T (+ bias)`` for ``W`` viewed as ``[N, K]``,
  ``K % blocksize == 0``, in ``x2d``'s dtype with fp32 accumulation, never materialising ``W``:

  - ``M > FUSED_GEMM_MAX_M`` (64; training shapes): the weight is dequantised into ``x``'s
    dtype by :func:`dequantize_nf4_triton` and multiplied by torch's GEMM (cuBLAS), as
    bitsandbytes does; the 16-bit copy lives for that product only. Measured on an H100
    (2026-11-23): with the fused kernel below at 4 x 2048 tokens, a QLoRA training step of a
    1B Llama took 666 ms against 229 ms for PEFT + bitsandbytes' dequantise-then-GEMM.
  - ``8 < M <= FUSED_GEMM_MAX_M``: a dequant-GEMM. Programs tile the ``[M, N]`` output; each loop
    step loads the ``[BLOCK_N, BLOCK_K / 2]`` packed bytes of its weight tile, decodes them
    into a ``[BLOCK_N, BLOCK_K]`` tile in ``x``'s dtype (``code * absmax`` in fp32, rounded
    once, as dequantise-then-matmul does) and feeds it to ``tl.dot`` with the ``x`` tile.
  - ``M <= 8`` (generation): a GEMV. Each program owns a strip of ``BLOCK_N`` output
    columns for all ``M`` rows, decodes its weights once per step in fp32 and multiplies
    them against the even and odd columns of ``x`` (the high and low nibbles) with FMAs into
    an un-reduced ``[BLOCK_M, BLOCK_N, BLOCK_K / 2]`` accumulator, summed once at the end
    (no ``tl.dot``: for a few rows it would waste the tensor-core tile).

  With ``K % blocksize == 0`` a row of ``W`` never shares a quantisation block with the
  next, so the scale of element ``(n, k)`` is ``absmax[n * (K / blocksize) + k // blocksize]``:
  when ``blocksize`` is a multiple of ``BLOCK_K`` one scale per row covers a whole tile
  (one load per row), else the scales are gathered per byte.

No host synchronisation.

This module holds the tile configurations and the launchers (check, allocate, launch); the
``@triton.jit`` programs are in :mod:`fastft.kernels.nf4_kernels` and re-exported here.
"""

from __future__ import annotations

import torch
import triton

from ..backends import BackendUnavailable, interpreting
from .nf4_kernels import (  # noqa: F401  (re-exported)
    _decode_tile,
    _decode_tile_interleaved,
    _dequant_kernel,
    _load_scale,
    _nf4_gemm_kernel,
    _nf4_gemv_kernel,
    _splitk_reduce_kernel,
)

__all__ = ["dequantize_nf4_triton", "nf4_matmul_triton"]


def _launch(fn, *args, **kwargs):
    """Every kernel launch (and torch GEMM) of this module goes through here, so that tests can
    count the launches of one op: ``fn`` is ``kernel[grid]`` or a torch function."""
    return fn(*args, **kwargs)


# Dequantisation: bytes per program (2 outputs each). On a GPU 1024 bytes at 4 warps is 8
# contiguous bytes in and 16 outputs (32 B in bf16) out per thread: wide vector accesses,
# and enough programs (a 4096 x 4096 weight is 8192 of them) to fill every SM.
_DEQUANT_BLOCK = 1024
_DEQUANT_WARPS = 4
# GEMM (8 < M <= 64) tiles, see _GEMM_SMALL_M_CONFIG below. 16-bit x runs wgmma with an fp32
# accumulator (a 128 x 128 one is 64 registers per thread at 8 warps). The
# weight tile is decoded in registers before it goes to shared memory, which is what limits
# BLOCK_K: at 64, ptxas needs all 255 registers and spills for blocksize 32 (scales gathered
# per byte); at 32 it uses 199 and never spills. BLOCK_K 32 (16 for fp32) divides every
# bitsandbytes blocksize (32 ... 4096), so one absmax per row covers a tile. fp32 x (IEEE)
# runs tl.dot on FMAs from registers: 64 x 64 x 16 at 8 warps (150 registers; 64 x 64 x 32
# spills). Checked with ptxas for sm_90, not tuned on a GPU yet.

# GEMV (M <= 8): BLOCK_M (M rounded up to a power of two) -> (BLOCK_N, BLOCK_K, num_warps).
# The un-reduced accumulator holds BLOCK_M * BLOCK_N * BLOCK_K / 2 fp32 values (8-16 per
# thread at 8 warps); each step reads BLOCK_N * BLOCK_K / 2 weight bytes (2 KiB for M <= 2).
# 48-107 registers for sm_90 (4 warps with the same tiles need up to 187), not tuned yet.
_GEMV_CONFIG = {
    1: (16, 256, 8),
    2: (16, 256, 8),
    4: (16, 128, 8),
    8: (16, 64, 8),
}
# 8 < M <= 64: BLOCK_M (M rounded up, 16..64) -> (BLOCK_N, BLOCK_K, num_warps, num_stages). The
# tile is cut to M and split-K fills the GPU. Checked with ptxas for sm_90 (no spills), not
# timed on a GPU yet.
_GEMM_SMALL_M_CONFIG = {
    "16bit": {16: (64, 32, 4, 3), 32: (64, 32, 4, 3), 64: (128, 32, 8, 3)},
    "fp32": {16: (64, 16, 4, 2), 32: (64, 16, 4, 2), 64: (64, 16, 8, 2)},
}
# Split-K: programs wanted in all (None: two per SM), at most SPLIT_K_MAX splits, and each split
# at least SPLIT_K_MIN_STEPS steps of BLOCK_K. Tests may change these.
SPLIT_K_PROGRAMS: int | None = None
SPLIT_K_MAX = 16
SPLIT_K_MIN_STEPS = 4
# Largest M the GEMV handles; above it the GEMM runs.
GEMV_MAX_M = 8
# Largest M the fused dequant-GEMM handles; above it: dequantise, then torch's GEMM. The fused
# kernel is untuned (one tile config) and was 3x slower than bitsandbytes' dequantise + cuBLAS
# at training shapes on an H100; for a few rows it still saves writing and re-reading the
# 16-bit weight. Tests may change it.
FUSED_GEMM_MAX_M = 64
# The CPU interpreter runs each program in Python: small tiles, so that tests reach the
# multi-program, multi-step, ragged-edge and per-byte-scale paths with small shapes.
# Tests may change these.
_DEQUANT_BLOCK_INTERPRET = 64
_GEMM_INTERPRET = (16, 16, 32)  # BLOCK_M, BLOCK_N, BLOCK_K
_GEMV_INTERPRET = (16, 32)  # BLOCK_N, BLOCK_K


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_runnable(device: torch.device, what: str) -> None:
    if device.type != "cuda" and not interpreting():
        raise BackendUnavailable(
            f"{what}: Triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to interpret)"
        )


def _check_count(name: str, value, *, positive: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} int, got {value!r}")
    return int(value)


def _check_quant_state(packed, absmax, code, blocksize, numel, nested: dict | None = None) -> tuple[int, int]:
    """Validate the NF4 tensors for a weight of ``numel`` elements; returns (blocksize, numel).
    ``nested``: the double quantisation (absmax2, code2, offset, blocksize2) of a uint8 absmax."""
    blocksize = _check_count("blocksize", blocksize, positive=True)
    if blocksize % 2:
        raise ValueError(f"blocksize must be even (both nibbles of a byte share a scale), got {blocksize}")
    numel = _check_count("numel", numel)
    nblocks = -(-numel // blocksize)
    checks = [
        ("packed", packed, torch.uint8, (numel + 1) // 2),
        ("absmax", absmax, torch.uint8 if nested else torch.float32, nblocks),
        ("code", code, torch.float32, 16),
    ]
    if nested:
        bs2 = _check_count("blocksize2", nested["blocksize2"], positive=True)
        checks += [
            ("absmax2", nested["absmax2"], torch.float32, -(-nblocks // bs2)),
            ("code2", nested["code2"], torch.float32, 256),
            ("offset", nested["offset"], torch.float32, 1),
        ]
    for name, t, dtype, want in checks:
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got dtype {t.dtype}")
        if t.numel() != want:
            raise ValueError(
                f"{name} must have {want} elements for numel={numel}, blocksize={blocksize}; got {t.numel()}"
            )
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.device != packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")
    return blocksize, numel


def _nested(absmax2, code2, offset, blocksize2) -> dict | None:
    if absmax2 is None and code2 is None and offset is None:
        return None
    return dict(absmax2=absmax2, code2=code2, offset=offset, blocksize2=blocksize2)


def _scale_args(absmax, nested) -> tuple[tuple, dict]:
    """(pointer args, constexprs) of the scales for a kernel: the nested tensors, or placeholders."""
    if nested:
        return (absmax, nested["absmax2"], nested["code2"], nested["offset"]), dict(
            DQ=True, BLOCKSIZE2=int(nested["blocksize2"])
        )
    return (absmax, absmax, absmax, absmax), dict(DQ=False, BLOCKSIZE2=256)  # placeholders, never read


def _no_fp_fusion() -> dict:
    """Launch option keeping products and sums separately rounded (bit-exact decodes); the
    interpreter (numpy) never fuses and takes no such option."""
    return {} if interpreting() else dict(enable_fp_fusion=False)


def dequantize_nf4_triton(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    numel: int,
    out_dtype: torch.dtype = torch.float32,
    *,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize2: int = 256,
) -> torch.Tensor:
    """The NF4 weight ``W[j] = code[nib(j)] * scale(j // blocksize)``, 1-D ``[numel]`` in ``out_dtype``.

    ``packed`` uint8 ``ceil(numel / 2)`` bytes (element ``2i`` in the high nibble of byte ``i``),
    ``absmax`` fp32 ``ceil(numel / blocksize)`` (or uint8 with ``absmax2``/``code2``/``offset``,
    decoded in-kernel), ``code`` fp32 ``[16]``, all contiguous on one device; ``blocksize`` even;
    ``out_dtype`` fp32/bf16/fp16. The product is formed in fp32. One launch.
    """
    # check
    nested = _nested(absmax2, code2, offset, blocksize2)
    blocksize, numel = _check_quant_state(packed, absmax, code, blocksize, numel, nested)
    if out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    _check_runnable(packed.device, "dequantize_nf4_triton")

    # allocate
    out = torch.empty(numel, device=packed.device, dtype=out_dtype)
    if numel == 0:
        return out

    # launch
    nbytes = (numel + 1) // 2
    block = _DEQUANT_BLOCK_INTERPRET if interpreting() else _DEQUANT_BLOCK
    scale_ptrs, scale_meta = _scale_args(absmax, nested)
    _launch(
        _dequant_kernel[(triton.cdiv(nbytes, block),)],
        packed,
        *scale_ptrs,
        code,
        out,
        numel,
        nbytes,
        **scale_meta,
        BLOCKSIZE=blocksize,
        BLOCK=block,
        num_warps=_DEQUANT_WARPS,
        **_no_fp_fusion(),
    )
    return out


def _split_k(tiles: int, K: int, block_k: int, device: torch.device) -> int:
    """Programs along K for the 8 < M <= 64 GEMM: enough (output tiles x splits) to fill the GPU
    (SPLIT_K_PROGRAMS, default two per SM), at least SPLIT_K_MIN_STEPS loop steps per split."""
    target = SPLIT_K_PROGRAMS
    if target is None:
        target = 2 * _sm_count(device) if device.type == "cuda" else 1
    split = max(1, min(target // max(1, tiles), K // (block_k * SPLIT_K_MIN_STEPS), SPLIT_K_MAX))
    return split


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


_SM_COUNT: dict[int, int] = {}


def _gemm_tiles(M: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for 8 < M <= 64 rows: the tile is cut
    to M (16, 32 or 64 rows) so that no program multiplies padding rows; split-K then gives
    the GPU enough programs (N / BLOCK_N tiles alone are 32 for N = 4096)."""
    if interpreting():
        (bm, bn, bk), warps, stages = _GEMM_INTERPRET, 4, 1
        return bm, bn, bk, warps, stages
    key = "fp32" if dtype == torch.float32 else "16bit"
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    return (block_m,) + _GEMM_SMALL_M_CONFIG[key][block_m]


def _launch_gemm(args, common, x2d, bias, out, M, N, K, blocksize) -> None:
    """The fused dequant-GEMM for 8 < M <= FUSED_GEMM_MAX_M: one launch, or two with split-K
    (fp32 partial sums in a (SPLIT_K, M, N) workspace, then a deterministic reduction)."""
    block_m, block_n, block_k, num_warps, num_stages = _gemm_tiles(M, x2d.dtype)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split = _split_k(tiles, K, block_k, x2d.device)
    k_per = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_per)  # no empty split
    meta = dict(
        common,
        EVEN_K=K % block_k == 0,
        ROW_SCALE=blocksize % block_k == 0,
        SPLIT_K=split,
        INPUT_PRECISION=_input_precision(x2d.dtype),
        UPCAST_DOT=_upcast_dot(x2d.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split)
    if split == 1:
        _launch(_nf4_gemm_kernel[grid], *args, K_PER=k_per, **meta)
        return
    ws = torch.empty((split, M, N), device=x2d.device, dtype=torch.float32)
    a = list(args)
    a[-6:-3] = [ws, N, 1]  # (out_ptr, stride_om, stride_on) -> the workspace
    _launch(_nf4_gemm_kernel[grid], *a, K_PER=k_per, **meta)
    block = 1024 if not interpreting() else 64
    _launch(
        _splitk_reduce_kernel[(triton.cdiv(M * N, block),)],
        ws,
        bias if bias is not None else ws,  # placeholder, never read
        out,
        M * N,
        N,
        HAS_BIAS=bias is not None,
        SPLIT_K=split,
        BLOCK=block,
        num_warps=4,
    )


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


def nf4_matmul_triton(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    N: int,
    K: int,
    bias: torch.Tensor | None = None,
    *,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize2: int = 256,
) -> torch.Tensor:
    """``x2d @ W.T (+ bias)`` ``[M, N]`` in ``x2d``'s dtype, ``W`` the ``[N, K]`` NF4 weight, fp32 accumulation.

    ``x2d`` ``[M, K]`` fp32/bf16/fp16 (any strides); ``packed``/``absmax``/``code`` as for
    :func:`dequantize_nf4_triton` with ``numel = N * K``; ``K % blocksize == 0``; ``bias``
    ``[N]`` of any float dtype or None. The decoded weights are rounded to ``x2d``'s dtype
    (as dequantise-then-matmul does). ``M <= 8`` runs the GEMV kernel, ``M <= 64`` the fused
    GEMM, larger ``M`` dequantises into ``x2d``'s dtype and runs torch's GEMM.
    """
    # check
    if not torch.is_tensor(x2d):
        raise TypeError(f"x2d must be a tensor, got {type(x2d).__name__}")
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be 2-D, got shape {tuple(x2d.shape)}")
    if x2d.dtype not in _FLOATS:
        raise TypeError(f"x2d must be float32, bfloat16 or float16, got dtype {x2d.dtype}")
    N = _check_count("N", N)
    K = _check_count("K", K)
    if x2d.shape[1] != K:
        raise ValueError(f"x2d shape {tuple(x2d.shape)} must be [M, K] with K = {K}")
    nested = _nested(absmax2, code2, offset, blocksize2)
    blocksize, _ = _check_quant_state(packed, absmax, code, blocksize, N * K, nested)
    if K % blocksize:
        raise ValueError(f"K = {K} must be a multiple of blocksize = {blocksize}")
    if packed.device != x2d.device:
        raise ValueError(f"packed is on {packed.device} but x2d is on {x2d.device}")
    if bias is not None:
        if not torch.is_tensor(bias) or bias.dtype not in _FLOATS or tuple(bias.shape) != (N,):
            what = f"shape {tuple(bias.shape)}, dtype {bias.dtype}" if torch.is_tensor(bias) else type(bias).__name__
            raise ValueError(f"bias must be a [{N}] float32/bfloat16/float16 tensor, got {what}")
        if bias.device != x2d.device:
            raise ValueError(f"bias is on {bias.device} but x2d is on {x2d.device}")
    _check_runnable(x2d.device, "nf4_matmul_triton")

    # allocate
    M = x2d.shape[0]
    out = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.zero_()
        return out if bias is None else out.add_(bias.to(out.dtype))

    if M > FUSED_GEMM_MAX_M:  # training shapes: dequantise, then cuBLAS (see the module docstring)
        w = dequantize_nf4_triton(packed, absmax, code, blocksize, N * K, x2d.dtype, **(nested or {})).view(N, K)
        if bias is None:
            return _launch(torch.mm, x2d, w.t(), out=out)
        return _launch(torch.addmm, bias.to(out.dtype), x2d, w.t(), out=out)

    # launch
    scale_ptrs, scale_meta = _scale_args(absmax, nested)
    common = dict(HAS_BIAS=bias is not None, BLOCKSIZE=blocksize, **scale_meta)
    args = (
        x2d,
        x2d.stride(0),
        x2d.stride(1),
        packed,
        *scale_ptrs,
        code,
        bias if bias is not None else absmax,  # placeholder, never read
        out,
        out.stride(0),
        out.stride(1),
        M,
        N,
        K,
    )
    if M <= GEMV_MAX_M:
        block_m = triton.next_power_of_2(M)
        if interpreting():
            (block_n, block_k), num_warps = _GEMV_INTERPRET, 4
        else:
            block_n, block_k, num_warps = _GEMV_CONFIG[block_m]
        _launch(
            _nf4_gemv_kernel[(triton.cdiv(N, block_n),)],
            *args,
            **common,
            EVEN_K=K % block_k == 0,
            ROW_SCALE=blocksize % block_k == 0,
            ROUND_W=x2d.dtype != torch.float32,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=num_warps,
        )
    else:
        _launch_gemm(args, common, x2d, bias, out, M, N, K, blocksize)
    return out
