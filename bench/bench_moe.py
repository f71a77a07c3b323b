#!/usr/bin/env python
"""Benchmark: a MoE expert block, forward + backward, fastft vs transformers' experts implementations.

One Mixtral-like experts module (``MixtralExperts``: ``gate_up_proj [E, 2I, H]``, ``down_proj
[E, H, I]``, SiLU) is run through transformers' ``ExpertsInterface`` with each implementation,
on the same tokens and the same random top-k routing (weights and input require grad):

* ``eager`` (the per-expert loop), ``grouped_mm``, ``batched_mm`` (transformers 5)
* ``fastft`` (:func:`fastft.ops.experts`, what ``fastft.patch`` registers as ``"fastft"``)
* ``gemm``: the bare GEMM time - the six grouped GEMMs of a forward + backward
  (``torch._grouped_mm`` on pre-sorted rows), nothing else: the floor.
* ``fastft_frozen``: fastft with the 16-bit expert weights frozen (no weight gradients: the
  QLoRA situation), the baseline of
* ``fastft_nf4``: fastft on the same weights quantised to NF4 by ``fastft.quantize``'s expert
  path (:class:`fastft.nn.ExpertsWeight4bit`, frozen), dequantised inside the GEMMs forward and
  backward; its error is against ``fastft_frozen`` on the dequantised weights. The summary has
  the 4-bit weight memory / bf16's (target <= 0.3x) and the time ratios to ``fastft_frozen`` and
  ``fastft``. On CUDA its GEMMs are the Triton NF4 grouped GEMM (tiles dequantised in-kernel).
* ``fastft_nf4_dequant`` / ``fastft_nf4_triton`` (CUDA only): the same 4-bit op forced to
  ``backend="torch"`` (each GEMM dequantises the whole weight stack, then ``torch._grouped_mm``)
  and to ``backend="triton"`` (the NF4 grouped GEMM, tiles dequantised in-kernel): the summary has
  the kernel's time and (memory workers) step peak over the dequantising path, the measurement that
  decides ``fastft.ops.experts.NF4_TRITON_MAX_ROWS_PER_EXPERT`` (what ``fastft_nf4``, "auto", runs).

Reports median / p20 / p80 ms, each provider's time / fastft's, fastft's time / the bare GEMMs,
and the max relative error of fastft's output and gradients against ``eager``.
Targets (reported, never asserted): CPU fastft >= 1.2x the fastest transformers implementation
and <= 1.15x the bare GEMM time.

LoRA on the experts (``--lora-rank``, default 16, on gate_up_proj and down_proj; 0 skips it): the
same module, base weights frozen, with PEFT ``target_parameters`` adapters (``init_lora_weights=False``,
so ``B`` is not zero), forward + backward (gradients for ``x``, the routing weights and the adapters),
timed interleaved (a loaded machine slows all alike):

* ``lora_fastft``: ``fastft.patch`` on the PEFT model: the fused LoRA experts op, no delta weight
* ``lora_peft``: plain PEFT (its parametrization forms ``W + s B A`` per call) over transformers'
  fastest built-in implementation measured above (``grouped_mm`` unless told otherwise)
* ``base_frozen``: fastft's own base expert block with the same frozen weights (no adapters)

Targets (reported): ``lora_fastft`` >= 2x ``lora_peft`` and <= 1.2x ``base_frozen``.

    python bench/bench_moe.py --quick      # seconds, any machine
    python bench/bench_moe.py              # CPU: E 8, top-2, H 1024, I 2816, 2048 tokens, fp32
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _harness as H

DEFAULTS = {
    "cpu": dict(experts=8, top_k=2, hidden=1024, intermediate=2816, tokens=2048, dtype="fp32", reps=3),
    "cuda": dict(experts=8, top_k=2, hidden=4096, intermediate=14336, tokens=8192, dtype="bf16", reps=10),
    "quick": dict(experts=4, top_k=2, hidden=64, intermediate=96, tokens=128, dtype="fp32", reps=3),
}
PROVIDERS = ("eager", "grouped_mm", "batched_mm", "fastft", "gemm", "fastft_frozen", "fastft_nf4",
             "fastft_nf4_dequant", "fastft_nf4_triton")  # fmt: skip
CUDA_ONLY = ("fastft_nf4_dequant", "fastft_nf4_triton")  # on a CPU fastft_nf4 runs the torch path itself
NF4_FORCED = {"fastft_nf4_dequant": "torch", "fastft_nf4_triton": "triton"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA-on-experts case rank (0: skip the case)")
    p.add_argument("--reps", type=int, help="timed repetitions (default: CPU 3, CUDA 10; the LoRA case 2 more)")
    p.add_argument("--_mem-worker", dest="mem_worker", help=argparse.SUPPRESS)
    H.add_common_args(p, "moe", memory="the 4-bit / 16-bit frozen peak memory")
    args = p.parse_args(argv)
    if args.mem_worker:
        return _mem_worker(args)
    t_start = time.perf_counter()
    sys.path.insert(0, H.REPO_ROOT)
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    import fastft.patching.experts as fx
    from fastft.ops.experts import experts as fastft_experts

    device = H.resolve_device(args.device)
    cfg_d = DEFAULTS["quick" if args.quick else ("cuda" if device.startswith("cuda") else "cpu")]
    if args.reps:
        cfg_d = dict(cfg_d, reps=args.reps)
    dtype = H.torch_dtype(cfg_d["dtype"])
    E, K, Hd, In, T = (cfg_d[k] for k in ("experts", "top_k", "hidden", "intermediate", "tokens"))
    torch.manual_seed(args.seed)
    cfg = MixtralConfig(hidden_size=Hd, intermediate_size=In, num_local_experts=E, num_experts_per_tok=K)
    mod = MixtralExperts(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        mod.gate_up_proj.normal_(0, Hd**-0.5)
        mod.down_proj.normal_(0, In**-0.5)
    fx.register()
    x = torch.randn(T, Hd, device=device, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(T)])
    w = torch.rand(T, K, device=device, dtype=dtype).softmax(-1).requires_grad_()
    dout = torch.randn(T, Hd, device=device, dtype=dtype)
    params = [x, w, mod.gate_up_proj, mod.down_proj]
    wanted = args.providers.split(",")
    if not device.startswith("cuda"):
        wanted = [p for p in wanted if p not in CUDA_ONLY]
    from fastft.nn import ExpertsWeight4bit

    q1 = q2 = None
    if {"fastft_nf4", "fastft_frozen", *NF4_FORCED} & set(wanted):  # the 4-bit weights and what they stand for
        q1, q2 = (ExpertsWeight4bit.from_weight(t.detach()) for t in (mod.gate_up_proj, mod.down_proj))
        d1, d2 = q1.dequantize(), q2.dequantize()

    def step(impl):
        def run():
            for t in params:
                t.grad = None
            if impl == "fastft_nf4":
                out = fastft_experts(x, idx, w, q1, q2)
            elif impl in NF4_FORCED:  # CUDA: the dequantise-the-stack path, or the Triton kernel, forced
                out = fastft_experts(x, idx, w, q1, q2, backend=NF4_FORCED[impl])
            elif impl == "fastft_frozen":
                out = fastft_experts(x, idx, w, d1, d2)
            elif impl == "fastft":
                out = fastft_experts(x, idx, w, mod.gate_up_proj, mod.down_proj)
            else:
                mod.config._experts_implementation = impl
                out = mod(x, idx, w)
            out.backward(dout)
            return out

        return run

    # the floor: the six grouped GEMMs of fwd + bwd on rows already sorted by expert
    S = T * K
    ids, _ = idx.reshape(-1).sort()
    offs = torch.searchsorted(ids, torch.arange(E, device=device), right=True).to(torch.int32)
    xs, hs = torch.randn(S, Hd, device=device, dtype=dtype), torch.randn(S, 2 * In, device=device, dtype=dtype)
    a_s, g = torch.randn(S, In, device=device, dtype=dtype), torch.randn(S, Hd, device=device, dtype=dtype)
    w1t, w2t = mod.gate_up_proj.detach().transpose(-2, -1), mod.down_proj.detach().transpose(-2, -1)

    def gemm():
        gm = torch._grouped_mm
        gm(xs, w1t, offs=offs), gm(a_s, w2t, offs=offs)  # forward
        gm(g, w2t.transpose(-2, -1), offs=offs), gm(g.T, a_s, offs=offs)  # d(a), d(down)
        gm(hs.T, xs, offs=offs), gm(hs, w1t.transpose(-2, -1), offs=offs)  # d(gate_up), d(x)

    results, grads, failed = {}, {}, {}
    for prov in wanted:
        fn = gemm if prov == "gemm" else step(prov)
        try:
            if prov != "gemm":
                out = fn()
                grads[prov] = [out.detach().clone()] + [
                    t.grad.detach().clone() if t.grad is not None else None for t in params
                ]
                del out
            results[prov] = H.time_fn(fn, warmup=0 if prov == "eager" else 1, reps=cfg_d["reps"], device=device)
        except RuntimeError as exc:  # e.g. batched_mm gathers one weight copy per (token, slot): out of memory
            failed[prov] = " ".join(str(exc).split())[:160]
            print(f"  {prov}: cannot run ({failed[prov]})", flush=True)
            continue
        print(f"  {prov}: {results[prov]['median_ms']:.1f} ms", flush=True)
    base = [p for p in ("grouped_mm", "batched_mm", "eager") if p in results]
    fastest = min(base, key=lambda p: results[p]["median_ms"]) if base else None
    rows = []
    for prov, r in results.items():
        err = err_dq = None
        if prov in grads and "eager" in grads and prov not in ("fastft_frozen", "fastft_nf4", *NF4_FORCED):
            err = max(H.rel_err(a, b) for a, b in zip(grads[prov], grads["eager"]))
        if prov.startswith("fastft_nf4") and "fastft_frozen" in grads:  # vs the same op on the dequantised weights
            err_dq = max(H.rel_err(a, b) for a, b in zip(grads[prov], grads["fastft_frozen"]) if a is not None)
        rows.append(
            dict(
                provider=prov,
                median_ms=r["median_ms"],
                p20_ms=r["p20_ms"],
                p80_ms=r["p80_ms"],
                vs_fastft=H.ratio(r["median_ms"], results["fastft"]["median_ms"]) if "fastft" in results else None,
                max_rel_err_vs_eager=err,
                max_rel_err_vs_dequantised=err_dq,
            )
        )
    rows += [dict(provider=p, status="cannot run", reason=why) for p, why in failed.items()]
    summary = {}
    if "fastft" in results:
        f = results["fastft"]["median_ms"]
        if fastest:
            summary["speedup_vs_fastest_transformers"] = H.ratio(results[fastest]["median_ms"], f)
            summary["fastest_transformers"] = fastest
        if "gemm" in results:
            summary["fastft_over_bare_gemm"] = H.ratio(f, results["gemm"]["median_ms"])
    if q1 is not None:
        numel = mod.gate_up_proj.numel() + mod.down_proj.numel()
        nf4_bytes = q1.nbytes + q2.nbytes
        summary["nf4_weight_bytes"] = nf4_bytes
        summary["bf16_weight_bytes"] = numel * 2
        summary["nf4_over_bf16_weight_memory"] = H.ratio(nf4_bytes, numel * 2)  # target <= 0.3
        if "fastft_nf4" in results:
            t4 = results["fastft_nf4"]["median_ms"]
            for base16 in ("fastft_frozen", "fastft"):
                if base16 in results:
                    summary[f"nf4_time_over_{base16}"] = H.ratio(t4, results[base16]["median_ms"])
            if {"fastft_nf4_dequant", "fastft_nf4_triton"} <= set(results):  # the NF4 kernel vs dequantise-the-stack
                tk, td = (results[p]["median_ms"] for p in ("fastft_nf4_triton", "fastft_nf4_dequant"))
                summary["nf4_kernel_time_over_dequant"] = H.ratio(tk, td)
    memory = {}
    if not args.skip_memory and {"fastft_frozen", "fastft_nf4"} <= set(results):
        script, raw = os.path.abspath(__file__), list(sys.argv[1:] if argv is None else argv)
        for prov in ("fastft_frozen", "fastft_nf4"):  # one fresh process each, one after the other
            memory[prov] = H.run_isolated(script, raw + ["--_mem-worker", prov], env=H.worker_env(device), timeout=1800)
            print(f"  {prov} memory: {memory[prov]}", flush=True)
        a, b = memory["fastft_nf4"], memory["fastft_frozen"]
        if a.get("status") == "ok" and b.get("status") == "ok":
            summary["nf4_over_frozen_resident_weights"] = H.ratio(a["weights_mib"], b["weights_mib"])
            summary["nf4_over_frozen_step_peak"] = H.ratio(a["peak_mib"], b["peak_mib"])
            summary["nf4_over_frozen_total_peak"] = H.ratio(
                a["weights_mib"] + a["peak_mib"], b["weights_mib"] + b["peak_mib"]
            )
        if {"fastft_nf4_dequant", "fastft_nf4_triton"} <= set(results):  # CUDA: the kernel's step peak vs dequant's
            for prov in ("fastft_nf4_dequant", "fastft_nf4_triton"):
                memory[prov] = H.run_isolated(script, raw + ["--_mem-worker", prov], env=H.worker_env(device),
                                              timeout=1800)  # fmt: skip
                print(f"  {prov} memory: {memory[prov]}", flush=True)
            a, b = memory["fastft_nf4_triton"], memory["fastft_nf4_dequant"]
            if a.get("status") == "ok" and b.get("status") == "ok":
                summary["nf4_kernel_step_peak_over_dequant"] = H.ratio(a["peak_mib"], b["peak_mib"])
        if args.lora_rank > 0:  # QLoRA on the experts vs LoRA on 16-bit experts: same adapters, fused op
            for prov in ("lora_16bit", "lora_nf4"):
                cmd = raw + ["--_mem-worker", prov]
                memory[prov] = H.run_isolated(script, cmd, env=H.worker_env(device), timeout=1800)
                print(f"  {prov} memory: {memory[prov]}", flush=True)
            a, b = memory["lora_nf4"], memory["lora_16bit"]
            if a.get("status") == "ok" and b.get("status") == "ok":
                summary["qlora_over_lora_resident_weights"] = H.ratio(a["weights_mib"], b["weights_mib"])
                summary["qlora_over_lora_step_peak"] = H.ratio(a["peak_mib"], b["peak_mib"])
                summary["qlora_over_lora_total_peak"] = H.ratio(
                    a["weights_mib"] + a["peak_mib"], b["weights_mib"] + b["peak_mib"]
                )
    print(
        H.markdown_table(
            rows,
            [
                "provider",
                "median_ms",
                "p20_ms",
                "p80_ms",
                "vs_fastft",
                "max_rel_err_vs_eager",
                "max_rel_err_vs_dequantised",
            ],
        )
    )
    print(summary)
    lora = None
    if args.lora_rank > 0:
        peft_impl = fastest if fastest in ("grouped_mm", "eager") else "grouped_mm"
        lora = lora_case(mod, x, idx, w, dout, args.lora_rank, peft_impl, cfg_d["reps"] + 2, device)
    payload = dict(
        env=H.env_info(device),
        config=dict(
            cfg_d, device=device, cpu_threads=torch.get_num_threads(), loaded_note=os.environ.get("BENCH_NOTE")
        ),
        rows=rows,
        summary=summary,
        lora=lora,
        memory=memory,
    )
    H.finish(args, "moe", payload, device=device, quick=args.quick, t_start=t_start)
    return 0


def lora_case(mod, x, idx, w, dout, rank, peft_impl, reps, device) -> dict:
    """LoRA r=``rank`` on gate_up_proj + down_proj: fastft fused vs PEFT target_parameters vs fastft's base block."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    import fastft
    from fastft.ops.experts import experts as fastft_experts

    class Block(torch.nn.Module):  # what an MoE block does with its experts module
        def __init__(self, experts):
            super().__init__()
            self.experts = experts

        def forward(self, *a):
            return self.experts(*a)

    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        init_lora_weights=False,
    )
    models = {}
    for name in ("lora_peft", "lora_fastft"):
        m = copy.deepcopy(mod)
        m.config = copy.copy(mod.config)
        m.config._experts_implementation = peft_impl
        torch.manual_seed(1)
        models[name] = get_peft_model(Block(m), cfg)
    report = fastft.patch(models["lora_fastft"])
    base = models["lora_peft"].base_model.model.experts.get_base_layer()
    w1, w2 = base.gate_up_proj.detach(), base.down_proj.detach()  # frozen
    leaves = [x, w]
    adapters = {n: [p for p in m.parameters() if p.requires_grad] for n, m in models.items()}

    def step(name):
        def run():
            for t in leaves + adapters.get(name, []):
                t.grad = None
            if name == "base_frozen":
                out = fastft_experts(x, idx, w, w1, w2)
            else:
                out = models[name](x, idx, w)
            out.backward(dout)
            return out

        return run

    names = ("lora_fastft", "lora_peft", "base_frozen")
    check = {}
    for n in names:  # one untimed call each: outputs and gradients to compare
        out = step(n)()
        check[n] = [out.detach().clone()] + [t.grad.clone() for t in leaves + adapters.get(n, [])]
    err = max(H.rel_err(a, b) for a, b in zip(check["lora_fastft"], check["lora_peft"]))
    peak = {}
    if device.startswith("cuda"):  # one step's peak above what is held (CPU: not measured, see the README)
        for n in names:
            H.free_memory(device)
            peak[n] = H.measure_peak_memory(step(n), device)["peak_mib"]
    res = H.time_interleaved({n: step(n) for n in names}, warmup=0, reps=reps, device=device)
    f, p, b = (res[n]["median_ms"] for n in names)
    rows = [
        dict(provider=n, median_ms=res[n]["median_ms"], p20_ms=res[n]["p20_ms"], p80_ms=res[n]["p80_ms"],
             peak_mib=peak.get(n))
        for n in names
    ]  # fmt: skip
    summary = dict(
        rank=rank,
        peft_over=peft_impl,
        peft_over_fastft=H.ratio(p, f),
        fastft_over_base_frozen=H.ratio(f, b),
        # best-of-reps ratios: the least disturbed by other processes on a loaded machine
        peft_over_fastft_min=H.ratio(res["lora_peft"]["min_ms"], res["lora_fastft"]["min_ms"]),
        fastft_over_base_frozen_min=H.ratio(res["lora_fastft"]["min_ms"], res["base_frozen"]["min_ms"]),
        max_rel_err_fastft_vs_peft=err,
        fused=not report.fallbacks and any("experts + LoRA (fused)" in q.detail for q in report.patched),
        targets="lora_fastft >= 2x lora_peft, <= 1.2x base_frozen",
    )
    print(f"\nLoRA r={rank} on gate_up_proj + down_proj (frozen base), PEFT over {peft_impl}:")
    print(H.markdown_table(rows, ["provider", "median_ms", "p20_ms", "p80_ms", "peak_mib"]))
    print(
        f"PEFT / fastft = {summary['peft_over_fastft']:.2f}x (target >= 2), fastft / base block = "
        f"{summary['fastft_over_base_frozen']:.2f}x (target <= 1.2); max rel err vs PEFT {err:.1e}"
    )
    print(
        f"best of reps: PEFT / fastft = {summary['peft_over_fastft_min']:.2f}x, fastft / base block = "
        f"{summary['fastft_over_base_frozen_min']:.2f}x"
    )
    return dict(rows=rows, summary=summary, times={n: res[n] for n in names})


