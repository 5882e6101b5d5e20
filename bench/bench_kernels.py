"""Per-op kernel benchmarks: median us and GB/s next to the torch baseline, one fixed-width line per config.

    python bench/bench_kernels.py [--device cpu|cuda] [--ops confidence,remask,attention,rms_norm,rope,silu_mul]
                                  [--iters 30] [--before OLD_C.so]
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import subprocess
import time

import torch

from llada_rt import ops, reference

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


def greedy_rows(B: int, device: torch.device, temperature: float = 0.0) -> dict:
    """Per-row settings of ops.confidence: every row at one temperature, no special ids."""
    zeros = torch.zeros(B, dtype=torch.int64, device=device)
    return dict(temperature=torch.full((B,), temperature, device=device), seed=zeros + 1, offset=zeros,
                position=zeros, random_confidence=torch.zeros(B, dtype=torch.bool, device=device), special_ids=[],
                suppress_mask=zeros.int(), zero_conf_mask=zeros.int())


def load_before(path: str):
    """A llada_rt._C built from an earlier commit, loaded beside this build (its confidence_cpu takes the scalar
    settings and writes float32 probs of commit 5b60699, before the float64 sum)."""
    spec = importlib.util.spec_from_file_location("llada_rt_before._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def before_confidence(before, logits: torch.Tensor, masked: torch.Tensor):
    """The fp32-sum confidence of the earlier build, at temperature 0 without special ids."""
    B, N, V = logits.shape
    token = torch.empty(B, N, dtype=torch.int64)
    prob = torch.empty(B, N, dtype=torch.float32)
    before.confidence_cpu(token.data_ptr(), prob.data_ptr(), logits.data_ptr(), logits.stride(0), logits.stride(1),
                          masked.data_ptr(), B, N, V, ops.DTYPE_CODES[logits.dtype], 0.0, 0, 0, False, [], [])
    return token, prob


def confidence_rows(device: torch.device, before=None):
    shapes = [(1, 32, 126464, torch.float32), (1, 32, 126464, torch.bfloat16), (1, 32, 32000, torch.float32),
              (4, 32, 126464, torch.bfloat16)]
    if device.type == "cuda":
        shapes += [(1, 256, 126464, torch.bfloat16), (16, 32, 126464, torch.bfloat16)]
    for B, N, V, dtype in shapes:
        logits = (torch.randn(B, N, V, device=device) * 3).to(dtype)               # (B, N, V)
        masked = torch.ones(B, N, dtype=torch.bool, device=device)
        config = f"B={B:<3} N={N:<4} V={V:<6} {str(dtype).replace('torch.', ''):<8}"
        greedy = greedy_rows(B, device)
        out = (torch.empty(B, N, dtype=torch.int64, device=device),
               torch.empty(B, N, dtype=torch.float64, device=device))
        fns = [("llada_rt", lambda: ops.confidence(logits, masked, **greedy, out=out))]
        if before is not None:
            fns.append(("before (fp32 sum)", lambda: before_confidence(before, logits, masked)))
        if device.type == "cuda" or (B, N, V, dtype) == shapes[0]:   # Gumbel noise: Philox + 2 logs per logit
            noisy = greedy_rows(B, device, temperature=1.0)
            fns.append(("llada_rt T=1", lambda: ops.confidence(logits, masked, **noisy, out=out)))
        fns.append(("torch", lambda: torch_confidence(logits)))
        yield "confidence", config, logits.numel() * logits.element_size(), fns


def torch_remask(block, token, prob, k, mask_id):
    """Sync-free torch top-k commit: sort the masked confidences, scatter the first k[b] back, write tokens."""
    N = token.shape[1]
    conf = torch.where(block == mask_id, prob, float("-inf"))
    order = conf.argsort(dim=1, descending=True, stable=True)                     # (B, N)
    take = torch.arange(N, device=block.device)[None, :] < k[:, None]
    commit = torch.zeros_like(take).scatter(1, order, take) & (block == mask_id)
    block.copy_(torch.where(commit, token, block))


def remask_rows(device: torch.device):
    mask_id = 126336
    for B, N in [(1, 32), (8, 32), (1, 256), (4, 1024)]:
        block = torch.full((B, N), mask_id, dtype=torch.int64, device=device)   # (B, N)
        token = torch.randint(0, 1000, (B, N), device=device)
        prob = torch.rand(B, N, dtype=torch.float64, device=device)
        k = torch.full((B,), max(1, N // 8), dtype=torch.int64, device=device)
        settings = dict(k=k, rule=torch.zeros(B, dtype=torch.int32, device=device),
                        threshold=torch.full((B,), 0.9, dtype=torch.float64, device=device),
                        factor=torch.ones(B, dtype=torch.float64, device=device))
        count = torch.empty(B, dtype=torch.int32, device=device)
        work = block.clone()

        def ours():
            work.copy_(block)
            ops.remask(work, token, prob, mask_id=mask_id, **settings, out=count)

        def ref():
            work.copy_(block)
            torch_remask(work, token, prob, k, mask_id)

        yield "remask", f"B={B:<3} N={N:<4}", prob.numel() * 8 + token.numel() * 8, [
            ("llada_rt", ours), ("torch sort+scatter", ref)]


class Flops(int):
    """A row's work in floating-point operations (reported as TFLOP/s); a plain int is bytes read (GB/s)."""


