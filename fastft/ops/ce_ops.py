"""Cross-entropy's ``torch.library`` operators (opaque to torch.compile, no graph break), with
their fake (meta) implementations and autograd registrations, each registered once, here:

* ``fastft::ce_rows`` / ``fastft::ce_rows_grad``: per-row loss and gradient of materialised logits;
* ``fastft::flce``: fused linear CE for reduction mean / sum (gradients computed in forward);
* ``fastft::flce_rows`` / ``fastft::flce_rows_grad``: reduction "none" (logits recomputed in backward);
* ``fastft::flce_rows_hgrad``: reduction "none" with a frozen head (``d loss_t / d h_t`` in forward).

The public functions of :mod:`fastft.ops.cross_entropy` call them through ``torch.ops.fastft``;
the chunk loops they run are in :mod:`fastft.ops.ce_chunked`. Moved out of
:mod:`fastft.ops.cross_entropy`, which re-exports these names.
"""

from __future__ import annotations

import torch

from .. import backends
from .ce_chunked import (
    _chunked_grads,
    _empty_like_or,
    _loss_rows_only,
    _no_autocast,
    _scatter_rows,
    _setup_rows,
)
from .ce_reference import OP_CE, _row_kernel


# The operators below take the options as plain arguments (a schema has no dicts); `_opts`
# turns them back into the row kernels' keywords.
def _opts(ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None) -> dict:
    return dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)


@torch.library.custom_op("fastft::ce_rows", mutates_args=())
def _ce_rows_op(
    logits2d: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, lse)`` per row of ``logits2d``; the backend is chosen here, at run time."""
    rows = _row_kernel(backends.select(OP_CE, logits2d.device, backend).backend)
    return rows(logits2d, target, **_opts(ignore_index, label_smoothing, z_loss, softcap))


@_ce_rows_op.register_fake
def _(logits2d, target, ignore_index, label_smoothing, z_loss, softcap, backend):
    n = logits2d.shape[0]
    return logits2d.new_empty(n, dtype=torch.float32), logits2d.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("fastft::ce_rows_grad", mutates_args=())
def _ce_rows_grad_op(
    logits2d: torch.Tensor,
    target: torch.Tensor,
    grad_rows: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    backend: str,
) -> torch.Tensor:
    """``grad_rows[:, None] * dloss/dlogits`` in ``logits2d.dtype``."""
    rows = _row_kernel(backends.select(OP_CE, logits2d.device, backend).backend)
    grad = torch.empty_like(logits2d)
    rows(logits2d, target, **_opts(ignore_index, label_smoothing, z_loss, softcap), grad_scale=grad_rows, grad_out=grad)
    return grad


@_ce_rows_grad_op.register_fake
def _(logits2d, target, grad_rows, ignore_index, label_smoothing, z_loss, softcap, backend):
    return torch.empty_like(logits2d)


def _ce_setup(ctx, inputs, output):
    logits2d, target, *opts, backend = inputs
    ctx.save_for_backward(logits2d, target)
    ctx.opts, ctx.backend = opts, backend


def _ce_grad(ctx, grad_loss, _grad_lse):
    logits2d, target = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    grad = _ce_rows_grad_op(logits2d, target, grad_loss.float().contiguous(), *ctx.opts, ctx.backend)
    return (grad,) + (None,) * 6


_ce_rows_op.register_autograd(_ce_grad, setup_context=_ce_setup)


# --------------------------------------------------------------------------------------
# the fused linear CE operators (torch.library: opaque to torch.compile, no graph break)
#
# Two strategies, chunked over the counted tokens:
# * reduction "mean"/"sum" (`fastft::flce`): the upstream gradient is a scalar, so each
#   chunk's gradient is computed during forward (the chunk's logits are never recomputed)
#   and scaled by the upstream gradient in backward: 3 GEMMs, like the unfused path.
# * reduction "none" (`fastft::flce_rows` / `fastft::flce_rows_grad`): per-token upstream
#   gradients are only known in backward, which recomputes each chunk's logits: 4 GEMMs.
# Ignored tokens are dropped inside the operators (`_counted_rows`), so the data-dependent
# count never reaches a traced graph; outputs keep the full token count.
# --------------------------------------------------------------------------------------
@torch.library.custom_op("fastft::flce", mutates_args=())
def _flce_op(
    h2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    denom: torch.Tensor,
    need_h: bool,
    need_w: bool,
    need_b: bool,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, grad_h, grad_w, grad_b)`` for reduction mean/sum: ``loss = sum / denom`` and
    the gradients of that loss (fp32 ``grad_w`` / ``grad_b``); one not asked for is empty."""
    opts = _opts(ignore_index, label_smoothing, z_loss, softcap)
    N, H = h2d.shape
    V = weight.shape[0]
    with _no_autocast(h2d.device.type):
        keep, hk, tk, rows, chunk = _setup_rows(h2d, weight, target, ignore_index, backend, need_w)
        scale = (1.0 / denom.float()).reshape(1)
        if need_h or need_w or need_b:
            loss_rows = torch.empty(hk.shape[0], device=h2d.device, dtype=torch.float32)
            grad_h = torch.empty_like(hk) if need_h else None
            grad_w = torch.zeros(V, H, device=h2d.device, dtype=torch.float32) if need_w else None
            grad_b = torch.zeros(V, device=h2d.device, dtype=torch.float32) if need_b else None
            _chunked_grads(
                hk, weight, bias, tk, opts, rows, chunk, lambda s, e: scale, grad_h, grad_w, grad_b, loss_rows
            )
            if grad_h is not None:
                grad_h = _scatter_rows(grad_h, keep, N)
        else:
            loss_rows = _loss_rows_only(hk, weight, bias, tk, opts, rows, chunk)
            grad_h = grad_w = grad_b = None
        loss = loss_rows.sum() * scale.squeeze(0)
    return (
        loss,
        _empty_like_or(grad_h, (0,), h2d.dtype, h2d),
        _empty_like_or(grad_w, (0,), torch.float32, h2d),
        _empty_like_or(grad_b, (0,), torch.float32, h2d),
    )


