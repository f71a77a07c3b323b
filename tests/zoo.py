"""The model-zoo sweep: ``fastft.patch`` on every causal LM that transformers registers.

For each ``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` the causal-LM class is built
from a tiny config (``zoo_configs.tiny_config``: a generic shrinker of the default config),
fp32, train mode, plain and wrapped in PEFT LoRA, and fastft is judged against the model itself:

* batches: left padding with an attention mask and one row whose labels are all -100; the
  same batch with ``num_items_in_batch`` as transformers' Trainer passes it; a packed batch
  with reset ``position_ids`` (where the forward takes them). Each batch gives the unpatched
  loss and every trainable gradient; ``fastft.patch`` must give the same (fp32: loss 1e-5,
  gradients 1e-4), on the first call and on a repeated one;
* ``fastft.unpatch`` must restore exactly: bit-identical loss and gradients, no fastft object
  left in any module's ``__dict__``, the modeling files' functions back as they were;
* bf16 on a subset: patched bf16 against an fp32 oracle, relative to unpatched bf16's own error.

``python -m tests.zoo`` prints the table; ``--table`` rewrites the README section between
``<!-- zoo-table:start -->`` and ``<!-- zoo-table:end -->``; ``--fast`` runs the default subset.
tests/test_zoo.py runs the same checks per family (fast subset by default, all with ``-m zoo``).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch

try:
    from . import zoo_configs
except ImportError:  # imported as a top-level module by pytest (tests/ on sys.path)
    import zoo_configs

LOSS_TOL = 1e-5  # fp32 loss: |patched - unpatched| <= tol * (1 + |unpatched|)
GRAD_TOL = 1e-4  # fp32 gradients: max|patched - unpatched| <= tol * scale (see _grad_err)
BF16_LOSS_ATOL = 1e-2
BF16_GRAD_ATOL = 1e-2  # times the tensor's gradient scale
SEQ = zoo_configs.SEQ

# The default subset: mainstream dense, MoE, MLA, soft-capped, tuple-conv, encoder-decoder heads.
FAST = (
    "llama",
    "gpt2",
    "mistral",
    "qwen2",
    "qwen3_moe",
    "mixtral",
    "gemma2",
    "phi3",
    "deepseek_v3",
    "gpt_neox",
    "falcon",
    "cohere",
    "bart",
    "marian",
)
BF16 = ("llama", "gpt2", "gemma2", "qwen3_moe", "phi3", "bart")

# Families fastft gets wrong today (tests/test_zoo.py marks them xfail(strict=True), so a fix makes
# them XPASS and fail until the entry is removed). Empty: every family the sweep builds is exact.
KNOWN_BROKEN: dict[str, str] = {}
STRICT = os.environ.get("FASTFT_ZOO_STRICT", "0") == "1"

VERDICT_ORDER = (
    "patched-only exception",
    "WRONG loss",
    "WRONG grad",
    "unpatch not exact",
    "ok",
    "unpatched model fails",
    "cannot build",
)
BAD = {"patched-only exception", "WRONG loss", "WRONG grad", "unpatch not exact"}


def causal_lm_families() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="peft")


def _short(exc: BaseException, n: int = 240) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:n]}"


def _where(exc: BaseException) -> str:
    """The innermost frames of a traceback, shortened (which file raised)."""
    frames = traceback.extract_tb(exc.__traceback__)
    out = []
    for fr in frames[-3:]:
        path = fr.filename.split("site-packages/")[-1].split("wt-zoo/")[-1]
        out.append(f"{path}:{fr.lineno}")
    return " < ".join(reversed(out))


# --------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------
def _config_for(model_cls, cfg):
    """The config the causal-LM class takes: ``cfg`` or its sub-config of ``model_cls.config_class``."""
    want = getattr(model_cls, "config_class", None)
    if want is None or isinstance(cfg, want):
        return cfg
    for name in ("text_config", "decoder", "language_config", "llm_config"):
        sub = getattr(cfg, name, None)
        if isinstance(sub, want):
            return sub
    for sub in vars(cfg).values():
        if isinstance(sub, want):
            return sub
    return cfg


def build(model_type: str, *, seed: int = 0, dtype=torch.float32):
    """The tiny causal LM of ``model_type`` (random weights, eager attention where supported), train mode."""
    import transformers

    cls_name = causal_lm_families()[model_type]
    model_cls = getattr(transformers, cls_name)
    cfg = _config_for(model_cls, zoo_configs.tiny_config(model_type))
    torch.manual_seed(seed)
    try:
        model = model_cls._from_config(cfg, attn_implementation="eager", dtype=dtype)
    except ValueError as exc:
        if "eager" not in str(exc) and "attn_implementation" not in str(exc):
            raise
        torch.manual_seed(seed)
        model = model_cls._from_config(cfg, dtype=dtype)
    return model.train()


def lora_targets(model) -> list[str]:
    """Fallback LoRA targets: the distinct names of the plain linear layers, without the output embedding
    (subclasses of nn.Linear with another forward, such as MoE routers returning tuples, are left out)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, mod in model.named_modules():
        if type(mod) in (nn.Linear, Conv1D) and mod is not out_emb and name:
            names.add(name.split(".")[-1])
    return sorted(names)


