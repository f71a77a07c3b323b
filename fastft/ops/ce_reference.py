"""Cross-entropy's definition and checks: the pure-PyTorch reference, the torch row kernel, validation.

* :func:`cross_entropy_reference` / :func:`fused_linear_cross_entropy_reference`: the formulas of
  :mod:`fastft.ops.cross_entropy`, written plainly with autograd; the oracle of the tests and the
  baseline of the benchmarks.
* :func:`ce_rows_torch`: the torch backend's *row kernel* ``(logits2d, target) -> (loss, lse)``,
  optionally writing the gradient; same contract as :func:`fastft.kernels.cross_entropy.ce_rows_triton`.
  :func:`_row_kernel` picks one of the two by backend name.
* host-side validation that runs before any kernel (``_check_*``), and the backend registrations
  of ``cross_entropy`` / ``fused_linear_cross_entropy`` (:mod:`fastft.backends`).

Moved out of :mod:`fastft.ops.cross_entropy`, which re-exports these names.
"""

from __future__ import annotations

import math
import os

import torch

from .. import backends

_REDUCTIONS = ("mean", "sum", "none")
OP_CE = "cross_entropy"
OP_FLCE = "fused_linear_cross_entropy"
backends.register(OP_CE, ("triton", "torch"))
backends.register(OP_FLCE, ("triton", "torch"))


# --------------------------------------------------------------------------------------
# reference (pure PyTorch, autograd): the oracle for tests and benchmarks
# --------------------------------------------------------------------------------------
def cross_entropy_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items_in_batch=None,
) -> torch.Tensor:
    """The definition, written plainly with autograd. Returns float32."""
    V = logits.shape[-1]
    x = logits.reshape(-1, V).float()
    t = target.reshape(-1)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    counted = t != ignore_index
    safe_t = torch.where(counted, t, torch.zeros_like(t)).long()
    lse = torch.logsumexp(x, dim=-1)
    nll = lse - x.gather(1, safe_t.unsqueeze(1)).squeeze(1)
    loss = (1.0 - label_smoothing) * nll
    if label_smoothing:
        loss = loss + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(target.shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / _as_denominator(num_items_in_batch, total.device)
    return total / counted.sum().clamp(min=1)


def fused_linear_cross_entropy_reference(hidden, weight, target, bias=None, **kwargs) -> torch.Tensor:
    """``cross_entropy_reference(hidden @ weight.T + bias, target)``: materialises the logits."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return cross_entropy_reference(logits, target, **kwargs)


# --------------------------------------------------------------------------------------
# the torch row kernel (same contract as fastft.kernels.cross_entropy.ce_rows_triton)
# --------------------------------------------------------------------------------------
def ce_rows_torch(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    scratch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and log-sum-exp of each row of ``logits`` ``(N, V)``; optionally its gradient.

    ``target`` is ``(N,)`` integer. Returns ``(loss, lse)``, both ``(N,)`` float32, with
    loss 0 on ignored rows and NaN on rows whose target is out of range.
    When ``grad_scale`` (float32, one element or ``(N,)``) is given, writes
    ``grad_scale * dloss/dlogits`` into ``grad_out`` (``(N, V)``, any float dtype; it may
    be ``logits`` itself, for an in-place gradient). ``workspace`` (torch backend only) is an
    optional fp32 ``(N, V)`` buffer used as scratch when ``grad_out`` is not fp32, so that a
    caller looping over chunks allocates it once. ``scratch`` (loss only, fp32 ``logits``): the
    caller's logits buffer may be overwritten, so the log-sum-exp runs in it, in place, instead
    of in an ``(N, V)`` temporary of ``torch.logsumexp``'s.
    """
    N, V = logits.shape
    counted = target != ignore_index
    valid = (target >= 0) & (target < V)
    safe_t = torch.where(valid, target, torch.zeros_like(target)).long().unsqueeze(1)
    nan = torch.full((N,), float("nan"), device=logits.device)

    if grad_scale is None and scratch and logits.dtype == torch.float32 and softcap is None:
        z_t = logits.gather(1, safe_t).squeeze(1)
        mean_z = logits.mean(dim=-1) if label_smoothing else None
        m = logits.amax(dim=-1, keepdim=True)
        lse = m.squeeze(1) + logits.sub_(m).exp_().sum(dim=-1).log()
    elif grad_scale is None:  # loss only: never write into the caller's logits
        z = logits.float()
        tanh = None
        if softcap is not None:
            z = torch.tanh(z / softcap).mul_(softcap)
        lse = torch.logsumexp(z, dim=-1)
        z_t = z.gather(1, safe_t).squeeze(1)
        mean_z = z.mean(dim=-1) if label_smoothing else None
    else:
        # One fp32 working buffer of (N, V) holds z, then exp(z - max), then the gradient:
        # grad_out itself when it is fp32 (it may be logits), else an fp32 copy of the logits.
        if grad_out.dtype == torch.float32:
            work = grad_out
            if work.data_ptr() != logits.data_ptr():
                work.copy_(logits)
        elif workspace is not None:
            work = workspace.copy_(logits)
        else:
            work = logits.float()
        tanh = None
        if softcap is not None:
            tanh = torch.tanh(work.div_(softcap))  # (N, V) extra buffer, softcap only
            torch.mul(tanh, softcap, out=work)
        z_t = work.gather(1, safe_t).squeeze(1)
        mean_z = work.mean(dim=-1) if label_smoothing else None
        m = work.amax(dim=-1, keepdim=True)
        work.sub_(m).exp_()
        sumexp = work.sum(dim=-1)
        lse = m.squeeze(1) + sumexp.log()

    loss = (1.0 - label_smoothing) * (lse - z_t)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - mean_z)
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(counted, torch.where(valid, loss, nan), torch.zeros_like(loss))

    if grad_scale is not None:
        # per-row factor: upstream grad, zero on ignored rows, NaN on out-of-range ones
        row = grad_scale.float().expand(N) * torch.where(counted, torch.where(valid, 1.0, nan), 0.0)
        # dL/dz = softmax * (1 + 2 c lse) - (1 - eps) onehot - eps / V, all times row
        p_factor = row / sumexp
        if z_loss:
            p_factor = p_factor * (1.0 + 2.0 * z_loss * lse)
        work.mul_(p_factor.unsqueeze(1))
        work.scatter_add_(1, safe_t, (-(1.0 - label_smoothing) * row).unsqueeze(1))
        if label_smoothing:
            work.sub_((label_smoothing / V * row).unsqueeze(1))
        if tanh is not None:
            work.mul_(tanh.square_().neg_().add_(1.0))
        if work is not grad_out:
            grad_out.copy_(work)
    return loss, lse


