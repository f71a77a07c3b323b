#!/usr/bin/env python
"""Benchmark: fastft's fused LoRA linear against PEFT's LoRA ``Linear`` and the frozen base layer.

Providers, per layer shape ``[tokens, in] -> [tokens, out]``, rank ``r`` and dropout ``p``, all
running one forward and one backward (``y.backward(dy)`` with a fixed random ``dy``) with the
base weight frozen, ``x`` requiring grad (as inside a model) and the adapters trainable:

* ``fastft``: ``fastft.ops.lora_linear(x, W, A, B, scaling, dropout_p=p)`` (gradients of
  ``x``, ``A`` and ``B`` in one autograd node; ``--fastft-backend`` picks the backend).
* ``peft``: PEFT's ``peft.tuners.lora.Linear`` in train mode, obtained with ``get_peft_model``
  on a one-layer module (``LoraConfig(r, lora_alpha, lora_dropout=p, init_lora_weights=False)``)
  and loaded with the same ``W``, ``A``, ``B`` as fastft. Adapters in ``--adapter-dtype``
  (default fp32: what ``get_peft_model`` gives over a bf16 base, ``autocast_adapter_dtype=True``).
* ``base``: ``F.linear(x, W)`` forward and the gradient of ``x`` only: what the frozen layer
  costs without any adapter (does not depend on ``r`` or ``p``).

Reports fwd+bwd time (median, p20, p80 ms), activation memory (held between forward and
backward, output included) and the peak of one fwd+bwd, both measured in fresh processes (see
``bench/README.md``), ratios against peft and base, the agreement of fastft with peft at
``p == 0`` (output and gradients of ``x``, ``A``, ``B``) and the targets (reported, never asserted).

    python bench/bench_lora.py --quick          # seconds (mostly imports), any machine
    python bench/bench_lora.py                  # CPU: 2048 tokens, 1024 -> 1024, r 16, fp32, p 0 and 0.1
    python bench/bench_lora.py --device cuda    # GPU: 8192 tokens, 4096 -> 4096 / 14336, r 16 / 64, bf16
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import warnings

import _harness as H

PROVIDERS = ("fastft", "peft", "base")
DEFAULT_PROVIDERS = "fastft,peft,base"

# per device: the shapes the targets are stated for
DEFAULTS = {
    "cpu": dict(tokens=2048, in_features=[1024], out_features=[1024], rank=[16], dropout=[0.0, 0.1], dtype="fp32"),
    "cuda": dict(
        tokens=8192, in_features=[4096], out_features=[4096, 14336], rank=[16, 64], dropout=[0.0, 0.1], dtype="bf16"
    ),
}
RUNS = {"cpu": dict(reps=3, warmup=1), "cuda": dict(reps=20, warmup=5)}
QUICK = dict(tokens=256, in_features=[64], out_features=[96], rank=[8], reps=2, warmup=1)
SHAPE_KEYS = ("tokens", "in_features", "out_features", "rank", "dropout", "dtype")

# (label, metric, provider, versus, op, limit); metric: "time" = provider / versus median time,
# "speedup" = versus / provider median time, "act" = provider / versus activation memory.
# op "<=!" means "<=" when p == 0 and "<" (strictly) when p > 0.
TARGETS = {
    "cpu": [
        ("fastft time <= 1.05x base", "time", "fastft", "base", "<=", 1.05),
        ("fastft >= 1.1x faster than peft", "speedup", "fastft", "peft", ">=", 1.1),
    ],
    "cuda": [
        ("fastft >= 1.3x faster than peft", "speedup", "fastft", "peft", ">=", 1.3),
        ("LoRA overhead over base <= 15% (fastft time <= 1.15x base)", "time", "fastft", "base", "<=", 1.15),
        ("fastft activation memory <= peft's (< with dropout)", "act", "fastft", "peft", "<=!", 1.0),
    ],
}

# informational agreement thresholds on max|diff| / max|peft| (the bench never fails on them)
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}

Skip = H.Skip


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
def _list_of(kind):
    def parse(s: str):
        return [kind(v) for v in s.replace(",", " ").split()]

    return parse


def _flatten(values):
    return None if values is None else [v for group in values for v in group]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, help="tokens (rows of x); default CPU 2048, CUDA 8192")
    ints, floats = _list_of(int), _list_of(float)
    p.add_argument("--in-features", type=ints, nargs="+", help="input size(s); default CPU 1024, CUDA 4096")
    p.add_argument("--out-features", type=ints, nargs="+", help="output size(s); default CPU 1024, CUDA 4096 14336")
    p.add_argument("--rank", type=ints, nargs="+", help="LoRA rank(s); default CPU 16, CUDA 16 64")
    p.add_argument("--dropout", type=floats, nargs="+", help="LoRA dropout(s), one row each; default 0 0.1")
    p.add_argument("--alpha", type=float, help="lora_alpha; default 2 * rank (scaling = alpha / rank = 2)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="x and base weight dtype; default CPU fp32, CUDA bf16")
    p.add_argument(
        "--adapter-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="A and B dtype (default fp32: PEFT's default, it upcasts bf16 adapters)",
    )
    H.add_run_args(p, RUNS)
    p.add_argument("--quick", action="store_true", help="tiny shape (256 tokens, 64 -> 96, r 8), reps 2: seconds")
    p.add_argument(
        "--providers",
        default=DEFAULT_PROVIDERS,
        help=f"comma-separated subset of {','.join(PROVIDERS)} (default {DEFAULT_PROVIDERS})",
    )
    p.add_argument("--fastft-backend", default="auto", help="backend= for the fastft op (auto, torch, triton)")
    H.add_common_args(p, "lora", memory="memory", mem_processes="memory processes")
    p.add_argument("--_mem-worker", dest="mem_worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    p.add_argument("--_mem-cells", dest="mem_cells", type=ints, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for k in ("in_features", "out_features", "rank", "dropout"):
        setattr(args, k, _flatten(getattr(args, k)))
    names = [s.strip() for s in args.providers.split(",") if s.strip()]
    bad = [n for n in names if n not in PROVIDERS]
    if bad or not names:
        p.error(f"--providers: unknown {bad}; choose from {PROVIDERS}")
    args.provider_list = list(dict.fromkeys(names))
    for v in args.dropout or []:
        if not 0.0 <= v < 1.0:
            p.error(f"--dropout: {v} is not in [0, 1)")
    for k in ("in_features", "out_features", "rank"):
        if any(v <= 0 for v in getattr(args, k) or []):
            p.error(f"--{k.replace('_', '-')}: sizes must be positive")
    return args


def resolve(args: argparse.Namespace) -> dict:
    """Fill the defaults that depend on the device. Deterministic: the worker processes redo it."""
    device = H.resolve_device(args.device)
    base = dict(DEFAULTS[device], **RUNS[device])
    if args.quick:
        base.update(QUICK)
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    cfg.update(device=device, quick=args.quick, seed=args.seed, adapter_dtype=args.adapter_dtype)
    cfg["alpha"] = args.alpha
    cfg["fastft_backend"] = args.fastft_backend
    target = DEFAULTS[device]
    cfg["at_target_shape"] = all(cfg[k] == target[k] for k in SHAPE_KEYS)
    cfg["cells"] = [
        dict(in_features=i, out_features=o, rank=r, dropout=float(p))
        for i, o, r, p in itertools.product(cfg["in_features"], cfg["out_features"], cfg["rank"], cfg["dropout"])
    ]
    return cfg


def _scaling(cfg: dict, rank: int) -> tuple[float, float]:
    alpha = cfg["alpha"] if cfg["alpha"] is not None else 2.0 * rank
    return alpha, alpha / rank


# --------------------------------------------------------------------------------------
# inputs and providers
# --------------------------------------------------------------------------------------
def make_inputs(tokens, in_features, out_features, rank, dtype, adapter_dtype, device, seed):
    """x [1, tokens, in] (requires grad), dy [1, tokens, out], frozen W [out, in], A [r, in], B [out, r]."""
    import torch

    dt, adt = H.torch_dtype(dtype), H.torch_dtype(adapter_dtype)
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)

    def randn(*shape, scale, dtype):  # drawn on the CPU: the same values on every device
        return torch.randn(*shape, generator=g).mul_(scale).to(device=device, dtype=dtype)

    x = randn(1, tokens, in_features, scale=1.0, dtype=dt).requires_grad_(True)
    dy = randn(1, tokens, out_features, scale=1.0, dtype=dt)
    w = randn(out_features, in_features, scale=in_features**-0.5, dtype=dt)  # frozen: no grad
    a = randn(rank, in_features, scale=in_features**-0.5, dtype=adt).requires_grad_(True)
    b = randn(out_features, rank, scale=rank**-0.5, dtype=adt).requires_grad_(True)
    return dict(x=x, dy=dy, weight=w, lora_A=a, lora_B=b)


class _OneLinear:
    """Lazily defined nn.Module holding one ``proj`` linear (defined on first use: torch import)."""

    cls = None

    @classmethod
    def make(cls, linear):
        if cls.cls is None:
            from torch import nn

            class OneLinear(nn.Module):
                def __init__(self, proj):
                    super().__init__()
                    self.proj = proj

                def forward(self, x):
                    return self.proj(x)

            cls.cls = OneLinear
        return cls.cls(linear)


def build_peft_layer(inp: dict, rank: int, alpha: float, dropout: float):
    """PEFT's LoRA Linear over an nn.Linear holding ``W``, with ``A``, ``B`` copied in; train mode."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from peft import LoraConfig, get_peft_model
            from peft.tuners.lora import Linear as LoraLinear
    except Exception as exc:
        raise Skip(f"peft not importable ({type(exc).__name__}: {exc})") from None
    w, a, b = inp["weight"], inp["lora_A"], inp["lora_B"]
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"], init_lora_weights=False, bias="none"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_OneLinear.make(lin), config)
    layer = model.base_model.model.proj
    if not isinstance(layer, LoraLinear):
        raise Skip(f"get_peft_model gave {type(layer).__name__}, not peft.tuners.lora.Linear")
    la, lb = layer.lora_A["default"], layer.lora_B["default"]
    la.to(a.dtype)
    lb.to(b.dtype)
    with torch.no_grad():
        la.weight.copy_(a)
        lb.weight.copy_(b)
    layer.train()
    assert not layer.base_layer.weight.requires_grad, "PEFT left the base weight trainable"
    return model, layer