def wrap_lora(make, *, all_linear: bool = True):
    """PEFT LoRA on all linear layers (random A and B, so both get gradients) of ``make()``; (model, note).

    ``all_linear=False`` (or "all-linear" failing) targets :func:`lora_targets` instead."""
    from peft import LoraConfig, get_peft_model

    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
    try:
        if not all_linear:
            raise ValueError("all-linear gave a model whose unpatched forward fails")
        return get_peft_model(make(), LoraConfig(target_modules="all-linear", **kw)), ""
    except Exception as exc:
        model = make()  # a failed get_peft_model may have wrapped some layers already
        # the linear layers by name, less any PEFT names as incompatible in its message (Mamba's out_proj, ...)
        targets = [t for t in lora_targets(model) if f"'{t}'" not in str(exc)]
        if not targets:
            raise
        note = f"all-linear failed ({_short(exc, 120)}); LoRA on {targets}"
        return get_peft_model(model, LoraConfig(target_modules=targets, **kw)), note


# --------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------
def _forward_params(model) -> tuple[set[str], bool]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return set(params), var_kw


def _codebooks(batch: dict, k: int) -> dict:
    """Musicgen's layout: input_ids (batch * codebooks, seq), labels (batch, seq, codebooks)."""
    out = dict(batch)
    out["input_ids"] = batch["input_ids"].repeat_interleave(k, dim=0)
    out["labels"] = batch["labels"].unsqueeze(-1).repeat(1, 1, k)
    return out


def _with_pixels(batch: dict, cfg) -> dict:
    vc = cfg.vision_config
    g = torch.Generator().manual_seed(7)
    n = batch["input_ids"].shape[0]
    pixels = torch.randn(n, vc.num_channels, vc.image_size, vc.image_size, generator=g)
    return {**batch, "pixel_values": pixels}


# Causal LMs whose forward takes another layout than (batch, seq) ids and labels: config.model_type ->
# function(batch, config) -> batch. Data, like zoo_configs.OVERRIDES; each with its reason.
INPUT_LAYOUTS = {
    # several codebooks per audio frame: ids stacked per codebook, one label column per codebook
    "musicgen_decoder": lambda b, cfg: _codebooks(b, cfg.num_codebooks),
    "musicgen_melody_decoder": lambda b, cfg: _codebooks(b, cfg.num_codebooks),
    # GIT's loss skips the image tokens it prepends: without pixel_values its own loss fails
    "git": _with_pixels,
}


