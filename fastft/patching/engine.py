"""The one patch engine: find what to accelerate, swap forwards, keep what to restore, report.

Patching is data plus this engine. Each feature (``loss`` now; ``lora``, ``quant``,
``checkpointing`` in later versions) is a function ``apply(ctx) -> None`` that
inspects the model structurally, records every swap through :meth:`PatchContext.swap`
(so :func:`unpatch` can undo it exactly) and every decision in the report.
Swaps set instance attributes (``module.forward = ...``); classes are never
changed, so ``save_pretrained``, state dicts and ``type(model)`` stay as they are.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import backends
from .report import PatchReport

_STATE_ATTR = "_fastft_patch_state"


class _Missing:
    """Marks "no instance attribute before the swap"; survives deepcopy and pickling as itself."""

    def __reduce__(self):
        return "_MISSING"

    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()
_CHECKPOINTING = (None, "recompute", "offload")


@dataclass
class PatchState:
    options: dict
    report: PatchReport
    # (object, attribute, previous value or _MISSING, value installed), in the order applied
    swaps: list = field(default_factory=list)


@dataclass
class PatchContext:
    model: nn.Module  # the transformers PreTrainedModel, or whatever nn.Module a PeftModel wraps
    wrapper: nn.Module | None  # the PeftModel around it, if any
    options: dict
    report: PatchReport
    state: PatchState

    def swap(self, obj, attr: str, value) -> None:
        """Set ``obj.attr = value``, remembering the previous instance attribute for unpatch."""
        prev = obj.__dict__.get(attr, _MISSING) if hasattr(obj, "__dict__") else _MISSING
        self.state.swaps.append((obj, attr, prev, value))
        setattr(obj, attr, value)


def is_transformers_model(model: nn.Module) -> bool:
    """Is ``model`` a transformers ``PreTrainedModel`` (the loss and checkpointing features need one)?"""
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def resolve(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The model to patch, and the PEFT wrapper around it (or None).

    A ``PeftModel`` may wrap any ``nn.Module`` (a custom MLP, a vision backbone, a
    non-causal transformers model): its LoRA / 4-bit layers are what the LoRA and quant
    features fuse, and the transformers-specific features report why they do not apply.
    Without PEFT the model must be a transformers ``PreTrainedModel``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastft.patch expects a transformers or PEFT model (nn.Module), got {type(model).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        # torch.compile(model): patch the module it wraps (its next call retraces the patched forwards)
        return resolve(model._orig_mod)
    try:
        from peft import PeftModel
    except Exception:  # peft is a dependency, but never let its import break patching
        PeftModel = ()
    if PeftModel and isinstance(model, PeftModel):
        return model.get_base_model(), model
    if not is_transformers_model(model):
        raise TypeError(
            f"fastft.patch expects a transformers PreTrainedModel or a peft PeftModel, got {type(model).__name__}"
        )
    return model, None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def patch(
    model: nn.Module,
    *,
    lora: bool = True,
    loss: bool = True,
    quant: bool = True,
    norms: bool = True,
    rope: bool = True,
    mlp: bool = True,
    experts: bool = True,
    checkpointing: str | None = None,
    backend: str = "auto",
    nf4_cache_absmax: bool = False,
    lora_precision: str = "activation",
    lora_group: bool = False,
) -> PatchReport:
    """Accelerate ``model`` in place and return a :class:`PatchReport`.

    ``model`` is a transformers ``PreTrainedModel``, or a PEFT ``PeftModel`` wrapping one
    (or wrapping any other ``nn.Module``: its LoRA and 4-bit layers are fused, and the
    features that need a transformers causal LM say why they do not apply).
    Whatever cannot be accelerated keeps its original forward and is listed in
    ``report.skipped`` with the reason. Every swapped module checks on each call the
    cheap conditions its fused op relies on and runs the original forward for a call
    that does not fit (counted in ``report.fallbacks``); with a forced backend such a
    call raises instead. Patching again first undoes the previous patch;
    :func:`unpatch` restores the original behaviour exactly.

    ``experts=True`` runs transformers 5 MoE experts modules with :func:`fastft.ops.experts`
    through transformers' ``ExpertsInterface`` (see :mod:`fastft.patching.experts`).

    ``backend`` applies to every patched op: ``"auto"`` picks per call (Triton on CUDA,
    the PyTorch reference elsewhere); a forced backend that cannot run on the model's
    device raises :class:`fastft.BackendUnavailable` here, before anything is changed.

    ``nf4_cache_absmax=True`` (with ``quant``) keeps every double-quantised 4-bit layer's absmax
    also decoded in fp32 (+32 / blocksize bits per weight, 0.5 at blocksize 64; each layer's cost
    is in the report), so the NF4 kernels read it instead of decoding the 8-bit absmax per block.
    ``lora_precision``: ``"activation"`` (default) runs each LoRA branch in the activation
    dtype (fp32 adapters over a bf16 base are cast once per call, never ``x``); ``"peft"``
    keeps PEFT's promotion of the input to the adapters' dtype exactly
    (:func:`fastft.ops.lora_linear`'s ``precision``). ``lora_group=True`` runs LoRA layers
    fed the same input by one module (q/k/v, gate/up; found by a probe forward) as one
    autograd node (:mod:`fastft.patching.lora_group`).
    """
    hf_model, wrapper = resolve(model)
    if checkpointing not in _CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {_CHECKPOINTING}, got {checkpointing!r}")
    from ..ops.lora import PRECISIONS

    if lora_precision not in PRECISIONS:
        raise ValueError(f"lora_precision must be one of {PRECISIONS}, got {lora_precision!r}")
    if not isinstance(lora_group, bool):
        raise TypeError(f"lora_group must be True or False, got {lora_group!r}")
    for name, flag in (
        ("lora", lora),
        ("loss", loss),
        ("quant", quant),
        ("norms", norms),
        ("rope", rope),
        ("mlp", mlp),
        ("experts", experts),
        ("nf4_cache_absmax", nf4_cache_absmax),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    backends.requested(backend)  # ValueError for an unknown name
    device = _model_device(hf_model)
    if backend != "auto":
        from ..ops.activations import OP_SWIGLU
        from ..ops.cross_entropy import OP_FLCE
        from ..ops.lora import OP_LORA
        from ..ops.rms_norm import OP_RMS_NORM
        from ..ops.rope import OP_ROPE

        forced = (
            (OP_FLCE, loss),
            (OP_LORA, lora and wrapper is not None),
            (OP_RMS_NORM, norms),
            (OP_SWIGLU, mlp),
            (OP_ROPE, rope),
        )
        for op, enabled in forced:
            if enabled:
                backends.check_forced(op, device, backend)

    _unpatch_resolved(hf_model)
    options = dict(
        lora=lora,
        loss=loss,
        quant=quant,
        norms=norms,
        rope=rope,
        mlp=mlp,
        experts=experts,
        checkpointing=checkpointing,
        backend=backend,
        nf4_cache_absmax=nf4_cache_absmax,
    )
    options.update(lora_precision=lora_precision, lora_group=lora_group)
    report = PatchReport(
        model=type(wrapper or hf_model).__name__ + (f" > {type(hf_model).__name__}" if wrapper else "")
    )
    state = PatchState(options=options, report=report)
    ctx = PatchContext(model=hf_model, wrapper=wrapper, options=options, report=report, state=state)

    from . import checkpointing as checkpointing_feature
    from . import experts as experts_feature
    from . import fused_ops
    from . import lora as lora_feature
    from . import loss as loss_feature
    from . import quant as quant_feature

    features = [
        ("lora", lora, lora_feature.apply),
        ("quant", quant, quant_feature.apply),
        ("norms", norms, fused_ops.apply_norms),
        ("mlp", mlp, fused_ops.apply_mlp),
        ("experts", experts, experts_feature.apply),
        ("rope", rope, fused_ops.apply_rope),
        ("loss", loss, loss_feature.apply),
        ("checkpointing", checkpointing is not None, checkpointing_feature.apply),
    ]
    try:
        for name, enabled, apply in features:
            if enabled:
                apply(ctx)
            else:
                report.skip(name, "model", "disabled by the caller")
    except BaseException:
        _restore(state)
        raise
    object.__setattr__(hf_model, _STATE_ATTR, state)
    return report


def _restore(state: PatchState) -> None:
    for obj, attr, prev, installed in reversed(state.swaps):
        current = obj.__dict__.get(attr, _MISSING)
        if current is not installed:
            # someone replaced our swap after patching (e.g. TRL's SFTTrainer installs its own
            # forward): theirs stays, and it is not ours to remove
            warnings.warn(
                f"fastft.unpatch: {type(obj).__name__}.{attr} was replaced after fastft.patch; leaving it as it is",
                stacklevel=3,
            )
            continue
        if prev is _MISSING:
            delattr(obj, attr)
        else:
            setattr(obj, attr, prev)
    state.swaps.clear()


def unpatch(model: nn.Module) -> bool:
    """Undo :func:`patch`. Returns True if something was restored. Harmless on an unpatched model."""
    if isinstance(model, nn.Module) and _STATE_ATTR in model.__dict__:  # the module patch() worked on
        return _unpatch_resolved(model)
    hf_model, _ = resolve(model)
    return _unpatch_resolved(hf_model)


def _unpatch_resolved(hf_model: nn.Module) -> bool:
    state = hf_model.__dict__.get(_STATE_ATTR)
    if state is None:
        return False
    _restore(state)
    del hf_model.__dict__[_STATE_ATTR]
    return True


def patch_report(model: nn.Module) -> PatchReport | None:
    """The report of the patch currently applied to ``model``, or None."""
    if isinstance(model, nn.Module) and _STATE_ATTR in model.__dict__:
        return model.__dict__[_STATE_ATTR].report
    hf_model, _ = resolve(model)
    state = hf_model.__dict__.get(_STATE_ATTR)
    return state.report if state is not None else None
