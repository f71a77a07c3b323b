"""Preference objectives as pure functions of per-sequence log-probabilities.

Every function takes per-sequence log-probabilities (summed over the completion tokens for DPO
and KTO, averaged per token for ORPO and SimPO, as TRL computes them; see
:func:`fastft.ops.fused_linear_logprobs` for getting them without logits) and returns a
:class:`PreferenceLoss` ``(loss, chosen_rewards, rejected_rewards)``. The formulas are TRL 1.16's:
``DPOTrainer._compute_loss`` (DPO and its loss types), ``CPOTrainer.cpo_loss`` (SimPO),
``ORPOTrainer.odds_ratio_loss`` (ORPO) and ``KTOTrainer._compute_loss`` (KTO); the tests run
TRL's own code as the oracle, on the loss and its gradients. No function reads a value back
to the host: :func:`reward_metrics` returns 0-d tensors (TRL's ``rewards/*`` and ``logps/*``).

``reduction``: ``"mean"`` (TRL's), ``"sum"`` (for gradient accumulation over micro-batches:
divide by the pairs of the whole step) or ``"none"`` (per pair / per example).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "DPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "PreferenceLoss",
    "dpo_loss",
    "simpo_loss",
    "orpo_loss",
    "kto_loss",
    "kto_kl",
    "reward_metrics",
]

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm",
)  # fmt: skip
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
_NEEDS_LENGTHS = ("ipo", "sigmoid_norm")


class PreferenceLoss(NamedTuple):
    loss: torch.Tensor  # reduced as asked
    chosen_rewards: torch.Tensor  # (n_chosen,), detached
    rejected_rewards: torch.Tensor  # (n_rejected,), detached


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _check(name: str, reduction: str, beta: float, **seqs) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{name}: reduction must be mean, sum or none, got {reduction!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"{name}: beta must be a positive number, got {beta!r}")
    shape = None
    for k, v in seqs.items():
        if v is None:
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: {k} must be a tensor, got {type(v).__name__}")
        if v.dim() != 1 or not v.is_floating_point():
            raise ValueError(
                f"{name}: {k} must be a 1-D float tensor (one value per sequence), got {tuple(v.shape)} {v.dtype}"
            )
        if shape is not None and v.shape != shape:
            raise ValueError(f"{name}: {k} has shape {tuple(v.shape)}, expected {tuple(shape)} like the others")
        shape = v.shape


def _smoothed(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The conservative (cDPO) sigmoid loss: labels flipped with probability ``label_smoothing``."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
    reduction: str = "mean",
) -> PreferenceLoss:
    """DPO and its relatives on ``(pairs,)`` summed completion log-probs of the policy and the reference.

    With ``d = (chosen - ref_chosen) - (rejected - ref_rejected)``: ``sigmoid`` is
    ``-logsigmoid(beta d)`` (TRL 1.16; with ``label_smoothing`` > 0 the conservative cDPO form
    ``-(1-e) logsigmoid(beta d) - e logsigmoid(-beta d)``, as TRL's CPO/AOT losses write it),
    ``robust`` and ``exo_pair`` use ``label_smoothing`` as TRL defines it, ``ipo`` and
    ``sigmoid_norm`` divide each score by its completion token count (``chosen_lengths`` /
    ``rejected_lengths``, required for them). Rewards are ``beta * (logps - ref_logps)``.
    """
    _check("dpo_loss", reduction, beta, chosen_logps=chosen_logps, rejected_logps=rejected_logps,
           ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
           chosen_lengths=None if chosen_lengths is None else chosen_lengths.float(),
           rejected_lengths=None if rejected_lengths is None else rejected_lengths.float())  # fmt: skip
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {loss_type!r}")
    ls = float(label_smoothing)
    if not 0.0 <= ls < 1.0 or (loss_type == "robust" and not ls < 0.5):
        raise ValueError(f"dpo_loss: label_smoothing must lie in [0, {0.5 if loss_type == 'robust' else 1}), got {ls}")
    if loss_type == "exo_pair" and ls == 0.0:
        raise ValueError("dpo_loss: exo_pair needs label_smoothing > 0 (the paper recommends 1e-3)")
    if loss_type in _NEEDS_LENGTHS and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"dpo_loss: loss_type {loss_type!r} needs chosen_lengths and rejected_lengths")
    c_ratio = chosen_logps - ref_chosen_logps  # (pairs,)
    r_ratio = rejected_logps - ref_rejected_logps
    delta = c_ratio - r_ratio
    if loss_type == "sigmoid":
        losses = _smoothed(beta * delta, ls) if ls else -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type in _NEEDS_LENGTHS:
        avg = c_ratio / chosen_lengths.clamp(min=1.0) - r_ratio / rejected_lengths.clamp(min=1.0)
        losses = (avg - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * avg)
    elif loss_type == "robust":
        losses = (-(1 - ls) * F.logsigmoid(beta * delta) + ls * F.logsigmoid(-beta * delta)) / (1 - 2 * ls)
    elif loss_type == "exo_pair":
        qw, ql = torch.sigmoid(beta * delta), torch.sigmoid(-beta * delta)
        losses = qw * (F.logsigmoid(beta * delta) - math.log1p(-ls)) + ql * (F.logsigmoid(-beta * delta) - math.log(ls))
    elif loss_type == "nca_pair":
        cr, rr = beta * c_ratio, beta * r_ratio
        losses = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * c_ratio) - F.logsigmoid(-beta * r_ratio)
    elif loss_type == "sppo_hard":
        losses = (c_ratio - 0.5 / beta) ** 2 + (r_ratio + 0.5 / beta) ** 2
    elif loss_type == "aot":
        d = (
            torch.sort(chosen_logps - rejected_logps, dim=0)[0]
            - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)[0]
        )
        losses = _smoothed(beta * d, ls)
    elif loss_type == "aot_unpaired":
        d = torch.sort(c_ratio, dim=0)[0] - torch.sort(r_ratio, dim=0)[0]
        losses = _smoothed(beta * d, ls)
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * c_ratio)) + torch.sigmoid(beta * r_ratio)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * c_ratio) + (1 - torch.sigmoid(beta * delta))
    else:  # discopop
        logits = beta * delta
        mix = torch.sigmoid(logits / discopop_tau)
        losses = -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix
    return PreferenceLoss(_reduce(losses, reduction), beta * c_ratio.detach(), beta * r_ratio.detach())


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> PreferenceLoss:
    """SimPO (no reference model) on ``(pairs,)`` per-token *mean* completion log-probs:
    ``-(1-e) logsigmoid(beta m) - e logsigmoid(-beta m)`` with ``m = chosen - rejected - gamma/beta``
    (TRL's ``CPOTrainer.cpo_loss``, ``loss_type="simpo"``, ``simpo_gamma=gamma``; SimPO runs with
    ``cpo_alpha=0``, i.e. no NLL term). Rewards are ``beta * logps``."""
    _check("simpo_loss", reduction, beta, chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"simpo_loss: label_smoothing must lie in [0, 1), got {label_smoothing}")
    logits = chosen_logps - rejected_logps - gamma / beta
    losses = _smoothed(beta * logits, float(label_smoothing))
    return PreferenceLoss(_reduce(losses, reduction), beta * chosen_logps.detach(), beta * rejected_logps.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, branching at ``-ln 2`` so that neither branch cancels."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    nll_loss: torch.Tensor,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
) -> PreferenceLoss:
    """ORPO on ``(pairs,)`` per-token *mean* completion log-probs and the chosen NLL (a scalar):
    ``nll - beta * logsigmoid(log_odds)``, ``log_odds = (c - r) - (log(1-e^c) - log(1-e^r))``
    (TRL's ``ORPOTrainer.odds_ratio_loss`` in fp32; ``reduction="mean"`` gives TRL's
    ``nll - mean(beta * ratio)``; ``"sum"``/``"none"`` give the odds-ratio terms only, the caller adds
    its NLL). Rewards are ``beta * logps``."""
    _check("orpo_loss", reduction, beta, chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    c, r = chosen_logps.float(), rejected_logps.float()
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    terms = -beta * F.logsigmoid(log_odds)
    loss = nll_loss + terms.mean() if reduction == "mean" else _reduce(terms, reduction)
    return PreferenceLoss(loss, beta * c.detach(), beta * r.detach())


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: ``mean(kl_logps - ref_kl_logps)`` over the mismatched pairs, detached and
    clamped at 0 (under data parallelism average it over ranks before the clamp, as TRL gathers)."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float = 0.0,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    reduction: str = "mean",
) -> PreferenceLoss:
    """KTO (unpaired) on ``(n,)`` summed completion log-probs, ``desirable`` a bool ``(n,)``:
    desirable ``w_d (1 - sigmoid(beta (ratio - kl)))``, undesirable ``w_u (1 - sigmoid(beta (kl - ratio)))``
    (``apo_zero_unpaired``: ``1 - sigmoid(beta ratio)`` / ``sigmoid(beta ratio)``), mean over all
    examples (TRL's ``KTOTrainer._compute_loss``; ``kl`` from :func:`kto_kl`, 0 when not computed)."""
    _check("kto_loss", reduction, beta, logps=logps, ref_logps=ref_logps)
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"kto_loss: loss_type must be one of {', '.join(KTO_LOSS_TYPES)}; got {loss_type!r}")
    if not isinstance(desirable, torch.Tensor) or desirable.shape != logps.shape:
        raise ValueError(f"kto_loss: desirable must be a bool tensor of shape {tuple(logps.shape)}")
    good = desirable.to(device=logps.device, dtype=torch.bool)
    ratio = logps - ref_logps
    if loss_type == "kto":
        per = torch.where(good, 1 - torch.sigmoid(beta * (ratio - kl)), 1 - torch.sigmoid(beta * (kl - ratio)))
    else:
        per = torch.where(good, 1 - torch.sigmoid(beta * ratio), torch.sigmoid(beta * ratio))
    per = per * torch.where(good, desirable_weight, undesirable_weight)
    rewards = beta * ratio.detach()
    return PreferenceLoss(_reduce(per, reduction), rewards[good], rewards[~good])


def reward_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor | None = None,
    rejected_logps: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """TRL's logged metrics as 0-d tensors (no host sync): ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies`` (chosen reward > rejected reward), ``rewards/margins`` and, when given,
    ``logps/chosen`` / ``logps/rejected``. Paired objectives only (KTO: the two means)."""
    out = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean()}
    if chosen_rewards.shape == rejected_rewards.shape:
        out["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().mean()
        out["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
    else:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    if chosen_logps is not None:
        out["logps/chosen"] = chosen_logps.detach().mean()
    if rejected_logps is not None:
        out["logps/rejected"] = rejected_logps.detach().mean()
    return out
