"""The synthetic instruction suite: seeded held-out and training examples for five tasks, and a checker per task.

Tasks and how train and held-out are kept apart:
  reverse  "Reverse the string: qwxk" -> "kxwq"        content split: a held-out string never appears in training
  sort     "Sort the list: 5 2 9 2"   -> "2 2 5 9"     content split: a held-out list (in its order) never appears
  add      "What is 47 + 85?"         -> "132"         content split: a held-out pair {a, b} never appears, either order
  capital  country -> capital, from bench/data/capitals.tsv   phrasing split (see below)
  country  capital -> country, same table                     phrasing split
A fact cannot be answered without having been learned, so every fact of the table is trained, in both directions,
with the TRAIN phrasings only; the held-out questions ask every fact with a phrasing never seen in training.
The fact rows therefore measure recall of trained knowledge under unseen wording, not knowledge of unseen facts.
The held-out set is fixed (HELDOUT_SEED); training draws with any other seed and rejects held-out keys.
"""
from __future__ import annotations

import dataclasses
import functools
import random
import re
from pathlib import Path

TASKS = ("reverse", "sort", "add", "capital", "country")
HELDOUT_SEED = 20260101
HELDOUT_PER_TASK = 100  # synthetic tasks; the fact tasks hold out every fact of the table once per direction
MAX_ANSWER_CHARS = 24  # every answer fits a 32-token response (answer + EOT + EOS padding)

REVERSE_LEN = (3, 8)  # letters
SORT_LEN = (3, 7)  # digits
ADD_DIGITS = (1, 2)  # digits per operand; at least one operand has 2

_TEMPLATES = {
    "reverse": ["Reverse the string: {x}", "Reverse {x}"],
    "sort": ["Sort the list: {x}", "Sort {x}"],
    "add": ["What is {a} + {b}?", "{a} + {b} = ?"],
}
_FACT_TEMPLATES = {
    "capital": {
        "train": ["What is the capital of {x}?", "Capital of {x}?", "Name the capital of {x}.", "{x}: capital?"],
        # more training phrasings of task set 2 (entity at the start, middle, end); none uses a word that only the
        # held-out phrasings use (HELDOUT_ONLY_WORDS), and none is a held-out phrasing
        "train_extra": ["What's the capital of {x}?", "{x} has which capital?", "The capital of {x} is?",
                        "Give the capital of {x}.", "What is {x}'s capital?", "In {x}, what is the capital?",
                        "Say the capital of {x}.", "capital of {x}", "{x} - capital?", "Capital for {x}, please."],
        "heldout": ["Which city is the capital of {x}?", "Tell me the capital of {x}."],
    },
    "country": {
        "train": ["{x} is the capital of which country?", "Which country has the capital {x}?",
                  "{x}: country?", "Country with capital {x}?"],
        "train_extra": ["What country has {x} as its capital?", "{x} is in which country?",
                        "Name the country with the capital {x}.", "The capital {x} belongs to which country?",
                        "{x} is the capital of what country?", "Give the country of {x}.",
                        "Country of the capital {x}?", "{x} - country?", "For the capital {x}, name the country.",
                        "country with capital {x}"],
        "heldout": ["Of which country is {x} the capital?", "Tell me the country whose capital is {x}."],
    },
}
# Words of the held-out phrasings that no training phrasing uses (test_tasks checks that training never does).
HELDOUT_ONLY_WORDS = ("city", "tell", "me", "whose")
# Lead-ins that task set 2 puts before a training fact question now and then, so that the model learns to ignore
# extra words; they use no held-out word either.
_LEAD_INS = ("Quick question: ", "Hi! ", "Please answer. ", "I have a question. ", "Hello, ", "Question: ",
             "Help please: ", "One more: ")
LEAD_IN_P = 0.25
# Training task sets: 1 is the stream the shipped model was trained on (the "train" phrasings, no lead-ins); 2 adds
# the "train_extra" phrasings and the lead-ins (an experiment; the word-level vocabulary stays set 1's).
TASK_SETS = (1, 2)
CAPITALS_TSV = Path(__file__).resolve().parent / "data" / "capitals.tsv"


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str
    key: tuple  # what the train/held-out split is made on


