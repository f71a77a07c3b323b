"""Rotary position embeddings, as transformers' ``apply_rotary_pos_emb`` applies them.

With ``cos`` / ``sin`` of shape ``[batch, seq, R]`` (what a model's rotary embedding
returns) unsqueezed at ``unsqueeze_dim`` (1 for ``[batch, heads, seq, head_dim]``
queries and keys, 2 for ``[batch, seq, heads, head_dim]``), and ``R = cos.shape[-1]``::

    rotate_half(x) = cat([-x[..., R/2:R], x[..., :R/2]])
    rope(x)        = cat([x[..., :R] * cos + rotate_half(x[..., :R]) * sin, x[..., R:]])

``R == head_dim`` is Llama's ``apply_rotary_pos_emb``; ``R < head_dim`` is partial
rotary as Phi-3 (and others) do it: the features ``R:`` pass through unchanged. ``q``
and ``k`` may have different head counts (GQA / MQA). The result dtype is torch's
promotion of ``q`` (resp. ``k``), ``cos`` and ``sin``, as in transformers.

Backward is the transpose of the rotation: with ``cos = [c1, c2]``, ``sin = [s1, s2]``
(the halves are equal for every HF model, so this is the rotation by ``-sin``)::

    dx[:R/2]  = g1 c1 + g2 s2        dx[R/2:R] = g2 c2 - g1 s1        dx[R:] = g[R:]

so the forward saves only ``cos`` and ``sin`` (broadcast views, nothing copied), never
``q`` or ``k``. The arithmetic is fp32 whatever the dtype, rounded once.
Out of place: ``q`` and ``k`` are never modified; new tensors are returned.
Gradients for ``cos`` / ``sin`` are not implemented by the fused backends: when either
requires grad (under grad mode) the op runs :func:`rope_reference` instead.

Layers: :func:`rope` validates, then calls the ``torch.library`` operator
``fastft::rope_rotate`` once for ``q`` and once for ``k`` (fake implementation and autograd
formula registered: torch.compile traces it without a graph break); the operator picks a
backend at run time (:mod:`fastft.backends`: ``triton``, then ``torch``) and calls its rotation
``(x, cos, sin, backward=, out_dtype=)``; :func:`rope_reference` is transformers'
code, the oracle for the tests.
"""

from __future__ import annotations

import torch

from .. import backends

__all__ = ["rope", "rope_reference"]

OP_ROPE = "rope"
backends.register(OP_ROPE, ("triton", "torch"))


