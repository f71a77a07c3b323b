"""Micro benchmarks of fastft's ops against what a model runs without fastft, for pytest-benchmark.

    pytest bench/ --benchmark-only                       # every op, fastft and reference side by side
    pytest bench/ --benchmark-only -k lora               # one group
    pytest bench/ --benchmark-only --benchmark-json out.json

Small CPU shapes (fp32; a CUDA device is used when ``FASTFT_MICRO_DEVICE=cuda``), forward +
backward unless the op is forward-only. Each test times one provider of one op; tests of the same
op share a ``benchmark.group`` so pytest-benchmark prints them together. Every test also checks
what it timed: the output (and gradients) of the call equal the other provider's within the op's
tolerance. These files live in ``bench/``, outside the ``tests`` testpath, so the normal
``python -m pytest -q tests`` never collects them; the end-to-end scripts are ``bench/bench_*.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastft.ops as F_ops

DEVICE = os.environ.get("FASTFT_MICRO_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip("FASTFT_MICRO_DEVICE=cuda but no CUDA device", allow_module_level=True)
PROVIDERS = ("fastft", "reference")


def _sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _fwd_bwd(fn, leaves, dy=None):
    """A callable running ``fn()`` forward + backward, returning the output and the leaves' grads."""

    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        if dy is None:
            outs[0].backward()
        else:
            torch.autograd.backward(outs, dy)
        _sync()
        return tuple(o.detach() for o in outs) + tuple(t.grad for t in leaves)

    return step


def _assert_close(got, want, rtol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-12)
        assert err <= rtol, f"output {i}: max rel err {err:.2e} > {rtol:g}"


def _run(benchmark, group: str, provider: str, steps: dict, rtol: float):
    """Time ``steps[provider]`` and check its result against the other provider's."""
    benchmark.group = group
    benchmark.extra_info["device"] = DEVICE
    other = next(p for p in steps if p != provider)
    want = steps[other]()
    got = benchmark(steps[provider])
    _assert_close(got, want, rtol)


# --------------------------------------------------------------------------------------
# cross-entropy
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cross_entropy(benchmark, provider):
    from torch.nn.functional import cross_entropy

    g = _gen(0)
    logits = _leaf(_randn(g, 2048, 4096))
    target = torch.randint(0, 4096, (2048,), generator=g).to(DEVICE)
    target[::17] = -100
    steps = {
        "fastft": _fwd_bwd(lambda: F_ops.cross_entropy(logits, target), [logits]),
        "reference": _fwd_bwd(lambda: cross_entropy(logits, target, ignore_index=-100), [logits]),
    }
    _run(benchmark, "cross_entropy 2048 x 4096 fwd+bwd", provider, steps, 1e-4)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_fused_linear_cross_entropy(benchmark, provider):
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = _gen(1)
    T, Hd, V = 1024, 256, 16384
    h = _leaf(_randn(g, 1, T, Hd))
    w = _leaf(_randn(g, V, Hd, scale=Hd**-0.5))
    labels = torch.randint(0, V, (1, T), generator=g).to(DEVICE)
    labels[:, ::13] = -100
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    steps = {
        "fastft": _fwd_bwd(lambda: F_ops.fused_linear_cross_entropy(h, w, shift), [h, w]),
        "reference": _fwd_bwd(lambda: ForCausalLMLoss(torch.nn.functional.linear(h, w), labels, vocab_size=V), [h, w]),
    }
    _run(benchmark, f"fused_linear_cross_entropy {T} x {Hd} x {V} fwd+bwd (vs lm_head + transformers loss)",
         provider, steps, 1e-3)  # fmt: skip


# --------------------------------------------------------------------------------------
# LoRA and NF4
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_lora_linear(benchmark, provider):
    g = _gen(2)
    T, K, N, r, s = 1024, 512, 512, 16, 2.0
    x = _leaf(_randn(g, 1, T, K))
    W = _randn(g, N, K, scale=K**-0.5)
    A = _leaf(_randn(g, r, K, scale=K**-0.5))
    B = _leaf(_randn(g, N, r, scale=0.1))
    dy = _randn(g, 1, T, N)

    def reference():  # PEFT's Linear.forward: base layer, then the adapter branch added
        return torch.nn.functional.linear(x, W) + torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * s

    steps = {
        "fastft": _fwd_bwd(lambda: F_ops.lora_linear(x, W, A, B, s), [x, A, B], (dy,)),
        "reference": _fwd_bwd(reference, [x, A, B], (dy,)),
    }
    _run(benchmark, f"lora_linear {T} tok {K}->{N} r{r} fwd+bwd (vs PEFT's eager math)", provider, steps, 1e-4)


