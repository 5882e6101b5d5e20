"""End-to-end generation benchmark: exact mode and every fast mode in one process, on the same prompts.

Prints a header (device, torch, dtype, settings) and one row per mode: tokens/s (answer tokens before EOS per
second), NFE, tokens committed per forward, ms per step, ms per refresh and per cached step, peak memory and the
speedup over exact mode; writes the same as JSON.

    python bench/bench_generate.py                                  # the shipped model, held-out task prompts
    python bench/bench_generate.py --random --prompt-len 43 --gen-length 128 --block-length 32 --steps 128
    python bench/bench_generate.py --model /models/LLaDA-8B-Instruct --prompts prompts.txt --device cuda
"""
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