# --------------------------------------------------------------------------------------
# reference (pure PyTorch, autograd): transformers' apply_rotary_pos_emb (Phi-3 form)
# --------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin, *, unsqueeze_dim: int = 1):
    """transformers' ``apply_rotary_pos_emb`` with partial rotary (``R = cos.shape[-1]``)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    R = cos.shape[-1]
    q_rot, q_pass = q[..., :R], q[..., R:]
    k_rot, k_pass = k[..., :R], k[..., R:]
    q_embed = torch.cat([(q_rot * cos) + (_rotate_half(q_rot) * sin), q_pass], dim=-1)
    k_embed = torch.cat([(k_rot * cos) + (_rotate_half(k_rot) * sin), k_pass], dim=-1)
    return q_embed, k_embed


# --------------------------------------------------------------------------------------
# the torch backend (same contract as fastft.kernels.rope.rope_triton)
# --------------------------------------------------------------------------------------
def rope_rows_torch(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backward: bool = False, out_dtype=None
) -> torch.Tensor:
    """Rotate ``x`` ``[..., D]`` by ``cos`` / ``sin`` of shape ``x.shape[:-1] + (R,)``, in fp32.

    ``backward=True`` applies the transpose. Returns a new tensor in ``out_dtype``
    (default ``x.dtype``).
    """
    out_dtype = out_dtype or x.dtype
    R = cos.shape[-1]
    h = R // 2
    xr = x[..., :R].float()
    x1, x2 = xr[..., :h], xr[..., h:]
    c, s = cos.float(), sin.float()
    c1, c2, s1, s2 = c[..., :h], c[..., h:], s[..., :h], s[..., h:]
    if backward:
        o1, o2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        o1, o2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    return torch.cat([o1.to(out_dtype), o2.to(out_dtype), x[..., R:].to(out_dtype)], dim=-1)


def _rotation(backend: str):
    if backend == "triton":
        from ..kernels.rope import rope_triton

        return rope_triton
    return rope_rows_torch


# --------------------------------------------------------------------------------------
# the operator (torch.library: one traced node for torch.compile, no graph break)
# --------------------------------------------------------------------------------------
@torch.library.custom_op("fastft::rope_rotate", mutates_args=())
def _rope_rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool, out_dtype: torch.dtype, backend: str
) -> torch.Tensor:
    """Rotate ``x`` by ``cos`` / ``sin`` (already shaped ``x.shape[:-1] + (R,)``), or apply the
    transpose when ``backward``; the backend is chosen here, at run time."""
    rotate = _rotation(backends.select(OP_ROPE, x.device, backend).backend)
    return rotate(x, cos, sin, backward=backward, out_dtype=out_dtype)


@_rope_rotate.register_fake
def _(x, cos, sin, backward, out_dtype, backend):
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


def _setup(ctx, inputs, output):
    x, cos, sin, backward, _, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward, ctx.x_dtype, ctx.backend = backward, x.dtype, backend


def _grad(ctx, g):
    # the rotation is orthogonal: its gradient is the transposed rotation (cos / sin get none:
    # rope() takes the reference path when they require grad)
    cos, sin = ctx.saved_tensors
    dx = _rope_rotate(g, cos, sin, not ctx.backward, ctx.x_dtype, ctx.backend) if ctx.needs_input_grad[0] else None
    return dx, None, None, None, None, None


_rope_rotate.register_autograd(_grad, setup_context=_setup)


def _check(q, k, cos, sin, unsqueeze_dim):
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not torch.is_tensor(t):
            raise TypeError(f"rope: {name} must be a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"rope: {name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"rope: {name} is on {t.device} but q is on {q.device}")
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, int):
        raise TypeError(f"rope: unsqueeze_dim must be an int, got {unsqueeze_dim!r}")
    if cos.shape != sin.shape:
        raise ValueError(f"rope: cos shape {tuple(cos.shape)} does not match sin shape {tuple(sin.shape)}")
    if cos.dtype != sin.dtype:
        raise TypeError(f"rope: cos dtype {cos.dtype} does not match sin dtype {sin.dtype}")
    if q.dim() != k.dim() or not 1 <= q.dim() <= 4:
        raise ValueError(
            f"rope: q and k must have the same number of dimensions (1 to 4), "
            f"got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope: q head_dim {q.shape[-1]} does not match k head_dim {k.shape[-1]}")
    if cos.dim() < 1 or not -(cos.dim() + 1) <= unsqueeze_dim <= cos.dim():
        raise ValueError(f"rope: unsqueeze_dim {unsqueeze_dim} is out of range for cos of shape {tuple(cos.shape)}")
    R, D = cos.shape[-1], q.shape[-1]
    if R % 2 or R == 0 or R > D:
        raise ValueError(f"rope: rotary dim cos.shape[-1] = {R} must be even, positive and at most head_dim {D}")


def _broadcast(t: torch.Tensor, x: torch.Tensor, name: str, xname: str) -> torch.Tensor:
    """``t`` (already unsqueezed) expanded to ``x.shape[:-1] + (R,)`` without copying."""
    shape = tuple(x.shape[:-1]) + (t.shape[-1],)
    try:
        if t.dim() > len(shape) or torch.broadcast_shapes(t.shape, shape) != shape:
            raise RuntimeError
        return t.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"rope: {name} of shape {tuple(t.shape)} (after unsqueeze) does not broadcast to "
            f"{xname}.shape[:-1] + (R,) = {shape}"
        ) from None


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    unsqueeze_dim: int = 1,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_rot, k_rot)``: transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``.

    ``q`` ``[b, hq, s, d]`` and ``k`` ``[b, hk, s, d]`` (or ``[b, s, h, d]`` with
    ``unsqueeze_dim=2``; up to 4-D), ``cos`` / ``sin`` ``[b or 1, s, R]`` with ``R`` even
    and ``<= d``: the first ``R`` features rotate, the rest pass through. ``cos`` /
    ``sin`` must broadcast to ``q`` / ``k`` without enlarging them. Out of place.
    ``backend``: ``"auto"`` (Triton on CUDA tensors, else torch), ``"triton"``, ``"torch"``.
    """
    _check(q, k, cos, sin, unsqueeze_dim)
    cos_u, sin_u = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    cos_q, sin_q = _broadcast(cos_u, q, "cos", "q"), _broadcast(sin_u, q, "sin", "q")
    cos_k, sin_k = _broadcast(cos_u, k, "cos", "k"), _broadcast(sin_u, k, "sin", "k")
    if not torch.compiler.is_compiling():  # an unknown or unavailable forced backend raises here
        backends.select(OP_ROPE, q.device, backend)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return rope_reference(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    q_dt = torch.promote_types(q.dtype, cos.dtype)
    k_dt = torch.promote_types(k.dtype, cos.dtype)
    if backends.traces_reference(OP_ROPE, q.device, backend):  # inductor fuses it (see backends)
        return rope_rows_torch(q, cos_q, sin_q, out_dtype=q_dt), rope_rows_torch(k, cos_k, sin_k, out_dtype=k_dt)
    rotate = torch.ops.fastft.rope_rotate
    return rotate(q, cos_q, sin_q, False, q_dt, backend), rotate(k, cos_k, sin_k, False, k_dt, backend)
