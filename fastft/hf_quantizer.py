"""``fastft.NF4Config``: fastft's NF4 as a transformers quantization method (``quant_method="fastft_nf4"``).

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=fastft.NF4Config())
    model.save_pretrained(out)                      # safetensors + config.json's quantization_config
    model = AutoModelForCausalLM.from_pretrained(out)   # pre-quantised (after ``import fastft``)

Loading with :class:`NF4Config` builds the model with :class:`fastft.nn.Linear4bit` layers (and, for
MoE experts, :class:`fastft.nn.ExpertsWeight4bit` weights) on the meta device, then quantises each
16-bit weight as transformers reads it from the checkpoint (one layer's weight in 16-bit at a time,
never the whole model): the same layers, bytes and statistics as ``from_pretrained`` followed by
:func:`fastft.quantize`. A checkpoint saved from such a model (or from one quantised with
:func:`fastft.quantize`, which records its :class:`NF4Config` on ``model.config``) holds the packed
NF4 tensors under the layers' own state-dict names and reloads pre-quantised.

Checkpoint format conversions (transformers 5's per-expert <-> stacked expert weights, for instance)
are not applied to 4-bit tensors: they are saved in the model's own layout (``experts.gate_up_proj.weight``,
``.absmax``, ...), which is also the layout they reload from. transformers >= 5 (the weight-conversion
loading API) is required. Registration with transformers happens on ``import fastft``
(:func:`fastft._install_hf_quantizer`), before any ``from_pretrained`` reads a config.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, PrefixChange, WeightConverter
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from .nn import BLOCKSIZES, ExpertsWeight4bit, Linear4bit, experts_targets, linear_targets, run_experts_eager

__all__ = ["NF4Config", "NF4HfQuantizer", "QUANT_METHOD"]

QUANT_METHOD = "fastft_nf4"
_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
_NO_DEQUANTIZE = (
    "fastft NF4 models cannot be dequantised in place (model.dequantize()): the 16-bit weights are not kept. "
    "Load the 16-bit checkpoint without quantization_config, or take one layer's dense copy with "
    "layer.dequantize() (fastft.nn.Linear4bit / ExpertsWeight4bit)"
)


class NF4Config(QuantizationConfigMixin):
    """fastft NF4 quantisation for ``from_pretrained(..., quantization_config=NF4Config(...))``.

    The options are :func:`fastft.quantize`'s: ``blocksize`` (weights per absmax block, a power of two
    in [32, 4096]), ``double_quant`` (8-bit absmax with a second level of fp32 statistics, as
    bitsandbytes' ``bnb_4bit_use_double_quant``), ``skip`` (module names left in 16-bit when any dotted
    component of their name is in it; default the output head), ``cache_absmax`` (keep the decoded fp32
    absmax too: faster kernels, +32 / blocksize bits per weight), ``experts`` (quantise MoE expert
    weights). Saved in ``config.json`` as ``quantization_config`` with ``quant_method: "fastft_nf4"``.
    """

    def __init__(
        self,
        blocksize: int = 64,
        double_quant: bool = True,
        skip: tuple[str, ...] | list[str] | str = ("lm_head",),
        cache_absmax: bool = False,
        experts: bool = True,
        **kwargs,
    ):
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"NF4Config is quant_method {QUANT_METHOD!r}, got {method!r}")
        if kwargs:  # a field this fastft does not know (a newer format?): refuse rather than misread
            raise ValueError(f"NF4Config: unknown option(s) {sorted(kwargs)} (this fastft knows {_FIELDS})")
        self.quant_method = QUANT_METHOD
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.skip = [skip] if isinstance(skip, str) else list(skip)  # a list: what JSON gives back
        self.cache_absmax = cache_absmax
        self.experts = experts
        self.post_init()

    def post_init(self):
        if isinstance(self.blocksize, bool) or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"NF4Config: blocksize must be a power of two in [32, 4096], got {self.blocksize!r}")
        for name in ("double_quant", "cache_absmax", "experts"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"NF4Config: {name} must be a bool, got {getattr(self, name)!r}")
        if not all(isinstance(s, str) for s in self.skip):
            raise TypeError(f"NF4Config: skip must be module names (strings), got {self.skip!r}")

    def quantize_kwargs(self) -> dict:
        """The matching :func:`fastft.quantize` keyword arguments."""
        return dict(
            blocksize=self.blocksize,
            double_quant=self.double_quant,
            skip=tuple(self.skip),
            cache_absmax=self.cache_absmax,
            experts=self.experts,
        )


_FIELDS = ["blocksize", "double_quant", "skip", "cache_absmax", "experts"]


def _quantized_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every 4-bit tensor (packed weights and their statistics) in ``model``, named
    as in the model without PEFT's wrappers (``base_layer`` dropped: what an unloaded model saves)."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, (Linear4bit, ExpertsWeight4bit)):
            name = ".".join(p for p in name.split(".") if p != "base_layer")
            pre = f"{name}." if name else ""
            own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers()]
            keys += [pre + n for n in own if n != "bias"]
    return keys


def _touches(transform, keys: list[str], *, reverse: bool) -> bool:
    """Whether ``transform`` (a checkpoint conversion; its reverse, the one ``save_pretrained`` applies,
    with ``reverse``) would match any of ``keys``. Matched on a copy: the model's own is not marked used."""
    import copy

    t = transform.reverse_transform() if reverse else copy.deepcopy(transform)
    return any(t.rename_source_key(k)[1] is not None for k in keys)