class Provider(H.LayerStep):
    """One provider on one cell's inputs: ``step()`` clears grads, runs forward + backward, returns y."""

    def __init__(self, name: str, inp: dict, cell: dict, cfg: dict):
        import torch

        self.name, self.inp = name, inp
        self.dy = inp["dy"]
        rank, p = cell["rank"], cell["dropout"]
        alpha, scaling = _scaling(cfg, rank)
        if name == "fastft":
            from fastft import backends
            from fastft.ops import lora_linear

            try:
                backends.select("lora_linear", inp["x"].device, cfg["fastft_backend"])
            except Exception as exc:
                raise Skip(f"fastft backend {cfg['fastft_backend']!r} unavailable: {exc}") from None
            x, w, a, b, be = inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], cfg["fastft_backend"]
            self.forward = lambda: lora_linear(x, w, a, b, scaling, bias=None, dropout_p=p, backend=be)
            self.params = {"A": a, "B": b}
        elif name == "peft":
            self.model, layer = build_peft_layer(inp, rank, alpha, p)
            x = inp["x"]
            self.forward = lambda: layer(x)
            self.params = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight}
        elif name == "base":
            x, w = inp["x"], inp["weight"]
            self.forward = lambda: torch.nn.functional.linear(x, w)
            self.params = {}
        else:
            raise ValueError(name)


