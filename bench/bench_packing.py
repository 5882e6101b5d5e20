"""Packed forwards (ForwardBatch.pack) against padded ones: the engine's forward over B rows of different lengths
(the held-out task prompts with the chat template plus the answer canvas), timed padded (every row to the longest)
and packed (the token-wise work on the real columns only), interleaved in one process; median of the repeats.
Also checks that both give the same logits.

    python bench/bench_packing.py --threads 2 [--rows 8] [--gen-length 32] [--repeat 30]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--gen-length", type=int, default=32, help="answer canvas after each prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30, help="interleaved batches of 10 forwards each way")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from bench_generate import task_prompts
    from llada_rt import Runtime
    from llada_rt.model import ForwardBatch, RopeTable, forward_batch
    from llada_rt.workspace import Workspace

    rt = Runtime(args.model) if args.model else Runtime()
    cfg, w, dev = rt.config, rt.weights, rt.device
    prompts = [rt.tokenizer.encode_chat(p) for p in task_prompts(args.rows)]
    lens = [len(p) + args.gen_length for p in prompts]
    B, S = len(lens), max(lens)
    tokens = torch.full((B, S), cfg.mask_token_id, dtype=torch.int64)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
    pos = torch.arange(S).expand(B, S).contiguous()
    key_end = torch.tensor(lens, dtype=torch.int32)
    pack = torch.cat([b * S + torch.arange(n) for b, n in enumerate(lens)])
    offs = [sum(lens[:b]) for b in range(B)]
    G = args.gen_length   # logits for the answer canvas of every row, as exact mode's first step asks
    rows_pad = torch.cat([b * S + torch.arange(n - G, n) for b, n in enumerate(lens)])
    rows_pack = torch.cat([o + torch.arange(n - G, n) for o, n in zip(offs, lens)])
    rope = RopeTable.build(cfg, S, dev)
    ways = {"padded": (ForwardBatch(tokens, pos, key_end=key_end, logit_rows=rows_pad), Workspace(dev)),
            "packed": (ForwardBatch(tokens, pos, key_end=key_end, logit_rows=rows_pack, pack=pack), Workspace(dev))}
    with torch.inference_mode():
        out = {k: forward_batch(cfg, w, fb, rope=rope, ws=ws).clone() for k, (fb, ws) in ways.items()}
        diff = (out["padded"] - out["packed"]).abs().max().item()
        times = {k: [] for k in ways}
        for _ in range(args.repeat):
            for k, (fb, ws) in ways.items():
                t0 = time.perf_counter()
                for _ in range(10):
                    forward_batch(cfg, w, fb, rope=rope, ws=ws)
                times[k].append((time.perf_counter() - t0) / 10)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"# {rt} | {args.threads} threads | {B} rows of lengths {lens} | median of {args.repeat} x 10 forwards")
    print(f"tokens: {sum(lens)} real, {B * S} padded ({1 - sum(lens) / (B * S):.0%} padding)")
    print(f"max |logits padded - packed| = {diff:.3g}")
    print(f"padded {ms['padded']:.2f} ms, packed {ms['packed']:.2f} ms per forward: packed is "
          f"{ms['padded'] / ms['packed']:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
