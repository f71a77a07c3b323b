"""Worker for tests/test_distributed.py: resuming ``fastft.train`` under FSDP2 (or DDP).

Run by ``torchrun --standalone --nproc_per_node=2 tests/_dist_resume_worker.py OUT_DIR DATA MODE``
(gloo, CPU; MODE "fsdp" or "ddp"). Trains the embedded default model with LoRA on DATA for
``STEPS`` steps, writing ``checkpoint-last`` every ``SAVE_EVERY`` steps; the step-``SAVE_EVERY``
checkpoint is copied aside as it is written. A second run resumes from that copy (every rank
loads the full optimizer state and its own RNG state) and trains to ``STEPS``. Rank 0 writes
both runs' per-step losses and final adapter weights to ``OUT_DIR/resume.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

STEPS = 4
SAVE_EVERY = 2


def main(argv: list[str]) -> int:
    import datetime

    import torch.distributed as dist

    import fastft
    import fastft.trainer as T

    # one process group for both runs (fastft.train uses it and leaves it up): tearing a group down
    # and setting it up again on torchrun's store can hang; a timeout turns any hang into an error
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))

    out, data, mode = Path(argv[0]), argv[1], argv[2]
    copy = out / f"ckpt-step{SAVE_EVERY}"
    real_save = T._Trainer._save

    def save(self, name, step, *args, **kw):
        real_save(self, name, step, *args, **kw)
        if self.dist.main and name == "checkpoint-last" and step == SAVE_EVERY:
            shutil.copytree(self.out / name, copy)

    T._Trainer._save = save
    common = dict(
        data=data, seq_len=64, batch_size=2, max_steps=STEPS, eval_every=STEPS, save_every=SAVE_EVERY, dropout=0.1,
        lr=1e-2, num_generations=0, quiet=True, fsdp=mode == "fsdp", schedule="linear", warmup_steps=1,
    )  # fmt: skip
    full = fastft.train(fastft.TrainConfig(output_dir=str(out / "full"), **common))
    T._Trainer._save = real_save
    resumed = fastft.train(fastft.TrainConfig(output_dir=str(out / "resumed"), resume_from=str(copy), **common))
    if int(os.environ.get("RANK", "0")) == 0:
        from safetensors.torch import load_file

        def adapter(run):
            path = out / run / "checkpoint-last" / "adapter_model.safetensors"
            return {k: v.tolist() for k, v in load_file(str(path)).items()}

        result = {"full": full.losses, "resumed": resumed.losses, "full_adapter": adapter("full")}
        result["resumed_adapter"] = adapter("resumed")
        (out / "resume.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
