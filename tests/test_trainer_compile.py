"""``TrainConfig.compile`` / ``fastft train --compile [MODE]`` (issue 15): the training forward under torch.compile.

A compiled run gives the eager run's per-step losses (fp32, LoRA with dropout: the same masks,
the seeds come from the same generator) under ``aot_eager`` (dynamo + AOTAutograd, what
``FASTFT_COMPILE_BACKEND`` selects: no code generation, so it fits the CPU test budget), and
within fp32 tolerance under the real default path (inductor, without dropout: inductor draws
its own random numbers). Its checkpoint has no ``_orig_mod.`` key and an eager run resumes from
it to the eager run's losses. Bad values are clear errors.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fastft
from fastft.cli import UsageError, _train_config, build_parser, main
from fastft.training.compile import BACKEND_ENV, compile_mode


@pytest.fixture(autouse=True)
def quiet_and_one_thread():
    warnings.filterwarnings("ignore")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    torch._dynamo.reset()


def _data(tmp_path, n=40):
    words = "the cat sat on a mat while dogs ran far away".split()
    path = tmp_path / "train.jsonl"
    recs = [{"instruction": " ".join(words[i % 4 : i % 4 + 3]), "output": " ".join(words[i % 5 : i % 5 + 2 + i % 6])}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _cfg(data, out, **kw):
    base = dict(data=str(data), output_dir=str(out), batch_size=2, seq_len=160, eval_frac=0.1, eval_every=100,
                schedule="constant", warmup_steps=0, num_generations=0, quiet=True, dropout=0.1)  # fmt: skip
    return fastft.TrainConfig(**{**base, **kw})


# --------------------------------------------------------------------------------------------- config
def test_compile_values_and_errors():
    assert compile_mode(False) is None and compile_mode(None) is None
    assert compile_mode(True) == "default"
    assert compile_mode("max-autotune-no-cudagraphs") == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="compile must be one of default, reduce-overhead"):
        fastft.TrainConfig(compile="fastest").validate()
    with pytest.raises(TypeError, match="compile must be true, false or a mode name"):
        fastft.TrainConfig(compile=3).validate()
    with pytest.raises(ValueError, match="objective dpo runs eager"):
        fastft.TrainConfig(compile=True, objective="dpo").validate()
    fastft.TrainConfig(compile="reduce-overhead").validate()


def test_cli_compile_flag(tmp_path, capsys):
    parse = build_parser().parse_args
    assert _train_config(parse(["train", "--compile"])).compile == "default"
    assert _train_config(parse(["train", "--compile", "reduce-overhead"])).compile == "reduce-overhead"
    assert _train_config(parse(["train"])).compile is False
    with pytest.raises(UsageError):
        parse(["train", "--compile", "default", "--compile-typo"])
    capsys.readouterr()
    assert main(["train", "--compile", "turbo", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compile must be one of default" in err[0] and "turbo" in err[0]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- compiled runs
def test_compiled_run_matches_eager_and_its_checkpoint_resumes_eagerly(tmp_path, monkeypatch):
    data = _data(tmp_path)
    eager = fastft.train(_cfg(data, tmp_path / "eager", max_steps=5))
    monkeypatch.setenv(BACKEND_ENV, "aot_eager")
    out = tmp_path / "compiled"
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    comp = fastft.train(_cfg(data, out, max_steps=3, compile=True, num_generations=1))
    # the one-time checks ran eagerly before the first step: no graph break, and graphs were compiled
    assert not counters["graph_break"], list(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] > 0
    assert comp.compile == "default" and comp.compile_seconds > 0 and eager.compile is None
    torch.testing.assert_close(torch.tensor(comp.losses), torch.tensor(eager.losses[:3]), atol=1e-5, rtol=1e-5)
    assert comp.generations and comp.generations[0]["after"]  # generation ran on the eager module
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("compile") == "default" and r.get("compile_seconds", 0) > 0 for r in records)
    from safetensors.torch import load_file

    keys = load_file(str(out / "checkpoint-last" / "adapter_model.safetensors")).keys()
    assert keys and not [k for k in keys if "_orig_mod" in k]
    # an eager run resumes from the compiled run's checkpoint to the eager run's losses
    monkeypatch.delenv(BACKEND_ENV)
    resumed = fastft.train(_cfg(data, out, max_steps=5, resume_from="last"))
    assert resumed.compile is None and len(resumed.losses) == 5
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(eager.losses), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(resumed.eval_loss, eager.eval_loss, atol=1e-5, rtol=1e-5)


def test_compiled_run_default_inductor_path(tmp_path, monkeypatch):
    """The real default: inductor (C++ code generation on the CPU), mode default. No dropout
    (inductor generates its own random numbers, so the masks would differ from eager's)."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    data = _data(tmp_path)
    eager = fastft.train(_cfg(data, tmp_path / "eager", max_steps=1, dropout=0.0))
    comp = fastft.train(_cfg(data, tmp_path / "compiled", max_steps=1, dropout=0.0, compile="default"))
    assert comp.compile == "default" and comp.compile_seconds > 0
    torch.testing.assert_close(torch.tensor(comp.losses), torch.tensor(eager.losses), atol=1e-5, rtol=1e-5)


def test_compiled_qlora_run_matches_eager(tmp_path, monkeypatch):
    """method qlora (fastft.quantize + LoRA with dropout): the 4-bit LoRA layers are operators, so
    the compiled run has no graph break and gives the eager run's losses."""
    data = _data(tmp_path)
    eager = fastft.train(_cfg(data, tmp_path / "eager", max_steps=1, method="qlora"))
    monkeypatch.setenv(BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    comp = fastft.train(_cfg(data, tmp_path / "compiled", max_steps=1, method="qlora", compile=True))
    assert not counters["graph_break"], list(counters["graph_break"])
    torch.testing.assert_close(torch.tensor(comp.losses), torch.tensor(eager.losses), atol=1e-5, rtol=1e-5)