def load_capitals(path: Path = CAPITALS_TSV) -> list[tuple[str, str]]:
    """(country, capital) rows of the table, header skipped."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return [(c.strip(), k.strip()) for c, k in rows]


def vocabulary_words() -> list[str]:
    """The words a word-level tokenizer of the suite holds (build_tokenizer.py --words): every word of the TRAINING
    phrasings and every name of the fact table, as a tokenizer fitted to the training corpus would hold them. Words
    that only the held-out phrasings use ("city", "whose", ...) are not among them."""
    words = {w for t in [*_TEMPLATES.values(), *(f["train"] for f in _FACT_TEMPLATES.values())] for tpl in t
             for w in re.findall(r"[A-Za-z]{2,}", tpl.replace("{x}", " ").replace("{a}", " ").replace("{b}", " "))}
    for country, capital in load_capitals():
        words.update((country, capital))
    return sorted(words)


def _reverse(rng: random.Random, template: str, reject: frozenset = frozenset()) -> Example:
    while True:  # drawn again while it is in `reject` (whole words of a word-level tokenizer: one token, no letters)
        s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(*REVERSE_LEN)))
        if s not in reject:
            break
    return Example("reverse", template.format(x=s), s[::-1], ("reverse", s))


def _sort(rng: random.Random, template: str) -> Example:
    xs = [rng.randint(0, 9) for _ in range(rng.randint(*SORT_LEN))]
    return Example("sort", template.format(x=" ".join(map(str, xs))), " ".join(map(str, sorted(xs))),
                   ("sort", tuple(xs)))


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def _add(rng: random.Random, template: str) -> Example:
    while True:
        da, db = rng.randint(*ADD_DIGITS), rng.randint(*ADD_DIGITS)
        if max(da, db) >= 2:
            break
    a, b = _operand(rng, da), _operand(rng, db)
    return Example("add", template.format(a=a, b=b), str(a + b), ("add", min(a, b), max(a, b)))


_MAKERS = {"reverse": _reverse, "sort": _sort, "add": _add}


def _fact(task: str, country: str, capital: str, template: str) -> Example:
    x, answer = (country, capital) if task == "capital" else (capital, country)
    return Example(task, template.format(x=x), answer, (task, x, template))


def heldout_set(per_task: int = HELDOUT_PER_TASK) -> list[Example]:
    """The fixed held-out set: per_task examples of each synthetic task (the first per_task of a fixed draw), and
    every fact of the table once per direction with a held-out phrasing."""
    rng = random.Random(HELDOUT_SEED)
    out = []
    for task, make in _MAKERS.items():
        seen = set()
        while len([e for e in out if e.task == task]) < HELDOUT_PER_TASK:
            e = make(rng, rng.choice(_TEMPLATES[task]))
            if e.key not in seen:
                seen.add(e.key)
                out.append(e)
    for task in ("capital", "country"):
        for country, capital in load_capitals():
            out.append(_fact(task, country, capital, rng.choice(_FACT_TEMPLATES[task]["heldout"])))
    if per_task < HELDOUT_PER_TASK:  # a prefix of the same draw, so a smaller run is a subset of the full one
        counts: dict[str, int] = {}
        kept = []
        for e in out:
            counts[e.task] = counts.get(e.task, 0) + 1
            if counts[e.task] <= per_task:
                kept.append(e)
        out = kept
    return out


def heldout_keys() -> set:
    """Keys that training must never produce (synthetic tasks) ."""
    return {e.key for e in heldout_set() if e.task in _MAKERS}


class TrainStream:
    """An endless seeded stream of training examples (an iterator), never a held-out key. Tasks are drawn in
    proportion to `weights` (task -> weight; uniform when None); strings to reverse are never one of `reject_words`.
    task_set 2 (TASK_SETS) adds the extra fact phrasings and gives fact questions a lead-in (_LEAD_INS) with
    probability LEAD_IN_P. getstate()/setstate() save and restore the position in the stream (the only state is one
    random.Random)."""

    def __init__(self, seed: int, weights: dict[str, float] | None = None, reject_words: frozenset = frozenset(),
                 task_set: int = 1):
        if seed == HELDOUT_SEED:
            raise ValueError("the training seed must differ from HELDOUT_SEED")
        if task_set not in TASK_SETS:
            raise ValueError(f"task set {task_set!r}: expected one of {TASK_SETS}")
        if weights is not None:  # (None keeps the draw of rng.choice: the stream the shipped model was trained on)
            if set(weights) - set(TASKS) or not any(weights.values()) or min(weights.values()) < 0:
                raise ValueError(f"task weights {weights}: keys must be among {TASKS}, weights >= 0, not all 0")
            self.names = [t for t in TASKS if weights.get(t, 0) > 0]
            self.shares = [weights[t] for t in self.names]
        self.weights, self.task_set = weights, task_set
        self.fact_templates = {t: f["train"] + (f["train_extra"] if task_set >= 2 else [])
                               for t, f in _FACT_TEMPLATES.items()}
        self.makers = {**_MAKERS, "reverse": functools.partial(_reverse, reject=reject_words)}
        self.rng = random.Random(seed)
        self.banned = heldout_keys()
        self.capitals = load_capitals()

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> Example:
        rng = self.rng
        while True:
            task = rng.choice(TASKS) if self.weights is None else rng.choices(self.names, self.shares)[0]
            if task in _MAKERS:
                e = self.makers[task](rng, rng.choice(_TEMPLATES[task]))
                if e.key not in self.banned:
                    return e
                continue
            country, capital = rng.choice(self.capitals)
            e = _fact(task, country, capital, rng.choice(self.fact_templates[task]))
            if self.task_set >= 2 and rng.random() < LEAD_IN_P:
                e = dataclasses.replace(e, prompt=rng.choice(_LEAD_INS) + e.prompt)
            return e

    def getstate(self):
        return self.rng.getstate()

    def setstate(self, state) -> None:
        self.rng.setstate(state)


def train_examples(n: int, seed: int, weights: dict[str, float] | None = None, task_set: int = 1) -> list[Example]:
    stream = TrainStream(seed, weights, task_set=task_set)
    return [next(stream) for _ in range(n)]


def _numbers(text: str) -> list[int]:
    return [int(t) for t in re.findall(r"-?\d+", text)]


def _norm(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).casefold()


def check(example: Example, output: str) -> bool:
    """Whether a model's output answers the example: exact for reverse, the same numbers for sort and add (separators
    and surrounding spaces are free), case- and trailing-period-insensitive for the fact tasks."""
    if example.task == "reverse":
        return output.strip() == example.answer
    if example.task == "sort":
        return re.fullmatch(r"[\d\s,]*", output.strip()) is not None and _numbers(output) == _numbers(example.answer)
    if example.task == "add":
        return re.fullmatch(r"\s*-?\d+\s*\.?\s*", output) is not None and _numbers(output) == _numbers(example.answer)
    if example.task in ("capital", "country"):
        return _norm(output) == _norm(example.answer)
    raise ValueError(f"unknown task {example.task!r}")


if __name__ == "__main__":
    for e in heldout_set(per_task=2):
        print(f"{e.task:8s} {e.prompt!r} -> {e.answer!r}")
