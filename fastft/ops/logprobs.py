"""Fused linear log-probabilities: each sequence's log-probability of its targets under
``hidden @ weight.T + bias``, never materialising the logits (what DPO / ORPO / SimPO / KTO need).

Per counted token (``target != ignore_index``), with raw logits ``x``::

    z       = s * tanh(x / s)  if softcap=s else x                (fp32)
    logp_t  = z[t] / T - logsumexp(z / T)                         (temperature T)
            = -CE_row(hidden / T, weight, bias / T, softcap = s / T)

since ``(s/T) tanh((x/T) / (s/T)) = z / T``. So the op *is* the per-token ("none") fused linear
cross-entropy of :mod:`fastft.ops.cross_entropy` (its ``fastft::flce_rows`` operator: the same
chunking, the same Triton / torch row kernels, fp32 accumulation, ignored rows left out of the
GEMMs, logits recomputed per chunk in backward), negated, then summed per sequence (the last
dimension of ``target``) or per packed segment. Backward: ``d logp_t / d x = onehot(t) - softmax``
through the same kernels, with the upstream gradient of each token being that of its sequence.

Memory: one chunk of fp32 logits (:func:`fastft.ops.cross_entropy.chunk_rows`) instead of
``tokens x vocab``; the only tensors of the op's own are the ``(..., T)`` per-token log-probs.
"""

from __future__ import annotations

import math

import torch

from .cross_entropy import fused_linear_cross_entropy

__all__ = ["fused_linear_logprobs", "fused_linear_logprobs_reference"]

_REDUCTIONS = ("sum", "mean", "none")


def _check(target, reduction, temperature, softcap, segment_ids, num_segments):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not softcap > 0 or not math.isfinite(softcap)):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if reduction != "none" and target.dim() < 1:
        raise ValueError("target must have a sequence dimension (its last) for reduction sum/mean, got a 0-d tensor")
    if segment_ids is None:
        if num_segments is not None:
            raise ValueError("num_segments is given without segment_ids")
        return
    if reduction == "none":
        raise ValueError("segment_ids needs reduction 'sum' or 'mean' (reduction 'none' is per token)")
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype.is_floating_point or segment_ids.is_complex():
        raise TypeError(
            f"segment_ids must be an integer tensor, got {getattr(segment_ids, 'dtype', type(segment_ids))}"
        )
    if segment_ids.shape != target.shape:
        raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} must equal target shape {tuple(target.shape)}")
    if segment_ids.device != target.device:
        raise ValueError(f"segment_ids is on {segment_ids.device} but target is on {target.device}")
    if num_segments is not None and (
        isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1
    ):
        raise ValueError(f"num_segments must be a positive int, got {num_segments!r}")


def _reduce(tok: torch.Tensor, counted: torch.Tensor, reduction, segment_ids, num_segments) -> torch.Tensor:
    """Per-token log-probs ``tok`` (0 where not counted) to per-sequence / per-segment values."""
    if reduction == "none":
        return tok
    if segment_ids is None:
        total = tok.sum(-1)
        return total if reduction == "sum" else total / counted.sum(-1).clamp(min=1)
    if num_segments is None:  # one host read of the largest id (none when segment_ids is on the CPU)
        num_segments = max(int(segment_ids.max()) + 1, 1) if segment_ids.numel() else 1
    valid = segment_ids >= 0  # negative ids: no segment (padding)
    if segment_ids.device.type == "cpu" and segment_ids.numel() and int(segment_ids.max()) >= num_segments:
        raise ValueError(f"segment_ids has an id >= num_segments ({num_segments})")
    idx = torch.where(valid, segment_ids, 0).long()
    w = valid & counted
    lead = tok.shape[:-1]
    out = tok.new_zeros(*lead, num_segments).scatter_add(-1, idx, torch.where(w, tok, 0.0))
    if reduction == "sum":
        return out
    n = tok.new_zeros(*lead, num_segments).scatter_add(-1, idx, w.to(tok.dtype))
    return out / n.clamp(min=1)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    reduction: str = "sum",
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Log-probabilities of ``target`` under ``hidden @ weight.T + bias`` (softcapped, divided by
    ``temperature``), without the logits. fp32 result, with backward to hidden, weight and bias.

    ``hidden`` ``[..., T, H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None, ``target``
    ``[..., T]`` (already shifted: ``target[..., i]`` is the token ``hidden[..., i, :]`` predicts;
    ``ignore_index`` marks prompt and padding positions). ``reduction``: ``"sum"`` (``[...]``,
    each sequence's summed log-probability, DPO's), ``"mean"`` (``[...]``, divided by its counted
    tokens, ORPO's / SimPO's; 0 for a sequence with none) or ``"none"`` (``[..., T]``, 0 at ignored
    positions). ``segment_ids`` ``[..., T]`` (ints, negative for none) sums per packed segment
    instead: ``[..., num_segments]``; without ``num_segments`` it is read off the largest id (one
    host synchronisation on a GPU). ``backend``: as :func:`fused_linear_cross_entropy` (its
    ``fused_linear_cross_entropy`` backend choice, forced ones raise when they cannot run).
    """
    _check(target, reduction, temperature, softcap, segment_ids, num_segments)
    t = float(temperature)
    if t != 1.0:  # z/T = softcap(x/T) with the cap divided by T as well (module docstring)
        if isinstance(hidden, torch.Tensor) and hidden.is_floating_point():
            hidden = hidden * (1.0 / t)
        if isinstance(bias, torch.Tensor) and bias.is_floating_point():
            bias = bias * (1.0 / t)
        softcap = None if softcap is None else float(softcap) / t
    ce = fused_linear_cross_entropy(
        hidden, weight, target, bias, ignore_index=ignore_index, softcap=softcap, reduction="none", backend=backend
    )  # validates the shapes, dtypes and devices; (..., T) fp32, 0 at ignored tokens
    return _reduce(-ce, target != ignore_index, reduction, segment_ids, num_segments)


def fused_linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    reduction: str = "sum",
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
) -> torch.Tensor:
    """The materialised-logits oracle: fp32 logits, softcap, ``/ temperature``, ``log_softmax``, gather."""
    _check(target, reduction, temperature, softcap, segment_ids, num_segments)
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    counted = target != ignore_index
    tok = logp.gather(-1, torch.where(counted, target, 0).long().unsqueeze(-1)).squeeze(-1)
    tok = torch.where(counted, tok, 0.0)
    return _reduce(tok, counted, reduction, segment_ids, num_segments)
