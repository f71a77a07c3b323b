"""fastft.train / TrainConfig: config checks, loss normalisation, resume, checkpoints, early stopping.

Every run trains a tiny Llama (2 layers, hidden 64) with a character-level tokenizer built here
on a few dozen short text records, so each ``train`` call takes a second or two on a CPU.
"""

import json
import math
import random
import shutil

import pytest
import torch

import fastft
import fastft.trainer as T
from fastft.data import DataError, tokenize_records
from fastft.testing import tiny_model
from fastft.trainer import TrainConfig

VOCAB = 128
SEQ = 64
_WORDS = "the cat sat on a mat while dogs ran far away and fine tuning small models is quick fun".split()


pytestmark = pytest.mark.usefixtures("one_thread")


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "\n": 4}  # the tiny configs' pad/bos/eos ids
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


TOK = _char_tokenizer()


def _records(n, seed=0, lo=2, hi=9):
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))} for _ in range(n)]


def _model():
    return tiny_model("llama", vocab_size=VOCAB, seed=0)


def _cfg(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        batch_size=2,
        seq_len=SEQ,
        lr=1e-2,
        rank=4,
        alpha=8,
        dropout=0.0,
        warmup_steps=1,
        eval_every=2,
        quiet=True,
        num_generations=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _train(tmp_path, *, train_records=None, eval_records=None, model=None, **kw):
    return fastft.train(
        _cfg(tmp_path, **kw),
        model=model if model is not None else _model(),
        tokenizer=TOK,
        train_data=train_records if train_records is not None else _records(24),
        eval_data=eval_records if eval_records is not None else _records(6, seed=1),
    )


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "adapter_model.safetensors"))


