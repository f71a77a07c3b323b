"""The embedded default of ``fastft train``: a tiny pretrained Llama, its tokenizer and an instruction dataset.

``fastft train`` with no ``--model`` and no ``--data`` fine-tunes :func:`load_model` (a small
Llama-architecture model that ``scripts/make_default.py`` pretrained on generated text, shipped
as safetensors) on :func:`dataset_path` (generated Alpaca-format tasks the base was never
trained on: capital letters, three times, spelled with dashes, first and last letter, backwards)
with the settings in :data:`RECOMMENDED`. Nothing here touches the network.
"""

from __future__ import annotations

import json
import pathlib

import torch

from .tasks import PROMPT_INPUT, PROMPT_NO_INPUT, SAMPLE_PROMPTS

HERE = pathlib.Path(__file__).resolve().parent
CHECKPOINT = HERE / "model.safetensors"
CONFIG = HERE / "config.json"
DATASET = HERE / "tasks.jsonl"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
# One token per character: the specials, newline, then printable ASCII.
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
MODEL_MAX_LENGTH = 1024

# Renders a conversation in the Alpaca format the model was fine-tuned on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\\n\\n### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# Model shape (also written to config.json next to the checkpoint).
MODEL_CONFIG = dict(
    vocab_size=len(SPECIAL_TOKENS) + len(CHARS),
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=MODEL_MAX_LENGTH,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.02,
)

# Settings with which the default run learns visibly in about 70 s of training on 2 idle CPU cores (fp32,
# ~11.4k tokens/s): 200 steps x 8 packed rows of 512 characters, about 1.4 epochs. Measured with
# `fastft train` (84 s wall in all): eval loss 4.38 -> 0.93 (step 50) -> 0.50 -> 0.40 -> 0.39, and the three
# sample prompts go from the base's copy ("garden", "candle candle", "s i l v e r") to the right answers.
RECOMMENDED: dict = dict(
    method="lora",
    max_steps=200,
    lr=3e-3,
    batch_size=8,
    grad_accum=1,
    seq_len=512,
    rank=16,
    alpha=32,
    dropout=0.0,
    eval_every=50,
    eval_frac=0.05,
    warmup_steps=10,
    packing=True,
    max_new_tokens=24,
)
# the embedded preference run (``fastft train --objective dpo``: fastft.preference.default_preference_records,
# correct vs wrong answers of the shipped tasks): reward accuracy rises within a couple of CPU minutes
RECOMMENDED_PREFERENCE: dict = dict(max_steps=60, batch_size=4, eval_every=20, eval_frac=0.02, warmup_steps=5)

__all__ = [
    "PROMPT_INPUT",
    "PROMPT_NO_INPUT",
    "RECOMMENDED",
    "RECOMMENDED_PREFERENCE",
    "dataset_path",
    "load_model",
    "load_tokenizer",
    "model_config",
    "sample_prompts",
]


def _tokenizer_object():
    from tokenizers import Tokenizer, decoders, models, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    # BPE without merges: every character is its own token, anything else is <unk>.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok


def load_tokenizer():
    """The character-level tokenizer of the default model (built in code, no files, no hub).

    Adds ``<s>`` in front like Llama's tokenizers (not ``</s>``: data loaders append it),
    pads on the left (batched generation), and renders chats in the Alpaca format.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer_object(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def model_config():
    """The ``LlamaConfig`` of the default model."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**MODEL_CONFIG)
    cfg.use_cache = True
    return cfg


def load_model(dtype: torch.dtype = torch.float32, *, pretrained: bool = True):
    """The default ``LlamaForCausalLM``: the shipped pretrained checkpoint, in ``dtype``.

    ``pretrained=False`` (or a missing checkpoint) gives the same shape with random weights
    from a fixed seed, what ``scripts/make_default.py`` starts pretraining from.
    """
    from transformers import LlamaForCausalLM

    cfg = model_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    if pretrained and CHECKPOINT.exists():
        from safetensors.torch import load_file

        state = load_file(str(CHECKPOINT))
        model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.generation_config.bos_token_id = cfg.bos_token_id
    model.generation_config.eos_token_id = cfg.eos_token_id
    return model.to(dtype).eval()


def dataset_path() -> pathlib.Path:
    """The shipped Alpaca-format JSONL (``instruction``, ``input``, ``output``)."""
    return DATASET


def sample_prompts() -> list[dict]:
    """Held-out records (their words appear nowhere in the dataset) to show generations."""
    return [dict(r) for r in SAMPLE_PROMPTS]


def read_config_json() -> dict:
    return json.loads(CONFIG.read_text()) if CONFIG.exists() else dict(MODEL_CONFIG)
