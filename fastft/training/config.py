"""``TrainConfig`` (every option of ``fastft train``, its resolution and validation) and ``TrainResult``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
TEMPLATES = ("auto", "alpaca", "chat", "text")
REPORTERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name -> pip package
CHECKPOINTINGS = (None, "recompute", "offload")
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto")

# Options whose None means "auto": fastft.default.RECOMMENDED for the embedded default run,
# otherwise the generic value here (callables get the partly resolved config).
_GENERIC = {
    "method": "lora",
    "epochs": 1,
    "lr": lambda c: 2e-5 if c["method"] == "full" else 2e-4,
    "batch_size": 4,
    "grad_accum": 1,
    "seq_len": 512,
    "rank": 16,
    "alpha": 32.0,
    "dropout": 0.05,
    "packing": False,
    "eval_frac": 0.1,
    "max_new_tokens": 64,
    "beta": 0.1,
}


@dataclass
class TrainConfig:
    """Everything ``fastft train`` takes. ``None`` on an option marked *auto* means: the embedded
    default's recommended value (no ``model`` and no ``data``), else a generic one (see ``_GENERIC``)."""

    model: str | None = None  # local path or hub name; None: fastft.default
    data: str | None = None  # .jsonl/.json/.csv; None: fastft.default.dataset_path()
    eval_data: str | None = None  # None: eval_frac of data is split off
    method: str | None = None  # auto; full | lora | qlora
    output_dir: str = "./fastft-output"
    max_steps: int | None = None  # optimizer steps; None: `epochs` over the data
    epochs: int | None = None  # auto
    lr: float | None = None  # auto
    batch_size: int | None = None  # auto; micro-batch size per rank
    grad_accum: int | None = None  # auto
    seq_len: int | None = None  # auto
    rank: int | None = None  # auto; LoRA r
    alpha: float | None = None  # auto; LoRA alpha
    dropout: float | None = None  # auto; LoRA dropout
    rslora: bool = False
    target_modules: str | list[str] = "all-linear"
    schedule: str = "linear"
    warmup_steps: int | None = None  # auto: 3% of the steps (generic)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto: bf16 (fp16 without bf16) on CUDA, fp32 on CPU
    seed: int = 0
    eval_every: int | None = None  # auto: about 10 evaluations over the run
    eval_frac: float | None = None  # auto (generic 0.1): held out when no eval_data
    save_every: int | None = None  # also write checkpoint-last every N steps
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    packing: bool | None = None  # auto
    template: str = "auto"
    train_on_prompt: bool = False
    report_to: list[str] = field(default_factory=list)
    resume_from: str | None = None  # a checkpoint dir, or "last" (output_dir/checkpoint-last)
    fsdp: bool = False
    backend: str = "auto"
    checkpointing: str | None = None  # None | recompute | offload
    trust_remote_code: bool = False
    quiet: bool = False
    log_every: int = 1
    max_new_tokens: int | None = None  # auto; for the generations shown after training
    num_generations: int = 3  # prompts shown before/after (the default's sample prompts for the embedded run)
    objective: str = "sft"  # sft | dpo | orpo | simpo | kto (fastft.losses); preference data for the others
    beta: float | None = None  # auto (0.1, TRL's default); the preference objectives' beta
    dpo_loss_type: str = "sigmoid"  # one of fastft.losses.DPO_LOSS_TYPES
    label_smoothing: float = 0.0  # DPO sigmoid (cDPO) / robust / exo_pair, SimPO
    simpo_gamma: float = 0.5  # SimPO's target margin gamma (its logits subtract gamma / beta)
    precompute_ref: bool = False  # reference log-probs computed once before training (always for full DPO)
    compile: bool | str = False  # torch.compile the training forward: True (mode default) or a mode (training.compile)

    # ---------------------------------------------------------------- construction
    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if not isinstance(d, dict):
            raise TypeError(f"a training config must be a mapping of option -> value, got {type(d).__name__}")
        norm = {str(k).replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(norm) - set(cls.fields()))
        if unknown:
            raise ValueError(f"unknown config option(s): {', '.join(unknown)} (known: {', '.join(cls.fields())})")
        return cls(**norm)

    @classmethod
    def from_file(cls, path) -> TrainConfig:
        """A config from a ``.json``, ``.yaml`` or ``.yml`` file (YAML needs PyYAML)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        text = p.read_text()
        suffix = p.suffix.lower()
        if suffix == ".json":
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{p}: reading a YAML config needs PyYAML: pip install pyyaml (or use JSON)") from None
            try:
                d = yaml.safe_load(text)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
                raise ValueError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
            if d is None:
                d = {}
        else:
            raise ValueError(f"config file must end in .json, .yaml or .yml, got {p.name!r}")
        if not isinstance(d, dict):
            raise ValueError(f"{p}: a config file must hold a mapping of option: value, got {type(d).__name__}")
        return cls.from_dict(d)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- resolution
    def is_embedded_default(self) -> bool:
        return self.model is None and self.data is None

    def resolved(self, *, embedded: bool | None = None) -> TrainConfig:
        """A copy with every *auto* option filled in (and ``report_to`` as a list)."""
        if embedded is None:
            embedded = self.is_embedded_default()
        d = self.to_dict()
        if isinstance(d["report_to"], str):
            d["report_to"] = [s.strip() for s in d["report_to"].split(",") if s.strip()]
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        if embedded:
            from .. import default

            pref = default.RECOMMENDED_PREFERENCE if d["objective"] != "sft" else {}
            for k, v in {**default.RECOMMENDED, **pref}.items():
                if k in d and d[k] is None:
                    d[k] = v
        for k, v in _GENERIC.items():
            if d[k] is None:
                d[k] = v(d) if callable(v) else v
        return TrainConfig(**d)

    # ---------------------------------------------------------------- validation
    def validate(self) -> TrainConfig:
        """Check every value (``None`` is accepted for *auto* options). Returns self."""

        def pos_int(name, allow_none=True, minimum=1):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {v!r}")
            if v < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {v!r}")

        def number(name, *, lo=None, lo_open=False, hi=None, hi_open=False, allow_none=True):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v!r}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
            if hi is not None and (v >= hi if hi_open else v > hi):
                raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v!r}")

        def choice(name, options, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if v not in options:
                shown = ", ".join(str(o) for o in options if o is not None)
                raise ValueError(f"{name} must be one of {shown}, got {v!r}")

        def flag(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be true or false, got {v!r}")

        def opt_str(name):
            v = getattr(self, name)
            if v is None:
                return
            if not isinstance(v, (str, os.PathLike)) or not str(v).strip():
                raise ValueError(f"{name} must be a non-empty path or name, got {v!r}")

        for name in ("model", "data", "eval_data", "resume_from"):
            opt_str(name)
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir).strip():
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        choice("method", METHODS, allow_none=True)
        for name in ("max_steps", "epochs", "batch_size", "grad_accum", "rank", "eval_every", "save_every"):
            pos_int(name)
        pos_int("early_stopping_patience")
        pos_int("max_new_tokens")
        pos_int("log_every", allow_none=False)
        pos_int("seq_len", minimum=2)
        pos_int("warmup_steps", minimum=0)
        pos_int("num_generations", allow_none=False, minimum=0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        number("lr", lo=0, lo_open=True)
        number("alpha", lo=0, lo_open=True)
        number("dropout", lo=0, hi=1, hi_open=True)
        number("weight_decay", lo=0, allow_none=False)
        number("max_grad_norm", lo=0, allow_none=False)
        number("eval_frac", lo=0, lo_open=True, hi=1, hi_open=True)
        choice("objective", OBJECTIVES)
        number("beta", lo=0, lo_open=True)
        number("label_smoothing", lo=0, hi=1, hi_open=True, allow_none=False)
        number("simpo_gamma", allow_none=False)
        from ..losses import DPO_LOSS_TYPES

        choice("dpo_loss_type", DPO_LOSS_TYPES)
        for name in ("rslora", "fsdp", "trust_remote_code", "quiet", "train_on_prompt", "precompute_ref"):
            flag(name)
        flag("packing", allow_none=True)
        choice("schedule", SCHEDULES)
        choice("precision", PRECISIONS)
        choice("template", TEMPLATES)
        choice("checkpointing", CHECKPOINTINGS)
        from .. import backends

        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a string, got {self.backend!r}")
        backends.requested(self.backend)  # ValueError naming the known backends
        tm = self.target_modules
        if isinstance(tm, str):
            if not tm.strip():
                raise ValueError("target_modules must be 'all-linear' or module names, got an empty string")
        elif isinstance(tm, (list, tuple)):
            if not tm or not all(isinstance(t, str) and t.strip() for t in tm):
                raise ValueError(f"target_modules must be a non-empty list of module names, got {tm!r}")
        else:
            raise TypeError(f"target_modules must be a string or a list of strings, got {tm!r}")
        _check_reporters(self.report_to)
        from .compile import compile_mode

        if compile_mode(self.compile) is not None and self.objective != "sft":
            raise ValueError(
                f"compile applies to the sft objective's training forward; objective {self.objective} runs eager "
                "(drop compile)"
            )
        if self.fsdp and self.method == "full" and self.checkpointing == "offload":
            pass  # allowed; listed for clarity
        return self


def _check_reporters(report_to) -> list[str]:
    names = [s.strip() for s in report_to.split(",") if s.strip()] if isinstance(report_to, str) else report_to
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"report_to must be a list of names, got {report_to!r}")
    import importlib.util

    for n in names:
        if n not in REPORTERS:
            raise ValueError(f"report_to: unknown integration {n!r}; known: {', '.join(REPORTERS)}")
        if importlib.util.find_spec(n) is None:
            raise ValueError(f"report_to: {n} was asked for but is not installed: pip install {REPORTERS[n]}")
    return list(names)


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    epochs: float  # epochs completed (fractional)
    eval_loss_before: float | None
    eval_loss: float | None  # after the last step
    best_eval_loss: float | None
    best_step: int | None
    train_loss: float | None  # mean token loss of the last step
    tokens_per_s: float  # non-padding input tokens per second of training (all ranks)
    train_seconds: float
    n_tokens: int
    stopped_early: bool
    checkpoint_last: str | None
    checkpoint_best: str | None
    metrics_path: str | None
    plot_path: str | None
    compile: str | None = None  # the torch.compile mode of the training forward (None: eager)
    compile_seconds: float | None = None  # the first compiled step's wall time (compilation included)
    losses: list[float] = field(default_factory=list)  # per optimizer step
    generations: list[dict] = field(default_factory=list)  # {"prompt", "before", "after"}

    @property
    def eval_perplexity(self) -> float | None:
        return None if self.eval_loss is None else math.exp(min(self.eval_loss, 50.0))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
