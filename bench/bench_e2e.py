#!/usr/bin/env python
"""Benchmark: an end-to-end LoRA / QLoRA training step of a Llama-style model, fastft vs PEFT.

Every provider trains the same randomly initialised ``LlamaForCausalLM`` (built from a
``transformers.LlamaConfig`` with a fixed seed, SDPA attention) with the same LoRA adapters
(r 16, alpha 32, dropout 0, every linear layer but the LM head, the same seeded init), on the
same batches (seeded random token ids, ~5% of the labels -100), with the same optimizer
(AdamW, lr 1e-3, no weight decay), for ``warmup + steps`` steps of forward + loss + backward +
``optimizer.step()`` + ``zero_grad``. Providers (``--providers``):

* ``peft`` - the reference: PEFT's eager model and transformers' loss (mode ``qlora``: PEFT over
  bitsandbytes NF4 ``Linear4bit`` layers, double-quantised, blocksize 64, replaced by hand);
* ``fastft`` - the same PEFT model + ``fastft.patch(model)`` (default features); mode ``qlora``:
  ``fastft.quantize(model)`` (bitsandbytes' bytes) + PEFT + ``fastft.patch``;
* ``fastft+ckpt`` - the same with ``checkpointing="recompute"`` (fastft's memory lever);
* ``peft+ckpt`` - the reference with transformers' ``gradient_checkpointing_enable`` (non-reentrant);
* ``compile`` - the reference wrapped in ``torch.compile`` (default on CUDA; opt in on CPU);
* ``liger`` - the reference + ``liger_kernel``'s ``_apply_liger_kernel_to_instance`` (CUDA, when importable).

Measured per provider, each in a fresh process (one after the other): tokens/s (median step,
p20 / p80), the peak memory of one training step above what the process holds before it
(model, optimizer, batch: CPU ``VmHWM - VmRSS`` in a process with large blocks mmap-ed, CUDA
``max_memory_allocated - memory_allocated``) and the process's total peak (CPU peak RSS,
CUDA ``max_memory_allocated``), the loss of every step and whether the last one agrees with
PEFT's, and optionally (``--max-seq-search``, on by default on CUDA) the longest sequence
(batch 1, doubling then bisecting to ~5%) whose training step fits in ``--budget-gb``.

    python bench/bench_e2e.py --quick                 # seconds: tiny model, 2 steps (smoke only)
    python bench/bench_e2e.py                         # CPU: ~58M params, 1 x 512 tokens, fp32, LoRA
    python bench/bench_e2e.py --device cuda           # GPU: ~1B params, 4 x 2048 tokens, bf16, LoRA + QLoRA
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time

import _harness as H

MODES = ("lora", "qlora")
PROVIDERS = ("peft", "fastft", "fastft+ckpt", "peft+ckpt", "compile", "liger")
REFERENCE = "peft"

MODEL_KEYS = ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab", "tie")
DEFAULTS = {
    # ~58M parameters (Llama-2-style, untied head)
    "cpu": dict(
        hidden=512, layers=8, intermediate=1408, heads=8, kv_heads=8, vocab=32000, tie=False,
        seq=512, batch=1, dtype="fp32", steps=8, warmup=2, modes="lora",
        providers="peft,fastft,fastft+ckpt", budget_gb=4.0, max_seq_cap=16384, max_seq_start=1024,
        max_seq_search=False, max_seq_providers="peft,fastft,fastft+ckpt",
    ),
    # ~1.0B parameters (Llama-3.2-1B-like: 128256 vocab, tied embeddings, GQA 32 / 8 heads)
    "cuda": dict(
        hidden=2048, layers=16, intermediate=5632, heads=32, kv_heads=8, vocab=128256, tie=True,
        seq=2048, batch=4, dtype="bf16", steps=10, warmup=3, modes="lora,qlora",
        providers="peft,fastft,fastft+ckpt,compile,liger", budget_gb=80.0, max_seq_cap=131072,
        max_seq_start=4096, max_seq_search=True, max_seq_providers="peft,fastft,fastft+ckpt",
    ),
}  # fmt: skip
QUICK = dict(
    hidden=64, layers=2, intermediate=192, heads=4, kv_heads=4, vocab=512, tie=False, seq=64, batch=2,
    steps=2, warmup=1, max_seq_cap=512, max_seq_start=128, budget_gb=2.0,
)  # fmt: skip
SHAPE_KEYS = MODEL_KEYS + ("seq", "batch", "dtype")

LORA = dict(r=16, alpha=32)
LR = 1e-3
IGNORE_FRAC = 0.05
# agreement of the last loss with the reference's: relative difference
LOSS_RTOL = {"fp32": 1e-3, "bf16": 2e-2}
SEQ_ROUND = 64  # sequence lengths probed by the search are multiples of this

# (label, mode, metric, provider, versus, op, limit); metric: "speedup" = tokens/s ratio,
# "mem" = step peak ratio, "total_mem" = total peak ratio, "max_seq" = longest sequence ratio
TARGETS = {
    "cpu": [
        ("LoRA fp32: fastft tokens/s >= 1.2x peft", "lora", "speedup", "fastft", "peft", ">=", 1.2),
        ("LoRA fp32: fastft step peak RSS <= 0.6x peft", "lora", "mem", "fastft", "peft", "<=", 0.6),
        ("LoRA fp32: fastft+ckpt tokens/s >= 1.2x peft", "lora", "speedup", "fastft+ckpt", "peft", ">=", 1.2),
        ("LoRA fp32: fastft+ckpt step peak RSS <= 0.6x peft", "lora", "mem", "fastft+ckpt", "peft", "<=", 0.6),
    ],
    "cuda": [
        ("QLoRA: fastft tokens/s >= 2x peft+bnb", "qlora", "speedup", "fastft", "peft", ">=", 2.0),
        ("QLoRA: fastft peak memory <= 0.5x peft+bnb", "qlora", "total_mem", "fastft", "peft", "<=", 0.5),
        ("LoRA bf16: fastft tokens/s >= 1.5x peft", "lora", "speedup", "fastft", "peft", ">=", 1.5),
        ("LoRA: fastft+ckpt longest sequence >= 4x peft", "lora", "max_seq", "fastft+ckpt", "peft", ">=", 4.0),
        ("QLoRA: fastft+ckpt longest sequence >= 4x peft+bnb", "qlora", "max_seq", "fastft+ckpt", "peft", ">=", 4.0),
        ("LoRA: fastft tokens/s >= liger", "lora", "speedup", "fastft", "liger", ">=", 1.0),
        ("QLoRA: fastft tokens/s >= liger", "qlora", "speedup", "fastft", "liger", ">=", 1.0),
    ],
}

Skip = H.Skip


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, help="hidden size; default CPU 512, CUDA 2048")
    p.add_argument("--layers", type=int, help="decoder layers; default CPU 8, CUDA 16")
    p.add_argument("--intermediate", type=int, help="MLP size; default CPU 1408, CUDA 5632")
    p.add_argument("--heads", type=int, help="attention heads; default CPU 8, CUDA 32")
    p.add_argument("--kv-heads", type=int, help="key/value heads; default CPU 8, CUDA 8")
    p.add_argument("--vocab", type=int, help="vocabulary; default CPU 32000, CUDA 128256")
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None, help="tie embeddings and head")
    p.add_argument("--seq", type=int, help="sequence length; default CPU 512, CUDA 2048")
    p.add_argument("--batch", type=int, help="sequences per step; default CPU 1, CUDA 4")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="model dtype; default CPU fp32, CUDA bf16")
    p.add_argument("--steps", type=int, help="timed training steps; default CPU 8, CUDA 10")
    p.add_argument("--warmup", type=int, help="untimed steps first (part of the loss trajectory); CPU 2, CUDA 3")
    p.add_argument("--modes", help="comma-separated subset of lora,qlora; default CPU lora, CUDA lora,qlora")
    p.add_argument(
        "--providers", help=f"comma-separated subset of {','.join(PROVIDERS)}; default CPU "
        f"{DEFAULTS['cpu']['providers']}, CUDA {DEFAULTS['cuda']['providers']} (peft is always added)",
    )  # fmt: skip
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0: losses comparable)")
    p.add_argument(
        "--repeats", type=int,
        help="time every provider this many times, alternating order (default: 3 for a full CPU run, "
        "where the reference's step time varies with the allocator's page faults; else 1)",
    )  # fmt: skip
    p.add_argument(
        "--interleave", action=argparse.BooleanOptionalAction, default=None,
        help="time all providers of a mode in one process, their steps interleaved, so that the load of a "
        "shared machine hits them alike (default: on for full CPU runs, off on CUDA and with --quick)",
    )  # fmt: skip
    p.add_argument("--deadline-s", type=float, help="start no new process after this many seconds (results so "
                   "far are still printed and written); e.g. to fit a time-limited GPU session")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument(
        "--max-seq-search", action=argparse.BooleanOptionalAction, default=None,
        help="search the longest sequence that fits in --budget-gb (default: on for CUDA, off for CPU)",
    )  # fmt: skip
    p.add_argument("--budget-gb", type=float, help="memory budget in GiB: CUDA allocator (default 80, at most "
                   "97%% of the device), CPU peak RSS of the process (default 4)")  # fmt: skip
    p.add_argument("--max-seq-cap", type=int, help="largest sequence tried; default CPU 16384, CUDA 131072")
    p.add_argument("--max-seq-start", type=int, help="first sequence tried; default CPU 1024, CUDA 4096")
    p.add_argument("--max-seq-providers", help="providers searched; default peft,fastft,fastft+ckpt")
    p.add_argument("--quick", action="store_true", help="tiny model (hidden 64, 2 layers), 64 tokens, 2 steps: smoke")
    H.add_common_args(p, "e2e", memory="peak memory", mem_processes="provider processes")
    p.add_argument("--worker-timeout", type=float, default=3600.0, help=argparse.SUPPRESS)
    p.add_argument("--_worker", dest="worker", help=argparse.SUPPRESS)  # provider
    p.add_argument("--_mode", dest="worker_mode", help=argparse.SUPPRESS)
    p.add_argument("--_tasks", dest="worker_tasks", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for opt, names, valid in (("--modes", args.modes, MODES), ("--providers", args.providers, PROVIDERS)):
        bad = [n for n in _csv(names) if n not in valid]
        if bad:
            p.error(f"{opt}: unknown {bad}; choose from {','.join(valid)}")
    bad = [n for n in _csv(args.max_seq_providers) if n not in PROVIDERS]
    if bad:
        p.error(f"--max-seq-providers: unknown {bad}; choose from {','.join(PROVIDERS)}")
    return args


def resolve(args: argparse.Namespace) -> dict:
    """The defaults of the device, then --quick, then the flags. Deterministic: the workers redo it."""
    device = H.resolve_device(args.device)
    cfg = dict(DEFAULTS[device])
    if args.quick:
        cfg.update(QUICK)
    for k in (*MODEL_KEYS, "seq", "batch", "dtype", "steps", "warmup", "modes", "providers", "budget_gb",
              "max_seq_cap", "max_seq_start", "max_seq_search", "max_seq_providers"):  # fmt: skip
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    cfg["modes"] = list(dict.fromkeys(_csv(cfg["modes"]))) or ["lora"]
    provs = _csv(cfg["providers"])
    cfg["providers"] = [REFERENCE] + [p for p in dict.fromkeys(provs) if p != REFERENCE]
    cfg["max_seq_providers"] = [p for p in dict.fromkeys(_csv(cfg["max_seq_providers"])) if p in cfg["providers"]]
    repeats = args.repeats if args.repeats is not None else (3 if device == "cpu" and not args.quick else 1)
    cfg.update(
        device=device, quick=args.quick, seed=args.seed, lora_dropout=args.lora_dropout, repeats=max(1, repeats),
        lora_r=LORA["r"], lora_alpha=LORA["alpha"], lr=LR, ignore_frac=IGNORE_FRAC,
        attention="sdpa",
    )  # fmt: skip
    cfg["at_target_shape"] = all(cfg[k] == DEFAULTS[device][k] for k in SHAPE_KEYS) and not args.quick
    cfg["tokens_per_step"] = cfg["seq"] * cfg["batch"]
    return cfg


# --------------------------------------------------------------------------------------
# model, adapters, data
# --------------------------------------------------------------------------------------
def llama_config(cfg: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=max(cfg["seq"], cfg["max_seq_cap"]),
        tie_word_embeddings=cfg["tie"],
        rope_theta=500000.0,
        use_cache=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def count_params(cfg: dict) -> int:
    """Parameters of the dense model (computed from the shape, nothing built)."""
    h, i, L, V = cfg["hidden"], cfg["intermediate"], cfg["layers"], cfg["vocab"]
    hd = h // cfg["heads"]
    attn = h * h * 2 + 2 * h * cfg["kv_heads"] * hd
    layer = attn + 3 * h * i + 2 * h
    return V * h * (1 if cfg["tie"] else 2) + L * layer + h


def bnb_quantize(model, compute_dtype) -> None:
    """Replace every ``nn.Linear`` but the LM head by a bitsandbytes NF4 ``Linear4bit`` (what
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``
    loads), quantising the same weights."""
    from torch import nn

    try:
        import bitsandbytes as bnb
    except Exception as exc:
        raise Skip(f"bitsandbytes not importable ({type(exc).__name__}: {exc})") from None
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name != "lm_head":
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True, device="meta",
                )  # fmt: skip
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
                )
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data)
                setattr(module, child_name, q.to(child.weight.device))
                del child


def build(cfg: dict, mode: str, provider: str):
    """The model of ``provider`` (a PEFT model in train mode) and a note; raises Skip."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dev = cfg["device"]
    dtype = H.torch_dtype(cfg["dtype"])
    if provider == "liger" and not dev.startswith("cuda"):
        raise Skip("liger-kernel runs on CUDA only")
    if provider == "compile" and mode == "qlora":
        raise Skip("torch.compile of PEFT over bitsandbytes Linear4bit is not measured")
    liger_apply = None
    if provider == "liger":
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance as liger_apply
        except Exception as exc:
            raise Skip(f"liger-kernel not importable ({type(exc).__name__}: {exc})") from None
    torch.manual_seed(cfg["seed"])
    ctx = torch.device(dev) if dev.startswith("cuda") else torch.device("cpu")
    with ctx:  # built on the device: the same seeded weights in every process
        model = AutoModelForCausalLM.from_config(llama_config(cfg), attn_implementation="sdpa", dtype=dtype)
    note = ""
    if mode == "qlora":
        if provider.startswith("fastft"):
            import fastft

            fastft.quantize(model)
            note = "fastft.quantize (NF4, blocksize 64, double quant)"
        else:
            bnb_quantize(model, dtype)
            note = "bitsandbytes Linear4bit NF4 (blocksize 64, double quant)"
    gc.collect()
    torch.manual_seed(cfg["seed"] + 1)  # the same adapter init for every provider
    lcfg = LoraConfig(
        r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
        target_modules="all-linear", task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, lcfg)
    report = None
    if provider == "peft+ckpt":
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        note = (note + "; " if note else "") + "transformers gradient checkpointing (non-reentrant)"
    elif provider.startswith("fastft"):
        import fastft

        report = fastft.patch(model, checkpointing="recompute" if provider == "fastft+ckpt" else None)
    elif provider == "liger":
        try:
            liger_apply(model=model.get_base_model())
        except Exception as exc:
            raise Skip(f"liger-kernel could not be applied ({type(exc).__name__}: {exc})") from None
        note = (note + "; " if note else "") + "liger _apply_liger_kernel_to_instance"
    model.train()
    run_model = model
    if provider == "compile":
        run_model = torch.compile(model)
        note = "torch.compile(peft model), default mode"
    return model, run_model, report, note


