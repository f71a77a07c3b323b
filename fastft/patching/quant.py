"""The quant patch: 4-bit NF4 layers without LoRA run fastft's dequant-matmul.

bitsandbytes' ``Linear4bit`` (NF4) layers that are not the base of a LoRA layer get a
forward calling :func:`fastft.ops.nf4_matmul` on their own packed weight and
``QuantState`` (no re-quantisation, same bytes). fastft's own ``Linear4bit`` already
runs fastft's kernels and is only reported. LoRA layers over 4-bit bases are the LoRA
patch's business (the fused QLoRA path).
"""

from __future__ import annotations

import torch

from .guard import GuardedForward
from .lora import _is_bnb_4bit, _is_lora_layer, bnb_standard_layout, nf4_rows_note

FEATURE = "quant"


class BnbNF4Forward(GuardedForward):
    """The patched forward of a bitsandbytes NF4 ``Linear4bit``: same inputs, same output dtype."""

    feature = FEATURE

    def __init__(self, module, original, backend: str, **where):
        super().__init__(original, backend, **where)
        self.module = module

    def __call__(self, x, *args, **kwargs):
        m = self.module
        if args or kwargs:
            return self.fall_back("extra forward arguments", x, *args, **kwargs)
        if getattr(m.weight, "quant_state", None) is None:
            return self.fall_back("the weight has no quant_state", x)
        if not self.forced and (not torch.is_tensor(x) or not x.is_floating_point() or x.dim() == 0):
            return self.fall_back("input is not a floating-point tensor", x)
        if not self.forced and x.shape[-1] != m.in_features:
            return self.fall_back(f"input's last dim {x.shape[-1]} is not in_features {m.in_features}", x)
        return self.fused_or_fall_back(lambda: self._fused(x), (x,), {})

    def _fused(self, x):
        m = self.module
        bnb_standard_layout(m)
        qs = m.weight.quant_state
        from ..ops.nf4 import nf4_matmul

        in_dtype = x.dtype
        cd = getattr(m, "compute_dtype", None)
        if cd is not None and x.dtype != cd:
            x = x.to(cd)
        bias = m.bias.to(x.dtype) if m.bias is not None and m.bias.dtype != x.dtype else m.bias
        y = nf4_matmul(x, m.weight, qs, bias, backend=self.backend)
        return y.to(in_dtype) if y.dtype != in_dtype else y


def _cache_absmax(ctx, root) -> None:
    """``nf4_cache_absmax``: every double-quantised 4-bit layer (LoRA bases included) keeps its
    absmax decoded in fp32 beside the 8-bit one; reported per layer with its memory cost."""
    from ..nn import ExpertsWeight4bit, Linear4bit
    from ..ops.nf4 import as_nf4_state

    for name, module in root.named_modules():
        if isinstance(module, ExpertsWeight4bit):
            if not module.double_quant or module.cache_absmax:
                continue
            ctx.swap(module, "cache_absmax", True)
            ctx.swap(module, "_scales", module.decode_scales())  # dropped again by unpatch
            kib = module.absmax.numel() * 4 / 1024
            ctx.report.add(
                FEATURE,
                name,
                f"fp32 absmax cached: +{32 / module.blocksize:g} bit/weight (+{kib:.1f} KiB); "
                "the expert dequantisation skips the 8-bit absmax decode",
            )
            continue
        if isinstance(module, Linear4bit):
            if not module.double_quant or module.cache_absmax:
                continue
            state = module.quant_state.with_absmax_cache()
            ctx.swap(module, "_nf4_state", state)
            ctx.swap(module, "cache_absmax", True)
        elif _is_bnb_4bit(module):
            qs = module.weight.quant_state
            if qs is None or getattr(qs, "quant_type", "nf4") != "nf4" or getattr(qs, "state2", None) is None:
                continue
            bnb_standard_layout(module)
            qs = module.weight.quant_state
            state = as_nf4_state(qs).with_absmax_cache()
            ctx.swap(qs, "_fastft_nf4", state)
        else:
            continue
        kib = state.absmax_cache.numel() * 4 / 1024
        ctx.report.add(
            FEATURE,
            name,
            f"fp32 absmax cached: +{state.extra_bits_per_weight:g} bit/weight (+{kib:.1f} KiB); "
            "the kernels skip the 8-bit absmax decode",
        )


def apply(ctx) -> None:
    from ..nn import Linear4bit

    root = ctx.wrapper if ctx.wrapper is not None else ctx.model
    if ctx.options.get("nf4_cache_absmax"):
        _cache_absmax(ctx, root)
    inside_lora = set()
    for module in root.modules():
        if _is_lora_layer(module):
            inside_lora.add(id(module.base_layer))
    found = 0
    for name, module in root.named_modules():
        if id(module) in inside_lora:
            continue
        if isinstance(module, Linear4bit):
            found += 1
            ctx.report.add(
                FEATURE, name, "fastft Linear4bit: runs fastft's nf4_matmul natively" + nf4_rows_note(module)
            )
        elif _is_bnb_4bit(module):
            found += 1
            qs = module.weight.quant_state
            if qs is None or getattr(qs, "quant_type", "nf4") != "nf4":
                ctx.report.skip(FEATURE, name, "bitsandbytes 4-bit layer that is not NF4: its forward is kept")
                continue
            fwd = BnbNF4Forward(module, module.forward, ctx.options["backend"], target=name, report=ctx.report)
            ctx.swap(module, "forward", fwd)
            ctx.report.add(
                FEATURE,
                name,
                "bitsandbytes NF4 Linear4bit -> fastft nf4_matmul (same packed bytes)" + nf4_rows_note(module),
            )
    if not found:
        ctx.report.skip(FEATURE, "model", "no 4-bit layers outside LoRA layers")
