"""The engine's step driven from the thread that loaded the Runtime against the same step from a second thread,
alternating, in one process: on the CPU every thread that starts OpenMP regions gets its own libgomp worker team, and
a second team on a machine with few cores slows every parallel region (why `llada-rt serve` runs the engine on its
main thread). Exact mode, the shipped model's defaults (gen_length 32), held-out task prompts; median ms per step.

    python bench/bench_threads.py --threads 2 [--rows 1,8] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from bench_generate import task_prompts
    from llada_rt import Runtime

    rows = [int(x) for x in args.rows.split(",")]
    rt = Runtime()
    ids = [rt.tokenizer.encode_chat(p) for p in task_prompts(max(rows))]
    gc = rt.make_config({})

    def run(B: int) -> float:
        reqs = [rt.add(ids[i], gc) for i in range(B)]
        ts = []
        while any(not r.done for r in reqs):
            t0 = time.perf_counter()
            rt.step()
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)

    def in_thread(B: int) -> float:
        out = []
        th = threading.Thread(target=lambda: out.append(run(B)))
        th.start()
        th.join()
        return out[0]

    for B in rows:
        run(B)
    res = {(B, k): [] for B in rows for k in ("main", "thread")}
    for _ in range(args.repeat):
        for B in rows:
            res[(B, "main")].append(run(B))
            res[(B, "thread")].append(in_thread(B))
    print(f"# {rt} | {args.threads} torch threads | {gc.mode} mode, gen_length {gc.gen_length} | median ms per step, "
          f"median of {args.repeat} alternating runs")
    for B in rows:
        a, b = statistics.median(res[(B, "main")]), statistics.median(res[(B, "thread")])
        print(f"rows {B}: loading thread {a:.2f} ms, second thread {b:.2f} ms ({b / a:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