def _nf4_weight(seed: int, n: int, k: int):
    g = _gen(seed)
    w = _randn(g, n, k, scale=k**-0.5)
    packed, state = F_ops.quantize_nf4(w)
    return packed, state


def _bnb_or_torch():
    """bitsandbytes' functional module when it imports and runs here, else None (reference = fastft's torch path)."""
    try:
        import bitsandbytes.functional as bnbF  # noqa: N812

        return bnbF
    except Exception:
        return None


@pytest.mark.parametrize("provider", PROVIDERS)
def test_nf4_dequant(benchmark, provider):
    packed, state = _nf4_weight(3, 2048, 2048)
    bnbF = _bnb_or_torch()

    def reference():
        if bnbF is not None:
            return (bnbF.dequantize_4bit(packed, state.to_bnb(), quant_type="nf4").float(),)
        return (F_ops.dequantize_nf4(packed, state, backend="torch").float(),)

    steps = {"fastft": lambda: (F_ops.dequantize_nf4(packed, state).float(),), "reference": reference}
    ref = "bitsandbytes" if bnbF is not None else "torch reference"
    _run(benchmark, f"nf4 dequantize 2048 x 2048 (vs {ref})", provider, steps, 0.0)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_nf4_matmul(benchmark, provider):
    packed, state = _nf4_weight(4, 2048, 2048)
    x = _randn(_gen(5), 16, 2048)
    bnb = None
    try:
        import bitsandbytes

        bnb = bitsandbytes
    except Exception:
        pass

    def reference():
        if bnb is not None:
            qs = state.to_bnb()
            qs.dtype = x.dtype
            return (bnb.matmul_4bit(x, packed.t(), quant_state=qs),)
        return (F_ops.nf4_matmul_reference(x, packed, state),)

    steps = {"fastft": lambda: (F_ops.nf4_matmul(x, packed, state),), "reference": reference}
    ref = "bitsandbytes matmul_4bit" if bnb is not None else "torch reference"
    _run(benchmark, f"nf4_matmul 16 x 2048 -> 2048 fp32 (vs {ref})", provider, steps, 1e-4)


# --------------------------------------------------------------------------------------
# RMSNorm, SwiGLU, RoPE
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_rms_norm(benchmark, provider):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = _gen(6)
    x = _leaf(_randn(g, 1, 2048, 1024))
    mod = LlamaRMSNorm(1024, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        mod.weight.copy_(1.0 + 0.1 * torch.randn(1024, generator=g).to(DEVICE))
    w = _leaf(mod.weight.detach())
    dy = _randn(g, 1, 2048, 1024)
    steps = {
        "fastft": _fwd_bwd(lambda: F_ops.rms_norm(x, w, 1e-6), [x, w], (dy,)),
        "reference": _fwd_bwd(lambda: mod(x), [x, mod.weight], (dy,)),
    }
    _run(benchmark, "rms_norm 2048 x 1024 fwd+bwd (vs LlamaRMSNorm)", provider, steps, 1e-4)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_swiglu(benchmark, provider):
    from transformers.activations import ACT2FN

    g = _gen(7)
    gate, up = _leaf(_randn(g, 1, 2048, 2816)), _leaf(_randn(g, 1, 2048, 2816))
    dy = _randn(g, 1, 2048, 2816)
    act = ACT2FN["silu"]
    steps = {
        "fastft": _fwd_bwd(lambda: F_ops.swiglu(gate, up), [gate, up], (dy,)),
        "reference": _fwd_bwd(lambda: act(gate) * up, [gate, up], (dy,)),
    }
    _run(benchmark, "swiglu 2048 x 2816 fwd+bwd (vs silu(gate) * up)", provider, steps, 1e-4)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_rope(benchmark, provider):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = _gen(8)
    S, hq, hk, d = 2048, 16, 4, 64
    q = _leaf(_randn(g, 1, S, hq, d).transpose(1, 2))
    k = _leaf(_randn(g, 1, S, hk, d).transpose(1, 2))
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(S, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)[None]
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    dq, dk = _randn(g, 1, hq, S, d), _randn(g, 1, hk, S, d)
    steps = {
        "fastft": _fwd_bwd(lambda: F_ops.rope(q, k, cos, sin), [q, k], (dq, dk)),
        "reference": _fwd_bwd(lambda: apply_rotary_pos_emb(q, k, cos, sin), [q, k], (dq, dk)),
    }
    _run(benchmark, f"rope {S} pos, q {hq} / k {hk} heads x {d} fwd+bwd (vs apply_rotary_pos_emb)", provider, steps,
         1e-5)  # fmt: skip
