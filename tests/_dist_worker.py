"""Worker for tests/test_distributed.py: data-parallel training of a patched tiny model.

Run by ``torchrun --standalone --nproc_per_node=2 tests/_dist_worker.py OUT.json MODE...``
(gloo, CPU). Every rank builds the same model (same seeds), takes its half of one fixed
global batch and trains ``STEPS`` AdamW steps with gradient clipping; rank 0 writes, per
mode, the per-step loss averaged over ranks, the per-step total gradient norm (before
clipping) and the final LoRA parameters, or the error that stopped that mode.

The test imports :func:`build`, :func:`global_batch` and :func:`train` too, to compute the
single-process reference on the whole global batch in its own process.

Why the distributed run equals the single run
---------------------------------------------
The single run minimises the mean over *all* counted tokens of the global batch:
``L = sum_r S_r / N`` (``S_r``: summed token loss of rank r's half, ``N``: counted tokens
in the global batch). DDP and FSDP2 both *average* gradients over the ``W`` ranks. If
each rank used its own mean ``S_r / N_r``, the average ``(1/W) sum_r S_r / N_r`` equals
``L`` only when every ``N_r`` is ``N / W``; the global batch here has deliberately uneven
counts. So each rank passes ``num_items_in_batch = N / W`` (transformers' convention: the
loss is ``sum / num_items_in_batch``), its loss is ``W * S_r / N``, and the average over
ranks of losses and of gradients is exactly ``sum_r S_r / N = L`` and its gradient.
Clipping then sees the same global gradient (DDP: all-reduced grads are full; FSDP2:
``clip_grad_norm_`` reduces the norm over the DTensor shards).
"""

from __future__ import annotations

import datetime
import json
import sys
import traceback

import torch

STEPS = 3
LR = 1e-2
MAX_NORM = 0.05  # small enough that clipping is active at every step (checked by the test)
# Adam's update is about lr * sign(g) for |g| >> eps, however small g is: a gradient entry
# near zero whose last bits differ between two summation orders (half batches vs the whole
# batch: ~1e-6 of the largest gradient, but percents of that entry) would move by +-lr
# either way. An eps above those entries keeps the comparison about the gradients.
EPS = 1e-6
VOCAB = 256
FAMILY = "llama"


def build(kind: str):
    """A patched PEFT LoRA model over a tiny llama: ``kind`` "lora" (dense base) or "qlora" (fastft NF4)."""
    from peft import LoraConfig, get_peft_model

    import fastft
    from fastft.testing import tiny_model

    base = tiny_model(FAMILY, vocab_size=VOCAB, seed=0)
    if kind == "qlora":
        fastft.quantize(base)
    elif kind != "lora":
        raise ValueError(kind)
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, cfg)
    report = fastft.patch(model)
    fused = [p for p in report.patched if p.feature in ("lora", "loss")]
    assert len([p for p in fused if p.feature == "lora"]) == 14 and any(p.feature == "loss" for p in fused), report
    return model.train()


def global_batch(world_size: int = 2):
    """4 sequences of 16 tokens; the second half has far fewer counted tokens than the first."""
    from fastft.testing import tiny_batch

    batch = tiny_batch(VOCAB, batch=4, seq=16, seed=3, ignore_frac=0.1)
    batch["labels"][2:, :9] = -100  # uneven counts between the two halves
    return batch


def counted(labels: torch.Tensor) -> int:
    """Tokens the causal-LM loss counts (labels are shifted by one: position 0 never is)."""
    return int((labels[..., 1:] != -100).sum())


def lora_params(model) -> dict[str, torch.Tensor]:
    """The full (unsharded) LoRA parameters, keyed by their name in the PEFT model."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            t = p.detach()
            if hasattr(t, "full_tensor"):  # FSDP2 DTensor
                t = t.full_tensor()
            out[name.removeprefix("module.")] = t.clone()
    return out


def train(model, batch, *, rank: int = 0, world_size: int = 1, trainable=None):
    """STEPS AdamW steps on rank ``rank``'s share of ``batch``. Returns (losses, grad norms).

    With ``world_size == 1`` this is the plain single-process run: mean loss, no
    ``num_items_in_batch``. Otherwise losses are all-reduced to their mean over ranks.
    """
    import torch.distributed as dist

    params = trainable if trainable is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=0.01)
    n = batch["input_ids"].shape[0]
    share = n // world_size
    local = {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}
    kwargs = {}
    if world_size > 1:
        kwargs["num_items_in_batch"] = counted(batch["labels"]) / world_size  # see the module docstring
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        out = model(**local, **kwargs)
        assert out.logits is None  # the fused loss ran
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        opt.step()
        loss = out.loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(float(loss))
        norms.append(float(norm))
    return losses, norms


def _compiled(wrapper, model, rank: int, world_size: int):
    """``wrapper`` under torch.compile (aot_eager: the tracing without code generation), after one
    eager no-grad forward of this rank's share, as the trainer runs before its first compiled step
    (fastft's one-time loss check needs values); dynamo's counters are reset so the mode's
    ``compile`` record counts only what this wrapper compiles."""
    from torch._dynamo.utils import counters

    batch = global_batch()
    share = batch["input_ids"].shape[0] // world_size
    with torch.no_grad():
        model(**{k: v[rank * share : (rank + 1) * share] for k, v in batch.items()})
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(wrapper, backend="aot_eager")


def _compile_record() -> dict:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "breaks": dict(counters["graph_break"])}


def _run(mode: str, rank: int, world_size: int):

    strategy, kind = mode.split("-", 1)
    model = build(kind)
    if strategy in ("ddp", "ddpcompile"):
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
        if strategy == "ddpcompile":  # what fastft train --compile does under torchrun: compile the DDP wrapper
            wrapped = _compiled(wrapped, model, rank, world_size)
        losses, norms = train(wrapped, global_batch(), rank=rank, world_size=world_size)
        return losses, norms, lora_params(model)
    if strategy in ("fsdp", "fsdpcompile"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from fastft.nn import Linear4bit

        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # every parameter, the packed uint8 NF4 weights included, is now a dim-0 shard
        not_sharded = [n for n, p in model.named_parameters() if not hasattr(p, "full_tensor")]
        assert not not_sharded, not_sharded
        n4 = sum(isinstance(m, Linear4bit) for m in model.modules())
        assert n4 == (14 if kind == "qlora" else 0)
        run = _compiled(model, model, rank, world_size) if strategy == "fsdpcompile" else model
        losses, norms = train(run, global_batch(), rank=rank, world_size=world_size)
        return losses, norms, lora_params(model)
    raise ValueError(mode)


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    out_path, modes = argv[0], argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = {"world_size": world_size}
    for mode in modes:
        try:
            losses, norms, params = _run(mode, rank, world_size)
            results[mode] = {
                **({"compile": _compile_record()} if "compile" in mode else {}),
                "losses": losses,
                "grad_norms": norms,
                "params": {k: v.tolist() for k, v in params.items()},
            }
        except Exception as e:  # recorded for the test, which fails with it
            results[mode] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(f"[rank {rank}] {mode} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
