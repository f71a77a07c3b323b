"""A patched model's training step under torch.compile (issue 15).

fastft's ops are torch.library operators, so patching must add no graph break: for each
family the patched step has no more breaks than the unpatched one (counted by
``torch._dynamo.explain``), and where the patched step has none (every family here; GPT-2's
unpatched step breaks once, in transformers' loss) it compiles with ``fullgraph=True`` to the
eager patched model's loss and gradients.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastft
from fastft.testing import tiny_batch, tiny_model

FAMILIES = ["llama", "qwen2", "gemma2", "gpt2"]


def _step(model):
    def step(input_ids, attention_mask, labels):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    return step


def _breaks(model, batch):
    torch._dynamo.reset()
    ex = torch._dynamo.explain(_step(model))(**batch)
    return ex.graph_break_count, [str(b.reason).splitlines()[0] for b in ex.break_reasons]


def _loss_and_grads(step, model, batch):
    model.zero_grad(set_to_none=True)
    loss = step(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_step_compiles_like_unpatched(family):
    warnings.filterwarnings("ignore")
    batch = tiny_batch(256, seq=12)
    plain = tiny_model(family)
    base_breaks, _ = _breaks(plain, batch)

    model = tiny_model(family)
    report = fastft.patch(model)
    assert "loss" in report.features()
    _step(model)(**batch)  # the first call checks the loss convention, eagerly
    breaks, reasons = _breaks(model, batch)
    assert breaks <= base_breaks, f"fastft added graph breaks: {reasons}"
    if breaks:
        return  # neither compiles as one graph (the model's own breaks): nothing more to hold fastft to

    eager_loss, eager_grads = _loss_and_grads(_step(model), model, batch)
    torch._dynamo.reset()
    compiled = torch.compile(_step(model), fullgraph=True, backend="aot_eager")
    loss, grads = _loss_and_grads(compiled, model, batch)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patched_peft_lora_step_compiles_fullgraph(family, dropout):
    """A PEFT LoRA model (all linear layers, with dropout) patched by fastft: no graph break, and
    the compiled step gives the eager loss and LoRA gradients (same dropout masks: same seeds)."""
    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore")
    batch = tiny_batch(256, seq=12)
    model = get_peft_model(tiny_model(family), LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout))
    report = fastft.patch(model)
    assert "lora" in report.features()
    _step(model)(**batch)
    breaks, reasons = _breaks(model, batch)
    assert breaks == 0, reasons

    def seeded(step):
        def run(**kw):
            torch.manual_seed(0)
            return step(**kw)

        return run

    eager_loss, eager_grads = _loss_and_grads(seeded(_step(model)), model, batch)
    torch._dynamo.reset()
    compiled = torch.compile(_step(model), fullgraph=True, backend="aot_eager")
    loss, grads = _loss_and_grads(seeded(compiled), model, batch)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == eager_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
