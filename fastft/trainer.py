"""The lean trainer: ``fastft.train(TrainConfig(...))`` fine-tunes a causal LM (full, LoRA or QLoRA).

What one call does, in order (nothing is written before the first step that can fail on the
user's input has passed):

1. resolve and validate the config (``ValueError``/``TypeError`` naming the bad value);
2. load the tokenizer and the data (:mod:`fastft.data`: ``DataError`` names the file and line),
   tokenize and split an eval set off when none is given;
3. load the model (a local path or hub name, or :mod:`fastft.default`), quantise it to NF4
   for ``qlora``, wrap it in PEFT LoRA for ``lora``/``qlora``, and :func:`fastft.patch` it;
4. only then create ``output_dir`` and train: AdamW, linear/cosine/constant schedule with
   warm-up, gradient accumulation normalised by the label-token count of the whole optimizer
   step (``num_items_in_batch``, transformers' convention), gradient clipping, autocast on
   CUDA, evaluation (token-weighted loss and perplexity), early stopping, best and last
   checkpoints, exact resume, metrics JSONL, a loss plot, and a summary with generations.

Under ``torchrun`` the same call runs data-parallel (DDP, or FSDP2 with ``fsdp=True``): every
rank builds the same epoch of batches and takes a disjoint share of each optimizer step's
micro-batches; rank 0 alone logs and writes files.

Checkpoint layout (``output_dir/checkpoint-last`` and ``output_dir/checkpoint-best``): the
weights (a PEFT adapter dir: ``adapter_config.json`` + ``adapter_model.safetensors``; for
``full`` a transformers dir with ``model.safetensors``), the tokenizer, ``trainer_state.json``
(step, data position, best metric, log history); ``checkpoint-last`` also holds
``optimizer.pt``, ``scheduler.pt`` and ``rng_state_<rank>.pt`` (torch, python, numpy and CUDA
generator states), read back with ``torch.load(weights_only=True)``. Each checkpoint is written
to a temporary directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "train", "format_prompt", "generate_text"]

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
TEMPLATES = ("auto", "alpaca", "chat", "text")
REPORTERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name -> pip package
CHECKPOINTINGS = (None, "recompute", "offload")

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
            from . import default

            for k, v in default.RECOMMENDED.items():
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
        for name in ("rslora", "fsdp", "trust_remote_code", "quiet", "train_on_prompt"):
            flag(name)
        flag("packing", allow_none=True)
        choice("schedule", SCHEDULES)
        choice("precision", PRECISIONS)
        choice("template", TEMPLATES)
        choice("checkpointing", CHECKPOINTINGS)
        from . import backends

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
    losses: list[float] = field(default_factory=list)  # per optimizer step
    generations: list[dict] = field(default_factory=list)  # {"prompt", "before", "after"}

    @property
    def eval_perplexity(self) -> float | None:
        return None if self.eval_loss is None else math.exp(min(self.eval_loss, 50.0))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ==============================================================================================
# helpers: files


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during :func:`train`: the step under way finished, ``checkpoint-last`` was
    written, then this was raised. ``step`` is the last completed step, ``checkpoint`` the directory
    to resume from (``resume_from="last"``)."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(
            f"interrupted after step {step}; checkpoint-last saved in {checkpoint} "
            "(resume with resume_from='last', or --resume-from last)"
        )
        self.step, self.checkpoint = step, checkpoint


class _StopOnSigint:
    """While active, the first SIGINT only sets ``requested`` (the training loop finishes its step,
    saves and stops); it also restores the previous handler, so a second Ctrl-C interrupts at once.
    Inactive (plain KeyboardInterrupt) off the main thread and under torch.distributed, where the
    ranks would have to agree on the step to stop at."""

    def __init__(self, enabled: bool, quiet: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.quiet = quiet
        self.requested = False
        self._installed = False
        self._previous = None

    def _handler(self, signum, frame):
        self.requested = True
        self.restore()
        if not self.quiet:  # plain stderr: the handler may run inside a tqdm update
            print("\nCtrl-C: finishing this step, then saving checkpoint-last (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)  # fmt: skip

    def install(self) -> _StopOnSigint:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def restore(self) -> None:
        """Put the previous handler back (idempotent; None, a handler not set from Python, becomes
        the default one)."""
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` directory to ``final``, replacing what was there."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _to_jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ==============================================================================================
# helpers: distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self):
        if self.active:
            torch.distributed.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch.distributed.all_reduce(t)
        return t


def _init_dist() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        created = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created)


# ==============================================================================================
# helpers: RNG


def _rng_state(device: torch.device) -> dict:
    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "cpu": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ==============================================================================================
# helpers: schedule


class _Schedule:
    """Warm-up from 0 then linear / cosine decay to 0, or constant. A class (not a lambda) so
    that the scheduler's state_dict carries it and a resumed run can check it."""

    def __init__(self, kind: str, warmup: int, total: int):
        self.kind, self.warmup, self.total = kind, int(warmup), int(total)

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


