"""Small shared harness for the fastft benchmarks (stdlib + torch only).

What it offers, and what every bench script in this folder relies on:

* :func:`env_info` - where and with what a result was produced (device, cores, package
  versions, git sha, UTC time). Never fails because something is missing.
* :func:`time_fn` - median / p20 / p80 wall time of a callable, in ms, with a CUDA
  synchronisation around every repetition; :func:`time_interleaved` several callables, their
  repetitions interleaved; :func:`time_stepwise` several stateful providers (training steps),
  step by step interleaved, first-call time apart, a failing provider reported, not fatal.
* :func:`dynamo_snapshot` / :func:`dynamo_delta` - graph breaks and graphs counted by torch.compile.
* :func:`measure_peak_memory` - peak memory of *one* call above the memory held just
  before it, to be run in a fresh process (see :func:`launch_isolated`):

  - CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` minus
    ``memory_allocated`` before the call (caching-allocator bytes, not ``nvidia-smi``).
  - CPU: ``VmHWM`` (peak resident set) after the call minus ``VmRSS`` before it, read
    from ``/proc/self/status``. The peak is reset first by writing ``5`` to
    ``/proc/self/clear_refs`` where the kernel allows it; where it does not, the
    result is only exact when the call raises the process's peak, which is why the
    call measured must be the first large one in a fresh process, before any
    full-size warm-up (which would also leave freed memory cached by the allocator).

* :func:`launch_isolated` / :func:`collect_isolated` / :func:`run_isolated` - run a
  bench script again in a fresh ``python`` with extra arguments; the child reports with
  :func:`emit_worker_result` (one marked JSON line on stdout).
* :func:`write_result` - atomically write ``bench/results/<name>-<device-slug>.json``
  (the latest run for that device; runs on other devices do not overwrite it).
* :func:`markdown_table` - render rows for the terminal / a PR description.
* what the bench scripts share: :func:`add_common_args` (``--seed``, ``--skip-memory``,
  ``--mem-parallel``, ``--out``, ``--no-write``), :func:`mem_parallel`, :func:`finish` (write the
  JSON and print its path), :func:`worker_env` / :data:`CPU_WORKER_ENV` (memory workers on CPU),
  :class:`LayerStep` / :func:`measure_layer_memory` (one layer's fwd+bwd and its memory),
  :func:`max_abs_diff`, :func:`rel_err`, :func:`ratio`, :func:`torch_dtype`,
  :func:`free_memory`, :func:`current_bytes`, :class:`Skip`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
SCRATCH_RESULTS_DIR = os.path.join(RESULTS_DIR, "tmp")  # git-ignored: for --quick runs

RESULT_MARKER = "@@FASTFT_BENCH_RESULT@@ "

# distribution name -> import name (only used when the distribution metadata is missing)
_PACKAGES = {
    "torch": "torch",
    "triton": "triton",
    "transformers": "transformers",
    "peft": "peft",
    "fastft": "fastft",
    "liger-kernel": "liger_kernel",
    "bitsandbytes": "bitsandbytes",
    "numpy": "numpy",
}


# --------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _package_version(dist: str) -> str | None:
    mod = sys.modules.get(_PACKAGES.get(dist, dist))
    if mod is not None and isinstance(getattr(mod, "__version__", None), str):
        return mod.__version__  # already imported: the version actually running
    try:
        return importlib.metadata.version(dist)
    except Exception:
        return None


def git_sha() -> str:
    """``git rev-parse HEAD`` of the repo, ``-dirty`` when tracked files differ; ``unknown`` on failure.

    Read-only: ``--no-optional-locks`` keeps ``git status`` from refreshing the index, so a
    bench never writes to the checkout's ``.git``. Untracked files do not count as dirty.
    """
    try:
        sha = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        if not sha:
            return "unknown"
        status = subprocess.run(
            ["git", "--no-optional-locks", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return sha + ("-dirty" if status.strip() else "")
    except Exception:
        return "unknown"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU raises."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    return device


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return _cpu_model()


def device_slug(device: str) -> str:
    """Filesystem-safe id of the device, e.g. ``cpu-amd-epyc`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", f"{kind} {device_name(device)}".lower()).strip("-")
    return slug[:80] or kind


def env_info(device: str = "cpu") -> dict[str, Any]:
    """Where a result comes from. Every field is best effort; missing packages give None."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": None,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {dist: _package_version(dist) for dist in _PACKAGES},
        "git_sha": git_sha(),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        info["cores_usable"] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda_runtime"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if str(device).startswith("cuda"):
                cap = torch.cuda.get_device_capability(torch.device(device))
                info["cuda_capability"] = f"{cap[0]}.{cap[1]}"
    except Exception:
        pass
    try:
        info["device_name"] = device_name(device)
    except Exception:
        info["device_name"] = "unknown"
    return info


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not sorted_vals:
        return float("nan")
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _sync_for(device) -> Callable[[], None]:
    if device is not None and str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def time_fn(fn: Callable[[], Any], warmup: int, reps: int, *, device=None) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times timed (``time.perf_counter``).

    With a CUDA ``device`` the GPU is synchronised before and after every repetition, so
    each time is the full latency of one call. Returns ms: median, p20, p80, min, and all times.
    """
    sync = _sync_for(device)
    for _ in range(max(0, warmup)):
        fn()
    sync()
    times = []
    for _ in range(max(1, reps)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return _stats(times, warmup)


def _stats(times: list[float], warmup: int) -> dict[str, Any]:
    s = sorted(times)
    return {
        "median_ms": _percentile(s, 50),
        "p20_ms": _percentile(s, 20),
        "p80_ms": _percentile(s, 80),
        "min_ms": s[0],
        "reps": len(times),
        "warmup": max(0, warmup),
        "times_ms": times,
    }


def time_interleaved(
    fns: dict[str, Callable[[], Any]], warmup: int, reps: int, *, device=None, inner: int = 1
) -> dict[str, dict[str, Any]]:
    """Time several providers of one computation *interleaved*: each repetition runs every
    provider once (``inner`` calls each, the order rotated per repetition), so that a loaded or
    throttling machine slows them all alike and their ratios stay meaningful. Returns, per name,
    what :func:`time_fn` returns (ms per call: median, p20, p80, min, all times) plus ``inner``.
    """
    sync = _sync_for(device)
    names = list(fns)
    for _ in range(max(0, warmup)):
        for n in names:
            fns[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(max(1, reps)):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for n in order:
            fn = fns[n]
            sync()
            t0 = time.perf_counter()
            for _ in range(max(1, inner)):
                fn()
            sync()
            times[n].append((time.perf_counter() - t0) * 1e3 / max(1, inner))
    out = {}
    for n in names:
        out[n] = _stats(times[n], warmup)
        out[n]["inner"] = max(1, inner)
        out[n]["interleaved_with"] = [m for m in names if m != n]
    return out


def time_stepwise(
    fns: dict[str, Callable[[int], Any]], steps: int, warmup: int, *, start: int = 0, device=None
) -> dict[str, dict[str, Any]]:
    """Steps ``start .. steps-1`` of several stateful providers (``fns[name](i)`` runs step ``i``, e.g.
    a training step on batch ``i``), *interleaved*: every step runs each provider once, the order
    rotated per step, so that a loaded machine slows them all alike.

    Steps before ``warmup`` are timed but kept out of the statistics (``warmup_ms``); the first one
    (``first_ms``) is where compilation, autotuning, first-touch allocation happen. A provider that
    raises is dropped from then on and reported with its ``error`` and ``traceback`` (the others go
    on). Returns per name what :func:`time_fn` returns (the steps from ``warmup`` on), plus
    ``first_ms``, ``warmup_ms``, ``outputs`` (each step's return value), ``interleaved_with`` and
    ``paired``: per other provider, its time / this one's, step by step (the ratio the load did not change).
    """
    import traceback

    sync = _sync_for(device)
    names = list(fns)
    alive = list(names)
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, list[Any]] = {n: [] for n in names}
    errors: dict[str, dict[str, str]] = {}
    for i in range(start, steps):
        k = (i - start) % max(1, len(alive))
        for n in alive[k:] + alive[:k]:
            try:
                sync()
                t0 = time.perf_counter()
                out = fns[n](i)
                sync()
            except Exception as exc:  # this provider fails: say why, keep timing the others
                errors[n] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-3000:],
                             "step": i}  # fmt: skip
                continue
            times[n].append((time.perf_counter() - t0) * 1e3)
            outputs[n].append(out)
        alive = [n for n in alive if n not in errors]
    skip = max(0, warmup - start)
    res: dict[str, dict[str, Any]] = {}
    for n in names:
        if n in errors:
            res[n] = dict(errors[n], times_ms=times[n])
            continue
        steady = times[n][skip:] or times[n][-1:]
        r = _stats(steady, warmup) if steady else {"times_ms": []}
        r.update(first_ms=times[n][0] if times[n] else None, warmup_ms=times[n][:skip], outputs=outputs[n],
                 interleaved_with=[m for m in names if m != n])  # fmt: skip
        r["paired"] = {m: [a / b for a, b in zip(times[m][skip:], steady)] for m in names if m != n and m not in errors}
        res[n] = r
    return res


# --------------------------------------------------------------------------------------
# torch.compile bookkeeping
# --------------------------------------------------------------------------------------
def dynamo_snapshot() -> dict[str, Any]:
    """What ``torch._dynamo`` has counted so far in this process: graph breaks (total and per reason,
    first line), graphs compiled, frames. Diff two with :func:`dynamo_delta`."""
    from torch._dynamo.utils import counters

    breaks = {str(k).splitlines()[0][:200]: v for k, v in counters["graph_break"].items()}
    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "break_reasons": breaks,
        "graphs": counters["stats"]["unique_graphs"],
        "frames": counters["frames"]["total"],
        # inductor's FX graph cache: a hit skips code generation and the C++ / Triton compile
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
    }


def dynamo_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``after - before`` of two :func:`dynamo_snapshot` s (the reasons: those whose count grew)."""
    reasons = {k: v - before["break_reasons"].get(k, 0) for k, v in after["break_reasons"].items()}
    out = {k: after[k] - before[k] for k in after if k != "break_reasons"}
    out["break_reasons"] = {k: v for k, v in reasons.items() if v > 0}
    return out


# --------------------------------------------------------------------------------------
# memory (call inside a fresh process)
# --------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_kb("VmHWM"), _proc_status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 64  # a page or two of slack


def measure_peak_memory(fn: Callable[[], Any], device, *, prime: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Peak memory of one call of ``fn`` above what the process holds right before it.

    Call it in a fresh process once the inputs exist. ``prime`` (optional) runs first and is
    excluded: on CUDA pass a full-size call (Triton compilation, autotuning, cuBLAS
    workspaces; the peak counter is reset afterwards, and ``prime`` must free what it
    leaves behind, e.g. ``.grad``); on CPU pass only a *tiny* call, to page in library code
    and start thread pools - a full-size CPU warm-up would leave freed memory in the
    allocator's caches and hide part of the next call's peak.
    Returns MiB: ``peak_mib`` (the number to compare), ``baseline_mib`` and how it was measured.
    """
    if prime is not None:
        prime()
    gc.collect()
    if device is not None and str(device).startswith("cuda"):
        import torch

        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return {
            "peak_mib": (peak - base) / 2**20,
            "baseline_mib": base / 2**20,
            "method": "cuda max_memory_allocated - memory_allocated before (after reset_peak_memory_stats)",
            "exact": True,
        }
    reset = _reset_peak_rss()
    base_kb = _proc_status_kb("VmRSS")
    hwm_before = _proc_status_kb("VmHWM")
    if base_kb is None or hwm_before is None:
        fn()
        return {"peak_mib": None, "baseline_mib": None, "method": "unavailable: no /proc/self/status", "exact": False}
    fn()
    hwm_after = _proc_status_kb("VmHWM")
    return {
        "peak_mib": (hwm_after - base_kb) / 1024,
        "baseline_mib": base_kb / 1024,
        "method": "VmHWM after - VmRSS before" + (" (peak reset via clear_refs)" if reset else " (no peak reset)"),
        # without a reset the number is only exact if the call raised the process's peak
        "exact": bool(reset or hwm_after > hwm_before),
    }


# --------------------------------------------------------------------------------------
# isolated subprocesses
# --------------------------------------------------------------------------------------
def emit_worker_result(payload: dict[str, Any]) -> None:
    """Child side: report ``payload`` to :func:`collect_isolated` (one marked JSON line)."""
    sys.stdout.write(RESULT_MARKER + json.dumps(payload) + "\n")
    sys.stdout.flush()


class IsolatedRun:
    """A running ``python script args...`` child; see :func:`collect_isolated`."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.argv = argv
        self._out = tempfile.TemporaryFile(mode="w+")
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            argv, stdout=self._out, stderr=self._err, cwd=REPO_ROOT, env=env if env is not None else os.environ.copy()
        )


def launch_isolated(script: str, args: Sequence[str], env: dict[str, str] | None = None) -> IsolatedRun:
    """Start ``sys.executable script *args`` in a fresh process (same interpreter, repo root as cwd)."""
    return IsolatedRun([sys.executable, os.path.abspath(script), *map(str, args)], env)


def collect_isolated(run: IsolatedRun, timeout: float | None = None) -> dict[str, Any]:
    """Wait for the child and return the payload of its last :func:`emit_worker_result` line.

    Never raises for a failing child: returns ``{"status": "error", "reason": ...}`` instead.
    """
    try:
        rc = run.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        run.proc.wait()
        return {"status": "error", "reason": f"timed out after {timeout}s"}
    run._out.seek(0)
    run._err.seek(0)
    out, err = run._out.read(), run._err.read()
    run._out.close()
    run._err.close()
    payload = None
    for line in out.splitlines():
        if line.startswith(RESULT_MARKER):
            payload = json.loads(line[len(RESULT_MARKER) :])
    if payload is None:
        tail = (err.strip() or out.strip())[-1500:]
        return {"status": "error", "reason": f"child exited with code {rc} and no result: {tail}"}
    return payload


def run_isolated(
    script: str, args: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None
) -> dict[str, Any]:
    return collect_isolated(launch_isolated(script, args, env), timeout)


# --------------------------------------------------------------------------------------
# small helpers shared by the bench scripts
# --------------------------------------------------------------------------------------
def torch_dtype(name: str):
    """``"fp32"`` / ``"bf16"`` -> the torch dtype."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def max_abs_diff(a, b) -> float | None:
    """max |a - b| of two tensors (compared in fp32); None when either is None."""
    if a is None or b is None:
        return None
    return (a.float() - b.float()).abs().max().item()


def rel_err(a, b) -> float | None:
    """max |a - b| / max |b| (compared in fp32); None when either is None."""
    if a is None or b is None:
        return None
    return (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-30)


def ratio(a, b) -> float | None:
    """a / b; None when either is None or b is 0."""
    if a is None or b is None or not b:
        return None
    return a / b


def free_memory(device) -> None:
    """``gc.collect()``, and on CUDA give the cached blocks back (``torch.cuda.empty_cache``)."""
    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def current_bytes(device) -> int | None:
    """Memory held right now: CUDA ``memory_allocated`` (after a sync), CPU ``VmRSS``; None if unknown."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))
        return torch.cuda.memory_allocated(torch.device(device))
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


# --------------------------------------------------------------------------------------
# command line and the end of a run
# --------------------------------------------------------------------------------------
def add_common_args(
    p: argparse.ArgumentParser, name: str, *, memory: str | None = None, mem_processes: str | None = None
) -> None:
    """``--seed``, ``--skip-memory`` and ``--[no-]mem-parallel`` (only with ``memory``), ``--out``, ``--no-write``.

    ``name`` is the results name (``bench/results/<name>-<device>.json``); ``memory`` what
    ``--skip-memory`` skips (e.g. ``"peak memory"``) and ``mem_processes`` what ``--mem-parallel``
    runs concurrently (e.g. ``"memory processes"``). See :func:`finish` and :func:`mem_parallel`.
    """
    p.add_argument("--seed", type=int, default=0)
    if memory is not None:
        p.add_argument("--skip-memory", action="store_true", help=f"do not measure {memory}")
        p.add_argument(
            "--mem-parallel",
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"run the {mem_processes or 'memory processes'} concurrently (default: only with --quick)",
        )
    p.add_argument(
        "--out",
        help="results name: writes bench/results/<out>-<device>.json "
        f"(default {name}; --quick defaults to {name}-quick under the git-ignored bench/results/tmp/)",
    )
    p.add_argument("--no-write", action="store_true", help="print only, write no JSON")


def add_run_args(p: argparse.ArgumentParser, defaults: dict[str, dict], *, unit: str = "repetitions") -> None:
    """``--device {cpu,cuda,auto}``, ``--reps`` and ``--warmup``; their help states the per-device
    defaults, read from ``defaults`` (``{"cpu": {"reps": ..., "warmup": ...}, "cuda": {...}}``)."""
    cpu, cuda = defaults["cpu"], defaults["cuda"]
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--reps", type=int, help=f"timed {unit}; default CPU {cpu['reps']}, CUDA {cuda['reps']}")
    p.add_argument(
        "--warmup", type=int, help=f"untimed {unit} first; default CPU {cpu['warmup']}, CUDA {cuda['warmup']}"
    )


def mem_parallel(args: argparse.Namespace) -> bool:
    """Whether the memory processes run concurrently: ``--[no-]mem-parallel``, else only with ``--quick``."""
    return args.quick if args.mem_parallel is None else args.mem_parallel


def finish(
    args: argparse.Namespace, name: str, payload: dict[str, Any], *, device: str, quick: bool, t_start: float
) -> str | None:
    """Unless ``--no-write``: write ``{"bench": name, **payload, "elapsed_s": ...}`` and print its path.

    The results name is ``--out``, else ``name`` (``<name>-quick`` with ``quick``); ``quick`` runs go
    to the git-ignored :data:`SCRATCH_RESULTS_DIR`. ``elapsed_s`` is the time since ``t_start``
    (``time.perf_counter()``). Returns the path written, or None.
    """
    elapsed = time.perf_counter() - t_start
    if args.no_write:
        return None
    path = write_result(
        args.out or (f"{name}-quick" if quick else name),
        {"bench": name, **payload, "elapsed_s": elapsed},
        device=device,
        results_dir=SCRATCH_RESULTS_DIR if quick else RESULTS_DIR,
    )
    print(f"\nwrote {os.path.relpath(path, REPO_ROOT)} ({elapsed:.1f}s)")
    return path


# --------------------------------------------------------------------------------------
# memory worker processes
# --------------------------------------------------------------------------------------
# CPU memory workers: a fixed mmap threshold disables glibc's dynamic one, so every block of
# 16 KiB or more is mmap-ed and given back to the OS when freed, and RSS after the forward
# counts what is still alive, not temporaries the allocator kept (see bench/README.md)
CPU_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "16384"}


def worker_env(device) -> dict[str, str] | None:
    """Environment of a memory worker: on CPU ours plus :data:`CPU_WORKER_ENV` (unless already set);
    on CUDA None (ours, unchanged)."""
    if str(device).startswith("cuda"):
        return None
    env = os.environ.copy()
    for k, v in CPU_WORKER_ENV.items():
        env.setdefault(k, v)
    return env


class LayerStep:
    """One layer's forward + backward on fixed inputs (the providers of bench_lora / bench_nf4).

    A subclass sets ``inp`` (a dict holding the input ``x``, which requires grad), ``dy`` (the
    output gradient), ``forward`` (a zero-argument callable returning ``y``) and ``params`` (the
    trainable tensors by name).
    """

    inp: dict
    dy: Any
    forward: Callable[[], Any]
    params: dict

    def clear(self) -> None:
        self.inp["x"].grad = None
        for t in self.params.values():
            t.grad = None

    def step(self):
        """Clear the grads, run forward + backward, return y."""
        self.clear()
        y = self.forward()
        y.backward(self.dy)
        return y

    def grads(self) -> dict:
        out = {"x": self.inp["x"].grad}
        out.update({k: t.grad for k, t in self.params.items()})
        return out


def measure_layer_memory(prov: LayerStep, device, tiny_prime: Callable[[], Any]) -> tuple[dict[str, Any], bool]:
    """Activation memory (after the forward, output alive) and peak of one ``prov`` fwd+bwd.

    Priming (see :func:`measure_peak_memory`): on CUDA a full-size step (Triton compilation /
    autotuning, cuBLAS workspace; the peak is reset after it). On CPU the same when freed blocks
    go back to the OS (:data:`CPU_WORKER_ENV` set) and VmHWM can be reset, so the library's one-off
    buffers (GEMM packing) are not counted; otherwise ``tiny_prime`` (pages in code, starts
    thread pools). Returns :func:`measure_peak_memory`'s dict plus ``activation_mib``, and
    whether the full-size prime was used.
    """
    full_prime = str(device).startswith("cuda") or (
        all(os.environ.get(k) for k in CPU_WORKER_ENV) and _reset_peak_rss()
    )
    if full_prime:

        def prime():
            prov.step()
            prov.clear()

    else:
        prime = tiny_prime

    marks = {}

    def measured():
        y = prov.forward()
        marks["after_forward"] = current_bytes(device)  # y and what autograd saved are alive here
        y.backward(prov.dy)

    mem = measure_peak_memory(measured, device, prime=prime)
    after, base = marks.get("after_forward"), mem.get("baseline_mib")
    mem["activation_mib"] = None if after is None or base is None else after / 2**20 - base
    return mem, full_prime


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------
# where the results go instead of bench/results/ (or results/tmp/ for --quick) when set: the
# bench suite (``fastft bench --out DIR``) points its bench subprocesses at one folder with it
RESULTS_DIR_ENV = "FASTFT_BENCH_RESULTS_DIR"


def result_path(name: str, device: str, results_dir: str | None = None) -> str:
    """``<results_dir>/<name>-<device-slug>.json``; ``$FASTFT_BENCH_RESULTS_DIR`` overrides the folder."""
    folder = os.environ.get(RESULTS_DIR_ENV) or results_dir or RESULTS_DIR
    return os.path.join(folder, f"{name}-{device_slug(device)}.json")


def write_result(
    name: str, payload: dict[str, Any], *, device: str = "cpu", results_dir: str | None = None, env=None
) -> str:
    """Write ``{"name", "env", **payload}`` to ``<results_dir>/<name>-<device-slug>.json`` atomically.

    The file holds the latest run on that kind of device; a run on another device writes
    another file. With ``$FASTFT_BENCH_RESULTS_DIR`` set, the file goes to that folder instead
    (whatever ``results_dir`` says). Written to a temporary file in the same folder, then ``os.replace``-d,
    so a reader never sees half a file. Returns the path.
    """
    path = result_path(name, device, results_dir)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    doc = {"name": name, "env": env if env is not None else env_info(device), **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# --------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        if a >= 1e-3:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str | tuple[str, str]]) -> str:
    """A GitHub markdown table. ``columns``: keys, or ``(key, header)`` pairs; missing values print ``-``."""
    cols = [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]
    cells = [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, (_, h) in enumerate(cols)]
    lines = [
        "| " + " | ".join(h.ljust(w) for (_, h), w in zip(cols, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def ledger_of(run, min_numel: int, sections=("forward", "backward")) -> tuple[str, dict]:
    """Run ``run(section)`` under a :class:`fastft.ledger.Ledger` (on meta tensors at the bench's
    shape, or small real ones): ``run`` gets a context-manager factory ``section(name)`` to mark
    its forward and backward. Returns the ledger's table and its per-section summaries, for the
    bench to print beside its timings and write in its JSON."""
    from fastft.ledger import Ledger

    with Ledger(min_numel=min_numel) as led:
        run(led.section)
    summary = {name: led.summary(name) for name in sections}
    summary["saved_bytes"] = led.saved_bytes()
    return led.table(), summary
