"""Produce the embedded default of ``fastft train``: the instruction dataset and the pretrained base.

    python scripts/make_default.py               # both (1500 pretraining steps: ~5 min on 2 idle CPU cores)
    python scripts/make_default.py --data-only   # only fastft/default/tasks.jsonl (instant)

Deterministic: the dataset is a pure function of ``--seed``; the base is pretrained from a fixed
seed on a generated corpus (the template and the words of the dataset, other instructions, see
``fastft/default/tasks.py``) and saved as bf16 safetensors with its config.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import random
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastft import default  # noqa: E402
from fastft.default import tasks  # noqa: E402

DATASET_SIZE = 2400


def write_dataset(path: pathlib.Path, seed: int = 0, n: int = DATASET_SIZE) -> str:
    text = tasks.dumps_jsonl(tasks.make_dataset(n, seed))
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def pretrain_batches(tok, seed: int, batch: int, seq: int):
    """Endless packed rows of pretraining documents, each ``<s> doc </s>``."""
    rng = random.Random(seed)
    buf: list[int] = []
    while True:
        while len(buf) < batch * (seq + 1):
            buf += tok(tasks.pretrain_text(rng))["input_ids"] + [tok.eos_token_id]
        rows = torch.tensor(buf[: batch * seq]).view(batch, seq)
        buf = buf[batch * seq :]
        yield rows


def pretrain(steps: int, seed: int, lr: float = 3e-3, batch: int = 4, seq: int = 512, log=None, save_dir=None):
    import fastft

    log = log or (lambda msg: print(msg, flush=True))
    torch.manual_seed(seed)
    tok = default.load_tokenizer()
    model = default.load_model(pretrained=False).train()
    fastft.patch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    t0 = time.perf_counter()
    for step, rows in zip(range(steps), pretrain_batches(tok, seed, batch, seq)):
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log(f"pretrain step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f}s")
        if save_dir is not None and step % 250 == 249:
            save_model(model, save_dir, name=f"partial-{step + 1}.safetensors")
    fastft.unpatch(model)
    return model.eval()


def save_model(model, out: pathlib.Path, dtype=torch.bfloat16, name="model.safetensors"):
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / name), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(default.MODEL_CONFIG, indent=2, sort_keys=True) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, default=default.HERE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-only", action="store_true")
    p.add_argument("--steps", type=int, default=1500, help="pretraining steps of the base")
    p.add_argument("--batch", type=int, default=4, help="pretraining rows of 512 tokens per step")
    p.add_argument("--save-partial", type=pathlib.Path, default=None, help="also save the weights every 250 steps here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    digest = write_dataset(args.out / "tasks.jsonl", args.seed)
    print(f"wrote {args.out / 'tasks.jsonl'}  sha256 {digest}")
    if args.data_only:
        return
    model = pretrain(args.steps, args.seed, batch=args.batch, save_dir=args.save_partial)
    save_model(model, args.out)
    print(f"wrote {args.out / 'model.safetensors'}")


if __name__ == "__main__":
    main()