def ledger_rows(cfg: dict, cells: list) -> list[dict]:
    """The traffic ledger (:mod:`fastft.ledger`) of one fwd+bwd per provider at each dropout-free cell's
    shapes, on meta tensors (no memory, no compute; what the torch level launches, converts and moves
    whatever the device). ``fastft`` is the default activation precision, ``fastft-peft`` the
    ``precision="peft"`` option (PEFT's promotion, the same aten ops as PEFT's layer)."""
    import torch

    from fastft.ledger import Ledger
    from fastft.ops import lora_linear

    rows = []
    for cell in cells:
        if cell["dropout"] != 0.0:  # the torch backend's mask is not what the GPU runs: not counted
            continue
        n, fin, fout, r = cfg["tokens"], cell["in_features"], cell["out_features"], cell["rank"]
        dt, adt = H.torch_dtype(cfg["dtype"]), H.torch_dtype(cfg["adapter_dtype"])

        def meta(*shape, dtype, grad=False):
            return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_(grad)

        _, scaling = _scaling(cfg, r)
        for name in ("fastft", "fastft-peft", "base"):
            # fresh tensors per provider: no gradient accumulated from the previous one
            x, dy, w = meta(n, fin, dtype=dt, grad=True), meta(n, fout, dtype=dt), meta(fout, fin, dtype=dt)
            a, b = meta(r, fin, dtype=adt, grad=True), meta(fout, r, dtype=adt, grad=True)
            if name == "base":
                call = lambda: torch.nn.functional.linear(x, w)  # noqa: B023, E731 - called in this iteration
            else:
                prec = "activation" if name == "fastft" else "peft"
                call = lambda: lora_linear(x, w, a, b, scaling, backend="torch", precision=prec)  # noqa: B023, E731
            led = Ledger(min_numel=n * min(fin, fout))
            with led:
                with led.section("forward"):
                    y = call()
                with led.section("backward"):
                    y.backward(dy)
            s = led.summary()
            rows.append(
                dict(
                    **cell,
                    provider=name,
                    launches=s["launches"],
                    moved_mib=round(s["bytes_moved"] / 2**20, 1),
                    conversions=s["conversions"],
                    conversion_mib=round(s["conversion_bytes"] / 2**20, 1),
                    full_size_temporaries=s["temporaries"],
                    saved_mib=round(s["saved_bytes"] / 2**20, 1),
                    ops=" ".join(led.ops()),
                )
            )
    return rows