def make_batch(cfg: dict, index: int, *, batch: int | None = None, seq: int | None = None):
    """Batch number ``index``: seeded random ids, ~5% of the labels -100 (the same on every device)."""
    import torch

    b, s = batch or cfg["batch"], seq or cfg["seq"]
    g = torch.Generator().manual_seed(cfg["seed"] * 100003 + 17 + index)
    ids = torch.randint(3, cfg["vocab"], (b, s), generator=g)
    labels = ids.clone()
    labels[torch.rand(b, s, generator=g) < cfg["ignore_frac"]] = -100
    return {"input_ids": ids.to(cfg["device"]), "labels": labels.to(cfg["device"])}


class Trainer:
    """The training step every provider runs: forward with labels, backward, AdamW step, zero_grad."""

    def __init__(self, model, run_model, cfg: dict):
        import torch

        self.model, self.run_model = model, run_model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg["lr"], weight_decay=0.0)

    def step(self, batch):
        loss = self.run_model(**batch).loss  # the output (logits, if any) is dropped at once
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def fwd_bwd(self, batch):
        """Forward + backward without an optimizer step (priming); grads cleared afterwards."""
        self.run_model(**batch).loss.backward()
        self.model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------
# worker: one provider in a fresh process
# --------------------------------------------------------------------------------------
def _sync(dev: str):
    if dev.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _process_peak_mib(dev: str) -> float | None:
    if dev.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    kb = H._proc_status_kb("VmHWM")
    return None if kb is None else kb / 1024