@_flce_op.register_fake
def _(
    h2d, weight, bias, target, denom, need_h, need_w, need_b, ignore_index, label_smoothing, z_loss, softcap, backend
):
    f32 = torch.float32
    return (
        h2d.new_empty((), dtype=f32),
        h2d.new_empty(h2d.shape if need_h else (0,)),
        h2d.new_empty(weight.shape if need_w else (0,), dtype=f32),
        h2d.new_empty((weight.shape[0],) if need_b else (0,), dtype=f32),
    )


def _flce_setup(ctx, inputs, output):
    weight, bias = inputs[1], inputs[2]
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])  # the saved gradients are not results to differentiate
    ctx.set_materialize_grads(False)  # no zero "gradients" of them (2 GiB for an fp32 grad_weight)
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.computed = inputs[5:8]  # need_h, need_w, need_b: the gradients forward produced
    ctx.consumed = False


def _flce_grad(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * 13
    if ctx.consumed:
        raise RuntimeError(
            "fused_linear_cross_entropy computes its gradients during forward and can be "
            "backpropagated once; retain_graph=True with a second backward is not supported"
        )
    ctx.consumed = True
    grad_h, grad_w, grad_b = ctx.saved_tensors
    g = grad_loss.float()
    # scale by the upstream scalar: in place in eager (the buffers are ours and used once; a
    # copy of an fp32 grad_weight is 2 GiB at V 128256, H 4096); out of place while a graph is
    # traced (functional / fake tensors), where a mutated forward output is not allowed
    saved = next((t for t in (grad_h, grad_w, grad_b) if t.numel()), grad_h)
    inplace = type(saved) is torch.Tensor and not torch.compiler.is_compiling()
    # a gradient forward was not asked to compute is None (zero) for autograd
    need_h, need_w, need_b = (c and n for c, n in zip(ctx.computed, ctx.needs_input_grad[:3]))
    gh = (grad_h.mul_(g.to(grad_h.dtype)) if inplace else grad_h * g.to(grad_h.dtype)) if need_h else None
    gw = (grad_w.mul_(g) if inplace else grad_w * g).to(ctx.weight_dtype) if need_w else None
    gb = (grad_b.mul_(g) if inplace else grad_b * g).to(ctx.bias_dtype) if need_b else None
    return (gh, gw, gb) + (None,) * 10


_flce_op.register_autograd(_flce_grad, setup_context=_flce_setup)


@torch.library.custom_op("fastft::flce_rows", mutates_args=())
def _flce_rows_op(
    h2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    backend: str,
) -> torch.Tensor:
    """Per-token losses (reduction "none"), 0 for ignored tokens."""
    with _no_autocast(h2d.device.type):
        keep, hk, tk, rows, chunk = _setup_rows(h2d, weight, target, ignore_index, backend, False)
        loss = _loss_rows_only(hk, weight, bias, tk, _opts(ignore_index, label_smoothing, z_loss, softcap), rows, chunk)
        return _scatter_rows(loss, keep, h2d.shape[0])


@_flce_rows_op.register_fake
def _(h2d, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, backend):
    return h2d.new_empty(h2d.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastft::flce_rows_grad", mutates_args=())
def _flce_rows_grad_op(
    h2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    grad_rows: torch.Tensor,
    need_h: bool,
    need_w: bool,
    need_b: bool,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_h, grad_w, grad_b)`` of ``sum(grad_rows * loss_rows)``, logits recomputed per
    chunk; in the inputs' dtypes; one not asked for is empty."""
    opts = _opts(ignore_index, label_smoothing, z_loss, softcap)
    N, H = h2d.shape
    V = weight.shape[0]
    with _no_autocast(h2d.device.type):
        keep, hk, tk, rows, chunk = _setup_rows(h2d, weight, target, ignore_index, backend, need_w)
        go = grad_rows.float().reshape(-1)
        if keep is not None:
            go = go.index_select(0, keep)
        gh = torch.empty_like(hk) if need_h else None
        gw = torch.zeros(V, H, device=h2d.device, dtype=torch.float32) if need_w else None
        gb = torch.zeros(V, device=h2d.device, dtype=torch.float32) if need_b else None
        _chunked_grads(hk, weight, bias, tk, opts, rows, chunk, lambda s, e: go[s:e], gh, gw, gb)
        gh = _scatter_rows(gh, keep, N) if gh is not None else None
    return (
        _empty_like_or(gh, (0,), h2d.dtype, h2d),
        gw.to(weight.dtype) if gw is not None else weight.new_empty(0),
        gb.to(bias.dtype) if gb is not None else h2d.new_empty(0),
    )


@_flce_rows_grad_op.register_fake
def _(
    h2d,
    weight,
    bias,
    target,
    grad_rows,
    need_h,
    need_w,
    need_b,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    backend,
):
    return (
        h2d.new_empty(h2d.shape if need_h else (0,)),
        weight.new_empty(weight.shape if need_w else (0,)),
        (bias.new_empty(bias.shape) if need_b else h2d.new_empty(0)),
    )


def _flce_rows_setup(ctx, inputs, output):
    h2d, weight, bias, target, *rest = inputs
    ctx.save_for_backward(h2d, weight, bias, target)
    ctx.rest = rest


def _flce_rows_backward(ctx, grad_rows):
    h2d, weight, bias, target = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = bias is not None and ctx.needs_input_grad[2]
    if not (need_h or need_w or need_b):
        return (None,) * 9
    gh, gw, gb = _flce_rows_grad_op(
        h2d, weight, bias, target, grad_rows.contiguous(), need_h, need_w, need_b, *ctx.rest
    )
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None) + (None,) * 6


_flce_rows_op.register_autograd(_flce_rows_backward, setup_context=_flce_rows_setup)


# Per-token losses with a frozen weight (and bias): every LoRA / QLoRA head, what DPO's log-probs
# train through. The gradient w.r.t. a token's hidden state is then its upstream factor times
# d loss_t / d h_t, a vector forward can compute chunk by chunk from the logits it already has
# (one GEMM more there, none in backward): backward is one row scaling, it recomputes no logits and
# needs no chunk buffer, and what is kept is that (tokens, H) gradient instead of the hidden states.
@torch.library.custom_op("fastft::flce_rows_hgrad", mutates_args=())
def _flce_rows_hgrad_op(
    h2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-token losses, d loss_t / d h_t)``: fp32 ``(N,)`` and ``(N, H)`` in ``h2d``'s dtype, 0 for
    ignored tokens."""
    opts = _opts(ignore_index, label_smoothing, z_loss, softcap)
    N = h2d.shape[0]
    with _no_autocast(h2d.device.type):
        keep, hk, tk, rows, chunk = _setup_rows(h2d, weight, target, ignore_index, backend, False)
        loss = torch.empty(hk.shape[0], device=h2d.device, dtype=torch.float32)
        gh = torch.empty_like(hk)
        one = torch.ones(1, device=h2d.device, dtype=torch.float32)
        if hk.shape[0]:
            _chunked_grads(hk, weight, bias, tk, opts, rows, chunk, lambda s, e: one, gh, None, None, loss)
        return _scatter_rows(loss, keep, N), _scatter_rows(gh, keep, N)


@_flce_rows_hgrad_op.register_fake
def _(h2d, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, backend):
    return h2d.new_empty(h2d.shape[0], dtype=torch.float32), h2d.new_empty(h2d.shape)


def _flce_rows_hgrad_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _flce_rows_hgrad_backward(ctx, grad_rows, _):
    if grad_rows is None:
        return (None,) * 9
    (gh,) = ctx.saved_tensors
    g = torch.mul(gh, grad_rows.float().unsqueeze(1))  # fp32 product (promotion), one rounding to h's dtype
    return (g.to(gh.dtype),) + (None,) * 8


_flce_rows_hgrad_op.register_autograd(_flce_rows_hgrad_backward, setup_context=_flce_rows_hgrad_setup)
