"""The chunked torch side of the fused linear cross-entropy: it never materialises the ``(tokens, V)`` logits.

* chunk sizing: :func:`chunk_rows` (memory budgets per device and head) and :func:`padded_vocab`
  (row stride of the chunk buffer, padded to ``ROW_ALIGN`` on a GPU);
* :func:`_chunked_grads`: per chunk, the logits GEMM into one reused buffer, the row kernel
  turning them into their gradient in place, then the ``grad_h`` / ``grad_w`` / ``grad_b`` GEMMs
  with fp32 accumulators (:func:`_accumulate_grad_weight`); :func:`_loss_rows_only` for the
  forward without gradients;
* the helpers the operators of :mod:`fastft.ops.ce_ops` share: dropping ignored tokens
  (:func:`_counted_rows`, :func:`_scatter_rows`), :func:`_setup_rows`, :func:`_no_autocast`.

Moved out of :mod:`fastft.ops.cross_entropy`, which re-exports these names.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .. import backends
from .ce_reference import OP_FLCE, _row_kernel, ce_rows_torch


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