def measure_step_memory(tr: Trainer, cfg: dict, batch) -> tuple[dict, object]:
    """Peak of one training step (``batch``) above what the process holds right before it.

    Primed by a full-size forward + backward (no optimizer step; grads cleared) on CUDA, and on
    the CPU when freed memory leaves the RSS; otherwise by a tiny one (see ``_harness.measure_peak_memory``). Returns the memory dict (``peak_mib``,
    ``baseline_mib``, ``total_peak_mib``) and the step's loss.
    """
    dev = cfg["device"]
    # a full-size prime (compilation, GEMM packing buffers, ... not counted) where its freed memory
    # cannot hide in the allocator: CUDA (exact counters) and CPU with large blocks mmap-ed and a
    # resettable VmHWM (as _harness.measure_layer_memory); else a tiny one (pages code in, starts pools)
    full = dev.startswith("cuda") or (all(os.environ.get(k) for k in H.CPU_WORKER_ENV) and H._reset_peak_rss())
    if full:

        def prime():
            tr.fwd_bwd(batch)

    else:

        def prime():
            tr.fwd_bwd(make_batch(cfg, 10**6, batch=1, seq=16))

    out = {}
    mem = H.measure_peak_memory(lambda: out.setdefault("loss", tr.step(batch)), dev, prime=prime)
    base, peak = mem.get("baseline_mib"), mem.get("peak_mib")
    mem["total_peak_mib"] = None if base is None or peak is None else base + peak
    mem["total_method"] = "cuda max_memory_allocated" if dev.startswith("cuda") else "process peak RSS (VmHWM)"
    mem["prime"] = "full-size forward + backward" if full else "tiny forward + backward"
    return mem, out["loss"]


