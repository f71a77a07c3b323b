"""fastft.data: loading, prompt masking, truncation, split, padded/packed batches (no model hub)."""

import csv
import json
import string

import pytest
import torch
import torch.nn.functional as F

from fastft.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    DataError,
    TokenizedDataset,
    count_label_tokens,
    detect_format,
    load_records,
    make_batches,
    pad_token_id,
    prepare,
    tokenize_records,
    train_eval_split,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def char_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """One token per printable ASCII character, plus <pad>=0, <s>=1, </s>=2, <unk>=3."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hello there!"},
    {"instruction": "Name a colour.", "output": "Blue, like the sky."},
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you?"},
            {"role": "assistant", "content": "fine, thanks"},
        ]
    },
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]


def trained_runs(tok, ex):
    """Decoded text of each maximal run of trained labels (position 0 never counts: shifted away)."""
    runs, cur = [], []
    for i, (t, lab) in enumerate(zip(ex["input_ids"], ex["labels"])):
        if i > 0 and lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- loading


def test_load_each_source_gives_the_same_records(tmp_path):
    from datasets import Dataset

    jl = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in ALPACA[:2]) + "\n\n  \n")
    js = write(tmp_path / "a.json", json.dumps(ALPACA[:2]))
    js_data = write(tmp_path / "b.json", json.dumps({"data": ALPACA[:2], "version": 1}))
    js_train = write(tmp_path / "c.json", json.dumps({"train": ALPACA[:2]}))
    cs = tmp_path / "a.csv"
    with cs.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ALPACA[:2])
    for src in (jl, str(js), js_data, js_train, cs, Dataset.from_list(ALPACA[:2]), ALPACA[:2]):
        recs = load_records(src)
        assert recs == ALPACA[:2], src
        assert detect_format(recs) == "alpaca"


def test_detect_format():
    assert detect_format(CHAT) == "chat"
    assert detect_format([{"text": "x"}]) == "text"
    assert detect_format(ALPACA) == "alpaca"
    with pytest.raises(DataError, match=r"keys \['answer', 'question'\].*accepted.*instruction.*messages.*text"):
        detect_format([{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="records must be dicts"):
        detect_format(["text"])


def test_missing_file_is_a_data_error(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl: no such file") as e:
        load_records(p)
    assert not isinstance(e.value, FileNotFoundError)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = write(tmp_path / "bad.jsonl", '{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON line"):
        load_records(p)
    p = write(tmp_path / "list.jsonl", '{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object"):
        load_records(p)


@pytest.mark.parametrize("fname,content", [("e.jsonl", "\n \n"), ("e.json", "[]"), ("e.json", ""), ("e.csv", "text\n")])
def test_empty_file(tmp_path, fname, content):
    with pytest.raises(DataError, match=rf"{fname} has no examples"):
        load_records(write(tmp_path / fname, content))


def test_empty_sources():
    from datasets import Dataset

    with pytest.raises(DataError, match="has no examples"):
        load_records([])
    with pytest.raises(DataError, match="my set has no examples"):
        load_records(Dataset.from_list([]), name="my set")


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"rows": []}', r"w\.json: expected a list of objects or an object with a 'data' or 'train' list.*\['rows'\]"),
        ("42", r"w\.json: expected a list of objects, got int"),
        ('[{"text": "a"}, "b"]', r"w\.json\[1\]: expected a JSON object, got str"),
        ('[{"text": "a"},\n  {"text": }]', r"w\.json:2: invalid JSON"),
    ],
)
def test_json_wrong_shape(tmp_path, content, match):
    with pytest.raises(DataError, match=match):
        load_records(write(tmp_path / "w.json", content))


def test_other_bad_sources(tmp_path):
    from datasets import Dataset, DatasetDict

    with pytest.raises(DataError, match=r"x\.txt: unknown data file type '\.txt'"):
        load_records(write(tmp_path / "x.txt", "hi"))
    with pytest.raises(DataError, match=r"record 2: expected a dict, got str"):
        load_records([{"text": "a"}, "b"])
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train'\]"):
        load_records(DatasetDict({"train": Dataset.from_list([{"text": "a"}])}))
    with pytest.raises(TypeError, match="got int"):
        load_records(3)
    with pytest.raises(DataError, match=r"r\.csv:3: more fields"):
        load_records(write(tmp_path / "r.csv", "text\na\nb,c\n"))


def test_bad_record_names_its_line(tmp_path, tok):
    p = write(tmp_path / "m.jsonl", json.dumps(ALPACA[0]) + "\n\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataError, match=r"m\.jsonl:3: missing 'output'"):
        tokenize_records(load_records(p), tok, seq_len=512)
    with pytest.raises(DataError, match=r"record 2: 'output' must be a string, got int"):
        tokenize_records([ALPACA[0], {"instruction": "x", "output": 5}], tok, seq_len=512)


# ---------------------------------------------------------------- masking


def test_alpaca_masks_the_prompt(tok):
    ds = tokenize_records(ALPACA, tok, seq_len=512)
    assert len(ds) == 3 and ds.stats.n_truncated == 0 and ds.stats.n_dropped_all_masked == 0
    for rec, ex in zip(ALPACA, ds.examples):
        fmt = ALPACA_PROMPT if rec.get("input") else ALPACA_PROMPT_NO_INPUT
        prompt = fmt.format(instruction=rec["instruction"], input=rec.get("input", ""))
        assert tok.decode(ex["input_ids"]) == "<s>" + prompt + rec["output"] + "</s>"
        assert trained_runs(tok, ex) == [rec["output"] + "</s>"]
        assert ex["labels"][: len(prompt) + 1] == [-100] * (len(prompt) + 1)
    assert ds.stats.n_label_tokens == sum(len(r["output"]) + 1 for r in ALPACA)
    assert ds.stats.n_tokens == sum(len(e["input_ids"]) for e in ds.examples)


def test_train_on_prompt(tok):
    ds = tokenize_records(ALPACA[:1], tok, seq_len=512, train_on_prompt=True)
    assert ds.examples[0]["labels"] == ds.examples[0]["input_ids"]


def test_chat_trains_only_assistant_turns(tok):
    ds = tokenize_records(CHAT, tok, seq_len=512)
    assert len(ds) == 2
    for rec, ex in zip(CHAT, ds.examples):
        assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(rec["messages"], tokenize=False)
        assert ex["input_ids"].count(tok.bos_token_id) == 1  # the template's BOS, not a second one
        want = [m["content"] + "</s>" for m in rec["messages"] if m["role"] == "assistant"]
        assert trained_runs(tok, ex) == want


def test_chat_without_template_or_assistant(tok):
    with pytest.raises(DataError, match="chat template"):
        tokenize_records(CHAT, char_tokenizer(chat_template=None), seq_len=512, source_name="chats.jsonl")
    no_reply = {"messages": [{"role": "user", "content": "anyone?"}]}
    ds = tokenize_records([CHAT[1], no_reply], tok, seq_len=512)
    assert len(ds) == 1 and ds.stats.n_dropped_all_masked == 1 and ds.stats.n_records == 2
    with pytest.raises(DataError, match=r"chats\.jsonl: all 1 examples dropped: .*assistant"):
        tokenize_records([no_reply], tok, seq_len=512, source_name="chats.jsonl")
    with pytest.raises(DataError, match=r"record 1: message 0 must be a dict"):
        tokenize_records([{"messages": [{"role": "user"}]}], tok, seq_len=512)


class SlowTokenizer:
    """The char tokenizer without offsets (like a slow tokenizer): masking falls back to counting tokens."""

    is_fast = False

    def __init__(self, fast):
        self._fast = fast

    def __getattr__(self, name):
        return getattr(self._fast, name)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self._fast(text, add_special_tokens=add_special_tokens)["input_ids"]}


def test_slow_tokenizer_masks_the_same(tok):
    for recs in (ALPACA, CHAT):
        fast = tokenize_records(recs, tok, seq_len=512)
        slow = tokenize_records(recs, SlowTokenizer(tok), seq_len=512)
        assert slow.examples == fast.examples


def test_text_trains_everything_with_bos_and_eos(tok):
    ds = tokenize_records([{"text": "abc"}, {"text": "<s>xy"}], tok, seq_len=512)
    a, b = ds.examples
    assert tok.decode(a["input_ids"]) == "<s>abc</s>" and tok.decode(b["input_ids"]) == "<s>xy</s>"
    assert trained_runs(tok, a) == ["abc</s>"]
    assert a["labels"][0] == -100


def test_truncation_counted_and_all_masked_dropped(tok):
    recs = [{"instruction": "i" * n, "output": "o" * 5} for n in (1, 10, 30, 60, 120)]
    full = tokenize_records(recs, tok, seq_len=10_000)
    lengths = [len(e["input_ids"]) for e in full.examples]
    prompt_len = [next(i for i, lab in enumerate(e["labels"]) if lab != -100) for e in full.examples]
    seq_len = prompt_len[2] + 3  # the third keeps part of its response; the last two lose all of it
    ds = tokenize_records(recs, tok, seq_len=seq_len)
    want_cut = sum(n > seq_len for n in lengths)
    want_dropped = sum(p >= seq_len for p in prompt_len)  # nothing of the response left to train
    assert want_cut > want_dropped > 0
    assert ds.stats.n_truncated == want_cut
    assert ds.stats.n_dropped_all_masked == want_dropped
    assert len(ds) == len(recs) - want_dropped
    assert all(len(e["input_ids"]) <= seq_len for e in ds.examples)
    s = ds.stats.summary()
    assert f"{len(recs)} records -> {len(ds)} examples" in s
    assert f"{want_cut} truncated to {seq_len} tokens" in s and f"{want_dropped} dropped" in s
    with pytest.raises(
        DataError, match=r"big\.json: all 1 examples dropped: .*truncated away at seq_len=8; raise --seq-len"
    ):
        tokenize_records(recs[-1:], tok, seq_len=8, source_name="big.json")


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        tokenize_records(ALPACA, tok, seq_len=1)
    with pytest.raises(ValueError, match="template must be one of"):
        tokenize_records(ALPACA, tok, seq_len=64, template="sharegpt")
    assert pad_token_id(tok) == tok.pad_token_id


def test_summary_formats_large_counts():
    from fastft.data import DataStats

    s = DataStats(1000, 998, 12, 2, 180_000, 95_400, seq_len=256).summary()
    assert (
        s
        == "1000 records -> 998 examples, 12 truncated to 256 tokens, 2 dropped (all labels masked), 180k tokens (95.4k trained)"
    )
    assert DataStats(3, 3, 0, 0, 1_234_567, 999_600).summary().endswith("1.23M tokens (1M trained)")


# ---------------------------------------------------------------- split / prepare


def text_records(n, seed=0, lo=3, hi=40):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [{"text": f"{i:03d}" + string.ascii_letters[i % 52] * k} for i, k in enumerate(lens)]


def test_split_sizes_and_determinism(tok):
    ds = tokenize_records(text_records(25), tok, seq_len=64)
    tr, ev = train_eval_split(ds, 0.1, seed=3)
    assert (len(tr), len(ev)) == (22, 3)
    ids = lambda d: [tuple(e["input_ids"]) for e in d.examples]  # noqa: E731
    assert sorted(ids(tr) + ids(ev)) == sorted(ids(ds))
    tr2, ev2 = train_eval_split(ds, 0.1, seed=3)
    assert ids(tr2) == ids(tr) and ids(ev2) == ids(ev)
    assert any(ids(train_eval_split(ds, 0.1, seed=s)[1]) != ids(ev) for s in range(4, 8))
    assert ev.stats.n_examples == 3 and ev.stats.n_tokens == sum(len(e["input_ids"]) for e in ev.examples)
    two = TokenizedDataset(ds.examples[:2], ds.stats)
    assert [len(x) for x in train_eval_split(two, 0.1)] == [1, 1]
    with pytest.raises(DataError, match="need at least 2"):
        train_eval_split(TokenizedDataset(ds.examples[:1], ds.stats))
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="eval_frac"):
            train_eval_split(ds, bad)


def test_prepare(tmp_path, tok):
    p = write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in text_records(20)))
    e = write(tmp_path / "e.jsonl", "\n".join(json.dumps(r) for r in text_records(3, seed=1)))
    tr, ev = prepare(p, tok, seq_len=64)
    assert (len(tr), len(ev)) == (18, 2)
    tr, ev = prepare(p, tok, seq_len=64, eval_source=e)
    assert (len(tr), len(ev)) == (20, 3)
    tr, ev = prepare(p, tok, seq_len=64, eval_frac=0)
    assert len(tr) == 20 and ev is None
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        prepare(p, tok, seq_len=64, eval_source=tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def varied(tok):
    return tokenize_records(text_records(150, lo=1, hi=60), tok, seq_len=64)


def unpacked_examples(batch):
    out = []
    for ids, am in zip(batch["input_ids"], batch["attention_mask"]):
        out.append(tuple(ids[am.bool()].tolist()))
    return out


def packed_segments(batch):
    """(row, start, end) of every example in a packed batch, tail padding excluded."""
    segs = []
    for r, (pos, lab) in enumerate(zip(batch["position_ids"], batch["labels"])):
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        for s, e in zip(starts[:-1], starts[1:]):
            if (lab[s:e] != -100).any():  # tail padding has no labels
                segs.append((r, s, e))
    return segs


def test_padded_batches(varied, tok):
    bs = make_batches(varied, batch_size=8, seq_len=64, pad_id=tok.pad_token_id, seed=1, epoch=0)
    seen = []
    for b in bs:
        assert set(b) == {"input_ids", "labels", "attention_mask"}
        assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long
        pad = b["attention_mask"] == 0
        assert (b["input_ids"][pad] == tok.pad_token_id).all() and (b["labels"][pad] == -100).all()
        assert (b["attention_mask"][:, 0] == 1).all()  # right padding
        assert b["attention_mask"].sum(1).max() == b["input_ids"].shape[1]  # padded to the batch's longest
        seen += unpacked_examples(b)
    assert sorted(seen) == sorted(tuple(e["input_ids"]) for e in varied.examples)  # each exactly once
    assert sum(count_label_tokens(b) for b in bs) == varied.stats.n_label_tokens
    longest = max(len(e["input_ids"]) for e in varied.examples)
    assert bs[0]["input_ids"].shape[1] == longest  # the longest batch first


def test_batches_deterministic_in_seed_and_epoch(varied):
    def key(bs):
        return [tuple(b["input_ids"].flatten().tolist()) for b in bs]

    for packing in (False, True):
        kw = dict(batch_size=4, seq_len=64, pad_id=0, packing=packing, seed=7)
        a = key(make_batches(varied, epoch=2, **kw))
        assert a == key(make_batches(varied, epoch=2, **kw))
        assert a != key(make_batches(varied, epoch=3, **kw))
        assert a != key(make_batches(varied, epoch=2, **{**kw, "seed": 8}))


def test_group_by_length_reduces_padding(varied):
    def padding(bs):
        return sum(int((b["attention_mask"] == 0).sum()) for b in bs)

    grouped = make_batches(varied, batch_size=8, seq_len=64, pad_id=0, group_by_length=True)
    plain = make_batches(varied, batch_size=8, seq_len=64, pad_id=0, group_by_length=False)
    assert padding(grouped) < padding(plain) / 2


def test_drop_last_and_no_shuffle(varied):
    kw = dict(batch_size=8, seq_len=64, pad_id=0)
    assert len(make_batches(varied, **kw)) == -(-len(varied) // 8)
    dl = make_batches(varied, drop_last=True, **kw)
    assert len(dl) == len(varied) // 8 and all(b["input_ids"].shape[0] == 8 for b in dl)
    plain = make_batches(varied, shuffle=False, group_by_length=False, **kw)
    assert [x for b in plain for x in unpacked_examples(b)] == [tuple(e["input_ids"]) for e in varied.examples]
    with pytest.raises(ValueError, match=r"tokens > seq_len=16"):
        make_batches(varied, batch_size=8, seq_len=16, pad_id=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make_batches(varied, batch_size=0, seq_len=64, pad_id=0)


def test_packed_batches(varied):
    seq_len = 96
    bs = make_batches(varied, batch_size=4, seq_len=seq_len, pad_id=0, packing=True, seed=2, epoch=1)
    seen = []
    by_ids = {tuple(e["input_ids"]): e for e in varied.examples}
    n_rows = 0
    for b in bs:
        assert set(b) == {"input_ids", "labels", "position_ids"}
        assert b["input_ids"].shape[1] <= seq_len and b["position_ids"].shape == b["input_ids"].shape
        n_rows += b["input_ids"].shape[0]
        for r, s, e in packed_segments(b):
            ids = tuple(b["input_ids"][r, s:e].tolist())
            ex = by_ids[ids]
            assert b["position_ids"][r, s:e].tolist() == list(range(e - s))
            assert b["labels"][r, s] == -100  # nothing predicted across the boundary
            assert b["labels"][r, s + 1 : e].tolist() == ex["labels"][1:]
            seen.append(ids)
    assert sorted(seen) == sorted(by_ids)  # every example exactly once, none split
    total = sum(len(e["input_ids"]) for e in varied.examples)
    assert n_rows <= -(-total // seq_len) + 2  # rows are nearly full
    assert sum(count_label_tokens(b) for b in bs) == varied.stats.n_label_tokens


def per_token_losses(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="none")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_unpacked_on_tiny_llama(attn, tok):
    from fastft.testing import tiny_model

    ds = tokenize_records(text_records(7, lo=2, hi=20), tok, seq_len=32)
    model = tiny_model("llama")
    model.set_attn_implementation(attn)
    model.eval()
    packed = make_batches(ds, batch_size=2, seq_len=48, pad_id=0, packing=True)
    assert any(len(set(packed_segments(b))) > b["input_ids"].shape[0] for b in packed)  # some row holds several
    unpacked = make_batches(ds, batch_size=len(ds), seq_len=48, pad_id=0, shuffle=False)[0]
    with torch.no_grad():
        ref = per_token_losses(model, unpacked)
        index = {
            tuple(r[m.bool()].tolist()): i
            for i, (r, m) in enumerate(zip(unpacked["input_ids"], unpacked["attention_mask"]))
        }
        n = 0
        for b in packed:
            got = per_token_losses(model, b)
            for r, s, e in packed_segments(b):
                i = index[tuple(b["input_ids"][r, s:e].tolist())]
                # packed targets s+1..e-1 <-> the example's own targets 1..n-1
                torch.testing.assert_close(got[r, s : e - 1], ref[i, : e - s - 1], atol=1e-5, rtol=0)
                n += 1
        assert n == len(ds)
        assert sum(count_label_tokens(b) for b in packed) == count_label_tokens(unpacked)


def test_packed_loss_with_fastft_patch(tok):
    """A model with the fused loss (and rope/norm fusions) gives the same mean loss on a packed batch."""
    import fastft
    from fastft.testing import tiny_model

    ds = tokenize_records(text_records(6, lo=2, hi=20), tok, seq_len=32)
    (b,) = make_batches(ds, batch_size=8, seq_len=200, pad_id=0, packing=True)
    assert b["input_ids"].shape[0] == 1
    model = tiny_model("llama")
    with torch.no_grad():
        ref = per_token_losses(model, b)
        ref = ref.sum() / count_label_tokens(b)
        fastft.patch(model)
        model.train()
        got = model(**b).loss
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
