"""Roofline of the linears on this CPU: the machine's memory bandwidth (a stream probe) and compute rate (a GEMM probe),
then per linear and per step the achieved GB/s of weights and GFLOP/s against them, for fp32, bf16 and int8 weights.

    python bench/bench_roofline.py                                   # every section, 2 layers at LLaDA-8B shapes
    python bench/bench_roofline.py --sections stream,linear --shapes random --rows 1,32 --json out.json
    python bench/bench_roofline.py --sections step8b --layers 4 --dtypes bfloat16,int8
    python bench/bench_roofline.py --sections stream,linear --shapes 8b --dtypes bfloat16,int8 --rows 1-32 --threads 2

Sections: `stream` (read-only sum and copy of a 1 GiB buffer with torch, best of 5: what the cores can pull from
memory); `compute` (GFLOP/s in fp32 and bf16, best of --iters, of torch's own GEMM of two 2048 x 2048 matrices and of
ops.linear on every path at 256 rows of a 1024 x 1024 weight: what a compute-bound matrix product reaches with torch's
threads); `linear` (each linear of the random checkpoint of bench/RESULTS.md and of LLaDA-8B at 1..64 rows, every path
this CPU runs (int8: both CPU kernels, blocked_int8 with int16 activations and blocked_int8x4 with int8 ones), the one
choose_path / choose_int8_path picks marked '*'; then per linear a table with one column per path, and for the LM head
the figure "over a block": the LM head summed over 32, 31, ..., 1 rows (logits for the masked rows of a 32-block, one
token committed per step), from the times measured at --rows, linearly interpolated between them for the row counts
not measured (--rows 1-32 measures all 32; the count measured is printed)); `step` (model.forward_batch at the dual-mode step shape: 32 query rows
against a cached 171-position canvas, logits for the 32 block rows, on the random checkpoint: d_model 512, 4 layers,
vocab 126464); `step8b` (the same step at LLaDA-8B's shapes with --layers random layers made in memory; the per-layer
time, (step - head) / layers, is extrapolated to 32 layers and labelled so). GB/s counts the weight bytes the step or
the linear reads once (the int8 scales included); % is of the stream probe's read bandwidth. Times: median of --iters
wall-clock runs after a warm-up, callables of one row timed round-robin. Prints fixed-width tables; --json writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_kernels import timed_many  # noqa: E402

from llada_rt import ops  # noqa: E402
from llada_rt.cache import KVCache  # noqa: E402
from llada_rt.config import LLaDAConfig  # noqa: E402
from llada_rt.linear import (CPU_CANDIDATES, CPU_INT8_CANDIDATES, Linear, choose_int8_path, choose_path,  # noqa: E402
                             cpu_name, quantize_int8)
from llada_rt.model import ForwardBatch, RopeTable, forward_batch  # noqa: E402
from llada_rt.weights import LayerWeights, ModelWeights  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": "int8"}
# (label, d_model, n_heads, mlp, vocab): the random checkpoint of bench/RESULTS.md and LLaDA-8B (LLADA.md 1.1)
MODELS = {"random": ("random d512", 512, 8, 1536, 126464), "8b": ("LLaDA-8B", 4096, 32, 12288, 126464)}
PROMPT, BLOCK, GEN = 43, 32, 128    # the dual-mode step of bench/RESULTS.md: canvas 171, block 32


CLOCK = time.perf_counter   # --clock cpu: time.thread_time (one thread; a busy machine then adds nothing)


def timed(fns, iters: int) -> list[float]:
    """Median seconds of each callable (bench_kernels.timed_many: round-robin, one warm-up each)."""
    return [us * 1e-6 for us in timed_many(fns, device=torch.device("cpu"), warmup=1, iters=iters, clock=CLOCK)]


def stream_probe(iters: int) -> dict:
    """GB/s of a read-only torch sum and of a copy (read + write) over 1 GiB (16x the L3 of these machines), best of
    iters: the bandwidth a streaming kernel can reach from memory with torch's threads."""
    n = (1 << 30) // 4
    a = torch.ones(n, dtype=torch.float32)
    b = torch.empty_like(a)
    best = {"read_gbps": 0.0, "copy_gbps": 0.0}
    for _ in range(iters):
        t0 = CLOCK()
        a.sum()
        best["read_gbps"] = max(best["read_gbps"], 4 * n / (CLOCK() - t0) / 1e9)
        t0 = CLOCK()
        b.copy_(a)
        best["copy_gbps"] = max(best["copy_gbps"], 8 * n / (CLOCK() - t0) / 1e9)
    del a, b
    return best


