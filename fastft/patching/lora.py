"""The LoRA patch: every PEFT LoRA linear layer runs :func:`fastft.ops.lora_linear`.

PEFT's modules and parameters stay exactly as they are (state-dict keys,
``save_pretrained``, ``merge_and_unload``, ``disable_adapter()``); only each layer's
``forward`` becomes a :class:`FusedLoraForward`, which checks on every call that the
layer is in the plain single-adapter state the fused op computes, and otherwise runs
PEFT's own forward. Dropout > 0 takes the fused path too.

Found by structure: a module with PEFT's ``lora_A``/``lora_B``/``lora_dropout``/``scaling``
dicts and a ``base_layer`` that is an ``nn.Linear`` or transformers' ``Conv1D``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import backends
from ..ops.lora import OP_LORA, lora_linear
from . import merge_4bit
from .experts_lora import is_expert_lora_layer
from .guard import GuardedForward

FEATURE = "lora"


def _is_conv1d(module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def _is_bnb_4bit(module) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and hasattr(
        getattr(module, "weight", None), "quant_state"
    )


def _base_kind(base) -> str | None:
    if type(base) is nn.Linear:
        return "linear"
    if _is_conv1d(base):
        return "conv1d"
    from ..nn import Linear4bit

    if isinstance(base, Linear4bit):
        return "nf4"
    if _is_bnb_4bit(base):
        qs = base.weight.quant_state
        return "bnb-nf4" if qs is not None and getattr(qs, "quant_type", "nf4") == "nf4" else None
    return None


def nf4_rows_note(base) -> str:
    """'' when the 4-bit ``base``'s NF4 blocks lie within its rows (the fused kernels apply), else why
    not: its forward then dequantises the weight and runs the framework's GEMM."""
    from ..nn import Linear4bit

    if isinstance(base, Linear4bit):
        blocksize = base.blocksize
    else:
        blocksize = getattr(getattr(base.weight, "quant_state", None), "blocksize", None)
    k = getattr(base, "in_features", None)
    if not blocksize or not k or k % int(blocksize) == 0:
        return ""
    return f"; in_features {k} is not a multiple of blocksize {int(blocksize)}: dequantise + GEMM, not the fused kernel"


def bnb_standard_layout(module) -> None:
    """Undo bitsandbytes' CPU repacking of a ``Linear4bit`` weight, in place.

    On a CPU with AVX512-BF16, bitsandbytes' own eval-mode forward rewrites the packed
    weight into a kernel-specific layout (and its absmax to bf16) the first time it runs;
    fastft reads the standard NF4 layout, so it restores it with bitsandbytes' own inverse
    (as bitsandbytes does before saving a state dict)."""
    qs = module.weight.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, qs)


def _base_weight(base, kind):
    """(weight, bias, quant_state, compute dtype or None) of a base layer, for lora_linear."""
    if kind == "nf4":
        return base.weight, base.bias, base.quant_state, None
    if kind == "bnb-nf4":
        bnb_standard_layout(base)
        return base.weight, base.bias, base.weight.quant_state, getattr(base, "compute_dtype", None)
    return base.weight, base.bias, None, None


