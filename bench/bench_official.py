"""llada_rt against the official generate.py loop, same checkpoint, same prompt, same NFE, one process.

    python bench/bench_official.py                       # fp32 / bf16 / int8, modes exact, prefix, dual, 2 threads
    python bench/bench_official.py --dtypes float32 --modes dual --threads 1 --repeat 1

The baseline is the loop of ML-GSAI/LLaDA generate.py as tests/llada_oracle.py writes it (the oracle the exact-mode
parity tests hold llada_rt to): every step a full forward of the whole canvas with logits for every position, the
argmax, the float64 softmax over the full vocabulary, the per-row top-k; its forward (llada_oracle.PlainLLaDA) is
modeling_llada's math unfused from the HF tensors, here in float32, with one matmul per projection (torch's
GEMMs). llada_rt runs `Runtime.generate` at the same gen_length / block_length / steps, one token per forward, so
the NFE is equal in every mode (asserted). The checkpoint is random, with LLaDA-8B's vocabulary and special ids and
a scaled-down body (the default: d_model 512, 4 layers, 8 heads, mlp 1536, vocabulary 126464, as in
bench/RESULTS.md). Times are wall clock with --threads torch threads, repeats interleaved (baseline, then each
llada_rt row, per repeat), median reported; the ratio is baseline / row. exact mode's tokens are checked equal to
the baseline's (the parity the tests assert; a fp32 near-tie may flip a position, which is reported, not hidden).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from llada_oracle import PlainLLaDA, official_generate  # noqa: E402

from llada_rt import Runtime  # noqa: E402
from llada_rt.benchmark import random_checkpoint  # noqa: E402

DTYPES = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None), "int8": (torch.float32, "int8")}


def official_tokens(plain: PlainLLaDA, cfg, prompt: list[int], gen_length: int, block_length: int, steps: int):
    """One run of the official loop (temperature 0, low-confidence remasking) -> (answer ids, NFE)."""
    x, nfe = official_generate(lambda ids, am: plain(ids, am), torch.tensor([prompt]), steps=steps,
                               gen_length=gen_length, block_length=block_length, mask_id=cfg.mask_token_id,
                               eos_id=cfg.eos_token_id)
    return x[0, len(prompt):].tolist(), nfe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--random", default="", metavar="SPEC",
                    help="body of the random checkpoint, e.g. 'd_model=512,n_layers=4' (default: bench/RESULTS.md's)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma list of {', '.join(DTYPES)}")
    ap.add_argument("--modes", default="exact,prefix,dual")
    ap.add_argument("--prompt-len", type=int, default=43)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="total steps (default: gen_length, one token per step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / "bench" / "out" / "bench_official.json"))
    args = ap.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [d for d in dtypes if d not in DTYPES]:
        ap.error(f"unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}")
    if bad := [m for m in modes if m not in ("exact", "prefix", "dual")]:
        ap.error(f"unknown mode(s) {bad}; choose from exact, prefix, dual")
    steps = args.steps or args.gen_length
    torch.set_num_threads(args.threads)
    gen = dict(gen_length=args.gen_length, block_length=args.block_length, steps=steps)
    prompt = torch.randint(0, 100, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(args.random, Path(tmp))
        plain = PlainLLaDA(ckpt, dtype=torch.float32)
        runtimes = {d: Runtime(ckpt, device="cpu", dtype=DTYPES[d][0], quantize=DTYPES[d][1]) for d in dtypes}
        cfg = next(iter(runtimes.values())).config
        rows = [(d, m) for d in dtypes for m in modes]
        for d, m in rows:                                   # warm-up: path measurements, workspace, caches
            runtimes[d].generate(prompt, mode=m, **gen)
        base_s, base_tokens, base_nfe = [], None, None
        times = {r: [] for r in rows}
        results = {}
        for rep in range(args.repeat):
            t0 = time.perf_counter()
            base_tokens, base_nfe = official_tokens(plain, cfg, prompt, **gen)
            base_s.append(time.perf_counter() - t0)
            print(f"repeat {rep}: official loop {base_s[-1]:.2f} s ({base_nfe} forwards)", flush=True)
            for d, m in rows:
                t0 = time.perf_counter()
                res = runtimes[d].generate(prompt, mode=m, **gen)
                times[(d, m)].append(time.perf_counter() - t0)
                results[(d, m)] = res
                print(f"repeat {rep}: {d} {m} {times[(d, m)][-1]:.2f} s", flush=True)
    base = statistics.median(base_s)
    table = []
    for d, m in rows:
        res = results[(d, m)]
        assert res.nfe == base_nfe, f"{d} {m}: NFE {res.nfe} != the official loop's {base_nfe}"
        ids = res.canvas[0, res.prompt_len:].tolist()                 # the whole answer canvas, EOS padding too
        same = sum(a == b for a, b in zip(ids, base_tokens)) / len(base_tokens)
        s = statistics.median(times[(d, m)])
        table.append(dict(dtype=d, mode=m, s=s, ms_per_step=1e3 * s / res.nfe, nfe=res.nfe, speedup=base / s,
                          same_tokens_as_official=same))
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True, text=True)
    env = dict(cpu=cpu.stdout.strip() or platform.processor(), threads=args.threads, torch=torch.__version__,
               checkpoint=dict(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                               mlp=cfg.mlp_hidden_size, vocab=cfg.vocab_size),
               prompt_len=args.prompt_len, **gen, repeat=args.repeat)
    print(f"\n{env}\nofficial loop (fp32): {base:.2f} s = {1e3 * base / base_nfe:.0f} ms per step\n")
    print(f"| dtype | mode | wall s | ms per step | NFE | speedup vs official | tokens equal to official |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        same = f"{100 * r['same_tokens_as_official']:.1f}%"
        print(f"| {r['dtype']} | {r['mode']} | {r['s']:.2f} | {r['ms_per_step']:.1f} | {r['nfe']} | "
              f"{r['speedup']:.2f}x | {same} |")
    out = dict(env=env, official_s=base_s, official_nfe=base_nfe, rows=table,
               command=" ".join(["python bench/bench_official.py"] + (argv if argv is not None else sys.argv[1:])))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
