"""Triton kernels for RMSNorm (:func:`fastft.ops.rms_norm.rms_norm`).

Same contract as the torch backend (:func:`fastft.ops.rms_norm.rms_norm_fwd_torch` /
:func:`fastft.ops.rms_norm.rms_norm_bwd_torch`); see the formulas and the two dtype
orders (Llama: cast to the input dtype, then times the weight; Gemma, ``offset != 0``:
times ``offset + weight`` in fp32, then cast) in the docstring of :mod:`fastft.ops.rms_norm`.

* forward: one program per block of ``BLOCK_ROWS`` rows, the whole hidden dimension in
  one tile; writes the output and ``rstd`` (fp32, one per row) for the backward;
* backward: a fixed number of programs walks the row blocks (program ``p`` takes blocks
  ``p, p + G, p + 2G, ...``), writes ``dx`` for each and accumulates its own partial
  ``dw`` in fp32; the ``(G, N)`` partials are summed with torch afterwards.

All arithmetic is fp32 whatever the input dtypes. No host synchronisation.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backends import interpreting

__all__ = ["rms_norm_fwd_triton", "rms_norm_bwd_triton"]

# The whole row lives in one tile: beyond this hidden size a tile would spill (GPU) or
# exceed Triton's tensor size limits; no transformer in use comes near it.
_MAX_N = 65536
# Elements per (rows x hidden) tile on a GPU; a row block never exceeds _MAX_BLOCK_ROWS rows.
_TILE_ELEMS = 4096
_MAX_BLOCK_ROWS = 16
# The CPU interpreter: small row blocks and two backward programs, so that tests with a
# handful of rows reach the masked tail block and the strided row-block loop.
_BLOCK_ROWS_INTERPRET = 4
_BWD_PROGRAMS_INTERPRET = 2


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # (n_rows, N) input, any float dtype, unit stride along N
    x_row_stride,  # elements between consecutive rows of x
    w_ptr,  # (N,) weight, any float dtype, contiguous
    out_ptr,  # (n_rows, N) output, contiguous; its dtype is the op's result dtype
    rstd_ptr,  # (n_rows,) fp32: 1 / sqrt(mean(x^2) + eps), kept for the backward
    n_rows,  # number of rows
    N,  # hidden size
    eps,  # added to the mean square
    offset,  # added to the weight (Gemma: 1.0); only read when CAST_BEFORE_WEIGHT is False
    CAST_BEFORE_WEIGHT: tl.constexpr,  # Llama order: weight * xhat.to(x.dtype)
    BLOCK_ROWS: tl.constexpr,  # rows per program (power of two)
    BLOCK_N: tl.constexpr,  # tile width, next power of two >= N
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]

    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)

    xhat = x * rstd[:, None]
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if CAST_BEFORE_WEIGHT:
        # round to the input dtype first; the product of two values of at most 16 bits
        # is exact in fp32, so one rounding to the output dtype matches torch's promotion
        xhat = xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
        y = w[None, :] * xhat
    else:
        y = xhat * (offset + w[None, :])
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # (n_rows, N) upstream gradient, any float dtype, unit stride along N
    dy_row_stride,  # elements between consecutive rows of dy
    x_ptr,  # (n_rows, N) forward input, unit stride along N
    x_row_stride,  # elements between consecutive rows of x
    w_ptr,  # (N,) weight, contiguous
    rstd_ptr,  # (n_rows,) fp32 from the forward
    dx_ptr,  # (n_rows, N) input gradient in x's dtype, contiguous (unused without COMPUTE_DX)
    dw_partial_ptr,  # (num_programs, N) fp32 partial weight gradients (unused without COMPUTE_DW)
    n_rows,  # number of rows
    N,  # hidden size
    offset,  # added to the weight
    CAST_BEFORE_WEIGHT: tl.constexpr,  # Llama order: dw sums dy * xhat.to(x.dtype)
    COMPUTE_DX: tl.constexpr,  # write dx
    COMPUTE_DW: tl.constexpr,  # write this program's partial dw
    BLOCK_ROWS: tl.constexpr,  # rows per block (power of two)
    BLOCK_N: tl.constexpr,  # tile width, next power of two >= N
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((BLOCK_N,), tl.float32)

    for block in range(pid, tl.cdiv(n_rows, BLOCK_ROWS), n_programs):
        rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)  # int64: rows * stride
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        if COMPUTE_DX:
            dyw = dy * w[None, :]
            c = tl.sum(dyw * xhat, axis=1) / N
            dx = (dyw - xhat * c[:, None]) * rstd[:, None]
            tl.store(dx_ptr + rows[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if CAST_BEFORE_WEIGHT:
                xhat = xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
            dw_acc += tl.sum(dy * xhat, axis=0)  # masked rows load 0: they add nothing

    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * N + cols, dw_acc, mask=col_mask)


def _blocks(N: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_ROWS, num_warps) for hidden size ``N``."""
    block_n = max(16, triton.next_power_of_2(N))
    if interpreting():
        return block_n, _BLOCK_ROWS_INTERPRET, 4
    block_rows = max(1, min(_MAX_BLOCK_ROWS, _TILE_ELEMS // block_n))
    num_warps = 4 if block_n <= 1024 else (8 if block_n <= 4096 else 16)
    return block_n, block_rows, num_warps


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bwd_programs(device: torch.device, n_blocks: int) -> int:
    if interpreting() or device.type != "cuda":
        want = _BWD_PROGRAMS_INTERPRET
    else:
        want = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(want, n_blocks))


def _check_2d(name: str, t: torch.Tensor, n_rows: int | None, N: int | None):
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, N), got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if n_rows is not None and tuple(t.shape) != (n_rows, N):
        raise ValueError(f"{name} must have shape ({n_rows}, {N}), got {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along N, got strides {t.stride()}")


