"""Tiny Hugging Face causal LMs with random weights, built from transformers' config classes.

Used by the tests, the benchmarks and the embedded default: no model hub needed.
"""

from __future__ import annotations

import torch

# model_type -> config overrides on top of the common tiny shape
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "gemma2": {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "head_dim": 16},
    "phi3": {},
    "gpt2": {"n_positions": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
}


def tiny_config(family: str, *, vocab_size: int = 256, hidden_size: int = 64, layers: int = 2, **overrides):
    """A config of ``family`` (a transformers model_type) small enough for a CPU test."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "gpt2":
        common = dict(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=layers,
            n_head=4,
            n_inner=2 * hidden_size,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    kw = {**common, **FAMILIES[family], **overrides}
    cfg = AutoConfig.for_model(family, **kw)
    cfg.use_cache = False
    return cfg


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """A randomly initialised ``AutoModelForCausalLM`` of ``family`` in eager attention."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=dtype)
    return model


def tiny_batch(vocab_size: int, *, batch: int = 2, seq: int = 16, seed: int = 1, ignore_frac: float = 0.25):
    """input_ids, attention_mask and labels (with some -100) for a tiny model."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    labels = input_ids.clone()
    mask = torch.rand(batch, seq, generator=g) < ignore_frac
    labels[mask] = -100
    attention_mask = torch.ones_like(input_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def hard_batch(vocab_size: int, *, batch: int = 3, seq: int = 16, seed: int = 2):
    """A batch that exercises what one plain batch does not: row 0 left-padded (attention_mask 0,
    labels -100 on the padding), row 1 with every label ignored, the rest ordinary."""
    out = tiny_batch(vocab_size, batch=batch, seq=seq, seed=seed)
    pad = seq // 3
    out["input_ids"][0, :pad] = 0
    out["attention_mask"][0, :pad] = 0
    out["labels"][0, :pad] = -100
    if batch > 1:
        out["labels"][1] = -100
    return out


def packed_batch(vocab_size: int, *, lengths=(5, 7, 4), seed: int = 3):
    """One row holding several sequences back to back, ``position_ids`` restarting at each
    (transformers' padding-free packing: the mask is derived from the position ids); each
    sequence's first label is -100 so no token is predicted across a boundary."""
    g = torch.Generator().manual_seed(seed)
    seq = sum(lengths)
    input_ids = torch.randint(3, vocab_size, (1, seq), generator=g)
    labels = input_ids.clone()
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels[position_ids == 0] = -100
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