def save_conversions(model: nn.Module) -> None:
    """Keep ``save_pretrained`` from converting 4-bit tensors into another checkpoint layout.

    transformers reverts the model's checkpoint conversions when it saves (``revert_weight_conversion``):
    for MoE families it splits the stacked expert weights back into per-expert tensors, which on packed
    NF4 bytes is meaningless (an ``IndexError`` deep in transformers). The model keeps as
    ``_weight_conversions`` (what transformers reverts on save) every conversion but those that would
    touch a 4-bit tensor; the 4-bit tensors are saved under their own names, which is what a
    pre-quantised load reads (:class:`NF4HfQuantizer` drops the same conversions there)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # not from from_pretrained: what revert_weight_conversion would use
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = get_model_conversion_mapping(model, add_legacy=False)
        conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    keys = _quantized_keys(model)
    model._weight_conversions = [
        c for c in conversions if not (isinstance(c, WeightConverter) and _touches(c, keys, reverse=True))
    ]


def record_quantization(model: nn.Module, **quantize_kwargs) -> None:
    """What :func:`fastft.quantize` leaves on a transformers model: ``config.quantization_config`` (so that
    ``save_pretrained`` writes a checkpoint that reloads pre-quantised) and the save-time conversions."""
    from transformers import PreTrainedModel

    base = model
    if not isinstance(base, PreTrainedModel) and hasattr(model, "get_base_model"):
        base = model.get_base_model()  # a PEFT model's transformers model
    if not isinstance(base, PreTrainedModel):
        return
    current = getattr(base.config, "quantization_config", None)
    if current is not None and not isinstance(current, NF4Config):
        return  # quantised by another method (bitsandbytes, ...): its config stays
    base.config.quantization_config = NF4Config(**quantize_kwargs)
    save_conversions(base)


class NF4Quantize(ConversionOps):
    """The on-the-fly quantisation op: one 16-bit checkpoint weight in, its NF4 tensors out.

    A :class:`Linear4bit` weight becomes the layer's packed ``weight`` and statistics buffers (set by
    transformers like any loaded tensor); a 3-D expert weight becomes an :class:`ExpertsWeight4bit` put in
    place of the 16-bit parameter right here (nothing is returned for it)."""

    def __init__(self, hf_quantizer: NF4HfQuantizer):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict, source_patterns=None, target_patterns=None, model=None, missing_keys=None, **kw):
        from .ops.nf4 import quantize_nf4

        cfg = self.hf_quantizer.quantization_config
        out = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, pname = get_module_from_name(model, name)
            if isinstance(module, Linear4bit):
                prefix = name[: -len(pname)]
                w = value.t() if prefix[:-1] in self.hf_quantizer._conv1d else value  # Conv1D: [in, out]
                packed, st = quantize_nf4(w.contiguous(), blocksize=cfg.blocksize, double_quant=cfg.double_quant)
                module.weight_dtype, module._nf4_state = value.dtype, None
                out.update((prefix + k, t) for k, t in Linear4bit.state_tensors(packed, st).items())
            else:  # an experts module's 3-D gate_up_proj / down_proj
                q = ExpertsWeight4bit.from_weight(
                    value,
                    transposed=bool(module.is_transposed),
                    blocksize=cfg.blocksize,
                    double_quant=cfg.double_quant,
                    cache_absmax=cfg.cache_absmax,
                )
                _mark_initialized(q)
                delattr(module, pname)
                setattr(module, pname, q)
                if missing_keys is not None:
                    missing_keys.discard(name)
        return out


def _mark_initialized(q: ExpertsWeight4bit) -> None:
    # transformers' weight init skips what carries _is_hf_initialized; its experts init reads the
    # attribute off the weight object (``init.normal_(module.gate_up_proj)``): here a module
    q._is_hf_initialized = True
    for t in (*q.parameters(), *q.buffers()):
        t._is_hf_initialized = True


class NF4HfQuantizer(HfQuantizer):
    """transformers' side of :class:`NF4Config` (registered as ``"fastft_nf4"``)."""

    requires_calibration = False
    quantization_config: NF4Config

    def __init__(self, quantization_config: NF4Config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._conv1d: set[str] = set()  # GPT-2 Conv1D layers (checkpoint weight [in, out])
        self._experts: set[int] = set()  # ids of the experts modules whose 3-D weights go 4-bit

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict):
            bad = sorted({str(v) for v in device_map.values() if str(v) in ("disk", "meta")})
            if bad:
                raise ValueError(
                    f"fastft NF4 (NF4Config) loads onto CPU or CUDA devices only; the device_map offloads to {bad}. "
                    "Disk offload of 4-bit layers is not supported: use a device_map of CPU / CUDA devices"
                )

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, name = get_module_from_name(model, param_name)
        if isinstance(module, Linear4bit):
            return name == "weight"
        return name in _EXPERT_WEIGHTS and id(module) in self._experts

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        # a 16-bit expert stack still on meta takes 4 bits a weight once loaded (Linear4bit's meta weight
        # already has its packed size)
        if self.param_needs_quantization(model, param_name) and param.dim() == 3:
            return 0.5
        return param.element_size()

    def _process_model_before_weight_loading(self, model, **kwargs):
        # each layer dequantises to the dtype its 16-bit weight has on the meta model (the load dtype)
        cfg = self.quantization_config
        skip = tuple(cfg.skip)
        tied = set(model.all_tied_weights_keys) | set(model.all_tied_weights_keys.values())
        # fastft.quantize's layers, but those tied to another weight (the embeddings): they stay 16-bit
        targets = [t for t in linear_targets(model, skip) if f"{t[2]}.weight" not in tied]
        for parent, child_name, full, child in targets:
            if type(child) is nn.Linear:
                in_f, out_f = child.in_features, child.out_features
            else:  # Conv1D: weight [in, out]
                in_f, out_f = child.weight.shape
                self._conv1d.add(full)
            with torch.device("meta"):
                layer = Linear4bit(
                    in_f,
                    out_f,
                    bias=child.bias is not None,
                    blocksize=cfg.blocksize,
                    double_quant=cfg.double_quant,
                    weight_dtype=child.weight.dtype,
                    cache_absmax=cfg.cache_absmax,
                    device="meta",
                )
            setattr(parent, child_name, layer)
        if not cfg.experts:
            return model
        for _, module in experts_targets(model, skip):
            self._experts.add(id(module))
            if self.pre_quantized:  # the 4-bit weights' slots, for the checkpoint's packed tensors
                for pname in _EXPERT_WEIGHTS:
                    w = getattr(module, pname)
                    E, a, b = w.shape
                    out_f, in_f = (b, a) if module.is_transposed else (a, b)
                    with torch.device("meta"):
                        q = ExpertsWeight4bit(
                            E,
                            out_f,
                            in_f,
                            transposed=bool(module.is_transposed),
                            blocksize=cfg.blocksize,
                            double_quant=cfg.double_quant,
                            weight_dtype=w.dtype,
                            cache_absmax=cfg.cache_absmax,
                            device="meta",
                        )
                    q._is_hf_initialized = True  # the module; its tensors are marked as transformers loads them
                    delattr(module, pname)
                    setattr(module, pname, q)
            run_experts_eager(module)  # as fastft.quantize sets it
        return model

    def update_weight_conversions(self, weight_conversions, model):
        if self.pre_quantized:  # the 4-bit tensors are stored under the model's own names: not converted
            keys = _quantized_keys(model)
            weight_conversions = [
                c
                for c in weight_conversions
                if not (isinstance(c, WeightConverter) and _touches(c, keys, reverse=False))
            ]
        return super().update_weight_conversions(weight_conversions, model)

    def get_quantize_ops(self):
        return NF4Quantize(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        device_map = getattr(model, "hf_device_map", None) or {}
        if "disk" in {str(v) for v in device_map.values()}:
            raise ValueError(
                "fastft NF4 (NF4Config) does not support disk offload: the device_map put modules on 'disk'. "
                "Give it more CPU / CUDA memory (max_memory) or a device_map without 'disk'"
            )
        model.is_loaded_in_4bit = True  # what PEFT reads for a 4-bit base (prepare_model_for_kbit_training)
        save_conversions(model)
        return model

    def dequantize(self, model, dtype=None):
        raise NotImplementedError(_NO_DEQUANTIZE)

    def _dequantize(self, model, dtype=None):
        raise NotImplementedError(_NO_DEQUANTIZE)

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters on top (QLoRA); the 4-bit weights themselves are frozen


def register() -> None:
    """Register ``"fastft_nf4"`` with transformers (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not NF4Config:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a reloaded fastft replaces its classes
        register_quantization_config(QUANT_METHOD)(NF4Config)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not NF4HfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(NF4HfQuantizer)


register()
