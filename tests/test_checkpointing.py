"""fastft.patch(model, checkpointing=...): per-layer activation checkpointing gives the same gradients, less memory."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import fastft
from fastft.patching import checkpointing as ckpt
from fastft.testing import tiny_batch, tiny_model

VOCAB = 256
MODES = ["recompute", "offload"]
FAMILIES = ["llama", "gemma2", "gpt2"]


def _peft(model, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpt2: fan_in_fan_out set for Conv1D
        return get_peft_model(model, cfg)


def _build(family, wrapped, dropout=0.0, **kw):
    kw.setdefault("vocab_size", VOCAB)
    model = tiny_model(family, **kw)
    if wrapped:
        model = _peft(model, dropout)
    return model.train()


def _hf(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _layers(model):
    base = _hf(model)
    return base.transformer.h if hasattr(base, "transformer") else base.model.layers


def _grads(model, batch, seed=None, **kwargs):
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads


def _assert_same(ref, got, rtol=1e-6):
    loss_ref, g_ref = ref
    loss, g = got
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=1e-7)
    assert g.keys() == g_ref.keys() and g
    for name, x in g.items():
        scale = g_ref[name].abs().max().clamp(min=1e-8)
        err = ((x - g_ref[name]).abs().max() / scale).item()
        assert err <= rtol, f"{name}: relative error {err:.2e}"


def _calls(model):
    return [layer.forward.checkpointed_calls for layer in _layers(model)]


def _count_transformers_checkpoints(model):
    """Wrap each layer's _gradient_checkpointing_func (set by gradient_checkpointing_enable) with a counter."""
    counter = []
    for layer in _layers(model):
        inner = layer._gradient_checkpointing_func

        def counted(*a, _inner=inner, **k):
            counter.append(1)
            return _inner(*a, **k)

        layer._gradient_checkpointing_func = counted
    return counter


