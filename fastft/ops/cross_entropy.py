"""Cross-entropy and fused linear cross-entropy.

Per counted token (target ``t != ignore_index``), with raw logits ``x`` of width ``V``::

    z     = s * tanh(x / s)            if softcap=s else x          (fp32)
    lse   = logsumexp(z)
    loss  = (1 - eps) * (lse - z[t]) + eps * (lse - mean(z)) + c * lse**2

``eps`` is ``label_smoothing`` (exactly torch's definition), ``c`` is ``z_loss``.
Ignored tokens contribute 0. ``reduction="mean"`` divides the sum by the number
of counted tokens, or by ``num_items_in_batch`` when given (transformers'
gradient-accumulation convention); a batch with nothing counted gives 0, not NaN.

Backward, for one token with upstream gradient ``g`` (already divided by the
mean's denominator)::

    p        = softmax(z)
    dL/dz_j  = p_j * (1 + 2 c lse) - (1 - eps) [j == t] - eps / V
    dL/dx_j  = g * dL/dz_j * (1 - (z_j / s)**2)          (last factor only with softcap)

A target outside ``[0, V)`` that is not ``ignore_index`` is rejected with a
``ValueError`` when the target lives on the CPU (checking costs nothing there).
On an accelerator the check would need a host synchronisation on every step, so
it is only done when ``FASTFT_CHECK_TARGETS=1``; otherwise the kernels never read
out of bounds and that token's loss (and gradient) is NaN: loud, never silently wrong.

Layers, top to bottom: the public functions (this module) validate then pick a backend
(:mod:`fastft.backends`); the ``torch.library`` operators (:mod:`fastft.ops.ce_ops`) keep the
books and call a backend's *row kernel* ``ce_rows(logits2d, target, ...) -> (loss, lse)`` that
may also write the gradient; the fused linear CE runs it chunk by chunk
(:mod:`fastft.ops.ce_chunked`); :func:`cross_entropy_reference`, the torch row kernel and the
validation live in :mod:`fastft.ops.ce_reference`. :func:`cross_entropy_reference` is the
pure-PyTorch oracle the tests and the benchmarks compare against.

This module re-exports the names of those three, so ``fastft.ops.cross_entropy.chunk_rows`` and
the like keep working; to monkeypatch a helper, patch the module that defines it.
"""

from __future__ import annotations

import torch

from .. import backends
from . import ce_ops  # noqa: F401  (registers the fastft::ce_rows / flce* operators)
from .ce_chunked import (  # noqa: F401  (re-exported)
    _BUDGET_MB,
    _CUDA_MIN_ROWS,
    ROW_ALIGN,
    _accumulate_grad_weight,
    _chunked_grads,
    _counted_rows,
    _empty_like_or,
    _logits_buffer,
    _loss_rows_only,
    _no_autocast,
    _scatter_rows,
    _setup_rows,
    chunk_rows,
    padded_vocab,
)
from .ce_ops import (  # noqa: F401  (re-exported)
    _ce_rows_grad_op,
    _ce_rows_op,
    _flce_op,
    _flce_rows_grad_op,
    _flce_rows_hgrad_op,
    _flce_rows_op,
    _opts,
)
from .ce_reference import (  # noqa: F401  (re-exported)
    _REDUCTIONS,
    OP_CE,
    OP_FLCE,
    _as_denominator,
    _check_float,
    _check_options,
    _check_target,
    _index_dtype,
    _row_kernel,
    ce_rows_torch,
    cross_entropy_reference,
    fused_linear_cross_entropy_reference,
)

__all__ = [
    "cross_entropy",
    "fused_linear_cross_entropy",
    "cross_entropy_reference",
    "fused_linear_cross_entropy_reference",
]


