"""Merging LoRA adapters into fastft's 4-bit weights (``merge_and_unload``, ``merge_adapter``).

PEFT wraps :class:`fastft.nn.Linear4bit` (an ``nn.Linear`` subclass) with its plain
``lora.Linear``, whose ``merge`` does ``base.weight.data += delta``: on the packed uint8 bytes
that is a shape error, or worse. The patch gives each such layer the merge PEFT gives a
bitsandbytes ``Linear4bit`` base: dequantise, add the adapter's delta (fp32), quantise again with
the layer's own blocksize and double quantisation (:meth:`Linear4bit.requantize_`), so a merged
fastft model has the bytes a merged bitsandbytes model has. As there, quantising again rounds:
the merged model's outputs differ from the adapted model's by up to the NF4 rounding of the
weights, which can be as large as a small adapter's effect; one warning says so, as PEFT's does.
``unmerge`` subtracts the delta the same way (not an exact inverse, for the same reason).

4-bit *expert* weights (:class:`fastft.nn.ExpertsWeight4bit`) are not merged (their ``data``
raises, with the way to merge on the 16-bit model): the patch checks for them before PEFT merges
anything, so ``merge_and_unload`` / ``merge_adapter`` raise before a single layer is changed
instead of half-way through the model.
"""

from __future__ import annotations

import warnings

import torch

_WARNING = (
    "fastft: merging LoRA into 4-bit (NF4) weights dequantises, adds the adapter and quantises again, "
    "as PEFT does for bitsandbytes: the merged model's outputs can differ from the adapted model's by the "
    "rounding. For an exact merge, load the base model in 16 bits and merge the saved adapter there."
)


class Merge4bit:
    """The ``merge`` of a PEFT LoRA linear layer over a :class:`fastft.nn.Linear4bit` base (PEFT's signature)."""

    def __init__(self, layer):
        self.layer = layer

    def _delta(self, adapter: str) -> torch.Tensor:
        layer = self.layer
        if adapter in getattr(layer, "lora_variant", {}):
            v = type(layer.lora_variant[adapter]).__name__
            raise ValueError(f"cannot merge the LoRA variant {v} (e.g. DoRA) into fastft's 4-bit weight")
        return layer.get_delta_weight(adapter).float()

    def _bias_delta(self, adapter: str):
        layer = self.layer
        if not layer.lora_bias.get(adapter, False):
            return None
        if layer.get_base_layer().bias is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        return layer.lora_B[adapter].bias * layer.scaling[adapter]

    def __call__(self, safe_merge: bool = False, adapter_names=None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        layer = self.layer
        adapter_names = check_adapters_to_merge(layer, adapter_names)
        if not adapter_names:
            return
        warnings.warn(_WARNING, UserWarning, stacklevel=2)
        base = layer.get_base_layer()
        for adapter in adapter_names:
            if adapter not in layer.lora_A:
                continue
            w = base.dequantize(torch.float32) + self._delta(adapter)
            db = self._bias_delta(adapter)
            if safe_merge and not (torch.isfinite(w).all() and (db is None or torch.isfinite(base.bias + db).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            base.requantize_(w)
            if db is not None:
                base.bias.data += db.to(base.bias.dtype)
            layer.merged_adapters.append(adapter)


class Unmerge4bit(Merge4bit):
    """The ``unmerge`` of the same layer: dequantise, subtract the delta, quantise again."""

    def __call__(self) -> None:
        layer = self.layer
        if not layer.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = layer.get_base_layer()
        while layer.merged_adapters:
            adapter = layer.merged_adapters.pop()
            if adapter not in layer.lora_A:
                continue
            base.requantize_(base.dequantize(torch.float32) - self._delta(adapter))
            db = self._bias_delta(adapter)
            if db is not None:
                base.bias.data -= db.to(base.bias.dtype)


def install(ctx, layer) -> None:
    """Give the PEFT LoRA layer ``layer`` (over a fastft ``Linear4bit``) the 4-bit merge and unmerge."""
    ctx.swap(layer, "merge", Merge4bit(layer))
    ctx.swap(layer, "unmerge", Unmerge4bit(layer))


class CheckMerge4bitExperts:
    """The PEFT tuner's ``_check_merge_allowed``, also refusing (before anything merges) a model whose
    LoRA adapts 4-bit expert weights."""

    def __init__(self, tuner, original):
        self.tuner, self.original = tuner, original

    def __call__(self):
        from ..nn import _MERGE_4BIT, ExpertsWeight4bit
        from .experts_lora import is_param_wrapper

        self.original()
        for name, m in self.tuner.named_modules():
            if is_param_wrapper(m) and isinstance(
                getattr(m.get_base_layer(), m.parameter_name, None), ExpertsWeight4bit
            ):
                if any(a in m.lora_A for a in m.active_adapters):
                    raise ValueError(f"{name}: {_MERGE_4BIT}")


def guard_experts_merge(ctx) -> None:
    """Install :class:`CheckMerge4bitExperts` on the PEFT model's tuner (``base_model``), if there is one."""
    tuner = getattr(ctx.wrapper, "base_model", None) if ctx.wrapper is not None else None
    if tuner is None or not hasattr(tuner, "_check_merge_allowed"):
        return
    ctx.swap(tuner, "_check_merge_allowed", CheckMerge4bitExperts(tuner, tuner._check_merge_allowed))


__all__ = ["Merge4bit", "Unmerge4bit", "install", "guard_experts_merge"]
