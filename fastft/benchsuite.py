"""``fastft bench``: run the benchmark scripts of a source checkout and print one table.

Each bench (``bench/bench_<name>.py``) runs in its own subprocess with ``--device`` (and
``--quick``) passed through and writes its JSON as usual; this module reads those files and
prints one markdown table - per case: fastft's time, the reference's, the speedup
(reference time / fastft time), the memory ratio (fastft / reference) and whether fastft's
numbers agreed with the reference's - with the device and the date, then writes the combined
JSON ``suite-<device>.json`` (``--quick``: ``suite-quick-<device>.json`` under the git-ignored
``bench/results/tmp/``). Full runs also append one line per run to
``bench/results/suite-history-<device>.jsonl``.

    fastft bench --quick                     # every per-op bench at its tiny shape (smoke: a minute or two)
    fastft bench --ops cross_entropy,lora    # those two at the device's target shapes
    fastft bench --e2e                       # the per-op benches, then the end-to-end training step
    fastft bench --ops e2e --device cuda     # only the end-to-end bench, on the GPU
    python -m fastft.benchsuite --quick      # the same without the CLI

The benches live in ``bench/`` next to the ``fastft`` package: this runs from a source
checkout only (an installed wheel has no ``bench/``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# per-op benches run by default, in this order; "e2e" (the training step) is added by --e2e
PER_OP = ("cross_entropy", "lora", "nf4", "checkpointing", "fused_ops", "moe")
BENCHES = PER_OP + ("e2e", "dpo")  # "dpo" (a DPO step vs TRL's loss on logits) runs when named in --ops
# the results name each bench writes (bench/results/<name>[-quick]-<device>.json)
RESULT_NAME = {b: b for b in BENCHES}


def bench_dir() -> Path:
    """``bench/`` of the source checkout the ``fastft`` package is imported from; ValueError if absent."""
    import fastft

    path = Path(fastft.__file__).resolve().parent.parent / "bench"
    if not (path / "_harness.py").is_file():
        raise ValueError("fastft bench runs from a source checkout: bench/ not found next to the fastft package")
    return path


def _harness():
    """``bench/_harness.py`` of the checkout, imported as a module."""
    folder = str(bench_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import _harness

    return _harness


def parse_benches(ops: str | None, e2e: bool) -> list[str]:
    """The benches to run, in order: ``ops`` (comma-separated; default every per-op bench), plus e2e."""
    names = [s.strip() for s in (ops or "").split(",") if s.strip()] if ops is not None else list(PER_OP)
    if ops is not None and not names:
        raise ValueError(f"--ops is empty; valid names: {', '.join(BENCHES)}")
    bad = [n for n in names if n not in BENCHES]
    if bad:
        raise ValueError(f"unknown bench {', '.join(map(repr, bad))}; valid names: {', '.join(BENCHES)}")
    if e2e:
        names.append("e2e")
    return list(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastft bench`` (and ``python -m fastft.benchsuite``)."""
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions: a smoke run (format only)")
    parser.add_argument(
        "--ops",
        default=None,
        help=f"comma-separated benches to run (default: {','.join(PER_OP)}); valid: {','.join(BENCHES)}",
    )
    parser.add_argument("--e2e", action="store_true", help="also run the end-to-end training-step bench (bench_e2e.py)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="passed to every bench")
    parser.add_argument(
        "--out",
        default=None,
        help="folder for every JSON of the run (default bench/results/, with --quick bench/results/tmp/)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per bench (default: none; --quick 900)")
    parser.add_argument("--verbose", "-v", action="store_true", help="show each bench's own output as it runs")
    parser.add_argument(
        "--bench-args", default="", help='extra arguments for every bench script, e.g. "--seed 1" (one string)'
    )


# --------------------------------------------------------------------------------------
# rows of the combined table, from each bench's JSON
# --------------------------------------------------------------------------------------
def _row(bench, case, ours, ref, fastft_ms, ref_ms, mem_ratio=None, ok=None, speedup=None, **extra) -> dict[str, Any]:
    if speedup is None:
        speedup = ref_ms / fastft_ms if fastft_ms and ref_ms else None
    return dict(bench=bench, case=case, fastft=ours, reference=ref, fastft_ms=fastft_ms, ref_ms=ref_ms,
                speedup=speedup, mem_ratio=mem_ratio, ok=ok, **extra)  # fmt: skip


def _rows_cross_entropy(doc: dict) -> list[dict]:
    c = doc.get("config", {})
    by = {r["provider"]: r for r in doc.get("results", []) if r.get("status") == "ok"}
    f = by.get("fastft")
    case = f"{c.get('tokens')} x {c.get('hidden')} x {c.get('vocab')} {c.get('dtype')} fwd+bwd"
    out = []
    for ref in ("transformers", "liger"):
        r = by.get(ref)
        if f and r:
            out.append(_row("cross_entropy", case, "fused_linear_cross_entropy", ref, f.get("median_ms"),
                            r.get("median_ms"), _ratio(f.get("peak_mib"), r.get("peak_mib")), f.get("agrees")))  # fmt: skip
    return out


def _rows_lora(doc: dict) -> list[dict]:
    c = doc.get("config", {})
    agree = {(a["in_features"], a["out_features"], a["rank"]): a.get("agrees") for a in doc.get("agreement", [])}
    cells: dict = {}
    for r in doc.get("results", []):
        if r.get("status") == "ok":
            cells.setdefault(r.get("cell"), {})[r["provider"]] = r
    out = []
    for _cell, by in sorted(cells.items(), key=lambda kv: kv[0]):
        f, p = by.get("fastft"), by.get("peft")
        if not (f and p):
            continue
        key = (f["in_features"], f["out_features"], f["rank"])
        ok = agree.get(key) if not f.get("dropout") else None
        case = f"{c.get('tokens')} tok {key[0]}->{key[1]} r{key[2]} p{f.get('dropout')} {c.get('dtype')}"
        out.append(_row("lora", case, "lora_linear", "peft", f.get("median_ms"), p.get("median_ms"),
                        f.get("peak_x_peft"), ok))  # fmt: skip
    return out


def _rows_nf4(doc: dict) -> list[dict]:
    res, sec = doc.get("results", {}), doc.get("sections", {})
    out = []
    dq = [r for r in res.get("dequant", []) if r.get("status") == "ok"]
    f = next((r for r in dq if r["provider"] == "fastft"), None)  # the auto backend comes first
    b = next((r for r in dq if r["provider"] == "bitsandbytes"), None)
    if f and b:
        shape = "x".join(map(str, sec.get("dequant", {}).get("shape", [])))
        out.append(_row("nf4", f"dequant {shape} ({f.get('backend')})", "dequantize_nf4", "bitsandbytes",
                        f.get("median_ms"), b.get("median_ms"), None, f.get("max_abs_diff_vs_torch") == 0.0))  # fmt: skip
    mm: dict = {}
    for r in res.get("matmul", []):
        if r.get("status") == "ok":
            mm.setdefault((r.get("x_dtype"), r.get("batch")), {})[r["provider"]] = r
    for (xd, batch), by in mm.items():
        f, b = by.get("fastft"), by.get("bitsandbytes")
        if f and b:
            ok = None
            if f.get("rel_err_vs_fp32") is not None and b.get("rel_err_vs_fp32") is not None:
                ok = f["rel_err_vs_fp32"] <= max(2 * b["rel_err_vs_fp32"], 1e-4)
            s = sec.get("matmul", {})
            out.append(_row("nf4", f"matmul {batch}x{s.get('K')}->{s.get('N')} x {xd}", "nf4_matmul", "bnb matmul_4bit",
                            f.get("median_ms"), b.get("median_ms"), None, ok))  # fmt: skip
    ql = {r["provider"]: r for r in res.get("qlora", []) if r.get("status") == "ok"}
    f, p = ql.get("fastft"), ql.get("peft-bnb")
    if f and p:
        q = sec.get("qlora", {})
        agree = [a.get("agrees") for a in q.get("agreement", []) if a.get("fastft vs") == "peft-bnb"]
        case = f"QLoRA layer {q.get('tokens')} tok {q.get('in_features')}->{q.get('out_features')} r{q.get('rank')} {q.get('dtype')}"
        out.append(_row("nf4", case, "lora_linear(quant_state)", "peft+bnb", f.get("median_ms"), p.get("median_ms"),
                        f.get("peak_x_peft"), agree[0] if agree else None))  # fmt: skip
    return out


def _rows_checkpointing(doc: dict) -> list[dict]:
    c = doc.get("config", {})
    by = {r["mode"]: r for r in doc.get("table", []) if "median_ms" in r}
    none = by.get("none")
    out = []
    for mode in ("recompute", "offload"):
        r = by.get(mode)
        if r and none:
            case = f"{c.get('layers')} layers, {c.get('tokens')} tok {c.get('dtype')} (memory: activations)"
            out.append(_row("checkpointing", case, f"checkpointing={mode}", "no checkpointing", r.get("median_ms"),
                            none.get("median_ms"), r.get("act_ratio"), None))  # fmt: skip
    return out


def _rows_fused_ops(doc: dict) -> list[dict]:
    agree = {a["op"]: a.get("agrees") for a in doc.get("agreement", [])}
    ops: dict = {}
    for r in doc.get("results", []):
        if r.get("status") == "ok":
            ops.setdefault(r["op"], {})[r["provider"]] = r
    out = []
    for op, by in ops.items():
        f, t = by.get("fastft"), by.get("transformers")
        if f and t:
            out.append(_row("fused_ops", f"{op} {f.get('shape', '')} fwd+bwd", op, "transformers",
                            f.get("median_ms"), t.get("median_ms"), f.get("peak_x_hf"), agree.get(op)))  # fmt: skip
    e2e = {r["variant"]: r for r in doc.get("e2e", []) if "median_ms" in r}
    if "fused" in e2e and "unfused" in e2e:
        c = doc.get("config", {})
        f, u = e2e["fused"], e2e["unfused"]
        out.append(_row("fused_ops", f"training step {c.get('e2e_batch')}x{c.get('e2e_seq')} tok", "norms+mlp+rope",
                        "loss patch only", f.get("median_ms"), u.get("median_ms"), None,
                        None if f.get("loss") is None else abs(f["loss"] - u.get("loss", float("nan"))) <= 1e-3 * abs(u["loss"])))  # fmt: skip
    return out


def _rows_moe(doc: dict) -> list[dict]:
    c = doc.get("config", {})
    by = {r["provider"]: r for r in doc.get("rows", []) if r.get("median_ms")}
    f = by.get("fastft")
    case = f"experts E{c.get('experts')} top-{c.get('top_k')} {c.get('tokens')} tok H{c.get('hidden')} I{c.get('intermediate')} {c.get('dtype')} fwd+bwd"
    out = []
    for ref in ("eager", "grouped_mm", "batched_mm"):
        r = by.get(ref)
        if f and r:
            err = f.get("max_rel_err_vs_eager")
            out.append(_row("moe", case, "experts", ref, f.get("median_ms"), r.get("median_ms"), None,
                            None if err is None else err < 1e-4))  # fmt: skip
    lora = doc.get("lora") or {}
    lby = {r["provider"]: r for r in lora.get("rows", []) if r.get("median_ms")}
    ls = lora.get("summary", {})
    lf = lby.get("lora_fastft")
    for ref, label in (
        ("lora_peft", f"peft target_parameters ({ls.get('peft_over')})"),
        ("base_frozen", "experts (no LoRA)"),
    ):
        r = lby.get(ref)
        if lf and r:
            err = ls.get("max_rel_err_fastft_vs_peft") if ref == "lora_peft" else None
            mem = _ratio(lf.get("peak_mib"), r.get("peak_mib"))
            out.append(_row("moe", f"{case}, LoRA r{ls.get('rank')} on experts", "experts + LoRA (fused)", label,
                            lf.get("median_ms"), r.get("median_ms"), mem, None if err is None else err < 1e-4))  # fmt: skip
    q, fr = by.get("fastft_nf4"), by.get("fastft_frozen")
    if q and fr:  # 4-bit experts vs the 16-bit block with frozen weights; memory: weights vs bf16
        err = q.get("max_rel_err_vs_dequantised")
        out.append(_row("moe", case + " (frozen weights)", "experts, NF4 weights", "experts, 16-bit weights",
                        q.get("median_ms"), fr.get("median_ms"), doc.get("summary", {}).get("nf4_over_bf16_weight_memory"),
                        None if err is None else err < 1e-4))  # fmt: skip
    return out


def _rows_e2e(doc: dict) -> list[dict]:
    c = doc.get("config", {})
    rows = [r for r in doc.get("results", []) if r.get("status") == "ok"]
    out = []
    for r in rows:
        if r["provider"] == "peft":
            continue
        ref = "peft+bnb" if r["mode"] == "qlora" else "peft"
        case = f"{r['mode']} step {c.get('batch')}x{c.get('seq')} {c.get('dtype')}, {c.get('params', 0) / 1e6:.0f}M"
        peft = next((x for x in rows if x["mode"] == r["mode"] and x["provider"] == "peft"), {})
        extra = {}
        if r.get("max_seq") is not None:
            extra = dict(max_seq=r.get("max_seq"), max_seq_ratio=r.get("max_seq_ratio"))
        extra["tokens_per_s"] = r.get("tokens_per_s")
        extra["speedup"] = r.get("speedup")  # interleaved CPU runs: the median step-by-step ratio
        out.append(_row("e2e", case, r["provider"], ref, r.get("median_ms"), peft.get("median_ms"),
                        r.get("mem_ratio") if r.get("mem_ratio") is not None else r.get("total_ratio"),
                        r.get("agree"), **extra))  # fmt: skip
    return out


def _rows_dpo(doc: dict) -> list[dict]:
    c, s = doc.get("config", {}), doc.get("summary", {})
    by = {r["provider"]: r for r in doc.get("results", []) if r.get("status") == "ok"}
    f, t = by.get("fastft"), by.get("trl")
    if not (f and t):
        return []
    case = (
        f"DPO step {c.get('pairs')} pairs x {c.get('seq')} tok, LoRA r{c.get('rank')}, {c.get('params', 0) / 1e6:.0f}M"
    )
    rows = [_row("dpo", case, "fastft", "trl (logits)", f.get("median_ms"), t.get("median_ms"), s.get("mem_ratio"),
                 s.get("agree"), tokens_per_s=f.get("tokens_per_s"))]  # fmt: skip
    k = by.get("fastft+ckpt")
    if k:
        rows.append(_row("dpo", case, "fastft+ckpt", "trl (logits)", k.get("median_ms"), t.get("median_ms"),
                         s.get("ckpt", {}).get("mem_ratio"), s.get("ckpt", {}).get("loss_abs_diff", 1.0) <= 1e-4,
                         tokens_per_s=k.get("tokens_per_s")))  # fmt: skip
    return rows


_EXTRACT = {
    "cross_entropy": _rows_cross_entropy,
    "lora": _rows_lora,
    "nf4": _rows_nf4,
    "checkpointing": _rows_checkpointing,
    "fused_ops": _rows_fused_ops,
    "moe": _rows_moe,
    "e2e": _rows_e2e,
    "dpo": _rows_dpo,
}


def _ratio(a, b):
    return a / b if a is not None and b else None


def rows_from_result(doc: dict) -> list[dict]:
    """The suite's rows (bench, case, fastft_ms, ref_ms, speedup, mem_ratio, ok) of one bench JSON."""
    name = doc.get("bench") or doc.get("name", "")
    for key, fn in _EXTRACT.items():
        if name == key or name.startswith(key + "-"):
            return fn(doc)
    if name.startswith("suite"):
        return list(doc.get("rows", []))
    return []


COLUMNS = [
    ("bench", "bench"),
    ("case", "case"),
    ("fastft", "fastft"),
    ("reference", "reference"),
    ("fastft_ms", "fastft ms"),
    ("ref_ms", "reference ms"),
    ("speedup", "speedup"),
    ("mem_ratio", "memory x ref"),
    ("ok", "ok"),
]


def render(rows: list[dict], env: dict, *, quick: bool) -> str:
    """The combined markdown table with its header line (device, versions, date)."""
    H = _harness()
    v = env.get("versions", {})
    when = (env.get("timestamp_utc") or "")[:10]
    head = (
        f"fastft bench{' --quick' if quick else ''}: {env.get('device')} ({env.get('device_name')}, "
        f"{env.get('cores_usable') or env.get('cores')} cores), torch {v.get('torch')}, transformers "
        f"{v.get('transformers')}, peft {v.get('peft')}, fastft {v.get('fastft')}, git {str(env.get('git_sha'))[:12]}, "
        f"{when}"
    )
    lines = [head, "", H.markdown_table(rows, COLUMNS)]
    lines.append("")
    lines.append("speedup = reference time / fastft time (> 1: fastft faster); memory x ref = fastft / reference")
    lines.append("(peak of one step; checkpointing: activations; e2e: step peak above model + optimizer);")
    lines.append("ok = fastft's outputs / gradients / losses agreed with the reference's (- : not compared)")
    if quick:
        lines.append("--quick: tiny shapes, format check only: the numbers mean nothing")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------
def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    return device


def _show(path, root) -> str:
    """``path`` relative to the checkout when inside it, else absolute."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return str(p.relative_to(r)) if p.is_relative_to(r) else str(p)


def run_bench(name: str, *, device: str, quick: bool, out_dir: Path | None, timeout: float | None,
              verbose: bool, extra: list[str]) -> dict[str, Any]:  # fmt: skip
    """Run ``bench/bench_<name>.py`` in a subprocess; return its status and the JSON it wrote."""
    H = _harness()
    folder = bench_dir()
    script = folder / f"bench_{name}.py"
    if not script.is_file():
        return dict(bench=name, status="error", reason=f"{script} not found")
    argv = [sys.executable, str(script), "--device", device, *(["--quick"] if quick else []), *extra]
    env = os.environ.copy()
    # the subprocesses import the same fastft as this process, installed or not
    root = str(folder.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if out_dir is not None:
        env[H.RESULTS_DIR_ENV] = str(out_dir)
    expected = Path(
        H.result_path(
            f"{RESULT_NAME[name]}-quick" if quick else RESULT_NAME[name],
            device,
            str(out_dir) if out_dir is not None else (H.SCRATCH_RESULTS_DIR if quick else H.RESULTS_DIR),
        )
    )
    if out_dir is not None:  # the env var wins in the child; compute the same path here
        expected = out_dir / expected.name
    t0 = time.time()
    print(f"== bench_{name}.py {' '.join(argv[2:])}", flush=True)
    try:
        if verbose:
            proc = subprocess.run(argv, cwd=root, env=env, timeout=timeout)
            output = ""
        else:
            proc = subprocess.run(argv, cwd=root, env=env, timeout=timeout, capture_output=True, text=True)
            output = (proc.stdout or "") + (proc.stderr or "")
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        return dict(bench=name, status="error", reason=f"timed out after {timeout:g}s", elapsed_s=time.time() - t0)
    elapsed = time.time() - t0
    res: dict[str, Any] = dict(bench=name, rc=rc, elapsed_s=elapsed, path=str(expected))
    fresh = expected.is_file() and expected.stat().st_mtime >= t0 - 1
    if fresh:
        try:
            res["doc"] = json.loads(expected.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            res.update(status="error", reason=f"unreadable {expected}: {exc}")
            return res
    if rc != 0 or not fresh:
        why = f"exit code {rc}" if rc != 0 else f"no fresh {expected.name} written"
        tail = "\n".join(output.strip().splitlines()[-25:])
        res.update(status="error", reason=why, output_tail=tail)
        print(f"   failed ({why}, {elapsed:.0f} s)" + (f"\n{tail}" if tail else ""), flush=True)
        if not fresh:
            return res
    else:
        res["status"] = "ok"
        print(f"   ok ({elapsed:.0f} s) -> {_show(expected, root)}", flush=True)
    return res


def run(args: argparse.Namespace) -> int:
    """Run the selected benches and print the combined table. 0: every bench ran and wrote its JSON."""
    import shlex

    benches = parse_benches(args.ops, args.e2e)  # ValueError for an unknown name, before anything runs
    folder = bench_dir()  # ValueError outside a source checkout
    H = _harness()
    device = _resolve_device(args.device)
    quick = bool(args.quick)
    out_dir = Path(args.out).resolve() if args.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    timeout = args.timeout if args.timeout is not None else (900.0 if quick else None)
    extra = shlex.split(getattr(args, "bench_args", "") or "")
    t0 = time.time()
    results = [
        run_bench(b, device=device, quick=quick, out_dir=out_dir, timeout=timeout, verbose=args.verbose, extra=extra)
        for b in benches
    ]
    rows: list[dict] = []
    for res in results:
        doc = res.get("doc")
        if doc is not None:
            try:
                rows += rows_from_result(doc)
            except Exception as exc:  # a changed JSON layout: say so, keep the rest
                res.update(status="error", reason=f"could not read its results: {type(exc).__name__}: {exc}")
        if res.get("status") != "ok":
            rows.append(dict(bench=res["bench"], case=f"FAILED: {res.get('reason')}"))
    env = H.env_info(device)
    print()
    print(render(rows, env, quick=quick))
    summary = [{k: v for k, v in r.items() if k != "doc"} for r in results]
    payload = dict(bench="suite", benches=benches, quick=quick, device=device, rows=rows, runs=summary,
                   elapsed_s=time.time() - t0)  # fmt: skip
    name = "suite-quick" if quick else "suite"
    default_dir = H.SCRATCH_RESULTS_DIR if quick else H.RESULTS_DIR
    path = H.write_result(name, payload, device=device, results_dir=str(out_dir) if out_dir else default_dir, env=env)
    if not quick and out_dir is None:  # the history of full runs: one line per run
        hist = Path(H.RESULTS_DIR) / f"suite-history-{H.device_slug(device)}.jsonl"
        with open(hist, "a") as f:
            f.write(json.dumps(dict(env=env, benches=benches, rows=rows), default=str) + "\n")
    print(f"\nwrote {_show(path, folder.parent)} ({time.time() - t0:.0f} s)")
    return 0 if all(r.get("status") == "ok" for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastft.benchsuite", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        print(f"fastft bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