def _finish(loss_rows: torch.Tensor, counted: torch.Tensor, reduction: str, num_items_in_batch):
    """Reduce per-row losses; also return the denominator used by mean (a tensor, no sync)."""
    if reduction == "none":
        return loss_rows, None
    total = loss_rows.sum()
    if reduction == "sum":
        return total, None
    if num_items_in_batch is not None:
        denom = _as_denominator(num_items_in_batch, total.device)
    else:
        denom = counted.sum().clamp(min=1).float()
    return total / denom, denom


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items_in_batch=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``logits`` ``[..., V]`` against integer ``target`` ``[...]``.

    Same result as ``torch.nn.functional.cross_entropy(logits.float().view(-1, V), target.view(-1))``
    plus ``softcap``, ``z_loss`` and ``num_items_in_batch`` (see the module docstring).
    Returns float32: a scalar, or per-token losses shaped like ``target`` for
    ``reduction="none"``. The gradient comes back in ``logits.dtype``.
    """
    _check_float("logits", logits)
    _check_options(reduction, label_smoothing, z_loss, softcap, num_items_in_batch, ignore_index)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
    V = logits.shape[-1]
    _check_target(target, logits.shape[:-1], V, ignore_index, "logits.shape[:-1]")
    target = _index_dtype(target)
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if not torch.compiler.is_compiling():  # an unknown or unavailable forced backend raises here
        backends.select(OP_CE, logits.device, backend)
    logits2d = logits.reshape(-1, V)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    t1d = target.reshape(-1)
    softcap = None if softcap is None else float(softcap)
    loss_rows, _ = torch.ops.fastft.ce_rows(
        logits2d, t1d, ignore_index, float(label_smoothing), float(z_loss), softcap, backend
    )
    # the reduction is plain torch (traced, differentiated by autograd): the per-row
    # gradient the operator's backward receives carries the 1/denominator
    out, _ = _finish(loss_rows, t1d != ignore_index, reduction, num_items_in_batch)
    return out.reshape(target.shape) if reduction == "none" else out


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items_in_batch=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` without materialising the logits.

    ``hidden`` ``[..., H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None, ``target`` ``[...]``.
    Same semantics and keywords as :func:`cross_entropy`. The tokens are processed in
    chunks (:func:`chunk_rows`, sized for a trainable or a frozen ``weight``: with
    ``weight.requires_grad`` False no ``grad_weight`` is computed at all); ``grad_weight`` and
    ``grad_bias`` accumulate in fp32 across chunks and come back in the parameters' dtypes.
    Ignored tokens are left out of every GEMM; finding them is the call's one host
    synchronisation on a GPU (none under torch.compile or CUDA-graph capture, where every
    row runs). The chunk's logits buffer has its row stride padded to ``ROW_ALIGN`` on a GPU.
    """
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    _check_options(reduction, label_smoothing, z_loss, softcap, num_items_in_batch, ignore_index)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden shape {tuple(hidden.shape)} does not match weight shape {tuple(weight.shape)}: "
            f"hidden[..., H] needs H == weight.shape[1] == {weight.shape[1]}"
        )
    V, H = weight.shape
    if V == 0:
        raise ValueError(f"weight has an empty vocabulary dimension, shape {tuple(weight.shape)}")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match weight's vocabulary size ({V},)")
    dev = hidden.device.type
    autocast = dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)
    if autocast:  # run the GEMMs in the autocast dtype, as nn.Linear would, then turn autocast off inside
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden dtype {hidden.dtype} does not match weight dtype {weight.dtype}")
    _check_target(target, hidden.shape[:-1], V, ignore_index, "hidden.shape[:-1]")
    target = _index_dtype(target)
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if not torch.compiler.is_compiling():  # an unknown or unavailable forced backend raises here
        backends.select(OP_FLCE, hidden.device, backend)
    h2d = hidden.reshape(-1, H)
    if not h2d.is_contiguous():
        h2d = h2d.contiguous()
    t1d = target.reshape(-1)
    opts = (ignore_index, float(label_smoothing), float(z_loss), None if softcap is None else float(softcap))
    grad = torch.is_grad_enabled()
    if reduction == "none":
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        if grad and h2d.requires_grad and frozen:  # see fastft::flce_rows_hgrad
            out = torch.ops.fastft.flce_rows_hgrad(h2d, weight, bias, t1d, *opts, backend)[0]
        else:
            out = torch.ops.fastft.flce_rows(h2d, weight, bias, t1d, *opts, backend)
        return out.reshape(target.shape)
    need_h, need_w = grad and h2d.requires_grad, grad and weight.requires_grad
    need_b = grad and bias is not None and bias.requires_grad
    if reduction == "mean":
        if num_items_in_batch is not None:
            denom = _as_denominator(num_items_in_batch, h2d.device)
        else:
            denom = (t1d != ignore_index).sum().clamp(min=1).float()
    else:
        denom = torch.ones((), device=h2d.device, dtype=torch.float32)
    loss, *_ = torch.ops.fastft.flce(h2d, weight, bias, t1d, denom, need_h, need_w, need_b, *opts, backend)
    return loss
