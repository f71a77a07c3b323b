"""What a run shows and records: trackers (TensorBoard / MLflow / W&B), memory, the loss plot, the summary."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .config import TrainConfig, TrainResult


def _to_jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


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


class ReportingMixin:
    """``_Trainer``'s end-of-run summary."""

    def _eval_change(self, r: TrainResult) -> str:
        """Perplexity before -> after (SFT), or reward accuracy and margin (preference objectives)."""
        if getattr(self, "pref", None) is None:
            return f"(perplexity {_ppl(r.eval_loss_before):.2f} -> {_ppl(r.eval_loss):.2f})"
        ev = [h for h in self.history if "eval_loss" in h]
        key = "eval_rewards/accuracies" if "eval_rewards/accuracies" in ev[-1] else "eval_rewards/margins"
        name = "reward accuracy" if key.endswith("accuracies") else "reward margin"
        return f"({name} {ev[0].get(key, float('nan')):.3f} -> {ev[-1].get(key, float('nan')):.3f})"

    def _summary(self, r: TrainResult) -> None:
        if self.cfg.quiet:
            return
        lines = ["", "fastft train: done"]
        if r.eval_loss_before is not None and r.eval_loss is not None:
            lines.append(f"  eval loss  {r.eval_loss_before:.4f} -> {r.eval_loss:.4f}   " + self._eval_change(r))
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