def _is_lora_layer(module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except Exception:  # pragma: no cover
        return False
    return isinstance(module, LoraLayer) and hasattr(module, "base_layer") and hasattr(module, "lora_A")


class FusedLoraForward(GuardedForward):
    """The patched ``forward`` of one PEFT LoRA layer."""

    feature = FEATURE

    def __init__(
        self, layer, original, backend: str, fan_in_fan_out: bool, kind: str = "linear", precision="activation", **where
    ):
        super().__init__(original, backend, **where)
        self.layer = layer
        self.fan_in_fan_out = fan_in_fan_out
        self.kind = kind
        self.precision = precision
        self.group, self.group_index = None, None  # set by patching.lora_group

    def unfused_reason(self, args, kwargs) -> str | None:
        """Why this call cannot take the fused path (None when it can)."""
        layer = self.layer
        if args or kwargs:
            return "extra forward arguments (e.g. adapter_names for a mixed batch)"
        if layer.disable_adapters:
            return "adapters disabled"
        if layer.merged:
            return "adapter merged into the base weight"
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if len(active) != 1:
            return f"{len(active)} active adapters"
        if active[0] in getattr(layer, "lora_variant", {}):
            return f"LoRA variant {type(layer.lora_variant[active[0]]).__name__} (e.g. DoRA)"
        return None

    @staticmethod
    def misfit(x, lora_A) -> str | None:
        """Why the input ``x`` does not fit the fused op (None when it does)."""
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() == 0:
            return "input is not a floating-point tensor"
        k = lora_A.weight.shape[-1]
        if x.shape[-1] != k:
            return f"input's last dim {x.shape[-1]} is not the layer's in_features {k}"
        return None

    def __call__(self, x, *args, **kwargs):
        why = self.unfused_reason(args, kwargs)
        if why is not None:
            return self.fall_back(why, x, *args, **kwargs)
        layer = self.layer
        adapter = next(a for a in layer.active_adapters if a in layer.lora_A)
        why = None if self.forced else self.misfit(x, layer.lora_A[adapter])
        if why is not None:
            return self.fall_back(why, x, *args, **kwargs)
        if self.group is not None:
            y = self.group.output(self, x, adapter)
            if y is not None:
                return y
        return self.fused_or_fall_back(lambda: self._fused(x, adapter), (x, *args), kwargs)

    def _fused(self, x, adapter):
        layer = self.layer
        lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
        drop = layer.lora_dropout[adapter]
        p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
        if not getattr(layer, "cast_input_dtype_enabled", True) and x.dtype != lora_A.weight.dtype:
            return self.fall_back("input dtype differs from the adapter's and input casting is off", x)
        weight, bias, quant_state, compute_dtype = _base_weight(layer.base_layer, self.kind)
        in_dtype = x.dtype
        if compute_dtype is not None and x.dtype != compute_dtype:  # bitsandbytes' Linear4bit casts its input
            x = x.to(compute_dtype)
        if quant_state is not None and bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        y = lora_linear(
            x,
            weight,
            lora_A.weight,
            lora_B.weight,
            layer.scaling[adapter],
            bias=bias,
            lora_bias=lora_B.bias,
            dropout_p=p,
            fan_in_fan_out=self.fan_in_fan_out,
            quant_state=quant_state,
            backend=self.backend,
            precision=self.precision,
        )
        return y.to(in_dtype) if y.dtype != in_dtype else y


def _dropout_text(layer) -> str:
    ps = {float(d.p) for d in layer.lora_dropout.values() if isinstance(d, nn.Dropout)}
    return f"dropout {max(ps):g} fused (mask regenerated from a seed)" if ps and max(ps) > 0 else "no dropout"


def _precision_text(layer, precision: str) -> str:
    dts = {p.dtype for a in layer.lora_A.values() for p in a.parameters()}
    base = getattr(layer.base_layer, "compute_dtype", None) or layer.base_layer.weight.dtype
    if not base.is_floating_point:  # packed 4-bit: the activations' dtype is known per call only
        return f"{precision} precision"
    if dts <= {base}:
        return f"branch in {str(base).replace('torch.', '')}"
    ad = "/".join(sorted(str(d).replace("torch.", "") for d in dts))
    if precision == "peft":
        return f"{ad} adapters, PEFT's promotion of x to {ad} (lora_precision='peft')"
    return f"{ad} adapters cast once per call, branch in the activation dtype"


def apply(ctx) -> None:
    root = ctx.wrapper if ctx.wrapper is not None else ctx.model
    backend = ctx.options["backend"]
    found = 0
    fused = {}
    for name, module in root.named_modules():
        if not _is_lora_layer(module):
            continue
        found += 1
        if ctx.options.get("experts", False) and is_expert_lora_layer(module):
            continue  # PEFT LoRA on an expert weight (target_parameters): the experts feature fuses and reports it
        base = module.base_layer
        kind = _base_kind(base)
        if kind is None:
            why = f"base layer is {type(base).__name__}"
            if _is_bnb_4bit(base):
                why += " with a 4-bit type other than NF4"
            ctx.report.skip(FEATURE, name, f"{why}: PEFT's forward is kept")
            continue
        if not isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict):
            ctx.report.skip(FEATURE, name, f"{type(module).__name__} is not a LoRA linear layer")
            continue
        if kind == "nf4":  # PEFT's merge would add the delta to the packed bytes: merge as for bitsandbytes
            merge_4bit.install(ctx, module)
        variants = [a for a in module.lora_A if a in getattr(module, "lora_variant", {})]
        if variants:
            v = type(module.lora_variant[variants[0]]).__name__
            ctx.report.skip(FEATURE, name, f"LoRA variant {v} (e.g. DoRA) is not fused: PEFT's forward is kept")
            continue
        if kind in ("nf4", "bnb-nf4") and not ctx.options["quant"]:
            ctx.report.skip(FEATURE, name, "4-bit base and quant=False: PEFT's forward is kept")
            continue
        fifo = kind == "conv1d"
        if kind == "linear" and getattr(module, "fan_in_fan_out", False):
            ctx.report.skip(FEATURE, name, "fan_in_fan_out=True on an nn.Linear base is not a layout fastft fuses")
            continue
        precision = ctx.options.get("lora_precision", "activation")
        fwd = FusedLoraForward(module, module.forward, backend, fifo, kind, precision, target=name, report=ctx.report)
        ctx.swap(module, "forward", fwd)
        fused[name] = (module, fwd)
        device = base.weight.device
        how = backends.select(OP_LORA, device, backend).backend
        layout = {
            "linear": "Linear base",
            "conv1d": "Conv1D base (fan_in_fan_out)",
            "nf4": "fastft 4-bit NF4 base (QLoRA, dequantised inside the fused op)",
            "bnb-nf4": "bitsandbytes 4-bit NF4 base (QLoRA, dequantised inside the fused op)",
        }[kind]
        note = nf4_rows_note(base) if kind in ("nf4", "bnb-nf4") else ""
        ctx.report.add(
            FEATURE,
            name,
            f"lora_linear [{how}], {layout}, {_dropout_text(module)}, {_precision_text(module, precision)}{note}",
        )
    if fused and ctx.options.get("lora_group", False):
        from . import lora_group

        lora_group.apply(ctx, fused)
    if found == 0:
        where = "the model has no PEFT LoRA layers" if ctx.wrapper is None else "the PEFT model has no LoRA layers"
        ctx.report.skip(FEATURE, "model", where)


__all__ = ["apply", "FusedLoraForward", "FEATURE"]