def compute_probe(iters: int, n: int = 2048, m: int = 256, k: int = 1024) -> dict:
    """GFLOP/s, best of iters after a warm-up, in fp32 and bf16: torch.mm on two n x n matrices (2 n^3 flops), and
    ops.linear on every path this CPU runs at m rows of a k x k weight (compute-bound: each weight element serves m
    rows)."""
    best = {}
    g = torch.Generator().manual_seed(0)
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
        c = torch.empty(n, n, dtype=dtype)
        x, y = torch.randn(m, k, generator=g).to(dtype), torch.empty(m, k, dtype=dtype)
        w = (torch.randn(k, k, generator=g) * 0.02).to(dtype)
        runs = {"torch.mm": (lambda: torch.mm(a, b, out=c), 2 * n ** 3)}
        for path in paths_for(dtype):
            lin = Linear.from_dense(w, path=path)
            runs[f"linear {path}"] = (lambda lin=lin: ops.linear(x, lin, out=y), 2 * m * k * k)
        for label, (fn, flops) in runs.items():
            fn()
            rate = 0.0
            for _ in range(iters):
                t0 = CLOCK()
                fn()
                rate = max(rate, flops / (CLOCK() - t0) / 1e9)
            best[f"{name} {label}"] = rate
    return best


def linear_shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, N, K) of each linear of a layer and the LM head."""
    _, d, h, mlp, vocab = MODELS[model]
    return [("wqkv", 3 * d, d), ("wo", d, d), ("w_gate_up", 2 * mlp, d), ("w_down", d, mlp), ("lm_head", vocab, d)]


def paths_for(dtype) -> list[str]:
    return [p for p in (CPU_INT8_CANDIDATES if dtype == "int8" else CPU_CANDIDATES[dtype])
            if ops.linear_path_supported(p, "cpu")]


BLOCK_ROWS = range(32, 0, -1)   # the LM head's rows over a 32-block with logits for the masked rows only


def block_time(times: dict[int, float]) -> tuple[float, int] | None:
    """(seconds summed over BLOCK_ROWS, how many of them were measured) from {rows: seconds}, linear between the
    measured row counts; None unless 1 and 32 rows (the ends) were measured."""
    ms = sorted(times)
    if 1 not in times or 32 not in times:
        return None
    total = 0.0
    for m in BLOCK_ROWS:
        lo = max(r for r in ms if r <= m)
        hi = min(r for r in ms if r >= m)
        total += times[lo] if lo == hi else times[lo] + (times[hi] - times[lo]) * (m - lo) / (hi - lo)
    return total, sum(1 for m in BLOCK_ROWS if m in times)


def parse_rows(text: str) -> list[int]:
    """'1,8,32' or ranges '1-32' (both ends included), mixed: '1-4,8,16-17'."""
    rows = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        rows.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return sorted(set(rows))


def act_dtype(dtype):
    """The activation dtype of a runtime with these weights (int8: the runtime's default float32 on the CPU)."""
    return torch.float32 if dtype == "int8" else dtype


def linear_rows(models, dtypes, rows, iters, bw_gbps, log) -> tuple[list[dict], list[dict]]:
    out, blocks = [], []
    g = torch.Generator().manual_seed(0)
    for model in models:
        for name, N, K in linear_shapes(model):
            w = torch.randn(N, K, generator=g) * 0.02                                   # (N, K) fp32
            for dname in dtypes:
                dtype = DTYPES[dname]
                paths = paths_for(dtype)
                if not paths:
                    log(f"{MODELS[model][0]:<12} {name:<10} {dname:<8} skipped: no path on this CPU")
                    continue
                q8 = quantize_int8(w) if dtype == "int8" else None
                chosen = choose_int8_path(*q8)[0] if dtype == "int8" else choose_path(w.to(dtype))[0]
                table = {}
                for path in paths:
                    lin = (Linear.from_int8(*q8, path=path) if dtype == "int8"
                           else Linear.from_dense(w.to(dtype), path=path))
                    xs = {m: torch.randn(m, K, generator=g).to(act_dtype(dtype)) for m in rows}
                    outs = {m: torch.empty(m, N, dtype=act_dtype(dtype)) for m in rows}
                    fns = [lambda m=m: ops.linear(xs[m], lin, out=outs[m]) for m in rows]
                    for m, s in zip(rows, timed(fns, iters)):
                        gbps = lin.nbytes / s / 1e9
                        row = dict(model=MODELS[model][0], linear=name, N=N, K=K, dtype=dname, path=path,
                                   chosen=path == chosen, rows=m, us=s * 1e6, weight_bytes=lin.nbytes, gbps=gbps,
                                   gflops=2 * m * N * K / s / 1e9, pct_bw=100 * gbps / bw_gbps)
                        out.append(row)
                        table[path, m] = s
                        log(f"{row['model']:<12} {name:<10} {N:>6}x{K:<6} {dname:<8} {path:<13}{'*' if row['chosen'] else ' '}"
                            f" M={m:<3} {s * 1e3:9.2f} ms {gbps:7.2f} GB/s {row['gflops']:7.1f} GFLOP/s "
                            f"{row['pct_bw']:5.1f}% of bw")
                    nbytes = lin.nbytes
                    del lin
                    if name == "lm_head":
                        blk = block_time({m: table[path, m] for m in rows})
                        if blk is not None:
                            total, measured = blk
                            gbps = len(BLOCK_ROWS) * nbytes / total / 1e9
                            blocks.append(dict(model=MODELS[model][0], N=N, K=K, dtype=dname, path=path,
                                               chosen=path == chosen, block_ms=total * 1e3, measured_rows=measured,
                                               gbps=gbps, pct_bw=100 * gbps / bw_gbps))
                log_table(MODELS[model][0], name, dname, paths, chosen, rows, table, log)
    for b in blocks:
        log(f"over a block: {b['model']:<12} lm_head {b['N']}x{b['K']} {b['dtype']:<8} {b['path']:<13}"
            f"{'*' if b['chosen'] else ' '} rows 32..1: {b['block_ms']:9.1f} ms {b['gbps']:7.2f} GB/s "
            f"{b['pct_bw']:5.1f}% of bw ({b['measured_rows']} of 32 row counts measured, the rest interpolated)")
    return out, blocks


def log_table(model, name, dname, paths, chosen, rows, table, log) -> None:
    """One line per row count, one column per path: ms."""
    log(f"  {model} {name} {dname}, ms: " + " | ".join(f"{p}{'*' if p == chosen else ''}" for p in paths))
    for m in rows:
        log(f"  M={m:<3} " + " | ".join(f"{table[p, m] * 1e3:10.3f}" for p in paths))


def model_weights(cfg: LLaDAConfig, dtype, g: torch.Generator) -> ModelWeights:
    """Random weights at cfg's shapes with the path choose_path picks per linear (int8: quantized), built one tensor at
    a time so that at most one extra copy of one matrix exists."""
    d, dh, mlp, v = cfg.d_model, cfg.head_dim, cfg.mlp_hidden_size, cfg.embedding_size
    dense_dtype = torch.bfloat16 if dtype == "int8" else dtype

    def lin(n, k):
        w = (torch.randn(n, k, generator=g) * 0.02).to(dense_dtype)
        return Linear.from_dense(w, quantize="int8") if dtype == "int8" else Linear.from_dense(w)

    def norm(n):
        return torch.ones(n, dtype=act_dtype(dtype))

    layers = [LayerWeights(attn_norm=norm(d), wqkv=lin((cfg.n_heads + 2 * cfg.n_kv_heads) * dh, d), wo=lin(d, d),
                           ff_norm=norm(d), w_gate_up=lin(2 * mlp, d), w_down=lin(d, mlp))
              for _ in range(cfg.n_layers)]
    embed = torch.randn(v, d, generator=g).to(act_dtype(dtype))
    return ModelWeights(embed=embed, layers=layers, ln_f=norm(d), lm_head=lin(v, d))


def step_row(model: str, layers: int, dname: str, iters: int, bw_gbps: float, log) -> dict:
    """The dual-mode step: 32 block rows at positions [P, P + 32) against the cached canvas of P + G positions."""
    label, d, h, mlp, vocab = MODELS[model]
    cfg = LLaDAConfig(d_model=d, n_layers=layers, n_heads=h, n_kv_heads=h, mlp_hidden_size=mlp, vocab_size=vocab,
                      embedding_size=vocab, max_sequence_length=4096, mask_token_id=126336, eos_token_id=126081,
                      pad_token_id=126081, rope_theta=500000.0)
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(1)
    t_build = time.perf_counter()
    w = model_weights(cfg, dtype, g)
    build_s = time.perf_counter() - t_build
    T = PROMPT + GEN
    tokens = torch.randint(0, 1000, (1, T), generator=g)
    positions = torch.arange(T)[None]
    cache = KVCache(cfg, 1, T, w.dtype, w.device)
    rope = RopeTable.build(cfg, T, w.device)
    blk = slice(PROMPT, PROMPT + BLOCK)
    i32 = torch.int32
    # the refresh writes every column's K/V; the step writes the block's and attends over the cached canvas
    refresh = ForwardBatch(tokens, positions, key_end=torch.tensor([T], dtype=i32), logit_rows=torch.arange(PROMPT, T),
                           write_index=torch.arange(T))
    step_fb = ForwardBatch(tokens[:, blk], positions[:, blk], key_end=torch.tensor([T], dtype=i32),
                           logit_rows=torch.arange(BLOCK), write_index=torch.arange(PROMPT, PROMPT + BLOCK),
                           kv_rows=torch.zeros(1, dtype=i32), cache_read=True)
    with torch.inference_mode():
        forward_batch(cfg, w, refresh, cache=cache, rope=rope)
        x = torch.randn(BLOCK, d, generator=g).to(w.dtype)

        def step():
            forward_batch(cfg, w, step_fb, cache=cache, rope=rope)

        def head():
            ops.linear(ops.rms_norm(x, w.ln_f, cfg.rms_norm_eps), w.lm_head)

        step_s, head_s = timed([step, head], iters)
    weight_bytes = sum(l.nbytes for l in w.linears().values())
    layer_s = (step_s - head_s) / layers
    row = dict(model=label, layers=layers, dtype=dname, step_ms=step_s * 1e3, lm_head_ms=head_s * 1e3,
               layer_ms=layer_s * 1e3, weight_bytes=weight_bytes, gbps=weight_bytes / step_s / 1e9,
               pct_bw=100 * weight_bytes / step_s / 1e9 / bw_gbps, build_s=build_s,
               paths=sorted({f"{n.split('.')[-1]}:{l.path}" for n, l in w.linears().items()}))
    if model == "8b":
        row["extrapolated_32_layers_ms"] = (32 * layer_s + head_s) * 1e3
        row["extrapolated_32_layers_gbps"] = (32 * sum(l.nbytes for n, l in w.linears().items() if n != "lm_head") / layers
                                             + w.lm_head.nbytes) / (32 * layer_s + head_s) / 1e9
    log(f"{label:<12} step {dname:<8} layers {layers}: {step_s * 1e3:9.1f} ms/step  LM head {head_s * 1e3:8.1f} ms  "
        f"per layer {layer_s * 1e3:8.1f} ms  {row['gbps']:6.2f} GB/s of weights ({row['pct_bw']:4.1f}% of bw)"
        + (f"  | EXTRAPOLATED to 32 layers: {row['extrapolated_32_layers_ms']:9.1f} ms/step, "
           f"{row['extrapolated_32_layers_gbps']:6.2f} GB/s" if model == "8b" else "") + f"  paths {row['paths']}")
    del w, cache
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="stream,compute,linear,step,step8b")
    ap.add_argument("--shapes", default="random,8b", help="models of the linear section: random, 8b")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8")
    ap.add_argument("--rows", default="1,8,32,64", help="rows (M) of the linear section: a list, ranges like 1-32")
    ap.add_argument("--layers", type=int, default=2, help="layers of the LLaDA-8B-shaped step (2 to 4)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter (the numbers to report, on a quiet machine); cpu: the calling thread's CPU "
                         "time, with --threads 1 only (kernel work on a shared machine; memory stalls still count)")
    ap.add_argument("--json", default=None, help="write every row to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            ap.error("--clock cpu times the calling thread only: add --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    sections = args.sections.split(",")
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES] + [m for m in args.shapes.split(",") if m not in MODELS]
    if unknown:
        ap.error(f"unknown dtype or model {unknown}; dtypes {list(DTYPES)}, models {list(MODELS)}")
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "?"
    except OSError:
        commit = "?"
    feats = [k for k, v in ops.cpu_features().items() if v]
    env = dict(cpu=cpu_name(), cpu_features=feats, threads=torch.get_num_threads(),
               torch=torch.__version__, commit=commit, load_average=os.getloadavg()[0], clock=args.clock)
    print(f"# CPU {env['cpu']} ({', '.join(feats)}) | {env['threads']} threads | torch {env['torch']} | commit {commit} "
          f"| load average {env['load_average']:.1f} | median of {args.iters} | {args.clock} clock", flush=True)
    result = {"env": env}

    def log(s):
        print(s, flush=True)

    bw = None
    if "stream" in sections:
        result["stream"] = stream_probe(args.iters)
        bw = result["stream"]["read_gbps"]
        log(f"stream probe: read (torch sum) {bw:.2f} GB/s, copy (read + write) {result['stream']['copy_gbps']:.2f} GB/s")
    if bw is None:
        bw = float("nan")
    if "compute" in sections:
        result["compute"] = compute_probe(args.iters)
        log("compute probe, GFLOP/s (torch.mm 2048^3; ops.linear 256 rows x 1024 x 1024 per path): "
            + ", ".join(f"{k} {v:.0f}" for k, v in result["compute"].items()))
    if "linear" in sections:
        result["linear"], result["lm_head_block"] = linear_rows(args.shapes.split(","), dtypes, parse_rows(args.rows),
                                                                args.iters, bw, log)
    result["step"] = []
    if "step" in sections:
        for dname in dtypes:
            result["step"].append(step_row("random", 4, dname, args.iters, bw, log))
    if "step8b" in sections:
        for dname in dtypes:
            result["step"].append(step_row("8b", args.layers, dname, max(3, args.iters // 2), bw, log))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        log(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