def _mem_worker(args) -> int:
    """Fresh process: resident expert weights (dense frozen, or 4-bit with the dense ones freed)
    and the peak of one forward + backward above what is held before it (MiB)."""
    import gc

    sys.path.insert(0, H.REPO_ROOT)
    import torch

    from fastft.nn import ExpertsWeight4bit
    from fastft.ops.experts import experts

    device = H.resolve_device(args.device)
    cfg_d = DEFAULTS["quick" if args.quick else ("cuda" if device.startswith("cuda") else "cpu")]
    dtype = H.torch_dtype(cfg_d["dtype"])
    E, K, Hd, In, T = (cfg_d[k] for k in ("experts", "top_k", "hidden", "intermediate", "tokens"))
    torch.manual_seed(args.seed)
    x = torch.randn(T, Hd, device=device, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(T)])
    w = torch.rand(T, K, device=device, dtype=dtype).softmax(-1).requires_grad_()
    dout = torch.randn(T, Hd, device=device, dtype=dtype)
    tiny = [torch.randn(2, 64, 64, device=device, dtype=dtype), torch.randn(2, 64, 32, device=device, dtype=dtype)]
    gc.collect()
    before = H.current_bytes(device)
    w1 = torch.randn(E, 2 * In, Hd, device=device, dtype=dtype) * Hd**-0.5
    w2 = torch.randn(E, Hd, In, device=device, dtype=dtype) * In**-0.5
    if args.mem_worker in ("fastft_nf4", "lora_nf4", *NF4_FORCED):
        w1, w2 = ExpertsWeight4bit.from_weight(w1), ExpertsWeight4bit.from_weight(w2)  # the dense ones freed
        tiny = [ExpertsWeight4bit.from_weight(t) for t in tiny]
    lora, tiny_lora = {}, {}
    if args.mem_worker.startswith("lora_"):  # LoRA r on both expert weights (QLoRA's adapters; fp32 as PEFT's)
        from fastft.ops.experts import ExpertsLora

        r = args.lora_rank

        def factors(e, out_f, in_f):
            a = (torch.randn(e, r, in_f, device=device) * in_f**-0.5).requires_grad_()
            return ExpertsLora(a, (torch.randn(e, out_f, r, device=device) * r**-0.5).requires_grad_(), 2.0)

        lora = dict(lora_gate_up=factors(E, 2 * In, Hd), lora_down=factors(E, Hd, In))
        tiny_lora = dict(lora_gate_up=factors(2, 64, 64), lora_down=factors(2, 64, 32))
    gc.collect()
    weights = (H.current_bytes(device) - before) / 2**20 if before is not None else None

    def step():
        x.grad = w.grad = None
        for f in lora.values():
            f.A.grad = f.B.grad = None
        experts(x, idx, w, w1, w2, **lora, backend=backend).backward(dout)

    def prime():  # tiny: pages in the code paths without leaving full-size blocks cached
        xt = torch.randn(4, 64, device=device, dtype=dtype, requires_grad=True)
        ones = torch.ones(4, 1, device=device, dtype=dtype)
        idx0 = torch.zeros(4, 1, dtype=torch.long, device=device)
        experts(xt, idx0, ones, *tiny, **tiny_lora, backend=backend).sum().backward()

    backend = NF4_FORCED.get(args.mem_worker, "auto")  # (CUDA only: see CUDA_ONLY)
    peak = H.measure_peak_memory(step, device, prime=prime)
    payload = dict(status="ok", provider=args.mem_worker, weights_mib=weights, peak_mib=peak["peak_mib"])
    H.emit_worker_result(dict(payload, method=peak["method"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
