"""Generated text for the embedded default: the instruction tasks and the base model's pretraining corpus.

Everything here is deterministic in its seed (``random.Random``, no global state), so
``scripts/make_default.py`` reproduces the shipped files byte for byte.

The fine-tuning tasks (upper-casing, spelling backwards, adding, counting letters, ...) are
never shown to the base model in that form: its pretraining corpus uses the same words and the
same Alpaca template, but with other instructions (repeat, lower-case, spell out, next number).
So the base knows the words, the characters and the template, and the fine-tune has to teach it
the new tasks, which is visible in the generations before and after.
"""

from __future__ import annotations

import json
import random

# The standard Alpaca template strings (Taori et al., 2023), as data loaders use them.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

WORDS = """
able acid aged also area army away baby back ball band bank base bath bear beat been beer bell belt best bird
blow blue boat body bomb bond bone book boom born boss both bowl bulk burn bush busy cake call calm came camp
card care case cash cast cell chat chip city club coal coat code cold come cook cool cope copy core cost crew
crop dark data date dawn days dead deal dean dear debt deep deny desk dial diet disc dish door dose down draw
drew drop drug dual duke dust duty each earn ease east easy edge else even ever evil exit face fact fail fair
fall farm fast fate fear feed feel fell felt file fill film find fine fire firm fish five flat flow food foot
ford form fort four free from fuel full fund gain game gate gave gear gene gift girl give glad goal goes gold
golf gone good gray grew grey grow gulf hair half hall hand hang hard harm hate have head hear heat held hell
help here hero high hill hire hold hole holy home hope host hour huge hung hunt hurt idea inch into iron item
jack jane jean john join jump jury just keen keep kent kept kick kind king knee knew know lack lady laid lake
land lane last late lead left less life lift like line link list live load loan lock logo long look lord lose
loss lost love luck made mail main make male many mark mass meal mean meat meet menu mere mike mile milk mill
mind mine miss mode mood moon more most move much must name navy near neck need news next nice nick nine none
nose note okay once only open oral over pace pack page paid pain pair palm park part pass past path peak pick
pink pipe plan play plot plus poll pool poor port post pull pure push race rail rain rank rare rate read real
rear rely rent rest rice rich ride ring rise risk road rock role roll roof room root rose rule rush safe said
sake sale salt same sand save seat seed seek seem seen self sell send sent sept ship shop shot show shut sick
side sign site size skin slip slow snow soft soil sold sole some song soon sort soul spot star stay step stop
such suit sure take tale talk tall tank tape task team tech tell tend term test text than that them then they
thin this thus till time tiny told toll tone tony tool tour town tree trip true tune turn twin type unit upon
used user vary vast very vice view vote wage wait wake walk wall want ward warm wash wave ways weak wear week
well went were west what when whom wide wife wild will wind wine wing wire wise wish with wood word wore work
yard yeah year your zero zone apple bread chair dance earth field glass happy horse house light money music
night ocean paper party plant radio river score sheep smile space storm sugar table tiger train water whale
world young animal basket bottle bridge butter button camera carpet castle cheese circle coffee cookie
corner cotton desert dinner doctor dragon driver engine family farmer finger flower friend guitar hammer
island jacket kitchen ladder lemon letter market mirror mother number orange parrot pepper people planet
pocket potato puzzle rocket salad school shadow singer sister spider spring stone street summer sunset
teacher ticket tomato towel turtle valley violin wallet window yellow zebra
""".split()

# Words that appear nowhere in the shipped data: the sample prompts use them to show generalisation.
HELD_OUT = ["garden", "candle", "silver", "monkey", "pencil", "rabbit", "winter", "forest"]

VOWELS = set("aeiou")


# --------------------------------------------------------------------------- fine-tuning tasks
# instruction -> function(word) -> output


def _upper(word):
    return word.upper()


def _three_times(word):
    return " ".join([word] * 3)


def _dashes(word):
    return "-".join(word)


def _first_last(word):
    return word[0] + word[-1]


def _reverse(word):
    return word[::-1]


TASKS: dict[str, object] = {
    "Write the word in capital letters.": _upper,
    "Write the word three times.": _three_times,
    "Spell the word with dashes.": _dashes,
    "Give the first and the last letter of the word.": _first_last,
    "Spell the word backwards.": _reverse,
}


def make_record(instruction: str, word: str) -> dict:
    return {"instruction": instruction, "input": word, "output": TASKS[instruction](word)}


def make_dataset(n: int = 2400, seed: int = 0) -> list[dict]:
    """``n`` distinct instruction records (tasks in turn, words drawn from ``seed``), shuffled."""
    rng = random.Random(seed)
    names = list(TASKS)
    if n > len(names) * len(WORDS):
        raise ValueError(f"at most {len(names) * len(WORDS)} distinct records")
    seen: set[tuple[str, str]] = set()
    records = []
    i = 0
    while len(records) < n:
        instruction = names[i % len(names)]
        word = rng.choice(WORDS)
        if (instruction, word) in seen:
            continue
        i += 1
        seen.add((instruction, word))
        records.append(make_record(instruction, word))
    rng.shuffle(records)
    return records


def dumps_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)


# Held-out words, one per task the base model has never seen in any form before the fine-tune.
SAMPLE_PROMPTS: list[dict] = [
    make_record("Write the word in capital letters.", "garden"),
    make_record("Write the word three times.", "candle"),
    make_record("Spell the word with dashes.", "silver"),
    make_record("Give the first and the last letter of the word.", "monkey"),
]


# --------------------------------------------------------------------------- pretraining corpus
# Other instructions, same template and words: the base learns the format, the characters,
# copying and the words, not the fine-tuning tasks.


def _pre_repeat(word, rng):
    return "Repeat the word.", word, word


def _pre_twice(word, rng):
    return "Write the word two times.", word, f"{word} {word}"


def _pre_lower(word, rng):
    return "Write the word in small letters.", word.upper(), word


def _pre_spaced(word, rng):
    return "Spell the word with spaces.", word, " ".join(word)


def _pre_next(word, rng):
    a = rng.randint(0, 98)
    return "Write the next number.", str(a), str(a + 1)


def _pre_length(word, rng):
    return "How many letters are in the word?", word, str(len(word))


def _pre_list(word, rng):
    ws = rng.sample(WORDS + HELD_OUT, rng.randint(2, 4))
    return "Repeat the list.", " ".join(ws), " ".join(ws)


PRETRAIN_TASKS = [_pre_repeat, _pre_twice, _pre_lower, _pre_spaced, _pre_next, _pre_length, _pre_list]


def pretrain_text(rng: random.Random) -> str:
    """One pretraining document.

    A quarter are Alpaca examples of a pretraining task (the template, answering after
    ``### Response:``); the rest are dense: a dozen ``instruction: input = output`` lines, or a
    line of words, so most tokens carry content (copying, letters, numbers), not the template.
    """
    vocab = WORDS + HELD_OUT
    r = rng.random()
    if r < 0.25:
        instruction, inp, out = rng.choice(PRETRAIN_TASKS)(rng.choice(vocab), rng)
        return PROMPT_INPUT.format(instruction=instruction, input=inp) + out
    if r < 0.35:
        ws = [rng.choice(vocab) for _ in range(rng.randint(4, 12))]
        if rng.random() < 0.3:
            ws = [w.upper() for w in ws]
        return " ".join(ws) + "\n"
    lines = []
    for _ in range(rng.randint(6, 14)):
        instruction, inp, out = rng.choice(PRETRAIN_TASKS)(rng.choice(vocab), rng)
        lines.append(f"{instruction} {inp} = {out}")
    return "\n".join(lines) + "\n"
