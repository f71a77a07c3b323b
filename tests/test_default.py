"""The embedded default of ``fastft train``: tokenizer, base model, shipped dataset, generator, learnability."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib

import torch

from fastft import default
from fastft.default import tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _records():
    return [json.loads(line) for line in default.dataset_path().read_text().splitlines()]


def _prompt(r):
    return (tasks.PROMPT_INPUT if r["input"] else tasks.PROMPT_NO_INPUT).format(**r)


def test_tokenizer_round_trips_and_specials():
    tok = default.load_tokenizer()
    assert tok.pad_token == "<pad>" and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.model_max_length == 1024 and tok.padding_side in ("left", "right")
    assert len(tok) == default.model_config().vocab_size
    for r in _records()[:200] + default.sample_prompts():
        text = _prompt(r) + r["output"]
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert len(ids) == len(text) + 1  # one token per character
        assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}], tokenize=False
    )
    assert chat == "<s>" + tasks.PROMPT_NO_INPUT.format(instruction="Say hi.") + "hi</s>"


def test_model_is_a_deterministic_llama():
    from transformers import LlamaForCausalLM

    a, b = default.load_model(), default.load_model()
    assert isinstance(a, LlamaForCausalLM) and a.config.model_type == "llama"
    for k, v in default.MODEL_CONFIG.items():
        assert getattr(a.config, k) == v, k
    assert default.CHECKPOINT.exists(), "the pretrained base is shipped"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(v.dtype == torch.float32 for v in sa.values())
    assert default.load_model(torch.bfloat16).dtype == torch.bfloat16
    r1, r2 = default.load_model(pretrained=False), default.load_model(pretrained=False)
    assert all(torch.equal(x, y) for x, y in zip(r1.parameters(), r2.parameters()))
    assert json.loads(default.CONFIG.read_text()) == default.MODEL_CONFIG
    assert default.CHECKPOINT.stat().st_size < 4 * 2**20


def test_shipped_dataset_parses():
    lines = default.dataset_path().read_text().splitlines()
    assert 2000 <= len(lines) <= 10000
    records = [json.loads(line) for line in lines]
    for r in records:
        assert set(r) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in r.values()) and r["instruction"] and r["output"]
        assert r["instruction"] in tasks.TASKS
    keys = {(r["instruction"], r["input"]) for r in records}
    assert len(keys) == len(records)
    samples = default.sample_prompts()
    assert 3 <= len(samples) <= 4
    for s in samples:
        assert (s["instruction"], s["input"]) not in keys
        assert s == tasks.make_record(s["instruction"], s["input"])
    held = set(tasks.HELD_OUT)
    assert not any(r["input"] in held for r in records)
    assert {r["instruction"] for r in records} == set(tasks.TASKS)


def test_generator_reproduces_the_shipped_dataset(tmp_path):
    spec = importlib.util.spec_from_file_location("make_default", ROOT / "scripts" / "make_default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    digest = mod.write_dataset(tmp_path / "tasks.jsonl", seed=0)
    assert digest == hashlib.sha256(default.dataset_path().read_bytes()).hexdigest()
    assert mod.write_dataset(tmp_path / "other.jsonl", seed=1) != digest


def test_recommended_settings():
    rec = default.RECOMMENDED
    assert rec["method"] == "lora" and rec["max_steps"] > 0 and rec["lr"] > 0
    for k in ("batch_size", "grad_accum", "seq_len", "rank", "alpha", "eval_every", "warmup_steps"):
        assert isinstance(rec[k], int) and rec[k] > 0, k
    assert rec["seq_len"] <= default.MODEL_MAX_LENGTH


def test_short_lora_run_reduces_the_loss():
    import peft

    import fastft

    tok = default.load_tokenizer()
    ids, labels = [], []
    for r in _records()[:12]:
        p = tok(_prompt(r))["input_ids"]
        full = p + tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids += full
        labels += [-100] * len(p) + full[len(p) :]
    seq = 256
    n = len(ids) // seq
    x = torch.tensor(ids[: n * seq]).view(n, seq)[:4]
    y = torch.tensor(labels[: n * seq]).view(n, seq)[:4]
    torch.manual_seed(0)
    model = peft.get_peft_model(
        default.load_model(), peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    )
    fastft.patch(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=default.RECOMMENDED["lr"])
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.7 * losses[0], losses
