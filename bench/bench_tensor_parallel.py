"""Tensor parallelism on the CPU: per-step time, bytes all-reduced and all-gathered per step (counted in the
collectives), per-rank weight bytes and load peak RSS, for 1 process (1 and 2 threads) and 2 torchrun ranks (1 thread
each), run round-robin; then LLaDA-8B's per-rank weight bytes and all-reduce volume on 2/4/8 GPUs, derived from its
config (not measured).

    python bench/bench_tensor_parallel.py [--body d_model=512,n_layers=4] [--rounds 3] [--gen-length 32]
        [--block-length 32] [--modes exact,dual] [--json bench_tensor_parallel.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


# LLaDA-8B (LLADA.md 1): the numbers the derived table uses
LLADA_8B = dict(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, vocab=126464)
BF16_BYTES = 2
H200_HBM_GBPS = 4800.0   # published HBM3e bandwidth, for the derived weight-read time only


def _peak_rss_bytes() -> int:
    """This process image's peak resident set (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line; this benchmark measures peak memory on Linux only")


def worker(args) -> None:
    """One process of a configuration: load (inside a torchrun world this is one rank's shard), warm up, time."""
    torch.set_num_threads(args.threads)
    from llada_rt import Runtime

    rss0 = _peak_rss_bytes()
    rt = Runtime(args.ckpt, device="cpu")
    rss1 = _peak_rss_bytes()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 100, (args.prompt_len,), generator=g).tolist()
    out = {"rank": rt.tp.rank if rt.tp else 0, "ranks": rt.tp.size if rt.tp else 1, "threads": args.threads,
           "weight_bytes": sum(t.numel() * t.element_size() for t in rt.weights.tensors()),
           "load_peak_rss_bytes": rss1 - rss0, "modes": {}}
    for mode in args.modes.split(","):
        opts = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.gen_length, mode=mode)
        rt.generate(prompt, **opts)                                                # warm-up (workspace, paths)
        red0, gat0 = (rt.tp.bytes_reduced, rt.tp.bytes_gathered) if rt.tp else (0, 0)
        res = rt.generate(prompt, **opts)
        red1, gat1 = (rt.tp.bytes_reduced, rt.tp.bytes_gathered) if rt.tp else (0, 0)
        out["modes"][mode] = {"step_ms": 1e3 * res.timings["total_s"] / res.nfe, "nfe": res.nfe,
                              "reduced_per_step": (red1 - red0) / res.nfe, "gathered_per_step": (gat1 - gat0) / res.nfe}
    Path(args.out.format(rank=out["rank"])).write_text(json.dumps(out))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(ranks: int, threads: int, ckpt: Path, tmp: Path, args) -> list[dict]:
    out = tmp / f"r{ranks}t{threads}_{{rank}}.json"
    worker_args = [str(Path(__file__).resolve()), "--worker", "--ckpt", str(ckpt), "--threads", str(threads),
                   "--out", str(out), "--modes", args.modes, "--gen-length", str(args.gen_length),
                   "--block-length", str(args.block_length), "--prompt-len", str(args.prompt_len)]
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                                      "--master-port", str(_port())]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, *launcher, *worker_args], check=True, env=env)
    return [json.loads(Path(str(out).format(rank=r)).read_text()) for r in range(ranks)]


def derived_8b(rows: tuple[int, ...] = (32, 1024)) -> list[str]:
    """LLaDA-8B on N GPUs in bf16, from the config: per-rank weight bytes read per step (every layer weight and the LM
    head; the embedding is a lookup), and the all-reduce volume of one forward of `rows` query rows."""
    c = LLADA_8B
    d, L, mlp, V = c["d_model"], c["n_layers"], c["mlp_hidden_size"], c["vocab"]
    layer = 4 * d * d + 3 * d * mlp                                  # q, k, v, o (32 kv heads) + gate, up, down
    lines = ["LLaDA-8B, bf16, DERIVED from the config (32 layers, d_model 4096, 32 heads, mlp 12288, vocab 126464):",
             f"{'GPUs':>4} | {'weights/rank GB':>15} | {'read/step/rank GB':>17} | {'HBM time ms':>11} | " +
             " | ".join(f"all-reduce/fwd rows={r} MB (ring/rank MB)" for r in rows)]
    for n in (1, 2, 4, 8):
        held = (L * layer + 2 * V * d) / n * BF16_BYTES + (2 * L + 1) * d * BF16_BYTES
        read = (L * layer + V * d) / n * BF16_BYTES
        cells = []
        for r in rows:
            payload = 0 if n == 1 else (2 * L + 1) * r * d * BF16_BYTES       # embedding + 2 per layer, (rows, d)
            ring = payload * 2 * (n - 1) / n                                   # sent per rank by a ring all-reduce
            cells.append(f"{payload / 1e6:>10.1f} ({ring / 1e6:>6.1f})")
        lines.append(f"{n:>4} | {held / 1e9:>15.2f} | {read / 1e9:>17.2f} | {read / H200_HBM_GBPS / 1e6:>11.2f} | "
                     + " | ".join(f"{c:>38}" for c in cells))
    lines.append("(HBM time: the weight read alone at 4.8 TB/s; the confidence state all-gathered per step is "
                 "6 x 8 bytes per logit row per rank)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--body", default="", help="random checkpoint body (LLaDA-8B vocabulary), e.g. d_model=512")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds over the configurations")
    ap.add_argument("--modes", default="exact,dual")
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=43)
    ap.add_argument("--json", default="bench_tensor_parallel.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from llada_rt.benchmark import random_checkpoint

    configs = [(1, 1), (1, 2), (2, 1)]                                 # (ranks, threads per rank)
    runs: dict = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(args.body, Path(tmp) / "ckpt")
        for _ in range(args.rounds):
            for c in configs:
                runs[c].append(run_config(*c, ckpt, Path(tmp), args))
    print(f"CPU, fp32, random checkpoint (LLaDA-8B vocabulary, body {args.body or 'default'}), prompt "
          f"{args.prompt_len}, gen {args.gen_length}, block {args.block_length}; median of {args.rounds} round-robin "
          "rounds; step time is rank 0's")
    print(f"{'config':<22} | {'mode':<5} | {'step ms':>8} | {'all-reduced/step B':>18} | {'gathered/step B':>15} | "
          f"{'weights/rank MB':>15} | {'load peak RSS/rank MB':>21}")
    table = []
    for (ranks, threads), rounds in runs.items():
        for mode in args.modes.split(","):
            step = statistics.median(r[0]["modes"][mode]["step_ms"] for r in rounds)
            last = rounds[-1]
            row = dict(ranks=ranks, threads=threads, mode=mode, step_ms=step,
                       reduced_per_step=last[0]["modes"][mode]["reduced_per_step"],
                       gathered_per_step=last[0]["modes"][mode]["gathered_per_step"],
                       weight_bytes=[r["weight_bytes"] for r in last],
                       load_peak_rss_bytes=[r["load_peak_rss_bytes"] for r in last])
            table.append(row)
            label = f"{ranks} rank{'s' if ranks > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
            print(f"{label:<22} | {mode:<5} | {step:>8.2f} | {row['reduced_per_step']:>18.0f} | "
                  f"{row['gathered_per_step']:>15.0f} | {max(row['weight_bytes']) / 1e6:>15.1f} | "
                  f"{max(row['load_peak_rss_bytes']) / 1e6:>21.1f}")
    derived = derived_8b()
    print("\n".join([""] + derived))
    Path(args.json).write_text(json.dumps({"measured": table, "derived_8b": derived,
                                           "command": " ".join([sys.argv[0], *(argv or sys.argv[1:])])}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