def cell_inputs(cfg: dict, cell: dict, dev: str) -> dict:
    return make_inputs(
        cfg["tokens"],
        cell["in_features"],
        cell["out_features"],
        cell["rank"],
        cfg["dtype"],
        cfg["adapter_dtype"],
        dev,
        cfg["seed"],
    )


# --------------------------------------------------------------------------------------
# memory worker (runs in a fresh process)
# --------------------------------------------------------------------------------------
def measure_cell(name: str, cfg: dict, cell: dict, dev: str) -> dict:
    """Activation memory (after forward, output alive) and peak of one fwd+bwd, above the inputs."""
    inp = cell_inputs(cfg, cell, dev)
    prov = Provider(name, inp, cell, cfg)

    def tiny_prime():  # used unless a full-size prime is possible (see H.measure_layer_memory)
        tiny_cell = dict(in_features=32, out_features=32, rank=min(cell["rank"], 4), dropout=cell["dropout"])
        tiny = make_inputs(16, 32, 32, tiny_cell["rank"], cfg["dtype"], cfg["adapter_dtype"], dev, 1)
        Provider(name, tiny, tiny_cell, cfg).step()
        del tiny

    mem, full_prime = H.measure_layer_memory(prov, dev, tiny_prime)
    mem["activation_method"] = (
        "cuda memory_allocated after forward - before" if dev.startswith("cuda") else "VmRSS after forward - before"
    ) + " (output kept alive)"
    mem["prime"] = "full-size call" if full_prime else "tiny call"
    if not dev.startswith("cuda"):
        mem["malloc_env"] = {k: os.environ.get(k) for k in H.CPU_WORKER_ENV}
    return mem


