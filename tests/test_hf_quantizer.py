"""``fastft.NF4Config``: NF4 as a transformers quantization method (load-time quantisation, save / reload).

Oracle for loading with ``quantization_config=NF4Config()``: ``from_pretrained`` of the 16-bit checkpoint
followed by ``fastft.quantize`` (same state dict, bit for bit, and same logits). Oracle for a reload: the
model that was saved. Double quantisation is on for Llama only: its 8-bit absmax encoder is the slow part
of quantising on this CPU, and the layout it adds (``nested_*`` buffers) is the same on every family.
"""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastft
from fastft.nn import ExpertsWeight4bit, Linear4bit
from fastft.testing import tiny_batch, tiny_model

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from zoo_configs import tiny_config  # noqa: E402

VOCAB = 256
FAMILIES = ["llama", "gpt2", "qwen3_moe", "gpt_oss"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _dense(family):
    if family in ("llama", "gpt2"):
        return tiny_model(family, vocab_size=VOCAB)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")


def _load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kw)


def _ids():
    return tiny_batch(VOCAB, seq=9)["input_ids"]


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), set(sa) ^ set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_save_pretrained_of_a_quantized_moe_model(tmp_path):
    """The bug: transformers' save reverts its MoE checkpoint conversion (split the stacked experts back
    into per-expert tensors) onto the packed NF4 weight and fails with an IndexError. The 4-bit tensors
    are saved under their own names instead, and the checkpoint reloads pre-quantised."""
    model = fastft.quantize(_dense("qwen3_moe"), double_quant=False)
    assert model.config.quantization_config.quant_method == "fastft_nf4"
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj.weight" in keys
    assert not any(".experts.0." in k for k in keys)  # no per-expert split of packed bytes
    again = _load(tmp_path)
    assert isinstance(again.model.layers[0].mlp.experts.gate_up_proj, ExpertsWeight4bit)
    assert torch.equal(again(_ids()).logits, model(_ids()).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_quantized_equals_quantize_after_load_and_reloads(family, tmp_path):
    _dense(family).save_pretrained(tmp_path / "16bit")
    dq = family == "llama"
    cfg = fastft.NF4Config(double_quant=dq)
    loaded = _load(tmp_path / "16bit", quantization_config=cfg)
    after = fastft.quantize(_load(tmp_path / "16bit"), double_quant=dq)
    n4 = [n for n, m in loaded.named_modules() if isinstance(m, Linear4bit)]
    assert n4 and not any("lm_head" in n for n in n4)
    if family in ("qwen3_moe", "gpt_oss"):
        experts = [m for m in loaded.modules() if isinstance(m, ExpertsWeight4bit)]
        assert len(experts) == 2 * loaded.config.num_hidden_layers
        assert all(e.transposed == (family == "gpt_oss") for e in experts)
    _same_state(loaded, after)
    want = after(_ids()).logits
    assert torch.equal(loaded(_ids()).logits, want)
    assert loaded.is_loaded_in_4bit and loaded.config.quantization_config.double_quant == dq
    # both save to a checkpoint that plain from_pretrained reloads pre-quantised, to the same logits
    for name, model in (("loaded", loaded), ("after", after)):
        model.save_pretrained(tmp_path / name)
        again = _load(tmp_path / name)
        assert type(again.hf_quantizer).__name__ == "NF4HfQuantizer" and again.hf_quantizer.pre_quantized
        _same_state(again, loaded)
        assert torch.equal(again(_ids()).logits, want), name


def test_qlora_and_patch_on_a_loaded_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    _dense("llama").save_pretrained(tmp_path)
    model = _load(tmp_path, quantization_config=fastft.NF4Config(double_quant=False))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, cfg).train()
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    assert n_lora == 14  # all-linear found the 4-bit layers, not the head
    batch = tiny_batch(VOCAB, seq=12)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = step()
    assert ref_grads and all("lora_" in n for n in ref_grads)
    report = fastft.patch(model)
    fused = [p for p in report.patched if p.feature == "lora"]
    assert len(fused) == n_lora and all("4-bit NF4 base" in p.detail for p in fused)
    loss, grads = step()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6)


def test_what_is_not_supported_says_so(tmp_path):
    _dense("llama").save_pretrained(tmp_path)
    cfg = fastft.NF4Config(double_quant=False)
    with pytest.raises(ValueError, match="disk"):
        _load(tmp_path, quantization_config=cfg, device_map={"": "disk"})
    model = _load(tmp_path, quantization_config=cfg)
    with pytest.raises(NotImplementedError, match=r"cannot be dequantised in place \(model.dequantize\(\)\)"):
        model.dequantize()
    with pytest.raises(ValueError, match="blocksize"):
        fastft.NF4Config(blocksize=48)
    with pytest.raises(ValueError, match="unknown option"):  # a checkpoint of a newer format
        fastft.NF4Config.from_dict({"quant_method": "fastft_nf4", "blocksize": 64, "nf5": True})
    back = fastft.NF4Config.from_dict(cfg.to_dict())
    assert back.to_dict() == cfg.to_dict() and back.quantize_kwargs()["skip"] == ("lm_head",)


def test_registration_runs_when_transformers_registry_is_imported(monkeypatch):
    """``import fastft`` registers NF4Config without importing transformers: a meta-path hook runs the
    registration right after transformers' quantizer registry module is imported. The hook, on a stand-in
    module (the real one is imported once per process, here long before this test)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["fastft_nf4"] is fastft.NF4Config
    assert AUTO_QUANTIZER_MAPPING["fastft_nf4"].__name__ == "NF4HfQuantizer"
    calls = []
    monkeypatch.setattr(fastft, "_register_hf_quantizer", lambda: calls.append(sys.modules.get("colorsys")))
    monkeypatch.setattr(fastft._RegisterAfterImport, "name", "colorsys")
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    hook = fastft._RegisterAfterImport()
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    import colorsys

    assert calls == [colorsys] and hook not in sys.meta_path  # after the module ran, once
