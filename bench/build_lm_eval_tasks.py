"""Writes the data of llada_rt's local lm-eval tasks (llada_rt/lm_eval_tasks/*.jsonl) from the task suite.

Usage: python bench/build_lm_eval_tasks.py [--check]

heldout.jsonl: every example of the suite's fixed held-out set (bench/tasks.py), for the generation tasks scored by
exact match. capitals.jsonl: every fact of bench/data/capitals.tsv in both directions, asked with the held-out
phrasing the held-out set gives it, with four choices: the answer and three other entries of the same column, drawn
with a fixed seed, in a seeded order. The files are committed (so that an installed llada_rt has its tasks without
bench/); --check exits 1 when they differ from what this script writes (tests/test_lm_eval.py runs it).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import tasks

OUT = Path(__file__).resolve().parent.parent / "llada_rt" / "lm_eval_tasks"
CHOICES = 4
CHOICE_SEED = 20261201


def heldout_rows() -> list[dict]:
    return [{"task": e.task, "prompt": e.prompt, "answer": e.answer} for e in tasks.heldout_set()]


def capitals_rows() -> list[dict]:
    table = tasks.load_capitals()
    rng = random.Random(CHOICE_SEED)
    rows = []
    for e in tasks.heldout_set():
        if e.task not in ("capital", "country"):
            continue
        column = [cap for _, cap in table] if e.task == "capital" else [c for c, _ in table]
        choices = [e.answer] + rng.sample([x for x in column if x != e.answer], CHOICES - 1)
        rng.shuffle(choices)
        rows.append({"task": e.task, "question": e.prompt, "choices": choices, "label": choices.index(e.answer)})
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


FILES = {"heldout.jsonl": heldout_rows, "capitals.jsonl": capitals_rows}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    stale = []
    for name, make in FILES.items():
        text = render(make())
        path = OUT / name
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path} ({text.count(chr(10))} rows)")
    if stale:
        print(f"stale: {', '.join(stale)}; run python bench/build_lm_eval_tasks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