def make_batches(model) -> dict[str, dict]:
    """name -> forward kwargs, for the batches this model's forward accepts."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    vocab = zoo_configs.vocab_size(cfg)
    special = zoo_configs.token_ids(cfg.to_dict())
    allowed = torch.tensor([i for i in range(3, vocab) if i not in special])
    pad = cfg.pad_token_id if isinstance(getattr(cfg, "pad_token_id", None), int) else 0
    g = torch.Generator().manual_seed(1234)

    def ids(*shape):
        return allowed[torch.randint(0, len(allowed), shape, generator=g)]

    params, var_kw = _forward_params(model)
    batches = {}
    # (a) left padding + attention mask; row 1's labels are all ignored; a few ignored tokens in row 2
    input_ids = ids(3, SEQ)
    mask = torch.ones_like(input_ids)
    input_ids[0, :3] = pad
    mask[0, :3] = 0
    labels = input_ids.clone()
    labels[0, :3] = -100
    labels[1, :] = -100
    labels[2, 4] = -100
    pad_batch = {"input_ids": input_ids, "labels": labels}
    if "attention_mask" in params:
        pad_batch["attention_mask"] = mask
    batches["pad"] = pad_batch
    if var_kw or "num_items_in_batch" in params:  # what transformers' Trainer passes under accumulation
        n = labels.ne(-100).sum()
        batches["pad+num_items"] = {**pad_batch, "num_items_in_batch": n}
    # (b) packed rows with reset position ids (DataCollatorWithFlattening's layout)
    if "position_ids" in params:
        packed = ids(2, SEQ)
        pos = torch.cat([torch.arange(4), torch.arange(SEQ - 4)]).unsqueeze(0).repeat(2, 1)
        pos[1] = torch.arange(SEQ)
        plabels = packed.clone()
        plabels[0, 0] = plabels[0, 4] = plabels[1, 0] = -100
        batches["packed"] = {"input_ids": packed, "labels": plabels, "position_ids": pos}
    layout = INPUT_LAYOUTS.get(getattr(cfg, "model_type", ""))
    if layout is not None:
        batches = {name: layout(b, cfg) for name, b in batches.items()}
    return batches


# --------------------------------------------------------------------------------------
# running and comparing
# --------------------------------------------------------------------------------------
def loss_and_grads(model, batch: dict, seed: int = 0):
    """(loss, {param name: grad}) of one training step; the RNG is re-seeded so any dropout repeats."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch)
    loss = out["loss"] if isinstance(out, dict) else out.loss
    if loss is None:
        raise RuntimeError("the forward returned no loss")
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach().float().clone(), grads


def _scale(grads: dict) -> dict:
    """Per tensor: max|g|, floored at 1% of the model's largest gradient (near-zero tensors are not judged on
    rounding noise relative to themselves)."""
    top = max((g.abs().max().item() for g in grads.values() if g.numel()), default=0.0)
    return {n: max(g.abs().max().item() if g.numel() else 0.0, 1e-2 * top, 1e-12) for n, g in grads.items()}


def compare(ref, got) -> tuple[float, float, str]:
    """(loss error, worst gradient error, name of the worst tensor); errors relative (see the tolerances)."""
    (l_ref, g_ref), (l_got, g_got) = ref, got
    loss_err = (l_got - l_ref).abs().item() / (1.0 + l_ref.abs().item())
    if not torch.isfinite(l_got) and not torch.isfinite(l_ref):
        loss_err = 0.0 if str(l_got.item()) == str(l_ref.item()) else float("inf")
    scale = _scale(g_ref)
    worst, worst_name = 0.0, ""
    for name in set(g_ref) | set(g_got):
        a, b = g_ref.get(name), g_got.get(name)
        if a is None or b is None:
            other = a if a is not None else b
            err = other.abs().max().item() / scale.get(name, 1.0) if other.numel() else 0.0
            err = float("inf") if err > 0 else 0.0
        else:
            err = (b.float() - a.float()).abs().max().item() / scale[name] if a.numel() else 0.0
        if err > worst or err != err:
            worst, worst_name = err, name
    return loss_err, worst, worst_name


def exactly_equal(ref, got) -> bool:
    (l_ref, g_ref), (l_got, g_got) = ref, got
    same_loss = torch.equal(l_ref, l_got) or (l_ref.isnan().all() and l_got.isnan().all()).item()
    return bool(same_loss) and g_ref.keys() == g_got.keys() and all(torch.equal(g_ref[n], g_got[n]) for n in g_ref)


# Names torch.compile installs in (and later drops from) the globals of any module whose code it
# compiles: an earlier compile in the same process can leave them, and dynamo's cache eviction can
# take them away during a later test. They are not fastft's to restore.
_DYNAMO_GLOBAL = re.compile(r"^(__compiled_fn|__resume_at|__builtins_dict__|__import_|___)|^_\d+_c\d+$")


