"""Loading the tokenizer and the model, the precision, and building what trains: full, LoRA (PEFT) or QLoRA (NF4 base)."""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch

from .config import TrainConfig


def _load_tokenizer(cfg: TrainConfig):
    if cfg.model is None:
        from .. import default

        return default.load_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(cfg.model), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer for model {str(cfg.model)!r}: {_one_line(e)}") from None


def _load_model(cfg: TrainConfig, dtype: torch.dtype):
    if cfg.model is None:
        from .. import default

        return default.load_model(dtype=dtype)
    from transformers import AutoModelForCausalLM

    kw = {}
    if cfg.method == "qlora":  # the linear layers quantised as they load (no whole 16-bit model first)
        from ..hf_quantizer import NF4Config

        # "all-linear" LoRA also trains MoE experts, built on their 16-bit weights, quantised after PEFT
        kw["quantization_config"] = NF4Config(experts=cfg.target_modules != "all-linear")
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(cfg.model), dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kw
        )
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {str(cfg.model)!r}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:400]


def _accepts_num_items(hf_model) -> bool:
    try:
        params = inspect.signature(type(hf_model).forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "num_items_in_batch" for p in params)


@contextlib.contextmanager
def quiet_peft_warnings():
    """Building a ``PeftModel`` (PEFT 0.21) reads transformers 5's deprecated
    ``is_gradient_checkpointing`` property, which warns on every command; this silences that one
    FutureWarning, and only around PEFT's constructor (fastft itself reads no deprecated name)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        yield


def _pick_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    p = cfg.precision
    if p == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if p == "fp32":
        return None
    if p == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (on the CPU use fp32 or bf16)")
    return torch.bfloat16 if p == "bf16" else torch.float16


def _set_linear_lora_dropout(model, p: float) -> None:
    """``nn.Dropout(p)`` on every LoRA layer but PEFT's parameter wrappers (which have no dropout)."""
    from peft.tuners.lora import LoraLayer

    from ..patching.experts_lora import is_param_wrapper

    for module in model.modules():
        if isinstance(module, LoraLayer) and not is_param_wrapper(module):
            for adapter in list(module.lora_dropout):
                module.lora_dropout[adapter] = torch.nn.Dropout(p=p)


class ModelMixin:
    """``_Trainer``'s model building (needs ``cfg``, ``device``, ``amp_dtype``, ``dist``)."""

    def _build_model(self, model):
        from .. import patch, quantize

        cfg, device = self.cfg, self.device
        try:
            from peft import PeftModel
        except ImportError:  # pragma: no cover
            PeftModel = ()
        # frozen base weights in the compute dtype on CUDA (lora/qlora); full keeps fp32 masters
        load_dtype = self.amp_dtype if (self.amp_dtype is not None and cfg.method != "full") else torch.float32
        if model is None:
            model = _load_model(cfg, load_dtype)
        experts_note = None  # what LoRA does with MoE expert weights (reported)
        if PeftModel and isinstance(model, PeftModel):
            if cfg.method == "full":
                raise ValueError("method 'full' was asked for, but the model passed is a PEFT model")
            model = model.to(device)
            hf = model.get_base_model()
        else:
            hf = model.to(device)
            if cfg.method in ("lora", "qlora"):
                from peft import LoraConfig, get_peft_model

                from ..patching.experts import expert_target_parameters, has_4bit_experts

                tm = cfg.target_modules
                # MoE: "all-linear" also trains the experts' 3-D weights (PEFT target_parameters).
                # PEFT's parameter LoRA has no dropout (it rejects lora_dropout > 0 there), so with
                # dropout the adapter is built without it and the dropout is set on the nn.Linear
                # LoRA layers only (what PEFT itself builds there); the experts train without it
                experts = expert_target_parameters(hf) if tm == "all-linear" else []
                # qlora: the linear layers go 4-bit before PEFT wraps them (already so when loaded from
                # a path: NF4Config quantised them on load, and this quantize only records); PEFT's target_parameters
                # cannot wrap a packed weight, so the experts' adapters are built on the 16-bit
                # experts and those are quantised inside PEFT's wrappers afterwards
                if cfg.method == "qlora":
                    quantize(hf, experts=not experts)
                linear_dropout = cfg.dropout if experts and cfg.dropout else 0.0
                if experts:
                    text = f"LoRA on expert weights (target_parameters={experts})"
                    if cfg.method == "qlora":
                        text += ", on 4-bit (NF4) experts (quantised inside PEFT's wrappers)"
                    if linear_dropout:
                        text += f"; dropout {cfg.dropout} on the linear layers only (none on expert weights in PEFT)"
                    experts_note = ("add", text)
                elif tm == "all-linear" and any(has_4bit_experts(m) for m in hf.modules()):
                    experts_note = (
                        "skip",
                        "4-bit (NF4) expert weights quantised before the trainer stay frozen: PEFT "
                        "target_parameters cannot wrap packed weights (pass the 16-bit model for LoRA on them)",
                    )
                lcfg = LoraConfig(
                    r=cfg.rank,
                    lora_alpha=cfg.alpha,
                    lora_dropout=0.0 if linear_dropout else cfg.dropout,
                    use_rslora=cfg.rslora,
                    target_modules=tm if isinstance(tm, str) else list(tm),
                    target_parameters=experts or None,
                    task_type="CAUSAL_LM",
                )
                try:
                    with quiet_peft_warnings():
                        model = get_peft_model(hf, lcfg)
                except ValueError as e:
                    raise ValueError(f"LoRA target_modules {tm!r}: {_one_line(e)}") from None
                if linear_dropout:
                    _set_linear_lora_dropout(model, linear_dropout)
                if cfg.method == "qlora" and experts:
                    quantize(model)  # the experts, inside the wrappers (the LoRA adapters are left alone)
            else:
                model = hf
                for p in model.parameters():
                    p.requires_grad_(True)
        report = patch(model, backend=cfg.backend, checkpointing=cfg.checkpointing)
        if experts_note is not None:  # the trainer's LoRA target choice for MoE experts, in the report
            kind, text = experts_note
            (report.add if kind == "add" else report.skip)("lora", "experts (trainer default)", text)
        self.report = report
        if self.dist.main and not cfg.quiet:
            print(report, flush=True)
        return hf, model.train()
