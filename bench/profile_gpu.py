"""Where the GPU time goes: kernel tables (torch.profiler) for the LoRA layer and the fused
linear cross-entropy, fastft against the reference, plus a chunk-budget sweep of the fused CE.

    python bench/profile_gpu.py [--what lora,ce,sweep]

A diagnostic for a developer on a GPU machine; the benches in bench/ are the measurements.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile


def _table(fn, label, n=5, rows=14):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    print(f"\n### {label} ({n} iterations)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def _ms(fn, reps=20):
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def _lora_case(dev, p):
    import peft

    from fastft.ops import lora_linear

    N, din, dout, r = 8192, 4096, 4096, 16
    base = torch.nn.Linear(din, dout, bias=False, device=dev, dtype=torch.bfloat16).requires_grad_(False)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["lin"])

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = base

        def forward(self, x):
            return self.lin(x)

    pm = peft.get_peft_model(M(), cfg).to(dev)
    layer = pm.base_model.model.lin
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(N, din, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(N, dout, device=dev, dtype=torch.bfloat16)

    def run_peft():
        y = pm(x)
        y.backward(dy)

    def run_fastft():
        y = lora_linear(x, base.weight, A, B, scaling=2.0, dropout_p=p)
        y.backward(dy)

    def run_base():
        y = base(x)
        y.backward(dy)

    print(
        f"\n## LoRA {N}x{din}->{dout} r{r} p={p} bf16: peft {_ms(run_peft):.3f} ms, "
        f"fastft {_ms(run_fastft):.3f} ms, base {_ms(run_base):.3f} ms"
    )
    _table(run_peft, f"peft p={p}")
    _table(run_fastft, f"fastft p={p}")


def lora(dev):
    for p in (0.0, 0.1):
        _lora_case(dev, p)


def ce(dev, sweep_only=False):
    from transformers.loss.loss_utils import ForCausalLMLoss

    from fastft.ops import fused_linear_cross_entropy

    T, H, V = 8192, 4096, 128256
    h = torch.randn(1, T, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, H, device=dev) / H**0.5).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, V, (1, T), device=dev)
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)

    def run_ref():
        logits = torch.nn.functional.linear(h, w)
        ForCausalLMLoss(logits, labels, V).backward()
        h.grad = w.grad = None

    def run_fastft():
        fused_linear_cross_entropy(h, w, shift).backward()
        h.grad = w.grad = None

    print(f"\n## fused linear CE {T}x{H}x{V} bf16: transformers {_ms(run_ref):.2f} ms")
    for mb in (64, 256, 512, 1024, 2048):
        os.environ["FASTFT_CE_CHUNK_MB"] = str(mb)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = _ms(run_fastft)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(f"fastft chunk budget {mb} MiB: {t:.2f} ms, peak +{peak:.0f} MiB")
    os.environ.pop("FASTFT_CE_CHUNK_MB", None)
    if not sweep_only:
        _table(run_ref, "transformers CE")
        _table(run_fastft, "fastft fused linear CE (default budget)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--what", default="lora,ce")
    a = p.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    what = a.what.split(",")
    if "lora" in what:
        lora(dev)
    if "ce" in what:
        ce(dev)
    elif "sweep" in what:
        ce(dev, sweep_only=True)


if __name__ == "__main__":
    main()
