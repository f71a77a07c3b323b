"""The preference objectives in the trainer (``TrainConfig.objective`` dpo / orpo / simpo / kto).

A micro-batch of ``P`` pairs is one forward of ``2P`` rows (chosen, then rejected); the
completion log-probs come from the decoder's hidden states through
:func:`fastft.ops.fused_linear_logprobs` (no logits). The reference is the same PEFT model with
its adapters disabled, under ``no_grad`` (no second copy of the weights), or, with
``precompute_ref`` (always for ``full`` DPO, whose weights move), computed once before the first
step for every train and eval example and kept (and checkpointed) as ``(n, 2)`` tensors.
Gradient accumulation: each micro-batch's summed per-pair loss is divided by the pairs of the
whole optimizer step, so the step's gradient is that of TRL's mean over those pairs.

Under torchrun (see :meth:`PreferenceMixin._through`):

* the policy forward runs *as the forward of* the DDP wrapper / the FSDP2 root
  (``sequence_logps(..., through=)``): DDP's reducer all-reduces only the gradients of a forward it
  saw, and FSDP2's root hooks gather the embedding and head. The reference forward (``no_grad``,
  adapters disabled) bypasses DDP: without gradients the reducer has nothing to do, and going
  through it would broadcast the buffers once more per step. Under FSDP2 it goes through the root
  too, whose hooks gather the (sharded) base weights; the disabled LoRA weights are gathered and
  unused, nothing is reduced (no backward).
* the same micro-batches as one process accumulating ``world x grad_accum`` of them (rank ``r``
  takes ``r::world``): each rank divides by the step's pairs / ``world`` and DDP / FSDP2 average,
  so losses and gradients equal the 1-process run's.
* ``precompute_ref``: rank ``r`` scores the batches ``r::world`` (FSDP2: padded with weight-0
  forwards to the same count), the ``(n, 2)`` tables are summed over ranks (each entry has one
  non-zero contributor, so the sum is exact and every rank ends with the whole table, the one the
  1-process run computes from the same batches: each epoch's shuffle can hand any pair to any
  rank). Rank 0 checkpoints it; a resumed run loads it on every rank.
* evaluation: each rank scores its share of the eval batches; the sums (loss, pairs, accurate
  pairs, margins, rewards) are all-reduced before the means, so the metrics are the whole set's.
* KTO's KL reference point is computed per micro-batch from its own mismatched pairs (as in one
  process accumulating the same micro-batches), not gathered over ranks as TRL's
  ``KTOTrainer`` does: so a 2-rank run equals the 1-process run over the same global batch.
"""

from __future__ import annotations

import torch

from .. import losses as L
from ..preference import preference_batches, sequence_logps, split, tokenize_preferences

_MEAN_LOGPS = ("orpo", "simpo")  # length-normalised (TRL's average_log_prob=True)
_NEEDS_REF = ("dpo", "kto")


def load_preference_data(cfg, tokenizer, train_data, eval_data):
    """(train, eval) :class:`fastft.preference.PreferenceDataset` for ``cfg.objective``."""
    from ..preference import default_preference_records

    if train_data is None:
        train_data = str(cfg.data) if cfg.data is not None else None
    if train_data is None:
        if cfg.objective == "kto":
            raise ValueError("objective kto has no embedded default data; give --data with prompt/completion/label")
        train_data = default_preference_records()
    if eval_data is None and cfg.eval_data is not None:
        eval_data = str(cfg.eval_data)
    kw = dict(objective=cfg.objective, seq_len=cfg.seq_len)
    train = tokenize_preferences(train_data, tokenizer, **kw)
    if eval_data is None:
        return split(train, cfg.eval_frac, cfg.seed)
    return train, tokenize_preferences(eval_data, tokenizer, source_name="eval data", **kw)


