"""Preference training: data checks, the logits-free sequence log-probs, DPO / ORPO / SimPO / KTO
runs on the embedded default model (reward accuracy rises), the reference from disabled adapters
equal to a precomputed one, and exact resume."""

import json
import shutil

import pytest
import torch

import fastft
import fastft.training.loop as loop
from fastft import default
from fastft.data import DataError
from fastft.preference import default_preference_records, sequence_logps, tokenize_preferences

TOK = default.load_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(n=48, seed=0):
    return default_preference_records(n, seed=seed)


def _train(out, objective="dpo", *, records=None, eval_records=None, **kw):
    base = dict(output_dir=str(out), objective=objective, max_steps=8, batch_size=4, seq_len=512, lr=3e-3,
                eval_every=4, warmup_steps=1, dropout=0.0, quiet=True, num_generations=0)  # fmt: skip
    base.update(kw)
    return fastft.train(
        fastft.TrainConfig(**base),
        model=default.load_model(),
        tokenizer=TOK,
        train_data=records if records is not None else _pairs(),
        eval_data=eval_records if eval_records is not None else _pairs(16, seed=1)[:16],
    )


def _evals(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]


# ------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize(
    "rec, needle",
    [
        ({"prompt": "p", "chosen": "a"}, "missing 'rejected'"),
        ({"prompt": "p", "chosen": " ", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "must be a non-empty string or a list of chat messages"),
    ],
)
def test_bad_preference_data_is_one_clear_error(rec, needle):
    with pytest.raises(DataError) as info:
        tokenize_preferences([{"prompt": "ok", "chosen": "x", "rejected": "y"}, rec], TOK, objective="dpo", seq_len=64)
    assert needle in str(info.value) and "record 2" in str(info.value)


def test_kto_records_need_a_boolean_label():
    with pytest.raises(DataError, match="'label' must be true or false"):
        tokenize_preferences([{"prompt": "p", "completion": "c", "label": "maybe"}], TOK, objective="kto", seq_len=64)
    ds = tokenize_preferences([{"prompt": "p", "completion": "c", "label": "true"}], TOK, objective="kto", seq_len=64)
    assert ds.examples[0]["label"] is True


def test_cli_bad_preference_data_exits_2_with_one_line(tmp_path, capsys):
    from fastft.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text(
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": "q", "chosen": "a"})
        + "\n"
    )
    rc = main(["train", "--objective", "dpo", "--data", str(data), "--output-dir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("fastft: error: ") and "missing 'rejected'" in err[0]
    assert f"{data}:2" in err[0] and not (tmp_path / "out").exists()


def test_chat_messages_render_through_the_template():
    rec = {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "hi"}],
           "rejected": [{"role": "assistant", "content": "no"}]}  # fmt: skip
    ds = tokenize_preferences([rec], TOK, objective="dpo", seq_len=512)
    ex = ds.examples[0]
    prompt = TOK.apply_chat_template(rec["prompt"], tokenize=False, add_generation_prompt=True)
    full = TOK.apply_chat_template(rec["prompt"] + rec["chosen"], tokenize=False)
    assert TOK.decode(ex["prompt"] + ex["chosen"]).replace(" ", "") == full.replace(" ", "") + TOK.eos_token
    assert TOK.decode(ex["prompt"]).replace(" ", "").endswith(prompt.replace(" ", "")[-10:])


def test_sequence_logps_equal_the_models_own_logits():
    from fastft.preference import preference_batches

    model = default.load_model()
    ds = tokenize_preferences(_pairs(3), TOK, objective="dpo", seq_len=512)
    b = preference_batches(ds, batch_size=3, pad_id=0, shuffle=False, seed=0, epoch=0)[0]
    with torch.no_grad():
        got = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    lab = b["labels"][:, 1:]
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    want = torch.where(lab != -100, lp, 0.0).sum(-1)
    assert got.shape == (6,)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------ runs
def test_dpo_on_the_embedded_preferences_raises_reward_accuracy(tmp_path):
    result = _train(tmp_path, max_steps=12, eval_every=6)
    ev = _evals(tmp_path)
    acc = [e["eval_rewards/accuracies"] for e in ev]
    assert acc[0] == 0.0 and acc[-1] >= 0.6, acc  # rewards start at 0 (policy == reference), then separate
    assert ev[-1]["eval_rewards/margins"] > ev[0]["eval_rewards/margins"] and result.eval_loss < result.eval_loss_before


def test_precomputed_reference_equals_the_live_one(tmp_path):
    live = _train(tmp_path / "live", max_steps=3, eval_every=3)
    pre = _train(tmp_path / "pre", max_steps=3, eval_every=3, precompute_ref=True)
    assert pre.losses == pytest.approx(live.losses, rel=1e-5)
    assert (tmp_path / "pre" / "checkpoint-last" / "ref_logps.pt").is_file()


@pytest.mark.parametrize("objective, method", [("orpo", "lora"), ("simpo", "lora"), ("dpo", "full")])
def test_other_objectives_and_full_train(tmp_path, objective, method):
    kw = dict(lr=2e-4) if method == "full" else {}
    result = _train(tmp_path, objective, method=method, max_steps=6, eval_every=6, **kw)
    ev = _evals(tmp_path)
    assert len(result.losses) == 6 and all(x == x for x in result.losses)
    assert ev[-1]["eval_rewards/margins"] > ev[0]["eval_rewards/margins"]
    if method == "full":
        assert (tmp_path / "checkpoint-last" / "ref_logps.pt").is_file()


def test_kto_trains_on_unpaired_examples(tmp_path):
    pairs = _pairs(32)
    recs = [{"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
            for i, p in enumerate(pairs)]  # fmt: skip
    result = _train(tmp_path, "kto", records=recs[:24], eval_records=recs[24:], max_steps=6, eval_every=6)
    ev = _evals(tmp_path)
    assert len(result.losses) == 6 and result.eval_loss < result.eval_loss_before
    assert set(ev[-1]) >= {"eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins"}


def test_preference_resume_gives_the_same_losses(tmp_path):
    copy = tmp_path / "ckpt3"
    real_save = loop._Trainer._save

    def save(self, name, step, *a, **kw):
        real_save(self, name, step, *a, **kw)
        if name == "checkpoint-last" and step == 3:
            shutil.copytree(self.out / name, copy)

    mp = pytest.MonkeyPatch()
    mp.setattr(loop._Trainer, "_save", save)
    try:
        full = _train(tmp_path / "full", max_steps=6, save_every=3, eval_every=6)
    finally:
        mp.undo()
    resumed = _train(tmp_path / "resumed", max_steps=6, save_every=3, eval_every=6, resume_from=str(copy))
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    assert resumed.eval_loss == pytest.approx(full.eval_loss, rel=1e-5)
