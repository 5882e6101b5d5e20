"""End-to-end generation benchmark: exact mode and every fast mode in one process, on the same prompts.

Prints a header (device, torch, dtype, settings) and one row per mode: tokens/s (answer tokens before EOS per
second), NFE, tokens committed per forward, ms per step, ms per refresh and per cached step, peak memory and the
speedup over exact mode; writes the same as JSON.

    python bench/bench_generate.py                                  # the shipped model, held-out task prompts
    python bench/bench_generate.py --random --prompt-len 43 --gen-length 128 --block-length 32 --steps 128
    python bench/bench_generate.py --model /models/LLaDA-8B-Instruct --prompts prompts.txt --device cuda
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import llada_rt
from llada_rt.benchmark import MODE_OPTIONS, run_benchmark

HERE = Path(__file__).resolve().parent


def random_checkpoint(spec: str, directory: Path) -> Path:
    """LLaDA-8B's vocabulary and special ids with a scaled-down body, random fp32 weights (e.g. d_model=512,...)."""
    from llada_rt.testing import VOCAB, write_checkpoint
    body = dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, mlp_hidden_size=1536, max_sequence_length=4096)
    for item in filter(None, spec.split(",")):
        k, v = item.split("=")
        body[k] = int(v)
    if "n_kv_heads" not in spec:
        body["n_kv_heads"] = body["n_heads"]
    return write_checkpoint(directory, seed=0, vocab=VOCAB, **body)


def task_prompts(n: int) -> list[str]:
    """n held-out prompts of the shipped model's task suite (bench/tasks.py), taken round-robin over the tasks."""
    sys.path.insert(0, str(HERE))
    from tasks import TASKS, heldout_set
    by_task = {t: [e.prompt for e in heldout_set() if e.task == t] for t in TASKS}
    return [by_task[TASKS[i % len(TASKS)]][i // len(TASKS)] for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory (default: the shipped model)")
    src.add_argument("--random", nargs="?", const="", metavar="SPEC",
                     help="random checkpoint with LLaDA-8B's vocabulary; SPEC overrides the body, e.g. "
                          "'d_model=512,n_layers=4,n_heads=8,mlp_hidden_size=1536' (the default)")
    ap.add_argument("--prompts", help="file with one prompt per line (default: held-out task prompts, or random ids "
                                      "with --random)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=43, help="prompt length in tokens with --random")
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="total steps (default: gen_length)")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--modes", default=",".join(MODE_OPTIONS), help=f"comma list of {', '.join(MODE_OPTIONS)}")
    ap.add_argument("--early-stop", action="store_true")
    ap.add_argument("--cuda-graph", choices=["off", "on", "both"], default="off")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=str(HERE / "out" / "bench_generate.json"))
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODE_OPTIONS]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {', '.join(MODE_OPTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(args.random, Path(tmp)) if args.random is not None else args.model
        rt = llada_rt.Runtime(path, device=args.device, dtype=args.dtype)
        if args.prompts:
            prompts = [l.rstrip("\n") for l in open(args.prompts) if l.strip()][: args.num_prompts]
        elif args.random is not None:
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(0, 100, (args.prompt_len,), generator=g).tolist()
                       for _ in range(args.num_prompts)]
        else:
            prompts = task_prompts(args.num_prompts)
        gen = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                   early_stop=args.early_stop)
        out = run_benchmark(rt, prompts, modes, gen, threshold=args.threshold, repeat=args.repeat,
                            warmup=args.warmup, cuda_graph=args.cuda_graph)
    out["command"] = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