# --------------------------------------------------------------------------------------
# validation (host-side, before any kernel)
# --------------------------------------------------------------------------------------
def _as_denominator(num_items_in_batch, device) -> torch.Tensor:
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device=device, dtype=torch.float32)
    return torch.tensor(float(num_items_in_batch), device=device, dtype=torch.float32)


def _check_options(reduction, label_smoothing, z_loss, softcap, num_items_in_batch, ignore_index):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not (0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if float(z_loss) < 0.0 or not math.isfinite(float(z_loss)):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and not (float(softcap) > 0.0 and math.isfinite(float(softcap))):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    f"num_items_in_batch must be a number or a one-element tensor, got shape "
                    f"{tuple(num_items_in_batch.shape)}"
                )
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
            raise TypeError(f"num_items_in_batch must be a number or a tensor, got {type(num_items_in_batch).__name__}")
        elif num_items_in_batch <= 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch!r}")
        if reduction != "mean":
            raise ValueError(f"num_items_in_batch only applies to reduction='mean', got reduction={reduction!r}")


def _check_target(target: torch.Tensor, lead_shape, V: int, ignore_index: int, what: str):
    if not torch.is_tensor(target):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(f"target shape {tuple(target.shape)} does not match {what} {tuple(lead_shape)}")
    want_check = target.device.type == "cpu" or os.environ.get("FASTFT_CHECK_TARGETS", "0") == "1"
    if want_check and target.numel() and not torch.compiler.is_compiling():
        bad = (target != ignore_index) & ((target < 0) | (target >= V))
        if bool(bad.any()):
            first = target[bad][0].item()
            raise ValueError(
                f"target contains {first} which is outside [0, {V}) and is not ignore_index={ignore_index}"
            )


def _index_dtype(target: torch.Tensor) -> torch.Tensor:
    """int32/int64 targets go to the kernels as they are; other integer dtypes become int64."""
    return target if target.dtype in (torch.int32, torch.int64) else target.long()


def _check_float(name: str, t: torch.Tensor):
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


# --------------------------------------------------------------------------------------
# backend row kernels
# --------------------------------------------------------------------------------------
def _row_kernel(backend: str):
    if backend == "triton":
        from ..kernels.cross_entropy import ce_rows_triton

        return ce_rows_triton
    return ce_rows_torch