def worker_main(args: argparse.Namespace) -> None:
    name = args.mem_worker
    out: dict = {"provider": name, "status": "ok", "cells": {}}
    try:
        cfg = resolve(args)
        dev = cfg["device"]
        for idx in args.mem_cells or []:
            try:
                out["cells"][str(idx)] = {"status": "ok", "memory": measure_cell(name, cfg, cfg["cells"][idx], dev)}
            except Skip as exc:
                out["cells"][str(idx)] = {"status": "skipped", "reason": str(exc)}
            except Exception as exc:
                out["cells"][str(idx)] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            H.free_memory(dev)  # the cell's inputs are gone with measure_cell's frame
    except Exception as exc:  # report, never hang the parent
        out = {"provider": name, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    H.emit_worker_result(out)


def memory_jobs(cfg: dict, providers: list[str]) -> list[tuple[str, list[int]]]:
    """(provider, cell indices) per worker process. CPU: one process per cell (RSS needs the first
    large call of a fresh process); CUDA: one per provider (the allocator's counters are exact
    across calls). ``base`` only once per (in, out): it does not depend on rank or dropout."""
    jobs = []
    for name in providers:
        idxs = list(range(len(cfg["cells"])))
        if name == "base":
            firsts = {}
            for i, c in enumerate(cfg["cells"]):
                firsts.setdefault((c["in_features"], c["out_features"]), i)
            idxs = list(firsts.values())
        if cfg["device"].startswith("cuda"):
            jobs.append((name, idxs))
        else:
            jobs += [(name, [i]) for i in idxs]
    return jobs


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def _compare(op: str, value: float, limit: float, p: float) -> bool:
    if op == "<=!":
        op = "<" if p > 0 else "<="
    return {"<=": value <= limit, "<": value < limit, ">=": value >= limit}[op]


def check_agreement(cfg: dict, cell: dict, dev: str) -> dict:
    """fastft vs peft at p == 0: max |diff| of y and of the gradients of x, A, B."""
    inp = cell_inputs(cfg, cell, dev)
    res = {k: cell[k] for k in ("in_features", "out_features", "rank")}
    outs = {}
    for name in ("peft", "fastft"):
        prov = Provider(name, inp, cell, cfg)
        y = prov.step().detach()
        outs[name] = {"y": y, **{k: None if g is None else g.clone() for k, g in prov.grads().items()}}
        prov.clear()
        del prov
    worst = 0.0
    for k in ("y", "x", "A", "B"):
        a, b = outs["fastft"].get(k), outs["peft"].get(k)
        res[f"{k}_max_abs_diff"] = H.max_abs_diff(a, b)
        rel = H.rel_err(a, b)
        res[f"{k}_rel_err"] = rel
        worst = max(worst, rel if rel is not None else float("inf"))
    res["max_rel_err"] = worst
    res["agrees"] = bool(worst <= TOLERANCE[cfg["dtype"]])
    del outs, inp
    H.free_memory(dev)
    return res


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
    cells = cfg["cells"]
    providers = args.provider_list

    # memory processes: with --mem-parallel (default with --quick) started now, to import while we do
    jobs = [] if args.skip_memory else memory_jobs(cfg, providers)
    env = H.worker_env(dev)

    def launch(job):
        name, idxs = job
        extra = ["--_mem-worker", name, "--_mem-cells", ",".join(map(str, idxs))]
        return H.launch_isolated(script, raw_args + extra, env=env)

    running = [(job, launch(job)) for job in jobs] if parallel else []

    from fastft import backends

    try:
        choice = backends.select("lora_linear", torch.device(dev), cfg["fastft_backend"])
        cfg["fastft_backend_selected"] = f"{choice.backend} ({choice.reason})"
    except Exception as exc:  # a forced backend that cannot run: the fastft rows are skipped below
        cfg["fastft_backend_selected"] = f"unavailable ({exc})"
    cfg["providers"] = providers
    cfg["torch_threads"] = torch.get_num_threads()
    shapes = ", ".join(f"{i}->{o}" for i, o in dict.fromkeys((c["in_features"], c["out_features"]) for c in cells))
    alpha_txt = "2 * rank" if cfg["alpha"] is None else f"{cfg['alpha']:g}"
    print(
        f"LoRA bench: tokens={cfg['tokens']} layers {shapes} rank={cfg['rank']} dropout={cfg['dropout']} "
        f"dtype={cfg['dtype']} adapters={cfg['adapter_dtype']} alpha={alpha_txt} device={dev} "
        f"({H.device_name(dev)}) threads={cfg['torch_threads']} reps={cfg['reps']} warmup={cfg['warmup']}"
        f"{' [quick]' if cfg['quick'] else ''}"
    )
    print(f"fastft backend: {cfg['fastft_backend_selected']}")
    elem = torch.tensor([], dtype=H.torch_dtype(cfg["dtype"])).element_size()
    outs_mib = {o: cfg["tokens"] * o * elem / 2**20 for o in cfg["out_features"]}
    print("output y (counted in activation memory): " + ", ".join(f"out={o}: {m:.2f} MiB" for o, m in outs_mib.items()))

    # which providers can run here (peft importable, fastft backend available)
    skipped: dict[str, str] = {}
    probe_cell = dict(cells[0], in_features=8, out_features=8, rank=min(cells[0]["rank"], 2))
    probe = make_inputs(4, 8, 8, probe_cell["rank"], cfg["dtype"], cfg["adapter_dtype"], dev, 0)
    for name in providers:
        try:
            Provider(name, probe, probe_cell, cfg)
        except Skip as exc:
            skipped[name] = str(exc)
            print(f"  skipping {name}: {exc}")
    del probe
    ok = [n for n in providers if n not in skipped]

    # 1. agreement: fastft vs peft, one fwd+bwd each, at p == 0
    agreement = []
    if "fastft" in ok and "peft" in ok:
        for cell in cells:
            if cell["dropout"] == 0.0:
                agreement.append(check_agreement(cfg, cell, dev))

    # 2. memory: fresh processes (sequential unless --mem-parallel), none running during the timing
    mem: dict[tuple[str, int], dict] = {}
    if jobs:
        if not parallel:
            results = [(job, H.collect_isolated(launch(job), timeout=1800)) for job in jobs]
        else:
            results = [(job, H.collect_isolated(run, timeout=1800)) for job, run in running]
        for (name, idxs), res in results:
            for i in idxs:
                cres = res.get("cells", {}).get(str(i)) if res.get("status") == "ok" else res
                cres = cres or {"status": "error", "reason": "no result"}
                if name == "base":  # one measurement per (in, out), shared by its cells
                    key = (cells[i]["in_features"], cells[i]["out_features"])
                    for j, c in enumerate(cells):
                        if (c["in_features"], c["out_features"]) == key:
                            mem[(name, j)] = cres
                else:
                    mem[(name, i)] = cres

    # 3. time: all in this process, cell by cell, provider after provider
    rows = []
    for ci, cell in enumerate(cells):
        inp = cell_inputs(cfg, cell, dev)
        cell_rows = {}
        for name in providers:
            row = {"cell": ci, **cell, "provider": name}
            cell_rows[name] = row
            rows.append(row)
            if name in skipped:
                row.update(status="skipped", reason=skipped[name])
                continue
            row["status"] = "ok"
            prov = Provider(name, inp, cell, cfg)
            t = H.time_fn(prov.step, cfg["warmup"], cfg["reps"], device=dev)
            prov.clear()
            del prov
            row.update(time=t, median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"])
            m = mem.get((name, ci))
            if m is not None and m.get("status") == "ok":
                row["memory"] = m["memory"]
                row["activation_mib"] = m["memory"].get("activation_mib")
                row["peak_mib"] = m["memory"].get("peak_mib")
            elif m is not None:
                row["memory_error"] = m.get("reason", m.get("status"))
                print(f"  memory measurement failed for {name} {cell}: {row['memory_error']}")
            H.free_memory(dev)
        del inp
        H.free_memory(dev)
        peft, base = cell_rows.get("peft", {}), cell_rows.get("base", {})
        for row in cell_rows.values():
            row["time_x_peft"] = H.ratio(row.get("median_ms"), peft.get("median_ms"))
            row["time_x_base"] = H.ratio(row.get("median_ms"), base.get("median_ms"))
            row["act_x_peft"] = H.ratio(row.get("activation_mib"), peft.get("activation_mib"))
            row["peak_x_peft"] = H.ratio(row.get("peak_mib"), peft.get("peak_mib"))

    # targets (reported, never asserted)
    targets = []
    by = {(r["cell"], r["provider"]): r for r in rows}
    key_of = {"time": "median_ms", "speedup": "median_ms", "act": "activation_mib"}
    for ci, cell in enumerate(cells):
        for label, metric, who, versus, op, limit in TARGETS[dev.split(":")[0]]:
            a = by.get((ci, who), {}).get(key_of[metric])
            b = by.get((ci, versus), {}).get(key_of[metric])
            value = H.ratio(b, a) if metric == "speedup" else H.ratio(a, b)
            met = None if value is None else _compare(op, value, limit, cell["dropout"])
            note = "" if cfg["at_target_shape"] else "not the target shape: for information only"
            if value is None:
                missing = [n for n, v in ((who, a), (versus, b)) if v is None]
                note = f"n/a: no {metric} for {', '.join(missing)}"
            targets.append(dict(target=label, **cell, value=value, limit=limit, met=met, note=note))

    print()
    print(
        H.markdown_table(
            [r for r in rows if r["status"] == "ok"],
            [
                ("in_features", "in"),
                ("out_features", "out"),
                ("rank", "r"),
                ("dropout", "p"),
                ("provider", "provider"),
                ("median_ms", "fwd+bwd ms (median)"),
                ("p20_ms", "p20"),
                ("p80_ms", "p80"),
                ("time_x_peft", "time x peft"),
                ("time_x_base", "time x base"),
                ("activation_mib", "act MiB"),
                ("act_x_peft", "act x peft"),
                ("peak_mib", "peak MiB"),
                ("peak_x_peft", "peak x peft"),
            ],
        )
    )
    for name, why in skipped.items():
        print(f"  ({name}: skipped: {why})")
    inexact = sorted({r["provider"] for r in rows if r.get("memory") and not r["memory"].get("exact")})
    if inexact:
        print(f"note: peak memory may be underestimated for {inexact} (VmHWM could not be reset)")
    print()
    if agreement:
        print(f"fastft vs peft at p = 0 (max |diff|; agrees: max rel err <= {TOLERANCE[cfg['dtype']]:g}):")
        print(
            H.markdown_table(
                agreement,
                [
                    ("in_features", "in"),
                    ("out_features", "out"),
                    ("rank", "r"),
                    ("y_max_abs_diff", "max|y diff|"),
                    ("x_max_abs_diff", "max|dx diff|"),
                    ("A_max_abs_diff", "max|dA diff|"),
                    ("B_max_abs_diff", "max|dB diff|"),
                    ("max_rel_err", "max rel err"),
                    ("agrees", "agrees"),
                ],
            )
        )
    else:
        print("fastft vs peft agreement not checked (needs both providers and a dropout of 0)")
    print()
    print(
        H.markdown_table(
            targets,
            [
                "target",
                ("in_features", "in"),
                ("out_features", "out"),
                ("rank", "r"),
                ("dropout", "p"),
                "value",
                "limit",
                "met",
                "note",
            ],
        )
    )

    ledger = ledger_rows(cfg, cells)
    if ledger:
        print()
        print("traffic ledger, one fwd+bwd at these shapes (meta tensors: torch-level counts, any device):")
        print(
            H.markdown_table(
                ledger,
                [
                    ("in_features", "in"),
                    ("out_features", "out"),
                    ("rank", "r"),
                    "provider",
                    "launches",
                    ("moved_mib", "MiB moved"),
                    "conversions",
                    ("conversion_mib", "conversion MiB"),
                    ("full_size_temporaries", "full-size temps"),
                    ("saved_mib", "saved MiB"),
                ],
            )
        )

    H.finish(
        args,
        "lora",
        {"config": cfg, "results": rows, "agreement": agreement, "targets": targets, "ledger": ledger},
        device=dev,
        quick=cfg["quick"],
        t_start=t_start,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
