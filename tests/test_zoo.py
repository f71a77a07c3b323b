"""The model-zoo sweep as tests: one test per causal-LM family that transformers registers.

Every family test carries the ``zoo`` marker: ``python -m pytest -m zoo tests/test_zoo.py`` (or
``FASTFT_ZOO=1``) runs all of them. Without that, tests/conftest.py deselects all but the fast
subset (``zoo.FAST``, marked ``zoo(fast=True)``: Llama, GPT-2, Mistral, Qwen2, two MoEs, Gemma-2,
MLA, the encoder-decoder causal-LM heads, ...), which runs in the default ``python -m pytest tests``.
See tests/zoo.py for the checks.

A wrong loss or gradient, an exception only the patched model raises, or an unpatch that does
not restore exactly fails the test. A family whose tiny config cannot be built, or whose
unpatched model itself fails on the sweep's batches, is not fastft's to fix: it skips with the
exact reason (listed under ``-ra``), except in the fast subset, where it fails.

Families fastft is known to get wrong today are listed in ``zoo.KNOWN_BROKEN`` (issue 13) and
marked ``xfail(strict=True)``: they must still fail as described, and once fixed they XPASS, which
fails the run until the entry is removed. ``FASTFT_ZOO_STRICT=1`` ignores that list.
"""

import pytest
import zoo

FAMILIES = list(zoo.causal_lm_families())


def _marks(family):
    # every family is part of the sweep (-m zoo runs them all); the fast subset also runs by default
    marks = [pytest.mark.zoo(fast=family in zoo.FAST)]
    if family in zoo.KNOWN_BROKEN and not zoo.STRICT:  # strict: passing again fails, so the entry gets removed
        marks.append(pytest.mark.xfail(strict=True, reason=zoo.KNOWN_BROKEN[family]))
    return marks


PARAMS = [pytest.param(f, marks=_marks(f), id=f) for f in FAMILIES]


def test_fast_subset_is_registered():
    missing = [f for f in zoo.FAST if f not in FAMILIES]
    assert not missing, f"fast-subset families not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: {missing}"


@pytest.mark.parametrize("family", PARAMS)
def test_patch_matches_the_unpatched_model(family):
    r = zoo.run_family(family)
    detail = r.summary()
    if r.verdict in zoo.BAD:
        pytest.fail(f"{family} ({r.model_class}): {r.verdict}: {detail}", pytrace=False)
    if r.verdict in ("cannot build", "unpatched model fails"):
        if family in zoo.FAST:
            pytest.fail(f"fast-subset family {family}: {r.verdict}: {detail}")
        pytest.skip(f"{r.verdict} (not fastft's): {detail[:300]}")
    assert r.verdict == "ok"
    judged = [v for v in r.variants.values() if v.verdict == "ok"]
    assert judged, detail
    for v in judged:
        assert v.loss_err <= zoo.LOSS_TOL or v.variant == "bf16", (v.variant, v.loss_err)


def test_unpatch_leftovers_are_detected():
    """The unpatch check itself: a forward left on a module and a swapped modeling-file function are both seen."""
    import sys

    model = zoo.build("llama")
    snap = zoo._snapshot(model)
    assert zoo.leftovers(model, snap) == []
    layer = model.model.layers[0].mlp
    layer.forward = lambda x: x
    pymod = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original = pymod.apply_rotary_pos_emb
    pymod.apply_rotary_pos_emb = lambda *a, **k: original(*a, **k)
    try:
        found = zoo.leftovers(model, snap)
    finally:
        pymod.apply_rotary_pos_emb = original
        del layer.forward
    assert any("layers.0.mlp.forward" in f for f in found) and any("apply_rotary_pos_emb" in f for f in found)


def test_compare_flags_a_wrong_loss_and_a_missing_gradient():
    import torch

    ref = (torch.tensor(2.0), {"w": torch.ones(3), "b": torch.ones(2)})
    assert zoo.compare(ref, ref) == (0.0, 0.0, "")
    loss_err, _, _ = zoo.compare(ref, (torch.tensor(2.1), ref[1]))
    assert loss_err > zoo.LOSS_TOL
    _, grad_err, name = zoo.compare(ref, (ref[0], {"w": torch.ones(3)}))
    assert grad_err == float("inf") and name == "b"


def test_the_table_goes_between_the_readme_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{zoo.START}\nold\n{zoo.END}\nafter\n")
    r = zoo.FamilyResult("llama", "LlamaForCausalLM", variants={"plain": zoo.VariantResult("plain", features=["loss"])})
    zoo.write_readme_table(zoo.table([r]), str(readme))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{zoo.END}\nafter\n") and "old" not in text
    assert "| llama | LlamaForCausalLM | loss | ok |" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        zoo.write_readme_table("x", str(readme))
    assert readme.read_text() == "no markers\n"


def test_the_sweep_catches_a_wrong_loss_and_a_patched_only_exception(monkeypatch):
    """The harness itself: a fused loss 1% off is WRONG loss; a fused loss that raises is a patched-only exception."""
    import fastft.patching.loss as loss_mod

    real = loss_mod.fused_linear_cross_entropy
    monkeypatch.setattr(loss_mod, "fused_linear_cross_entropy", lambda *a, **k: real(*a, **k) * 1.01)
    r = zoo.run_family("llama", bf16=False)
    assert r.variants["plain"].verdict == "WRONG loss" and r.variants["lora"].verdict == "WRONG loss", r.summary()

    def boom(*a, **k):
        raise RuntimeError("fused loss broke")

    monkeypatch.setattr(loss_mod, "fused_linear_cross_entropy", boom)
    r = zoo.run_family("llama", bf16=False)
    assert r.verdict == "patched-only exception" and "fused loss broke" in r.variants["plain"].error, r.summary()
