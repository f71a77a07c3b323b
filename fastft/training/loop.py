"""The training loop: ``train()`` and ``_Trainer`` (setup, the optimizer steps, evaluation, the run's
end). Model building, checkpoint I/O and reporting live in the sibling modules it mixes in."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointMixin, _atomic_write_text, _resolve_resume, _seed_everything
from .config import TrainConfig, TrainResult
from .dist import _decoder_layers, _init_dist
from .generation import _prompt_records, format_prompt, generate_text
from .model import ModelMixin, _accepts_num_items, _load_tokenizer, _one_line, _pick_precision
from .objectives import PreferenceMixin, load_preference_data
from .reporting import ReportingMixin, _memory_mb, _plot, _ppl, _prompt_text, _Reporters, _to_jsonable


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


class _Pending:
    """Per-step losses (and the last step's grad norm) kept as device tensors until the loop reads
    them, all in one transfer, at the logging interval, an evaluation, a checkpoint or the end."""

    def __init__(self):
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []
        self.norm: torch.Tensor | None = None

    def add(self, step: int, loss: torch.Tensor, norm: torch.Tensor | None) -> None:
        self.steps.append(step)
        self.losses.append(loss.detach().reshape(()).double())
        self.norm = None if norm is None else norm.detach().reshape(()).double()

    def read(self) -> tuple[list[tuple[int, float]], float | None]:
        """((step, loss) for every pending step, the last grad norm or None); empties the queue."""
        if not self.losses:
            return [], None
        vals = torch.stack(self.losses + ([self.norm] if self.norm is not None else [])).tolist()  # one sync
        norm = vals.pop() if self.norm is not None else None
        read = list(zip(self.steps, vals))
        self.steps, self.losses, self.norm = [], [], None
        return read, norm


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


def _load_data(cfg: TrainConfig, tokenizer, train_data, eval_data):
    """(train TokenizedDataset, eval TokenizedDataset, prompt records, data format)."""
    from .. import data as D

    def is_tokenized(x):
        return hasattr(x, "examples") and hasattr(x, "stats")

    if train_data is None:
        if cfg.data is not None:
            train_data = str(cfg.data)
        else:
            from .. import default

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


class _Trainer(ModelMixin, CheckpointMixin, ReportingMixin, PreferenceMixin):
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
        from .. import data as D

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
        self.pref = None if cfg.objective == "sft" else cfg.objective
        self.eval_extra = {}
        if self.pref is None:
            train_ds, eval_ds, records, fmt = _load_data(cfg, tokenizer, train_data, eval_data)
        else:  # preference pairs (or KTO examples): fastft.preference
            train_ds, eval_ds = load_preference_data(cfg, tokenizer, train_data, eval_data)
            records, fmt = None, "text"
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
            from .. import default

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
        if self.pref is not None:
            self._pref_check()
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
        from .compile import compile_mode, compile_module

        self.compile_mode = compile_mode(cfg.compile)
        if self.compile_mode is not None:  # a wrapper for the training forward only (see training.compile)
            train_model = compile_module(train_model, self.compile_mode)
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

        if self.pref is not None and self.use_cache_ref:
            ref_file = self.resume_dir / "ref_logps.pt" if self.resume_dir is not None else None
            if ref_file is not None and ref_file.is_file():
                self.ref_cache = torch.load(ref_file, map_location=self.device, weights_only=True)
            elif resume_state is not None and cfg.method == "full":
                raise ValueError(
                    f"resume_from: {self.resume_dir} has no ref_logps.pt (the reference of a full DPO run)"
                )
            else:
                self._precompute_refs()

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
        if self.compile_mode is not None:
            from .compile import describe

            ready = self.report.compile_ready()
            self.say(f"compile: {describe(self.compile_mode)} of the training forward; fastft {ready}")
        if resume_state is not None:
            self.say(f"resumed from {self.resume_dir} at step {step} (epoch {epoch}, batch {gi})")

        # ---- before
        can_generate = prompts and not self.fsdp
        gens = []
        if can_generate and dist.main and resume_state is None:
            gens = [{"prompt": p, "before": self._generate(p, gen_template)} for p in prompts]
        if eval_before is None:
            eval_before = self._evaluate()
            self._record({"step": 0, "eval_loss": eval_before, "eval_ppl": _ppl(eval_before), **self.eval_extra})
            self.say(f"eval before training: loss {eval_before:.4f}, {self._eval_words(eval_before)}")

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
        pending = _Pending()
        compile_seconds = None

        def read_back() -> float | None:
            """Read the pending losses in one transfer (the only host sync of the loop), raise on a
            non-finite one, and return the last step's grad norm."""
            nonlocal train_loss, train_time
            t_read = time.perf_counter()
            read, norm = pending.read()
            train_time += time.perf_counter() - t_read  # waiting here is the device finishing the steps
            for s, v in read:
                losses.append(v)
                train_loss = v
                if not math.isfinite(v):
                    raise FloatingPointError(f"the training loss is {v} at step {s}; lower lr or check the data")
            return norm

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
            if self.compile_mode is not None and compile_seconds is None and self.pref is None:
                self._eager_checks(batches[gi * group])
            lr = self.sched.get_last_lr()[0]  # the rate this step uses
            loss, norm, ntok = self._step(batches[gi * group : (gi + 1) * group])
            self.sched.step()
            dt = time.perf_counter() - t0
            if self.compile_mode is not None and compile_seconds is None:
                compile_seconds = dt
                self._record({"step": step + 1, "compile_seconds": round(dt, 3), "compile": self.compile_mode})
                self.say(f"compile: the first step (tracing and compilation included) took {dt:.1f} s")
            train_time += dt
            n_tokens += ntok
            tok_window += ntok
            step += 1
            gi += 1
            if gi >= groups:
                epoch, gi = epoch + 1, 0
            pending.add(step, loss, norm)
            if step % cfg.log_every == 0 or step == total:
                norm = read_back()
                loss = train_loss
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

            stop = False
            if step % self.eval_every == 0 or step == total:
                read_back()  # a non-finite loss stops the run before it is evaluated or saved
                t_eval = time.perf_counter()
                ev = self._evaluate()
                last_eval, last_eval_step = ev, step
                self._record({"step": step, "eval_loss": ev, "eval_ppl": _ppl(ev), **self.eval_extra})
                self.say(f"step {step}: eval loss {ev:.4f}, {self._eval_words(ev)}")
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
                read_back()
                t_save = time.perf_counter()
                self._save("checkpoint-last", step, epoch, gi, best, best_step, bad_evals, eval_before, full=True)
                last_saved = step
                t_window += time.perf_counter() - t_save
            if stop:
                break
            if sigint.requested:  # Ctrl-C: this step is complete; save it and stop
                read_back()
                if last_saved != step:
                    self._save("checkpoint-last", step, epoch, gi, best, best_step, bad_evals, eval_before, full=True)
                if self.reporters is not None:
                    self.reporters.close()
                raise TrainingInterrupted(step, str(self.out / "checkpoint-last"))
        read_back()
        sigint.restore()
        self.bar.close()
        self.bar = None

        if last_saved != step:  # ran out of epochs before max_steps
            self._save("checkpoint-last", step, epoch, gi, best, best_step, bad_evals, eval_before, full=True)
        if last_eval_step != step:
            last_eval = self._evaluate()
            self._record({"step": step, "eval_loss": last_eval, "eval_ppl": _ppl(last_eval), **self.eval_extra})

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
            compile=self.compile_mode,
            compile_seconds=compile_seconds,
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

    def _eval_words(self, loss: float) -> str:
        if self.pref is None:
            return f"perplexity {_ppl(loss):.2f}"
        x = self.eval_extra
        acc = f"reward accuracy {x['eval_rewards/accuracies']:.3f}, " if "eval_rewards/accuracies" in x else ""
        return acc + f"margin {x['eval_rewards/margins']:.4f}"

    def _epoch_batches(self, epoch: int) -> list[dict]:
        from ..data import make_batches

        cfg = self.cfg
        if self.pref is not None:
            return self._pref_batches(self.train_ds, shuffle=True, epoch=epoch)
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

    def _step(self, group: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """One optimizer step over ``group`` (all ranks' micro-batches). Returns (mean token loss over
        the whole group, grad norm before clipping, non-padding tokens of the group); the loss and the
        norm stay device tensors (no host sync here: the loop reads them at the logging interval)."""
        from ..data import count_label_tokens

        dist, cfg = self.dist, self.cfg
        # the step's loss normaliser: label tokens (SFT) or pairs / examples (preference objectives)
        n_items = sum(count_label_tokens(b) if self.pref is None else b["index"].numel() for b in group)
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
                if self.pref is not None:
                    loss = self._pref_loss(mb, denom, "train")[0]
                else:
                    loss = self._sft_loss(mb, denom)
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
            norm = n
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        if dist.active:
            dist.all_reduce_sum(total)
            total /= dist.world
        return total, norm, ntok

    @torch.no_grad()
    def _eager_checks(self, mb: dict) -> None:
        """Before the first compiled step: one eager forward of its first micro-batch (no grad, the
        random state restored), so that fastft's one-time checks (the fused loss's convention check)
        run outside the traced region and the first compiled graph is the one every step uses."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self._autocast():
            kw = {"num_items_in_batch": torch.ones((), device=self.device)} if self.num_items_ok else {}
            self.model(**self._to_device(mb), use_cache=False, **kw)

    def _sft_loss(self, mb: dict, denom: float) -> torch.Tensor:
        """The micro-batch's summed token loss / ``denom`` (the step's label tokens per rank)."""
        from ..data import count_label_tokens

        with self._autocast():
            if self.num_items_ok:
                if self.compile_mode is not None:  # a tensor: a new value is not a new graph
                    denom = torch.tensor(denom, dtype=torch.float32, device=self.device)
                return self.train_model(**mb, use_cache=False, num_items_in_batch=denom).loss
            out = self.train_model(**mb, use_cache=False)  # a model without loss kwargs: its mean times its count
            return out.loss * (count_label_tokens(mb) / denom)

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Mean token loss over the whole eval set (token-weighted, all ranks); for a preference
        objective the mean per-pair loss, with the reward metrics in ``self.eval_extra``."""
        if self.pref is not None:
            return self._pref_evaluate()
        from ..data import count_label_tokens, make_batches

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