class PreferenceMixin:
    """``_Trainer``'s preference path (``self.pref`` is the objective name, or None for SFT)."""

    def _pref_check(self) -> None:
        cfg = self.cfg
        self.use_cache_ref = cfg.objective in _NEEDS_REF and (cfg.precompute_ref or cfg.method == "full")
        if cfg.objective == "kto" and self.use_cache_ref:
            raise ValueError("objective kto needs the live reference (method lora or qlora, without precompute_ref)")
        self.ref_cache: dict[str, torch.Tensor] | None = None
        self.eval_extra: dict = {}

    def _pref_batches(self, ds, *, shuffle: bool, epoch: int) -> list[dict]:
        return preference_batches(ds, batch_size=self.cfg.batch_size, pad_id=self.pad_id, shuffle=shuffle,
                                  seed=self.cfg.seed, epoch=epoch)  # fmt: skip

    def _through(self):
        """The module a log-prob forward must run through: None in one process; under FSDP2 the
        sharded root, always (its hooks gather the parameters); under DDP the wrapper when
        gradients are on (its reducer), else None (nothing to reduce)."""
        if not self.dist.active:
            return None
        if self.fsdp:
            return self.model
        return self.train_model if torch.is_grad_enabled() else None

    def _logps(self, mb: dict, *, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """(per-row summed completion log-probs, per-row scored tokens)."""
        labels = mb[prefix + "labels"]
        lp = sequence_logps(self.hf_model, mb[prefix + "input_ids"], mb[prefix + "attention_mask"], labels,
                            reduction="sum", backend=self.cfg.backend, through=self._through())  # fmt: skip
        return lp, (labels[:, 1:] != -100).sum(-1)

    @torch.no_grad()
    def _ref_logps(self, mb: dict, *, prefix: str = "") -> torch.Tensor:
        with self.peft_model.disable_adapter() if self.peft_model is not None else _nullcontext():
            return self._logps(mb, prefix=prefix)[0]

    @torch.no_grad()
    def _precompute_refs(self) -> None:
        """Reference log-probs of every train and eval pair, once, before the first step (under
        torchrun each rank scores its share of the batches and the tables are summed over ranks)."""
        was = self.model.training
        self.model.eval()
        try:
            cache = {}
            for name, ds in (("train", self.train_ds), ("eval", self.eval_ds)):
                out = torch.zeros(len(ds), 2, dtype=torch.float32, device=self.device)
                batches = self._pref_batches(ds, shuffle=False, epoch=0)
                for b, keep in self.dist.shard(batches, pad=self.fsdp):
                    b = self._to_device(b)
                    with self._autocast():
                        lp = self._ref_logps(b)
                    if keep:
                        out[b["index"]] = torch.stack(lp.float().chunk(2), 1)
                cache[name] = self.dist.all_reduce_sum(out)
        finally:
            self.model.train(was)
        self.ref_cache = cache

    def _pref_loss(self, mb: dict, denom: float, split_name: str) -> tuple[torch.Tensor, L.PreferenceLoss]:
        """The micro-batch's loss (its summed per-pair loss / ``denom``) and the objective's output."""
        cfg, obj = self.cfg, self.cfg.objective
        with self._autocast():
            # the no-grad forwards first: their working memory comes and goes before the policy's
            # activations are held (the peak is the policy forward's, not that plus a reference's)
            if obj in _NEEDS_REF:
                if self.use_cache_ref:
                    ref = self.ref_cache[split_name][mb["index"]]  # (P, 2)
                    ref = torch.cat([ref[:, 0], ref[:, 1]])
                else:
                    ref = self._ref_logps(mb)
            if obj == "kto":
                kl = L.kto_kl(self._kl_logps(mb, policy=True), self._kl_logps(mb, policy=False))
            lp, n = self._logps(mb)
            if obj == "kto":
                out = L.kto_loss(lp.float(), ref.float(), mb["label"].bool(), kl, beta=cfg.beta, reduction="sum")
                return out.loss / denom, out
        lp = lp.float()
        if obj in _MEAN_LOGPS:
            lp_used = lp / n.clamp(min=1)
        else:
            lp_used = lp
        c, r = lp_used.chunk(2)
        if obj == "dpo":
            rc, rr = ref.float().chunk(2)
            nc, nr = n.chunk(2)
            out = L.dpo_loss(c, r, rc, rr, beta=cfg.beta, loss_type=cfg.dpo_loss_type, label_smoothing=cfg.label_smoothing,
                             chosen_lengths=nc.float(), rejected_lengths=nr.float(), reduction="sum")  # fmt: skip
            return out.loss / denom, out
        if obj == "simpo":
            out = L.simpo_loss(c, r, beta=cfg.beta, gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing,
                               reduction="sum")  # fmt: skip
            return out.loss / denom, out
        # orpo: the chosen completions' NLL (mean per token over the micro-batch) + the odds-ratio terms
        nc = n.chunk(2)[0]
        nll = -lp.chunk(2)[0].sum() / nc.sum().clamp(min=1)
        out = L.orpo_loss(c, r, nll, beta=cfg.beta, reduction="sum")
        pairs = c.shape[0]
        return (out.loss + nll * pairs) / denom, out

    @torch.no_grad()
    def _kl_logps(self, mb: dict, *, policy: bool) -> torch.Tensor:
        if policy:
            return self._logps(mb, prefix="kl_")[0].float()
        return self._ref_logps(mb, prefix="kl_").float()

    def _pref_evaluate(self) -> float:
        """Mean per-pair loss over the eval set; reward accuracy / margins / rewards in ``self.eval_extra``
        (all accumulated on the device, summed over ranks, read back once)."""
        model = self.model
        was = model.training
        model.eval()
        # loss, pairs, accurate pairs, margin sum, chosen reward sum, rejected reward sum, n chosen, n rejected
        acc = torch.zeros(8, dtype=torch.float64, device=self.device)
        try:
            with torch.no_grad():
                batches = self._pref_batches(self.eval_ds, shuffle=False, epoch=0)
                for b, w in self.dist.shard(batches, pad=self.fsdp):
                    b = self._to_device(b)
                    loss, out = self._pref_loss(b, 1.0, "eval")
                    c, r = out.chosen_rewards.double(), out.rejected_rewards.double()
                    paired = c.shape == r.shape
                    acc[0] += loss.double() * w
                    acc[1] += b["index"].numel() * w
                    acc[2] += (c > r).double().sum() * w if paired else 0.0
                    acc[3] += (c - r).sum() * w if paired else 0.0
                    acc[4] += c.sum() * w
                    acc[5] += r.sum() * w
                    acc[6] += c.numel() * w
                    acc[7] += r.numel() * w
        finally:
            model.train(was)
        v = self.dist.all_reduce_sum(acc).tolist()
        n = max(v[1], 1.0)
        chosen, rejected = v[4] / max(v[6], 1.0), v[5] / max(v[7], 1.0)
        self.eval_extra = {"eval_rewards/chosen": chosen, "eval_rewards/rejected": rejected}
        if self.cfg.objective != "kto":
            self.eval_extra.update({"eval_rewards/accuracies": v[2] / n, "eval_rewards/margins": v[3] / n})
        else:  # unpaired: TRL's margin is the difference of the two means
            self.eval_extra["eval_rewards/margins"] = chosen - rejected
        return v[0] / n


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
