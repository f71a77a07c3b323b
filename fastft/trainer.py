"""Compatibility shim: the trainer lives in the package :mod:`fastft.training` (config, model,
loop, checkpoint, reporting, dist, generation). Every name importable from ``fastft.trainer``
before the split still is, and is the same object."""

# ruff: noqa: F401
from .training import TrainConfig, TrainingInterrupted, TrainResult, format_prompt, generate_text, train
from .training.checkpoint import _atomic_write_text, _replace_dir, _resolve_resume, _rng_state, _set_rng_state
from .training.config import CHECKPOINTINGS, METHODS, PRECISIONS, REPORTERS, SCHEDULES, TEMPLATES
from .training.dist import _decoder_layers, _Dist, _init_dist
from .training.loop import _load_data, _Schedule, _StopOnSigint, _Trainer
from .training.model import _accepts_num_items, _load_model, _load_tokenizer, _pick_precision
from .training.reporting import _plot, _Reporters

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "train", "format_prompt", "generate_text"]
