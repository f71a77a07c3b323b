"""transformers' ``Trainer`` with ``TrainingArguments(torch_compile=True)`` over a ``fastft.patch``ed
PEFT model (issue 15): accelerate compiles the model, fastft's operators trace without a graph
break, and the per-step losses and the trained adapter equal the eager Trainer run's (fp32;
LoRA dropout included: the same seeds from the same generator under ``aot_eager``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastft
from fastft.testing import tiny_model

VOCAB = 256


class _Rows(torch.utils.data.Dataset):
    """Fixed-length rows (labels = inputs, the first two tokens of each row ignored)."""

    def __init__(self, n=16, seq=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[:2] = -100
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


def _run(tmp_path, name, compile_):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", vocab_size=VOCAB), LoraConfig(r=4, target_modules="all-linear",
                                                                               lora_dropout=0.1))  # fmt: skip
    report = fastft.patch(model)
    assert "lora" in report.features() and report.compile_ready().startswith("compile-ready: yes")
    # fastft's one-time loss-convention check, eagerly (it needs values), as fastft's trainer does
    # before its first compiled step; the random state restored, so both runs draw the same masks
    batch = {
        k: torch.stack([r[k] for r in (_Rows()[0], _Rows()[1])]) for k in ("input_ids", "attention_mask", "labels")
    }
    with torch.no_grad(), torch.random.fork_rng():
        model.train()(**batch, num_items_in_batch=torch.tensor(1.0))  # the call structure Trainer uses
    losses = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    kw = dict(torch_compile=True, torch_compile_backend="aot_eager") if compile_ else {}
    args = TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **kw,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[Record()])
    trainer.train()
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return losses, adapters, trainer


def test_hf_trainer_torch_compile_matches_eager(tmp_path):
    pytest.importorskip("accelerate")
    warnings.filterwarnings("ignore")
    torch._dynamo.reset()
    eager_losses, eager_adapters, _ = _run(tmp_path, "eager", False)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    losses, adapters, trainer = _run(tmp_path, "compiled", True)
    assert counters["stats"]["unique_graphs"] > 0  # the model really ran compiled
    assert not counters["graph_break"], list(counters["graph_break"])  # fastft added none
    assert len(losses) == len(eager_losses) == 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), atol=1e-5, rtol=1e-5)
    for n, p in adapters.items():
        torch.testing.assert_close(p, eager_adapters[n], atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    # saving goes through the unwrapped PEFT model: no torch.compile prefix in the adapter
    trainer.save_model(str(tmp_path / "saved"))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "saved" / "adapter_model.safetensors")).keys()
    assert keys and not [k for k in keys if "_orig_mod" in k]
