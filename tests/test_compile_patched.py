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
from _compile import fastft_nodes, graph_nodes, model_step, step_breaks, step_compiles_to_eager, traced_code

import fastft
from fastft.testing import tiny_batch, tiny_model

FAMILIES = ["llama", "qwen2", "gemma2", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_step_compiles_like_unpatched(family):
    warnings.filterwarnings("ignore")
    batch = tiny_batch(256, seq=12)
    plain = tiny_model(family)
    base_breaks, _ = step_breaks(plain, batch)

    model = tiny_model(family)
    report = fastft.patch(model)
    assert "loss" in report.features()
    model_step(model)(**batch)  # the first call checks the loss convention, eagerly
    breaks, reasons = step_breaks(model, batch)
    assert breaks <= base_breaks, f"fastft added graph breaks: {reasons}"
    if breaks:
        return  # neither compiles as one graph (the model's own breaks): nothing more to hold fastft to

    step_compiles_to_eager(model, batch)


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
    model_step(model)(**batch)
    breaks, reasons = step_breaks(model, batch)
    assert breaks == 0, reasons

    def seeded(step):
        def run(**kw):
            torch.manual_seed(0)
            return step(**kw)

        return run

    step_compiles_to_eager(model, batch, wrap=seeded, some_grads=True)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["nodrop", "dropout"])
def test_grouped_lora_step_compiles_fullgraph(dropout):
    """``lora_group=True``: q/k/v and gate/up as one fastft::lora_group node each, inside the
    compiled graph (no graph break), to the eager loss and LoRA gradients."""
    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore")
    batch = tiny_batch(256, seq=12)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout))
    report = fastft.patch(model, lora_group=True)
    assert "lora-group" in report.features() and report.compile_ready().startswith("compile-ready: yes")
    model.train()
    model_step(model)(**batch)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model_step(model))(**batch)
    assert ex.graph_break_count == 0, [str(b.reason) for b in ex.break_reasons]
    code = "".join(g.code for g in ex.graphs)
    assert code.count("fastft.lora_group") == 2 * 2  # (qkv, gate/up) x 2 layers

    def seeded(step):
        def run(**kw):
            torch.manual_seed(0)
            return step(**kw)

        return run

    step_compiles_to_eager(model, batch, wrap=seeded, some_grads=True)


def test_report_says_whether_the_model_is_compile_ready():
    """The report's compile-ready line tells the truth: "yes" where patching added no graph break,
    "no" naming the feature where it does (activation checkpointing with offload, per decoder layer)."""
    warnings.filterwarnings("ignore")
    batch = tiny_batch(256, seq=12)
    model = tiny_model("llama")
    report = fastft.patch(model)
    assert report.compile_ready().startswith("compile-ready: yes") and report.compile_ready() in str(report)
    assert report.to_dict()["compile_ready"] == report.compile_ready() and not report.eager_under_compile()

    model = tiny_model("llama")
    report = fastft.patch(model, checkpointing="offload")
    line = report.compile_ready()
    assert line.startswith("compile-ready: no: checkpointing runs eager") and line in str(report)
    assert set(report.eager_under_compile()) == {"checkpointing"}
    model.train()
    model_step(model)(**batch)
    breaks, _ = step_breaks(model, batch)
    assert breaks > 0


