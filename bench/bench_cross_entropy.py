#!/usr/bin/env python
"""Benchmark: fastft's fused linear cross-entropy against the transformers path (and Liger).

Providers, all computing ``mean cross-entropy(hidden @ weight.T, next-token labels)`` forward
and backward (gradients w.r.t. ``hidden`` and ``weight``):

* ``transformers``: ``logits = F.linear(hidden, weight)`` then
  ``transformers.loss.loss_utils.ForCausalLMLoss(logits, labels, vocab_size)``, which
  upcasts the logits to fp32 and shifts the labels by one.
* ``fastft``: ``fastft.ops.fused_linear_cross_entropy(hidden, weight, shift_labels)``, given
  the labels already shifted exactly as transformers shifts them, so both see the same targets.
* ``liger``: ``liger_kernel``'s ``LigerFusedLinearCrossEntropyLoss`` (CUDA only; skipped when
  not importable or not on a GPU).
* ``reference`` (opt-in via ``--providers``): ``fastft.ops.fused_linear_cross_entropy_reference``,
  the pure-PyTorch oracle that materialises the logits.

Reports fwd+bwd time (median, p20, p80 ms), peak memory of one fwd+bwd measured in a fresh
process per provider (see ``bench/README.md``), ratios against the transformers path, the
agreement of losses and gradients, and the issue's targets (reported, never asserted).

    python bench/bench_cross_entropy.py --quick          # seconds, any machine
    python bench/bench_cross_entropy.py                  # CPU: 2048 x 512 x 128256 fp32
    python bench/bench_cross_entropy.py --device cuda    # GPU: 8192 x 4096 x 128256 bf16
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import sys
import time

import _harness as H

PROVIDERS = ("transformers", "fastft", "liger", "reference")
DEFAULT_PROVIDERS = "transformers,fastft,liger"
BASELINE = "transformers"

# per device: the shape the targets are stated for
DEFAULTS = {
    "cpu": dict(tokens=2048, hidden=512, vocab=128256, dtype="fp32", reps=3, warmup=1),
    "cuda": dict(tokens=8192, hidden=4096, vocab=128256, dtype="bf16", reps=20, warmup=5),
}
QUICK = dict(tokens=256, hidden=64, vocab=4096, reps=2, warmup=1)

# (label, metric, provider, versus, limit): metric "time" compares medians, "memory" peaks;
# keyed by (device, head): a trainable lm_head (full fine-tuning) or a frozen one (LoRA / QLoRA)
TARGETS = {
    ("cpu", "trainable"): [
        ("fastft peak memory <= 0.12x transformers", "memory", "fastft", "transformers", 0.12),
        ("fastft fwd+bwd time <= 0.75x transformers", "time", "fastft", "transformers", 0.75),
    ],
    ("cpu", "frozen"): [],
    ("cuda", "trainable"): [
        ("fastft peak memory <= 0.25x transformers", "memory", "fastft", "transformers", 0.25),
        ("fastft fwd+bwd time <= 0.8x transformers", "time", "fastft", "transformers", 0.80),
        ("fastft fwd+bwd time <= liger (1.0x)", "time", "fastft", "liger", 1.0),
    ],
    ("cuda", "frozen"): [
        ("fastft peak memory <= 0.05x transformers", "memory", "fastft", "transformers", 0.05),
        ("fastft fwd+bwd time <= 0.7x transformers", "time", "fastft", "transformers", 0.70),
    ],
}

# informational agreement thresholds (the bench never fails on them)
TOLERANCE = {"fp32": dict(loss=1e-4, grad=1e-3), "bf16": dict(loss=3e-2, grad=5e-2)}


Skip = H.Skip


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, help="tokens (one sequence); default CPU 2048, CUDA 8192")
    p.add_argument("--hidden", type=int, help="hidden size H; default CPU 512, CUDA 4096")
    p.add_argument("--vocab", type=int, help="vocabulary size V; default 128256")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="default CPU fp32, CUDA bf16")
    H.add_run_args(p, DEFAULTS)
    p.add_argument("--quick", action="store_true", help="small shape (256 x 64 x 4096), reps 2: a few seconds")
    p.add_argument(
        "--providers",
        default=DEFAULT_PROVIDERS,
        help=f"comma-separated subset of {','.join(PROVIDERS)} (default {DEFAULT_PROVIDERS})",
    )
    p.add_argument("--fastft-backend", default="auto", help="backend= for the fastft op (auto, torch, triton)")
    p.add_argument("--ignore-frac", type=float, default=0.05, help="fraction of labels set to -100 (default 0.05)")
    p.add_argument(
        "--head",
        choices=("trainable", "frozen"),
        default="trainable",
        help="trainable lm_head (full fine-tuning: grad_weight computed) or frozen (LoRA/QLoRA: grad_hidden only)",
    )
    H.add_common_args(p, "cross_entropy", memory="peak memory", mem_processes="per-provider memory processes")
    p.add_argument("--_mem-worker", dest="mem_worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [s.strip() for s in args.providers.split(",") if s.strip()]
    bad = [n for n in names if n not in PROVIDERS]
    if bad or not names:
        p.error(f"--providers: unknown {bad}; choose from {PROVIDERS}")
    args.provider_list = list(dict.fromkeys(names))
    return args


def resolve(args: argparse.Namespace) -> dict:
    """Fill the defaults that depend on the device. Deterministic: the worker processes redo it."""
    device = H.resolve_device(args.device)
    base = dict(DEFAULTS[device])
    if args.quick:
        base.update(QUICK)
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    cfg.update(device=device, quick=args.quick, seed=args.seed, ignore_frac=args.ignore_frac, head=args.head)
    cfg["fastft_backend"] = args.fastft_backend
    target_shape = DEFAULTS[device]
    cfg["at_target_shape"] = all(cfg[k] == target_shape[k] for k in ("tokens", "hidden", "vocab", "dtype"))
    return cfg


# --------------------------------------------------------------------------------------
# inputs and providers
# --------------------------------------------------------------------------------------
def make_inputs(
    tokens: int, hidden: int, vocab: int, dtype: str, device: str, seed: int, ignore_frac: float, head="trainable"
):
    import torch

    tdtype = H.torch_dtype(dtype)
    torch.manual_seed(seed)
    h = torch.randn(1, tokens, hidden, device=device, dtype=tdtype)
    w = torch.randn(vocab, hidden, device=device, dtype=tdtype).mul_(hidden**-0.5)  # logits ~ N(0, 1)
    labels = torch.randint(0, vocab, (1, tokens), device=device)
    if ignore_frac > 0:
        labels[torch.rand(1, tokens, device=device) < ignore_frac] = -100
    # exactly what ForCausalLMLoss does to `labels`: tokens < n predict n, last one ignored
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    h.requires_grad_(True)
    w.requires_grad_(head == "trainable")
    return dict(hidden=h, weight=w, labels=labels, shift_labels=shift_labels, vocab=vocab)


def make_loss_fn(name: str, inp: dict, device: str, fastft_backend: str = "auto"):
    """A zero-argument callable returning the scalar loss of provider ``name`` (raises Skip)."""
    import torch

    h, w, labels, shift, V = inp["hidden"], inp["weight"], inp["labels"], inp["shift_labels"], inp["vocab"]
    if name == "transformers":
        from transformers.loss.loss_utils import ForCausalLMLoss

        return lambda: ForCausalLMLoss(torch.nn.functional.linear(h, w), labels, vocab_size=V)
    if name == "fastft":
        from fastft.ops.cross_entropy import fused_linear_cross_entropy

        return lambda: fused_linear_cross_entropy(h, w, shift, backend=fastft_backend)
    if name == "reference":
        from fastft.ops.cross_entropy import fused_linear_cross_entropy_reference

        return lambda: fused_linear_cross_entropy_reference(h, w, shift)
    if name == "liger":
        if not device.startswith("cuda"):
            raise Skip("liger-kernel runs on CUDA only")
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as exc:
            raise Skip(f"liger-kernel not importable ({type(exc).__name__}: {exc})") from None
        loss_mod = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
        h2d, t1d = h.view(-1, h.shape[-1]), shift.view(-1)

        def liger():
            out = loss_mod(w, h2d, t1d)
            return out[0] if isinstance(out, tuple) else out

        return liger
    raise ValueError(name)


def fastft_ledger(cfg: dict):
    """The fastft provider's forward and backward under the traffic ledger, on meta tensors."""
    import torch

    from fastft.ops.cross_entropy import fused_linear_cross_entropy

    T, Hd, V = cfg["tokens"], cfg["hidden"], cfg["vocab"]
    dt = H.torch_dtype(cfg["dtype"])
    h = torch.empty(1, T, Hd, device="meta", dtype=dt, requires_grad=True)
    w = torch.empty(V, Hd, device="meta", dtype=dt, requires_grad=cfg["head"] == "trainable")
    t = torch.empty(1, T, device="meta", dtype=torch.long)

    def run(section):
        with section("forward"):
            loss = fused_linear_cross_entropy(h, w, t, backend=cfg["fastft_backend"])
        with section("backward"):
            loss.backward()

    return H.ledger_of(run, min_numel=T * Hd)


