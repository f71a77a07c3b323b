#!/usr/bin/env python
"""Benchmark: fastft's NF4 ops against bitsandbytes (and the dense 16-bit layer), in one run.

Three sections (``--sections``, default all), every weight NF4 with blocksize 64 and double
quantisation (bitsandbytes' ``Linear4bit`` default, ``compress_statistics=True``):

* ``dequant``: a ``[rows, cols]`` weight (default 4096 x 4096) back to bf16:
  ``fastft.ops.dequantize_nf4`` (auto backend, and the pure-PyTorch ``torch`` reference) vs
  ``bitsandbytes.functional.dequantize_4bit`` on the same packed bytes (fastft's
  ``quantize_nf4``, the state converted with ``NF4State.to_bnb()``). ms and GB/s (bytes read,
  packed weight and statistics, plus bytes written).
* ``matmul``: ``y = x W^T`` with ``W [N, K]`` NF4 (default K = N = 4096), x ``[batch, K]`` in bf16
  and fp32, batch 1 and 16, forward only: ``fastft.ops.nf4_matmul`` vs
  ``bitsandbytes.matmul_4bit(x, packed.t(), quant_state)`` (the layout bnb's ``Linear4bit``
  uses) vs the dense GEMM ``F.linear(x, W)`` with the dequantised weight in x's dtype.
* ``qlora``: one LoRA layer over a 4-bit base, forward + backward (``y.backward(dy)``), base
  frozen, ``x`` requiring grad, adapters trainable: ``fastft.ops.lora_linear(x, packed, A, B, s,
  quant_state=state)`` vs PEFT's LoRA over a bitsandbytes ``Linear4bit`` (``get_peft_model``,
  train mode) vs fastft's ``lora_linear`` over the dense (dequantised) weight: the "16-bit LoRA
  layer" the GPU target compares to. Time, and activation / peak memory in fresh processes.

bitsandbytes rows are skipped, with the reason, when it cannot be imported or run here.
Targets are printed with met / not met, never asserted.

    python bench/bench_nf4.py --quick          # tiny shapes, seconds (mostly imports), any machine
    python bench/bench_nf4.py                  # CPU: 4096^2 dequant / matmul, QLoRA 2048 tokens 1024->1024 fp32
    python bench/bench_nf4.py --device cuda    # GPU: 4096^2 dequant / matmul, QLoRA 8192 tokens 4096->4096 bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from functools import partial

import _harness as H
from _nf4_common import (
    QLORA_PROVIDERS,
    TOLERANCE,
    Skip,
    _backend,
    _copies,
    _gen,
    _probe_bnb,
    _randn,
    _state_bytes,
    _time,
    bnb_modules,
    bnb_version,
)
from _nf4_qlora import measure_qlora, run_qlora

SECTIONS = ("dequant", "matmul", "qlora")
GEMV_MAX_M = 8  # fastft.ops.nf4.GEMV_MAX_M: up to this batch, CUDA also times both GEMVs

# per device: the shapes the targets are stated for
DEFAULTS = {
    "cpu": dict(
        dq_shape=[4096, 4096],
        mm_k=4096,
        mm_n=4096,
        batch=[1, 16],
        x_dtypes=["bf16", "fp32"],
        tokens=2048,
        features=[1024, 1024],
        rank=16,
        dtype="fp32",
    ),
    "cuda": dict(
        dq_shape=[4096, 4096],
        mm_k=4096,
        mm_n=4096,
        batch=[1, 16],
        x_dtypes=["bf16", "fp32"],
        tokens=8192,
        features=[4096, 4096],
        rank=16,
        dtype="bf16",
    ),
}
# inner: calls per timed repetition (CUDA: a dequant / GEMV is tens of microseconds, so one
# repetition runs it `inner` times between two synchronisations and reports the mean per call)
RUNS = {"cpu": dict(reps=3, warmup=1, inner=1), "cuda": dict(reps=20, warmup=5, inner=20)}
QUICK = dict(dq_shape=[256, 512], mm_k=512, mm_n=384, tokens=128, features=[128, 192], rank=8, reps=2, warmup=1)
TARGET_KEYS = {
    "dequant": ("dq_shape",),
    "matmul": ("mm_k", "mm_n"),
    "qlora": ("tokens", "features", "rank", "dtype"),
}

# memory bandwidth assumed for the GPU dequant target (GB/s), by a substring of the device name
BANDWIDTH_GBS = (
    ("H200", 4800.0, "H200 (HBM3e, 4.8 TB/s)"),
    ("H100", 3350.0, "H100 SXM (HBM3, 3.35 TB/s; an H100 PCIe has ~2.0 TB/s)"),
)


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    return [int(v) for v in s.replace(",", " ").replace("x", " ").split()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    H.add_run_args(p, RUNS)
    p.add_argument(
        "--inner",
        type=int,
        help="dequant / matmul calls per timed repetition (mean per call reported); default CPU 1, CUDA 20",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, reps 2: a few seconds (mostly imports)")
    p.add_argument("--dq-shape", type=_ints, help="dequant weight rows,cols; default 4096,4096")
    p.add_argument("--mm-k", type=int, help="matmul K (in features); default 4096")
    p.add_argument("--mm-n", type=int, help="matmul N (out features); default 4096")
    p.add_argument("--batch", type=_ints, help="matmul batch sizes; default 1,16")
    p.add_argument("--x-dtypes", help="matmul x dtypes, comma-separated from bf16,fp32; default bf16,fp32")
    p.add_argument("--tokens", type=int, help="QLoRA tokens; default CPU 2048, CUDA 8192")
    p.add_argument("--features", type=_ints, help="QLoRA in,out; default CPU 1024,1024, CUDA 4096,4096")
    p.add_argument("--rank", type=int, help="QLoRA rank; default 16 (alpha = 2 * rank)")
    p.add_argument("--dropout", type=float, default=0.0, help="QLoRA LoRA dropout (default 0)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="QLoRA x / base dtype; default CPU fp32, CUDA bf16")
    p.add_argument(
        "--adapter-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="A and B dtype (default fp32: what get_peft_model gives over a 16-bit / 4-bit base)",
    )
    p.add_argument("--blocksize", type=int, default=64, help="NF4 blocksize (default 64)")
    p.add_argument(
        "--double-quant", action=argparse.BooleanOptionalAction, default=True, help="quantise the absmax (default on)"
    )
    p.add_argument("--fastft-backend", default="auto", help="backend= for the fastft ops (auto, cpp, triton, torch)")
    p.add_argument(
        "--rotate-mib",
        type=float,
        help="cycle through copies of each weight totalling this many MiB, so repeated calls do not "
        "read it from cache; default CUDA 256 (H100 L2 is 50 MiB), CPU 0 (one copy)",
    )
    p.add_argument(
        "--bandwidth-gbs", type=float, help="GPU memory bandwidth for the dequant target (default: from the name)"
    )
    H.add_common_args(p, "nf4", memory="QLoRA memory", mem_processes="QLoRA memory processes")
    p.add_argument("--_mem-worker", dest="mem_worker", choices=QLORA_PROVIDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [n for n in names if n not in SECTIONS]
    if bad or not names:
        p.error(f"--sections: unknown {bad}; choose from {SECTIONS}")
    args.section_list = [s for s in SECTIONS if s in names]
    if args.x_dtypes is not None:
        args.x_dtypes = [s.strip() for s in args.x_dtypes.split(",") if s.strip()]
        if not args.x_dtypes or any(d not in ("bf16", "fp32") for d in args.x_dtypes):
            p.error("--x-dtypes: choose from bf16,fp32")
    if args.dq_shape is not None and len(args.dq_shape) != 2:
        p.error("--dq-shape: give rows,cols")
    if args.features is not None and len(args.features) != 2:
        p.error("--features: give in,out")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout: {args.dropout} is not in [0, 1)")
    return args


def resolve(args: argparse.Namespace) -> dict:
    """Fill the defaults that depend on the device. Deterministic: the worker processes redo it."""
    device = H.resolve_device(args.device)
    base = dict(DEFAULTS[device], **RUNS[device])
    if args.quick:
        base.update(QUICK)
    cfg = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in base.items()}
    cfg.update(
        device=device,
        quick=args.quick,
        seed=args.seed,
        sections=args.section_list,
        dropout=args.dropout,
        adapter_dtype=args.adapter_dtype,
        blocksize=args.blocksize,
        double_quant=args.double_quant,
        fastft_backend=args.fastft_backend,
    )
    rot = args.rotate_mib if args.rotate_mib is not None else (256.0 if device == "cuda" else 0.0)
    cfg["rotate_mib"] = rot
    target = DEFAULTS[device]
    cfg["at_target_shape"] = {s: all(cfg[k] == target[k] for k in TARGET_KEYS[s]) for s in SECTIONS}
    return cfg


# --------------------------------------------------------------------------------------
# 1. dequant
# --------------------------------------------------------------------------------------
def run_dequant(cfg: dict, dev: str) -> tuple[list[dict], dict]:
    import torch

    from fastft.ops import dequantize_nf4, quantize_nf4

    rows_, cols = cfg["dq_shape"]
    g = _gen(cfg["seed"])
    w = _randn(g, rows_, cols, scale=cols**-0.5, dtype=torch.bfloat16, device=dev)
    packed, state = quantize_nf4(w, blocksize=cfg["blocksize"], double_quant=cfg["double_quant"])
    del w
    read = _state_bytes(packed, state)
    written = rows_ * cols * 2  # bf16
    copies = _copies(cfg, packed.numel())
    packs = [packed] + [packed.clone() for _ in range(copies - 1)]
    info = dict(
        shape=[rows_, cols],
        bytes_read=read,
        bytes_written=written,
        copies=copies,
        note="bytes = packed codes + absmax statistics read, bf16 weight written",
    )
    ref = dequantize_nf4(packed, state, dtype=torch.bfloat16, backend="torch")
    auto = cfg["fastft_backend"]
    providers = [("fastft", auto), ("fastft", "torch")] if auto != "torch" else [("fastft", "torch")]
    providers.append(("bitsandbytes", None))
    rows = []
    for name, be in providers:
        row = {"section": "dequant", "provider": name}
        rows.append(row)
        try:
            if name == "fastft":
                row["backend"] = _backend("dequantize_nf4", dev, be)
                calls = [partial(dequantize_nf4, p, state, dtype=torch.bfloat16, backend=be) for p in packs]
            else:
                _probe_bnb(dev, torch.bfloat16)
                bnbF = bnb_modules()[1]
                qs = state.to_bnb()
                row["backend"] = f"bitsandbytes {bnb_version()}"
                calls = [partial(bnbF.dequantize_4bit, p, qs) for p in packs]
            out = calls[0]()
            row["max_abs_diff_vs_torch"] = H.max_abs_diff(out, ref)
            row["out_dtype"] = str(out.dtype).replace("torch.", "")
            del out
        except Skip as exc:
            row.update(status="skipped", reason=str(exc))
            print(f"  dequant: skipping {name}: {exc}")
            continue
        t = _time(calls, cfg, dev)
        row.update(status="ok", time=t, median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"])
        row["gb_s"] = (read + written) / (t["median_ms"] * 1e-3) / 1e9
        row["label"] = f"{name} ({row['backend']})" if name == "fastft" else name
        H.free_memory(dev)
    bnb_ms = next((r.get("median_ms") for r in rows if r["provider"] == "bitsandbytes"), None)
    for r in rows:
        r["speedup_vs_bnb"] = H.ratio(bnb_ms, r.get("median_ms"))
    del packs, packed, state, ref
    H.free_memory(dev)
    return rows, info


# --------------------------------------------------------------------------------------
# 2. matmul
# --------------------------------------------------------------------------------------
def run_matmul(cfg: dict, dev: str) -> tuple[list[dict], dict]:
    import torch
    import torch.nn.functional as F

    from fastft.ops import dequantize_nf4, nf4_matmul, quantize_nf4

    K, N = cfg["mm_k"], cfg["mm_n"]
    g = _gen(cfg["seed"] + 1)
    w = _randn(g, N, K, scale=K**-0.5, dtype=torch.float32, device=dev)
    packed, state32 = quantize_nf4(w, blocksize=cfg["blocksize"], double_quant=cfg["double_quant"])
    del w
    nf4_bytes = _state_bytes(packed, state32)
    copies = _copies(cfg, packed.numel())
    packs = [packed] + [packed.clone() for _ in range(copies - 1)]
    info = dict(K=K, N=N, nf4_weight_bytes=nf4_bytes, nf4_copies=copies, forward_only=True)
    be = cfg["fastft_backend"]
    rows = []
    for dname in cfg["x_dtypes"]:
        dt = H.torch_dtype(dname)
        state = dataclasses.replace(state32, dtype=dt)  # bnb dequantises to quant_state.dtype
        dense = dequantize_nf4(packed, state, dtype=dt, backend="torch")
        dense_bytes = dense.numel() * dense.element_size()
        dcopies = _copies(cfg, dense_bytes)
        denses = [dense] + [dense.clone() for _ in range(dcopies - 1)]
        for batch in cfg["batch"]:
            x = _randn(g, batch, K, scale=1.0, dtype=dt, device=dev)
            ref = F.linear(x.float(), dense.float())
            group = {}
            timed = {}
            providers = ["fastft", "bitsandbytes", "dense"]
            if dev.startswith("cuda") and batch <= GEMV_MAX_M:
                # the GEMV policy (fastft.ops.nf4.GEMV_POLICY) is decided from these two rows
                providers[1:1] = ["fastft-triton", "fastft-cuda"]
            for name in providers:
                row = {"section": "matmul", "x_dtype": dname, "batch": batch, "provider": name}
                rows.append(row)
                group[name] = row
                try:
                    if name.startswith("fastft"):
                        want = be if name == "fastft" else name.split("-", 1)[1]
                        row["backend"] = _backend("nf4_matmul", dev, want)
                        calls = [partial(nf4_matmul, x, p, state, backend=want) for p in packs]
                        wbytes = nf4_bytes
                    elif name == "bitsandbytes":
                        _probe_bnb(dev, dt)
                        bnb = bnb_modules()[0]
                        qs = state.to_bnb()
                        row["backend"] = f"bitsandbytes {bnb_version()}"
                        calls = [partial(bnb.matmul_4bit, x, p.t(), qs) for p in packs]
                        wbytes = nf4_bytes
                    else:
                        row["backend"] = f"F.linear, {dname} weight"
                        calls = [partial(F.linear, x, d) for d in denses]
                        wbytes = dense_bytes
                    with torch.no_grad():
                        y = calls[0]()
                        row["rel_err_vs_fp32"] = H.rel_err(y, ref)
                        del y
                except Skip as exc:
                    row.update(status="skipped", reason=str(exc))
                    continue
                timed[name] = (calls, wbytes)
            # all providers of this shape timed interleaved (a loaded CPU slows them alike)
            cyc = {n: itertools.cycle(c) for n, (c, _) in timed.items()}
            fns = {n: (lambda it=it: next(it)()) for n, it in cyc.items()}
            with torch.no_grad():
                ts = H.time_interleaved(fns, cfg["warmup"], cfg["reps"], device=dev, inner=cfg["inner"])
            for name, t in ts.items():
                row = group[name]
                row.update(status="ok", time=t, median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"])
                row["weight_gb_s"] = timed[name][1] / (t["median_ms"] * 1e-3) / 1e9
            bnb_ms = group["bitsandbytes"].get("median_ms")
            dense_ms = group["dense"].get("median_ms")
            for r in group.values():
                r["speedup_vs_bnb"] = H.ratio(bnb_ms, r.get("median_ms"))
                r["time_x_dense"] = H.ratio(r.get("median_ms"), dense_ms)
            del x, ref
            H.free_memory(dev)
        del denses, dense
        H.free_memory(dev)
    skipped = {r["reason"] for r in rows if r.get("status") == "skipped"}
    for why in skipped:
        print(f"  matmul: skipping bitsandbytes: {why}")
    return rows, info


def worker_main(args: argparse.Namespace) -> None:
    name = args.mem_worker
    try:
        cfg = resolve(args)
        out = {"provider": name, "status": "ok", "memory": measure_qlora(name, cfg, cfg["device"])}
    except Skip as exc:
        out = {"provider": name, "status": "skipped", "reason": str(exc)}
    except Exception as exc:  # report, never hang the parent
        out = {"provider": name, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    H.emit_worker_result(out)


# --------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------
def _bandwidth(cfg: dict, dev: str, args) -> tuple[float | None, str]:
    if args.bandwidth_gbs:
        return args.bandwidth_gbs, f"{args.bandwidth_gbs:g} GB/s (--bandwidth-gbs)"
    name = H.device_name(dev)
    for key, gbs, what in BANDWIDTH_GBS:
        if key in name:
            return gbs, f"{gbs:g} GB/s: {what}, from the device name {name!r}"
    return None, f"unknown for {name!r}: pass --bandwidth-gbs"


def targets_for(cfg: dict, dev: str, results: dict, bw: float | None, bw_note: str) -> list[dict]:
    out = []

    def add(section, label, value, op, limit, extra=""):
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        note = extra
        if value is None:
            note = "n/a: " + (extra or "a provider did not run")
        elif not cfg["at_target_shape"][section]:
            note = "not the target shape: for information only" + (f"; {extra}" if extra else "")
        out.append(dict(section=section, target=label, value=value, op=op, limit=limit, met=met, note=note))

    gpu = dev.startswith("cuda")
    dq = [r for r in results.get("dequant", []) if r.get("status") == "ok"]
    fast_dq = next((r for r in dq if r["provider"] == "fastft" and r.get("backend") != "torch"), None)
    fast_dq = fast_dq or next((r for r in dq if r["provider"] == "fastft"), None)
    if "dequant" in cfg["sections"]:
        if gpu:
            frac = None if fast_dq is None or bw is None else fast_dq["gb_s"] / bw
            add("dequant", "fastft dequant >= 85% of memory bandwidth (value: fraction)", frac, ">=", 0.85, bw_note)
            v = None if fast_dq is None else fast_dq.get("speedup_vs_bnb")
            add("dequant", "fastft dequant >= bitsandbytes (speedup)", v, ">=", 1.0)
        else:
            v = None if fast_dq is None else fast_dq.get("speedup_vs_bnb")
            add("dequant", "fastft dequant >= 2x bitsandbytes (speedup)", v, ">=", 2.0)
    if "matmul" in cfg["sections"]:
        limits = {1: 1.2} if gpu else {1: 5.0, 16: 3.0}
        what = {1: "GEMV batch 1" if gpu else "nf4_matmul batch 1", 16: "nf4_matmul batch 16"}
        for r in results.get("matmul", []):
            if r["provider"] != "fastft" or r["batch"] not in limits:
                continue
            b = r["batch"]
            label = f"{what[b]} >= {limits[b]:g}x bitsandbytes matmul_4bit (x {r['x_dtype']})"
            add("matmul", label, r.get("speedup_vs_bnb"), ">=", limits[b])
    if "qlora" in cfg["sections"] and gpu:
        fr = next((r for r in results.get("qlora", []) if r["provider"] == "fastft"), {})
        add(
            "qlora",
            "QLoRA layer fwd+bwd <= 1.2x the dense LoRA layer (time x dense)",
            fr.get("time_x_dense"),
            "<=",
            1.2,
        )
    return out


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mem_worker:
        worker_main(args)
        return 0
    script = os.path.abspath(__file__)
    raw_args = list(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    parallel = H.mem_parallel(args)

    import torch

    cfg = resolve(args)
    dev = cfg["device"]

    # QLoRA memory processes: with --mem-parallel (default with --quick) started now, to import
    # while this process imports; all are collected before the first timing
    jobs = [] if (args.skip_memory or "qlora" not in cfg["sections"]) else list(QLORA_PROVIDERS)
    env = H.worker_env(dev)

    def launch(name):
        return H.launch_isolated(script, raw_args + ["--_mem-worker", name], env=env)

    running = [(name, launch(name)) for name in jobs] if parallel else []

    cfg["torch_threads"] = torch.get_num_threads()
    try:
        bnb_modules()
        cfg["bitsandbytes"] = bnb_version()
    except Skip as exc:
        cfg["bitsandbytes"] = f"unavailable: {exc}"
    bw, bw_note = _bandwidth(cfg, dev, args) if dev.startswith("cuda") else (None, "")
    cfg["bandwidth_gbs_assumed"], cfg["bandwidth_note"] = bw, bw_note
    import fastft.ops  # noqa: F401  (registers the ops with the backend registry)
    from fastft import backends

    sel = {}
    for op in ("dequantize_nf4", "nf4_matmul", "lora_linear"):
        try:
            c = backends.select(op, torch.device(dev), cfg["fastft_backend"])
            sel[op] = f"{c.backend} ({c.reason})"
        except Exception as exc:
            sel[op] = f"unavailable ({exc})"
    cfg["fastft_backend_selected"] = sel
    print(
        f"NF4 bench: sections={','.join(cfg['sections'])} device={dev} ({H.device_name(dev)}) "
        f"threads={cfg['torch_threads']} reps={cfg['reps']} warmup={cfg['warmup']} inner={cfg['inner']} "
        f"blocksize={cfg['blocksize']} double_quant={cfg['double_quant']}{' [quick]' if cfg['quick'] else ''}"
    )
    print(f"bitsandbytes: {cfg['bitsandbytes']}")
    for op, s in sel.items():
        print(f"fastft {op}: {s}")
    if cfg["rotate_mib"] > 0:
        print(f"weights cycled through copies totalling >= {cfg['rotate_mib']:g} MiB (defeats the L2 cache)")
    if bw_note:
        print(f"memory bandwidth assumed for the dequant target: {bw_note}")

    # QLoRA memory first: no worker process runs while anything is timed
    mem: dict[str, dict] = {}
    if jobs:
        if parallel:
            mem = {name: H.collect_isolated(run, timeout=1800) for name, run in running}
        else:
            mem = {name: H.collect_isolated(launch(name), timeout=1800) for name in jobs}

    results: dict[str, list] = {}
    infos: dict[str, dict] = {}
    if "dequant" in cfg["sections"]:
        results["dequant"], infos["dequant"] = run_dequant(cfg, dev)
    if "matmul" in cfg["sections"]:
        results["matmul"], infos["matmul"] = run_matmul(cfg, dev)
    if "qlora" in cfg["sections"]:
        results["qlora"], infos["qlora"] = run_qlora(cfg, dev, mem)

    # ---- print
    if "dequant" in results:
        info = infos["dequant"]
        print()
        print(
            f"1. dequant {info['shape'][0]}x{info['shape'][1]} NF4 -> bf16 "
            f"({info['bytes_read'] / 2**20:.2f} MiB read + {info['bytes_written'] / 2**20:.2f} MiB written"
            f"{', ' + str(info['copies']) + ' copies cycled' if info['copies'] > 1 else ''})"
        )
        cols = [
            ("provider", "provider"),
            ("backend", "backend"),
            ("median_ms", "ms (median)"),
            ("p20_ms", "p20"),
            ("p80_ms", "p80"),
            ("gb_s", "GB/s"),
            ("speedup_vs_bnb", "speedup vs bnb"),
            ("max_abs_diff_vs_torch", "max|diff| vs torch ref"),
        ]
        if bw:
            for r in results["dequant"]:
                if r.get("gb_s"):
                    r["frac_of_bw"] = r["gb_s"] / bw
            cols.insert(6, ("frac_of_bw", "x bandwidth"))
        print(H.markdown_table([r for r in results["dequant"] if r.get("status") == "ok"], cols))
        for r in results["dequant"]:
            if r.get("status") == "skipped":
                print(f"  ({r['provider']}: skipped: {r['reason']})")
    if "matmul" in results:
        info = infos["matmul"]
        print()
        print(
            f"2. matmul y = x W^T, W [{info['N']}, {info['K']}] NF4 ({info['nf4_weight_bytes'] / 2**20:.2f} MiB), "
            "forward only; speedup vs bnb = bnb ms / ms; weight GB/s = weight bytes / time"
        )
        print(
            H.markdown_table(
                [r for r in results["matmul"] if r.get("status") == "ok"],
                [
                    ("x_dtype", "x"),
                    ("batch", "batch"),
                    ("provider", "provider"),
                    ("backend", "backend"),
                    ("median_ms", "ms (median)"),
                    ("p20_ms", "p20"),
                    ("p80_ms", "p80"),
                    ("speedup_vs_bnb", "speedup vs bnb"),
                    ("time_x_dense", "time x dense"),
                    ("weight_gb_s", "weight GB/s"),
                    ("rel_err_vs_fp32", "rel err vs fp32"),
                ],
            )
        )
        reasons = {r["reason"] for r in results["matmul"] if r.get("status") == "skipped"}
        for why in reasons:
            print(f"  (skipped: {why})")
    if "qlora" in results:
        info = infos["qlora"]
        print()
        print(
            f"3. QLoRA layer fwd+bwd: {info['tokens']} tokens, {info['in_features']} -> {info['out_features']}, "
            f"r {info['rank']}, alpha {info['alpha']:g}, x/base {info['dtype']}, adapters {info['adapter_dtype']}, "
            f"dropout {info['dropout']:g}"
        )
        print(
            H.markdown_table(
                [r for r in results["qlora"] if r.get("status") == "ok"],
                [
                    ("provider", "provider"),
                    ("median_ms", "fwd+bwd ms (median)"),
                    ("p20_ms", "p20"),
                    ("p80_ms", "p80"),
                    ("time_x_dense", "time x dense"),
                    ("speedup_vs_peft", "speedup vs peft-bnb"),
                    ("weight_mib", "weight MiB"),
                    ("activation_mib", "act MiB"),
                    ("peak_mib", "peak MiB"),
                    ("peak_x_peft", "peak x peft-bnb"),
                ],
            )
        )
        for r in results["qlora"]:
            if r.get("status") == "skipped":
                print(f"  ({r['provider']}: skipped: {r['reason']})")
        if "packed_bytes_identical_to_bnb" in info:
            print(f"fastft's packed weight identical to bitsandbytes': {info['packed_bytes_identical_to_bnb']}")
        if info["agreement"]:
            print(f"agreement (max rel err of y and of the gradients; agrees: <= {TOLERANCE[cfg['dtype']]:g}):")
            print(
                H.markdown_table(
                    info["agreement"],
                    ["fastft vs", "y_rel_err", "x_rel_err", "A_rel_err", "B_rel_err", "agrees"],
                )
            )
        inexact = [r["provider"] for r in results["qlora"] if r.get("memory") and not r["memory"].get("exact")]
        if inexact:
            print(f"note: peak memory may be underestimated for {inexact} (VmHWM could not be reset)")

    targets = targets_for(cfg, dev, results, bw, bw_note)
    print()
    if targets:
        print(H.markdown_table(targets, ["section", "target", "value", "op", "limit", "met", "note"]))
    else:
        print(f"(no targets for the sections run on {dev})")

    H.finish(
        args,
        "nf4",
        {"config": cfg, "sections": infos, "results": results, "targets": targets},
        device=dev,
        quick=cfg["quick"],
        t_start=t_start,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
