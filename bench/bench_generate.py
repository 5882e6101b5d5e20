"""Generation benchmark (llada_rt.benchmark; `--help` lists the options) with the shipped model's held-out task
prompts as the default prompt set."""
from __future__ import annotations

import sys
from pathlib import Path

from llada_rt.benchmark import main

HERE = Path(__file__).resolve().parent


def task_prompts(n: int) -> list[str]:
    """n held-out prompts of the shipped model's task suite (bench/tasks.py), taken round-robin over the tasks."""
    sys.path.insert(0, str(HERE))
    from tasks import TASKS, heldout_set
    by_task = {t: [e.prompt for e in heldout_set() if e.task == t] for t in TASKS}
    return [by_task[TASKS[i % len(TASKS)]][i // len(TASKS)] for i in range(n)]


if __name__ == "__main__":
    if not any(a == "--json" or a.startswith("--json=") for a in sys.argv[1:]):
        sys.argv += ["--json", str(HERE / "out" / "bench_generate.json")]
    sys.exit(main(default_prompts=task_prompts, prog="python bench/bench_generate.py"))