def _eval_loss(model, records):
    """Token-weighted mean loss over ``records``, one example at a time (no padding at all)."""
    ds = tokenize_records(records, TOK, seq_len=SEQ)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ex in ds.examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor([ex["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


# ------------------------------------------------------------------------------------- config
def test_lazy_exports_and_light_import():
    import subprocess
    import sys

    code = "import sys, fastft; assert 'fastft.training' not in sys.modules; fastft.TrainConfig; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    assert fastft.train is T.train and fastft.TrainResult is T.TrainResult


def test_trainer_module_is_a_shim_over_the_training_package():
    import fastft.training as P
    from fastft.training import checkpoint, loop

    assert T.train is P.train is loop.train and T.TrainConfig is P.TrainConfig and T._Trainer is loop._Trainer
    assert T.TrainingInterrupted is P.TrainingInterrupted and T._resolve_resume is checkpoint._resolve_resume
    assert set(T.__all__) == set(P.__all__) and all(getattr(T, n) is getattr(P, n) for n in P.__all__)


@pytest.mark.parametrize(
    "kw, exc, needle",
    [
        ({"method": "dora"}, ValueError, "method"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": -1e-4}, ValueError, "lr"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"lr": "1e-4"}, TypeError, "lr"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"grad_accum": 2.5}, TypeError, "grad_accum"),
        ({"max_steps": True}, TypeError, "max_steps"),
        ({"seq_len": 1}, ValueError, "seq_len"),
        ({"rank": -4}, ValueError, "rank"),
        ({"alpha": 0}, ValueError, "alpha"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"precision": "fp8"}, ValueError, "precision"),
        ({"schedule": "step"}, ValueError, "schedule"),
        ({"template": "sharegpt"}, ValueError, "template"),
        ({"eval_frac": 1.0}, ValueError, "eval_frac"),
        ({"early_stopping_patience": 0}, ValueError, "early_stopping_patience"),
        ({"packing": "yes"}, TypeError, "packing"),
        ({"target_modules": []}, ValueError, "target_modules"),
        ({"backend": "tpu"}, ValueError, "tpu"),
        ({"checkpointing": "always"}, ValueError, "checkpointing"),
        ({"output_dir": ""}, ValueError, "output_dir"),
        ({"report_to": ["neptune"]}, ValueError, "neptune"),
    ],
)
def test_validate_names_the_bad_value(tmp_path, kw, exc, needle):
    cfg = TrainConfig(**kw)
    with pytest.raises(exc, match=needle):
        cfg.validate()
    # and train() refuses it before any work: nothing written
    out = tmp_path / "out"
    with pytest.raises(exc, match=needle):
        fastft.train(cfg.replace(output_dir=str(out)) if "output_dir" not in kw else cfg)
    assert not out.exists()


def test_defaults_validate_and_resolve():
    TrainConfig().validate()
    generic = TrainConfig(data="x.jsonl").resolved()
    assert (generic.method, generic.lr, generic.epochs, generic.packing) == ("lora", 2e-4, 1, False)
    assert TrainConfig(data="x.jsonl", method="full").resolved().lr == 2e-5
    from fastft import default

    embedded = TrainConfig(lr=1e-3).resolved()  # no model, no data: the embedded default's settings
    assert embedded.lr == 1e-3  # what the user set wins
    for k, v in default.RECOMMENDED.items():
        if k != "lr" and k in TrainConfig.fields():
            assert getattr(embedded, k) == v, k


def test_report_to_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown integration 'tensorbored'"):
        TrainConfig(report_to=["tensorbored"]).validate()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(ValueError, match="pip install wandb"):
        TrainConfig(report_to="wandb").validate()
    with pytest.raises(TypeError, match="report_to"):
        TrainConfig(report_to=[3]).validate()


def test_from_file_json_and_yaml(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"method": "qlora", "lr": 1e-3, "max-steps": 7, "report_to": []}))
    cfg = TrainConfig.from_file(j)
    assert (cfg.method, cfg.lr, cfg.max_steps) == ("qlora", 1e-3, 7)
    y = tmp_path / "c.yaml"
    y.write_text("method: full\nbatch_size: 3\ntarget_modules: [q_proj, v_proj]\nrslora: true\n")
    cfg = TrainConfig.from_file(y)
    assert (cfg.method, cfg.batch_size, cfg.target_modules, cfg.rslora) == ("full", 3, ["q_proj", "v_proj"], True)
    cfg.validate()

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lr": 1e-3, "learning_rate": 1, "epochz": 2}))
    with pytest.raises(ValueError, match="unknown config option.*epochz, learning_rate"):
        TrainConfig.from_file(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: [lora\n")
    with pytest.raises(ValueError, match="broken.yaml.*invalid YAML"):
        TrainConfig.from_file(broken)
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ValueError, match=r"\.json, \.yaml or \.yml"):
        TrainConfig.from_file(tmp_path / "c.toml")
    with pytest.raises(FileNotFoundError):
        TrainConfig.from_file(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="mapping"):
        TrainConfig.from_file(tmp_path / "list.json")


def test_schedule_shapes():
    lin = T._Schedule("linear", 2, 10)
    assert [round(lin(s), 4) for s in (0, 1, 2, 6, 10)] == [0.3333, 0.6667, 1.0, 0.5, 0.0]
    cos = T._Schedule("cosine", 0, 10)
    assert cos(0) == 1.0 and abs(cos(5) - 0.5) < 1e-9 and cos(10) == 0.0
    assert T._Schedule("constant", 3, 10)(9) == 1.0


def test_bad_data_raises_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError):
        fastft.train(_cfg(out), model=_model(), tokenizer=TOK, train_data=[])
    with pytest.raises(DataError, match="missing 'text'"):
        fastft.train(_cfg(out, template="text"), model=_model(), tokenizer=TOK, train_data=[{"txt": "a"}] * 4)
    with pytest.raises(ValueError, match="tokenizer"):
        fastft.train(_cfg(out), model=_model(), train_data=_records(4))
    with pytest.raises(ValueError, match="resume_from"):
        fastft.train(_cfg(out, resume_from=str(tmp_path)), model=_model(), tokenizer=TOK, train_data=_records(4))
    assert not out.exists()


# ------------------------------------------------------------------------- loss normalisation
def test_num_items_in_batch_is_honoured_patched_and_unpatched():
    from fastft.testing import tiny_batch

    batch = tiny_batch(VOCAB, batch=2, seq=12, seed=5)
    n = int((batch["labels"][:, 1:] != -100).sum())
    for patched in (False, True):
        model = _model().train()
        if patched:
            fastft.patch(model)
        mean = model(**batch).loss
        summed = model(**batch, num_items_in_batch=1).loss
        halved = model(**batch, num_items_in_batch=2 * n).loss
        torch.testing.assert_close(summed, mean * n, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(halved, mean / 2, rtol=1e-5, atol=1e-6)


def test_grad_accum_equals_one_big_batch_on_uneven_lengths(tmp_path):
    train = [{"text": t} for t in ("a cat", "the dogs ran far away and fine tuning is fun", "sat on", "small models")]
    evals = _records(2, seed=3)
    kw = dict(max_steps=1, eval_every=1, max_grad_norm=1e9, train_records=train, eval_records=evals)
    big = _train(tmp_path / "big", batch_size=4, grad_accum=1, **kw)
    acc = _train(tmp_path / "acc", batch_size=1, grad_accum=4, **kw)
    # the step's loss is the mean over all its label tokens, not a mean of per-micro-batch means
    ref_model = _model()
    ds = tokenize_records(train, TOK, seq_len=SEQ)
    sums, counts = [], []
    with torch.no_grad():
        for ex in ds.examples:
            labels = torch.tensor([ex["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            sums.append(float(ref_model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss) * n)
            counts.append(n)
    token_mean = sum(sums) / sum(counts)
    mean_of_means = sum(s / c for s, c in zip(sums, counts)) / len(counts)
    assert len(set(counts)) == 4 and abs(token_mean - mean_of_means) > 1e-3  # uneven enough to tell them apart
    assert big.losses[0] == pytest.approx(token_mean, rel=1e-5)
    assert acc.losses[0] == pytest.approx(token_mean, rel=1e-5)
    g_big = _metrics(tmp_path / "big")[1]["grad_norm"]
    g_acc = _metrics(tmp_path / "acc")[1]["grad_norm"]
    assert g_big == pytest.approx(g_acc, rel=1e-5) and g_big > 0
    a, b = _adapter(tmp_path / "big" / "checkpoint-last"), _adapter(tmp_path / "acc" / "checkpoint-last")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _ref_step(trainer, group):
    """(token-mean loss over the whole group, grad norm) at the current weights, from the model's logits
    and torch's cross-entropy, with no fastft loss code in the way (dropout is 0 in these runs)."""
    from fastft.data import count_label_tokens

    model, n_items = trainer.model, sum(count_label_tokens(b) for b in group)
    total = 0.0
    for b in group:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        lab = b["labels"][:, 1:]
        total = total + torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), lab.flatten(), ignore_index=-100, reduction="sum"
        )
    loss = total / n_items
    grads = torch.autograd.grad(loss, trainer.trainable)
    return loss.item(), torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def test_logged_loss_and_grad_norm_match_a_reference_when_read_at_the_logging_interval(tmp_path, monkeypatch):
    real_step, refs = T._Trainer._step, {}

    def step(self, group):
        was = self.model.training
        self.model.eval()  # the patched loss returns logits outside training
        try:
            refs[len(refs) + 1] = _ref_step(self, group)
        finally:
            self.model.train(was)
        return real_step(self, group)

    monkeypatch.setattr(T._Trainer, "_step", step)
    result = _train(tmp_path, max_steps=7, log_every=3, eval_every=5, grad_accum=2)
    logged = {h["step"]: h for h in _metrics(tmp_path) if "loss" in h}
    assert sorted(logged) == [3, 6, 7]  # the interval and the last step
    assert result.losses == pytest.approx([refs[s][0] for s in range(1, 8)], rel=1e-5)
    for s, h in logged.items():
        assert h["loss"] == result.losses[s - 1] and h["loss"] == pytest.approx(refs[s][0], rel=1e-5)
        assert h["grad_norm"] == pytest.approx(refs[s][1], rel=1e-4)


def test_the_training_step_makes_no_host_sync(tmp_path, monkeypatch):
    """fastft reads no float tensor (a loss, a norm) back to the host inside a step; the loop reads the
    pending values once per logging interval (and before an evaluation or checkpoint that has any)."""
    import os
    import sys

    import fastft.training.loop as L

    reads, in_step = [], [False]

    def counting(name):
        real = getattr(torch.Tensor, name)

        def f(t, *a, **kw):
            caller = sys._getframe(1).f_code.co_filename
            if in_step[0] and t.is_floating_point() and f"{os.sep}fastft{os.sep}" in caller:
                reads.append(f"{name} in {caller}")  # (torch's CPU AdamW reads its step count: not ours)
            return real(t, *a, **kw)

        return f

    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    real_step, real_read, flushes = T._Trainer._step, L._Pending.read, []

    def step(self, group):
        in_step[0] = True
        try:
            return real_step(self, group)
        finally:
            in_step[0] = False

    def read(self):
        if self.losses:
            flushes.append(list(self.steps))
        return real_read(self)

    monkeypatch.setattr(T._Trainer, "_step", step)
    monkeypatch.setattr(L._Pending, "read", read)
    result = _train(tmp_path, max_steps=8, log_every=4, eval_every=8)
    assert reads == [] and flushes == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert len(result.losses) == 8 and all(math.isfinite(x) for x in result.losses)


# ------------------------------------------------------------- resume, checkpoints, reproducibility
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """8 LoRA steps with dropout (so the RNG matters), evaluating every 2, checkpoint-last every 4;
    the step-4 checkpoint is copied aside for the resume test."""
    root = tmp_path_factory.mktemp("lora-run")
    copy = root / "ckpt-step4"
    real_save = T._Trainer._save

    def save(self, name, step, *args, **kw):
        real_save(self, name, step, *args, **kw)
        if name == "checkpoint-last" and step == 4:
            shutil.copytree(self.out / name, copy)

    mp = pytest.MonkeyPatch()
    mp.setattr(T._Trainer, "_save", save)
    try:
        result = _train(root / "out", max_steps=8, dropout=0.1, save_every=4, eval_every=2)
    finally:
        mp.undo()
    return result, root / "out", copy


def test_resume_gives_the_same_losses_and_weights(lora_run, tmp_path):
    full, out, ckpt4 = lora_run
    assert json.loads((ckpt4 / "trainer_state.json").read_text())["step"] == 4
    resumed = _train(tmp_path, max_steps=8, dropout=0.1, save_every=4, eval_every=2, resume_from=str(ckpt4))
    assert resumed.steps == 8 and len(resumed.losses) == 8
    assert resumed.losses == full.losses  # bit-identical per-step losses after the resume
    logged = [m["loss"] for m in _metrics(tmp_path) if "loss" in m]
    assert logged == full.losses
    a, b = _adapter(out / "checkpoint-last"), _adapter(tmp_path / "checkpoint-last")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.eval_loss == full.eval_loss

    # without the RNG restore the dropout masks differ and so do the losses (the test can tell)
    rng = ckpt4 / "rng_state_0.pt"
    rng.unlink()
    other = _train(tmp_path / "norng", max_steps=8, dropout=0.1, save_every=4, eval_every=2, resume_from=str(ckpt4))
    assert other.losses[:4] == full.losses[:4] and other.losses[4:] != full.losses[4:]


def test_same_seed_same_losses_other_seed_differs(lora_run, tmp_path):
    full, _, _ = lora_run
    again = _train(tmp_path / "a", max_steps=8, dropout=0.1, save_every=4, eval_every=2)
    assert again.losses == full.losses
    other = _train(tmp_path / "b", max_steps=8, dropout=0.1, save_every=4, eval_every=2, seed=1)
    assert other.losses != full.losses


def test_checkpoints_load_into_peft_and_reproduce_eval_loss(lora_run):
    from peft import PeftModel

    result, out, _ = lora_run
    assert result.best_step is not None and result.checkpoint_best == str(out / "checkpoint-best")
    evals = _records(6, seed=1)
    for ckpt, want in ((out / "checkpoint-best", result.best_eval_loss), (out / "checkpoint-last", result.eval_loss)):
        assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
        model = PeftModel.from_pretrained(_model(), str(ckpt))
        assert _eval_loss(model, evals) == pytest.approx(want, rel=1e-5)
    cfg = json.loads((out / "checkpoint-last" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["lora_dropout"] == 0.1
    # the trained adapter is not the untrained model
    assert result.eval_loss < result.eval_loss_before
    assert not list(out.glob(".*tmp*")) and not list(out.glob(".*old"))


def test_metrics_jsonl_state_and_plot(lora_run):
    result, out, _ = lora_run
    rows = _metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert [r["step"] for r in eval_rows] == [0, 2, 4, 6, 8]
    for r in train_rows:
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and r["tokens_per_s"] > 0 and r["memory_mb"] > 0
    assert all(r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"])) for r in eval_rows)
    state = json.loads((out / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["best_step"] == result.best_step
    for f in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
        torch.load(out / "checkpoint-last" / f, weights_only=True)  # loads without unpickling code
    saved = json.loads((out / "result.json").read_text())
    assert saved["losses"] == result.losses
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result.plot_path is None and not (out / "loss.png").exists()
    else:
        assert result.plot_path and (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_early_stopping_on_a_rising_eval_loss(tmp_path):
    # training on "a a a" makes "z z z" ever less likely: the eval loss rises at every evaluation
    result = _train(
        tmp_path,
        train_records=[{"text": "a a a a a a"}] * 8,
        eval_records=[{"text": "z z z z z z"}] * 2,
        max_steps=30,
        eval_every=1,
        early_stopping_patience=2,
        lr=3e-2,
        warmup_steps=0,
        schedule="constant",
    )
    assert result.stopped_early and result.steps == result.best_step + 2 < 30
    evals = {m["step"]: m["eval_loss"] for m in _metrics(tmp_path) if "eval_loss" in m}
    assert evals[result.best_step] == result.best_eval_loss == min(v for k, v in evals.items() if k > 0)
    assert evals[result.steps - 1] >= result.best_eval_loss and evals[result.steps] >= result.best_eval_loss
    state = json.loads((tmp_path / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["step"] == result.steps and state["bad_evals"] == 2
    best_state = json.loads((tmp_path / "checkpoint-best" / "trainer_state.json").read_text())
    assert best_state["step"] == result.best_step


# ----------------------------------------------------------------------------- full and qlora
def test_full_finetune_saves_safetensors_that_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    result = _train(tmp_path, method="full", lr=1e-3, max_steps=2, eval_every=2)
    ckpt = tmp_path / "checkpoint-last"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    assert not (ckpt / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(str(ckpt))
    assert _eval_loss(reloaded, _records(6, seed=1)) == pytest.approx(result.eval_loss, rel=1e-5)
    assert _eval_loss(_model(), _records(6, seed=1)) == pytest.approx(result.eval_loss_before, rel=1e-5)
    assert result.eval_loss != result.eval_loss_before


def test_qlora_trains_an_nf4_base(tmp_path, monkeypatch):
    from fastft.nn import Linear4bit

    seen = {}
    real = T._Trainer._build_model

    def spy(self, model):
        hf, m = real(self, model)
        seen["n4"] = sum(isinstance(x, Linear4bit) for x in m.modules())
        seen["report"] = self.report
        return hf, m

    monkeypatch.setattr(T._Trainer, "_build_model", spy)
    result = _train(tmp_path, method="qlora", max_steps=3, eval_every=3)
    assert seen["n4"] == 14 and {"lora", "loss"} <= seen["report"].features()
    assert all(math.isfinite(x) for x in result.losses) and len(result.losses) == 3
    assert result.eval_loss < result.eval_loss_before
    assert (tmp_path / "checkpoint-last" / "adapter_model.safetensors").is_file()


def test_qlora_from_a_path_quantises_as_it_loads(tmp_path, monkeypatch):
    """A model path under qlora loads through fastft.NF4Config (no whole 16-bit model first)."""
    from transformers import AutoModelForCausalLM

    from fastft.nn import Linear4bit

    _model().save_pretrained(tmp_path / "base")
    real, asked = AutoModelForCausalLM.from_pretrained, []

    def spy(*a, **kw):
        asked.append(kw.get("quantization_config"))
        return real(*a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    built = {}
    real_build = T._Trainer._build_model
    monkeypatch.setattr(T._Trainer, "_build_model", lambda self, m: built.setdefault("hf", real_build(self, m)))
    cfg = _cfg(tmp_path / "run", method="qlora", model=str(tmp_path / "base"), max_steps=2, eval_every=2)
    result = fastft.train(cfg, tokenizer=TOK, train_data=_records(8), eval_data=_records(4, seed=1))
    assert [getattr(q, "quant_method", None) for q in asked] == ["fastft_nf4"]
    hf, _ = built["hf"]
    assert hf.hf_quantizer is not None and sum(isinstance(m, Linear4bit) for m in hf.modules()) == 14
    assert all(math.isfinite(x) for x in result.losses) and len(result.losses) == 2


def test_epochs_and_resume_last_in_place(tmp_path):
    # no max_steps: one epoch of 10 records at batch 2 is 5 steps; then "last" resumes a finished run as a no-op
    first = _train(tmp_path, max_steps=None, epochs=1, train_records=_records(10), eval_every=5)
    assert first.steps == 5 and first.epochs == pytest.approx(1.0)
    again = _train(tmp_path, max_steps=None, epochs=1, train_records=_records(10), eval_every=5, resume_from="last")
    assert again.steps == 5 and again.losses == first.losses


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(lora_run, tmp_path):
    """SIGINT in the middle of step 3: the step completes, checkpoint-last holds step 3, and
    TrainingInterrupted (a KeyboardInterrupt) says where; resuming from it gives the same losses
    as the uninterrupted run. The process's own SIGINT handler is back in place afterwards."""
    import os
    import signal

    full, _, _ = lora_run
    before = signal.getsignal(signal.SIGINT)
    real_step = T._Trainer._step
    calls = []

    def step(self, group):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # delivered while this step still runs
        return real_step(self, group)

    mp = pytest.MonkeyPatch()
    mp.setattr(T._Trainer, "_step", step)
    try:
        with pytest.raises(T.TrainingInterrupted, match="interrupted after step 3") as info:
            _train(tmp_path, max_steps=8, dropout=0.1, save_every=4, eval_every=2)
    finally:
        mp.undo()
    assert isinstance(info.value, KeyboardInterrupt) and info.value.step == 3
    assert signal.getsignal(signal.SIGINT) is before
    state = json.loads((tmp_path / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["step"] == 3
    resumed = _train(tmp_path, max_steps=8, dropout=0.1, save_every=4, eval_every=2, resume_from="last")
    assert resumed.losses == full.losses
