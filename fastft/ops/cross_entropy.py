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

Layers, top to bottom: the public functions validate then pick a backend
(:mod:`fastft.backends`); the autograd Functions keep the books and call a
backend's *row kernel* ``ce_rows(logits2d, target, ...) -> (loss, lse)`` that may
also write the gradient; :func:`cross_entropy_reference` is the pure-PyTorch
oracle the tests and the benchmarks compare against.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from .. import backends

__all__ = [
    "cross_entropy",
    "fused_linear_cross_entropy",
    "cross_entropy_reference",
    "fused_linear_cross_entropy_reference",
]

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


# --------------------------------------------------------------------------------------
# cross_entropy on materialised logits
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# fused linear cross-entropy: never materialises the (tokens, V) logits
# --------------------------------------------------------------------------------------
def _counted_rows(t1d: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the tokens that count, or None to run every row.

    Ignored tokens add nothing to the loss or to any gradient, so they are left out of every
    GEMM (prompt tokens masked to -100 are often a third or more of an SFT batch). Finding
    them costs one host synchronisation on a GPU (the count sets the chunk loop), the only one
    of the call; it is skipped under torch.compile tracing and CUDA-graph capture, where a sync
    is not allowed, and when every token counts (no copy of ``hidden`` then)."""
    if t1d.numel() == 0 or torch.compiler.is_compiling():
        return None
    if t1d.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    keep = (t1d != ignore_index).nonzero().squeeze(1)
    return keep if keep.numel() < t1d.numel() else None


# The logits buffer's row stride is padded to a multiple of this many elements (128 bytes in
# bf16): a vocabulary such as GPT-2's 50257 otherwise starts every row at an odd address, which
# costs cuBLAS its aligned tensor-core paths and the row kernel its vectorised loads.
ROW_ALIGN = 64
# Smallest chunk on CUDA, by whether grad_weight is computed. With a trainable head every chunk's
# ``grad_weight += g^T h`` reads and writes the whole fp32 accumulator (8 V H bytes) against 6 n V H
# flops for the chunk's three GEMMs: an arithmetic intensity of 0.75 n flop/byte, so n >= 1024 keeps
# that traffic under ~40% of the GEMM time on an H100 (~300 flop/byte of bf16 tensor-core balance).
# With a frozen head (every LoRA / QLoRA run) there is no accumulator: the GEMMs are (n, H) x (H, V)
# and (n, V) x (V, H), compute-bound from a few hundred rows, so the chunk is sized by memory alone.
_CUDA_MIN_ROWS = {True: 1024, False: 256}
# Default budgets (MiB) for one chunk's logits: CPU with a trainable / a frozen head; CUDA, the same.
_BUDGET_MB = {("cpu", True): 64.0, ("cpu", False): 16.0, ("cuda", True): 512.0, ("cuda", False): 128.0}


def padded_vocab(vocab: int, device_type: str = "cuda") -> int:
    """Row stride of the chunk's logits buffer: ``vocab`` rounded up to ``ROW_ALIGN`` on a GPU."""
    if device_type != "cuda":
        return vocab
    return -(-vocab // ROW_ALIGN) * ROW_ALIGN


def chunk_rows(
    n_tokens: int,
    vocab: int,
    itemsize: int = 4,
    *,
    budget_mb: float | None = None,
    fp32_scratch: bool = True,
    device_type: str = "cpu",
    trainable_weight: bool = True,
) -> int:
    """Tokens per chunk of the fused linear cross-entropy.

    One buffer of ``rows x V`` in the input dtype holds each chunk's logits and then,
    in place, their gradient; it is reused for every chunk. The torch path with a
    non-fp32 input adds an fp32 scratch copy (``fp32_scratch``). The fp32 ``grad_weight``
    accumulator (V x H x 4 bytes), when the head is trainable, comes on top.

    Budgets (``FASTFT_CE_CHUNK_MB`` overrides all of them):

    * CPU, trainable head, 64 MiB. V = 128256 in fp32: 130 rows, rounded down to 128 -> 62.6 MiB,
      against 1 GiB for 2048 tokens of fp32 logits (and as much again for their gradient) unfused.
    * CPU, frozen head, 16 MiB (V = 32000, fp32: 128 rows): no accumulator to amortise, and the
      chunk is live on top of every saved activation at the end of the forward (bench_dpo's peak).
    * CUDA, trainable head, 512 MiB and at least 1024 rows: the GEMMs must outweigh the
      accumulator traffic (see ``_CUDA_MIN_ROWS``). V = 128256, bf16: 2048 rows, 501 MiB.
      With 64 MiB chunks (256 rows) that traffic alone took as long as the three GEMMs on
      an H100 (fused CE 1.9x the unfused time).
    * CUDA, frozen head, 128 MiB and at least 256 rows: no ``grad_weight`` at all, so only
      memory matters. V = 128256, bf16: 512 rows, 125 MiB, against ~10 GiB of logits, their
      fp32 copies and gradients for 8192 tokens on the transformers path.

    Rows are a power of two between 16 and 8192, so the GEMM shapes stay steady.
    """
    env = os.environ.get("FASTFT_CE_CHUNK_MB")
    floor = 16
    if budget_mb is None:
        if env is not None:
            budget_mb = float(env)
        elif device_type == "cuda":
            budget_mb = _BUDGET_MB[("cuda", bool(trainable_weight))]
            floor = _CUDA_MIN_ROWS[bool(trainable_weight)]
        else:
            budget_mb = _BUDGET_MB[("cpu", bool(trainable_weight))]
    # the logits buffer, plus an fp32 scratch copy when the row kernel needs one (torch path, non-fp32)
    per_elem = itemsize + (4 if fp32_scratch and itemsize != 4 else 0)
    rows = int(budget_mb * 2**20 // (padded_vocab(vocab, device_type) * per_elem))
    rows = max(floor, min(rows, 8192))
    rows = 1 << (rows.bit_length() - 1)  # a power of two, for steady GEMM shapes
    return max(1, min(rows, n_tokens))


def _logits_buffer(rows: int, V: int, like: torch.Tensor) -> torch.Tensor:
    """A reusable ``(rows, V)`` logits buffer whose row stride is padded on a GPU (a view)."""
    Vp = padded_vocab(V, like.device.type)
    buf = torch.empty(rows, Vp, device=like.device, dtype=like.dtype)
    return buf if Vp == V else buf[:, :V]


def _chunked_grads(h2d, weight, bias, target, opts, rows, chunk, row_scale, grad_h, grad_w, grad_b, loss_rows=None):
    """For each chunk of tokens: logits = h W^T + b into one reused buffer, the row kernel
    turns them into ``row_scale * dloss/dlogits`` in place, then grad_h[chunk] = g W,
    grad_w += g^T h and grad_b += sum(g) (fp32 accumulators). Reusing the buffers matters
    on the CPU: a fresh 64+ MiB allocation per chunk costs page faults on every touch.
    ``row_scale(s, e)`` gives the fp32 upstream factor (1 element, or e - s)."""
    N = h2d.shape[0]
    V = weight.shape[0]
    n_buf = min(chunk, N)
    ws = None
    if rows is ce_rows_torch and h2d.dtype != torch.float32:
        ws = torch.empty(n_buf, V, device=h2d.device, dtype=torch.float32)
    # On the CPU, MKL runs the logits GEMM faster as (V, n) = W @ h^T than as (n, V) = h @ W^T
    # for small n, and grad_w += g^T h then reads g^T contiguously; the row kernel takes the
    # transposed view. Triton kernels want the vocabulary dimension contiguous.
    transposed = h2d.device.type == "cpu" and rows is ce_rows_torch
    if transposed:
        flat = torch.empty(n_buf * V, device=h2d.device, dtype=h2d.dtype)
    else:
        buf = _logits_buffer(n_buf, V, h2d)  # (n_buf, V), row stride padded on a GPU
    wt = weight.t()
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        hc = h2d[s:e]
        if transposed:
            lt = flat[: (e - s) * V].view(V, e - s)
            if bias is not None:
                torch.addmm(bias.unsqueeze(1), weight, hc.t(), out=lt)
            else:
                torch.mm(weight, hc.t(), out=lt)
            g = lt.t()
        else:
            g = buf[: e - s]
            if bias is not None:
                torch.addmm(bias, hc, wt, out=g)
            else:
                torch.mm(hc, wt, out=g)
        extra = {"workspace": ws[: e - s]} if ws is not None else {}
        lr, _ = rows(g, target[s:e], **opts, grad_scale=row_scale(s, e), grad_out=g, **extra)
        if loss_rows is not None:
            loss_rows[s:e] = lr
        if grad_h is not None:
            torch.mm(g, weight, out=grad_h[s:e])
        if grad_w is not None:
            _accumulate_grad_weight(grad_w, g, hc)
        if grad_b is not None:
            grad_b.add_(g.sum(0, dtype=torch.float32))


def _accumulate_grad_weight(acc: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor):
    """acc (fp32, (V, H)) += dlogits.T @ h, accumulating in fp32 whatever the input dtype."""
    if dlogits.dtype == torch.float32 and h.dtype == torch.float32:
        acc.addmm_(dlogits.t(), h)
    elif acc.is_cuda:
        # fp32 output from a low-precision GEMM (torch >= 2.8 on CUDA)
        try:
            torch.addmm(acc, dlogits.t(), h, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            acc.add_(torch.mm(dlogits.t(), h).float())
    else:
        acc.add_(torch.mm(dlogits.t(), h).float())


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
def _no_autocast(device_type: str):
    """The GEMMs run in the dtype the public function cast to; autocast stays out of them."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _setup_rows(h2d, weight, target, ignore_index, backend, trainable):
    """Counted rows (or None), their hidden states and targets, the row kernel and the chunk."""
    choice = backends.select(OP_FLCE, h2d.device, backend)
    keep = _counted_rows(target, ignore_index)
    if keep is not None:
        h2d, target = h2d.index_select(0, keep), target.index_select(0, keep)
    chunk = chunk_rows(
        h2d.shape[0],
        weight.shape[0],
        h2d.element_size(),
        fp32_scratch=choice.backend == "torch",
        device_type=h2d.device.type,
        trainable_weight=trainable,
    )
    return keep, h2d, target, _row_kernel(choice.backend), chunk


def _loss_rows_only(h2d, weight, bias, target, opts, rows, chunk) -> torch.Tensor:
    """Per-row losses, chunk by chunk, in one reused (row-padded) logits buffer."""
    N, V = h2d.shape[0], weight.shape[0]
    loss_rows = torch.empty(N, device=h2d.device, dtype=torch.float32)
    buf = _logits_buffer(min(chunk, N), V, h2d) if N else None
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        logits = buf[: e - s]
        if bias is not None:
            torch.addmm(bias, h2d[s:e], weight.t(), out=logits)
        else:
            torch.mm(h2d[s:e], weight.t(), out=logits)
        extra = {"scratch": True} if rows is ce_rows_torch else {}  # the buffer is ours: lse in place
        loss_rows[s:e] = rows(logits, target[s:e], **opts, **extra)[0]
    return loss_rows


def _scatter_rows(rows_kept: torch.Tensor, keep, n_all: int) -> torch.Tensor:
    """Rows of the counted tokens back into ``n_all`` rows (zeros for the ignored ones)."""
    if keep is None:
        return rows_kept
    full = rows_kept.new_zeros((n_all,) + tuple(rows_kept.shape[1:]))
    return full.index_copy_(0, keep, rows_kept)


def _empty_like_or(t: torch.Tensor | None, shape, dtype, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like.new_empty(shape, dtype=dtype)


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
