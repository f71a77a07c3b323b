"""fastft.patch inside the training stacks people use: transformers' Trainer, TRL's SFTTrainer,
torch.compile, generate and gradient clipping. Each test compares a patched model with the
same model unpatched, built from the same seed."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

import fastft
import fastft.patching.loss as loss_mod
from fastft.testing import tiny_batch, tiny_model

VOCAB = 256


def _model(peft=True, seed=0):
    model = tiny_model("llama", vocab_size=VOCAB, seed=seed)
    if peft:
        torch.manual_seed(seed)  # init_lora_weights=False draws lora_A and lora_B at random
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(model, cfg)
    return model.train()


def _pair(peft=True, **patch_kw):
    """(unpatched, patched) twins with identical weights."""
    ref, model = _model(peft), _model(peft)
    fastft.patch(model, **patch_kw)
    return ref, model


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_close_rel(got: dict, want: dict, rtol: float):
    """Each tensor within rtol of the largest magnitude of its reference (as in test_patch_loss)."""
    assert got.keys() == want.keys() and got
    for name, ref in want.items():
        err = (got[name] - ref).abs().max() / ref.abs().max().clamp(min=1e-8)
        assert err <= rtol, f"{name}: relative error {err:.2e}"


def _uneven_rows(n=12, seq=12, seed=3):
    """Fixed-length rows whose labels hide a different prefix of each one behind -100."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (seq,), generator=g)
        labels = ids.clone()
        labels[: (i * 7) % (seq - 1)] = -100  # 0, 7, 3, 10, 6, 2, ... ignored tokens
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels})
    return rows


def _spy_fused_loss(monkeypatch):
    """Record (counted targets, num_items_in_batch) of each fused-loss call."""
    calls = []
    real = loss_mod.fused_linear_cross_entropy

    def spy(hidden, weight, target, *args, **kwargs):
        n = kwargs.get("num_items_in_batch")
        calls.append((int((target != kwargs.get("ignore_index", -100)).sum()), None if n is None else int(n)))
        return real(hidden, weight, target, *args, **kwargs)

    monkeypatch.setattr(loss_mod, "fused_linear_cross_entropy", spy)
    return calls


# --------------------------------------------------------------------------------------
# 1. transformers' Trainer with gradient accumulation (num_items_in_batch normalisation)
# --------------------------------------------------------------------------------------
def _train_with_trainer(model, tmp_path, *, steps, accum):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accum,
        logging_steps=1,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        seed=0,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_uneven_rows())
    assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reaches the model's forward
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == steps
    return [h["loss"] for h in logs], [h["grad_norm"] for h in logs]


@pytest.mark.parametrize(
    "peft,steps,accum", [(True, 4, 3), (False, 2, 2)], ids=["peft-lora-accum3", "full-finetune-accum2"]
)
def test_trainer_gradient_accumulation_matches_unpatched(tmp_path, monkeypatch, peft, steps, accum):
    ref, model = _pair(peft, lora=peft)
    ref_losses, ref_norms = _train_with_trainer(ref, tmp_path / "ref", steps=steps, accum=accum)
    calls = _spy_fused_loss(monkeypatch)
    losses, norms = _train_with_trainer(model, tmp_path / "patched", steps=steps, accum=accum)

    # the fused loss ran on every micro-batch, with uneven counted tokens, each divided by the
    # whole accumulated step's count (transformers' num_items_in_batch)
    assert len(calls) == steps * accum
    for s in range(steps):
        step = calls[s * accum : (s + 1) * accum]
        assert all(n == sum(c for c, _ in step) for _, n in step), step
    assert len({c for c, _ in calls}) > 1, calls

    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-4, atol=1e-6)
    _assert_close_rel(_trainable(model), _trainable(ref), rtol=1e-4)


# --------------------------------------------------------------------------------------
# 2. TRL's SFTTrainer, offline, with a character-level tokenizer built here
# --------------------------------------------------------------------------------------
_TEXTS = [
    "the cat sat on the mat",
    "a dog ran far away",
    "fine tuning is fun",
    "hello world",
    "lora adapters are small",
    "x y z",
] * 2


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}  # the tiny configs' pad/bos/eos ids
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _sft_trainer(model, tmp_path, steps=3):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        seed=0,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_length=32,
        bf16=False,  # SFTConfig defaults to bf16 autocast, even on CPU: compare in fp32
    )
    train = Dataset.from_dict({"text": _TEXTS})
    return SFTTrainer(model=model, args=args, train_dataset=train, processing_class=_char_tokenizer())


