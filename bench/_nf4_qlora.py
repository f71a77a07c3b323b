"""bench_nf4's ``qlora`` section: one LoRA layer over a 4-bit base, forward + backward, fastft vs
PEFT over bitsandbytes' ``Linear4bit`` vs fastft's LoRA over the dense (dequantised) weight."""

from __future__ import annotations

import warnings

import _harness as H
from _nf4_common import QLORA_PROVIDERS, TOLERANCE, Skip, _backend, _gen, _randn, _state_bytes, _time, bnb_modules


def qlora_inputs(cfg: dict, dev: str, tokens=None, features=None, rank=None, seed=None) -> dict:
    """x [1, tokens, in] (requires grad), dy, the base weight W [out, in], A [r, in], B [out, r]."""
    tokens = cfg["tokens"] if tokens is None else tokens
    in_f, out_f = cfg["features"] if features is None else features
    r = cfg["rank"] if rank is None else rank
    dt, adt = H.torch_dtype(cfg["dtype"]), H.torch_dtype(cfg["adapter_dtype"])
    g = _gen(cfg["seed"] + 2 if seed is None else seed)
    x = _randn(g, 1, tokens, in_f, scale=1.0, dtype=dt, device=dev).requires_grad_(True)
    dy = _randn(g, 1, tokens, out_f, scale=1.0, dtype=dt, device=dev)
    w = _randn(g, out_f, in_f, scale=in_f**-0.5, dtype=dt, device=dev)
    a = _randn(g, r, in_f, scale=in_f**-0.5, dtype=adt, device=dev).requires_grad_(True)
    b = _randn(g, out_f, r, scale=r**-0.5, dtype=adt, device=dev).requires_grad_(True)
    return dict(x=x, dy=dy, weight=w, lora_A=a, lora_B=b, rank=r)


