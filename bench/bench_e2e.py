#!/usr/bin/env python
"""Benchmark: an end-to-end LoRA / QLoRA / MoE-LoRA training step, fastft vs PEFT (and compiled).

Every provider trains the same randomly initialised model (seeded, SDPA attention): in modes
``lora`` / ``qlora`` a ``LlamaForCausalLM`` (``transformers.LlamaConfig``), in mode ``moe`` a
Qwen3-MoE-like ``Qwen3MoeForCausalLM`` (8 experts, top-2 on the CPU) - with the same LoRA adapters
(r 16, alpha 32, dropout 0, every linear layer but the LM head, and in mode ``moe`` the experts' 3-D
weights through PEFT's ``target_parameters``, as fastft's trainer does; the same seeded init), on
the same batches (seeded random token ids, ~5% of the labels -100), with the same optimizer (AdamW,
lr 1e-3, no weight decay), for ``warmup + steps`` steps of forward + loss + backward +
``optimizer.step()`` + ``zero_grad``. Providers (``--providers``):

* ``peft`` - the reference: PEFT's eager model and transformers' loss (mode ``qlora``: PEFT over
  bitsandbytes NF4 ``Linear4bit`` layers, double-quantised, blocksize 64, replaced by hand);
* ``fastft`` - the same PEFT model + ``fastft.patch(model)`` (default features); mode ``qlora``:
  ``fastft.quantize(model)`` (bitsandbytes' bytes) + PEFT + ``fastft.patch``;
* ``fastft+ckpt`` - the same with ``checkpointing="recompute"`` (fastft's memory lever);
* ``peft+ckpt`` - the reference with transformers' ``gradient_checkpointing_enable`` (non-reentrant);
* ``peft+compile`` (old name ``compile``), ``fastft+compile``, ``liger+compile`` - that provider's
  model wrapped in ``torch.compile`` (inductor, ``--compile-mode``; the optimizer step stays eager);
  ``--compile [MODE]`` adds eager fastft, compiled fastft and compiled PEFT (CUDA: and Liger, eager
  and compiled) to the run. Reported apart from the steady steps: the compile time (first call
  minus a steady step, cold inductor cache), graph breaks and graphs compiled (``torch._dynamo``'s
  counters), and the tokens/s ratios compiled fastft / compiled PEFT and / eager fastft;
* ``liger`` - the reference + ``liger_kernel``'s ``_apply_liger_kernel_to_instance`` (CUDA, when importable).

Measured per provider, each in a fresh process (one after the other): tokens/s (median step,
p20 / p80), the peak memory of one training step above what the process holds before it
(model, optimizer, batch: CPU ``VmHWM - VmRSS`` in a process with large blocks mmap-ed, CUDA
``max_memory_allocated - memory_allocated``) and the process's total peak (CPU peak RSS,
CUDA ``max_memory_allocated``), the loss of every step and whether the last one agrees with
PEFT's, and optionally (``--max-seq-search``, on by default on CUDA) the longest sequence
(batch 1, doubling then bisecting to ~5%) whose training step fits in ``--budget-gb``. A provider
that fails (a compile error included) is recorded with its error; the others still run.

    python bench/bench_e2e.py --quick                 # seconds: tiny models, 2 steps (smoke only)
    python bench/bench_e2e.py                         # CPU: ~58M Llama LoRA + ~50M MoE LoRA, 1 x 512 tokens, fp32
    python bench/bench_e2e.py --modes lora --compile  # CPU: eager fastft vs compiled fastft vs compiled PEFT
    python bench/bench_e2e.py --device cuda           # GPU: ~1B params, 4 x 2048 tokens, bf16, LoRA + QLoRA
    python bench/bench_e2e.py --device cuda --modes lora --compile max-autotune-no-cudagraphs

The cases (shapes, providers, models, the step) are in ``_e2e_cases.py``, the worker processes in
``_e2e_worker.py``, the rows, targets and tables in ``_e2e_report.py``; the timing and memory
primitives in ``_harness.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import _harness as H

# the checkout's fastft, not whichever one is installed: `python bench/bench_e2e.py` puts bench/ first
# on sys.path, not the checkout (the fastft bench suite sets PYTHONPATH the same way)
if H.REPO_ROOT not in sys.path:
    sys.path.insert(1, H.REPO_ROOT)

import _e2e_cases as C  # noqa: E402
import _e2e_report as R  # noqa: E402
import _e2e_worker as W  # noqa: E402
from _e2e_cases import (  # noqa: E402, F401  (re-exported: bench_dpo.py builds the same Llama)
    DEFAULTS,
    MODES,
    PROVIDERS,
    REFERENCE,
    count_moe_params,
    count_params,
    llama_config,
    moe_config,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, help="hidden size; default CPU 512, CUDA 2048")
    p.add_argument("--layers", type=int, help="decoder layers; default CPU 8, CUDA 16")
    p.add_argument("--intermediate", type=int, help="MLP size; default CPU 1408, CUDA 5632")
    p.add_argument("--heads", type=int, help="attention heads; default CPU 8, CUDA 32")
    p.add_argument("--kv-heads", type=int, help="key/value heads; default CPU 8, CUDA 8")
    p.add_argument("--vocab", type=int, help="vocabulary; default CPU 32000, CUDA 128256")
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None, help="tie embeddings and head")
    p.add_argument("--moe-layers", type=int, help="mode moe: decoder layers; default CPU 4, CUDA 8")
    p.add_argument("--experts", type=int, help="mode moe: experts per layer; default CPU 8, CUDA 16")
    p.add_argument("--top-k", type=int, help="mode moe: experts per token; default CPU 2, CUDA 4")
    p.add_argument("--moe-intermediate", type=int, help="mode moe: expert MLP size; default CPU 256, CUDA 1024")
    p.add_argument("--seq", type=int, help="sequence length; default CPU 512, CUDA 2048")
    p.add_argument("--batch", type=int, help="sequences per step; default CPU 1, CUDA 4")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="model dtype; default CPU fp32, CUDA bf16")
    p.add_argument("--steps", type=int, help="timed training steps; default CPU 8, CUDA 10")
    p.add_argument("--warmup", type=int, help="untimed steps first (part of the loss trajectory); CPU 2, CUDA 3")
    p.add_argument("--modes", help="comma-separated subset of lora,qlora,moe; default CPU lora,moe, CUDA lora,qlora")
    p.add_argument(
        "--providers", help=f"comma-separated subset of {','.join(PROVIDERS)}; default CPU "
        f"{DEFAULTS['cpu']['providers']}, CUDA {DEFAULTS['cuda']['providers']} (peft is always added)",
    )  # fmt: skip
    p.add_argument(
        "--compile", nargs="?", const="default", choices=C.COMPILE_MODES, metavar="MODE",
        help="add eager fastft, compiled fastft and compiled PEFT (CUDA: and Liger, eager and compiled) to the "
        f"providers; MODE is torch.compile's mode ({', '.join(C.COMPILE_MODES)}; default: default); without "
        "this flag a +compile provider compiles with mode default",
    )  # fmt: skip
    p.add_argument("--compile-backend", choices=("inductor", "aot_eager", "eager"), default="inductor",
                   help="torch.compile backend of the +compile providers (default inductor; aot_eager / eager "
                   "trace without code generation: a quick check of the compiled path)")  # fmt: skip
    p.add_argument("--compile-moe", action="store_true", help="also compile the providers of mode moe (skipped by "
                   "default: graph breaks and recompiles in the routing make it minutes per step)")  # fmt: skip
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
    for opt, names, valid in (("--modes", C.csv(args.modes), MODES), ("--providers", C.providers_of(args.providers),
                                                                         PROVIDERS)):  # fmt: skip
        bad = [n for n in names if n not in valid]
        if bad:
            p.error(f"{opt}: unknown {bad}; choose from {','.join(valid)}")
    bad = [n for n in C.providers_of(args.max_seq_providers) if n not in PROVIDERS]
    if bad:
        p.error(f"--max-seq-providers: unknown {bad}; choose from {','.join(PROVIDERS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker == "interleave":
        W.interleave_main(args)
        return 0
    if args.worker:
        W.worker_main(args)
        return 0
    # one fresh inductor cache for the run's workers (a compiled model's first process compiles it cold)
    cache = None if os.environ.get(W.INDUCTOR_CACHE_ENV) else W.fresh_inductor_cache(C.resolve(args))
    if cache:
        os.environ[W.INDUCTOR_CACHE_ENV] = cache
    try:
        return drive(args, argv)
    finally:
        if cache:
            del os.environ[W.INDUCTOR_CACHE_ENV]
            shutil.rmtree(cache, ignore_errors=True)


def drive(args: argparse.Namespace, argv) -> int:
    """The driver: the worker processes of every (mode, provider), then the rows, targets and JSON."""
    import torch

    t_start = time.perf_counter()
    script = os.path.abspath(__file__)
    raw_args = list(sys.argv[1:] if argv is None else argv)
    cfg = C.resolve(args)
    dev = cfg["device"]
    cuda = dev.startswith("cuda")
    parallel = H.mem_parallel(args)
    cfg["params"] = count_params(cfg)
    moe_total, moe_active = count_moe_params(cfg)
    cfg["params_by_mode"] = dict(lora=cfg["params"], qlora=cfg["params"], moe=moe_total, moe_active=moe_active)
    cfg["torch_threads"] = torch.get_num_threads()
    import fastft

    cfg["fastft_path"] = os.path.dirname(os.path.abspath(fastft.__file__))  # the library measured
    models = []
    if set(cfg["modes"]) & {"lora", "qlora"}:
        models.append(
            f"Llama-style {cfg['params'] / 1e6:.1f}M params (hidden {cfg['hidden']}, {cfg['layers']} layers, "
            f"MLP {cfg['intermediate']}, {cfg['heads']}/{cfg['kv_heads']} heads, vocab {cfg['vocab']}"
            f"{', tied' if cfg['tie'] else ''})"
        )
    if "moe" in cfg["modes"]:
        models.append(
            f"Qwen3-MoE-like {moe_total / 1e6:.1f}M params ({moe_active / 1e6:.1f}M active; {cfg['moe_layers']} "
            f"layers, {cfg['experts']} experts top-{cfg['top_k']}, expert MLP {cfg['moe_intermediate']})"
        )
    print(
        f"e2e bench: {' and '.join(models)}, {cfg['batch']} x {cfg['seq']} tokens, {cfg['dtype']}, SDPA; "
        f"LoRA r {cfg['lora_r']} alpha {cfg['lora_alpha']} all linear, AdamW lr {cfg['lr']}; "
        f"{cfg['warmup']} + {cfg['steps']} steps x {cfg['repeats']} repeat(s); device={dev} ({H.device_name(dev)}) "
        f"threads={cfg['torch_threads']}{' [quick]' if cfg['quick'] else ''}"
    )
    if any(p in C.COMPILED for p in cfg["providers"]):
        print(f"torch.compile mode: {cfg['compile_mode']} (inductor)")
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
                if res.get("traceback"):
                    r["traceback"] = res["traceback"]
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
        if "compile" in res:
            r.setdefault("compile_runs", []).append(res["compile"])
            r["compile_mode"] = res.get("compile_mode")

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

    rows = R.aggregate(cfg, runs)
    targets = R.evaluate_targets(cfg, rows)
    R.print_report(cfg, rows, targets)
    H.finish(args, "e2e", {"config": cfg, "results": rows, "targets": targets}, device=dev, quick=cfg["quick"],
             t_start=t_start)  # fmt: skip
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
