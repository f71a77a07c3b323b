"""The MoE experts op under torch.compile (issue 15 meets issue 16).

16-bit experts (LoRA on them or not) run the operators ``fastft::experts_fwd`` / ``experts_bwd``
(:mod:`fastft.ops.experts_op`): ``opcheck`` passes (fp32 and bf16, biases, the transposed gpt-oss
layout, LoRA on either GEMM with adapters in another dtype, odd sizes that take the per-expert
loop), the public function compiles with ``fullgraph=True``, and a patched tiny Qwen3-MoE /
Mixtral / OLMoE (and gpt-oss) training step compiles with ``fullgraph=True`` where the unpatched model with
transformers' ``grouped_mm`` experts does, to the eager patched loss and gradients. With PEFT
LoRA on the experts (``target_parameters``) the unpatched step breaks in PEFT's parametrization
(17 breaks at these sizes, measured); the patched one replaces that forward and compiles as one
graph. 4-bit (NF4) experts run ``fastft::experts_4bit_fwd`` / ``experts_4bit_bwd``
(:mod:`fastft.ops.experts_op4bit`) under compile: ``opcheck`` passes, and a QLoRA step (4-bit linear
layers and experts, LoRA on both) compiles as one graph; mixed 4-bit / 16-bit experts keep the autograd
Function (a graph break) and the report says so.
"""

from __future__ import annotations

import re
import sys
import warnings

import pytest
import torch
from _compile import (
    compiled_matches_eager,
    graph_nodes,
    model_step,
    no_graph_breaks,
    step_breaks,
    step_compiles_to_eager,
)

import fastft
from fastft.nn import ExpertsWeight4bit
from fastft.ops.experts import ExpertsActivation, experts
from fastft.ops.experts_lora import ExpertsLora

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from zoo_configs import tiny_config  # noqa: E402

FAMILIES = ["qwen3_moe", "mixtral", "olmoe"]
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


