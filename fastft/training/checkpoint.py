"""Checkpoint and resume I/O: atomic writes, RNG state, the weights / optimizer / scheduler of ``checkpoint-last``
and ``checkpoint-best`` (safetensors for weights, ``torch.load(weights_only=True)`` for the rest)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from .config import TrainConfig
from .model import _one_line


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


def _resolve_resume(cfg: TrainConfig) -> Path | None:
    if cfg.resume_from is None:
        return None
    p = Path(cfg.output_dir) / "checkpoint-last" if cfg.resume_from == "last" else Path(cfg.resume_from)
    if not (p / "trainer_state.json").is_file():
        raise ValueError(f"resume_from: {str(p)!r} is not a fastft checkpoint (no trainer_state.json there)")
    if not (p / "optimizer.pt").is_file():
        raise ValueError(f"resume_from: {str(p)!r} has no optimizer state (only checkpoint-last can be resumed)")
    return p


class CheckpointMixin:
    """``_Trainer``'s checkpoint writing and resume reading."""

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
                if getattr(self, "ref_cache", None) is not None:  # a preference run's precomputed reference
                    torch.save(self.ref_cache, tmp / "ref_logps.pt")
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
