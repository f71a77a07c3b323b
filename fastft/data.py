"""Fine-tuning data: load, tokenize with prompt masking, split, and batch (padded or packed).

Sources: a ``.jsonl`` / ``.json`` / ``.csv`` file, a ``datasets.Dataset`` or a list of dicts.
Formats, detected from the first record's keys:

* ``alpaca``: ``instruction`` [``input``] ``output`` rendered with the Alpaca template; the
  prompt is masked (labels -100), the response and EOS train.
* ``chat``: ``messages`` (``role``/``content``) rendered with the tokenizer's chat template;
  only the assistant turns train (with whatever end-of-turn text the template puts after them).
* ``text``: ``text``; every token trains, EOS appended.

Every problem with the data raises :class:`DataError` (a ``ValueError``) naming the file, the
line or record, and what is wrong.

Batches come unpacked (right padding to the longest example of the batch, length-grouped) or
packed without padding (several whole examples per row, ``position_ids`` restarting at 0 at
each example, no ``attention_mask``): transformers >= 4.57 builds the block-diagonal causal
mask from the restarting position ids itself for eager, sdpa and flex attention (see
``transformers.masking_utils.find_packed_sequence_indices``), and flash-attention reads the
same position ids as variable-length sequences. The first label of every packed example is
-100, so no token is predicted across an example boundary.
"""

from __future__ import annotations

import bisect
import csv
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "DataError",
    "DataStats",
    "TokenizedDataset",
    "count_label_tokens",
    "detect_format",
    "load_records",
    "make_batches",
    "pad_token_id",
    "prepare",
    "tokenize_records",
    "train_eval_split",
]

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

FORMATS = ("alpaca", "chat", "text")
_FORMAT_KEYS = {"alpaca": "instruction, output (and optional input)", "chat": "messages", "text": "text"}
_SUFFIXES = (".jsonl", ".json", ".csv")


class DataError(ValueError):
    """Bad fine-tuning data: the message names the file (and line or record) and what is wrong."""


# --------------------------------------------------------------------------------------------
# loading


class Records(list):
    """A ``list[dict]`` that also remembers where each record came from (``file:LINE``)."""

    def __init__(self, records=(), locations: list[str] | None = None, name: str = "data"):
        super().__init__(records)
        self.locations = locations
        self.name = name

    def where(self, i: int) -> str:
        if self.locations is not None and i < len(self.locations):
            return self.locations[i]
        return f"{self.name} record {i + 1}"


def _where(records, i: int, name: str) -> str:
    if isinstance(records, Records):
        return records.where(i)
    return f"{name} record {i + 1}"


def load_records(source, *, name: str | None = None) -> list[dict]:
    """Records from a path (``.jsonl``/``.json``/``.csv`` by suffix), a ``datasets.Dataset`` or a list of dicts.

    The result is a list of dicts (a :class:`Records`, which also remembers ``file:LINE`` of each
    record for error messages). Raises :class:`DataError` for a missing file, a malformed line,
    a wrong JSON shape, an unknown suffix, or no examples at all.
    """
    if isinstance(source, (str, Path)):
        recs = _load_file(Path(source), name)
    elif _is_hf_dataset_dict(source):
        raise DataError(
            f"{name or 'dataset'}: got a datasets.DatasetDict with splits {sorted(source.keys())}; "
            "pass one split, e.g. ds['train']"
        )
    elif _is_hf_dataset(source):
        label = name or "dataset"
        recs = Records(source.to_list(), name=label)
        _check_dicts(recs, label)
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        label = name or "records"
        _check_dicts(source, label)
        recs = Records([dict(r) for r in source], name=label)
    else:
        raise TypeError(
            f"data source must be a path (str/Path), a datasets.Dataset or a list of dicts, got {type(source).__name__}"
        )
    if not recs:
        raise DataError(f"{recs.name} has no examples")
    return recs


def _is_hf_dataset(obj) -> bool:
    return type(obj).__module__.startswith("datasets") and hasattr(obj, "to_list") and hasattr(obj, "column_names")


def _is_hf_dataset_dict(obj) -> bool:
    return type(obj).__module__.startswith("datasets") and isinstance(obj, Mapping)


def _check_dicts(records, label: str) -> None:
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise DataError(f"{label} record {i + 1}: expected a dict, got {type(r).__name__}")


