"""Preference data and the per-sequence log-probs the preference objectives train on.

Records (JSONL / JSON / CSV, a ``datasets.Dataset`` or a list of dicts, read by
:func:`fastft.data.load_records`):

* paired (DPO, ORPO, SimPO): ``prompt``, ``chosen``, ``rejected``, each plain text or, for chat
  data, a list of ``{"role", "content"}`` messages rendered with the tokenizer's chat template
  (``prompt`` the conversation so far, ``chosen`` / ``rejected`` the assistant turn(s));
* unpaired (KTO): ``prompt``, ``completion``, ``label`` (true: desirable).

The prompt is masked (-100): only completion tokens are scored. A batch of ``P`` pairs is one
forward of ``2P`` rows, chosen first then rejected (as TRL concatenates them). Bad data raises
one :class:`fastft.data.DataError` naming the record (the CLI prints it and exits 2).

:func:`sequence_logps` runs the decoder once and scores the completions with
:func:`fastft.ops.fused_linear_logprobs` on the final hidden states: no ``(rows, seq, vocab)``
logits, for the policy and for the reference (the same PEFT model with its adapters disabled).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .data import IGNORE_INDEX, DataError, load_records

__all__ = [
    "PAIRED",
    "UNPAIRED",
    "PreferenceDataset",
    "tokenize_preferences",
    "preference_batches",
    "sequence_logps",
    "default_preference_records",
]

PAIRED = ("dpo", "orpo", "simpo")
UNPAIRED = ("kto",)


@dataclass
class PreferenceStats:
    n_records: int
    n_examples: int
    n_truncated: int
    n_tokens: int
    seq_len: int

    def summary(self) -> str:
        return (
            f"{self.n_records} records -> {self.n_examples} examples, {self.n_truncated} truncated to "
            f"{self.seq_len} tokens, {self.n_tokens} tokens"
        )


@dataclass
class PreferenceDataset:
    """``examples``: dicts of ``prompt`` ids and ``chosen`` / ``rejected`` ids (paired) or ``completion``
    ids and ``label`` (KTO); ``index`` the example's position, the key of precomputed references."""

    examples: list[dict]
    stats: PreferenceStats
    kind: str = "paired"
    records: list = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.examples)


def _text(value, where: str, key: str) -> str | list:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: {key!r} is empty")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return value
    raise DataError(
        f"{where}: {key!r} must be a non-empty string or a list of chat messages, got {type(value).__name__}"
    )