@pytest.mark.parametrize("wrapped", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_equal_without_checkpointing(mode, family, wrapped):
    model = _build(family, wrapped)
    batch = tiny_batch(VOCAB, batch=2, seq=24)
    report = fastft.patch(model)  # the loss (and LoRA) patches, no checkpointing
    assert "checkpointing" not in report.features()
    ref = _grads(model, batch)

    report = fastft.patch(model, checkpointing=mode)
    assert {"loss", "checkpointing"} <= report.features()
    assert ("lora" in report.features()) == wrapped
    rows = [p for p in report.patched if p.feature == "checkpointing"]
    assert len(rows) == 2 and all(p.target.endswith(f".{i}.forward") for i, p in enumerate(rows))
    assert all(isinstance(layer.forward, ckpt.CheckpointedForward) for layer in _layers(model))
    _assert_same(ref, _grads(model, batch))
    assert _calls(model) == [1, 1]
    if mode == "offload":  # a CPU model: offload is recompute, and the report says so
        assert any(s.feature == "checkpointing" and "behaves as 'recompute'" in s.reason for s in report.skipped)
        assert _layers(model)[0].forward.offloader.offloaded == 0


@pytest.mark.parametrize("mode", MODES)
def test_lora_dropout_masks_are_replayed_by_the_recompute(mode):
    model = _build("llama", True, dropout=0.1)
    batch = tiny_batch(VOCAB, seq=24)
    fastft.patch(model)
    ref = _grads(model, batch, seed=3)
    fastft.patch(model, checkpointing=mode)
    _assert_same(ref, _grads(model, batch, seed=3))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", MODES)
def test_transformers_checkpointing_on_before_patch_is_taken_over(mode, family):
    model = _build(family, True)
    batch = tiny_batch(VOCAB, seq=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _hf(model).gradient_checkpointing_enable()
    counter = _count_transformers_checkpoints(model)
    fastft.patch(model)
    ref = _grads(model, batch)  # transformers' checkpointing
    assert len(counter) == 2

    report = fastft.patch(model, checkpointing=mode)
    assert all(layer.gradient_checkpointing is False for layer in _layers(model))
    assert all("switched off while patched" in p.detail for p in report.patched if p.feature == "checkpointing")
    counter.clear()
    _assert_same(ref, _grads(model, batch))
    assert counter == [] and _calls(model) == [1, 1]  # checkpointed once, by fastft

    assert fastft.unpatch(model)
    assert all(layer.gradient_checkpointing is True for layer in _layers(model))
    assert all("forward" not in layer.__dict__ for layer in _layers(model))
    _assert_same(ref, _grads(model, batch))
    assert len(counter) == 2


def test_transformers_checkpointing_enabled_after_patch_is_left_to_transformers():
    model = _build("llama", True)
    batch = tiny_batch(VOCAB, seq=24)
    fastft.patch(model)
    ref = _grads(model, batch)
    report = fastft.patch(model, checkpointing="recompute")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _hf(model).gradient_checkpointing_enable()
    counter = _count_transformers_checkpoints(model)
    _assert_same(ref, _grads(model, batch))
    assert len(counter) == 2 and _calls(model) == [0, 0]  # transformers checkpointed, fastft stepped aside
    # every call of a layer deferred to transformers: once per step with transformers 5.23, twice
    # (the forward and its recompute both go through the layer's forward) with 5.17 on a GPU machine
    deferred = [layer.forward.deferred_calls for layer in _layers(model)]
    assert deferred[0] in (1, 2) and deferred == [deferred[0]] * 2, deferred
    assert any("steps aside" in s.reason for s in report.skipped)


@pytest.mark.parametrize("mode", MODES)
def test_unpatch_restores(mode):
    model = _build("gemma2", False)
    batch = tiny_batch(VOCAB, seq=24)
    ref = _grads(model, batch)
    fastft.patch(model, checkpointing=mode)
    assert fastft.unpatch(model)
    assert all("forward" not in layer.__dict__ for layer in _layers(model))
    assert all("gradient_checkpointing" not in layer.__dict__ for layer in _layers(model))
    _assert_same(ref, _grads(model, batch), rtol=0)
    assert fastft.patch_report(model) is None


def test_eval_and_no_grad_calls_are_not_checkpointed(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    model = _build("llama", True)
    batch = tiny_batch(VOCAB, seq=24)
    ids = {"input_ids": batch["input_ids"]}
    model.eval()
    ref_eval = model(**ids).logits
    model.train()
    with torch.no_grad():
        ref_nograd = model(**ids).logits
    fastft.patch(model, checkpointing="recompute", norms=False, mlp=False, rope=False)

    model.eval()
    torch.testing.assert_close(model(**ids).logits, ref_eval, rtol=0, atol=0)  # eval, grad enabled
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, ref_nograd, rtol=0, atol=0)
    with torch.inference_mode():
        model(**ids)
    assert calls == [] and _calls(model) == [0, 0]
    model(**batch).loss.backward()
    assert len(calls) == 2 and _calls(model) == [1, 1]


def test_an_empty_kv_cache_is_dropped_and_a_filled_one_is_not_checkpointed():
    model = _build("gpt2", False)
    batch = tiny_batch(VOCAB, seq=24)
    ref = _grads(model, batch, use_cache=True)  # gpt2 creates a DynamicCache and passes it positionally
    report = fastft.patch(model, checkpointing="recompute")
    _assert_same(ref, _grads(model, batch, use_cache=True))
    assert _calls(model) == [1, 1]

    from transformers import DynamicCache

    with torch.no_grad():
        past = model(input_ids=batch["input_ids"][:, :8], use_cache=True).past_key_values
    assert past.get_seq_length() == 8
    model(input_ids=batch["input_ids"][:, 8:], past_key_values=past, use_cache=True).logits.sum().backward()
    assert _calls(model) == [1, 1] and isinstance(past, DynamicCache) and past.get_seq_length() == 24
    assert any("filled KV cache" in s.reason for s in report.skipped)


def test_decoder_stacks_found_by_structure():
    stacks, how, others = ckpt.find_decoder_stacks(_hf(_build("llama", True)))
    assert [n for n, _ in stacks] == ["model.layers"] and "GradientCheckpointingLayer" in how and not others

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))  # repeated, but nested / leaves

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([Block(), Block()])
            self.blocks = nn.ModuleList(Block() for _ in range(3))
            self.mixed = nn.ModuleList([Block(), nn.Linear(4, 4), Block(), Block(), Block()])

    stacks, how, others = ckpt.find_decoder_stacks(Net())
    assert [n for n, _ in stacks] == ["blocks"] and "largest" in how
    assert [n for n, _ in others] == ["heads"]
    assert ckpt.find_decoder_stacks(nn.Sequential(nn.Linear(2, 2)))[0] == []

    model = _build("llama", False, layers=0)
    report = fastft.patch(model, checkpointing="recompute")
    assert "checkpointing" not in report.features()
    assert "no decoder stack found" in {s.feature: s.reason for s in report.skipped}["checkpointing"]


