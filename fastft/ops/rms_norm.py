"""RMSNorm, with the exact dtype orders of transformers' Llama and Gemma modules.

For each row ``x`` of width ``N`` (all in fp32, whatever the input dtype)::

    rstd = rsqrt(mean(x**2) + eps)
    xhat = x * rstd

then, choosing the order by ``offset``:

* ``offset == 0`` (Llama, ``LlamaRMSNorm`` and most models)::

      out = weight * xhat.to(x.dtype)          # result dtype: promote_types(weight, x)

* ``offset != 0`` (Gemma / Gemma2 / Gemma3 with ``offset=1.0``, ``Gemma2RMSNorm``)::

      out = (xhat * (offset + weight.float())).to(x.dtype)      # result dtype: x.dtype

Backward, with ``dy`` the upstream gradient and ``w' = weight + offset`` (all fp32)::

    dy_w = dy * w'
    dx   = rstd * (dy_w - xhat * mean(dy_w * xhat))                 (in x.dtype)
    dw   = sum over rows of dy * xhat        (Llama order: xhat.to(x.dtype), as the
                                              forward uses it; fp32 sum, then weight.dtype)

The forward saves ``x`` and ``rstd`` (fp32, one per row) only, and recomputes ``xhat``
in the backward. Layers: :func:`rms_norm` validates, then calls the ``torch.library``
operators ``fastft::rms_norm_fwd`` / ``fastft::rms_norm_bwd`` (fake implementations and the
autograd formula registered, so torch.compile traces them without a graph break), which
pick the backend at run time (:mod:`fastft.backends`); a backend is a pair ``fwd(x2d, weight, eps, offset) -> (out2d, rstd)`` and
``bwd(dy2d, x2d, weight, rstd, offset, need_dx, need_dw) -> (dx, dw)``;
:func:`rms_norm_reference` is the pure-PyTorch oracle, written like the modules.
"""

from __future__ import annotations

import math

import torch

from .. import backends

__all__ = ["rms_norm", "rms_norm_reference"]

OP_RMS_NORM = "rms_norm"
backends.register(OP_RMS_NORM, ("triton", "torch"))


# --------------------------------------------------------------------------------------
# reference (pure PyTorch, autograd): the oracle for tests and benchmarks
# --------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """The modules' forward, op for op: ``LlamaRMSNorm`` when ``offset == 0``, else
    ``Gemma2RMSNorm`` with ``1.0`` replaced by ``offset``."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0:
        return weight * h.to(x.dtype)
    return (h * (offset + weight.float())).to(x.dtype)


# --------------------------------------------------------------------------------------
# the torch backend (same contract as fastft.kernels.rms_norm)
# --------------------------------------------------------------------------------------
def rms_norm_fwd_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of the rows of ``x`` ``(rows, N)``: returns ``(out, rstd)``, ``rstd`` fp32 ``(rows,)``.

    Same ops as the modules (so the same bits), in place on the fp32 copy where there is one.
    """
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    h = xf.mul_(rstd) if xf is not x else xf * rstd
    if offset == 0:
        out = weight * h.to(x.dtype)
    else:
        out = h.mul_(offset + weight.float()).to(x.dtype)
    return out, rstd.squeeze(-1)


def rms_norm_bwd_torch(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    need_dx: bool = True,
    need_dw: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`rms_norm_fwd_torch`: ``(dx in x.dtype, dw in weight.dtype)``."""
    r = rstd.unsqueeze(-1)
    xhat = x.float() * r
    dyf = dy.float()
    dx = dw = None
    if need_dw:
        xw = xhat.to(x.dtype) if offset == 0 else xhat
        dw = (dyf * xw).sum(0).to(weight.dtype)  # fp32 product and sum
    if need_dx:
        dyw = dyf * (weight.float() + offset)
        c = (dyw * xhat).mean(-1, keepdim=True)
        dx = dyw.sub_(xhat.mul_(c)).mul_(r).to(x.dtype)
    return dx, dw


# --------------------------------------------------------------------------------------
# the operators (torch.library: traced by torch.compile as one node each, no graph break)
# --------------------------------------------------------------------------------------
@torch.library.custom_op("fastft::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(
    x2d: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, rstd)`` of the rows of ``x2d``; the backend is chosen here, at run time."""
    fwd, _ = _backend(backends.select(OP_RMS_NORM, x2d.device, backend).backend)
    return fwd(x2d, weight, eps, offset)


@_rms_norm_fwd.register_fake
def _(x2d, weight, eps, offset, backend):
    dtype = torch.promote_types(weight.dtype, x2d.dtype) if offset == 0 else x2d.dtype
    return x2d.new_empty(x2d.shape, dtype=dtype), x2d.new_empty(x2d.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastft::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    need_dx: bool,
    need_dw: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dw)``; one not asked for comes back empty (an operator cannot return None)."""
    _, bwd = _backend(backends.select(OP_RMS_NORM, x2d.device, backend).backend)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx, dw = bwd(dy, x2d, weight, rstd, offset, need_dx, need_dw)
    return (dx if dx is not None else x2d.new_empty(0)), (dw if dw is not None else weight.new_empty(0))


@_rms_norm_bwd.register_fake
def _(dy, x2d, weight, rstd, offset, need_dx, need_dw, backend):
    return x2d.new_empty(x2d.shape if need_dx else (0,)), weight.new_empty(weight.shape if need_dw else (0,))


def _setup(ctx, inputs, output):
    x2d, weight, _, offset, backend = inputs
    ctx.save_for_backward(x2d, weight, output[1])
    ctx.offset, ctx.backend = offset, backend


def _grad(ctx, grad_out, _grad_rstd):
    x2d, weight, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dx or need_dw):
        return None, None, None, None, None
    dx, dw = _rms_norm_bwd(grad_out, x2d, weight, rstd, ctx.offset, need_dx, need_dw, ctx.backend)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None


_rms_norm_fwd.register_autograd(_grad, setup_context=_setup)


def _backend(name: str):
    if name == "triton":
        from ..kernels.rms_norm import rms_norm_bwd_triton, rms_norm_fwd_triton

        return rms_norm_fwd_triton, rms_norm_bwd_triton
    return rms_norm_fwd_torch, rms_norm_bwd_torch


# --------------------------------------------------------------------------------------
# validation and the public function
# --------------------------------------------------------------------------------------
def _check_number(name: str, v, *, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or (positive and v <= 0.0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {v!r}")
    return v


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    offset: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` ``[..., N]`` with ``weight`` ``[N]``.

    ``offset=0`` gives ``LlamaRMSNorm``'s result (dtype ``promote_types(weight, x)``),
    ``offset=1.0`` gives ``Gemma2RMSNorm``'s (dtype ``x.dtype``); see the module docstring.
    Gradients flow to ``x`` and ``weight``.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if not torch.is_tensor(weight):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    N = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != N:
        raise ValueError(f"weight must be 1-D of size x.shape[-1] = {N}, got shape {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    eps = _check_number("eps", eps, positive=True)
    offset = _check_number("offset", offset, positive=False)

    if not torch.compiler.is_compiling():  # an unknown or unavailable forced backend raises here
        backends.select(OP_RMS_NORM, x.device, backend)
    elif backends.traces_reference(OP_RMS_NORM, x.device, backend):  # inductor fuses it (see backends)
        return rms_norm_reference(x, weight, eps, offset)
    x2d = x.reshape(-1, N)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out, _ = torch.ops.fastft.rms_norm_fwd(x2d, weight, eps, offset, backend)
    return out.reshape(x.shape)