def _sft_losses(trainer):
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == trainer.args.max_steps and all(math.isfinite(x) for x in losses), losses
    return losses


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory):
    """Losses and LoRA weights of the unpatched model trained by SFTTrainer (shared by the TRL tests)."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    ref = _model()
    losses = _sft_losses(_sft_trainer(ref, tmp_path_factory.mktemp("sft-ref")))
    return losses, _trainable(ref)


def _needs_trl_fused_lm_head():
    """The two tests below are about the forward that TRL's SFTTrainer installs (TRL >= 1.x)."""
    from trl.trainer import utils

    if not hasattr(utils, "add_fused_lm_head"):
        pytest.skip("this TRL's SFTTrainer does not replace the model's forward (no trl add_fused_lm_head)")


def test_trl_sft_trainer_trains_a_patched_peft_model(tmp_path, sft_reference):
    # TRL's own fused LM head (trl add_fused_lm_head) computes the loss from the backbone, so
    # fastft's loss patch is bypassed here; the fused LoRA layers are what is being trained.
    ref_losses, ref_params = sft_reference
    model = _model()
    fastft.patch(model)
    losses = _sft_losses(_sft_trainer(model, tmp_path))
    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6)
    _assert_close_rel(_trainable(model), ref_params, rtol=1e-3)


def test_trl_sft_trainer_with_the_patch_applied_after_the_trainer(tmp_path, sft_reference):
    _needs_trl_fused_lm_head()
    model = _model()
    trainer = _sft_trainer(model, tmp_path)
    report = fastft.patch(model)  # the loss patch steps aside: TRL's forward is not fastft's to wrap
    assert "already replaced by another library" in {s.feature: s.reason for s in report.skipped}["loss"]
    losses = _sft_losses(trainer)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(sft_reference[0]), rtol=1e-4, atol=1e-6)


def test_unpatch_keeps_the_forward_trl_installed_after_the_patch(tmp_path, sft_reference):
    _needs_trl_fused_lm_head()
    model = _model()
    fastft.patch(model)
    trainer = _sft_trainer(model, tmp_path)
    trl_forward = model.get_base_model().__dict__["forward"]
    with pytest.warns(UserWarning, match="replaced after fastft.patch"):
        assert fastft.unpatch(model)
    losses = _sft_losses(trainer)  # unpatched now: must train exactly like the plain model
    assert model.get_base_model().__dict__.get("forward") is trl_forward
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(sft_reference[0]), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------
# 3. torch.compile
# --------------------------------------------------------------------------------------
def _loss_and_grads(model, call, batch):
    model.zero_grad(set_to_none=True)
    out = call(**batch)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_torch_compile_of_a_patched_model_matches_eager():
    batch = tiny_batch(VOCAB, batch=2, seq=16, ignore_frac=0.3)
    assert (batch["labels"] == -100).any()
    ref, model = _pair(peft=True)
    ref_out, ref_grads = _loss_and_grads(ref, ref, batch)
    eager_out, eager_grads = _loss_and_grads(model, model, batch)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")  # inductor also matches, but takes > 60 s on 2 cores
    for _ in range(2):  # the second call runs the cached graph
        out, grads = _loss_and_grads(model, compiled, batch)
        assert out.logits is None  # the fused path, compiled
        torch.testing.assert_close(out.loss, eager_out.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-6)
        _assert_close_rel(grads, eager_grads, rtol=1e-5)
        _assert_close_rel(grads, ref_grads, rtol=1e-4)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# 4. generate
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
def test_generate_on_a_patched_peft_model_after_a_training_step(use_cache):
    ref, model = _pair(peft=True)
    batch = tiny_batch(VOCAB, batch=2, seq=16)
    for m in (ref, model):  # one identical SGD step on both
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        m(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    prompt = torch.tensor([[5, 17, 42, 7], [9, 9, 100, 3]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=use_cache)

    # train mode: generate does not switch to eval; without labels the patched forward is the original
    want = ref.generate(input_ids=prompt, **kw)
    got = model.generate(input_ids=prompt, **kw)
    assert model.training and ref.training
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    ref.eval(), model.eval()
    want = ref.generate(input_ids=prompt, **kw)
    torch.testing.assert_close(model.generate(input_ids=prompt, **kw), want, rtol=0, atol=0)
    assert want.shape == (2, prompt.shape[1] + 6)


# --------------------------------------------------------------------------------------
# 5. gradient clipping
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft", [True, False], ids=["peft-lora", "full-finetune"])
def test_clip_grad_norm_after_a_patched_step(peft):
    ref, model = _pair(peft, lora=peft)
    batch = tiny_batch(VOCAB, batch=2, seq=16, ignore_frac=0.3)
    norms, grads = [], []
    for m in (ref, model):
        m.zero_grad(set_to_none=True)
        m(**batch).loss.backward()
        params = [p for p in m.parameters() if p.requires_grad]
        norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm=0.05))
        grads.append({n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None})
    assert norms[0] > 0.05  # so the clipping scaled the gradients
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-5, atol=1e-7)
    _assert_close_rel(grads[1], grads[0], rtol=1e-4)