def search_max_seq(tr: Trainer, cfg: dict) -> dict:
    """Longest sequence (batch 1, multiple of SEQ_ROUND) whose training step fits in the budget.

    CUDA: the caching allocator is capped with ``set_per_process_memory_fraction`` and a probe fails
    on out-of-memory. CPU: a probe fails when the process's peak RSS during the step exceeds the
    budget (measured with VmHWM, reset before each probe; large blocks are mmap-ed, so freed memory
    leaves the RSS). Doubling from ``max_seq_start`` until a failure or ``max_seq_cap``, then bisecting
    to ~5%.
    """
    import torch

    dev = cfg["device"]
    sync = _sync(dev)
    budget = cfg["budget_gb"] * 2**30
    info = {"budget_gib_requested": cfg["budget_gb"], "probes": []}
    if dev.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(dev)).total_memory
        budget = min(budget, 0.97 * total)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(budget / total)
        info["method"] = "torch.cuda.set_per_process_memory_fraction; fails on OOM"
    else:
        info["method"] = "process peak RSS (VmHWM) <= budget"
    info["budget_gib"] = budget / 2**30
    index = [0]

    def probe(seq: int) -> bool:
        index[0] += 1
        batch = make_batch(cfg, 2 * 10**6 + index[0], batch=1, seq=seq)
        ok, reason, peak = True, "", None
        t0 = time.perf_counter()
        try:
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            else:
                H._reset_peak_rss()
            tr.step(batch)
            sync()
            peak = _process_peak_mib(dev)
            if not dev.startswith("cuda") and peak is not None and peak * 2**20 > budget:
                ok, reason = False, "peak RSS over budget"
        except Exception as exc:  # OOM (CUDA) is a failed probe, anything else too, with its reason
            ok, reason = False, ("OOM" if _is_oom(exc) else f"{type(exc).__name__}: {str(exc)[:200]}")
        tr.opt.zero_grad(set_to_none=True)
        del batch
        gc.collect()
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
        info["probes"].append(dict(seq=seq, fits=ok, peak_mib=peak, s=time.perf_counter() - t0, reason=reason))
        return ok

    def rnd(x: float) -> int:
        return max(SEQ_ROUND, int(x) // SEQ_ROUND * SEQ_ROUND)

    cap = cfg["max_seq_cap"]
    lo, hi = 0, None
    s = rnd(min(cfg["max_seq_start"], cap))
    while True:
        if probe(s):
            lo = s
            if s >= cap:
                break
            s = min(rnd(s * 2), cap)
        else:
            hi = s
            break
    if hi is not None and lo == 0:  # even the start failed: halve down
        s = hi
        while s > SEQ_ROUND:
            s = rnd(s // 2)
            if probe(s):
                lo = s
                break
            hi = s
    while hi is not None and lo and (hi - lo) > max(SEQ_ROUND, 0.05 * lo):
        mid = rnd((lo + hi) / 2)
        if mid <= lo or mid >= hi:
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    if dev.startswith("cuda"):
        torch.cuda.set_per_process_memory_fraction(1.0)
    info.update(max_seq=lo or None, capped=hi is None, first_failure=hi)
    return info


def worker_main(args: argparse.Namespace) -> None:
    provider, mode = args.worker, args.worker_mode
    tasks = set(_csv(args.worker_tasks))
    res: dict = {"provider": provider, "mode": mode, "tasks": sorted(tasks)}
    try:
        import torch

        cfg = resolve(args)
        dev = cfg["device"]
        sync = _sync(dev)
        t_build = time.perf_counter()
        try:
            model, run_model, report, note = build(cfg, mode, provider)
        except Skip as exc:
            H.emit_worker_result(dict(res, status="skipped", reason=str(exc)))
            return
        tr = Trainer(model, run_model, cfg)
        sync()
        res.update(
            status="ok", note=note, build_s=time.perf_counter() - t_build, torch_threads=torch.get_num_threads(),
            trainable_params=sum(p.numel() for p in tr.params),
        )  # fmt: skip
        if report is not None:
            res["patched"] = sorted(report.features())
            res["report"] = str(report).splitlines()[:40]
        n_total = cfg["warmup"] + cfg["steps"]
        batches = [make_batch(cfg, i) for i in range(n_total)] if ("time" in tasks or "mem" in tasks) else []
        losses = []
        start = 0
        if "mem" in tasks:  # the first full-size step of this process: step 0 of the trajectory
            mem, loss = measure_step_memory(tr, cfg, batches[0])
            res["memory"] = mem
            losses.append(loss)
            start = 1
        if "time" in tasks:
            times = []
            for i in range(start, n_total):
                sync()
                t0 = time.perf_counter()
                losses.append(tr.step(batches[i]))
                sync()
                if i >= cfg["warmup"]:
                    times.append((time.perf_counter() - t0) * 1e3)
            res["time"] = _time_stats(times, cfg["warmup"])
        res["losses"] = [float(x) for x in losses]
        del batches, losses
        gc.collect()
        if "maxseq" in tasks:
            res["max_seq"] = search_max_seq(tr, cfg)
        if dev.startswith("cuda"):
            res["process_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception as exc:  # report, never hang the parent
        import traceback

        res.update(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
    H.emit_worker_result(res)


def _time_stats(times: list[float], warmup: int) -> dict:
    s = sorted(times)
    return dict(
        median_ms=H._percentile(s, 50), p20_ms=H._percentile(s, 20), p80_ms=H._percentile(s, 80),
        min_ms=s[0], reps=len(s), warmup=warmup, times_ms=times,
    )  # fmt: skip


def interleave_main(args: argparse.Namespace) -> None:
    """Every provider of one mode in this process, their steps interleaved (CPU on a shared machine).

    The providers are built with the same seeds as in their own processes (same weights, adapters and
    batches) and train side by side, one step each in turn (the order rotating every step), so a
    change in the machine's load hits all of them alike. Reports each provider's step times and
    losses, and per step the reference's time / the provider's time (``paired_speedups``).
    """
    mode = args.worker_mode
    res: dict = {"provider": "interleave", "mode": mode, "providers": {}}
    try:
        import torch

        cfg = resolve(args)
        n_total = cfg["warmup"] + cfg["steps"]
        trainers, out = {}, res["providers"]
        for prov in cfg["providers"]:
            if prov == "liger":  # patches transformers' module functions for the whole process
                out[prov] = dict(status="skipped", reason="liger is not interleaved (it patches the whole process)")
                continue
            t_build = time.perf_counter()
            try:
                model, run_model, report, note = build(cfg, mode, prov)
            except Skip as exc:
                out[prov] = dict(status="skipped", reason=str(exc))
                continue
            trainers[prov] = Trainer(model, run_model, cfg)
            out[prov] = dict(status="ok", note=note, build_s=time.perf_counter() - t_build,
                             trainable_params=sum(p.numel() for p in trainers[prov].params),
                             torch_threads=torch.get_num_threads())  # fmt: skip
            if report is not None:
                out[prov]["patched"] = sorted(report.features())
                out[prov]["report"] = str(report).splitlines()[:40]
        names = list(trainers)
        times = {p: [] for p in names}
        losses = {p: [] for p in names}
        for i in range(n_total):
            batch = make_batch(cfg, i)
            k = i % max(1, len(names))
            for prov in names[k:] + names[:k]:
                t0 = time.perf_counter()
                loss = trainers[prov].step(batch)
                dt = (time.perf_counter() - t0) * 1e3
                losses[prov].append(float(loss))
                if i >= cfg["warmup"]:
                    times[prov].append(dt)
        ref = times.get(REFERENCE)
        for prov in names:
            out[prov]["time"] = _time_stats(times[prov], cfg["warmup"])
            out[prov]["time"]["interleaved_with"] = names
            if ref:
                out[prov]["time"]["paired_speedups"] = [a / b for a, b in zip(ref, times[prov])]
            out[prov]["losses"] = losses[prov]
        res["status"] = "ok"
    except Exception as exc:  # report, never hang the parent
        import traceback

        res.update(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
    H.emit_worker_result(res)


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def _tps(cfg: dict, ms: float | None) -> float | None:
    return None if not ms else cfg["tokens_per_step"] / (ms / 1e3)


def aggregate(cfg: dict, runs: dict) -> list[dict]:
    """One row per (mode, provider) from the worker results ``runs[(mode, provider)] = {...}``."""
    rows = []
    tol = LOSS_RTOL[cfg["dtype"]]
    for mode in cfg["modes"]:
        ref = runs.get((mode, REFERENCE), {})
        for prov in cfg["providers"]:
            r = runs.get((mode, prov), {})
            row: dict = dict(mode=mode, provider=prov, status=r.get("status", "missing"), reason=r.get("reason"))
            row["note"] = r.get("note")
            if r.get("status") != "ok":
                rows.append(row)
                continue
            # time: pooled over the repeats
            times = [t for rep in r.get("time_runs", []) for t in rep["times_ms"]]
            if times:
                s = sorted(times)
                med, p20, p80 = H._percentile(s, 50), H._percentile(s, 20), H._percentile(s, 80)
                row.update(median_ms=med, p20_ms=p20, p80_ms=p80, steps_timed=len(s))
                row.update(tokens_per_s=_tps(cfg, med), tps_p20=_tps(cfg, p80), tps_p80=_tps(cfg, p20))
                row["repeat_medians_ms"] = [rep["median_ms"] for rep in r["time_runs"]]
            ref_times = [t for rep in ref.get("time_runs", []) for t in rep["times_ms"]]
            if times and ref_times:
                row["speedup_pooled"] = statistics.median(ref_times) / row["median_ms"]
                row["speedup"] = row["speedup_pooled"]
                # per repeat (the two were timed close together): the spread of the ratio
                per = [
                    a["median_ms"] / b["median_ms"]
                    for a, b in zip(ref["time_runs"], r["time_runs"])
                    if a.get("median_ms") and b.get("median_ms")
                ]
                row["speedup_repeats"] = per
                row["speedup_min"], row["speedup_max"] = (min(per), max(per)) if per else (None, None)
                paired = [x for rep in r["time_runs"] for x in rep.get("paired_speedups", [])]
                if paired:  # interleaved: the reference's step / this provider's step, step by step
                    ps = sorted(paired)
                    row["speedup_paired_median"] = H._percentile(ps, 50)
                    row["speedup_paired_p20"], row["speedup_paired_p80"] = H._percentile(ps, 20), H._percentile(ps, 80)
                    # the steps ran side by side: their ratio is what the load did not change
                    row["speedup"] = row["speedup_paired_median"]
            mem = r.get("memory") or {}
            row["step_peak_mib"] = mem.get("peak_mib")
            row["total_peak_mib"] = mem.get("total_peak_mib")
            row["memory_exact"] = mem.get("exact")
            rmem = ref.get("memory") or {}
            row["mem_ratio"] = H.ratio(row["step_peak_mib"], rmem.get("peak_mib"))
            row["total_ratio"] = H.ratio(row["total_peak_mib"], rmem.get("total_peak_mib"))
            losses = r.get("losses") or []
            if losses:
                row["loss_first"], row["loss_last"], row["steps_trained"] = losses[0], losses[-1], len(losses)
                row["losses"] = losses
            rl = ref.get("losses") or []
            if losses and rl and len(rl) == len(losses):
                row["loss_rel_diff"] = abs(losses[-1] - rl[-1]) / max(abs(rl[-1]), 1e-12)
                row["loss_max_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, rl))
                row["agree"] = bool(all(math.isfinite(x) for x in losses) and row["loss_rel_diff"] <= tol)
            ms = r.get("max_seq")
            if ms:
                row["max_seq"] = ms.get("max_seq")
                row["max_seq_capped"] = ms.get("capped")
                row["max_seq_info"] = ms
                rms = (ref.get("max_seq") or {}).get("max_seq")
                row["max_seq_ratio"] = H.ratio(row["max_seq"], rms)
            for k in ("patched", "report", "trainable_params", "build_s"):
                if k in r:
                    row[k] = r[k]
            rows.append(row)
    return rows


def evaluate_targets(cfg: dict, rows: list[dict]) -> list[dict]:
    by = {(r["mode"], r["provider"]): r for r in rows}
    out = []
    for label, mode, metric, who, versus, op, limit in TARGETS[cfg["device"]]:
        if mode not in cfg["modes"]:
            continue
        a, b = by.get((mode, who), {}), by.get((mode, versus), {})
        value = None
        if metric == "speedup" and versus == REFERENCE:
            value = a.get("speedup")  # tokens/s ratio (interleaved: the median of the step-by-step ratios)
        elif metric == "speedup":
            value = H.ratio(b.get("median_ms"), a.get("median_ms"))
        elif metric == "mem":
            value = H.ratio(a.get("step_peak_mib"), b.get("step_peak_mib"))
        elif metric == "total_mem":
            value = H.ratio(a.get("total_peak_mib"), b.get("total_peak_mib"))
        elif metric == "max_seq":
            value = H.ratio(a.get("max_seq"), b.get("max_seq"))
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        note = "" if cfg["at_target_shape"] else "not the target shape: information only"
        if value is None:
            missing = [p for p, r in ((who, a), (versus, b)) if r.get("status") != "ok"]
            note = f"n/a: {', '.join(missing) or 'not measured'}"
        elif metric == "max_seq" and a.get("max_seq_capped"):
            note = (note + "; " if note else "") + f"{who} reached the cap ({cfg['max_seq_cap']}): a lower bound"
        out.append(dict(target=label, value=value, op=op, limit=limit, met=met, note=note))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker == "interleave":
        interleave_main(args)
        return 0
    if args.worker:
        worker_main(args)
        return 0
    import torch

    t_start = time.perf_counter()
    script = os.path.abspath(__file__)
    raw_args = list(sys.argv[1:] if argv is None else argv)
    cfg = resolve(args)
    dev = cfg["device"]
    cuda = dev.startswith("cuda")
    parallel = H.mem_parallel(args)
    cfg["params"] = count_params(cfg)
    cfg["torch_threads"] = torch.get_num_threads()
    print(
        f"e2e bench: Llama-style {cfg['params'] / 1e6:.1f}M params (hidden {cfg['hidden']}, {cfg['layers']} layers, "
        f"MLP {cfg['intermediate']}, {cfg['heads']}/{cfg['kv_heads']} heads, vocab {cfg['vocab']}"
        f"{', tied' if cfg['tie'] else ''}), {cfg['batch']} x {cfg['seq']} tokens, {cfg['dtype']}, SDPA; "
        f"LoRA r {cfg['lora_r']} alpha {cfg['lora_alpha']} all linear, AdamW lr {cfg['lr']}; "
        f"{cfg['warmup']} + {cfg['steps']} steps x {cfg['repeats']} repeat(s); device={dev} ({H.device_name(dev)}) "
        f"threads={cfg['torch_threads']}{' [quick]' if cfg['quick'] else ''}"
    )
    print(f"modes: {','.join(cfg['modes'])}; providers: {','.join(cfg['providers'])}")

    search = bool(cfg["max_seq_search"])
    jobs = [(m, p) for m in cfg["modes"] for p in cfg["providers"]]

    def argv_for(mode, prov, tasks):
        return raw_args + ["--_worker", prov, "--_mode", mode, "--_tasks", ",".join(tasks)]

    runs: dict = {}
    timeout = args.worker_timeout

    def record(key, res, kind):
        r = runs.setdefault(key, {"status": None, "time_runs": []})
        if res.get("status") != "ok":
            if r["status"] in (None, "ok") or res.get("status") == "skipped":
                r.update(status=res.get("status", "error"), reason=res.get("reason"))
            if res.get("status") == "error":
                print(f"  {key[0]}/{key[1]} ({kind}) failed: {res.get('reason')}\n{res.get('traceback', '')[-1500:]}")
            elif res.get("status") == "skipped":
                print(f"  {key[0]}/{key[1]}: skipped: {res.get('reason')}")
            return
        if r["status"] is None:
            r["status"] = "ok"
        for k in ("note", "patched", "report", "trainable_params", "build_s", "memory", "max_seq", "losses"):
            if k in res and (k != "losses" or "losses" not in r or kind == "time"):
                r[k] = res[k]
        if "time" in res:
            r["time_runs"].append(res["time"])

    def budget():
        """Seconds a new process may run (None: no limit), or 0 when --deadline-s has passed."""
        if args.deadline_s is None:
            return timeout
        return max(0.0, min(timeout, args.deadline_s - (time.perf_counter() - t_start)))

    def launch(job, tasks, env):
        t = budget()
        if t == 0:
            print(f"  {job[0]}/{job[1]} ({','.join(tasks)}): not started, --deadline-s {args.deadline_s:g} passed")
            return {"status": "skipped", "reason": f"not run: --deadline-s {args.deadline_s:g} passed"}
        return H.run_isolated(script, argv_for(*job, tasks), env, t)

    # CPU (full size): memory in its own process with large blocks mmap-ed (which would slow the
    # timed steps down), time in processes with the normal allocator (all providers of a mode in one
    # process, steps interleaved, with --interleave, the CPU default). CUDA / --quick: one process
    # per provider does everything (CUDA's counters are exact; --quick is a smoke run).
    split = not cuda and not cfg["quick"]
    interleave = args.interleave if args.interleave is not None else split
    cfg["interleave"] = interleave
    first_tasks = ["time"] + ([] if args.skip_memory else ["mem"])
    if search and not split:
        first_tasks_for = {
            p: first_tasks + (["maxseq"] if p in cfg["max_seq_providers"] else []) for p in cfg["providers"]
        }
    else:
        first_tasks_for = {p: list(first_tasks) for p in cfg["providers"]}
    if split or interleave:
        first_tasks_for = {p: ["time"] for p in cfg["providers"]}
        mem_jobs = [] if args.skip_memory else jobs
        env = H.worker_env(dev)
        print(f"memory: {len(mem_jobs)} process(es){' in parallel' if parallel else ''}")
        if parallel:
            started = [(j, H.launch_isolated(script, argv_for(*j, ["mem"]), env)) for j in mem_jobs]
            for j, run in started:
                record(j, H.collect_isolated(run, timeout), "mem")
        else:
            for j in mem_jobs:
                t0 = time.perf_counter()
                res = launch(j, ["mem"], env)
                record(j, res, "mem")
                m = (res.get("memory") or {}).get("peak_mib")
                print(f"  {j[0]}/{j[1]}: {res.get('status')}"
                      f"{f', step peak {m:.1f} MiB' if m is not None else ''} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    env_time = H.worker_env(dev) if (cuda or cfg["quick"]) and not args.skip_memory and not split else None
    for rep in range(cfg["repeats"]):
        if interleave:
            print(f"timing, repeat {rep + 1}/{cfg['repeats']}: one process per mode, steps interleaved")
            for mode in cfg["modes"]:
                t0 = time.perf_counter()
                res = launch((mode, "interleave"), ["time"], env_time)
                if res.get("status") != "ok":
                    for p in cfg["providers"]:
                        record((mode, p), res, "time")
                    continue
                for p, r in res["providers"].items():
                    record((mode, p), r, "time")
                    t = (r.get("time") or {}).get("median_ms")
                    print(f"  {mode}/{p}: {r.get('status')}{f', step {t:.1f} ms' if t else ''}")
                print(f"  ({time.perf_counter() - t0:.0f} s)")
            continue
        order = jobs if rep % 2 == 0 else [(m, p) for m in cfg["modes"] for p in reversed(cfg["providers"])]
        order = [j for j in order if runs.get(j, {}).get("status") not in ("skipped", "error")]
        tasks_for = first_tasks_for if rep == 0 else {p: ["time"] for p in cfg["providers"]}
        print(f"timing, repeat {rep + 1}/{cfg['repeats']}: {len(order)} process(es)")
        if parallel and cfg["quick"]:
            # a smoke run: all providers at once, one thread each (no oversubscribed thread pools)
            env_q = dict(env_time if env_time is not None else os.environ, OMP_NUM_THREADS="1")
            started = [(j, H.launch_isolated(script, argv_for(*j, tasks_for[j[1]]), env_q)) for j in order]
            for j, run in started:
                record(j, H.collect_isolated(run, timeout), "time")
        else:
            for j in order:
                t0 = time.perf_counter()
                res = launch(j, tasks_for[j[1]], env_time)
                record(j, res, "time")
                t = (res.get("time") or {}).get("median_ms")
                ms = (res.get("max_seq") or {}).get("max_seq")
                print(f"  {j[0]}/{j[1]}: {res.get('status')}{f', step {t:.1f} ms' if t else ''}"
                      f"{f', max seq {ms}' if ms else ''} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    if search and (split or interleave):
        env = H.worker_env(dev)
        for j in jobs:
            if j[1] in cfg["max_seq_providers"] and runs.get(j, {}).get("status") == "ok":
                t0 = time.perf_counter()
                res = launch(j, ["maxseq"], env)
                record(j, res, "maxseq")
                print(f"  max-seq {j[0]}/{j[1]}: {(res.get('max_seq') or {}).get('max_seq')} "
                      f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip

    rows = aggregate(cfg, runs)
    targets = evaluate_targets(cfg, rows)
    tol = LOSS_RTOL[cfg["dtype"]]
    for mode in cfg["modes"]:
        mrows = [r for r in rows if r["mode"] == mode and r["status"] == "ok"]
        ref_label = "peft+bitsandbytes" if mode == "qlora" else "peft"
        print(f"\n### {mode} ({cfg['dtype']}, {cfg['batch']} x {cfg['seq']} tokens; ratios vs {ref_label})\n")
        cols = [
            ("provider", "provider"),
            ("tokens_per_s", "tokens/s (median)"),
            ("tps_p20", "p20"),
            ("tps_p80", "p80"),
            ("median_ms", "step ms"),
            ("speedup", "speedup" + (" (paired)" if cfg.get("interleave") else "")),
            ("step_peak_mib", "step peak MiB"),
            ("mem_ratio", "step peak x ref"),
            ("total_peak_mib", "total peak MiB" + ("" if cuda else " (RSS)")),
            ("total_ratio", "total x ref"),
            ("loss_last", f"loss after {cfg['warmup'] + cfg['steps']} steps"),
            ("loss_rel_diff", "rel diff"),
            ("agree", f"agree ({tol:g})"),
        ]
        if search:
            cols += [("max_seq", "max seq"), ("max_seq_ratio", "max seq x ref")]
        print(H.markdown_table(mrows, cols))
        for r in mrows:
            if r["provider"] != REFERENCE and r.get("speedup_paired_median") is not None:
                print(f"  {r['provider']}: speedup step by step (interleaved): median "
                      f"{r['speedup_paired_median']:.3f}, p20 {r['speedup_paired_p20']:.3f}, "
                      f"p80 {r['speedup_paired_p80']:.3f}")  # fmt: skip
        if cfg["repeats"] > 1:
            for r in mrows:
                if r["provider"] != REFERENCE and r.get("speedup_repeats"):
                    per = ", ".join(f"{x:.3f}" for x in r["speedup_repeats"])
                    print(f"  {r['provider']}: speedup per repeat {per}")
        for r in rows:
            if r["mode"] == mode and r["status"] != "ok":
                print(f"  ({r['provider']}: {r['status']}: {r.get('reason') or ''})")
        for r in mrows:
            if r.get("max_seq_capped"):
                print(f"  ({r['provider']}: every length up to the cap {cfg['max_seq_cap']} fits: a lower bound)")
    if search:
        print(f"\nmax seq: batch 1, budget {cfg['budget_gb']:g} GiB ({'allocator' if cuda else 'peak RSS'})")
    if not cuda:
        print(
            "\nstep peak = peak RSS of one training step above the process's RSS before it (model, optimizer "
            "state and batch excluded); total = the process's peak RSS (libraries and weights included)"
        )
    print()
    print(H.markdown_table(targets, ["target", "value", "op", "limit", "met", "note"]))
    H.finish(args, "e2e", {"config": cfg, "results": rows, "targets": targets}, device=dev, quick=cfg["quick"],
             t_start=t_start)  # fmt: skip
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