def build_peft_bnb_layer(inp: dict, cfg: dict, alpha: float):
    """PEFT's LoRA over a bitsandbytes Linear4bit (NF4, compress_statistics) holding W; train mode."""
    import torch
    from torch import nn

    bnb = bnb_modules()[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from peft import LoraConfig, get_peft_model
            from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except Exception as exc:
        raise Skip(f"peft (with its bitsandbytes LoRA layer) not importable ({type(exc).__name__}: {exc})") from None
    w, a, b = inp["weight"], inp["lora_A"], inp["lora_B"]
    out_f, in_f = w.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = bnb.nn.Linear4bit(
            in_f, out_f, bias=False, compute_dtype=w.dtype, quant_type="nf4", compress_statistics=cfg["double_quant"]
        )
        q.weight = bnb.nn.Params4bit(
            w.detach().clone().cpu(),
            requires_grad=False,
            quant_type="nf4",
            compress_statistics=cfg["double_quant"],
            blocksize=cfg["blocksize"],
        )
        q = q.to(w.device)  # quantises here (bitsandbytes quantises on the move to a device)

    class OneLinear(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    config = LoraConfig(
        r=inp["rank"],
        lora_alpha=alpha,
        lora_dropout=cfg["dropout"],
        target_modules=["proj"],
        init_lora_weights=False,
        bias="none",
    )
    module = OneLinear(q)
    # what transformers sets on a model loaded in 4 bit; PEFT only swaps in its bnb LoRA layer then
    module.is_loaded_in_4bit = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(module, config)
    layer = model.base_model.model.proj
    if not isinstance(layer, LoraLinear4bit):
        raise Skip(f"get_peft_model gave {type(layer).__name__}, not peft.tuners.lora.bnb.Linear4bit")
    if layer.base_layer.weight.dtype != torch.uint8:
        raise Skip(f"bitsandbytes did not quantise the weight (dtype {layer.base_layer.weight.dtype})")
    la, lb = layer.lora_A["default"], layer.lora_B["default"]
    la.to(a.dtype)
    lb.to(b.dtype)
    with torch.no_grad():
        la.weight.copy_(a)
        lb.weight.copy_(b)
    layer.train()
    return model, layer


class QloraProvider(H.LayerStep):
    """One provider on the QLoRA inputs: ``step()`` clears grads, runs forward + backward, returns y."""

    def __init__(self, name: str, inp: dict, cfg: dict):

        from fastft.ops import dequantize_nf4, lora_linear, quantize_nf4

        self.name, self.inp, self.dy = name, inp, inp["dy"]
        x, a, b = inp["x"], inp["lora_A"], inp["lora_B"]
        alpha = 2.0 * inp["rank"]
        s, p, be = alpha / inp["rank"], cfg["dropout"], cfg["fastft_backend"]
        dev = str(x.device)
        if name in ("fastft", "dense"):
            _backend("lora_linear", dev, be)
            _backend("nf4_matmul", dev, be)
            packed, state = quantize_nf4(inp["weight"], blocksize=cfg["blocksize"], double_quant=cfg["double_quant"])
            if name == "fastft":
                self.packed, self.state = packed, state
                self.weight_bytes = _state_bytes(packed, state)
                self.forward = lambda: lora_linear(x, packed, a, b, s, dropout_p=p, quant_state=state, backend=be)
            else:  # the same weights as the 4-bit layers compute with, stored dense in x's dtype
                wd = dequantize_nf4(packed, state, dtype=x.dtype, backend="torch")
                del packed, state
                self.weight_bytes = wd.numel() * wd.element_size()
                self.forward = lambda: lora_linear(x, wd, a, b, s, dropout_p=p, backend=be)
            self.params = {"A": a, "B": b}
        elif name == "peft-bnb":
            self.model, layer = build_peft_bnb_layer(inp, cfg, alpha)
            qw = layer.base_layer.weight
            self.packed = qw.data
            self.weight_bytes = _state_bytes(qw.data, _as_state(qw.quant_state))
            self.forward = lambda: layer(x)
            self.params = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight}
        else:
            raise ValueError(name)


def _as_state(qs):
    from fastft.ops.nf4 import as_nf4_state

    return as_nf4_state(qs)


def measure_qlora(name: str, cfg: dict, dev: str) -> dict:
    """Activation memory (after forward, output alive) and peak of one fwd+bwd, above the inputs
    (the layer built, its weight quantised, the dense W dropped). See bench_lora.measure_cell."""
    inp = qlora_inputs(cfg, dev)
    prov = QloraProvider(name, inp, cfg)
    inp["weight"] = None  # only the provider's own copy of the base weight stays alive
    H.free_memory(dev)

    def tiny_prime():  # used unless a full-size prime is possible (see H.measure_layer_memory)
        small = dict(cfg, features=[64, 64])
        tiny = qlora_inputs(small, dev, tokens=16, features=[64, 64], rank=min(cfg["rank"], 4), seed=1)
        QloraProvider(name, tiny, small).step()
        del tiny

    mem, full_prime = H.measure_layer_memory(prov, dev, tiny_prime)
    mem["prime"] = "full-size call" if full_prime else "tiny call"
    mem["weight_mib"] = prov.weight_bytes / 2**20
    return mem


def run_qlora(cfg: dict, dev: str, mem: dict) -> tuple[list[dict], dict]:
    inp = qlora_inputs(cfg, dev)
    in_f, out_f = cfg["features"]
    info = dict(
        tokens=cfg["tokens"],
        in_features=in_f,
        out_features=out_f,
        rank=cfg["rank"],
        alpha=2.0 * cfg["rank"],
        dtype=cfg["dtype"],
        adapter_dtype=cfg["adapter_dtype"],
        dropout=cfg["dropout"],
    )
    rows, outs, packs = [], {}, {}
    for name in QLORA_PROVIDERS:
        row = {"section": "qlora", "provider": name}
        rows.append(row)
        try:
            prov = QloraProvider(name, inp, cfg)
        except Skip as exc:
            row.update(status="skipped", reason=str(exc))
            print(f"  qlora: skipping {name}: {exc}")
            continue
        row["weight_mib"] = prov.weight_bytes / 2**20
        if hasattr(prov, "packed"):
            packs[name] = prov.packed
        y = prov.step().detach()  # one checked fwd+bwd (also the first warm-up)
        if cfg["dropout"] == 0.0:
            outs[name] = {"y": y, **{k: None if v is None else v.detach().clone() for k, v in prov.grads().items()}}
        del y
        t = _time([prov.step], cfg, dev, inner=1)
        prov.clear()
        row.update(status="ok", time=t, median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"])
        m = mem.get(name)
        if m is not None and m.get("status") == "ok":
            row["memory"] = m["memory"]
            row["activation_mib"] = m["memory"].get("activation_mib")
            row["peak_mib"] = m["memory"].get("peak_mib")
        elif m is not None:
            row["memory_error"] = m.get("reason", m.get("status"))
            print(f"  qlora: memory measurement failed for {name}: {row['memory_error']}")
        del prov
        H.free_memory(dev)
    by = {r["provider"]: r for r in rows}
    dense_ms, peft_ms = by["dense"].get("median_ms"), by["peft-bnb"].get("median_ms")
    peft_peak = by["peft-bnb"].get("peak_mib")
    for r in rows:
        r["time_x_dense"] = H.ratio(r.get("median_ms"), dense_ms)
        r["speedup_vs_peft"] = H.ratio(peft_ms, r.get("median_ms"))
        r["peak_x_peft"] = H.ratio(r.get("peak_mib"), peft_peak)
    agreement = []
    if "fastft" in packs and "peft-bnb" in packs:
        a, b = packs["fastft"], packs["peft-bnb"]
        info["packed_bytes_identical_to_bnb"] = bool(a.shape == b.shape and a.to(b.device).eq(b).all().item())
    tol = TOLERANCE[cfg["dtype"]]
    for other in ("peft-bnb", "dense"):
        if "fastft" in outs and other in outs:
            res = {"fastft vs": other}
            worst = 0.0
            for k in ("y", "x", "A", "B"):
                e = H.rel_err(outs["fastft"].get(k), outs[other].get(k))
                res[f"{k}_rel_err"] = e
                worst = max(worst, e if e is not None else float("inf"))
            res["max_rel_err"] = worst
            res["agrees"] = bool(worst <= tol)
            agreement.append(res)
    info["agreement"] = agreement
    del inp, outs, packs
    H.free_memory(dev)
    return rows, info