def _load_file(path: Path, name: str | None) -> Records:
    label = name or str(path)
    if not path.exists():
        raise DataError(f"{label}: no such file")
    if path.is_dir():
        raise DataError(f"{label}: is a directory, not a data file")
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(f"{label}: unknown data file type {path.suffix or '(no suffix)'!r}; use one of {_SUFFIXES}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{label}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix == ".jsonl":
        return _parse_jsonl(text, label)
    if suffix == ".json":
        return _parse_json(text, label)
    return _parse_csv(text, label)


def _parse_jsonl(text: str, label: str) -> Records:
    recs, locs = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{label}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{label}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        recs.append(obj)
        locs.append(f"{label}:{lineno}")
    return Records(recs, locs, name=label)


def _parse_json(text: str, label: str) -> Records:
    if not text.strip():
        return Records([], name=label)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{label}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    key = None
    if isinstance(obj, dict):
        for k in ("data", "train"):
            if isinstance(obj.get(k), list):
                key = k
                obj = obj[k]
                break
        else:
            raise DataError(
                f"{label}: expected a list of objects or an object with a 'data' or 'train' list, "
                f"got an object with keys {sorted(obj)}"
            )
    if not isinstance(obj, list):
        raise DataError(f"{label}: expected a list of objects, got {type(obj).__name__}")
    where = f"{label}[{key!r}]" if key else label
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise DataError(f"{where}[{i}]: expected a JSON object, got {type(r).__name__}")
    return Records(obj, [f"{where}[{i}]" for i in range(len(obj))], name=label)


def _parse_csv(text: str, label: str) -> Records:
    reader = csv.DictReader(text.splitlines(keepends=True))
    recs, locs = [], []
    try:
        for row in reader:
            lineno = reader.line_num
            if None in row:
                raise DataError(f"{label}:{lineno}: more fields than the header's {len(reader.fieldnames)}")
            if all((v is None or v == "") for v in row.values()):
                continue
            recs.append({k: ("" if v is None else v) for k, v in row.items()})
            locs.append(f"{label}:{lineno}")
    except csv.Error as e:
        raise DataError(f"{label}:{reader.line_num}: malformed CSV ({e})") from None
    return Records(recs, locs, name=label)


def detect_format(records: list[dict], *, name: str | None = None) -> str:
    """``"chat"`` (``messages``), ``"alpaca"`` (``instruction``/``output``) or ``"text"`` (``text``), from the first record."""
    label = name or getattr(records, "name", "data")
    if not records:
        raise DataError(f"{label} has no examples")
    first = records[0]
    if not isinstance(first, Mapping):
        raise DataError(f"{label}: records must be dicts, the first is a {type(first).__name__}")
    keys = set(first)
    if "messages" in keys:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    accepted = "; ".join(f"{f}: {k}" for f, k in _FORMAT_KEYS.items())
    raise DataError(f"{label}: can't tell the data format from the keys {sorted(keys)}; accepted keys are {accepted}")


# --------------------------------------------------------------------------------------------
# tokenizing


@dataclass
class DataStats:
    n_records: int
    n_examples: int
    n_truncated: int
    n_dropped_all_masked: int
    n_tokens: int
    n_label_tokens: int
    seq_len: int | None = None

    def summary(self) -> str:
        trunc = f"{self.n_truncated} truncated" + (f" to {self.seq_len} tokens" if self.seq_len else "")
        return (
            f"{self.n_records} records -> {self.n_examples} examples, {trunc}, "
            f"{self.n_dropped_all_masked} dropped (all labels masked), "
            f"{_human(self.n_tokens)} tokens ({_human(self.n_label_tokens)} trained)"
        )


def _human(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div * 0.9995:  # 999_600 -> "1M", not "1e+03k"
            return f"{n / div:.3g}{suffix}"
    return str(n)


@dataclass
class TokenizedDataset:
    examples: list[dict]
    stats: DataStats
    truncated: list[bool] | None = field(default=None, repr=False)  # per example, to recount stats on a split

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def _trained_count(labels: list[int]) -> int:
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


def tokenize_records(
    records,
    tokenizer,
    *,
    seq_len: int,
    template: str = "auto",
    train_on_prompt: bool = False,
    source_name: str = "data",
    add_bos: bool = True,
) -> TokenizedDataset:
    """Tokenize ``records`` into ``{"input_ids", "labels"}`` examples of at most ``seq_len`` tokens.

    ``template``: ``auto`` (detected from the first record), ``alpaca``, ``chat`` or ``text``.
    Prompt tokens get label -100 unless ``train_on_prompt``. The tokenizer's BOS is prepended
    (``add_bos``) when it has one and the text does not already start with it. Examples longer
    than ``seq_len`` are cut (and counted); examples left with no trained label are dropped (and
    counted); if none is left, :class:`DataError` says why.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise TypeError(f"seq_len must be an int, got {type(seq_len).__name__}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if template not in ("auto", *FORMATS):
        raise ValueError(f"template must be one of auto, {', '.join(FORMATS)}; got {template!r}")
    if source_name == "data" and isinstance(records, Records):
        source_name = records.name
    if not records:
        raise DataError(f"{source_name} has no examples")
    fmt = detect_format(records, name=source_name) if template == "auto" else template
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if fmt in ("alpaca", "text") and eos_id is None:
        raise DataError(f"{source_name}: the tokenizer has no EOS token, needed to end each {fmt} example")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source_name}: chat data (messages) needs a tokenizer with a chat template, and this tokenizer has none; "
            "set tokenizer.chat_template or use alpaca/text data"
        )

    # each record -> (text, trained char spans, append eos)
    texts, spans = [], []
    for i, rec in enumerate(records):
        where = _where(records, i, source_name)
        if not isinstance(rec, Mapping):
            raise DataError(f"{where}: expected a dict, got {type(rec).__name__}")
        if fmt == "alpaca":
            text, sp = _render_alpaca(rec, where)
        elif fmt == "text":
            text, sp = _render_text(rec, where)
        else:
            text, sp = _render_chat(rec, tokenizer, where)
        if train_on_prompt:
            sp = [(0, len(text))]
        texts.append(text)
        spans.append(sp)
    append_eos = fmt in ("alpaca", "text")

    ids_labels = _tokenize_with_spans(tokenizer, texts, spans)
    bos_id = getattr(tokenizer, "bos_token_id", None) if add_bos else None

    examples, truncated_flags = [], []
    n_truncated = n_dropped = n_dropped_by_trunc = 0
    for ids, labels in ids_labels:
        if append_eos:
            ids.append(eos_id)
            labels.append(eos_id)
        if bos_id is not None and (not ids or ids[0] != bos_id):
            ids.insert(0, bos_id)
            labels.insert(0, bos_id if train_on_prompt else IGNORE_INDEX)
        was_trained = _trained_count(labels) > 0
        cut = len(ids) > seq_len
        if cut:
            ids, labels = ids[:seq_len], labels[:seq_len]
            n_truncated += 1
        if _trained_count(labels) == 0:
            n_dropped += 1
            n_dropped_by_trunc += int(cut and was_trained)
            continue
        examples.append({"input_ids": ids, "labels": labels})
        truncated_flags.append(cut)

    if not examples:
        if n_dropped_by_trunc:
            why = f"every example's response was truncated away at seq_len={seq_len}; raise --seq-len"
        elif fmt == "chat":
            why = "no example has an assistant message to train on"
        else:
            why = "no example has any token to train on"
        raise DataError(f"{source_name}: all {len(records)} examples dropped: {why}")

    stats = DataStats(
        n_records=len(records),
        n_examples=len(examples),
        n_truncated=n_truncated,
        n_dropped_all_masked=n_dropped,
        n_tokens=sum(len(e["input_ids"]) for e in examples),
        n_label_tokens=sum(_trained_count(e["labels"]) for e in examples),
        seq_len=seq_len,
    )
    return TokenizedDataset(examples, stats, truncated_flags)


def _field(rec, key: str, where: str, fmt: str, *, optional: bool = False) -> str:
    if key not in rec or rec[key] is None:
        if optional:
            return ""
        raise DataError(f"{where}: missing {key!r} ({fmt} format; keys found: {sorted(rec)})")
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    return v


def _render_alpaca(rec, where: str) -> tuple[str, list[tuple[int, int]]]:
    instruction = _field(rec, "instruction", where, "alpaca")
    inp = _field(rec, "input", where, "alpaca", optional=True)
    output = _field(rec, "output", where, "alpaca")
    if inp.strip():
        prompt = ALPACA_PROMPT.format(instruction=instruction, input=inp)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return prompt + output, [(len(prompt), len(prompt) + len(output))]


def _render_text(rec, where: str) -> tuple[str, list[tuple[int, int]]]:
    text = _field(rec, "text", where, "text")
    return text, [(0, len(text))]


def _render_chat(rec, tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    if "messages" not in rec:
        raise DataError(f"{where}: missing 'messages' (chat format; keys found: {sorted(rec)})")
    msgs = rec["messages"]
    if isinstance(msgs, str):  # e.g. a CSV cell holding JSON
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise DataError(f"{where}: 'messages' is a string that is not a JSON list of messages") from None
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} dicts")
    for j, m in enumerate(msgs):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {j} must be a dict with string 'role' and 'content', got {m!r:.80}")

    def render(conv, gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja errors, template's own raise_exception
            raise DataError(f"{where}: the chat template failed on this conversation: {e}") from None

    full = render(msgs, False)
    spans = []
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = render(msgs[:j], True)
        upto = render(msgs[: j + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                f"{where}: the tokenizer's chat template is not prefix-stable (rendering the first {j + 1} messages "
                "is not a prefix of the whole conversation), so the assistant turns can't be located to mask the rest"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def _tokenize_with_spans(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]], chunk: int = 1024):
    """(ids, labels) per text: a token trains when it starts inside one of the text's char spans."""
    out = []
    if getattr(tokenizer, "is_fast", False):
        for c in range(0, len(texts), chunk):
            enc = tokenizer(texts[c : c + chunk], add_special_tokens=False, return_offsets_mapping=True)
            for ids, offs, sp in zip(enc["input_ids"], enc["offset_mapping"], spans[c : c + chunk]):
                ids = list(ids)
                labels = [t if any(a <= s < b for a, b in sp) else IGNORE_INDEX for t, (s, _e) in zip(ids, offs)]
                out.append((ids, labels))
        return out
    for text, sp in zip(texts, spans):  # slow tokenizer: count tokens of text prefixes
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for a, b in sp:
            na = len(tokenizer(text[:a], add_special_tokens=False)["input_ids"]) if a else 0
            nb = len(tokenizer(text[:b], add_special_tokens=False)["input_ids"]) if b < len(text) else len(ids)
            for k in range(na, min(nb, len(ids))):
                labels[k] = ids[k]
        out.append((ids, labels))
    return out


# --------------------------------------------------------------------------------------------
# split


def _subset(ds: TokenizedDataset, idx: list[int]) -> TokenizedDataset:
    examples = [ds.examples[i] for i in idx]
    flags = [ds.truncated[i] for i in idx] if ds.truncated is not None else None
    stats = DataStats(
        n_records=len(examples),
        n_examples=len(examples),
        n_truncated=sum(flags) if flags is not None else 0,
        n_dropped_all_masked=0,
        n_tokens=sum(len(e["input_ids"]) for e in examples),
        n_label_tokens=sum(_trained_count(e["labels"]) for e in examples),
        seq_len=ds.stats.seq_len,
    )
    return TokenizedDataset(examples, stats, flags)


def train_eval_split(
    ds: TokenizedDataset, eval_frac: float = 0.1, seed: int = 0
) -> tuple[TokenizedDataset, TokenizedDataset]:
    """Shuffle (deterministically in ``seed``) and split off ``eval_frac`` (at least 1 example) for evaluation."""
    if not isinstance(eval_frac, (int, float)) or isinstance(eval_frac, bool) or not 0 < eval_frac < 1:
        raise ValueError(f"eval_frac must be a number in (0, 1), got {eval_frac!r}")
    n = len(ds)
    if n < 2:
        raise DataError(f"can't split {n} example(s) into train and eval sets: need at least 2 (or give an eval set)")
    idx = list(range(n))
    random.Random(f"fastft-split:{seed}").shuffle(idx)
    n_eval = min(n - 1, max(1, int(n * eval_frac + 0.5)))  # round half up
    return _subset(ds, sorted(idx[n_eval:])), _subset(ds, sorted(idx[:n_eval]))


def prepare(
    source,
    tokenizer,
    *,
    seq_len: int,
    template: str = "auto",
    eval_source=None,
    eval_frac: float | None = 0.1,
    seed: int = 0,
    train_on_prompt: bool = False,
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Load and tokenize the train data and the eval data (``eval_source``), or split ``eval_frac`` off the train data.

    ``eval_frac`` of 0 or None with no ``eval_source``: no eval set (``None``).
    """
    recs = load_records(source)
    train = tokenize_records(
        recs,
        tokenizer,
        seq_len=seq_len,
        template=template,
        train_on_prompt=train_on_prompt,
        source_name=getattr(recs, "name", "data"),
    )
    if eval_source is not None:
        erecs = load_records(eval_source, name=None if isinstance(eval_source, (str, Path)) else "eval records")
        ev = tokenize_records(
            erecs,
            tokenizer,
            seq_len=seq_len,
            template=template,
            train_on_prompt=train_on_prompt,
            source_name=getattr(erecs, "name", "eval data"),
        )
        return train, ev
    if not eval_frac:
        return train, None
    return train_eval_split(train, eval_frac, seed)


# --------------------------------------------------------------------------------------------
# batches


def _rng(seed: int, epoch: int) -> random.Random:
    return random.Random(f"fastft-batches:{seed}:{epoch}")


def make_batches(
    ds: TokenizedDataset,
    *,
    batch_size: int,
    seq_len: int,
    pad_id: int,
    packing: bool = False,
    group_by_length: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    pack_chunk: int = 2048,
) -> list[dict[str, torch.Tensor]]:
    """One epoch's batches, the same list for the same ``(seed, epoch)``.

    Unpacked: ``input_ids``, ``labels`` (-100 on padding), ``attention_mask``, right-padded to
    the batch's longest example; ``group_by_length`` sorts by length within shuffled chunks of
    ``50 * batch_size`` examples, then shuffles the batch order keeping the longest batch first
    (an out-of-memory shows at step 0).

    Packed: whole examples placed into rows of at most ``seq_len`` tokens (best-fit decreasing
    within shuffled chunks of ``pack_chunk`` examples), ``input_ids``, ``labels`` (-100 at each
    example's first token and on tail padding) and ``position_ids`` (restarting at 0 at every
    example and on the tail padding); no ``attention_mask``.
    """
    for nm, v in (("batch_size", batch_size), ("seq_len", seq_len), ("pad_id", pad_id), ("pack_chunk", pack_chunk)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{nm} must be an int, got {type(v).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if pack_chunk < 1:
        raise ValueError(f"pack_chunk must be >= 1, got {pack_chunk}")
    if len(ds) == 0:
        raise DataError("no examples to batch")
    lengths = [len(e["input_ids"]) for e in ds.examples]
    longest = max(lengths)
    if longest > seq_len:
        i = lengths.index(longest)
        raise ValueError(f"example {i} has {longest} tokens > seq_len={seq_len}; tokenize with seq_len <= {seq_len}")

    rng = _rng(seed, epoch)
    order = list(range(len(ds)))
    if shuffle:
        rng.shuffle(order)

    if packing:
        rows = _pack(order, lengths, seq_len, pack_chunk)
        if shuffle:
            rng.shuffle(rows)
        groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        if drop_last and len(groups[-1]) < batch_size:
            groups.pop()
        return [_packed_batch(ds, g, pad_id) for g in groups]

    if group_by_length:
        mega = 50 * batch_size
        order = [i for c in range(0, len(order), mega) for i in sorted(order[c : c + mega], key=lambda i: -lengths[i])]
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and len(groups[-1]) < batch_size:
        groups.pop()
    if group_by_length and shuffle and groups:
        rng.shuffle(groups)
        k = max(range(len(groups)), key=lambda g: max(lengths[i] for i in groups[g]))
        groups[0], groups[k] = groups[k], groups[0]
    return [_padded_batch(ds, g, pad_id) for g in groups]


def _pack(order: list[int], lengths: list[int], seq_len: int, chunk: int) -> list[list[int]]:
    rows: list[list[int]] = []
    for c in range(0, len(order), chunk):
        items = sorted(order[c : c + chunk], key=lambda i: -lengths[i])
        free: list[tuple[int, int]] = []  # sorted (room left, row) of the rows not full yet
        chunk_rows: list[list[int]] = []
        for i in items:
            n = lengths[i]
            k = bisect.bisect_left(free, (n, -1))
            if k < len(free):
                room, r = free.pop(k)
                chunk_rows[r].append(i)
            else:
                r, room = len(chunk_rows), seq_len
                chunk_rows.append([i])
            if room - n > 0:
                bisect.insort(free, (room - n, r))
        rows.extend(chunk_rows)
    return rows


def _padded_batch(ds: TokenizedDataset, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    T = max(len(ds.examples[i]["input_ids"]) for i in idx)
    input_ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(idx), T), dtype=torch.long)
    for b, i in enumerate(idx):
        e = ds.examples[i]
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(e["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _packed_batch(ds: TokenizedDataset, rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    T = max(sum(len(ds.examples[i]["input_ids"]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    for b, row in enumerate(rows):
        p = 0
        for i in row:
            e = ds.examples[i]
            n = len(e["input_ids"])
            input_ids[b, p : p + n] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[b, p : p + n] = torch.tensor(e["labels"], dtype=torch.long)
            labels[b, p] = IGNORE_INDEX  # never predicted from the previous example's last token
            position_ids[b, p : p + n] = torch.arange(n)
            p += n
        position_ids[b, p:] = torch.arange(T - p)  # tail padding: one more sequence of its own
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def count_label_tokens(batch) -> int:
    """Tokens that count in the loss after the causal shift (``labels[:, 1:] != -100``)."""
    labels = batch["labels"] if isinstance(batch, Mapping) else batch
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