def _check_weight(weight: torch.Tensor, x: torch.Tensor):
    N = x.shape[1]
    if weight.dim() != 1 or weight.shape[0] != N:
        raise ValueError(f"weight must have shape ({N},), got {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if N == 0 or N > _MAX_N:
        raise ValueError(f"the triton rms_norm handles hidden sizes 1..{_MAX_N}, got {N}")


def rms_norm_fwd_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of the rows of ``x`` ``(rows, N)``: returns ``(out, rstd)``.

    ``out`` is ``(rows, N)`` contiguous, in ``promote_types(weight, x)`` when ``offset == 0``
    (Llama order) else in ``x.dtype`` (Gemma order); ``rstd`` is ``(rows,)`` fp32.
    """
    # check
    _check_2d("x", x, None, None)
    _check_weight(weight, x)
    n_rows, N = x.shape
    cast_first = float(offset) == 0.0

    # allocate
    out_dtype = torch.promote_types(weight.dtype, x.dtype) if cast_first else x.dtype
    out = torch.empty((n_rows, N), device=x.device, dtype=out_dtype)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    if n_rows == 0:
        return out, rstd
    weight = weight.contiguous()

    # launch
    block_n, block_rows, num_warps = _blocks(N)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        x,
        x.stride(0),
        weight,
        out,
        rstd,
        n_rows,
        N,
        float(eps),
        float(offset),
        CAST_BEFORE_WEIGHT=cast_first,
        BLOCK_ROWS=block_rows,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return out, rstd


def rms_norm_bwd_triton(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    need_dx: bool = True,
    need_dw: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`rms_norm_fwd_triton`: ``(dx in x.dtype, dw in weight.dtype)``,
    ``None`` for the ones not asked for."""
    # check
    _check_2d("x", x, None, None)
    n_rows, N = x.shape
    _check_2d("dy", dy, n_rows, N)
    _check_weight(weight, x)
    if rstd.shape != (n_rows,) or rstd.dtype != torch.float32:
        raise ValueError(f"rstd must be fp32 of shape ({n_rows},), got {rstd.dtype} {tuple(rstd.shape)}")
    for name, t in (("dy", dy), ("rstd", rstd)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")

    # allocate
    dx = torch.empty((n_rows, N), device=x.device, dtype=x.dtype) if need_dx else None
    if n_rows == 0 or not (need_dx or need_dw):
        return dx, (torch.zeros_like(weight) if need_dw else None)
    block_n, block_rows, num_warps = _blocks(N)
    programs = _bwd_programs(x.device, triton.cdiv(n_rows, block_rows))
    partial = torch.empty((programs, N), device=x.device, dtype=torch.float32) if need_dw else rstd
    weight = weight.contiguous()
    rstd = rstd.contiguous()

    # launch
    _rms_norm_bwd_kernel[(programs,)](
        dy,
        dy.stride(0),
        x,
        x.stride(0),
        weight,
        rstd,
        dx if need_dx else x,  # placeholder, never written
        partial,
        n_rows,
        N,
        float(offset),
        CAST_BEFORE_WEIGHT=float(offset) == 0.0,
        COMPUTE_DX=need_dx,
        COMPUTE_DW=need_dw,
        BLOCK_ROWS=block_rows,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    dw = partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw
