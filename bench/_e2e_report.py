"""The report of ``bench_e2e.py``: the worker results made into rows, the targets judged, the tables printed.

One row per (mode, provider): tokens/s (median step, p20 / p80, pooled over the repeats), the
speedup over the reference (interleaved runs: the median of the step-by-step ratios, which the
machine's load does not change), the ratios to the providers of :data:`_e2e_cases.COMPARE` (``vs``:
compiled fastft against compiled PEFT and against eager fastft, ...), the step and total peak
memory and their ratios, the losses and whether the last one agrees with the reference's, the
longest sequence, and for compiled providers the compile time (first call minus a steady step, per
repeat), graph breaks and graphs compiled (``compile``).
"""

from __future__ import annotations

import math
import statistics

import _e2e_cases as C
import _harness as H


def _tps(cfg: dict, ms: float | None) -> float | None:
    return None if not ms else cfg["tokens_per_step"] / (ms / 1e3)


def _pooled(r: dict) -> list[float]:
    return [t for rep in r.get("time_runs", []) for t in rep["times_ms"]]


def _ratio_to(row: dict, r: dict, other: dict, name: str) -> float | None:
    """Tokens/s of this provider / ``name``'s: the median step-by-step ratio when they were interleaved,
    else the ratio of their pooled median steps."""
    paired = [x for rep in r.get("time_runs", []) for x in (rep.get("paired") or {}).get(name, [])]
    if paired:
        return H._percentile(sorted(paired), 50)
    o = _pooled(other)
    return statistics.median(o) / row["median_ms"] if o and row.get("median_ms") else None


def _compile_summary(r: dict, steady_ms: float | None) -> dict | None:
    """The compile time of each process of a compiled provider (its first call - the pooled steady step:
    ``cold`` where inductor's FX graph cache was empty, ``warm`` where an earlier process of the run had
    filled it), graph breaks and graphs of the first call, graphs compiled after it (recompiles)."""
    runs = r.get("compile_runs") or []
    if not runs:
        return None

    def secs(c):
        ms = c.get("first_call_ms")
        return None if ms is None or steady_ms is None else (ms - steady_ms) / 1e3

    per = [dict(cache=c.get("cache"), first_call=c.get("first_call"), first_call_ms=c.get("first_call_ms"),
                compile_s=secs(c)) for c in runs]  # fmt: skip
    # cold: nothing cached yet ("none": a backend without inductor's cache, e.g. aot_eager; "mixed": partly)
    cold = [p["compile_s"] for p in per if p["cache"] != "warm" and p["compile_s"] is not None]
    warm = [p["compile_s"] for p in per if p["cache"] == "warm" and p["compile_s"] is not None]
    first = runs[0]
    return dict(
        mode=r.get("compile_mode"), compile_s_cold=cold[0] if cold else None,
        compile_s_warm=statistics.median(warm) if warm else None, processes=per,
        graph_breaks=max((c.get("graph_breaks") or 0) for c in runs), break_reasons=first.get("break_reasons"),
        graphs=first.get("graphs"), graphs_after_first_call=max((c.get("graphs_after_first_call") or 0) for c in runs),
        note="compile time = first call (cold: in the memory process, a forward + backward without the "
        "optimizer step, when memory is measured) - the median steady training step",
    )  # fmt: skip


def aggregate(cfg: dict, runs: dict) -> list[dict]:
    """One row per (mode, provider) from the worker results ``runs[(mode, provider)] = {...}``."""
    rows = []
    tol = C.LOSS_RTOL[cfg["dtype"]]
    for mode in cfg["modes"]:
        ref = runs.get((mode, C.REFERENCE), {})
        for prov in cfg["providers"]:
            r = runs.get((mode, prov), {})
            row: dict = dict(mode=mode, provider=prov, status=r.get("status", "missing"), reason=r.get("reason"))
            row["note"] = r.get("note")
            if r.get("traceback"):
                row["traceback"] = r["traceback"]
            if r.get("status") != "ok":
                rows.append(row)
                continue
            # time: pooled over the repeats
            times = _pooled(r)
            if times:
                s = sorted(times)
                med, p20, p80 = H._percentile(s, 50), H._percentile(s, 20), H._percentile(s, 80)
                row.update(median_ms=med, p20_ms=p20, p80_ms=p80, steps_timed=len(s))
                row.update(tokens_per_s=_tps(cfg, med), tps_p20=_tps(cfg, p80), tps_p80=_tps(cfg, p20))
                row["repeat_medians_ms"] = [rep["median_ms"] for rep in r["time_runs"]]
            ref_times = _pooled(ref)
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
            vs, mem_vs = {}, {}
            for other in C.COMPARE.get(prov, ()):
                o = runs.get((mode, other), {})
                if o.get("status") == "ok" and times:
                    vs[other] = _ratio_to(row, r, o, other)
                    mem_vs[other] = H.ratio(row["step_peak_mib"], (o.get("memory") or {}).get("peak_mib"))
            if vs:
                row["vs"], row["mem_vs"] = vs, mem_vs
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
            comp = _compile_summary(r, row.get("median_ms"))
            if comp is not None:
                row["compile"] = comp
                row["compile_s"] = (
                    comp["compile_s_cold"] if comp["compile_s_cold"] is not None else comp["compile_s_warm"]
                )
                row["compile_s_warm"] = comp["compile_s_warm"]
                row["graph_breaks"], row["recompiled_graphs"] = comp["graph_breaks"], comp["graphs_after_first_call"]
            for k in ("patched", "report", "trainable_params", "build_s"):
                if k in r:
                    row[k] = r[k]
            rows.append(row)
    return rows