def _render(tokenizer, prompt, completion, where: str) -> tuple[str, str]:
    """(prompt text, completion text); chat messages through the tokenizer's template."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat messages need a tokenizer with a chat template, and this one has none")
    p_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    c_msgs = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    p_text = tokenizer.apply_chat_template(p_msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(p_msgs + c_msgs, tokenize=False)
    if not full.startswith(p_text):
        raise DataError(f"{where}: the chat template does not render the prompt as a prefix of prompt + completion")
    return p_text, full[len(p_text) :]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_preferences(records, tokenizer, *, objective: str, seq_len: int, source_name: str = "data"):
    """Validate and tokenize preference ``records`` for ``objective``; a :class:`PreferenceDataset`."""
    if objective not in PAIRED + UNPAIRED:
        raise ValueError(f"objective must be one of {', '.join(PAIRED + UNPAIRED)}, got {objective!r}")
    recs = load_records(records, name=source_name if not isinstance(records, str) else None)
    paired = objective in PAIRED
    keys = ("prompt", "chosen", "rejected") if paired else ("prompt", "completion", "label")
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(f"{source_name}: the tokenizer has no EOS token, needed to end each completion")
    examples, n_trunc, n_tok = [], 0, 0
    for i, rec in enumerate(recs):
        where = recs.where(i) if hasattr(recs, "where") else f"{source_name} record {i + 1}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a dict, got {type(rec).__name__}")
        missing = [k for k in keys if k not in rec or rec[k] is None]
        if missing:
            want = "prompt, chosen, rejected" if paired else "prompt, completion, label"
            raise DataError(f"{where}: missing {', '.join(repr(k) for k in missing)} ({objective} records need {want})")
        prompt = _text(rec["prompt"], where, "prompt")
        if paired:
            chosen, rejected = _text(rec["chosen"], where, "chosen"), _text(rec["rejected"], where, "rejected")
            if chosen == rejected:
                raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
            comps = [chosen, rejected]
        else:
            label = rec["label"]
            if isinstance(label, str) and label.lower() in ("true", "false", "1", "0"):
                label = label.lower() in ("true", "1")
            if not isinstance(label, (bool, int)) or label not in (0, 1):
                raise DataError(f"{where}: 'label' must be true or false, got {rec['label']!r}")
            comps = [_text(rec["completion"], where, "completion")]
        p_ids, c_ids = None, []
        for comp in comps:
            p_text, c_text = _render(tokenizer, prompt, comp, where)
            if not c_text.strip():
                raise DataError(f"{where}: the completion renders to empty text")
            ids = _ids(tokenizer, p_text)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
            p_ids = ids if p_ids is None else p_ids
            c_ids.append(_ids(tokenizer, c_text) + [eos])
        room = seq_len - len(p_ids)
        if room < 1:
            raise DataError(f"{where}: the prompt alone is {len(p_ids)} tokens, seq_len is {seq_len}; raise --seq-len")
        if any(len(c) > room for c in c_ids):
            n_trunc += 1
            c_ids = [c[:room] for c in c_ids]
        ex = {"index": len(examples), "prompt": p_ids}
        if paired:
            if c_ids[0] == c_ids[1]:
                raise DataError(f"{where}: 'chosen' and 'rejected' are identical after truncation to seq_len={seq_len}")
            ex["chosen"], ex["rejected"] = c_ids
        else:
            ex["completion"], ex["label"] = c_ids[0], bool(label)
        n_tok += sum(len(p_ids) + len(c) for c in c_ids)
        examples.append(ex)
    stats = PreferenceStats(len(recs), len(examples), n_trunc, n_tok, seq_len)
    return PreferenceDataset(examples, stats, "paired" if paired else "unpaired", list(recs))


def split(ds: PreferenceDataset, frac: float, seed: int) -> tuple[PreferenceDataset, PreferenceDataset]:
    """A seeded ``1 - frac`` / ``frac`` split (at least one example on each side)."""
    n = len(ds.examples)
    if n < 2:
        raise DataError(f"{n} preference example(s): too few to split off an eval set; give --eval-data")
    order = list(range(n))
    random.Random(f"fastft-pref-split:{seed}").shuffle(order)
    k = min(max(1, round(n * frac)), n - 1)
    ev, tr = sorted(order[:k]), sorted(order[k:])

    def sub(idx):
        exs = [dict(ds.examples[i], index=j) for j, i in enumerate(idx)]
        st = PreferenceStats(len(idx), len(idx), 0, 0, ds.stats.seq_len)
        st.n_tokens = sum(len(e["prompt"]) * 2 + len(e.get("chosen", e.get("completion", []))) for e in exs)
        return PreferenceDataset(exs, st, ds.kind, [ds.records[i] for i in idx])

    return sub(tr), sub(ev)


def _rows(prompt: list[int], comp: list[int]) -> tuple[list[int], list[int]]:
    return prompt + comp, [IGNORE_INDEX] * len(prompt) + comp


def collate(examples: list[dict], pad_id: int, kind: str) -> dict[str, torch.Tensor]:
    """One forward's tensors: paired -> ``2P`` rows (chosen then rejected), unpaired -> one row each."""
    if kind == "paired":
        pairs = [_rows(e["prompt"], e["chosen"]) for e in examples] + [
            _rows(e["prompt"], e["rejected"]) for e in examples
        ]
    else:
        pairs = [_rows(e["prompt"], e["completion"]) for e in examples]
    T = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(pairs), T), dtype=torch.long)
    for r, (a, lab) in enumerate(pairs):
        ids[r, : len(a)] = torch.tensor(a)
        labels[r, : len(a)] = torch.tensor(lab)
        mask[r, : len(a)] = 1
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "index": torch.tensor([e["index"] for e in examples]),
    }
    if kind != "paired":
        out["label"] = torch.tensor([e["label"] for e in examples])
        # KTO's reference point: each prompt with the next example's completion (TRL's mismatched pairs)
        kl = [_rows(e["prompt"], examples[(i + 1) % len(examples)]["completion"]) for i, e in enumerate(examples)]
        Tk = max(len(a) for a, _ in kl)
        out["kl_input_ids"] = torch.full((len(kl), Tk), pad_id, dtype=torch.long)
        out["kl_labels"] = torch.full((len(kl), Tk), IGNORE_INDEX, dtype=torch.long)
        out["kl_attention_mask"] = torch.zeros((len(kl), Tk), dtype=torch.long)
        for r, (a, lab) in enumerate(kl):
            out["kl_input_ids"][r, : len(a)] = torch.tensor(a)
            out["kl_labels"][r, : len(a)] = torch.tensor(lab)
            out["kl_attention_mask"][r, : len(a)] = 1
    return out


