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
micro-batches; rank 0 alone logs and writes files. The preference objectives too (their forwards
run through the DDP / FSDP2 wrapper: :mod:`fastft.training.objectives`).

Checkpoint layout (``output_dir/checkpoint-last`` and ``output_dir/checkpoint-best``): the
weights (a PEFT adapter dir: ``adapter_config.json`` + ``adapter_model.safetensors``; for
``full`` a transformers dir with ``model.safetensors``), the tokenizer, ``trainer_state.json``
(step, data position, best metric, log history); ``checkpoint-last`` also holds
``optimizer.pt``, ``scheduler.pt`` and ``rng_state_<rank>.pt`` (torch, python, numpy and CUDA
generator states), read back with ``torch.load(weights_only=True)``. Each checkpoint is written
to a temporary directory and renamed into place.
"""

from .config import TrainConfig, TrainResult
from .generation import format_prompt, generate_text
from .loop import TrainingInterrupted, train

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "train", "format_prompt", "generate_text"]