# --------------------------------------------------------------------------------------
# the operators
# --------------------------------------------------------------------------------------
def _op_args(dtype, *, bias=False, transposed=False, lora=None, lora_dtype=None, H=16, IN=24, E=4, T=7, K=2):
    """experts_fwd's arguments (leaves requiring grad)."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).requires_grad_()

    x = leaf(T, H)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g).to(dtype).requires_grad_()
    w1 = leaf(*((E, H, 2 * IN) if transposed else (E, 2 * IN, H)), scale=H**-0.5)
    w2 = leaf(*((E, IN, H) if transposed else (E, H, IN)), scale=IN**-0.5)
    b1, b2 = (leaf(E, 2 * IN, scale=0.1), leaf(E, H, scale=0.1)) if bias else (None, None)
    ld = lora_dtype or dtype
    A1 = B1 = A2 = B2 = None
    if lora in ("gate_up", "both"):
        A1, B1 = leaf(E, 3, H, dt=ld), leaf(E, 2 * IN, 3, dt=ld)
    if lora in ("down", "both"):
        A2, B2 = leaf(E, 2, IN, dt=ld), leaf(E, H, 2, dt=ld)
    act = "gpt_oss" if transposed else "silu"
    return (x, idx, w, w1, w2, b1, b2, A1, B1, A2, B2, act, 1.702, 1.5, transposed, 0.5, 2.0)


OP_CASES = {
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16),
    "fp32-bias-transposed": dict(dtype=torch.float32, bias=True, transposed=True),
    "bf16-bias-transposed": dict(dtype=torch.bfloat16, bias=True, transposed=True),
    "fp32-lora": dict(dtype=torch.float32, lora="both"),
    "bf16-bias-fp32-lora": dict(dtype=torch.bfloat16, bias=True, lora="both", lora_dtype=torch.float32),
    "bf16-lora-down-transposed": dict(dtype=torch.bfloat16, transposed=True, lora="down"),
    "fp32-odd-lora-gate-up": dict(dtype=torch.float32, bias=True, lora="gate_up", H=13, IN=7),  # per-expert loop
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_experts_ops_opcheck(case):
    args = _op_args(**OP_CASES[case])
    torch.library.opcheck(torch.ops.fastft.experts_fwd.default, args)
    plain = [a.detach() if torch.is_tensor(a) else a for a in args]
    x, idx, w, w1, w2, b1, b2, A1, B1, A2, B2, act, alpha, limit, transposed, s1, s2 = plain
    saved = torch.ops.fastft.experts_fwd(*plain)[1:]
    bwd_args = (torch.randn_like(x), x, w1, w2, b2, A1, B1, A2, B2, *saved, act, alpha, limit, transposed, s1, s2, 2)
    present = [t is not None for t in (x, w, w1, w2, b1, b2, A1, B1, A2, B2)]
    for pattern in ([1] * 10, [1, 0, 0, 1, 0, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 1, 0, 1, 1, 0]):
        needs = [bool(n) and p for n, p in zip(pattern, present)]
        torch.library.opcheck(torch.ops.fastft.experts_bwd.default, (*bwd_args, needs))


@pytest.mark.parametrize("case", ["fp32-bias-transposed", "fp32-lora"])
def test_experts_fullgraph(case):
    """The public function: one graph, the eager output and gradients (adapter factors as views)."""
    args = _op_args(**OP_CASES[case])
    x, idx, w, w1, w2, b1, b2, A1, B1, A2, B2, kind, alpha, limit, transposed, s1, s2 = args
    act = ExpertsActivation(kind, alpha, limit)
    inputs = [t for t in (x, w, w1, w2, b1, b2, A1, B1, A2, B2) if t is not None]
    names = [
        n
        for n, t in zip("x w w1 w2 b1 b2 A1 B1 A2 B2".split(), (x, w, w1, w2, b1, b2, A1, B1, A2, B2))
        if t is not None
    ]

    def fn(*ts):
        t = dict(zip(names, ts))
        l1 = ExpertsLora(t["A1"], t["B1"], s1) if "A1" in t else None
        l2 = ExpertsLora(t["A2"], t["B2"], s2) if "A2" in t else None
        return experts(
            t["x"] * 2.0, idx, t["w"], t["w1"], t["w2"], t.get("b1"), t.get("b2"), act=act, transposed=transposed,
            lora_gate_up=l1, lora_down=l2,
        )  # fmt: skip

    no_graph_breaks(fn, *inputs, one_graph=True)
    compiled_matches_eager(fn, inputs, atol=1e-5, rtol=1e-5, some_grads=True)


def test_expert_ids_range_checked_at_run_time_under_compile():
    """The one data-dependent check is skipped while tracing and made by the operator when it runs
    (CPU tensors): a compiled call with an id out of range raises the eager ValueError."""
    x, idx, w, w1, w2, *_ = _op_args(torch.float32)

    def fn(x, idx):
        return experts(x, idx, w, w1, w2)

    bad = idx.clone()
    bad[3, 1] = w1.shape[0]
    with pytest.raises(ValueError, match=r"top_k_index values must lie in \[0, 4\)"):
        experts(x, bad, w, w1, w2)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, idx), fn(x, idx))
    with pytest.raises(ValueError, match=r"top_k_index values must lie in \[0, 4\)"):
        compiled(x, bad)


# --------------------------------------------------------------------------------------
# patched tiny MoE models
# --------------------------------------------------------------------------------------
def _model(family, impl="grouped_mm", layers=None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(family)
    if layers is not None:  # fewer decoder layers: less to trace
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = cfg.layer_types[:layers]
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # tiny random init leaves some weights at zero: make the experts and router count
        for n, p in model.named_parameters():
            if "experts" in n or "router" in n or "gate" in n:
                p.normal_(0, 0.2)
    model.config._experts_implementation = impl
    return model


def _batch(model, T=10):
    from fastft.testing import tiny_batch

    return tiny_batch(model.config.vocab_size, seq=T)


def _n_experts_modules(model) -> int:
    from fastft.patching.experts import is_experts_module

    return sum(1 for m in model.modules() if is_experts_module(m))


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_oss"])  # gpt-oss: transposed weights, biases, its activation
def test_patched_moe_step_compiles_fullgraph(family):
    warnings.filterwarnings("ignore")
    plain = _model(family)
    batch = _batch(plain)
    assert step_breaks(plain, batch)[0] == 0  # transformers' grouped_mm experts compile as one graph

    model = _model(family)
    report = fastft.patch(model)
    assert "experts" in report.features()
    assert report.compile_ready().startswith("compile-ready: yes"), report.compile_ready()
    model_step(model)(**batch)  # the loss convention check, eagerly
    graphs = []
    step_compiles_to_eager(model, batch, some_grads=True, graphs=graphs)  # fullgraph: no break
    assert graph_nodes(graphs).count("experts_fwd") == _n_experts_modules(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_peft_moe_lora_step_compiles_fullgraph(family):
    """PEFT LoRA on the experts (and q_proj): PEFT's ParamWrapper forward breaks the unpatched graph
    (parametrization); the fused forward that replaces it has none, and the compiled step gives the
    eager patched loss and the LoRA gradients."""
    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=TARGETS, init_lora_weights=False)
    torch.manual_seed(2)
    model = get_peft_model(_model(family), cfg)
    batch = _batch(model)
    report = fastft.patch(model)
    assert any(p.feature == "experts" and "LoRA" in p.target for p in report.patched)
    assert report.compile_ready().startswith("compile-ready: yes"), report.compile_ready()
    model_step(model)(**batch)
    graphs = []
    grads = step_compiles_to_eager(model, batch, some_grads=True, graphs=graphs)  # fullgraph: no break
    assert graph_nodes(graphs).count("experts_fwd") == _n_experts_modules(model)
    assert sum("experts" in n and "lora_" in n for n in grads) == 4 * _n_experts_modules(model)
    assert not report.fallbacks


def test_peft_all_linear_moe_breaks_only_in_peft():
    """What fastft's trainer builds (``all-linear`` plus the experts' ``target_parameters``): PEFT also
    wraps the router's 2-D weight in a ParamWrapper, whose parametrization breaks the graph, patched
    or not (fastft keeps PEFT's forward there). No break is in fastft's code, and every experts
    module is one fastft::experts_fwd node."""
    from peft import LoraConfig, get_peft_model

    from fastft.patching.experts import expert_target_parameters

    warnings.filterwarnings("ignore")
    base = _model("qwen3_moe")
    cfg = LoraConfig(r=4, target_modules="all-linear", target_parameters=expert_target_parameters(base))
    model = get_peft_model(base, cfg)
    batch = _batch(model)
    report = fastft.patch(model)
    assert report.compile_ready().startswith("compile-ready: yes")
    model.train()
    model_step(model)(**batch)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(model_step(model))(**batch)
    in_fastft = [
        str(b.reason).splitlines()[0]
        for b in explain.break_reasons
        if any("/fastft/" in f.filename for f in b.user_stack)
    ]
    assert not in_fastft
    nodes = re.findall(r"torch\.ops\.fastft\.(\w+)", "".join(g.code for g in explain.graphs))
    assert nodes.count("experts_fwd") == _n_experts_modules(model)


# --------------------------------------------------------------------------------------
# 4-bit (NF4) experts: fastft::experts_4bit_fwd / experts_4bit_bwd
# --------------------------------------------------------------------------------------
def _q4(dtype, *, double_quant=True, transposed=False, bias=False, lora=None, cache_absmax=False, E=4, T=7, K=2):
    """(x, idx, w, q1, q2, b1, b2, A1, B1, A2, B2, act, alpha, limit, transposed, s1, s2): 4-bit weights."""
    H, IN = 64, 32  # the gate/up GEMM reads in blocks of 64 along H; the down one's 64-blocks span rows
    x, idx, w, w1, w2, b1, b2, A1, B1, A2, B2, *rest = _op_args(
        dtype, bias=bias, transposed=transposed, lora=lora, H=H, IN=IN, E=E, T=T, K=K
    )
    kw = dict(transposed=transposed, double_quant=double_quant, cache_absmax=cache_absmax)
    q1, q2 = (ExpertsWeight4bit.from_weight(t.detach(), **kw) for t in (w1, w2))
    return (x, idx, w, q1, q2, b1, b2, A1, B1, A2, B2, *rest)


Q4_CASES = {  # between them: fp32 / bf16, double quant or not, the transposed gpt-oss layout, biases, LoRA
    "fp32-bias-transposed-lora": dict(dtype=torch.float32, bias=True, transposed=True, lora="both"),
    "bf16-no-dq-lora-gate-up": dict(dtype=torch.bfloat16, double_quant=False, lora="gate_up"),
}


@pytest.mark.parametrize("case", list(Q4_CASES))
def test_experts_4bit_ops_opcheck(case, monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "torch")  # the dequantisation's backend: no C++ extension load (~10 s)
    x, idx, w, q1, q2, b1, b2, A1, B1, A2, B2, act, alpha, limit, transposed, s1, s2 = _q4(**Q4_CASES[case])
    tail = (act, alpha, limit, transposed, s1, s2)
    args = (x, idx, w, *q1.op_args(), *q2.op_args(), b1, b2, A1, B1, A2, B2, *tail, "torch")
    torch.library.opcheck(torch.ops.fastft.experts_4bit_fwd.default, args)
    plain = [a.detach() if torch.is_tensor(a) else a for a in args]
    saved = torch.ops.fastft.experts_4bit_fwd(*plain)[1:]
    x, w, b1, b2, A1, B1, A2, B2 = (t.detach() if t is not None else None for t in (x, w, b1, b2, A1, B1, A2, B2))
    bwd = (torch.randn_like(x), x, *q1.op_args(), *q2.op_args(), b2, A1, B1, A2, B2, *saved, *tail, 2, "torch")
    present = [t is not None for t in (x, w, b1, b2, A1, B1, A2, B2)]
    for pattern in ([1] * 8, [0, 1, 1, 0, 0, 1, 1, 0]):
        needs = [bool(n) and p for n, p in zip(pattern, present)]
        torch.library.opcheck(torch.ops.fastft.experts_4bit_bwd.default, (*bwd, needs))


def test_experts_4bit_fullgraph(monkeypatch):
    """The public function over two 4-bit weights (transposed, biases, LoRA on both GEMMs, kept fp32 scales
    on one): one graph with one fastft::experts_4bit_fwd, the eager output (the autograd Function) and
    gradients of x, the routing weights, the biases and the adapters; an expert id out of range is the
    operator's ValueError when the compiled graph runs."""
    monkeypatch.setenv("FASTFT_BACKEND", "torch")
    x, idx, w, q1, q2, b1, b2, A1, B1, A2, B2, kind, alpha, limit, transposed, s1, s2 = _q4(
        torch.float32, transposed=True, bias=True, lora="both"
    )
    q1 = ExpertsWeight4bit.from_weight(q1.dequantize(), transposed=True, cache_absmax=True)
    act = ExpertsActivation(kind, alpha, limit)

    def fn(idx, x, w, b1, b2, A1, B1, A2, B2):
        l1, l2 = ExpertsLora(A1, B1, s1), ExpertsLora(A2, B2, s2)
        return experts(x * 2.0, idx, w, q1, q2, b1, b2, act=act, transposed=True, lora_gate_up=l1, lora_down=l2)

    graphs = []
    compiled = compiled_matches_eager(fn, [idx, x, w, b1, b2, A1, B1, A2, B2], some_grads=True, graphs=graphs)
    assert re.findall(r"torch\.ops\.fastft\.(\w+)", "".join(graphs)) == ["experts_4bit_fwd"]
    bad = idx.clone()
    bad[3, 1] = 4
    with pytest.raises(ValueError, match=r"top_k_index values must lie in \[0, 4\)"):
        compiled(bad, x, w, b1, b2, A1, B1, A2, B2)
    assert len(graphs) == 1  # the same graph ran


def _qlora_model(family, T):
    """A one-layer QLoRA MoE: PEFT LoRA on q_proj and on the experts (built on the 16-bit model), then
    fastft.quantize."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=TARGETS, init_lora_weights=False)
    torch.manual_seed(2)
    model = get_peft_model(_model(family, impl="eager", layers=1), cfg)
    fastft.quantize(model)
    return model, _batch(model, T)


# gpt_oss passes too (~5 s more on the 2-core CPU, over CI's budget): its transposed layout and biases
# under compile are test_experts_4bit_fullgraph's and the opcheck's
@pytest.mark.parametrize("family", ["qwen3_moe"])
def test_patched_qlora_moe_step_compiles_fullgraph(family, monkeypatch):
    """QLoRA over 4-bit experts and 4-bit linear layers, LoRA on both: the patched training step compiles
    with fullgraph=True (before, with the autograd Function, the two-layer model's step had 17 graph breaks,
    gpt-oss' 18, measured with explain), each experts module one fastft::experts_4bit_fwd node, to the eager loss and LoRA
    gradients; the report says compile-ready."""
    from fastft.nn import Linear4bit

    warnings.filterwarnings("ignore")
    monkeypatch.setenv("FASTFT_BACKEND", "torch")
    model, batch = _qlora_model(family, T=6)
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    report = fastft.patch(model)
    assert report.compile_ready().startswith("compile-ready: yes"), report.compile_ready()
    model.train()
    model_step(model)(**batch)  # the loss convention check, eagerly
    graphs = []
    grads = step_compiles_to_eager(model, batch, some_grads=True, graphs=graphs)
    assert len(graphs) == 1  # fullgraph: no break at all
    nodes = re.findall(r"torch\.ops\.fastft\.(\w+)", "".join(graphs))
    assert nodes.count("experts_4bit_fwd") == _n_experts_modules(model) and "experts_fwd" not in nodes
    assert sum("experts" in n and "lora_" in n for n in grads) == 4 * _n_experts_modules(model)
    assert any("q_proj" in n for n in grads) and not report.fallbacks


def test_mixed_4bit_16bit_experts_keep_a_graph_break_and_the_report_says_so(monkeypatch):
    """One 4-bit and one 16-bit weight: the autograd Function (a graph break under compile); the
    patch report's compile-ready line says so."""
    warnings.filterwarnings("ignore")
    monkeypatch.setenv("FASTFT_BACKEND", "torch")
    model = _model("qwen3_moe")
    fastft.quantize(model)
    for m in model.modules():
        if isinstance(getattr(m, "down_proj", None), ExpertsWeight4bit):
            dense = torch.nn.Parameter(m.down_proj.dequantize(), requires_grad=False)
            del m.down_proj
            m.down_proj = dense
    report = fastft.patch(model)
    line = report.compile_ready()
    assert line.startswith("compile-ready: no: experts runs eager (mixed 4-bit (NF4) / 16-bit") and line in str(report)
    assert set(report.eager_under_compile()) == {"experts"}

    x, idx, w, q1, q2, *_ = _q4(torch.float32)
    w2 = q2.dequantize()
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda x: experts(x, idx, w, q1, w2) * 2.0)(x)
    assert explain.graph_break_count > 0
