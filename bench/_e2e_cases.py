"""The cases of ``bench_e2e.py``: shapes, providers, targets, the models and the training step.

What one provider of the end-to-end bench *is* lives here, and nothing about how it is timed
(``_e2e_worker.py``) or reported (``_e2e_report.py``):

* the configuration: the per-device defaults (:data:`DEFAULTS`, :data:`QUICK`), the flags on top
  (:func:`resolve`, deterministic: every worker process redoes it from the same argv), and the
  targets (:data:`TARGETS`);
* the models: the dense Llama of modes ``lora`` / ``qlora`` (:func:`llama_config`) and the
  Qwen3-MoE-like model of mode ``moe`` (:func:`moe_config`), their parameter counts computed from
  the shape;
* :func:`build`: the PEFT model of a provider (patched, checkpointed, compiled, ...);
* :func:`make_batch` and :class:`Trainer` (forward with labels, backward, AdamW step, zero_grad).

Compiled providers (``<provider>+compile``) wrap the model that ``<provider>`` trains in
``torch.compile(model, mode=cfg["compile_mode"])`` (inductor); the optimizer step stays eager.
"""

from __future__ import annotations

import argparse
import gc

import _harness as H

Skip = H.Skip

MODES = ("lora", "qlora", "moe")
PROVIDERS = (
    "peft", "fastft", "fastft+ckpt", "peft+ckpt", "peft+compile", "fastft+compile", "liger", "liger+compile",
)  # fmt: skip
ALIASES = {"compile": "peft+compile"}  # the old name of the compiled reference
REFERENCE = "peft"
# what a compiled provider compiles: the eager provider it is built as
COMPILED = {"peft+compile": "peft", "fastft+compile": "fastft", "liger+compile": "liger"}
# --compile: the providers one run adds, in this order (eager fastft, compiled fastft, compiled PEFT)
COMPILE_SET = {"cpu": ("fastft", "fastft+compile", "peft+compile"),
               "cuda": ("fastft", "fastft+compile", "peft+compile", "liger", "liger+compile")}  # fmt: skip
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# pairs reported beside the ratio to the reference: provider -> the providers it is compared with
COMPARE = {
    "fastft+compile": ("peft+compile", "fastft"),
    "peft+compile": ("fastft",),
    "liger+compile": ("liger", "fastft+compile"),
}

MODEL_KEYS = ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab", "tie")
MOE_KEYS = ("moe_layers", "experts", "top_k", "moe_intermediate")
DEFAULTS = {
    # ~58M parameters (Llama-2-style, untied head); MoE: ~50M (Qwen3-MoE-like, 8 experts, top-2)
    "cpu": dict(
        hidden=512, layers=8, intermediate=1408, heads=8, kv_heads=8, vocab=32000, tie=False,
        moe_layers=4, experts=8, top_k=2, moe_intermediate=256,
        seq=512, batch=1, dtype="fp32", steps=8, warmup=2, modes="lora,moe",
        providers="peft,fastft,fastft+ckpt", budget_gb=4.0, max_seq_cap=16384, max_seq_start=1024,
        max_seq_search=False, max_seq_providers="peft,fastft,fastft+ckpt",
    ),
    # ~1.0B parameters (Llama-3.2-1B-like: 128256 vocab, tied embeddings, GQA 32 / 8 heads);
    # MoE (opt in: --modes moe): ~1.1B, 16 experts, top-4
    "cuda": dict(
        hidden=2048, layers=16, intermediate=5632, heads=32, kv_heads=8, vocab=128256, tie=True,
        moe_layers=8, experts=16, top_k=4, moe_intermediate=1024,
        seq=2048, batch=4, dtype="bf16", steps=10, warmup=3, modes="lora,qlora",
        providers="peft,fastft,fastft+ckpt,peft+compile,liger", budget_gb=80.0, max_seq_cap=131072,
        max_seq_start=4096, max_seq_search=True, max_seq_providers="peft,fastft,fastft+ckpt",
    ),
}  # fmt: skip
QUICK = dict(
    hidden=64, layers=2, intermediate=192, heads=4, kv_heads=4, vocab=512, tie=False, seq=64, batch=2,
    moe_layers=2, experts=4, top_k=2, moe_intermediate=32,
    steps=2, warmup=1, max_seq_cap=512, max_seq_start=128, budget_gb=2.0,
)  # fmt: skip
SHAPE_KEYS = MODEL_KEYS + MOE_KEYS + ("seq", "batch", "dtype")

LORA = dict(r=16, alpha=32)
LR = 1e-3
IGNORE_FRAC = 0.05
# agreement of the last loss with the reference's: relative difference
LOSS_RTOL = {"fp32": 1e-3, "bf16": 2e-2}
SEQ_ROUND = 64  # sequence lengths probed by the search are multiples of this