# ==============================================================================================
# prompts and generation


def format_prompt(record, tokenizer, template: str = "alpaca") -> str:
    """The text a model fine-tuned with ``template`` should continue for ``record``.

    ``record``: a dict (``instruction``/``input`` for alpaca, ``messages`` for chat, ``text``)
    or a plain string (the instruction / user message / raw text).
    """
    from .data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    if template in ("none", "text"):
        return record if isinstance(record, str) else str(record.get("text", ""))
    if template == "chat":
        if isinstance(record, str):
            msgs = [{"role": "user", "content": record}]
        else:
            msgs = list(record.get("messages", []))
            while msgs and msgs[-1].get("role") == "assistant":
                msgs.pop()
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template, and this one has none")
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if template != "alpaca":
        raise ValueError(f"template must be one of alpaca, chat, none; got {template!r}")
    if isinstance(record, str):
        return ALPACA_PROMPT_NO_INPUT.format(instruction=record)
    inp = record.get("input") or ""
    if inp.strip():
        return ALPACA_PROMPT.format(instruction=record.get("instruction", ""), input=inp)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record.get("instruction", ""))


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 64) -> str:
    """Greedy continuation of ``prompt`` (BOS prepended as the data loader does), new text only."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    try:
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad if pad is not None else eos,
            eos_token_id=eos,
        )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


def _prompt_records(records, fmt: str, n: int) -> list:
    if n <= 0 or fmt == "text":
        return []
    return [r for r in list(records)[:n]]


# ==============================================================================================
# model building


def _load_tokenizer(cfg: TrainConfig):
    if cfg.model is None:
        from . import default

        return default.load_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(cfg.model), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer for model {str(cfg.model)!r}: {_one_line(e)}") from None


def _load_model(cfg: TrainConfig, dtype: torch.dtype):
    if cfg.model is None:
        from . import default

        return default.load_model(dtype=dtype)
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(cfg.model), dtype=dtype, trust_remote_code=cfg.trust_remote_code
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


def _decoder_layers(hf_model):
    from .patching.checkpointing import find_decoder_stacks

    stacks, _, _ = find_decoder_stacks(hf_model)
    return [layer for _, stack in stacks for layer in stack]


# ==============================================================================================
# reporters


class _Reporters:
    def __init__(self, names: list[str], cfg: TrainConfig, out: Path):
        self.tb = self.mlflow = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out / "runs"))
        if "mlflow" in names:
            import mlflow

            mlflow.start_run()
            mlflow.log_params({k: str(v) for k, v in cfg.to_dict().items()})
            self.mlflow = mlflow
        if "wandb" in names:
            import wandb

            wandb.init(project=os.environ.get("WANDB_PROJECT", "fastft"), config=cfg.to_dict(), dir=str(out))
            self.wandb = wandb

    def log(self, metrics: dict, step: int) -> None:
        nums = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("step",)}
        if self.tb is not None:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(nums, step=step)
        if self.wandb is not None:
            self.wandb.log(nums, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plot(history: list[dict], path: Path) -> str | None:
    """loss.png (matplotlib Agg); returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss plot skipped: matplotlib is not installed (pip install matplotlib)"
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and h["loss"] is not None]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and h["eval_loss"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return None


# ==============================================================================================
# the trainer


def _load_data(cfg: TrainConfig, tokenizer, train_data, eval_data):
    """(train TokenizedDataset, eval TokenizedDataset, prompt records, data format)."""
    from . import data as D

    def is_tokenized(x):
        return hasattr(x, "examples") and hasattr(x, "stats")

    if train_data is None:
        if cfg.data is not None:
            train_data = str(cfg.data)
        else:
            from . import default

            train_data = str(default.dataset_path())
    if eval_data is None and cfg.eval_data is not None:
        eval_data = str(cfg.eval_data)

    records, fmt = None, "text"
    if is_tokenized(train_data):
        train_ds = train_data
    else:
        records = D.load_records(train_data)
        fmt = D.detect_format(records) if cfg.template == "auto" else cfg.template
        train_ds = D.tokenize_records(
            records, tokenizer, seq_len=cfg.seq_len, template=cfg.template, train_on_prompt=cfg.train_on_prompt
        )
    if eval_data is None:
        train_ds, eval_ds = D.train_eval_split(train_ds, cfg.eval_frac, cfg.seed)
    elif is_tokenized(eval_data):
        eval_ds = eval_data
    else:
        erecs = D.load_records(eval_data, name=None if isinstance(eval_data, (str, Path)) else "eval records")
        eval_ds = D.tokenize_records(
            erecs,
            tokenizer,
            seq_len=cfg.seq_len,
            template=cfg.template,
            train_on_prompt=cfg.train_on_prompt,
            source_name=getattr(erecs, "name", "eval data"),
        )
        if records is not None:
            records = erecs  # show generations on held-out records when there are some
    return train_ds, eval_ds, records, fmt


def _resolve_resume(cfg: TrainConfig) -> Path | None:
    if cfg.resume_from is None:
        return None
    p = Path(cfg.output_dir) / "checkpoint-last" if cfg.resume_from == "last" else Path(cfg.resume_from)
    if not (p / "trainer_state.json").is_file():
        raise ValueError(f"resume_from: {str(p)!r} is not a fastft checkpoint (no trainer_state.json there)")
    if not (p / "optimizer.pt").is_file():
        raise ValueError(f"resume_from: {str(p)!r} has no optimizer state (only checkpoint-last can be resumed)")
    return p


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


def train(config, *, model=None, tokenizer=None, train_data=None, eval_data=None) -> TrainResult:
    """Fine-tune ``config.model`` (or ``model``) on ``config.data`` (or ``train_data``); see the module docstring.

    ``model``: a transformers causal LM (or a PEFT model for lora/qlora) to train instead of
    loading ``config.model``; then ``tokenizer`` is required. ``train_data``/``eval_data``: a
    path, a ``datasets.Dataset``, a list of record dicts, or a tokenized
    :class:`fastft.data.TokenizedDataset`.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train expects a TrainConfig (or a dict of options), got {type(config).__name__}")
    config.validate()
    if model is not None and tokenizer is None and config.model is None:
        raise ValueError("train(model=...) needs tokenizer= too (or config.model to load one from)")
    embedded = config.is_embedded_default() and model is None and train_data is None
    cfg = config.resolved(embedded=embedded).validate()
    resume_dir = _resolve_resume(cfg)
    return _Trainer(cfg, embedded, resume_dir).run(model, tokenizer, train_data, eval_data)


class _Trainer:
    def __init__(self, cfg: TrainConfig, embedded: bool, resume_dir: Path | None):
        self.cfg, self.embedded, self.resume_dir = cfg, embedded, resume_dir
        self.out = Path(cfg.output_dir)
        self.history: list[dict] = []
        self.notes: list[str] = []

    # ---------------------------------------------------------------- printing
    def say(self, msg: str = "") -> None:
        if self.dist.main and not self.cfg.quiet:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    # ---------------------------------------------------------------- setup
    def run(self, model, tokenizer, train_data, eval_data) -> TrainResult:
        self.bar = None
        self._sigint = None
        self.dist = _init_dist()
        try:
            return self._run(model, tokenizer, train_data, eval_data)
        finally:
            if self._sigint is not None:
                self._sigint.restore()
            if self.bar is not None:
                self.bar.close()
            if self.dist.created_group:
                torch.distributed.destroy_process_group()

    def _device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.dist.local_rank if self.dist.active else torch.cuda.current_device())
        return torch.device("cpu")

    def _run(self, model, tokenizer, train_data, eval_data) -> TrainResult:
        from . import data as D

        cfg, dist = self.cfg, self.dist
        device = self.device = self._device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.amp_dtype = _pick_precision(cfg, device)
        _seed_everything(cfg.seed)

        # ---- tokenizer and data (every input error surfaces here, before anything is written)
        if tokenizer is None:
            tokenizer = _load_tokenizer(cfg)
        self.tokenizer = tokenizer
        train_ds, eval_ds, records, fmt = _load_data(cfg, tokenizer, train_data, eval_data)
        self.pad_id = D.pad_token_id(tokenizer)
        self.train_ds, self.eval_ds = train_ds, eval_ds
        epoch0 = self._epoch_batches(0)
        group = dist.world * cfg.grad_accum
        if dist.active and len(epoch0) < group:
            raise ValueError(
                f"{len(epoch0)} batches per epoch is fewer than one optimizer step needs "
                f"({dist.world} ranks x grad_accum {cfg.grad_accum}); lower batch_size or grad_accum"
            )
        steps_per_epoch = self._n_groups(len(epoch0))
        total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
        self.total = total
        self.eval_every = cfg.eval_every or max(1, total // 10)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.03 * total)
        if self.embedded:
            from . import default

            prompts = default.sample_prompts()[: cfg.num_generations] if cfg.num_generations else []
            gen_template = "alpaca"
        else:
            prompts = _prompt_records(records or [], fmt, cfg.num_generations)
            gen_template = fmt
        resume_state = json.loads((self.resume_dir / "trainer_state.json").read_text()) if self.resume_dir else None
        if resume_state is not None:
            for k in ("method", "batch_size", "grad_accum", "world_size"):
                want = dist.world if k == "world_size" else getattr(cfg, k)
                if resume_state.get(k) != want:
                    raise ValueError(
                        f"resume_from: the checkpoint was written with {k}={resume_state.get(k)!r}, "
                        f"this run has {k}={want!r}"
                    )

        # ---- model
        hf_model, model = self._build_model(model)
        if resume_state is not None:
            self._load_weights(hf_model, model)
        self.hf_model, self.peft_model = hf_model, (model if cfg.method != "full" else None)
        self.num_items_ok = _accepts_num_items(hf_model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters (check target_modules)")
        n_train = sum(p.numel() for p in trainable)
        n_all = sum(p.numel() for p in model.parameters())

        # ---- parallel wrappers
        self.fsdp = False
        train_model = model
        if dist.active and cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in _decoder_layers(hf_model):
                fully_shard(layer)
            fully_shard(model)
            self.fsdp = True
        elif dist.active:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.model, self.train_model = model, train_model
        trainable = [p for p in model.parameters() if p.requires_grad]

        # ---- optimizer, schedule, scaler
        kw = {}
        on_cuda = all(p.device.type == "cuda" for p in trainable)
        if on_cuda and not self.fsdp:
            kw["fused"] = True
        elif on_cuda:
            kw["foreach"] = True
        else:
            kw["foreach"] = False
        self.opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _Schedule(cfg.schedule, warmup, total))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.trainable = trainable

        # ---- state
        step, epoch, gi = 0, 0, 0
        best, best_step, bad_evals, eval_before = None, None, 0, None
        if resume_state is not None:
            self._load_training_state()
            step, epoch, gi = resume_state["step"], resume_state["epoch"], resume_state["batch"]
            best, best_step = resume_state.get("best_eval_loss"), resume_state.get("best_step")
            bad_evals, eval_before = resume_state.get("bad_evals", 0), resume_state.get("eval_loss_before")
            self.history = [h for h in resume_state.get("log_history", []) if h.get("step", 0) <= step]

        # ---- output dir: only now
        self.metrics_path = self.out / "metrics.jsonl"
        if dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.out / "train_config.json", json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
            _atomic_write_text(self.metrics_path, "".join(json.dumps(h) + "\n" for h in self.history))
        dist.barrier()
        self.reporters = _Reporters(cfg.report_to, cfg, self.out) if dist.main else None

        self.say(
            f"fastft train: {cfg.method} on {type(hf_model).__name__} ({cfg.model or 'fastft.default'}), "
            f"{n_train:,} trainable of {n_all:,} parameters, device {device}"
            + (f" x{dist.world} ranks ({'FSDP2' if self.fsdp else 'DDP'})" if dist.active else "")
            + f", precision {self._precision_name()}"
        )
        self.say(f"data: train {train_ds.stats.summary()}")
        self.say(f"      eval  {eval_ds.stats.summary()}")
        self.say(
            f"steps: {total} (about {steps_per_epoch} per epoch; batch {cfg.batch_size} x accum {cfg.grad_accum}"
            f" x {dist.world} rank(s)), lr {cfg.lr:g} {cfg.schedule}, warmup {warmup}, eval every {self.eval_every}"
        )
        if resume_state is not None:
            self.say(f"resumed from {self.resume_dir} at step {step} (epoch {epoch}, batch {gi})")

        # ---- before
        can_generate = prompts and not self.fsdp
        gens = []
        if can_generate and dist.main and resume_state is None:
            gens = [{"prompt": p, "before": self._generate(p, gen_template)} for p in prompts]
        if eval_before is None:
            eval_before = self._evaluate()
            self._record({"step": 0, "eval_loss": eval_before, "eval_ppl": _ppl(eval_before)})
            self.say(f"eval before training: loss {eval_before:.4f}, perplexity {_ppl(eval_before):.2f}")

        # ---- loop
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            initial=step,
            desc="train",
            disable=not dist.main or cfg.quiet,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        losses = [h["loss"] for h in self.history if "loss" in h]
        train_time, n_tokens, tok_window, t_window = 0.0, 0, 0, time.perf_counter()
        last_eval = next((h["eval_loss"] for h in reversed(self.history) if "eval_loss" in h), eval_before)
        last_eval_step = next((h["step"] for h in reversed(self.history) if "eval_loss" in h), 0)
        stopped_early = False
        batches, batches_epoch, groups = None, None, 1
        last_saved = step if resume_state is not None else -1
        train_loss = losses[-1] if losses else None
        train_model.train()
        sigint = self._sigint = _StopOnSigint(not dist.active, cfg.quiet).install()
        while step < total and (cfg.max_steps is not None or epoch < cfg.epochs):
            if batches_epoch != epoch:
                batches = epoch0 if epoch == 0 else self._epoch_batches(epoch)
                batches_epoch = epoch
                groups = self._n_groups(len(batches))
            if gi >= groups:
                epoch, gi = epoch + 1, 0
                continue
            t0 = time.perf_counter()
            lr = self.sched.get_last_lr()[0]  # the rate this step uses
            loss, norm, ntok = self._step(batches[gi * group : (gi + 1) * group])
            self.sched.step()
            dt = time.perf_counter() - t0
            train_time += dt
            n_tokens += ntok
            tok_window += ntok
            step += 1
            gi += 1
            if gi >= groups:
                epoch, gi = epoch + 1, 0
            losses.append(loss)
            train_loss = loss
            if step % cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                tps = tok_window / max(now - t_window, 1e-9)
                tok_window, t_window = 0, now
                rec = {
                    "step": step,
                    "epoch": round(epoch + gi / max(groups, 1), 4),
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": norm,
                    "tokens_per_s": round(tps, 1),
                    "memory_mb": round(_memory_mb(device), 1),
                }
                self._record(rec)
                self.bar.set_postfix(
                    loss=f"{loss:.4f}",
                    lr=f"{lr:.2e}",
                    tok_s=f"{tps:.0f}",
                    mem=f"{rec['memory_mb']:.0f}MB",
                    refresh=False,
                )
            self.bar.update(1)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the training loss is {loss} at step {step}; lower lr or check the data")

            stop = False
            if step % self.eval_every == 0 or step == total:
                t_eval = time.perf_counter()
                ev = self._evaluate()
                last_eval, last_eval_step = ev, step
                self._record({"step": step, "eval_loss": ev, "eval_ppl": _ppl(ev)})
                self.say(f"step {step}: eval loss {ev:.4f}, perplexity {_ppl(ev):.2f}")
                if best is None or ev < best:
                    best, best_step, bad_evals = ev, step, 0
                    self._save("checkpoint-best", step, epoch, gi, best, best_step, bad_evals, eval_before, full=False)
                else:
                    bad_evals += 1
                    if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                        self.say(
                            f"early stopping at step {step}: no eval improvement for {bad_evals} evaluations "
                            f"(best {best:.4f} at step {best_step})"
                        )
                        stop = stopped_early = True
                t_window += time.perf_counter() - t_eval
            if (cfg.save_every and step % cfg.save_every == 0) or step == total or stop:
                t_save = time.perf_counter()
                self._save("checkpoint-last", step, epoch, gi, best, best_step, bad_evals, eval_before, full=True)
                last_saved = step
                t_window += time.perf_counter() - t_save
            if stop:
                break
            if sigint.requested:  # Ctrl-C: this step is complete; save it and stop
                if last_saved != step:
                    self._save("checkpoint-last", step, epoch, gi, best, best_step, bad_evals, eval_before, full=True)
                if self.reporters is not None:
                    self.reporters.close()
                raise TrainingInterrupted(step, str(self.out / "checkpoint-last"))
        sigint.restore()
        self.bar.close()
        self.bar = None

        if last_saved != step:  # ran out of epochs before max_steps
            self._save("checkpoint-last", step, epoch, gi, best, best_step, bad_evals, eval_before, full=True)
        if last_eval_step != step:
            last_eval = self._evaluate()
            self._record({"step": step, "eval_loss": last_eval, "eval_ppl": _ppl(last_eval)})

        # ---- after
        if can_generate and dist.main:
            after = [self._generate(p, gen_template) for p in prompts]
            if gens:
                for g, a in zip(gens, after):
                    g["after"] = a
            else:
                gens = [{"prompt": p, "before": None, "after": a} for p, a in zip(prompts, after)]
        plot_path = None
        if dist.main:
            note = _plot(self.history, self.out / "loss.png")
            if note:
                self.notes.append(note)
            else:
                plot_path = str(self.out / "loss.png")
        if self.reporters is not None:
            self.reporters.close()

        tps_total = n_tokens / train_time if train_time > 0 else 0.0
        best_dir = self.out / "checkpoint-best"
        result = TrainResult(
            output_dir=str(self.out),
            steps=step,
            epochs=round(epoch + gi / max(groups, 1), 4),
            eval_loss_before=eval_before,
            eval_loss=last_eval,
            best_eval_loss=best,
            best_step=best_step,
            train_loss=train_loss,
            tokens_per_s=tps_total,
            train_seconds=train_time,
            n_tokens=n_tokens,
            stopped_early=stopped_early,
            checkpoint_last=str(self.out / "checkpoint-last"),
            checkpoint_best=str(best_dir) if best_step is not None else None,
            metrics_path=str(self.metrics_path),
            plot_path=plot_path,
            losses=losses,
            generations=[{**g, "prompt": _prompt_text(g["prompt"])} for g in gens],
        )
        if dist.main:
            _atomic_write_text(self.out / "result.json", json.dumps(result.to_dict(), indent=2, default=str) + "\n")
            self._summary(result)
        dist.barrier()
        return result

    # ---------------------------------------------------------------- pieces
    def _precision_name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[
            self.amp_dtype
        ]

    def _epoch_batches(self, epoch: int) -> list[dict]:
        from .data import make_batches

        cfg = self.cfg
        return make_batches(
            self.train_ds,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            pad_id=self.pad_id,
            packing=cfg.packing,
            shuffle=True,
            seed=cfg.seed,
            epoch=epoch,
        )

    def _n_groups(self, n_batches: int) -> int:
        """Optimizer steps in an epoch of ``n_batches`` micro-batches. One process keeps a short last
        step; several ranks drop it (every rank must run the same number of backward passes)."""
        g = self.dist.world * self.cfg.grad_accum
        return n_batches // g if self.dist.active else -(-n_batches // g)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _step(self, group: list[dict]) -> tuple[float, float | None, int]:
        """One optimizer step over ``group`` (all ranks' micro-batches). Returns (mean token loss over
        the whole group, grad norm before clipping, non-padding tokens of the group)."""
        from .data import count_label_tokens

        dist, cfg = self.dist, self.cfg
        n_items = sum(count_label_tokens(b) for b in group)
        ntok = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in group)
        mine = group[dist.rank :: dist.world]
        # each rank's loss is (its summed token loss) / (n_items / world): DDP/FSDP average the
        # gradients over ranks, which gives exactly d(sum over the whole step / n_items)
        denom = max(n_items, 1) / dist.world if dist.active else max(n_items, 1)
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, mb in enumerate(mine):
            last = i == len(mine) - 1
            if dist.active and not self.fsdp and not last:
                sync = self.train_model.no_sync()
            else:
                sync = contextlib.nullcontext()
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            mb = self._to_device(mb)
            with sync:
                with self._autocast():
                    if self.num_items_ok:
                        out = self.train_model(**mb, use_cache=False, num_items_in_batch=denom)
                        loss = out.loss
                    else:  # a model without loss kwargs: its mean times its count is the sum
                        out = self.train_model(**mb, use_cache=False)
                        loss = out.loss * (count_label_tokens(mb) / denom)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            total += loss.detach().double()
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        norm = None
        if cfg.max_grad_norm > 0:
            n = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            if hasattr(n, "full_tensor"):
                n = n.full_tensor()
            norm = float(n)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        if dist.active:
            dist.all_reduce_sum(total)
            total /= dist.world
        return float(total), norm, ntok

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Mean token loss over the whole eval set (token-weighted, all ranks)."""
        from .data import count_label_tokens, make_batches

        cfg, dist = self.cfg, self.dist
        batches = make_batches(
            self.eval_ds,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            pad_id=self.pad_id,
            packing=False,
            shuffle=False,
            seed=cfg.seed,
            epoch=0,
        )
        per_rank = -(-len(batches) // dist.world)
        mine = [(b, 1.0) for b in batches[dist.rank :: dist.world]]
        mine += [(batches[0], 0.0)] * (per_rank - len(mine))  # same number of forwards on every rank (FSDP)
        model = self.model  # DDP: the module itself; FSDP: the sharded module (collectives in forward)
        model.eval()
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            for b, weight in mine:
                n = count_label_tokens(b)
                if n == 0:
                    if self.fsdp:
                        with self._autocast():
                            model(**self._to_device(b), use_cache=False)
                    continue
                with self._autocast():
                    out = model(**self._to_device(b), use_cache=False)
                acc[0] += out.loss.double() * n * weight
                acc[1] += n * weight
        finally:
            self.train_model.train()
        dist.all_reduce_sum(acc)
        return float(acc[0] / acc[1].clamp(min=1))

    def _generate(self, record, template: str) -> str:
        try:
            prompt = format_prompt(record, self.tokenizer, template)
            model = self.peft_model or self.hf_model
            with self._autocast():
                return generate_text(model, self.tokenizer, prompt, max_new_tokens=self.cfg.max_new_tokens)
        except Exception as e:  # generations are a courtesy: never lose a finished run over one
            return f"<generation failed: {type(e).__name__}: {_one_line(e)}>"

    def _record(self, rec: dict) -> None:
        rec = {k: _to_jsonable(v) for k, v in rec.items()}
        self.history.append(rec)
        if self.dist.main and self.metrics_path.parent.exists():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.reporters is not None:
                self.reporters.log(rec, rec["step"])

    # ---------------------------------------------------------------- model
    def _build_model(self, model):
        from . import patch, quantize

        cfg, device = self.cfg, self.device
        try:
            from peft import PeftModel
        except ImportError:  # pragma: no cover
            PeftModel = ()
        # frozen base weights in the compute dtype on CUDA (lora/qlora); full keeps fp32 masters
        load_dtype = self.amp_dtype if (self.amp_dtype is not None and cfg.method != "full") else torch.float32
        if model is None:
            model = _load_model(cfg, load_dtype)
        if PeftModel and isinstance(model, PeftModel):
            if cfg.method == "full":
                raise ValueError("method 'full' was asked for, but the model passed is a PEFT model")
            model = model.to(device)
            hf = model.get_base_model()
        else:
            hf = model.to(device)
            if cfg.method == "qlora":
                quantize(hf)
            if cfg.method in ("lora", "qlora"):
                from peft import LoraConfig, get_peft_model

                tm = cfg.target_modules
                lcfg = LoraConfig(
                    r=cfg.rank,
                    lora_alpha=cfg.alpha,
                    lora_dropout=cfg.dropout,
                    use_rslora=cfg.rslora,
                    target_modules=tm if isinstance(tm, str) else list(tm),
                    task_type="CAUSAL_LM",
                )
                try:
                    model = get_peft_model(hf, lcfg)
                except ValueError as e:
                    raise ValueError(f"LoRA target_modules {tm!r}: {_one_line(e)}") from None
            else:
                model = hf
                for p in model.parameters():
                    p.requires_grad_(True)
        report = patch(model, backend=cfg.backend, checkpointing=cfg.checkpointing)
        self.report = report
        if self.dist.main and not cfg.quiet:
            print(report, flush=True)
        return hf, model.train()

    def _load_weights(self, hf_model, model) -> None:
        from safetensors.torch import load_file

        d = self.resume_dir
        if self.cfg.method == "full":
            state = load_file(str(d / "model.safetensors"), device=str(self.device))
            missing, unexpected = hf_model.load_state_dict(state, strict=False)
            tied = set(getattr(hf_model, "_tied_weights_keys", None) or [])
            if unexpected or any(k not in tied and "lm_head" not in k for k in missing):
                raise ValueError(
                    f"resume_from: {d} does not match the model (missing {missing}, unexpected {unexpected})"
                )
            if hasattr(hf_model, "tie_weights"):
                hf_model.tie_weights()
        else:
            from peft import set_peft_model_state_dict

            state = load_file(str(d / "adapter_model.safetensors"), device=str(self.device))
            res = set_peft_model_state_dict(model, state)
            unexpected = getattr(res, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"resume_from: the adapter in {d} does not match the model: {unexpected[:3]}")

    def _load_training_state(self) -> None:
        d, dist = self.resume_dir, self.dist
        opt_state = torch.load(d / "optimizer.pt", map_location=self.device, weights_only=True)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.model, self.opt, optim_state_dict=opt_state, options=StateDictOptions(full_state_dict=True)
            )
        else:
            self.opt.load_state_dict(opt_state)
        sched = torch.load(d / "scheduler.pt", weights_only=True)
        self.sched.load_state_dict(sched)
        if self.scaler is not None and (d / "scaler.pt").is_file():
            self.scaler.load_state_dict(torch.load(d / "scaler.pt", weights_only=True))
        rng = d / f"rng_state_{dist.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=True), self.device)
        else:
            self.say(f"warning: {rng.name} missing in {d}; random state not restored for rank {dist.rank}")

    def _save(self, name, step, epoch, gi, best, best_step, bad_evals, eval_before, *, full: bool) -> None:
        """Write checkpoint ``name`` to a temporary directory, then rename it into place."""
        cfg, dist = self.cfg, self.dist
        final = self.out / name
        tmp = self.out / f".{name}.tmp"
        if dist.main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_sd = opt_sd = None
        if self.fsdp:  # gather the full state (a collective: every rank takes part)
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd = get_model_state_dict(self.model, options=opts)
            if full:
                opt_sd = get_optimizer_state_dict(self.model, self.opt, options=opts)
        if full:
            torch.save(_rng_state(self.device), tmp / f"rng_state_{dist.rank}.pt")
        if dist.main:
            target = self.peft_model if self.peft_model is not None else self.hf_model
            kw = {"state_dict": model_sd} if model_sd is not None else {}
            target.save_pretrained(str(tmp), safe_serialization=True, **kw)
            try:
                self.tokenizer.save_pretrained(str(tmp))
            except Exception as e:  # a tokenizer that cannot save should not lose the weights
                self.notes.append(f"tokenizer not saved with the checkpoint: {_one_line(e)}")
            if full:
                torch.save(opt_sd if opt_sd is not None else self.opt.state_dict(), tmp / "optimizer.pt")
                torch.save(self.sched.state_dict(), tmp / "scheduler.pt")
                if self.scaler is not None:
                    torch.save(self.scaler.state_dict(), tmp / "scaler.pt")
            state = {
                "step": step,
                "epoch": epoch,
                "batch": gi,
                "total_steps": self.total,
                "best_eval_loss": best,
                "best_step": best_step,
                "bad_evals": bad_evals,
                "eval_loss_before": eval_before,
                "method": cfg.method,
                "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum,
                "world_size": dist.world,
                "seed": cfg.seed,
                "config": cfg.to_dict(),
                "log_history": self.history,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str) + "\n")
        dist.barrier()
        if dist.main:
            _replace_dir(tmp, final)
        dist.barrier()

    def _summary(self, r: TrainResult) -> None:
        if self.cfg.quiet:
            return
        lines = ["", "fastft train: done"]
        if r.eval_loss_before is not None and r.eval_loss is not None:
            lines.append(
                f"  eval loss  {r.eval_loss_before:.4f} -> {r.eval_loss:.4f}   "
                f"(perplexity {_ppl(r.eval_loss_before):.2f} -> {_ppl(r.eval_loss):.2f})"
            )
        if r.best_step is not None:
            lines.append(f"  best eval  {r.best_eval_loss:.4f} at step {r.best_step}")
        lines.append(
            f"  steps      {r.steps}{' (stopped early)' if r.stopped_early else ''} in {r.train_seconds:.1f} s, "
            f"{r.tokens_per_s:,.0f} tokens/s"
        )
        for g in r.generations:
            lines.append(f"  prompt: {_short(g['prompt'])}")
            if g.get("before") is not None:
                lines.append(f"    before: {_short(g['before'])}")
            lines.append(f"    after:  {_short(g['after'])}")
        lines.append(f"  files in {r.output_dir}:")
        lines.append(f"    checkpoint-last/   ({'adapter' if self.cfg.method != 'full' else 'model'} + trainer state)")
        if r.checkpoint_best:
            lines.append(f"    checkpoint-best/   (step {r.best_step})")
        lines.append("    metrics.jsonl, train_config.json, result.json" + (", loss.png" if r.plot_path else ""))
        lines += [f"  note: {n}" for n in self.notes]
        print("\n".join(lines), flush=True)


def _ppl(loss: float | None) -> float:
    return float("nan") if loss is None else math.exp(min(loss, 50.0))


def _prompt_text(p) -> str:
    if isinstance(p, str):
        return p
    if "instruction" in p:
        return p["instruction"] + (f" [{p['input']}]" if p.get("input") else "")
    if "messages" in p:
        users = [m.get("content", "") for m in p["messages"] if m.get("role") == "user"]
        return users[-1] if users else ""
    return str(p.get("text", ""))


def _short(s: str, n: int = 100) -> str:
    s = s.replace("\n", "\\n")
    return s if len(s) <= n else s[: n - 3] + "..."
