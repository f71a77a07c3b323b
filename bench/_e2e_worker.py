"""The worker processes of ``bench_e2e.py``: what runs inside the fresh process of one measurement.

* :func:`worker_main` - one provider of one mode: its step memory (``mem``), timed steps
  (``time``) and the longest sequence that fits (``maxseq``), as the ``--_tasks`` say;
* :func:`interleave_main` - every provider of one mode in one process, their steps interleaved
  (:func:`_harness.time_stepwise`), so that the load of a shared machine hits them alike.

Compiled providers: each call of the model is counted by ``torch._dynamo`` (graph breaks, graphs
compiled, inductor FX graph cache hits; :func:`_harness.dynamo_snapshot`) and the first call's time
is reported (the report subtracts a steady step: the compile time). The driver gives a run's
workers one fresh inductor cache folder (:func:`fresh_inductor_cache`): the first process that
compiles a model compiles it cold, the later ones find it cached (said per process: ``cache``).
A provider that fails (a compile error included) is reported with its error; it never stops the others.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

import _e2e_cases as C
import _harness as H


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


INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def fresh_inductor_cache(cfg: dict) -> str | None:
    """A new empty inductor cache folder for a run with a compiled provider (None without one): the
    driver puts it in its workers' environment and removes it at the end, so the first process that
    compiles a model compiles it cold and the later ones (the next repeats) find the FX graph cache warm."""
    if not any(p in C.COMPILED for p in cfg["providers"]):
        return None
    return tempfile.mkdtemp(prefix="fastft-e2e-inductor-")


def _cache_state(d: dict) -> str:
    hit, miss = d.get("fxgraph_cache_hit", 0), d.get("fxgraph_cache_miss", 0)
    return "none" if not (hit or miss) else "cold" if not hit else "warm" if not miss else "mixed"


class Counted:
    """A provider's trainer whose calls are counted by torch._dynamo (compiled providers only): the
    first call (the compile: graph breaks, graphs, FX graph cache hits) apart from the later ones
    (graphs compiled after the first call: recompiles)."""

    _ZERO = {"graph_breaks": 0, "graphs": 0, "frames": 0, "fxgraph_cache_hit": 0, "fxgraph_cache_miss": 0}

    def __init__(self, trainer: C.Trainer, compiled: bool):
        self.tr, self.compiled = trainer, compiled
        self.first: dict | None = None  # counts of the first call (the compile)
        self.later: dict = dict(self._ZERO, break_reasons={})

    def __call__(self, fn, *a):
        if not self.compiled:
            return fn(*a)
        before = H.dynamo_snapshot()
        try:
            return fn(*a)
        finally:
            d = H.dynamo_delta(before, H.dynamo_snapshot())
            if self.first is None:
                self.first = d
            else:
                for k in self._ZERO:
                    self.later[k] += d[k]
                for k, v in d["break_reasons"].items():
                    self.later["break_reasons"][k] = self.later["break_reasons"].get(k, 0) + v

    def compile_info(self, first_ms: float | None, first_call: str) -> dict | None:
        """What the report needs (its compile time: ``first_call_ms`` minus the pooled steady step)."""
        if not self.compiled or self.first is None:
            return None
        f = self.first
        return dict(
            first_call=first_call, first_call_ms=first_ms, graph_breaks=f["graph_breaks"],
            break_reasons=f["break_reasons"], graphs=f["graphs"], cache=_cache_state(f),
            fxgraph_cache_hit=f["fxgraph_cache_hit"], fxgraph_cache_miss=f["fxgraph_cache_miss"],
            graphs_after_first_call=self.later["graphs"], graph_breaks_after_first_call=self.later["graph_breaks"],
        )  # fmt: skip


def measure_step_memory(tr: C.Trainer, cfg: dict, batch, count: Counted) -> tuple[dict, object]:
    """Peak of one training step (``batch``) above what the process holds right before it.

    Primed by a full-size forward + backward (no optimizer step; grads cleared) on CUDA, and on
    the CPU when freed memory leaves the RSS; otherwise by a tiny one (see
    ``_harness.measure_peak_memory``). Returns the memory dict (``peak_mib``, ``baseline_mib``,
    ``total_peak_mib``, ``prime_ms``: the prime's time, where a compiled model compiles) and the step's loss.
    """
    dev = cfg["device"]
    # a full-size prime (compilation, GEMM packing buffers, ... not counted) where its freed memory
    # cannot hide in the allocator: CUDA (exact counters) and CPU with large blocks mmap-ed and a
    # resettable VmHWM (as _harness.measure_layer_memory); else a tiny one (pages code in, starts pools)
    full = dev.startswith("cuda") or (all(os.environ.get(k) for k in H.CPU_WORKER_ENV) and H._reset_peak_rss())
    prime_batch = batch if full else C.make_batch(cfg, 10**6, batch=1, seq=16)
    sync = _sync(dev)
    timing = {}

    def prime():
        t0 = time.perf_counter()
        count(tr.fwd_bwd, prime_batch)
        sync()
        timing["prime_ms"] = (time.perf_counter() - t0) * 1e3

    out = {}
    mem = H.measure_peak_memory(lambda: out.setdefault("loss", count(tr.step, batch)), dev, prime=prime)
    base, peak = mem.get("baseline_mib"), mem.get("peak_mib")
    mem["total_peak_mib"] = None if base is None or peak is None else base + peak
    mem["total_method"] = "cuda max_memory_allocated" if dev.startswith("cuda") else "process peak RSS (VmHWM)"
    mem["prime"] = "full-size forward + backward" if full else "tiny forward + backward"
    mem["prime_ms"] = timing.get("prime_ms")
    return mem, out["loss"]


def search_max_seq(tr: C.Trainer, cfg: dict) -> dict:
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
        batch = C.make_batch(cfg, 2 * 10**6 + index[0], batch=1, seq=seq)
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
        return max(C.SEQ_ROUND, int(x) // C.SEQ_ROUND * C.SEQ_ROUND)

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
        while s > C.SEQ_ROUND:
            s = rnd(s // 2)
            if probe(s):
                lo = s
                break
            hi = s
    while hi is not None and lo and (hi - lo) > max(C.SEQ_ROUND, 0.05 * lo):
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


def _built(cfg: dict, mode: str, provider: str) -> tuple[dict, C.Trainer | None, Counted | None]:
    """Build ``provider``: (its result so far, its trainer, its counter); a Skip is a result, no trainer."""
    import torch

    t_build = time.perf_counter()
    try:
        model, run_model, report, note = C.build(cfg, mode, provider)
    except C.Skip as exc:
        return dict(status="skipped", reason=str(exc)), None, None
    tr = C.trainer_for(cfg, provider, model, run_model)
    _sync(cfg["device"])()
    res = dict(status="ok", note=note, build_s=time.perf_counter() - t_build, torch_threads=torch.get_num_threads(),
               trainable_params=sum(p.numel() for p in tr.params))  # fmt: skip
    if report is not None:
        res["patched"] = sorted(report.features())
        res["report"] = str(report).splitlines()[:40]
    if provider in C.COMPILED:
        res["compile_mode"] = cfg["compile_mode"]
    return res, tr, Counted(tr, provider in C.COMPILED)


def _error(res: dict, exc: BaseException) -> dict:
    import traceback

    return dict(res, status="error", reason=f"{type(exc).__name__}: {exc}"[:2000],
                traceback=traceback.format_exc()[-3000:])  # fmt: skip


def worker_main(args: argparse.Namespace) -> None:
    provider, mode = args.worker, args.worker_mode
    tasks = set(C.csv(args.worker_tasks))
    res: dict = {"provider": provider, "mode": mode, "tasks": sorted(tasks)}
    try:
        cfg = C.resolve(args)
        import torch

        dev = cfg["device"]
        built, tr, count = _built(cfg, mode, provider)
        res.update(built)
        if tr is None:
            H.emit_worker_result(res)
            return
        n_total = cfg["warmup"] + cfg["steps"]
        batches = [C.make_batch(cfg, i) for i in range(n_total)] if ("time" in tasks or "mem" in tasks) else []
        losses = []
        start = 0
        first_ms, first_call = None, None
        if "mem" in tasks:  # the first full-size step of this process: step 0 of the trajectory
            mem, loss = measure_step_memory(tr, cfg, batches[0], count)
            res["memory"] = mem
            first_ms, first_call = mem.get("prime_ms"), f"memory prime ({mem['prime']})"
            losses.append(loss)
            start = 1
        if "time" in tasks:

            def one(i, batches=batches):
                return count(tr.step, batches[i])

            t = H.time_stepwise({provider: one}, n_total, cfg["warmup"], start=start, device=dev)[provider]
            if "error" in t:
                raise RuntimeError(f"step {t['step']}: {t['error']}\n{t['traceback']}")
            losses += t.pop("outputs")
            if first_ms is None:
                first_ms, first_call = t.get("first_ms"), "first training step"
            res["time"] = t
        info = count.compile_info(first_ms, first_call)
        if info is not None:
            res["compile"] = info
        res["losses"] = [float(x) for x in losses]
        del batches, losses
        gc.collect()
        if "maxseq" in tasks:
            res["max_seq"] = search_max_seq(tr, cfg)
        if dev.startswith("cuda"):
            res["process_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception as exc:  # report, never hang the parent
        res = _error(res, exc)
    H.emit_worker_result(res)


def interleave_main(args: argparse.Namespace) -> None:
    """Every provider of one mode in this process, their steps interleaved (CPU on a shared machine).

    The providers are built with the same seeds as in their own processes (same weights, adapters and
    batches) and train side by side, one step each in turn (the order rotating every step), so a
    change in the machine's load hits all of them alike. Reports each provider's step times and
    losses, and per step the other providers' times / its time (``paired``; ``paired_speedups``:
    the reference's). A provider that fails (to build, to compile, to step) is reported with its error.
    """
    mode = args.worker_mode
    res: dict = {"provider": "interleave", "mode": mode, "providers": {}}
    try:
        cfg = C.resolve(args)
        n_total = cfg["warmup"] + cfg["steps"]
        trainers, counts, out = {}, {}, res["providers"]
        for prov in cfg["providers"]:
            if C.COMPILED.get(prov, prov) == "liger":  # patches transformers' module functions for the whole process
                out[prov] = dict(status="skipped", reason="liger is not interleaved (it patches the whole process)")
                continue
            try:
                out[prov], tr, count = _built(cfg, mode, prov)
            except Exception as exc:  # one provider that cannot be built does not stop the others
                out[prov] = _error({}, exc)
                continue
            if tr is not None:
                trainers[prov], counts[prov] = tr, count
        batches = [C.make_batch(cfg, i) for i in range(n_total)]

        def stepper(prov):
            return lambda i: counts[prov](trainers[prov].step, batches[i])

        timed = H.time_stepwise({p: stepper(p) for p in trainers}, n_total, cfg["warmup"])
        for prov, t in timed.items():
            if "error" in t:
                out[prov].update(status="error", reason=f"step {t['step']}: {t['error']}", traceback=t["traceback"])
                continue
            out[prov]["losses"] = [float(x) for x in t.pop("outputs")]
            t["paired_speedups"] = t["paired"].get(C.REFERENCE, []) if prov != C.REFERENCE else [1.0] * t["reps"]
            out[prov]["time"] = t
            info = counts[prov].compile_info(t.get("first_ms"), "first training step")
            if info is not None:
                out[prov]["compile"] = info
        res["status"] = "ok"
    except Exception as exc:  # report, never hang the parent
        res = _error(res, exc)
    H.emit_worker_result(res)