# (label, mode, metric, provider, versus, op, limit); metric: "speedup" = tokens/s ratio,
# "mem" = step peak ratio, "total_mem" = total peak ratio, "max_seq" = longest sequence ratio
TARGETS = {
    "cpu": [
        ("LoRA fp32: fastft tokens/s >= 1.2x peft", "lora", "speedup", "fastft", "peft", ">=", 1.2),
        ("LoRA fp32: fastft step peak RSS <= 0.6x peft", "lora", "mem", "fastft", "peft", "<=", 0.6),
        ("LoRA fp32: fastft+ckpt tokens/s >= 1.2x peft", "lora", "speedup", "fastft+ckpt", "peft", ">=", 1.2),
        ("LoRA fp32: fastft+ckpt step peak RSS <= 0.6x peft", "lora", "mem", "fastft+ckpt", "peft", "<=", 0.6),
        ("LoRA fp32 compiled: fastft+compile tokens/s >= 1.2x peft+compile", "lora", "speedup", "fastft+compile",
         "peft+compile", ">=", 1.2),
        ("LoRA fp32 compiled: fastft+compile tokens/s >= fastft (eager)", "lora", "speedup", "fastft+compile",
         "fastft", ">=", 1.0),
    ],
    "cuda": [
        ("QLoRA: fastft tokens/s >= 2x peft+bnb", "qlora", "speedup", "fastft", "peft", ">=", 2.0),
        ("QLoRA: fastft peak memory <= 0.5x peft+bnb", "qlora", "total_mem", "fastft", "peft", "<=", 0.5),
        ("LoRA bf16: fastft tokens/s >= 1.5x peft", "lora", "speedup", "fastft", "peft", ">=", 1.5),
        ("LoRA: fastft+ckpt longest sequence >= 4x peft", "lora", "max_seq", "fastft+ckpt", "peft", ">=", 4.0),
        ("QLoRA: fastft+ckpt longest sequence >= 4x peft+bnb", "qlora", "max_seq", "fastft+ckpt", "peft", ">=", 4.0),
        ("LoRA: fastft tokens/s >= liger", "lora", "speedup", "fastft", "liger", ">=", 1.0),
        ("QLoRA: fastft tokens/s >= liger", "qlora", "speedup", "fastft", "liger", ">=", 1.0),
        ("LoRA bf16 compiled: fastft+compile tokens/s >= 1.2x peft+compile", "lora", "speedup", "fastft+compile",
         "peft+compile", ">=", 1.2),
        ("LoRA bf16 compiled: fastft+compile tokens/s >= fastft (eager)", "lora", "speedup", "fastft+compile",
         "fastft", ">=", 1.0),
        ("LoRA bf16 compiled: fastft+compile tokens/s >= liger+compile", "lora", "speedup", "fastft+compile",
         "liger+compile", ">=", 1.0),
    ],
}  # fmt: skip


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
def csv(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def providers_of(names: str | None) -> list[str]:
    """``--providers`` as a list, old names mapped to the current ones (``compile`` -> ``peft+compile``)."""
    return [ALIASES.get(n, n) for n in csv(names)]


def resolve(args: argparse.Namespace) -> dict:
    """The defaults of the device, then --quick, then the flags. Deterministic: the workers redo it."""
    device = H.resolve_device(args.device)
    cfg = dict(DEFAULTS[device])
    if args.quick:
        cfg.update(QUICK)
    for k in (*MODEL_KEYS, *MOE_KEYS, "seq", "batch", "dtype", "steps", "warmup", "modes", "providers", "budget_gb",
              "max_seq_cap", "max_seq_start", "max_seq_search", "max_seq_providers"):  # fmt: skip
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    cfg["modes"] = list(dict.fromkeys(csv(cfg["modes"]))) or ["lora"]
    provs = providers_of(cfg["providers"])
    cfg["compile_mode"] = args.compile or "default"
    cfg["compile_moe"] = bool(getattr(args, "compile_moe", False))
    cfg["compile_backend"] = getattr(args, "compile_backend", None) or "inductor"
    if args.compile is not None:  # --compile [MODE]: eager fastft, compiled fastft, compiled PEFT (+ Liger's)
        provs += list(COMPILE_SET[device])
    cfg["providers"] = [REFERENCE] + [p for p in dict.fromkeys(provs) if p != REFERENCE]
    cfg["max_seq_providers"] = [p for p in dict.fromkeys(providers_of(cfg["max_seq_providers"]))
                                if p in cfg["providers"]]  # fmt: skip
    repeats = args.repeats if args.repeats is not None else (3 if device == "cpu" and not args.quick else 1)
    cfg.update(
        device=device, quick=args.quick, seed=args.seed, lora_dropout=args.lora_dropout, repeats=max(1, repeats),
        lora_r=LORA["r"], lora_alpha=LORA["alpha"], lr=LR, ignore_frac=IGNORE_FRAC,
        attention="sdpa",
    )  # fmt: skip
    cfg["at_target_shape"] = all(cfg[k] == DEFAULTS[device][k] for k in SHAPE_KEYS) and not args.quick
    cfg["tokens_per_step"] = cfg["seq"] * cfg["batch"]
    return cfg


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------
def llama_config(cfg: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=max(cfg["seq"], cfg["max_seq_cap"]),
        tie_word_embeddings=cfg["tie"],
        rope_theta=500000.0,
        use_cache=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def moe_config(cfg: dict):
    """A Qwen3-MoE-like config: every layer sparse (``decoder_sparse_step`` 1), top-k routing with the
    top-k weights renormalised, q/k norms, no router aux loss (``output_router_logits`` False)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],  # unused: no dense MLP layer (mlp_only_layers empty)
        moe_intermediate_size=cfg["moe_intermediate"],
        num_hidden_layers=cfg["moe_layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        head_dim=cfg["hidden"] // cfg["heads"],
        num_experts=cfg["experts"],
        num_experts_per_tok=cfg["top_k"],
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=max(cfg["seq"], cfg["max_seq_cap"]),
        tie_word_embeddings=cfg["tie"],
        use_cache=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _attn_params(cfg: dict) -> int:
    h = cfg["hidden"]
    hd = h // cfg["heads"]
    return h * h * 2 + 2 * h * cfg["kv_heads"] * hd


def count_params(cfg: dict) -> int:
    """Parameters of the dense model (computed from the shape, nothing built)."""
    h, i, L, V = cfg["hidden"], cfg["intermediate"], cfg["layers"], cfg["vocab"]
    layer = _attn_params(cfg) + 3 * h * i + 2 * h
    return V * h * (1 if cfg["tie"] else 2) + L * layer + h


def count_moe_params(cfg: dict) -> tuple[int, int]:
    """(total, active per token) parameters of the MoE model (computed from the shape, nothing built):
    per layer attention + q/k norms + router + experts (``gate_up`` ``[E, 2I, H]``, ``down`` ``[E, H, I]``)."""
    h, L, V, E, k, i = (cfg[n] for n in ("hidden", "moe_layers", "vocab", "experts", "top_k", "moe_intermediate"))
    hd = h // cfg["heads"]
    shared = _attn_params(cfg) + 2 * hd + E * h + 2 * h
    emb = V * h * (1 if cfg["tie"] else 2) + h
    return emb + L * (shared + E * 3 * h * i), emb + L * (shared + k * 3 * h * i)


def bnb_quantize(model, compute_dtype) -> None:
    """Replace every ``nn.Linear`` but the LM head by a bitsandbytes NF4 ``Linear4bit`` (what
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``
    loads), quantising the same weights."""
    from torch import nn

    try:
        import bitsandbytes as bnb
    except Exception as exc:
        raise Skip(f"bitsandbytes not importable ({type(exc).__name__}: {exc})") from None
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name != "lm_head":
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True, device="meta",
                )  # fmt: skip
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
                )
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data)
                setattr(module, child_name, q.to(child.weight.device))
                del child


def build(cfg: dict, mode: str, provider: str):
    """The model of ``provider`` (a PEFT model in train mode), the model to call, the patch report and a
    note; raises Skip."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dev = cfg["device"]
    dtype = H.torch_dtype(cfg["dtype"])
    base = COMPILED.get(provider, provider)  # what a compiled provider compiles
    if base == "liger" and not dev.startswith("cuda"):
        raise Skip("liger-kernel runs on CUDA only")
    if provider in COMPILED and mode == "qlora":
        raise Skip(
            "torch.compile in mode qlora is not measured (PEFT over bitsandbytes' Linear4bit is not traced "
            "here; the compiled rows are mode lora's)"
        )
    if mode == "moe" and base == "liger":
        raise Skip("liger's MoE kernels are not measured")
    if mode == "moe" and provider in COMPILED and not cfg.get("compile_moe"):
        # PEFT's ParamWrapper on the router's 2-D weight (all-linear wraps it) breaks the graph in its
        # parametrization, patched or not (fastft's experts op itself is an operator: no break); --compile-moe
        # measures it anyway
        raise Skip(
            "torch.compile of the MoE model is not measured by default (graph breaks in PEFT's ParamWrapper "
            "on the router weight); --compile-moe to run it"
        )
    if cfg["compile_mode"] not in COMPILE_MODES:
        raise Skip(f"unknown torch.compile mode {cfg['compile_mode']!r}; choose from {', '.join(COMPILE_MODES)}")
    liger_apply = None
    if base == "liger":
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance as liger_apply
        except Exception as exc:
            raise Skip(f"liger-kernel not importable ({type(exc).__name__}: {exc})") from None
    torch.manual_seed(cfg["seed"])
    ctx = torch.device(dev) if dev.startswith("cuda") else torch.device("cpu")
    hf_config = moe_config(cfg) if mode == "moe" else llama_config(cfg)
    with ctx:  # built on the device: the same seeded weights in every process
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=dtype)
    note = ""
    if mode == "qlora":
        if base.startswith("fastft"):
            import fastft

            fastft.quantize(model)
            note = "fastft.quantize (NF4, blocksize 64, double quant)"
        else:
            bnb_quantize(model, dtype)
            note = "bitsandbytes Linear4bit NF4 (blocksize 64, double quant)"
    target_parameters = None
    if mode == "moe":  # what fastft's trainer does: all-linear + the experts' 3-D weights
        from fastft.patching.experts import expert_target_parameters

        target_parameters = expert_target_parameters(model) or None
        note = f"experts: {model.config._experts_implementation}; LoRA target_parameters={target_parameters}"
    gc.collect()
    torch.manual_seed(cfg["seed"] + 1)  # the same adapter init for every provider
    lcfg = LoraConfig(
        r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
        target_modules="all-linear", target_parameters=target_parameters, task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, lcfg)
    report = None

    def add(text):
        nonlocal note
        note = (note + "; " if note else "") + text

    if base == "peft+ckpt":
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        add("transformers gradient checkpointing (non-reentrant)")
    elif base.startswith("fastft"):
        import fastft

        report = fastft.patch(model, checkpointing="recompute" if base == "fastft+ckpt" else None)
    elif base == "liger":
        try:
            liger_apply(model=model.get_base_model())
        except Exception as exc:
            raise Skip(f"liger-kernel could not be applied ({type(exc).__name__}: {exc})") from None
        add("liger _apply_liger_kernel_to_instance")
    model.train()
    run_model = model
    if provider in COMPILED:
        if report is not None:
            # fastft checks the model's loss convention at its first training call, eagerly (a graph break
            # under tracing, then a recompile): done here on a tiny batch, as a trainer's first step would
            with torch.no_grad():
                model(**make_batch(cfg, 10**6 + 7, batch=1, seq=16))
        mode_arg = None if cfg["compile_mode"] == "default" else cfg["compile_mode"]
        backend = cfg.get("compile_backend", "inductor")
        if backend == "inductor":
            run_model = torch.compile(model, mode=mode_arg)
        else:  # a test's cheap stand-in: the same tracing, no code generation (a mode is inductor's)
            run_model = torch.compile(model, backend=backend)
        add(f"torch.compile(model, mode={mode_arg!r}, backend={backend!r})")
    return model, run_model, report, note


# --------------------------------------------------------------------------------------
# data and the step
# --------------------------------------------------------------------------------------
def make_batch(cfg: dict, index: int, *, batch: int | None = None, seq: int | None = None):
    """Batch number ``index``: seeded random ids, ~5% of the labels -100 (the same on every device)."""
    import torch

    b, s = batch or cfg["batch"], seq or cfg["seq"]
    g = torch.Generator().manual_seed(cfg["seed"] * 100003 + 17 + index)
    ids = torch.randint(3, cfg["vocab"], (b, s), generator=g)
    labels = ids.clone()
    labels[torch.rand(b, s, generator=g) < cfg["ignore_frac"]] = -100
    return {"input_ids": ids.to(cfg["device"]), "labels": labels.to(cfg["device"])}


class Trainer:
    """The training step every provider runs: forward with labels, backward, AdamW step, zero_grad.

    ``cudagraphs`` (``torch.compile(mode="reduce-overhead")``): each step is marked as a new CUDA-graph
    iteration and its loss cloned out of the graph's output buffer (the next replay overwrites it)."""

    def __init__(self, model, run_model, cfg: dict, *, cudagraphs: bool = False):
        import torch

        self.model, self.run_model = model, run_model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg["lr"], weight_decay=0.0)
        self.cudagraphs = cudagraphs

    def _loss(self, batch):
        if self.cudagraphs:
            import torch

            torch.compiler.cudagraph_mark_step_begin()
        return self.run_model(**batch).loss  # the output (logits, if any) is dropped at once

    def step(self, batch):
        loss = self._loss(batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach().clone() if self.cudagraphs else loss.detach()

    def fwd_bwd(self, batch):
        """Forward + backward without an optimizer step (priming); grads cleared afterwards."""
        self._loss(batch).backward()
        self.model.zero_grad(set_to_none=True)


def trainer_for(cfg: dict, provider: str, model, run_model) -> Trainer:
    cudagraphs = provider in COMPILED and cfg["compile_mode"] == "reduce-overhead"
    return Trainer(model, run_model, cfg, cudagraphs=cudagraphs)
