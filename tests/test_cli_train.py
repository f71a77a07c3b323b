"""``fastft train`` / ``generate`` / ``bench`` from the command line.

Bad input: exit code 2, one line on stderr starting ``fastft: error:``, no traceback, and no
output directory left behind. The end-to-end runs use the embedded default model (few steps,
small eval set); the torchrun run compares 2 gloo ranks with one process accumulating 2
micro-batches (the same micro-batches and the same token normalisation).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastft.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def _run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "fastft", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def _assert_usage_error(rc, err, out_dir, needle):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastft: error: "), err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]
    assert not out_dir.exists() or not any(out_dir.iterdir())


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _text_data(tmp_path, n=16):
    words = "the cat sat on a mat while dogs ran far away".split()
    recs = [json.dumps({"text": " ".join(words[i % 5 : i % 5 + 2 + i % 4])}) for i in range(n)]
    return _write(tmp_path / "train.jsonl", recs)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------- bad input
def _bad_cases(tmp):
    good = _text_data(tmp)
    bad_line = _write(tmp / "bad.jsonl", ['{"text": "fine"}', '{"text": "broken",', '{"text": "x"}'])
    empty = _write(tmp / "empty.jsonl", [])
    alpaca = _write(tmp / "alpaca.jsonl", [json.dumps({"instruction": "Spell it.", "output": "x"})] * 4)
    unknown_key = tmp / "unknown.yaml"
    unknown_key.write_text("lr: 0.001\nlearnin_rate: 3\n")
    (tmp / "empty-model").mkdir(exist_ok=True)
    d = ["--data", str(good)]
    return {
        "missing-data": (["--data", str(tmp / "nope.jsonl")], "nope.jsonl"),
        "malformed-jsonl": (["--data", str(bad_line)], "bad.jsonl:2"),
        "empty-dataset": (["--data", str(empty)], "no examples"),
        "all-labels-masked": (["--data", str(alpaca), "--seq-len", "16"], "dropped"),
        "unknown-method": ([*d, "--method", "dora"], "invalid choice"),
        "unknown-precision": ([*d, "--precision", "fp8"], "invalid choice"),
        "unknown-template": ([*d, "--template", "sharegpt"], "invalid choice"),
        "negative-lr": ([*d, "--lr", "-0.0001"], "lr must be > 0"),
        "zero-batch": ([*d, "--batch-size", "0"], "batch_size must be >= 1"),
        "not-an-int": ([*d, "--max-steps", "ten"], "invalid int value"),
        "bad-dropout": ([*d, "--dropout", "1.5"], "dropout must be < 1"),
        "unknown-report-to": ([*d, "--report-to", "neptune"], "unknown integration 'neptune'"),
        "resume-nothing": ([*d, "--resume-from", str(tmp / "no-ckpt")], "not a fastft checkpoint"),
        "missing-config": (["--config", str(tmp / "missing.yaml")], "config file not found"),
        "unknown-config-key": (["--config", str(unknown_key)], "learnin_rate"),
        "missing-eval-data": ([*d, "--eval-data", str(tmp / "nope-eval.jsonl")], "nope-eval.jsonl"),
        "model-dir-without-model": ([*d, "--model", str(tmp / "empty-model")], "cannot load"),
        "unknown-flag": ([*d, "--learning-rate", "1"], "unrecognized arguments"),
    }


CASE_NAMES = [
    "missing-data",
    "malformed-jsonl",
    "empty-dataset",
    "all-labels-masked",
    "unknown-method",
    "unknown-precision",
    "unknown-template",
    "negative-lr",
    "zero-batch",
    "not-an-int",
    "bad-dropout",
    "unknown-report-to",
    "resume-nothing",
    "missing-config",
    "unknown-config-key",
    "missing-eval-data",
    "model-dir-without-model",
    "unknown-flag",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_train_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    args, needle = _bad_cases(tmp_path)[case]
    out = tmp_path / "out"
    rc = main(["train", "--output-dir", str(out), "--quiet", *args])
    captured = capsys.readouterr()
    _assert_usage_error(rc, captured.err, out, needle)


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    cases = _bad_cases(tmp_path)
    for case in ("malformed-jsonl", "negative-lr"):
        args, needle = cases[case]
        out = tmp_path / f"out-{case}"
        proc = _run("train", "--output-dir", str(out), *args)
        _assert_usage_error(proc.returncode, proc.stderr, out, needle)


def test_generate_and_bench_bad_input(tmp_path, capsys):
    not_adapter = tmp_path / "not-adapter"
    not_adapter.mkdir()
    rc = main(["generate", "--adapter", str(not_adapter), "--prompt", "hi"])
    _assert_usage_error(rc, capsys.readouterr().err, tmp_path / "none", "not a PEFT adapter directory")
    rc = main(["generate", "--prompt", "hi", "--max-new-tokens", "0"])
    _assert_usage_error(rc, capsys.readouterr().err, tmp_path / "none", "--max-new-tokens must be >= 1")
    rc = main(["generate"])
    _assert_usage_error(rc, capsys.readouterr().err, tmp_path / "none", "--prompt")
    import importlib.util

    if importlib.util.find_spec("fastft.benchsuite") is None:
        rc = main(["bench", "--quick"])
        _assert_usage_error(rc, capsys.readouterr().err, tmp_path / "none", "bench suite not available")
    else:  # the suite exists: an unknown option of its own is still a one-line usage error
        rc = main(["bench", "--no-such-bench-option"])
        _assert_usage_error(rc, capsys.readouterr().err, tmp_path / "none", "no-such-bench-option")


def test_info_still_works(capsys):
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


# ------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_default_end_to_end_then_generate(tmp_path):
    from peft import PeftModel

    from fastft import default
    from fastft.trainer import format_prompt, generate_text

    out = tmp_path / "run"
    proc = _run(
        "train", "--output-dir", str(out), "--max-steps", "3", "--eval-frac", "0.02",
        "--num-generations", "1", "--max-new-tokens", "4", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for name in ("metrics.jsonl", "train_config.json", "result.json"):
        assert (out / name).is_file(), name
    for ckpt in ("checkpoint-last", "checkpoint-best"):
        assert (out / ckpt / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "train_config.json").read_text())
    for k, v in default.RECOMMENDED.items():  # nothing set: the embedded default's settings
        if k not in ("max_steps", "max_new_tokens", "eval_frac") and k in cfg:
            assert cfg[k] == v, k
    assert cfg["max_steps"] == 3
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 3 and result["eval_loss"] < result["eval_loss_before"]
    assert len(result["generations"]) == 1 and result["generations"][0]["before"] is not None

    prompt = "Write the word in capital letters."
    gen = _run("generate", "--adapter", str(out / "checkpoint-best"), "--prompt", prompt, "--max-new-tokens", "6")
    assert gen.returncode == 0, gen.stderr[-3000:]
    tok = default.load_tokenizer()
    model = PeftModel.from_pretrained(default.load_model(), str(out / "checkpoint-best"))
    want = generate_text(model, tok, format_prompt(prompt, tok, "alpaca"), max_new_tokens=6)
    assert gen.stdout == want + "\n"


def _train_quiet(out, **kw):
    """A 1-step in-process run, recording warnings (none may be transformers' deprecation of
    ``is_gradient_checkpointing``, which PEFT's constructor used to trigger on every command)."""
    import warnings

    import fastft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastft.train(fastft.TrainConfig(output_dir=str(out), max_steps=1, eval_frac=0.02, num_generations=0,
                                        quiet=True, **kw))  # fmt: skip
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def _generate_in_process(capsys, *args):
    import warnings

    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["generate", "--prompt", "Write the word in capital letters.", "--max-new-tokens", "5", *args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    return out


def test_generate_adapter_reads_its_base_model_from_adapter_config(tmp_path, capsys):
    """An adapter trained on another model than the embedded default: ``generate --adapter`` alone
    loads that base (``base_model_name_or_path``), as an explicit ``--model`` does."""
    from fastft import default
    from fastft.testing import tiny_model

    base = tmp_path / "base"
    tiny_model("llama", vocab_size=len(default.load_tokenizer()), seed=3).save_pretrained(str(base))
    default.load_tokenizer().save_pretrained(str(base))
    _train_quiet(tmp_path / "run", model=str(base), data=str(default.dataset_path()), seq_len=256)
    ckpt = tmp_path / "run" / "checkpoint-last"
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    alone = _generate_in_process(capsys, "--adapter", str(ckpt))
    explicit = _generate_in_process(capsys, "--adapter", str(ckpt), "--model", str(base))
    assert alone == explicit and alone.strip()


def test_generate_adapter_of_a_qlora_run_quantises_the_base(tmp_path, capsys, monkeypatch):
    from peft import PeftModel

    import fastft
    from fastft import default
    from fastft.nn import Linear4bit
    from fastft.training import format_prompt, generate_text

    _train_quiet(tmp_path / "run", method="qlora", lr=5e-2)
    ckpt = tmp_path / "run" / "checkpoint-last"
    real_quantize, quantised = fastft.quantize, []
    monkeypatch.setattr(
        fastft, "quantize", lambda m, **kw: quantised.append(type(m).__name__) or real_quantize(m, **kw)
    )
    got = _generate_in_process(capsys, "--adapter", str(ckpt))
    assert quantised == ["LlamaForCausalLM"]  # the base, before the adapter goes on
    monkeypatch.undo()
    tok, model = default.load_tokenizer(), default.load_model()
    fastft.quantize(model)
    model = PeftModel.from_pretrained(model, str(ckpt))
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) > 0
    prompt = format_prompt("Write the word in capital letters.", tok, "alpaca")
    assert got == generate_text(model.eval(), tok, prompt, max_new_tokens=5) + "\n"


_DIST_ARGS = ["--seq-len", "64", "--batch-size", "2", "--max-steps", "3", "--eval-every", "3", "--dropout", "0",
              "--lr", "1e-2", "--num-generations", "0", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """The reference: one process accumulating 2 micro-batches per step (what 2 ranks x 1 do together)."""
    root = tmp_path_factory.mktemp("dist")
    data = _text_data(root, n=24)
    proc = _run("train", "--data", str(data), *_DIST_ARGS, "--grad-accum", "2", "--output-dir", str(root / "single"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, data


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_gloo_ranks_match_one_process(single_process_run, mode):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    root, data = single_process_run
    out = root / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastft"]
    cmd += ["train", "--data", str(data), *_DIST_ARGS, "--output-dir", str(out)]
    cmd += ["--fsdp"] if mode == "fsdp" else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def metrics(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]

    ref, got = metrics(root / "single"), metrics(out)
    assert [r["step"] for r in got] == [r["step"] for r in ref]  # written once (rank 0), not twice
    ref_loss = torch.tensor([r.get("loss", r.get("eval_loss")) for r in ref])
    got_loss = torch.tensor([r.get("loss", r.get("eval_loss")) for r in got])
    assert torch.isfinite(got_loss).all()
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
    ckpt = out / "checkpoint-last"
    assert sorted(p.name for p in ckpt.glob("rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]
    assert len(list(out.rglob("adapter_model.safetensors"))) == 2  # last and best, once each
    assert not list(out.glob(".*"))  # no temporary directory left
    from safetensors.torch import load_file

    a = load_file(str(ckpt / "adapter_model.safetensors"))
    b = load_file(str(root / "single" / "checkpoint-last" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_train_interrupted_exits_130_and_says_where_the_checkpoint_is(tmp_path, capsys, monkeypatch):
    import fastft.training as T

    def interrupted(cfg, **kw):
        raise T.TrainingInterrupted(7, str(tmp_path / "checkpoint-last"))

    monkeypatch.setattr(T, "train", interrupted)
    rc = main(["train", "--output-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and len(err) == 1
    assert (
        err[0].startswith("fastft: interrupted after step 7; checkpoint-last saved in ")
        and "--resume-from last" in err[0]
    )