def _snapshot(root):
    """What unpatch must give back: each module's instance ``forward`` and its modeling file's globals."""
    forwards = {name: m.__dict__.get("forward", None) for name, m in root.named_modules()}
    files = {}
    for m in root.modules():
        pymod = sys.modules.get(type(m).__module__)
        if pymod is not None and pymod.__name__ not in files:
            files[pymod.__name__] = dict(vars(pymod))
    return forwards, files


def leftovers(root, snap) -> list[str]:
    """Differences from the snapshot after unpatch, and any fastft object still held by a module."""
    forwards, files = snap
    bad = []
    for name, m in root.named_modules():
        if m.__dict__.get("forward", None) is not forwards.get(name):
            bad.append(f"{name or '<root>'}.forward not restored ({type(m.__dict__.get('forward')).__name__})")
        for k, v in m.__dict__.items():
            if k.startswith("_fastft") or type(v).__module__.startswith("fastft"):
                bad.append(f"{name or '<root>'}.{k} left: {type(v).__name__}")
    for modname, before in files.items():
        now = vars(sys.modules[modname])
        for k, v in before.items():
            if now.get(k) is not v and not _DYNAMO_GLOBAL.match(k):
                bad.append(f"{modname}.{k} not restored")
    return bad


@dataclass
class VariantResult:
    variant: str  # "plain" / "lora" / "bf16"
    verdict: str = "ok"
    features: list = field(default_factory=list)
    loss_err: float = 0.0
    grad_err: float = 0.0
    worst: str = ""  # batch and tensor of the worst error
    error: str = ""  # the exception (with where it was raised) behind a non-ok verdict
    notes: list = field(default_factory=list)


@dataclass
class FamilyResult:
    model_type: str
    model_class: str
    params: int = 0
    seconds: float = 0.0
    variants: dict = field(default_factory=dict)
    build_error: str = ""

    @property
    def verdict(self) -> str:
        if self.build_error:
            return "cannot build"
        vs = [v.verdict for v in self.variants.values()]
        return min(vs, key=VERDICT_ORDER.index) if vs else "cannot build"

    def features(self) -> list[str]:
        out = set()
        for v in self.variants.values():
            out |= set(v.features)
        return sorted(out)

    def summary(self) -> str:
        if self.build_error:
            return self.build_error
        parts = []
        for v in self.variants.values():
            s = f"{v.variant}: {v.verdict}"
            if v.verdict in ("WRONG loss", "WRONG grad", "ok") and (v.loss_err or v.grad_err):
                s += f" (loss {v.loss_err:.1e}, grad {v.grad_err:.1e} {v.worst})"
            if v.error:
                s += f" [{v.error}]"
            if v.notes:
                s += " {" + "; ".join(v.notes) + "}"
            parts.append(s)
        return " | ".join(parts)


def _features(report, caught) -> list[str]:
    feats = sorted(report.features())
    if any(s.feature == "loss" and "disabled at the first" in s.reason for s in report.skipped):
        feats.append("loss: the model's own (its convention differs)")
    return feats


