"""Worker for tests/test_distributed_pref.py: preference training (``fastft.train``) on 2 gloo ranks.

Run by ``torchrun --standalone --nproc_per_node=2 tests/_dist_pref_worker.py OUT_DIR RUN...``
(CPU). Each RUN (a key of :data:`RUNS`) trains LoRA on the embedded default model for
``STEPS`` steps into ``OUT_DIR/RUN`` with ``batch_size`` 2 and ``grad_accum`` 1 per rank, so a
step is 2 micro-batches, the ones a single process with ``grad_accum`` 2 takes (the test runs
that one itself with :func:`config` and :func:`data`). A run whose name ends in ``-resume``
also copies its step-``SAVE_EVERY`` checkpoint aside and trains a second time from it into
``OUT_DIR/RUN-resumed``. Rank 0 writes ``OUT_DIR/status.json``: per run "ok" or the error.

One process group for every run (fastft.train uses the one it finds and leaves it up: tearing
a group down and setting it up again on torchrun's store can hang), with a 60 s collective
timeout, so a rank stuck in a collective turns into an error, not a hung CI job.
"""

from __future__ import annotations

import datetime
import json
import shutil
import sys
import traceback
from pathlib import Path

STEPS = 4
SAVE_EVERY = 2
N_TRAIN, N_EVAL = 16, 5  # 8 micro-batches of 2 pairs (4 steps of 2); 3 eval batches (2, 2, 1): uneven over ranks

# run name -> TrainConfig options beyond the common ones
RUNS = {
    "ddp-dpo": dict(objective="dpo"),
    "fsdp-dpo": dict(objective="dpo", fsdp=True),
    "ddp-orpo": dict(objective="orpo"),
    "ddp-kto": dict(objective="kto"),
    "fsdp-dpo-pre": dict(objective="dpo", fsdp=True, precompute_ref=True),
    # LoRA dropout: each rank's RNG state must come back on resume
    "ddp-dpo-pre-resume": dict(objective="dpo", precompute_ref=True, save_every=SAVE_EVERY, dropout=0.1),
}


def config(run: str, out: Path, *, world: int, **extra):
    """The TrainConfig of ``run`` for ``world`` ranks (1: the same steps with ``grad_accum`` 2)."""
    import fastft

    kw = dict(max_steps=STEPS, batch_size=2, grad_accum=2 // world, seq_len=512, lr=3e-3, eval_every=2,
              warmup_steps=1, dropout=0.0, quiet=True, num_generations=0, schedule="linear")  # fmt: skip
    kw.update(RUNS[run])
    if world == 1:
        kw.pop("fsdp", None)
    kw.update(extra)
    return fastft.TrainConfig(output_dir=str(out), **kw)


def data(objective: str) -> tuple[list[dict], list[dict]]:
    """(train, eval) records: pairs from the embedded set, or for KTO the same prompts with one
    completion each, alternately desirable (chosen) and undesirable (rejected)."""
    from fastft.preference import default_preference_records

    pairs = default_preference_records(N_TRAIN + N_EVAL)
    if objective == "kto":
        pairs = [{"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
                 for i, p in enumerate(pairs)]  # fmt: skip
    return pairs[:N_TRAIN], pairs[N_TRAIN:]


def train(cfg):
    import fastft
    from fastft import default

    train_recs, eval_recs = data(cfg.objective)
    return fastft.train(cfg, model=default.load_model(), tokenizer=default.load_tokenizer(),
                        train_data=train_recs, eval_data=eval_recs)  # fmt: skip


def _run(run: str, out: Path, world: int, rank: int) -> None:
    import torch.distributed as dist

    import fastft.training.loop as loop

    if not run.endswith("-resume"):
        train(config(run, out / run, world=world))
        return
    copy = out / f"{run}-step{SAVE_EVERY}"
    real_save = loop._Trainer._save

    def save(self, name, step, *args, **kw):
        real_save(self, name, step, *args, **kw)
        if self.dist.main and name == "checkpoint-last" and step == SAVE_EVERY:
            shutil.copytree(self.out / name, copy)

    loop._Trainer._save = save
    try:
        train(config(run, out / run, world=world))
    finally:
        loop._Trainer._save = real_save
    dist.barrier()  # the copy exists before any rank resumes from it
    train(config(run, out / f"{run}-resumed", world=world, resume_from=str(copy)))


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    out, runs = Path(argv[0]), argv[1:]
    status = {"world_size": world}
    for run in runs:
        try:
            _run(run, out, world, rank)
            status[run] = "ok"
        except Exception as e:  # recorded for the test, which fails with it
            status[run] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            print(f"[rank {rank}] {run} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        dist.barrier()
    if rank == 0:
        (out / "status.json").write_text(json.dumps(status))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
