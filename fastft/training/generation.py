"""Prompts in the template a run was trained with, and greedy generation (before/after samples, ``fastft generate``)."""

from __future__ import annotations

import torch


def format_prompt(record, tokenizer, template: str = "alpaca") -> str:
    """The text a model fine-tuned with ``template`` should continue for ``record``.

    ``record``: a dict (``instruction``/``input`` for alpaca, ``messages`` for chat, ``text``)
    or a plain string (the instruction / user message / raw text).
    """
    from ..data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    if template in ("none", "text"):
        return record if isinstance(record, str) else str(record.get("text", ""))
    if template == "chat":
        if isinstance(record, str):
            msgs = [{"role": "user", "content": record}]
        else:
            msgs = list(record.get("messages", []))
            while msgs and msgs[-1].get("role") == "assistant":
                msgs.pop()
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template, and this one has none")
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if template != "alpaca":
        raise ValueError(f"template must be one of alpaca, chat, none; got {template!r}")
    if isinstance(record, str):
        return ALPACA_PROMPT_NO_INPUT.format(instruction=record)
    inp = record.get("input") or ""
    if inp.strip():
        return ALPACA_PROMPT.format(instruction=record.get("instruction", ""), input=inp)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record.get("instruction", ""))


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 64) -> str:
    """Greedy continuation of ``prompt`` (BOS prepended as the data loader does), new text only."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    try:
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad if pad is not None else eos,
            eos_token_id=eos,
        )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


def _prompt_records(records, fmt: str, n: int) -> list:
    if n <= 0 or fmt == "text":
        return []
    return [r for r in list(records)[:n]]
