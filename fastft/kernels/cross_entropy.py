"""Triton row kernel for (fused linear) cross-entropy.

:func:`ce_rows_triton` has exactly the contract of
:func:`fastft.ops.cross_entropy.ce_rows_torch` (see the formulas in the docstring of
:mod:`fastft.ops.cross_entropy`): one program per row of the ``(N, V)`` logits.

* pass 1 walks the row in ``BLOCK_V`` tiles and keeps an online max and sum of
  exponentials (plus the sum of the logits, for label smoothing), then writes the
  row's loss and log-sum-exp;
* pass 2 (only when a gradient is asked for) rereads each tile, computes
  ``grad_scale * dloss/dlogits`` and stores it. Every tile is read before it is
  written, so the gradient may overwrite the logits in place.

All arithmetic is fp32 whatever the input dtype. A target outside ``[0, V)`` that
is not ``ignore_index`` is never used as an address: its row's loss and gradient
are NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import interpreting

__all__ = ["ce_rows_triton"]

# Largest tile along the vocabulary. On a GPU a 4096-wide fp32 tile is 16 values per
# thread at 8 warps: large enough to stream at full bandwidth, small enough not to spill.
# The CPU interpreter runs each program in Python, so keep its tiles small (tests reach
# the multi-tile paths with modest vocabularies); tests may lower it further.
_MAX_BLOCK_V = 4096
_MAX_BLOCK_V_INTERPRET = 1024


@triton.jit
def _ce_rows_kernel(
    logits_ptr,  # (N, V) logits, any float dtype, unit stride along V
    logits_row_stride,  # elements between consecutive rows of logits
    target_ptr,  # (N,) integer class indices
    target_stride,  # elements between consecutive targets
    loss_ptr,  # (N,) fp32 out: per-row loss (0 when ignored, NaN when out of range)
    lse_ptr,  # (N,) fp32 out: per-row log-sum-exp of the (soft-capped) logits
    grad_scale_ptr,  # (1,) or (N,) upstream gradient per row (read only when COMPUTE_GRAD)
    grad_scale_stride,  # 0 for one shared value, else elements between rows
    grad_ptr,  # (N, V) out: grad_scale * dloss/dlogits (may alias logits_ptr)
    grad_row_stride,  # elements between consecutive rows of grad
    V,  # vocabulary size (row length)
    ignore_index,  # target value whose row contributes nothing
    label_smoothing,  # eps in [0, 1]
    z_loss,  # coefficient c of lse**2
    softcap,  # s in z = s * tanh(x / s) (read only when HAS_SOFTCAP)
    HAS_SOFTCAP: tl.constexpr,  # apply the soft cap
    HAS_SMOOTHING: tl.constexpr,  # label_smoothing > 0
    HAS_ZLOSS: tl.constexpr,  # z_loss > 0
    COMPUTE_GRAD: tl.constexpr,  # run pass 2 and write grad
    BLOCK_V: tl.constexpr,  # tile width along V (power of two)
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 for big V * N
    logits_row = logits_ptr + row * logits_row_stride
    cols = tl.arange(0, BLOCK_V)

    t = tl.load(target_ptr + row * target_stride).to(tl.int64)
    counted = t != ignore_index
    valid = (t >= 0) & (t < V)
    safe_t = tl.where(valid, t, 0)  # never an address out of the row

    # logit of the target
    z_t = tl.load(logits_row + safe_t).to(tl.float32)
    if HAS_SOFTCAP:
        # tanh from exp only (tl has no portable tanh): e = exp(-2|u|) lies in (0, 1], so
        # nothing overflows. Written out inline here and below: a device-function call is
        # expensive in the CPU interpreter.
        # (scalar names differ from the tiles' below: a compiled loop needs stable types)
        u_t = z_t / softcap
        e_t = tl.exp(-2.0 * tl.abs(u_t))
        th_t = (1.0 - e_t) / (1.0 + e_t)
        z_t = softcap * tl.where(u_t < 0.0, -th_t, th_t)

    # pass 1: online max / sum of exp (and sum of z for label smoothing)
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    sum_z = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        z = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            u = z / softcap
            e = tl.exp(-2.0 * tl.abs(u))
            th = (1.0 - e) / (1.0 + e)
            z = softcap * tl.where(u < 0.0, -th, th)
        if HAS_SMOOTHING:
            sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    loss = lse - z_t
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_z / V)
    if HAS_ZLOSS:
        loss += z_loss * lse * lse
    loss = tl.where(counted, tl.where(valid, loss, float("nan")), 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)

    # pass 2: gradient, tile by tile (each tile is read before it is overwritten)
    if COMPUTE_GRAD:
        scale = tl.load(grad_scale_ptr + row * grad_scale_stride).to(tl.float32)
        # zero on ignored rows, NaN on out-of-range ones
        scale = tl.where(counted, tl.where(valid, scale, float("nan")), 0.0)
        grad_row = grad_ptr + row * grad_row_stride
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                u = z / softcap
                e = tl.exp(-2.0 * tl.abs(u))
                th = (1.0 - e) / (1.0 + e)
                th = tl.where(u < 0.0, -th, th)  # tanh(x / s)
                z = softcap * th
            g = tl.exp(z - lse)  # softmax
            if HAS_ZLOSS:
                g = g * (1.0 + 2.0 * z_loss * lse)
            g = g - tl.where(offs == safe_t, 1.0 - label_smoothing, 0.0)
            if HAS_SMOOTHING:
                g = g - label_smoothing / V
            if HAS_SOFTCAP:
                g = g * (1.0 - th * th)
            g = g * scale
            tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _block_v(V: int) -> tuple[int, int]:
    cap = _MAX_BLOCK_V_INTERPRET if interpreting() else _MAX_BLOCK_V
    block = max(16, min(triton.next_power_of_2(V), cap))
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, num_warps


def ce_rows_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and log-sum-exp of each row of ``logits`` ``(N, V)``; optionally its gradient.

    Same contract as :func:`fastft.ops.cross_entropy.ce_rows_torch`: ``target`` is ``(N,)``
    integer; returns ``(loss, lse)``, both ``(N,)`` float32, loss 0 on ignored rows and
    NaN on rows whose target is out of range. When ``grad_scale`` (one element or
    ``(N,)``) is given, writes ``grad_scale * dloss/dlogits`` into ``grad_out``
    (``(N, V)``, any float dtype, unit stride along V; it may be ``logits`` itself).
    No host synchronisation.
    """
    # check
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, V), got shape {tuple(logits.shape)}")
    N, V = logits.shape
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if V == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have unit stride along V, got strides {logits.stride()}")
    if target.dim() != 1 or target.shape[0] != N:
        raise ValueError(f"target must have shape ({N},), got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor, got dtype {target.dtype}")
    compute_grad = grad_scale is not None
    if compute_grad:
        if grad_out is None:
            raise ValueError("grad_out is required when grad_scale is given")
        if tuple(grad_out.shape) != (N, V):
            raise ValueError(f"grad_out must have shape ({N}, {V}), got {tuple(grad_out.shape)}")
        if not grad_out.dtype.is_floating_point:
            raise TypeError(f"grad_out must be a floating-point tensor, got dtype {grad_out.dtype}")
        if grad_out.stride(1) != 1:
            raise ValueError(f"grad_out must have unit stride along V, got strides {grad_out.stride()}")
        grad_scale = grad_scale.reshape(-1)
        if grad_scale.numel() not in (1, N):
            raise ValueError(f"grad_scale must have 1 or {N} elements, got {grad_scale.numel()}")
        gs_stride = 0 if grad_scale.numel() == 1 else grad_scale.stride(0)
    for name, t in (("target", target), ("grad_scale", grad_scale), ("grad_out", grad_out)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")

    # allocate
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    if N == 0:
        return loss, lse
    if not compute_grad:
        grad_scale, gs_stride, grad_out = loss, 0, logits  # placeholders, never read or written

    # launch
    block_v, num_warps = _block_v(V)
    _ce_rows_kernel[(N,)](
        logits,
        logits.stride(0),
        target,
        target.stride(0),
        loss,
        lse,
        grad_scale,
        gs_stride,
        grad_out,
        grad_out.stride(0),
        V,
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        1.0 if softcap is None else float(softcap),
        HAS_SOFTCAP=softcap is not None,
        HAS_SMOOTHING=float(label_smoothing) > 0.0,
        HAS_ZLOSS=float(z_loss) > 0.0,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return loss, lse