def check_variant(model, variant: str) -> VariantResult:
    """Patched vs unpatched on every batch, then unpatch; the model is used up."""
    import fastft

    res = VariantResult(variant)
    batches = make_batches(model)
    refs = {}
    for name, batch in batches.items():
        try:
            refs[name] = loss_and_grads(model, batch)
        except Exception as exc:
            res.notes.append(f"{name}: unpatched raises {_short(exc, 160)} at {_where(exc)}")
    first = next(iter(refs), None)
    if first is not None and not exactly_equal(refs[first], loss_and_grads(model, batches[first])):
        refs.clear()
        res.notes.append("not deterministic: two identical seeded calls of the unpatched model differ (not judged)")
    if not refs:
        res.verdict = "unpatched model fails"
        res.error = res.notes.pop(0).split(": unpatched raises ", 1)[-1] if res.notes else "no batch"
        return res
    root = model
    snap = _snapshot(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = fastft.patch(model)
        except Exception as exc:
            res.verdict, res.error = "patched-only exception", f"fastft.patch raises {_short(exc)} at {_where(exc)}"
            return res
        order = list(refs) + [next(iter(refs))]  # the first batch again: the steady state after the first call
        for i, name in enumerate(order):
            label = name if i < len(refs) else f"{name} (again)"
            try:
                got = loss_and_grads(model, batches[name])
            except Exception as exc:
                res.verdict, res.error = "patched-only exception", f"{label}: {_short(exc)} at {_where(exc)}"
                break
            loss_err, grad_err, worst = compare(refs[name], got)
            if loss_err > res.loss_err or loss_err != loss_err:
                res.loss_err = loss_err
            if grad_err > res.grad_err or grad_err != grad_err:
                res.grad_err, res.worst = grad_err, f"{label}: {worst}"
            if not loss_err <= LOSS_TOL and res.verdict == "ok":
                res.verdict, res.worst = "WRONG loss", f"{label}: {worst}"
            elif not grad_err <= GRAD_TOL and res.verdict == "ok":
                res.verdict = "WRONG grad"
        res.features = _features(report, caught)
    res.notes += sorted({" ".join(str(w.message).split())[:160] for w in caught if "fastft" in str(w.message)})
    try:
        fastft.unpatch(model)
        again = loss_and_grads(model, batches[first])
        bad = leftovers(root, snap)
        if not exactly_equal(refs[first], again):
            bad.append("loss/gradients after unpatch differ from before patch")
    except Exception as exc:
        bad = [f"unpatch or the call after it raises {_short(exc)}"]
    if bad and res.verdict == "ok":
        res.verdict, res.error = "unpatch not exact", "; ".join(bad[:4])
    return res


def check_bf16(model_type: str) -> VariantResult:
    """Patched bf16 vs an fp32 oracle, relative to the unpatched bf16 model's own error."""
    import fastft

    res = VariantResult("bf16")
    model32 = build(model_type)
    batch = make_batches(model32)["pad"]
    ref = loss_and_grads(model32, batch)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    plain = loss_and_grads(model16, batch)
    fastft.patch(model16)
    try:
        ours = loss_and_grads(model16, batch)
    except Exception as exc:
        res.verdict, res.error = "patched-only exception", f"bf16: {_short(exc)} at {_where(exc)}"
        return res
    fastft.unpatch(model16)
    lp, lo = (plain[0] - ref[0]).abs().item(), (ours[0] - ref[0]).abs().item()
    res.loss_err = lo
    if not lo <= 2 * lp + BF16_LOSS_ATOL:
        res.verdict, res.worst = "WRONG loss", f"bf16 loss err {lo:.2e} vs plain bf16 {lp:.2e}"
    scale = _scale(ref[1])
    for name, g in ref[1].items():
        ep = (plain[1][name].float() - g).abs().max().item()
        eo = (ours[1][name].float() - g).abs().max().item() if name in ours[1] else float("inf")
        ratio = eo / (2 * ep + BF16_GRAD_ATOL * scale[name])
        if ratio > res.grad_err:
            res.grad_err, res.worst = ratio, f"{name} (err {eo:.2e} vs plain bf16 {ep:.2e})"
    if res.grad_err > 1 and res.verdict == "ok":
        res.verdict = "WRONG grad"
    return res


def run_family(model_type: str, *, bf16: bool | None = None) -> FamilyResult:
    """Every check on one family: plain, LoRA, and bf16 (on the BF16 subset unless told).

    Runs on one intra-op thread: these models are tiny, and on a loaded machine OpenMP's
    threads waiting for each other cost 10-50x more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_family(model_type, bf16)
    finally:
        torch.set_num_threads(threads)


def _run_family(model_type: str, bf16: bool | None) -> FamilyResult:
    _quiet()
    t0 = time.perf_counter()
    res = FamilyResult(model_type, causal_lm_families()[model_type])
    try:
        model = build(model_type)
    except Exception as exc:
        res.build_error = f"{_short(exc, 200)} at {_where(exc)}"
        res.seconds = time.perf_counter() - t0
        return res
    res.params = zoo_configs.count_params(model)
    res.variants["plain"] = check_variant(model, "plain")
    try:
        wrapped, note = wrap_lora(lambda: build(model_type))
    except Exception as exc:
        res.variants["lora"] = VariantResult("lora", "cannot build", error=f"PEFT LoRA: {_short(exc, 160)}")
    else:
        res.variants["lora"] = check_variant(wrapped, "lora")
        if note:
            res.variants["lora"].notes.append(note)
        elif res.variants["lora"].verdict == "unpatched model fails":  # e.g. PEFT wrapped a router returning tuples
            first = res.variants["lora"]
            try:
                wrapped, note = wrap_lora(lambda: build(model_type), all_linear=False)
            except Exception:
                pass
            else:
                res.variants["lora"] = check_variant(wrapped, "lora")
                res.variants["lora"].notes.append(f"{note}; with all-linear: {first.error[:120]}")
    if (model_type in BF16 if bf16 is None else bf16) and res.variants["plain"].verdict != "unpatched model fails":
        res.variants["bf16"] = check_bf16(model_type)
    res.seconds = time.perf_counter() - t0
    return res


def sweep(families=None, *, progress=None) -> list[FamilyResult]:
    families = list(causal_lm_families()) if families is None else list(families)
    out = []
    for mt in families:
        r = run_family(mt)
        out.append(r)
        if progress is not None:
            progress(r)
    return out


# --------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------
START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _detail(v: VariantResult) -> str:
    if v.verdict in ("WRONG loss", "WRONG grad"):
        return f"{v.variant}: loss err {v.loss_err:.1e}, grad err {v.grad_err:.1e} ({v.worst})"
    return f"{v.variant}: {v.error}"


def table(results: list[FamilyResult]) -> str:
    import transformers

    import fastft

    counts = {}
    for r in results:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    head = (
        f"Generated by `python -m tests.zoo --table` (transformers {transformers.__version__}, fastft "
        f"{fastft.__version__}): "
        + ", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda x: VERDICT_ORDER.index(x[0])))
        + "."
    )
    lines = [head, "", "| family | model class | features fused | verdict |", "|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r.model_type):
        verdict = r.verdict
        if verdict != "ok":
            detail = r.build_error or next((_detail(v) for v in r.variants.values() if v.verdict == verdict), "")
            verdict += f": {detail[:160]}"
        else:  # say which variant was not judged, and why
            for v in r.variants.values():
                if v.verdict != "ok":
                    verdict += f"; {v.variant} not judged ({v.verdict}: {v.error[:100]})"
        feats = ", ".join(r.features()) or "none"
        lines.append(f"| {r.model_type} | {r.model_class} | {_cell(feats)} | {_cell(verdict)} |")
    return "\n".join(lines)


def write_readme_table(text: str, path: str = "README.md") -> None:
    """Replace the README section between the markers, atomically (temp file + os.replace)."""
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    if doc.count(START) != 1 or doc.count(END) != 1 or doc.index(START) > doc.index(END):
        raise SystemExit(f"{path}: needs exactly one {START} followed by one {END}")
    before, rest = doc.split(START, 1)
    _, after = rest.split(END, 1)
    new = f"{before}{START}\n{text}\n{END}{after}"
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.zoo", description=__doc__.split("\n")[0])
    p.add_argument("--fast", action="store_true", help="only the default subset")
    p.add_argument("--families", help="comma-separated model types")
    p.add_argument("--table", action="store_true", help="rewrite the README section between the zoo-table markers")
    p.add_argument("--readme", default="README.md")
    args = p.parse_args(argv)
    fams = FAST if args.fast else (args.families.split(",") if args.families else None)
    t0 = time.perf_counter()

    def show(r: FamilyResult):
        print(
            f"{r.model_type:28s} {r.verdict:24s} {r.seconds:5.1f}s {r.params / 1e3:6.0f}k  {r.summary()[:400]}",
            flush=True,
        )

    results = sweep(fams, progress=show)
    total = time.perf_counter() - t0
    text = table(results)
    print(f"\n{len(results)} families in {total:.0f} s")
    print(text)
    if args.table:
        write_readme_table(text, args.readme)
        print(f"wrote the table into {args.readme}")
    return 1 if any(r.verdict in BAD for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
