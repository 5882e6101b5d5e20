"""llada_rt's local lm-eval tasks for the shipped model, and the loaders their YAML files name (custom_dataset), so
that they run offline from an installed package: no hub, no download. Data: heldout.jsonl and capitals.jsonl, written
by bench/build_lm_eval_tasks.py from the task suite (bench/tasks.py).

    llada_rt_heldout            group: generation on the suite's held-out set, exact match, one subtask per task
    llada_rt_heldout_<task>     reverse, sort, add, capital, country
    llada_rt_capitals           multiple choice: the capitals table in both directions, four choices (acc, acc_norm)
    tag llada_rt                all of them
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]


def _dataset(rows: list[dict]):
    import datasets

    return {"test": datasets.Dataset.from_list(rows)}


def heldout(suite_task: str | None = None, **_metadata):
    """The held-out examples of one suite task (all when None). lm-eval passes the task's metadata and model_args
    as keyword arguments too; they are not used."""
    rows = _rows("heldout.jsonl")
    if suite_task is not None:
        rows = [r for r in rows if r["task"] == suite_task]
        if not rows:
            raise ValueError(f"no held-out examples of task {suite_task!r} in {HERE / 'heldout.jsonl'}")
    return _dataset(rows)


def capitals(**_metadata):
    return _dataset(_rows("capitals.jsonl"))