def test_report_reads_well():
    model = _build("llama", True)
    text = str(fastft.patch(model, checkpointing="offload"))
    assert "base_model.model.model.layers.*.forward (x2)" in text and "behaves as 'recompute'" in text
    report = fastft.patch(model)
    assert {s.reason for s in report.skipped if s.feature == "checkpointing"} == {"disabled by the caller"}


# --------------------------------------------------------------------------------------
# peak memory, in fresh processes
# --------------------------------------------------------------------------------------
_MEM_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import fastft
    from fastft.testing import tiny_model, tiny_batch
    sys.path.insert(0, "bench")
    from _harness import measure_peak_memory

    torch.set_num_threads(2)
    model = tiny_model("llama", vocab_size=256, hidden_size=128, layers=4).train()
    small = tiny_batch(256, batch=1, seq=16)
    batch = tiny_batch(256, batch=1, seq=512)

    def step(b):
        model(**b).loss.backward()
        model.zero_grad(set_to_none=False)  # keep the .grad buffers: every run holds them alike

    results = {}
    for mode in sys.argv[1:]:
        fastft.patch(model, checkpointing=None if mode == "none" else mode)
        results[mode] = measure_peak_memory(lambda: step(batch), "cpu", prime=lambda: step(small))
    print(json.dumps(results))
    """
)


def _peaks_mib(*modes: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", OMP_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, *modes],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_falls_with_checkpointing():
    # one process when the kernel lets VmHWM be reset (Linux >= 4.0); otherwise one process per mode,
    # each measuring its first large call. Large blocks are mmap-ed, so freed memory leaves the RSS.
    res = _peaks_mib("recompute", "none")
    if not all(r["exact"] and "peak reset" in r["method"] for r in res.values()):
        res = {**_peaks_mib("recompute"), **_peaks_mib("none")}
    none, recompute = res["none"]["peak_mib"], res["recompute"]["peak_mib"]
    assert none is not None and recompute is not None, res
    assert recompute < none, res


# --------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("wrapped", [False, True], ids=["full", "lora"])
def test_offload_on_cuda_equal_gradients_and_less_memory(wrapped):
    dev = torch.device("cuda")
    model = _build("llama", wrapped, hidden_size=256, layers=4).to(dev)
    batch = {k: v.to(dev) for k, v in tiny_batch(VOCAB, batch=2, seq=512).items()}
    # checkpointing only: the GPU loss / LoRA kernels have their own tests (test_gpu.py)
    opts = dict(loss=False, lora=False)

    def step_peak(mode):
        fastft.patch(model, checkpointing=mode, **opts)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = _grads(model, batch)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    ref, peak_none = step_peak(None)
    rec, peak_rec = step_peak("recompute")
    off, peak_off = step_peak("offload")
    _assert_same(ref, rec, rtol=1e-5)
    _assert_same(ref, off, rtol=1e-5)
    offloader = _layers(model)[0].forward.offloader
    assert offloader.offloaded == 4  # each layer's input went to the host once
    report = fastft.patch_report(model)
    assert not any("behaves as 'recompute'" in s.reason for s in report.skipped)
    assert peak_rec < peak_none and peak_off < peak_none, (peak_none, peak_rec, peak_off)
    assert fastft.unpatch(model)