def _rate(work: int, us: float) -> str:
    return f"{work / us / 1e6:7.3f} TFLOP/s" if isinstance(work, Flops) else f"{work / us / 1e3:7.2f} GB/s"


def attention_rows(device: torch.device):
    """Bidirectional attention, FLOPs = 4 B Hq Lq Lk D; baseline: torch SDPA on the same tensors without a mask (ours
    also applies per-row key ranges). CPU shapes: the shipped model's (H 2, D 64) and LLaDA-8B's (H 32, D 128)."""
    if device.type == "cuda":
        shapes = [(1, 32, 1024, 32, 32, 128), (1, 256, 1024, 8, 8, 128), (4, 64, 512, 16, 4, 64),
                  (1, 1, 8192, 32, 32, 128), (1, 32, 4096, 32, 32, 128), (1, 4096, 4096, 32, 32, 128),
                  (8, 256, 2048, 32, 8, 128)]
        dtypes = [torch.bfloat16]
    else:
        shapes = [(1, 32, 40, 2, 2, 64), (4, 64, 100, 2, 2, 64), (8, 160, 170, 2, 2, 64),
                  (1, 32, 512, 32, 32, 128), (1, 32, 2048, 32, 32, 128), (1, 512, 512, 32, 32, 128),
                  (1, 2048, 2048, 32, 32, 128)]
        dtypes = [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for B, Lq, Lk, Hq, Hkv, D in shapes:
            q = torch.randn(B, Lq, Hq, D, dtype=dtype, device=device)
            k = torch.randn(B, Lk, Hkv, D, dtype=dtype, device=device)
            v = torch.randn(B, Lk, Hkv, D, dtype=dtype, device=device)
            out = torch.empty_like(q)
            key_start = torch.zeros(B, dtype=torch.int32, device=device)
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, H, L, D) views
            config = f"B={B:<2} Lq={Lq:<5} Lk={Lk:<5} H={Hq}/{Hkv:<3} D={D} {_dtype_name(dtype):<8}"
            yield "attention", config, Flops(4 * B * Hq * Lq * Lk * D), [
                ("llada_rt", lambda: ops.attention(q, k, v, key_start, out=out)),
                ("torch sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt,
                                                                                        enable_gqa=Hq != Hkv)),
            ]
    # 8 requests in slots of a 16-row persistent cache: ours reads the slots in place, SDPA needs them gathered
    R, B, Lq, Lk, H, D = 16, 8, 32, 170, 2, 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(B, Lq, H, D, dtype=dtype, device=device)
    cache_k = torch.randn(R, Lk, H, D, dtype=dtype, device=device)
    cache_v = torch.randn(R, Lk, H, D, dtype=dtype, device=device)
    kv_rows = torch.randperm(R, device=device)[:B].to(torch.int32)
    out = torch.empty_like(q)

    def sdpa_gathered():
        k, v = cache_k.index_select(0, kv_rows), cache_v.index_select(0, kv_rows)   # (B, Lk, H, D)
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2))

    yield "attention", f"B={B:<2} Lq={Lq:<5} Lk={Lk:<5} H={H}/{H:<3} D={D} kv_rows of R={R} {_dtype_name(dtype)}", \
        Flops(4 * B * H * Lq * Lk * D), [
            ("llada_rt", lambda: ops.attention(q, cache_k, cache_v, kv_rows=kv_rows, out=out)),
            ("torch index_select+sdpa", sdpa_gathered),
        ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _per_layer_shapes():
    """(rows, width, dtype) of the per-layer elementwise ops: the shipped model's step (8 x 160 rows of d 128, MLP
    384) and LLaDA-8B's (a 32-row block and a 2048-row refresh, d 4096, MLP 12288)."""
    return [(1280, 128, 384, torch.float32), (32, 4096, 12288, torch.bfloat16), (2048, 4096, 12288, torch.bfloat16),
            (32, 4096, 12288, torch.float32)]


def _torch_on_cuda(op: str, device: torch.device) -> bool:
    """On CUDA ops.<op> is the torch composition itself (ops.py): there is nothing of ours to time; says so."""
    if device.type == "cuda":
        print(f"{op:<10} skipped: on CUDA ops.{op} runs the torch composition, the baseline itself")
    return device.type == "cuda"


def rms_norm_rows(device: torch.device):
    """Bytes: x read + out written (+ the weight); baseline: LLaDA's torch composition (reference.rms_norm)."""
    if _torch_on_cuda("rms_norm", device):
        return
    for rows, d, _, dtype in _per_layer_shapes():
        x = torch.randn(rows, d, dtype=dtype, device=device)
        weight = torch.rand(d, dtype=dtype, device=device) + 0.5
        out = torch.empty_like(x)
        yield "rms_norm", f"rows={rows:<5} d={d:<5} {_dtype_name(dtype):<8}", (2 * rows + 1) * d * x.element_size(), [
            ("llada_rt", lambda: ops.rms_norm(x, weight, 1e-5, out=out)),
            ("torch", lambda: reference.rms_norm(x, weight, 1e-5)),
        ]


def rope_rows(device: torch.device):
    """q (B, S, H, D) as a view of the fused qkv output, rotated in place; bytes: q read and written + the table rows;
    baseline: LLaDA's torch composition with the table gathered per position (reference.rope)."""
    if _torch_on_cuda("rope", device):
        return
    for B, S, H, D, dtype in [(8, 160, 2, 64, torch.float32), (1, 32, 32, 128, torch.bfloat16),
                              (1, 2048, 32, 128, torch.bfloat16)]:
        P = 4096
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
        freqs = torch.arange(P, dtype=torch.float32, device=device)[:, None] * inv_freq        # (P, D/2)
        cos, sin = freqs.cos(), freqs.sin()
        qkv = torch.randn(B, S, 3 * H, D, dtype=dtype, device=device)
        q = qkv[:, :, :H]                                                                     # (B, S, H, D) view
        positions = torch.arange(S, device=device).expand(B, S)
        nbytes = 2 * q.numel() * q.element_size() + B * S * D * 4
        yield "rope", f"B={B:<2} S={S:<5} H={H:<3} D={D} {_dtype_name(dtype):<8}", nbytes, [
            ("llada_rt", lambda: ops.rope(q, positions, cos, sin, True, out=q)),
            ("torch", lambda: reference.rope(q, positions, cos, sin, True)),
        ]


def silu_mul_rows(device: torch.device):
    """Bytes: gate_up read + out written; baseline: F.silu(gate) * up (reference.silu_mul)."""
    if _torch_on_cuda("silu_mul", device):
        return
    for rows, _, F, dtype in _per_layer_shapes():
        gate_up = torch.randn(rows, 2 * F, dtype=dtype, device=device)
        out = torch.empty(rows, F, dtype=dtype, device=device)
        yield "silu_mul", f"rows={rows:<5} F={F:<5} {_dtype_name(dtype):<8}", 3 * rows * F * gate_up.element_size(), [
            ("llada_rt", lambda: ops.silu_mul(gate_up, out=out)),
            ("torch", lambda: reference.silu_mul(gate_up)),
        ]


ROWS = {"confidence": confidence_rows, "remask": remask_rows, "attention": attention_rows, "rms_norm": rms_norm_rows,
        "rope": rope_rows, "silu_mul": silu_mul_rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", default=",".join(ROWS))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--before", metavar="SO", help="a llada_rt._C .so built from commit 5b60699 (the float32-sum "
                    "confidence): its CPU confidence is timed beside this build's, round-robin in the same run")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.before and device.type != "cpu":
        ap.error("--before times the CPU kernel of the earlier build; use --device cpu")
    rows = dict(ROWS, confidence=functools.partial(confidence_rows, before=load_before(args.before))) if args.before \
        else ROWS
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "?"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name} | torch {torch.__version__} | CUDA {torch.version.cuda} | commit {commit} | median of {args.iters}")
    for op in args.ops.split(","):
        for op_name, config, nbytes, fns in rows[op](device):
            cells, base_us = [], {}
            us_all = timed_many([fn for _, fn in fns], device=device, iters=args.iters)
            results = [(label, us) for (label, _), us in zip(fns, us_all)]
            ours_us = results[0][1]
            for label, us in results:
                cells.append(f"{label} {us:9.1f} us {_rate(nbytes, us)}")
                for base in ("torch", "before"):
                    base_us[base] = us if label.startswith(base) else base_us.get(base)
            speedup = "".join(f"| x{us / ours_us:5.2f} vs {base} " for base, us in base_us.items() if us)
            print(f"{op_name:<10} {config} | " + " | ".join(cells) + f" {speedup}", flush=True)


if __name__ == "__main__":
    main()