def evaluate_targets(cfg: dict, rows: list[dict]) -> list[dict]:
    by = {(r["mode"], r["provider"]): r for r in rows}
    out = []
    for label, mode, metric, who, versus, op, limit in C.TARGETS[cfg["device"]]:
        if mode not in cfg["modes"] or who not in cfg["providers"] or versus not in cfg["providers"]:
            continue
        a, b = by.get((mode, who), {}), by.get((mode, versus), {})
        value = None
        if metric == "speedup" and versus == C.REFERENCE:
            value = a.get("speedup")  # tokens/s ratio (interleaved: the median of the step-by-step ratios)
        elif metric == "speedup" and versus in (a.get("vs") or {}):
            value = a["vs"][versus]
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


def _mode_title(cfg: dict, mode: str) -> str:
    shape = f"{cfg['dtype']}, {cfg['batch']} x {cfg['seq']} tokens"
    if mode == "moe":
        total, active = cfg["params_by_mode"]["moe"], cfg["params_by_mode"]["moe_active"]
        return (f"moe (Qwen3-MoE-like {total / 1e6:.1f}M params, {active / 1e6:.1f}M active: {cfg['moe_layers']} "
                f"layers, {cfg['experts']} experts top-{cfg['top_k']}, expert MLP {cfg['moe_intermediate']}; LoRA "
                f"all-linear + experts' target_parameters; {shape}; ratios vs peft)")  # fmt: skip
    ref_label = "peft+bitsandbytes" if mode == "qlora" else "peft"
    return f"{mode} ({shape}; ratios vs {ref_label})"


def print_report(cfg: dict, rows: list[dict], targets: list[dict]) -> None:
    cuda = cfg["device"].startswith("cuda")
    search = bool(cfg["max_seq_search"])
    tol = C.LOSS_RTOL[cfg["dtype"]]
    for mode in cfg["modes"]:
        mrows = [r for r in rows if r["mode"] == mode and r["status"] == "ok"]
        print(f"\n### {_mode_title(cfg, mode)}\n")
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
        compiled = [r for r in mrows if r.get("compile")]
        if compiled:
            crow = []
            for r in compiled:
                c = r["compile"]
                crow.append(dict(provider=r["provider"], mode=c.get("mode"), compile_s=c.get("compile_s_cold"),
                                 compile_s_warm=c.get("compile_s_warm"), graph_breaks=c.get("graph_breaks"),
                                 graphs=c.get("graphs"),
                                 recompiled=c.get("graphs_after_first_call"),
                                 **{f"x {k}": v for k, v in (r.get("vs") or {}).items()}))  # fmt: skip
            keys = [("provider", "provider"), ("mode", "mode"), ("compile_s", "compile s (cold)"),
                    ("compile_s_warm", "compile s (warm cache)"), ("graph_breaks", "graph breaks"),
                    ("graphs", "graphs"), ("recompiled", "graphs after step 0")]  # fmt: skip
            keys += sorted({k for x in crow for k in x if k.startswith("x ")})
            keys = [k if isinstance(k, tuple) else (k, k) for k in keys]
            print(f"\ntorch.compile ({crow[0]['mode']}, inductor): compile time = first call - a steady step (cold: an "
                  "empty inductor cache; warm: filled by an earlier process of this run); x P = tokens/s ratio to "
                  "provider P (interleaved: median step-by-step ratio)\n")  # fmt: skip
            print(H.markdown_table(crow, keys))
            for r in compiled:
                for why, n in (r["compile"].get("break_reasons") or {}).items():
                    print(f"  {r['provider']}: graph break x{n}: {why}")
        for r in mrows:
            if r["provider"] != C.REFERENCE and r.get("speedup_paired_median") is not None:
                print(f"  {r['provider']}: speedup step by step (interleaved): median "
                      f"{r['speedup_paired_median']:.3f}, p20 {r['speedup_paired_p20']:.3f}, "
                      f"p80 {r['speedup_paired_p80']:.3f}")  # fmt: skip
        if cfg["repeats"] > 1:
            for r in mrows:
                if r["provider"] != C.REFERENCE and r.get("speedup_repeats"):
                    per = ", ".join(f"{x:.3f}" for x in r["speedup_repeats"])
                    print(f"  {r['provider']}: speedup per repeat {per}")
        for r in rows:
            if r["mode"] == mode and r["status"] != "ok":
                print(f"  ({r['provider']}: {r['status']}: {(r.get('reason') or '').splitlines()[0][:300]})")
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