@pytest.mark.parametrize(("family", "lora"), [("llama", True), ("gemma2", False)], ids=["llama-peft-lora", "gemma2"])
def test_checkpointed_step_compiles_fullgraph(family, lora):
    """checkpointing="recompute" under torch.compile: each decoder layer's checkpoint is traced (a
    higher-order op), the fused ops inside it included, so the step has no graph break and compiles
    with fullgraph=True to the eager checkpointed loss and gradients; the report says compile-ready."""
    warnings.filterwarnings("ignore")
    batch = tiny_batch(256, seq=12)
    model = tiny_model(family)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    report = fastft.patch(model, checkpointing="recompute")
    assert {"checkpointing", "rope", "loss"} <= report.features()
    assert report.compile_ready().startswith("compile-ready: yes"), report.compile_ready()
    model.train()
    model_step(model)(**batch)  # the first call checks the loss convention, eagerly
    breaks, reasons = step_breaks(model, batch)
    assert breaks == 0, reasons
    step_compiles_to_eager(model, batch, some_grads=True)
    code = traced_code(model, batch, fullgraph=True)  # one checkpoint per decoder layer, the fused ops inside
    assert code.count("tag_activation_checkpoint(") == model.config.num_hidden_layers, code.count("checkpoint")


def test_patch_a_compiled_model():
    """``fastft.patch(torch.compile(model))`` patches the wrapped module, even after the wrapper
    ran: its next call retraces with fastft's operators and gives the patched eager loss."""
    warnings.filterwarnings("ignore")
    batch = tiny_batch(256, seq=12)
    model = tiny_model("llama").train()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record)
    compiled(**batch)
    assert graphs and not any("fastft" in g for g in graphs)
    report = fastft.patch(compiled)
    assert report.model == type(model).__name__ and {"loss", "norms", "mlp", "rope"} <= report.features()
    eager = model_step(model)(**batch)  # the first call checks the loss convention, eagerly
    got = compiled(**batch).loss
    assert any("torch.ops.fastft" in g for g in graphs)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    assert fastft.unpatch(compiled)


def _fastft_nodes(model, batch) -> set[str]:
    """The ``torch.ops.fastft`` operators in the graphs dynamo traces for the model's step."""
    return set(fastft_nodes(model, batch))


def _compiled_nodes(model, batch) -> set[str]:
    """The ``torch.ops.fastft`` operators of the step compiled with ``fullgraph=True`` (so no graph
    break), which gives the eager loss and LoRA gradients."""
    graphs = []
    step_compiles_to_eager(model, batch, some_grads=True, graphs=graphs)
    return set(graph_nodes(graphs))


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_compile_traces_the_references(family, monkeypatch):
    """On a CPU every elementwise op's backend is the PyTorch reference, so under compile the
    patch emits that reference as plain PyTorch (inductor fuses it) instead of an opaque operator:
    only the fused loss stays a fastft node, with no graph break and the eager loss and LoRA
    gradients. ``FASTFT_COMPILE_OPAQUE=1`` keeps every operator, compiled to the same numbers."""
    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore")
    batch = tiny_batch(256, seq=12)
    model = get_peft_model(tiny_model(family), LoraConfig(r=4, target_modules="all-linear"))
    report = fastft.patch(model)
    assert {"lora", "loss"} <= report.features()
    model_step(model)(**batch)
    assert _compiled_nodes(model, batch) == {"flce"}

    monkeypatch.setenv("FASTFT_COMPILE_OPAQUE", "1")
    opaque = _compiled_nodes(model, batch)
    assert {"flce", "lora_linear"} <= opaque
    if "norms" in report.features():
        assert "rms_norm_fwd" in opaque
    if "mlp" in report.features():
        assert "gated_act_fwd" in opaque
    if "rope" in report.features():
        assert "rope_rotate" in opaque


@pytest.mark.parametrize("how", ["forced_torch", "dropout"])
def test_forced_backend_or_dropout_keeps_the_lora_operator(how):
    """Where the patch does not choose the reference itself (a forced backend), or the masks are
    fastft's (dropout), LoRA stays the ``fastft::lora_linear`` operator under compile (the choice is
    the patch engine's, the same for every family: one family here)."""
    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore")
    batch = tiny_batch(256, seq=12)
    drop = 0.1 if how == "dropout" else 0.0
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", lora_dropout=drop))
    fastft.patch(model, **({"backend": "torch"} if how == "forced_torch" else {}))
    model_step(model)(**batch)
    assert "lora_linear" in _fastft_nodes(model, batch)
