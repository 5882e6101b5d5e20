"""Roofline of the linears on this CPU: the machine's memory bandwidth (a stream probe), then per linear and per step the
achieved GB/s of weights and GFLOP/s against it, for fp32, bf16 and int8 weights.

    python bench/bench_roofline.py                                   # every section, 2 layers at LLaDA-8B shapes
    python bench/bench_roofline.py --sections stream,linear --shapes random --rows 1,32 --json out.json
    python bench/bench_roofline.py --sections step8b --layers 4 --dtypes bfloat16,int8

Sections: `stream` (read-only sum and copy of a 1 GiB buffer with torch, best of 5: what the cores can pull from
memory); `linear` (each linear of the random checkpoint of bench/RESULTS.md and of LLaDA-8B at 1..64 rows, every path
this CPU runs, the one choose_path picks marked '*'); `step` (model.forward at the dual-mode step shape: 32 query rows
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
from llada_rt.linear import CPU_CANDIDATES, Linear, choose_path, cpu_name  # noqa: E402
from llada_rt.model import forward, rms_norm  # noqa: E402
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


def linear_shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, N, K) of each linear of a layer and the LM head."""
    _, d, h, mlp, vocab = MODELS[model]
    return [("wqkv", 3 * d, d), ("wo", d, d), ("w_gate_up", 2 * mlp, d), ("w_down", d, mlp), ("lm_head", vocab, d)]


def paths_for(dtype) -> list[str]:
    if dtype == "int8":
        return ["blocked_int8"] if ops.linear_path_supported("blocked_int8", "cpu") else []
    return [p for p in CPU_CANDIDATES[dtype] if ops.linear_path_supported(p, "cpu")]


def make_linear(w: torch.Tensor, dtype, path: str | None) -> Linear:
    if dtype == "int8":
        return Linear.from_dense(w, quantize="int8")
    return Linear.from_dense(w.to(dtype), path=path)


def act_dtype(dtype):
    """The activation dtype of a runtime with these weights (int8: the runtime's default float32 on the CPU)."""
    return torch.float32 if dtype == "int8" else dtype


def linear_rows(models, dtypes, rows, iters, bw_gbps, log) -> list[dict]:
    out = []
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
                chosen = "blocked_int8" if dtype == "int8" else choose_path(w.to(dtype))[0]
                for path in paths:
                    lin = make_linear(w, dtype, path)
                    xs = {m: torch.randn(m, K, generator=g).to(act_dtype(dtype)) for m in rows}
                    outs = {m: torch.empty(m, N, dtype=act_dtype(dtype)) for m in rows}
                    fns = [lambda m=m: ops.linear(xs[m], lin, out=outs[m]) for m in rows]
                    for m, s in zip(rows, timed(fns, iters)):
                        gbps = lin.nbytes / s / 1e9
                        row = dict(model=MODELS[model][0], linear=name, N=N, K=K, dtype=dname, path=path,
                                   chosen=path == chosen, rows=m, us=s * 1e6, weight_bytes=lin.nbytes, gbps=gbps,
                                   gflops=2 * m * N * K / s / 1e9, pct_bw=100 * gbps / bw_gbps)
                        out.append(row)
                        log(f"{row['model']:<12} {name:<10} {N:>6}x{K:<6} {dname:<8} {path:<13}{'*' if row['chosen'] else ' '}"
                            f" M={m:<3} {s * 1e3:9.2f} ms {gbps:7.2f} GB/s {row['gflops']:7.1f} GFLOP/s "
                            f"{row['pct_bw']:5.1f}% of bw")
                    del lin
    return out


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
    with torch.inference_mode():
        forward(cfg, w, tokens, positions, cache=cache.at(0), rows=slice(PROMPT, PROMPT + BLOCK))   # the refresh
        blk = slice(PROMPT, PROMPT + BLOCK)
        x = torch.randn(BLOCK, d, generator=g).to(w.dtype)

        def step():
            forward(cfg, w, tokens[:, blk], positions[:, blk], cache=cache.at(PROMPT), rows=slice(0, BLOCK))

        def head():
            ops.linear(rms_norm(x, w.ln_f, cfg.rms_norm_eps), w.lm_head)

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
    ap.add_argument("--sections", default="stream,linear,step,step8b")
    ap.add_argument("--shapes", default="random,8b", help="models of the linear section: random, 8b")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8")
    ap.add_argument("--rows", default="1,8,32,64", help="rows (M) of the linear section")
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
    if "linear" in sections:
        result["linear"] = linear_rows(args.shapes.split(","), dtypes, [int(r) for r in args.rows.split(",")],
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
