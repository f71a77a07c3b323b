"""``TrainConfig.compile`` / ``fastft train --compile [MODE]``: the training forward under torch.compile.

What is compiled: the module the loop calls for a training micro-batch (the patched PEFT or
transformers model, or its DDP wrapper), through ``torch.compile(module)``. The wrapper it
returns is used for that call only; everything else keeps the eager module: the checkpoints
(PEFT ``save_pretrained`` / the full model's state dict are written from the module itself, so no
``_orig_mod.`` key is ever saved and a compiled run's checkpoint loads into an eager run),
resume, evaluation (``eval`` mode and ``no_grad`` would be a second graph for a handful of
batches) and generation (a KV cache, a new shape per token).

fastft's ops are ``torch.library`` operators, so patching adds no graph break (the patch
report's ``compile-ready`` line says so, or names the features that run eagerly). fastft's
one-time checks (the fused loss's convention check at the first training call) need values, so
before the first compiled step the loop runs one eager forward of its first micro-batch
(``no_grad``, the random state restored: the run's numbers are unchanged); the first graph
compiled is then the one every step uses (its time is part of the first step's).

Shapes: the loop pads every micro-batch to its longest row, so the sequence length varies from
batch to batch. ``dynamic=None`` (torch's automatic dynamic shapes): the first batch compiles
for its shape, the first batch of another shape recompiles once with that dimension symbolic,
and no further batch recompiles. The step's loss normaliser (``num_items_in_batch``) is passed
as a tensor under compile, so a new value is not a new graph.

Modes: torch.compile's (``default``, ``reduce-overhead``: CUDA graphs, ``max-autotune``,
``max-autotune-no-cudagraphs``); ``True`` is ``default``. The compiler backend is inductor;
``FASTFT_COMPILE_BACKEND`` names another (``aot_eager``: dynamo + AOTAutograd without code
generation, what the CPU tests use; it takes no mode).
"""

from __future__ import annotations

import os

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BACKEND_ENV = "FASTFT_COMPILE_BACKEND"


def compile_mode(value) -> str | None:
    """The mode ``TrainConfig.compile`` asks for (None: no compilation); TypeError / ValueError
    naming the bad value."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if not isinstance(value, str):
        raise TypeError(f"compile must be true, false or a mode name ({', '.join(COMPILE_MODES)}), got {value!r}")
    mode = value.strip().lower()
    if mode in ("true", "yes", "on"):
        return "default"
    if mode in ("false", "no", "off", "none", ""):
        return None
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)} (or true / false), got {value!r}")
    return mode


def compile_backend() -> str:
    """The compiler backend: inductor, or what ``FASTFT_COMPILE_BACKEND`` names."""
    return os.environ.get(BACKEND_ENV, "").strip() or "inductor"


def compile_module(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``module`` under torch.compile (a wrapper: ``module`` itself is unchanged and still eager)."""
    backend = compile_backend()
    kw = {}
    if backend == "inductor" and mode != "default":
        kw["mode"] = mode
    return torch.compile(module, backend=backend, dynamic=None, **kw)


def describe(mode: str) -> str:
    backend = compile_backend()
    return f"torch.compile mode {mode}, backend {backend}" + (" (mode ignored)" if backend != "inductor" else "")


__all__ = ["COMPILE_MODES", "BACKEND_ENV", "compile_mode", "compile_backend", "compile_module", "describe"]