def preference_batches(ds: PreferenceDataset, *, batch_size: int, pad_id: int, shuffle: bool, seed: int, epoch: int):
    """Micro-batches of ``batch_size`` examples (pairs), shuffled per epoch from the seed."""
    order = list(range(len(ds.examples)))
    if shuffle:
        random.Random(f"fastft-pref-batches:{seed}:{epoch}").shuffle(order)
    return [
        collate([ds.examples[i] for i in order[s : s + batch_size]], pad_id, ds.kind)
        for s in range(0, len(order), batch_size)
    ]


def count_completion_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Scored tokens per row (the shifted labels that are not ignored)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def sequence_logps(
    hf_model, input_ids, attention_mask, labels, *, reduction: str = "sum", backend: str = "auto", through=None
):
    """Per-row completion log-probs of a causal LM without its logits: the decoder's final hidden
    states scored by :func:`fastft.ops.fused_linear_logprobs` against the output embedding
    (soft-capped as the config says). ``hf_model``: the transformers model (inside a PEFT wrapper,
    its LoRA layers are live unless disabled).

    ``through``: a module that must see the computation as its own forward: a
    ``DistributedDataParallel`` wrapper (its reducer only all-reduces the gradients of a forward
    that went through it) or an FSDP2 root (its hooks gather the root's parameters, the embedding
    and the head, and reduce-scatter their gradients). The decoder and the scoring then run as the
    forward of the wrapped module (``through.module`` for DDP, ``through`` itself otherwise): its
    ``forward`` is shadowed by an instance attribute for that one call, so ``through(...)`` runs
    every hook it has around exactly this computation, with the same numbers as a direct call.
    """
    if through is None:
        return _score(hf_model, input_ids, attention_mask, labels, reduction, backend)
    from torch.nn.parallel import DistributedDataParallel

    target = through.module if isinstance(through, DistributedDataParallel) else through
    had = "forward" in target.__dict__
    previous = target.__dict__.get("forward")

    def forward(input_ids, attention_mask, labels):
        return _score(hf_model, input_ids, attention_mask, labels, reduction, backend)

    target.forward = forward
    try:
        return through(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    finally:
        if had:
            target.forward = previous
        else:
            del target.forward


def _score(hf_model, input_ids, attention_mask, labels, reduction: str, backend: str):
    from .ops import fused_linear_logprobs

    decoder = hf_model.get_decoder()
    head = hf_model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(hf_model).__name__} has no output embedding to score completions with")
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state[:, :-1]
    weight = head.weight
    bias = getattr(head, "bias", None)
    if hasattr(head, "base_layer"):  # a PEFT-wrapped head: score with its merged-free base weight
        weight, bias = head.base_layer.weight, getattr(head.base_layer, "bias", None)
    softcap = getattr(hf_model.config, "final_logit_softcapping", None)
    return fused_linear_logprobs(
        hidden, weight, labels[:, 1:], bias, softcap=softcap, reduction=reduction, backend=backend
    )


def default_preference_records(n: int | None = None, seed: int = 0) -> list[dict]:
    """The embedded preference set: each shipped task's prompt (Alpaca format), its correct answer as
    ``chosen`` and the answer of another record of the same task (a wrong word) as ``rejected``."""
    from . import default
    from .training.generation import format_prompt

    recs = load_records(str(default.dataset_path()))
    by_task: dict[str, list[dict]] = {}
    for r in recs:
        by_task.setdefault(r["instruction"], []).append(r)
    rng = random.Random(f"fastft-pref-default:{seed}")
    tok = None
    out = []
    for r in recs:
        others = [o for o in by_task[r["instruction"]] if o["output"] != r["output"]]
        if not others:
            continue
        wrong = rng.choice(others)["output"]
        out.append({"prompt": format_prompt(r, tok, "alpaca"), "chosen": r["output"], "rejected": wrong})
        if n is not None and len(out) >= n:
            break
    return out
