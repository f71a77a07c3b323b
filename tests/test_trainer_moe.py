"""The trainer's LoRA default on MoE models: ``target_modules="all-linear"`` also trains the experts."""

import pytest
import torch
from test_experts import _model
from test_trainer import TOK, _adapter, _cfg, _records

import fastft


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_all_linear_trains_the_experts(tmp_path, dropout, capsys):
    model = _model("qwen3_moe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fastft.train(
        _cfg(tmp_path, max_steps=2, eval_every=2, dropout=dropout, quiet=False),
        model=model,
        tokenizer=TOK,
        train_data=_records(8),
        eval_data=_records(2, seed=1),
    )
    printed = capsys.readouterr().out
    keys = _adapter(tmp_path / "checkpoint-last").keys()
    expert_keys = [k for k in keys if "experts" in k]
    # the experts train with or without dropout: PEFT's parameter LoRA has none, the linear layers keep it
    assert "LoRA on expert weights (target_parameters=['experts.down_proj', 'experts.gate_up_proj'])" in printed
    assert expert_keys and any("lora_A" in k for k in expert_keys) and any("lora_B" in k for k in expert_keys)
    assert "experts + LoRA (fused), gate_up_proj r=" in printed and "no delta weight formed" in printed
    drops = {
        type(d).__name__: d for n, m in model.named_modules() if n.endswith("q_proj") for d in m.lora_dropout.values()
    }
    if dropout == 0.0:
        assert set(drops) == {"Identity"}
    else:
        assert "dropout 0.1 on the linear layers only" in printed and "dropout 0.1 fused" in printed
        assert set(drops) == {"Dropout"} and drops["Dropout"].p == dropout
    assert any("q_proj" in k for k in keys)
    for n, p in model.named_parameters():  # base weights stay frozen
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=0)
