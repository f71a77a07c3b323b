"""Triton kernel for rotary position embeddings (rotate_half convention).

:func:`rope_triton` has exactly the contract of :func:`fastft.ops.rope.rope_rows_torch`
(formulas in the docstring of :mod:`fastft.ops.rope`): one program per
``(batch, head, position)`` row of ``x``, over its ``head_dim``:

* the first ``R`` features (``R = cos.shape[-1]``, even) are rotated in two halves;
* features ``R:`` are copied through (partial rotary, Phi-3 style).

``x`` is up to 4-D with any strides; ``cos`` / ``sin`` come already broadcast to
``x.shape[:-1] + (R,)`` (an ``expand``: stride 0 along the head dimension, nothing
copied). Out of place: the result is a new contiguous tensor. ``q`` and ``k`` are two
launches of the same kernel (they differ in head count, GQA). All arithmetic fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import BackendUnavailable, interpreting

__all__ = ["rope_triton"]

# The pass-through features of one row (head_dim - R) are copied in tiles of at most this.
_MAX_BLOCK_PASS = 256
_MAX_BLOCK_PASS_INTERPRET = 64


@triton.jit
def _rope_kernel(
    x_ptr,  # 4-D input [d0, d1, d2, D], any float dtype, any strides
    out_ptr,  # 4-D contiguous output [d0, d1, d2, D], in out's dtype
    cos_ptr,  # cos broadcast to [d0, d1, d2, R] (zero strides where broadcast)
    sin_ptr,  # sin broadcast to [d0, d1, d2, R]
    d1,  # size of dim 1 of x
    d2,  # size of dim 2 of x
    sx0,  # stride of x along dim 0
    sx1,  # stride of x along dim 1
    sx2,  # stride of x along dim 2
    sx3,  # stride of x along features
    sc0,  # stride of cos along dim 0
    sc1,  # stride of cos along dim 1
    sc2,  # stride of cos along dim 2
    sc3,  # stride of cos along features
    ss0,  # stride of sin along dim 0
    ss1,  # stride of sin along dim 1
    ss2,  # stride of sin along dim 2
    ss3,  # stride of sin along features
    D,  # head_dim (row length of x and out)
    HALF,  # R // 2: features rotated are [0, R)
    BACKWARD: tl.constexpr,  # apply the transpose (rotation by -sin) instead
    HAS_PASS: tl.constexpr,  # R < D: copy features [R, D) through
    BLOCK_H: tl.constexpr,  # power of two >= HALF
    BLOCK_P: tl.constexpr,  # tile width of the pass-through copy (power of two)
):
    row = tl.program_id(0).to(tl.int64)
    i2 = row % d2
    i1 = (row // d2) % d1
    i0 = row // (d2 * d1)
    x_row = x_ptr + i0 * sx0 + i1 * sx1 + i2 * sx2
    c_row = cos_ptr + i0 * sc0 + i1 * sc1 + i2 * sc2
    s_row = sin_ptr + i0 * ss0 + i1 * ss1 + i2 * ss2
    o_row = out_ptr + row * D

    offs = tl.arange(0, BLOCK_H)
    mask = offs < HALF
    x1 = tl.load(x_row + offs * sx3, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + (offs + HALF) * sx3, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c_row + offs * sc3, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + (offs + HALF) * sc3, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + offs * ss3, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + (offs + HALF) * ss3, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # transpose of [x1 c1 - x2 s1, x2 c2 + x1 s2]
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:  # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_row + offs, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + HALF + offs, o2.to(out_ptr.dtype.element_ty), mask=mask)

    if HAS_PASS:
        cols = tl.arange(0, BLOCK_P)
        for start in range(2 * HALF, D, BLOCK_P):
            p = start + cols
            pm = p < D
            v = tl.load(x_row + p * sx3, mask=pm, other=0.0)
            tl.store(o_row + p, v.to(out_ptr.dtype.element_ty), mask=pm)


def _as4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def rope_triton(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backward: bool = False, out_dtype=None
) -> torch.Tensor:
    """Rotate ``x`` ``[..., D]`` (at most 4-D) by ``cos`` / ``sin`` of shape ``x.shape[:-1] + (R,)``.

    Forward: ``cat([x[..., :R] * cos + rotate_half(x[..., :R]) * sin, x[..., R:]])``;
    ``backward=True`` applies the transpose (the rotation by ``-sin``). Returns a new
    contiguous tensor in ``out_dtype`` (default ``x.dtype``). No host synchronisation.
    """
    # check
    if x.device.type != "cuda" and not interpreting():
        raise BackendUnavailable(
            f"rope: Triton kernels need CUDA tensors (got {x.device.type}; set TRITON_INTERPRET=1 to interpret)"
        )
    if not 1 <= x.dim() <= 4:
        raise ValueError(f"rope: x must have 1 to 4 dimensions, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    R = cos.shape[-1]
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != tuple(x.shape[:-1]) + (R,):
            raise ValueError(f"rope: {name} must have shape {tuple(x.shape[:-1]) + (R,)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"rope: {name} is on {t.device} but x is on {x.device}")
    if R % 2 or R == 0 or R > D:
        raise ValueError(f"rope: rotary dim {R} must be even, positive and at most head_dim {D}")

    # allocate
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype or x.dtype)
    if out.numel() == 0:
        return out

    # launch
    x4, c4, s4 = _as4d(x), _as4d(cos), _as4d(sin)
    n_rows = x4.shape[0] * x4.shape[1] * x4.shape[2]
    cap = _MAX_BLOCK_PASS_INTERPRET if interpreting() else _MAX_BLOCK_PASS
    block_p = max(16, min(triton.next_power_of_2(max(D - R, 1)), cap))
    _rope_kernel[(n_rows,)](
        x4,
        out,
        c4,
        s4,
        x4.shape[1],
        x4.shape[2],
        *x4.stride(),
        *c4.stride(),
        *s4.stride(),
        D,
        R // 2,
        BACKWARD=backward,
        HAS_PASS=R < D,
        BLOCK_H=max(16, triton.next_power_of_2(R // 2)),
        BLOCK_P=block_p,
        num_warps=1 if R <= 128 else 2,
    )
    return out
