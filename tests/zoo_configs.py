"""Tiny configs for every causal LM transformers registers: a generic shrinker of config size fields.

``tiny_config(model_type)`` starts from the config class's defaults (``CONFIG_MAPPING``),
shrinks every size field it recognises by name (hidden, intermediate, layers, heads, kv
heads, head dims, experts and top-k, MLA ranks, state sizes, vocabulary, positions,
windows), truncates per-layer lists consistently (keeping one layer of each kind), zeroes
every dropout / jitter / layerdrop, and recurses into nested sub-configs (``text_config``,
``decoder``, ``vision_config``, ...). Per-family exceptions are data (``OVERRIDES``), each
with the reason; the generic rules come first.
"""

from __future__ import annotations

import warnings

HIDDEN = 32
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 8
INTERMEDIATE = 64
MOE_INTERMEDIATE = 32
LAYERS = 2
VOCAB = 256
POSITIONS = 128
WINDOW = 8
EXPERTS = 4
TOP_K = 2
RANK = 16
SEQ = 10  # the sweep's sequence length (reformer's axial positions must multiply to it)
SPECIAL_IDS = 16  # token ids that do not fit the tiny vocabulary move to its top 16 slots

# key -> tiny value; applied only to an int field larger than the tiny value (never enlarges)
_SHRINK: dict[str, int] = {}
for _keys, _value in (
    (
        "hidden_size d_model n_embd word_embed_proj_dim attention_hidden_size hidden_size_global "
        "embedding_size input_size backbone_hidden_size out_hidden_size hidden_size_per_layer_input "
        "ple_embed_dim adapter_in_dim adapter_out_dim adapter_input_size downsample_hidden_size "
        "conv_output_size feature_size output_channels embedding_dim emb_dim lru_width pronunciation_embed_dim "
        "shape_embed_dim ext_pw_out_channel depthwise_separable_out_channel nemo_conv_channels",
        HIDDEN,
    ),
    (
        "intermediate_size ffn_dim n_inner d_ff dff dim_ff decoder_ffn_dim encoder_ffn_dim ffn_hidden_size "
        "intermediate_size_mlp mlp_dim d_inner feed_forward_size",
        INTERMEDIATE,
    ),
    (
        "moe_intermediate_size shared_expert_intermediate_size shared_experts_intermediate_size "
        "shared_intermediate_size expert_intermediate_size expert_ffn_hidden_size moe_shared_expert_intermediate_size",
        MOE_INTERMEDIATE,
    ),
    (
        "num_hidden_layers n_layer num_layers n_layers decoder_layers encoder_layers depth num_blocks "
        "conf_num_hidden_layers num_layers_per_stack n_input_layers n_recurrent_layers n_output_layers "
        "num_encoder_layers num_decoder_layers",
        LAYERS,
    ),
    (
        "num_attention_heads n_head n_heads num_heads decoder_attention_heads encoder_attention_heads "
        "attention_heads swa_num_attention_heads index_n_heads linear_num_value_heads linear_num_heads "
        "conf_num_attention_heads heads_per_ngram num_encoder_attention_heads num_decoder_attention_heads",
        HEADS,
    ),
    (
        "num_key_value_heads kv_n_heads num_kv_heads swa_num_key_value_heads linear_num_key_heads "
        "multi_query_group_num",
        KV_HEADS,
    ),
    (
        "head_dim swa_head_dim dim_head linear_key_head_dim linear_value_head_dim linear_head_dim "
        "index_head_dim mamba_d_head attention_head_dim v_head_dim qk_nope_head_dim kv_channels d_head mamba_headdim "
        "attention_head_size mamba_head_dim",
        HEAD_DIM,
    ),
    ("qk_rope_head_dim rotary_dim", HEAD_DIM // 2),
    ("kv_lora_rank q_lora_rank o_lora_rank laurel_rank hc_lowrank gated_norm_rank", RANK),
    ("num_experts num_local_experts n_routed_experts moe_num_experts num_centroids", EXPERTS),
    ("zero_expert_num", 2),
    ("block_multiple_of", 16),
    (
        "num_experts_per_tok moe_topk moe_top_k moe_k num_experts_per_token top_k centroid_intermediate_top_k "
        "index_topk",
        TOP_K,
    ),
    ("n_group num_expert_group topk_group o_groups", 1),
    ("n_shared_experts num_shared_experts moe_num_shared_experts", 1),
    ("first_k_dense_replace num_dense_layers moe_layer_start_index", 1),
    (
        "vocab_size decoder_vocab_size unpadded_vocab_size vocab_size_per_layer_input codebook_size "
        "encoder_hash_byte_group_vocab pronunciation_vocab_size shape_vocab_size",
        VOCAB,
    ),
    ("image_size", 32),  # vision towers: no pixels are fed, a small image keeps their position tables small
    ("mamba_d_ssm", 2 * HIDDEN),
    (
        "max_position_embeddings n_positions n_ctx max_seq_len model_max_length max_source_positions "
        "max_target_positions",
        POSITIONS,
    ),
    (
        "sliding_window sliding_window_size local_attention_window_len attention_chunk_size keep_window_size "
        "rel_extent attention_window_size",
        WINDOW,
    ),
    ("mamba_d_state state_size ssm_state_size d_state", 8),
    ("time_step_rank mamba_dt_rank", 8),
    ("mamba_n_heads mamba_num_heads", 2 * HIDDEN // HEAD_DIM),  # expand (2) * hidden == heads * head dim
    ("chunk_size mamba_chunk_size", 8),
    ("num_kv_shared_layers", 0),
):
    for _k in _keys.split():
        _SHRINK[_k] = _value

# Per-family config keys the generic rules cannot know. Keep it short; each entry says why.
OVERRIDES: dict[str, dict] = {
    # attention every 8th layer from the 4th: with 2 layers there would be none; keep one of each kind
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    # mamba2's heads * head_dim must equal expand * hidden_size (2 * 32)
    "mamba2": {"num_heads": 8, "head_dim": 8, "n_groups": 1},
    # zamba2's attention runs on concat(hidden, embeddings): 2 * hidden wide, split over the heads
    "zamba2": {"attention_hidden_size": 2 * HIDDEN, "attention_head_dim": 2 * HIDDEN // HEADS},
    # the default config leaves the expert counts unset (None) and the model cannot be built from it
    "dots1": {"n_routed_experts": EXPERTS, "num_experts_per_tok": TOP_K, "n_shared_experts": 1},
    # the default config has layer_types=None, which the model indexes: one conv and one attention layer
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2, "num_dense_layers": 1},
    # the default config leaves the router's top-k unset (None): torch.topk(k=None) fails
    "deepseek_v2": {"num_experts_per_tok": TOP_K},
    # in training the axial position factors must add up to hidden_size and multiply to the sequence
    # length, and the attention chunks must divide it
    "reformer": {
        "axial_pos_embds_dim": [HIDDEN // 2, HIDDEN // 2],
        "axial_pos_shape": [2, SEQ // 2],
        "local_attn_chunk_length": SEQ // 2,
        "lsh_attn_chunk_length": SEQ // 2,
        "num_buckets": 2,
    },
    # to_dict() writes each layer as (attention, "mlp") and the config halves the counts on reading; the
    # input/recurrent/output counts must add up to the layers: one of each (sliding, sliding, full)
    "dory": {
        "layer_types": ["sliding_attention", "mlp", "sliding_attention", "mlp", "full_attention", "mlp"],
        "num_hidden_layers": 6,
        "n_input_layers": 2,
        "n_recurrent_layers": 2,
        "n_output_layers": 2,
    },
    # its sliding-window layers use full MLA heads: head_dim = qk_nope_head_dim + qk_rope_head_dim (8 + 4)
    # (applies to the text config nested in dots3_note too: overrides match each sub-config's model_type)
    "dots3_note_text": {"head_dim": HEAD_DIM + HEAD_DIM // 2},
    # XmodForCausalLM needs a language adapter chosen; the default config names one language
    "xmod": {"default_language": "en_XX"},
}

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers")
_NO_RECURSE = {"rope_scaling", "rope_parameters", "quantization_config", "id2label", "label2id", "task_specific_params"}


def _is_token_key(k: str) -> bool:
    return k.endswith("_token_id") or k.endswith("_token_index") or k.endswith("_token_ids")


def _zero_random(d: dict) -> None:
    for k, v in list(d.items()):
        if isinstance(v, float) and not isinstance(v, bool):
            if "drop" in k or "jitter" in k or k in ("layerdrop",):
                d[k] = 0.0
        if k in ("use_cache",):
            d[k] = False


def _per_layer_indices(types: list) -> list[int]:
    """Indices to keep from per-layer lists: the first LAYERS layers plus the first of each other kind."""
    keep = list(range(min(LAYERS, len(types))))
    seen = {types[i] for i in keep}
    for i, t in enumerate(types):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    return sorted(keep)


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def shrink(d: dict, model_type: str = "") -> dict:
    """Shrink a config dict (``PretrainedConfig.to_dict()``) in place and return it."""
    old_layers = {d[k] for k in _LAYER_COUNT_KEYS if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)}
    # per-layer lists/strings: one entry per layer, aligned; keep the same indices in all of them
    aligned = [
        k
        for k, v in d.items()
        if isinstance(v, (list, str))
        and len(v) in old_layers
        and len(v) > LAYERS
        and k not in _NO_RECURSE
        and not _is_token_key(k)
        and k not in ("model_type", "architectures", "torch_dtype", "dtype")
        and (isinstance(v, list) or "pattern" in k)  # a string only as a per-layer pattern ("M-M*-")
    ]
    if aligned:
        cols = [tuple(_hashable(d[k][i]) for k in aligned) for i in range(min(len(d[k]) for k in aligned))]
        keep = _per_layer_indices(cols)
    else:
        keep = list(range(LAYERS))
    new_layers = len(keep)
    for k in aligned:
        v = d[k]
        picked = [v[i] for i in keep]
        if k in _SHRINK:  # per-layer sizes (gemma3n's intermediate_size list)
            picked = [min(x, _SHRINK[k]) if isinstance(x, int) and not isinstance(x, bool) else x for x in picked]
        d[k] = "".join(picked) if isinstance(v, str) else picked
    # index lists into the layer stack (mlp_only_layers, moe_layers as indices, ...): remap the kept ones
    for k, v in list(d.items()):
        if (
            isinstance(v, list)
            and k not in aligned
            and (k.endswith("layers") or k.endswith("indexes") or k.endswith("indices") or k.endswith("layer_ids"))
            and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            and old_layers
            and all(0 <= x < max(old_layers) for x in v)
        ):
            d[k] = [keep.index(x) for x in v if x in keep]
        elif (
            isinstance(v, dict) and v and old_layers and all(str(x).isdigit() and int(x) < max(old_layers) for x in v)
        ):  # per-layer settings keyed by layer index (gemma4's per_layer_config)
            d[k] = {
                type(x)(keep.index(int(x))): shrink(y) if isinstance(y, dict) else y
                for x, y in v.items()
                if int(x) in keep
            }
    for k, v in list(d.items()):
        if isinstance(v, bool) or not isinstance(v, int):
            continue
        if k in _LAYER_COUNT_KEYS or k in ("depth",) and v in old_layers:
            d[k] = min(v, new_layers) if v in old_layers else min(v, LAYERS)
        elif k in _SHRINK and v > _SHRINK[k]:
            d[k] = _SHRINK[k]
        elif k in ("max_window_layers",) and v > new_layers:
            d[k] = new_layers
    if "is_decoder" in d:  # a causal-LM head of an encoder family runs as a decoder (causal attention)
        d["is_decoder"] = True
    heads = d.get("num_attention_heads")
    if "head_dim" in d and d["head_dim"] is None and isinstance(heads, int) and isinstance(d.get("hidden_size"), int):
        d["head_dim"] = d["hidden_size"] // heads
    if "num_key_value_heads" in d and d["num_key_value_heads"] is None and isinstance(heads, int):
        d["num_key_value_heads"] = heads
    if isinstance(d.get("qk_rope_head_dim"), int) and isinstance(d.get("kv_lora_rank"), int) and "head_dim" in d:
        d["head_dim"] = d["qk_rope_head_dim"]  # MLA: the rotary embedding is sized by the rope part of q/k
    if isinstance(d.get("kv_lora_rank"), int) and isinstance(heads, int) and "num_key_value_heads" in d:
        d["num_key_value_heads"] = heads  # MLA: k and v are expanded per attention head from the latent
    if isinstance(d.get("qk_head_dim"), int):
        d["qk_head_dim"] = d.get("qk_nope_head_dim", 0) + d.get("qk_rope_head_dim", 0)
    _zero_random(d)
    for k, v in list(d.items()):  # nested sub-configs
        if isinstance(v, dict) and k not in _NO_RECURSE and ("model_type" in v or k.endswith("config")):
            shrink(v, v.get("model_type", ""))
    for k, v in OVERRIDES.get(model_type, {}).items():
        d[k] = v
    return d


def _remap_token_ids(d: dict, vocab: int, used: dict) -> None:
    """Token ids that no longer fit the vocabulary move to distinct slots at its top."""

    def fit(x):
        if not isinstance(x, int) or isinstance(x, bool) or x < vocab:
            return x
        if x not in used:
            used[x] = vocab - 1 - len(used) % SPECIAL_IDS
        return used[x]

    for k, v in list(d.items()):
        if _is_token_key(k) or k in ("pad_token_id", "bos_token_id", "eos_token_id", "vocab_offset"):
            d[k] = [fit(x) for x in v] if isinstance(v, list) else fit(v)
        elif isinstance(v, dict) and k not in _NO_RECURSE:
            _remap_token_ids(v, vocab, used)


def token_ids(d: dict, out: set | None = None) -> set[int]:
    """Every special token id a config dict mentions (input ids avoid them)."""
    out = set() if out is None else out
    for k, v in d.items():
        if _is_token_key(k) or k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            for x in v if isinstance(v, list) else [v]:
                if isinstance(x, int) and not isinstance(x, bool):
                    out.add(x)
        elif isinstance(v, dict) and k not in _NO_RECURSE:
            token_ids(v, out)
    return out


def _vocab_of(d: dict) -> int:
    for k in ("vocab_size",):
        if isinstance(d.get(k), int):
            return d[k]
    for v in d.values():
        if isinstance(v, dict) and isinstance(v.get("vocab_size"), int):
            return v["vocab_size"]
    return VOCAB


def tiny_config(model_type: str):
    """The tiny config of ``model_type`` (a key of ``CONFIG_MAPPING``), in eager attention, no cache."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = cls().to_dict()
        shrink(d, model_type)
        _remap_token_ids(d, _vocab_of(d), {})
        for k in ("transformers_version", "architectures"):
            d.pop(k, None)
        cfg = cls.from_dict(d)
    cfg.use_cache = False
    return cfg


def vocab_size(cfg) -> int:
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "decoder", None)):
        v = getattr(c, "vocab_size", None) if c is not None else None
        if isinstance(v, int):
            return v
    return VOCAB


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
