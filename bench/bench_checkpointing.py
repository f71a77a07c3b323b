#!/usr/bin/env python
"""Benchmark: activation memory and step time of ``fastft.patch(model, checkpointing=...)``.

One training step (forward + backward, full fine-tune, fastft's fused loss on) of a
randomly initialised Llama-style model (``LlamaForCausalLM`` from a config, SDPA attention),
for each checkpointing mode, each in its own fresh process:

* ``none``: ``fastft.patch(model)`` (no checkpointing);
* ``recompute``: ``fastft.patch(model, checkpointing="recompute")``;
* ``offload``: ``fastft.patch(model, checkpointing="offload")`` (CUDA only: on CPU it is recompute).

Measured per mode:

* activation memory: what the forward leaves held for the backward (memory after the
  forward minus before it; CUDA ``memory_allocated``, CPU ``VmRSS`` with large blocks
  mmap-ed so freed memory leaves the RSS) - the number the targets are stated for;
* peak of the whole step above the memory held before it (``_harness.measure_peak_memory``);
* step time (median, p20, p80 ms) after the memory measurement, in the same process.

The ``.grad`` buffers exist before every measurement (a tiny priming step), so they are not
counted. Targets (reported, never asserted): CPU recompute activation memory <= 0.5x none;
GPU offload activation memory <= 0.3x none at <= 1.25x none's step time.

    python bench/bench_checkpointing.py --quick     # seconds (mostly imports): 2 layers, 256 tokens
    python bench/bench_checkpointing.py             # CPU: 8 layers, hidden 256, 2048 tokens, fp32
    python bench/bench_checkpointing.py --device cuda   # GPU: 8 layers, hidden 2048, 2048 tokens, bf16
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import _harness as H

MODES = ("none", "recompute", "offload")
DEFAULTS = {
    "cpu": dict(layers=8, hidden=256, intermediate=704, heads=4, tokens=2048, vocab=8192, dtype="fp32"),
    "cuda": dict(layers=8, hidden=2048, intermediate=5632, heads=16, tokens=2048, vocab=32000, dtype="bf16"),
}
RUNS = {"cpu": dict(reps=3, warmup=1), "cuda": dict(reps=10, warmup=3)}
QUICK = dict(layers=2, hidden=64, intermediate=176, heads=4, tokens=256, vocab=512, reps=1, warmup=1)
SHAPE_KEYS = ("layers", "hidden", "intermediate", "heads", "tokens", "vocab", "dtype")
# (label, mode, metric, limit): metric "act" / "time" = mode / none
TARGETS = {
    "cpu": [("recompute activation memory <= 0.5x none", "recompute", "act", 0.5)],
    "cuda": [
        ("offload activation memory <= 0.3x none", "offload", "act", 0.3),
        ("offload step time <= 1.25x none", "offload", "time", 1.25),
    ],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, help="decoder layers; default 8")
    p.add_argument("--hidden", type=int, help="hidden size; default CPU 256, CUDA 2048")
    p.add_argument("--intermediate", type=int, help="MLP size; default CPU 704, CUDA 5632")
    p.add_argument("--heads", type=int, help="attention heads (= KV heads); default CPU 4, CUDA 16")
    p.add_argument("--tokens", type=int, help="sequence length (batch 1); default 2048")
    p.add_argument("--vocab", type=int, help="vocabulary; default CPU 8192, CUDA 32000")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="model dtype; default CPU fp32, CUDA bf16")
    p.add_argument("--modes", default=None, help="comma-separated subset of none,recompute,offload")
    H.add_run_args(p, RUNS, unit="steps")
    p.add_argument("--quick", action="store_true", help="2 layers, hidden 64, 256 tokens, 1 rep: seconds")
    H.add_common_args(p, "checkpointing")
    p.add_argument("--_worker", dest="worker", choices=MODES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict:
    device = H.resolve_device(args.device)
    base = dict(DEFAULTS[device], **RUNS[device])
    if args.quick:
        base.update(QUICK)
    cfg = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in base.items()}
    cfg.update(device=device, quick=args.quick, seed=args.seed)
    cfg["at_target_shape"] = all(cfg[k] == DEFAULTS[device][k] for k in SHAPE_KEYS)
    default_modes = ("none", "recompute", "offload") if device == "cuda" else ("none", "recompute")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else list(default_modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SystemExit(f"--modes: unknown {bad}; choose from {MODES}")
    if "none" not in modes:
        modes.insert(0, "none")  # the reference of every ratio
    cfg["modes"] = list(dict.fromkeys(modes))
    return cfg


# --------------------------------------------------------------------------------------
# worker (one mode, fresh process)
# --------------------------------------------------------------------------------------
def build_model(cfg: dict):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = H.torch_dtype(cfg["dtype"])
    config = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"],
        max_position_embeddings=max(cfg["tokens"], 16),
        use_cache=False,
    )
    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(cfg["device"]).train()


def make_batch(cfg: dict, tokens: int):
    import torch

    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    ids = torch.randint(0, cfg["vocab"], (1, tokens), generator=g).to(cfg["device"])
    return {"input_ids": ids, "labels": ids.clone()}


def _held_bytes(dev: str) -> int:
    if dev.startswith("cuda"):
        import torch

        return torch.cuda.memory_allocated()
    return (H._proc_status_kb("VmRSS") or 0) * 1024


def worker_main(args: argparse.Namespace) -> None:
    import torch

    import fastft

    cfg = resolve(args)
    mode, dev = args.worker, cfg["device"]
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    model = build_model(cfg)
    report = fastft.patch(model, checkpointing=None if mode == "none" else mode)
    batch, small = make_batch(cfg, cfg["tokens"]), make_batch(cfg, 16)

    def step(b):
        model(**b).loss.backward()
        model.zero_grad(set_to_none=False)  # the .grad buffers stay: never counted

    # CPU primes with a tiny step only (see _harness.measure_peak_memory); CUDA with a full one
    step(batch if dev.startswith("cuda") else small)
    sync()
    gc.collect()

    # activation memory: held after the forward, before the backward
    before = _held_bytes(dev)
    loss = model(**batch).loss
    sync()
    act = (_held_bytes(dev) - before) / 2**20
    loss.backward()
    model.zero_grad(set_to_none=False)
    del loss
    sync()
    gc.collect()

    peak = H.measure_peak_memory(lambda: step(batch), dev, prime=None)
    timing = H.time_fn(lambda: step(batch), cfg["warmup"], cfg["reps"], device=dev)
    calls = sum(getattr(m.forward, "checkpointed_calls", 0) for m in model.model.layers)
    offloaded = None
    if mode == "offload":
        offloaded = getattr(model.model.layers[0].forward.offloader, "offloaded", None)
    H.emit_worker_result(
        {
            "status": "ok",
            "mode": mode,
            "act_mib": act,
            "peak_mib": peak["peak_mib"],
            "peak_method": peak["method"],
            "time": timing,
            "checkpointed_calls": calls,
            "offloaded_tensors": offloaded,
            "report_skipped": [f"{s.feature}: {s.target}: {s.reason}" for s in report.skipped],
        }
    )


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def evaluate_targets(cfg: dict, rows: dict) -> list[dict]:
    out = []
    none = rows.get("none", {})
    for label, mode, metric, limit in TARGETS[cfg["device"]]:
        r = rows.get(mode, {})
        value = r.get("act_ratio") if metric == "act" else r.get("time_ratio")
        met = None if value is None or none.get("status") != "ok" else value <= limit
        out.append(dict(target=label, value=value, limit=limit, met=met, at_target_shape=cfg["at_target_shape"]))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    import torch

    cfg = resolve(args)
    dev = cfg["device"]
    script = os.path.abspath(__file__)
    raw_args = list(sys.argv[1:] if argv is None else argv)
    env = H.worker_env(dev)  # CPU: large blocks mmap-ed, so freed memory leaves the RSS
    t0 = time.perf_counter()
    print(
        f"checkpointing bench: Llama-style, {cfg['layers']} layers, hidden {cfg['hidden']}, MLP {cfg['intermediate']}, "
        f"{cfg['heads']} heads, vocab {cfg['vocab']}, {cfg['tokens']} tokens (batch 1), {cfg['dtype']}, SDPA, "
        f"full fine-tune + fused loss; device={dev} ({H.device_name(dev)}) threads={torch.get_num_threads()} "
        f"reps={cfg['reps']} warmup={cfg['warmup']}{' [quick]' if cfg['quick'] else ''}"
    )

    rows: dict[str, dict] = {}
    for mode in cfg["modes"]:  # one after another: the timings must not compete for the cores
        res = H.run_isolated(script, raw_args + ["--_worker", mode], env=env, timeout=1800)
        res.setdefault("mode", mode)
        rows[mode] = res
        if res.get("status") != "ok":
            print(f"  {mode}: failed: {res.get('reason')}")
    none = rows.get("none", {})
    table = []
    for mode in cfg["modes"]:
        r = rows[mode]
        if r.get("status") != "ok":
            table.append(dict(mode=mode, note="failed"))
            continue
        t = r["time"]
        if none.get("status") == "ok":
            r["act_ratio"] = r["act_mib"] / none["act_mib"] if none["act_mib"] > 0 else None
            r["peak_ratio"] = r["peak_mib"] / none["peak_mib"] if none["peak_mib"] else None
            r["time_ratio"] = t["median_ms"] / none["time"]["median_ms"]
        note = ""
        if mode == "offload" and not dev.startswith("cuda"):
            note = "CPU: same as recompute"
        table.append(
            dict(
                mode=mode,
                act_mib=r["act_mib"],
                act_ratio=r.get("act_ratio"),
                peak_mib=r["peak_mib"],
                peak_ratio=r.get("peak_ratio"),
                median_ms=t["median_ms"],
                p20_ms=t["p20_ms"],
                p80_ms=t["p80_ms"],
                time_ratio=r.get("time_ratio"),
                note=note,
            )
        )
    print()
    print(
        H.markdown_table(
            table,
            [
                "mode",
                ("act_mib", "activation MiB"),
                ("act_ratio", "act / none"),
                ("peak_mib", "step peak MiB"),
                ("peak_ratio", "peak / none"),
                ("median_ms", "step ms (median)"),
                ("p20_ms", "p20"),
                ("p80_ms", "p80"),
                ("time_ratio", "time / none"),
                "note",
            ],
        )
    )
    targets = evaluate_targets(cfg, rows)
    print()
    tgt_rows = [dict(t, met="met" if t["met"] else ("not met" if t["met"] is False else "n/a")) for t in targets]
    print(H.markdown_table(tgt_rows, [("target", "target"), ("value", "value"), ("limit", "limit"), ("met", "status")]))
    if not cfg["at_target_shape"]:
        print("(not the shape the targets are stated for: indicative only)")
    elapsed = time.perf_counter() - t0
    print(f"\n{elapsed:.1f} s")
    if not args.no_write:
        name = args.out or ("checkpointing-quick" if args.quick else "checkpointing")
        folder = H.SCRATCH_RESULTS_DIR if args.quick and not args.out else None
        path = H.write_result(
            name, dict(config=cfg, rows=rows, table=table, targets=targets, elapsed_s=elapsed), device=dev,
            results_dir=folder,
        )  # fmt: skip
        print(f"wrote {os.path.relpath(path, H.REPO_ROOT)}")
    return 0 if all(r.get("status") == "ok" for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