def make_step(loss_fn, inp: dict):
    """One training step's worth of loss work: clear grads, forward, backward. Returns the loss."""
    h, w = inp["hidden"], inp["weight"]

    def step():
        h.grad = None
        w.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    return step


def clear_grads(inp: dict) -> None:
    inp["hidden"].grad = None
    inp["weight"].grad = None


# --------------------------------------------------------------------------------------
# memory worker (runs in a fresh process)
# --------------------------------------------------------------------------------------
def worker_main(args: argparse.Namespace) -> None:
    name = args.mem_worker
    try:
        cfg = resolve(args)
        dev = cfg["device"]
        shape = {k: cfg[k] for k in ("tokens", "hidden", "vocab", "dtype")}
        inp = make_inputs(**shape, device=dev, seed=cfg["seed"], ignore_frac=cfg["ignore_frac"], head=cfg["head"])
        try:
            step = make_step(make_loss_fn(name, inp, dev, cfg["fastft_backend"]), inp)
        except Skip as exc:
            H.emit_worker_result({"provider": name, "status": "skipped", "reason": str(exc)})
            return
        if dev.startswith("cuda"):
            # full-size warm-up (compilation, autotuning, cuBLAS workspace); the peak is reset after it
            def prime():
                step()
                clear_grads(inp)

        else:
            # tiny call: pages in library code and starts thread pools, allocates ~nothing
            def prime():
                tiny = make_inputs(32, min(cfg["hidden"], 32), min(cfg["vocab"], 256), cfg["dtype"], dev, 1, 0.0)
                make_step(make_loss_fn(name, tiny, dev, cfg["fastft_backend"]), tiny)()
                del tiny

        mem = H.measure_peak_memory(step, dev, prime=prime)
        H.emit_worker_result({"provider": name, "status": "ok", "memory": mem})
    except Exception as exc:  # report, never hang the parent
        H.emit_worker_result({"provider": name, "status": "error", "reason": f"{type(exc).__name__}: {exc}"})


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

    # --quick: start the memory processes at once, they import torch while we do
    early = {}
    if not args.skip_memory and parallel:
        # (a child for liger would only start torch to say "skipped": don't, when that is certain)
        no_liger = args.device == "cpu" or importlib.util.find_spec("liger_kernel") is None
        names = [n for n in args.provider_list if not (n == "liger" and no_liger)]
        early = {n: H.launch_isolated(script, raw_args + ["--_mem-worker", n]) for n in names}

    import torch

    cfg = resolve(args)
    dev = cfg["device"]
    shape = {k: cfg[k] for k in ("tokens", "hidden", "vocab", "dtype")}
    from fastft import backends

    # the module, not fastft.ops.cross_entropy the function (the package re-exports that name)
    ce = importlib.import_module("fastft.ops.cross_entropy")

    choice = backends.select(ce.OP_FLCE, torch.device(dev), cfg["fastft_backend"])
    cfg["fastft_backend_selected"] = f"{choice.backend} ({choice.reason})"
    cfg["FASTFT_CE_CHUNK_MB"] = os.environ.get("FASTFT_CE_CHUNK_MB", "default")
    itemsize = 4 if cfg["dtype"] == "fp32" else 2
    cfg["fastft_chunk_rows"] = ce.chunk_rows(
        cfg["tokens"],
        cfg["vocab"],
        itemsize,
        fp32_scratch=choice.backend == "torch",
        device_type=torch.device(dev).type,
        trainable_weight=cfg["head"] == "trainable",
    )
    cfg["providers"] = args.provider_list
    print(
        f"cross-entropy bench: tokens={cfg['tokens']} hidden={cfg['hidden']} vocab={cfg['vocab']} "
        f"dtype={cfg['dtype']} head={cfg['head']} ignored={cfg['ignore_frac']:.0%} device={dev} ({H.device_name(dev)}) reps={cfg['reps']} warmup={cfg['warmup']}"
        f"{' [quick]' if cfg['quick'] else ''}"
    )
    print(
        f"fastft backend: {cfg['fastft_backend_selected']}; chunk {cfg['fastft_chunk_rows']} rows "
        f"(FASTFT_CE_CHUNK_MB={cfg['FASTFT_CE_CHUNK_MB']})"
    )

    inp = make_inputs(**shape, device=dev, seed=cfg["seed"], ignore_frac=cfg["ignore_frac"], head=cfg["head"])
    rows: dict[str, dict] = {}
    steps = {}
    for name in args.provider_list:
        try:
            steps[name] = make_step(make_loss_fn(name, inp, dev, cfg["fastft_backend"]), inp)
            rows[name] = {"provider": name, "status": "ok"}
        except Skip as exc:
            rows[name] = {"provider": name, "status": "skipped", "reason": str(exc)}
            print(f"  skipping {name}: {exc}")
    ref_name = BASELINE if BASELINE in steps else next(iter(steps), None)

    # 1. agreement: one fwd+bwd each, compared with the baseline provider
    ref = None
    tol = TOLERANCE[cfg["dtype"]]
    for name in ([ref_name] if ref_name else []) + [n for n in steps if n != ref_name]:
        loss = steps[name]().detach().float().item()
        gh, gw = inp["hidden"].grad, inp["weight"].grad
        row = rows[name]
        row["loss"] = loss
        if ref is None:
            ref = {"loss": loss, "gh": gh, "gw": gw}
        row["loss_abs_diff"] = abs(loss - ref["loss"])
        row["grad_hidden_rel_err"] = H.rel_err(gh, ref["gh"])
        row["grad_weight_rel_err"] = H.rel_err(gw, ref["gw"])
        row["agrees"] = bool(
            row["loss_abs_diff"] <= tol["loss"]
            and (row["grad_hidden_rel_err"] or 0.0) <= tol["grad"]
            and (row["grad_weight_rel_err"] or 0.0) <= tol["grad"]
        )
        del gh, gw
        clear_grads(inp)
    del ref
    gc.collect()

    # 2. peak memory: one fresh process per provider
    if not args.skip_memory:
        if parallel:
            mems = {n: H.collect_isolated(r, timeout=1800) for n, r in early.items()}
        else:
            mems = {n: H.run_isolated(script, raw_args + ["--_mem-worker", n], timeout=1800) for n in steps}
        for name, res in mems.items():
            row = rows[name]
            if res.get("status") == "ok":
                row["peak_mib"] = res["memory"]["peak_mib"]
                row["memory"] = res["memory"]
            elif row["status"] == "ok":
                row["memory_error"] = res.get("reason", "unknown")
                print(f"  memory measurement failed for {name}: {row['memory_error']}")

    # 3. time: all in this process, one provider after the other
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    for name, step in steps.items():
        t = H.time_fn(step, cfg["warmup"], cfg["reps"], device=dev)
        clear_grads(inp)
        rows[name].update(time=t, median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"])

    base = rows.get(BASELINE, {})
    for row in rows.values():
        row["time_x"] = H.ratio(row.get("median_ms"), base.get("median_ms"))
        row["mem_x"] = H.ratio(row.get("peak_mib"), base.get("peak_mib"))

    # targets (reported, never asserted)
    targets = []
    for label, metric, who, versus, limit in TARGETS[(dev.split(":")[0], cfg["head"])]:
        key = "median_ms" if metric == "time" else "peak_mib"
        value = H.ratio(rows.get(who, {}).get(key), rows.get(versus, {}).get(key))
        met = None if value is None else value <= limit
        note = "" if cfg["at_target_shape"] else "not the target shape: for information only"
        if value is None:
            missing = [p for p in (who, versus) if rows.get(p, {}).get(key) is None]
            note = f"n/a: no {metric} for {', '.join(missing)}"
        targets.append(dict(target=label, value=value, limit=limit, met=met, note=note))

    # what the fastft call launches, allocates and converts at this shape (meta tensors: counted, not run)
    try:
        ledger_table, cfg["fastft_ledger"] = fastft_ledger(cfg)
        print(f"\nfastft traffic ledger (meta tensors, {cfg['tokens']}x{cfg['hidden']}x{cfg['vocab']}):")
        print(ledger_table)
    except Exception as exc:  # the ledger is information; never lose the timings for it
        cfg["fastft_ledger"] = f"unavailable: {type(exc).__name__}: {exc}"

    table_rows = list(rows.values())
    print()
    print(
        H.markdown_table(
            [r for r in table_rows if r["status"] == "ok"],
            [
                ("provider", "provider"),
                ("median_ms", "fwd+bwd ms (median)"),
                ("p20_ms", "p20"),
                ("p80_ms", "p80"),
                ("time_x", "time x transformers"),
                ("peak_mib", "peak MiB"),
                ("mem_x", "mem x transformers"),
                ("loss", "loss"),
                ("loss_abs_diff", "|loss diff|"),
                ("grad_hidden_rel_err", "grad_h rel err"),
                ("grad_weight_rel_err", "grad_w rel err"),
                ("agrees", "agrees"),
            ],
        )
    )
    skipped = [r for r in table_rows if r["status"] != "ok"]
    for r in skipped:
        print(f"  ({r['provider']}: {r['status']}: {r.get('reason', '')})")
    diffs = [r["loss_abs_diff"] for r in table_rows if r.get("loss_abs_diff") is not None]
    if diffs:
        print(f"\nmax |loss - {ref_name} loss| over providers: {max(diffs):.3e} (tolerance {tol['loss']:g})")
    inexact = [r["provider"] for r in table_rows if r.get("memory") and not r["memory"].get("exact")]
    if inexact:
        print(f"note: peak memory may be underestimated for {inexact} (VmHWM could not be reset)")
    print()
    print(H.markdown_table(targets, ["target", "value", "limit", "met", "note"]))

    H.finish(
        args,
        "cross_entropy",
        {"config": cfg, "results": table_rows, "targets": targets},
        device=dev,
        quick=cfg["quick"],
        t_start=t_start,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
