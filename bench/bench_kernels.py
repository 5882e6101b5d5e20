"""Per-op kernel benchmarks: median us and GB/s next to the torch baseline, one fixed-width line per config.

    python bench/bench_kernels.py [--device cpu|cuda] [--ops confidence,remask] [--iters 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import torch

from llada_rt import ops

_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def _time_once(fn, device: torch.device, clock=time.perf_counter) -> float:
    if device.type == "cuda":
        _L2_FLUSH.setdefault(device, torch.empty(256 << 20, dtype=torch.uint8, device=device)).zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3
    t0 = clock()
    fn()
    return (clock() - t0) * 1e6


def timed(fn, *, device: torch.device, warmup: int = 3, iters: int = 30) -> float:
    """Median microseconds of fn() over iters runs after warmup; CUDA events, with L2 flushed before each run."""
    return timed_many([fn], device=device, warmup=warmup, iters=iters)[0]


def timed_many(fns, *, device: torch.device, warmup: int = 3, iters: int = 30, clock=time.perf_counter) -> list[float]:
    """Median microseconds of each callable, timed round-robin so that load from other processes on a shared machine
    falls on every callable alike; on the CPU by `clock` (e.g. time.thread_time for one thread's CPU time)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(iters):
        for t, fn in zip(times, fns):
            t.append(_time_once(fn, device, clock))
    return [statistics.median(t) for t in times]


# ---- rows: (op, config, bytes read, [(label, fn), ...]); the first callable is llada_rt, the rest are baselines ----

def torch_confidence(logits: torch.Tensor):
    """What the official sampler does: argmax, softmax in fp32, gather."""
    token = logits.argmax(-1)                                                     # (B, N)
    prob = torch.softmax(logits, -1, dtype=torch.float32).gather(-1, token[..., None])[..., 0]
    return token, prob


def confidence_rows(device: torch.device):
    shapes = [(1, 32, 126464, torch.float32), (1, 32, 126464, torch.bfloat16), (1, 32, 32000, torch.float32),
              (4, 32, 126464, torch.bfloat16)]
    if device.type == "cuda":
        shapes += [(1, 256, 126464, torch.bfloat16), (16, 32, 126464, torch.bfloat16)]
    for B, N, V, dtype in shapes:
        logits = (torch.randn(B, N, V, device=device) * 3).to(dtype)               # (B, N, V)
        masked = torch.ones(B, N, dtype=torch.bool, device=device)
        config = f"B={B:<3} N={N:<4} V={V:<6} {str(dtype).replace('torch.', ''):<8}"
        fns = [("llada_rt", lambda: ops.confidence(logits, masked))]
        if device.type == "cuda" or (B, N, V, dtype) == shapes[0]:   # Gumbel noise: Philox + 2 logs per logit
            fns.append(("llada_rt T=1", lambda: ops.confidence(logits, masked, temperature=1.0, seed=1)))
        fns.append(("torch", lambda: torch_confidence(logits)))
        yield "confidence", config, logits.numel() * logits.element_size(), fns


def torch_remask(canvas, token, prob, k, start, mask_id):
    """Sync-free torch top-k commit: sort the masked confidences, scatter the first k[b] back, write tokens."""
    N = token.shape[1]
    blk = canvas[:, start:start + N]                                              # (B, N)
    conf = torch.where(blk == mask_id, prob, float("-inf"))
    order = conf.argsort(dim=1, descending=True, stable=True)                     # (B, N)
    take = torch.arange(N, device=canvas.device)[None, :] < k[:, None]
    commit = torch.zeros_like(take).scatter(1, order, take) & (blk == mask_id)
    canvas[:, start:start + N] = torch.where(commit, token, blk)


def remask_rows(device: torch.device):
    mask_id = 126336
    for B, N, P in [(1, 32, 100), (8, 32, 500), (1, 256, 64), (4, 1024, 64)]:
        canvas = torch.full((B, P + N), mask_id, dtype=torch.int64, device=device)  # (B, T)
        canvas[:, :P] = 5
        token = torch.randint(0, 1000, (B, N), device=device)
        prob = torch.rand(B, N, device=device)
        k = torch.full((B,), max(1, N // 8), dtype=torch.int64, device=device)
        work = canvas.clone()

        def ours():
            work.copy_(canvas)
            ops.remask(work, token, prob, start=P, mask_id=mask_id, k=k)

        def ref():
            work.copy_(canvas)
            torch_remask(work, token, prob, k, P, mask_id)

        yield "remask", f"B={B:<3} N={N:<4} T={P + N:<6}", prob.numel() * 4 + token.numel() * 8, [
            ("llada_rt", ours), ("torch sort+scatter", ref)]


class Flops(int):
    """A row's work in floating-point operations (reported as TFLOP/s); a plain int is bytes read (GB/s)."""


def _rate(work: int, us: float) -> str:
    return f"{work / us / 1e6:7.3f} TFLOP/s" if isinstance(work, Flops) else f"{work / us / 1e3:7.2f} GB/s"


def attention_rows(device: torch.device):
    """Bidirectional attention, FLOPs = 4 B Hq Lq Lk D; baseline: torch SDPA on the same tensors without a mask."""
    shapes = [(1, 32, 1024, 32, 32, 128), (1, 256, 1024, 8, 8, 128), (4, 64, 512, 16, 4, 64), (1, 1, 8192, 32, 32, 128)]
    if device.type == "cuda":
        shapes += [(1, 32, 4096, 32, 32, 128), (1, 4096, 4096, 32, 32, 128), (8, 256, 2048, 32, 8, 128)]
    for B, Lq, Lk, Hq, Hkv, D in shapes:
        q = torch.randn(B, Lq, Hq, D, dtype=torch.bfloat16, device=device)
        k = torch.randn(B, Lk, Hkv, D, dtype=torch.bfloat16, device=device)
        v = torch.randn(B, Lk, Hkv, D, dtype=torch.bfloat16, device=device)
        key_start = torch.zeros(B, dtype=torch.int32, device=device)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)       # (B, H, L, D) views
        yield "attention", f"B={B:<2} Lq={Lq:<5} Lk={Lk:<5} H={Hq}/{Hkv:<3} D={D}", Flops(4 * B * Hq * Lq * Lk * D), [
            ("llada_rt", lambda: ops.attention(q, k, v, key_start)),
            ("torch sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=Hq != Hkv)),
        ]


ROWS = {"confidence": confidence_rows, "remask": remask_rows, "attention": attention_rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", default=",".join(ROWS))
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    device = torch.device(args.device)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "?"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name} | torch {torch.__version__} | CUDA {torch.version.cuda} | commit {commit} | median of {args.iters}")
    for op in args.ops.split(","):
        for op_name, config, nbytes, fns in ROWS[op](device):
            cells, base_us = [], None
            us_all = timed_many([fn for _, fn in fns], device=device, iters=args.iters)
            results = [(label, us) for (label, _), us in zip(fns, us_all)]
            ours_us = results[0][1]
            for label, us in results:
                cells.append(f"{label} {us:9.1f} us {_rate(nbytes, us)}")
                base_us = us if label.startswith("torch") else base_us
            speedup = f"| x{base_us / ours_us:5.2f} vs torch" if base_us else ""
            print(f"{op_name:<10} {config} | " + " | ".join(cells) + f" {speedup}", flush=True)


if __name__ == "__main__":
    main()
