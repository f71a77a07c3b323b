"""Test helper: a model's linear layers as bitsandbytes NF4 ``Linear4bit`` (the real QLoRA base)."""

from __future__ import annotations

import pytest
from torch import nn


def bnb_quantize(model, skip=("lm_head",), double_quant=True):
    """Every ``nn.Linear`` but those named in ``skip`` as a bitsandbytes NF4 ``Linear4bit`` (double-quantised
    unless ``double_quant=False``) holding the same weight (and bias); skips the test without bitsandbytes."""
    bnb = pytest.importorskip("bitsandbytes")
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name not in skip:
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=child.weight.dtype, quant_type="nf4", compress_statistics=double_quant,
                )  # fmt: skip
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=double_quant
                )
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone())
                setattr(module, child_name, q.to(child.weight.device))
    return model
