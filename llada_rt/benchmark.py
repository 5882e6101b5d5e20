"""Generation benchmark core (bench/bench_generate.py and `llada-rt bench`): every mode on the same prompts, one process."""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# name -> generation options; "+thr" rows use the threshold given to run_benchmark
MODE_OPTIONS = {
    "exact": dict(mode="exact"),
    "prefix": dict(mode="prefix"),
    "dual": dict(mode="dual"),
    "exact+thr": dict(mode="exact", threshold=True),
    "prefix+thr": dict(mode="prefix", threshold=True),
    "dual+thr": dict(mode="dual", threshold=True),
}


@dataclasses.dataclass
class ModeResult:
    name: str
    options: dict
    total_s: list[float]        # wall time per timed run
    nfe: int
    tokens_per_forward: float
    answer_tokens: int          # tokens before the first EOS/EOT, summed over the prompts (Fast-dLLM's numerator)
    positions: int              # generated positions committed by steps
    refresh_s: float            # median time in full (refresh / uncached) forwards
    step_s: float               # median time in cached steps
    refresh_count: int
    peak_bytes: int | None      # CUDA peak allocated during the timed runs; None on the CPU
    cuda_graph: bool = False

    @property
    def median_s(self) -> float:
        return statistics.median(self.total_s)

    @property
    def tokens_per_s(self) -> float:
        return self.answer_tokens / self.median_s

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.median_s / self.nfe

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(median_s=self.median_s, tokens_per_s=self.tokens_per_s, ms_per_step=self.ms_per_step)
        return d


def environment(rt, settings: dict) -> dict:
    dev = rt.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"device": f"{dev.type}: {name}", "torch": torch.__version__, "cuda": torch.version.cuda,
            "threads": torch.get_num_threads(), "dtype": str(rt.dtype).replace("torch.", ""), "commit": commit,
            "model": str(rt.path), "layers": rt.config.n_layers, "d_model": rt.config.d_model, **settings}


def measure(rt, prompts, name: str, options: dict, repeat: int, warmup: int) -> ModeResult:
    """Runs one mode warmup + repeat times over the whole prompt list (one batch per prompt)."""
    for _ in range(warmup):
        for p in prompts:
            rt.generate(p, **options)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(rt.device)
    totals, refresh, step = [], [], []
    for _ in range(repeat):
        t, r, s, nfe, tokens, positions, refreshes = 0.0, 0.0, 0.0, 0, 0, 0, 0
        for p in prompts:
            res = rt.generate(p, **options)
            t += res.timings["total_s"]
            r += res.timings["refresh_s"]
            s += res.timings["step_s"]
            nfe += res.nfe
            tokens += res.answer_tokens
            positions += res.tokens_committed
            refreshes += res.refreshes
        totals.append(t)
        refresh.append(r)
        step.append(s)
    peak = torch.cuda.max_memory_allocated(rt.device) if rt.device.type == "cuda" else None
    return ModeResult(name=name, options=options, total_s=totals, nfe=nfe, tokens_per_forward=positions / max(nfe, 1),
                      answer_tokens=tokens, positions=positions, refresh_s=statistics.median(refresh),
                      step_s=statistics.median(step), refresh_count=refreshes, peak_bytes=peak,
                      cuda_graph=bool(options.get("cuda_graph")))


def run_benchmark(rt, prompts, modes, gen: dict, threshold: float = 0.9, repeat: int = 3, warmup: int = 1,
                  cuda_graph: str = "off", log=print) -> dict:
    """Every mode of `modes` (names of MODE_OPTIONS) over the same prompts; returns {"env", "rows"} and logs a table."""
    graph_settings = {"off": [False], "on": [True], "both": [False, True]}[cuda_graph]
    settings = dict(prompts=len(prompts), prompt_tokens=[len(rt.encode_prompts(p)[0]) for p in prompts][:8],
                    threshold=threshold, repeat=repeat, warmup=warmup, **gen)
    env = environment(rt, settings)
    log(header(env))
    rows = []
    for graph in graph_settings:
        for name in modes:
            opts = {k: (threshold if v is True else v) for k, v in MODE_OPTIONS[name].items()}
            opts.update(gen)
            if graph:
                opts["cuda_graph"] = True
            res = measure(rt, prompts, name + ("+graph" if graph else ""), opts, repeat, warmup)
            rows.append(res)
            log(format_row(res, rows[0]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    log(f"process peak RSS {rss / 2**20:.0f} MiB")
    return {"env": env, "rows": [r.row() | {"speedup": rows[0].median_s / r.median_s} for r in rows],
            "peak_rss_bytes": rss}


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[i]


def run_arrivals(rt, prompts, options: dict, rate: float, seed: int = 0, engine_first: bool = False,
                 log=print) -> dict:
    """Requests arriving as a seeded Poisson process at `rate` per second, served twice from the same arrival
    schedule: by the engine (each request joins at the next step after it arrives, continuous batching) and one
    after another with generate() (a request starts when it has arrived and the previous one is done), in that order
    when engine_first. Reports requests/s and output tokens/s over the whole run (first arrival to last completion),
    latency p50/p99 (arrival to completion) and whether both gave the same tokens."""
    import random
    import time as _time

    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in prompts:
        arrivals.append(t)
        t += rng.expovariate(rate)
    ids = [rt.encode_prompts(p)[0] for p in prompts]
    gc = rt.make_config(options)
    for p in ids[:2]:   # warm-up (workspace sizes, first-call costs) outside the timed runs
        rt.generate(p, **options)

    def summary(name, done_at, answers):
        lat = [d - a for d, a in zip(done_at, arrivals)]
        span = max(done_at) - arrivals[0]
        tokens = sum(len(a) for a in answers)
        row = dict(name=name, requests=len(ids), span_s=span, requests_per_s=len(ids) / span,
                   output_tokens_per_s=tokens / span, output_tokens=tokens, latency_p50_s=_percentile(lat, 50),
                   latency_p99_s=_percentile(lat, 99))
        log(f"{name:<12}{row['requests_per_s']:>10.2f}{row['output_tokens_per_s']:>12.1f}{row['latency_p50_s']:>10.3f}"
            f"{row['latency_p99_s']:>10.3f}{span:>9.2f}")
        return row

    def one_after_another():
        t0 = _time.perf_counter()
        done_at, answers = [], []
        for a, p in zip(arrivals, ids):
            wait = a - (_time.perf_counter() - t0)
            if wait > 0:
                _time.sleep(wait)
            answers.append(rt.generate(p, **options).token_ids[0])
            done_at.append(_time.perf_counter() - t0)
        return summary("sequential", done_at, answers), answers

    def by_the_engine():
        forwards0, phase_s0 = rt.engine.forwards, rt.engine.timer.seconds()
        t0 = _time.perf_counter()
        reqs, done_at, nxt = [None] * len(ids), [0.0] * len(ids), 0
        while nxt < len(ids) or any(not r.done for r in reqs if r is not None):
            now = _time.perf_counter() - t0
            while nxt < len(ids) and arrivals[nxt] <= now:
                reqs[nxt] = rt.add(ids[nxt], gc)
                nxt += 1
            if not any(r is not None and not r.done for r in reqs):
                _time.sleep(max(0.0, arrivals[nxt] - (_time.perf_counter() - t0)))
                continue
            rt.step()
            now = _time.perf_counter() - t0
            for i, r in enumerate(reqs):
                if r is not None and r.done and not done_at[i]:
                    done_at[i] = now
        answers = [rt.tokenizer.cut_at_stop(r.answer) for r in reqs]
        row = summary("engine", done_at, answers)
        phase_s = {k: v - phase_s0.get(k, 0.0) for k, v in rt.engine.timer.seconds().items()}
        row.update(forwards=rt.engine.forwards - forwards0, forward_s={k: v for k, v in phase_s.items() if v > 0})
        log(f"engine: {row['forwards']} forwards; seconds per kind of forward: "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(row["forward_s"].items())))
        return row, answers

    log(f"# {len(ids)} requests, Poisson arrivals at {rate}/s (seed {seed}), options {options}")
    log(f"{'serving':<12}{'req/s':>10}{'out tok/s':>12}{'p50 s':>10}{'p99 s':>10}{'span s':>9}")
    if engine_first:
        engine, eng_answers = by_the_engine()
        sequential, seq_answers = one_after_another()
    else:
        sequential, seq_answers = one_after_another()
        engine, eng_answers = by_the_engine()
    same = eng_answers == seq_answers
    log(f"engine / sequential: {engine['requests_per_s'] / sequential['requests_per_s']:.2f}x requests/s; "
        f"identical outputs: {same}")
    return {"arrivals_s": arrivals, "rate": rate, "seed": seed, "options": options, "config": dataclasses.asdict(gc),
            "sequential": sequential, "engine": engine, "identical": same, "engine_first": engine_first,
            "speedup": engine["requests_per_s"] / sequential["requests_per_s"]}


def run_arrivals_rounds(rt, prompts, options: dict, rate: float, seed: int = 0, rounds: int = 1, log=print) -> dict:
    """run_arrivals `rounds` times in one process, the engine first in every other round (so that a drift of the
    machine's speed favours neither side), -> the rounds, their engine / sequential ratios and the median ratio."""
    runs = []
    for r in range(rounds):
        if rounds > 1:
            log(f"## round {r + 1} of {rounds}")
        runs.append(run_arrivals(rt, prompts, options, rate, seed, engine_first=r % 2 == 1, log=log))
    ratios = [x["speedup"] for x in runs]
    median = statistics.median(ratios)
    if rounds > 1:
        log(f"engine / sequential per round: {', '.join(f'{x:.2f}x' for x in ratios)}; median {median:.2f}x; "
            f"identical outputs in every round: {all(x['identical'] for x in runs)}")
    return {"rounds": runs, "speedups": ratios, "speedup_median": median,
            "identical": all(x["identical"] for x in runs)}


class KernelClock:
    """While entered, times every call into the compiled kernels (the functions of llada_rt._C, which ops.py alone
    calls) by kernel name: `seconds` and `calls`. A step's time outside them is its host side: Python, the ops'
    checks and torch's own ops (the K/V cache writes, and the GEMMs of linears on a torch_* path among them). Each
    timed call costs under a microsecond more than an untimed one. CPU only: a CUDA call returns before its
    kernel has run."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def __enter__(self):
        import time as _time

        from . import ops
        clock, real = self, ops._C

        class Timed:
            def __getattr__(self_, name):   # first use of a name: its timed wrapper, kept on the instance
                f = getattr(real, name)
                if not callable(f) or isinstance(f, type):   # params structs and constants pass through
                    return f
                seconds, calls, clock_ = clock.seconds, clock.calls, _time.perf_counter

                def timed(*args, **kwargs):
                    t0 = clock_()
                    try:
                        return f(*args, **kwargs)
                    finally:
                        seconds[name] = seconds.get(name, 0.0) + clock_() - t0
                        calls[name] = calls.get(name, 0) + 1
                setattr(self_, name, timed)
                return timed

        self._ops, self._real = ops, real
        ops._C = Timed()
        return self

    def __exit__(self, *exc):
        self._ops._C = self._real
        return False


def run_scaling(rt, prompts, options: dict, batches: list[int], repeat: int = 3, breakdown: bool = False,
                log=print) -> dict:
    """Milliseconds per step of one generate() call over the first B prompts, for each B of `batches`, repeats
    interleaved across the batch sizes (median): how the cost of a step grows with the rows in it. B * ms(1) / ms(B)
    is the most that serving B requests together can gain over serving them one after another. With breakdown, one
    more call per B under a KernelClock splits its step into the compiled kernels and the host side."""
    import time as _time

    ids = [rt.encode_prompts(p)[0] for p in prompts]
    if max(batches) > len(ids):
        raise ValueError(f"--scaling up to {max(batches)} rows needs as many prompts (--num-prompts), got {len(ids)}")
    for b in batches:   # warm-up: workspace and cache sizes of every batch
        rt.generate(ids[:b], **options)
    per = {b: [] for b in batches}
    nfe = {}
    for _ in range(repeat):
        for b in batches:
            t0 = _time.perf_counter()
            res = rt.generate(ids[:b], **options)
            per[b].append((_time.perf_counter() - t0) / res.nfe)
            nfe[b] = res.nfe
    ms1 = 1e3 * statistics.median(per[batches[0]]) / batches[0]
    rows = []
    log(f"# ms per step by rows in the step, options {options}, median of {repeat}")
    log(f"{'rows':>5}{'NFE':>6}{'ms/step':>10}{'ms/step/row':>13}{'gain bound':>12}")
    for b in batches:
        ms = 1e3 * statistics.median(per[b])
        row = dict(rows=b, nfe=nfe[b], ms_per_step=ms, ms_per_row_step=ms / b, gain_bound=b * ms1 / ms)
        rows.append(row)
        log(f"{b:>5}{nfe[b]:>6}{ms:>10.2f}{ms / b:>13.2f}{row['gain_bound']:>11.2f}x")
    if breakdown:
        log("# one more call per row count, its kernels timed: ms per step in each compiled kernel and outside them")
        names = None
        for row in rows:
            b = row["rows"]
            with KernelClock() as clock:
                t0 = _time.perf_counter()
                res = rt.generate(ids[:b], **options)
                wall = _time.perf_counter() - t0
            kernels = {k: 1e3 * v / res.nfe for k, v in sorted(clock.seconds.items(), key=lambda kv: -kv[1])}
            names = names or list(kernels)[:6]
            row["breakdown"] = dict(ms_per_step=1e3 * wall / res.nfe, kernels_ms=kernels,
                                    kernel_calls_per_step={k: n / res.nfe for k, n in clock.calls.items()},
                                    host_ms=1e3 * wall / res.nfe - sum(kernels.values()))
        short = [n.removesuffix("_cpu").removesuffix("_cuda") for n in names]
        log(f"{'rows':>5}{'ms/step':>10}{'kernels':>9}{'host':>8}" + "".join(f"{n:>11}" for n in short))
        for row in rows:
            bd = row["breakdown"]
            log(f"{row['rows']:>5}{bd['ms_per_step']:>10.2f}{sum(bd['kernels_ms'].values()):>9.2f}{bd['host_ms']:>8.2f}"
                + "".join(f"{bd['kernels_ms'].get(n, 0.0):>11.3f}" for n in names))
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            d = last["rows"] - first["rows"]
            per_row = {k: (last["breakdown"]["kernels_ms"].get(k, 0.0) - first["breakdown"]["kernels_ms"].get(k, 0.0))
                       / d for k in last["breakdown"]["kernels_ms"]}
            host = (last["breakdown"]["host_ms"] - first["breakdown"]["host_ms"]) / d
            kern = sum(per_row.values())
            log(f"each further row adds {kern + host:.3f} ms per step: kernels {kern:.3f} "
                f"({', '.join(f'{k} {v:.3f}' for k, v in per_row.items() if v >= 0.005)}), host {host:.3f}")
    return {"options": options, "scaling": rows}


def header(env: dict) -> str:
    lines = ["# " + "  ".join(f"{k}={v}" for k, v in env.items())]
    lines.append(f"{'mode':<18}{'tok/s':>9}{'NFE':>7}{'tok/fwd':>9}{'ms/step':>9}{'refresh ms':>12}{'step ms':>9}"
                 f"{'peak MiB':>10}{'speedup':>9}")
    return "\n".join(lines)


def format_row(r: ModeResult, base: ModeResult) -> str:
    n_steps = max(r.nfe - r.refresh_count, 0)
    refresh_ms = 1e3 * r.refresh_s / max(r.refresh_count, 1)
    step_ms = 1e3 * r.step_s / n_steps if n_steps else float("nan")
    peak = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes is not None else "n/a"
    return (f"{r.name:<18}{r.tokens_per_s:>9.1f}{r.nfe:>7}{r.tokens_per_forward:>9.2f}{r.ms_per_step:>9.2f}"
            f"{refresh_ms:>12.2f}{step_ms:>9.2f}{peak:>10}{base.median_s / r.median_s:>8.2f}x")


USAGE = """End-to-end generation benchmark: exact mode and every fast mode in one process, on the same prompts.

Prints a header (device, torch, dtype, settings) and one row per mode: tokens/s (answer tokens before EOS per
second), NFE, tokens committed per forward, ms per step, ms per refresh and per cached step, peak memory and the
speedup over exact mode; writes the same as JSON.

    python bench/bench_generate.py                                  # the shipped model, held-out task prompts
    python bench/bench_generate.py --random --prompt-len 43 --gen-length 128 --block-length 32 --steps 128
    python bench/bench_generate.py --model /models/LLaDA-8B-Instruct --prompts prompts.txt --device cuda
"""

EXAMPLE_PROMPTS = ["Reverse the string: qwxk", "Sort the list: 5 2 9 2", "What is 347 + 85?",
                   "What is the capital of France?", "Which country has the capital Lima?"]


def example_prompts(n: int) -> list[str]:
    return [EXAMPLE_PROMPTS[i % len(EXAMPLE_PROMPTS)] for i in range(n)]


def random_checkpoint(spec: str, directory: Path) -> Path:
    """LLaDA-8B's vocabulary and special ids with a scaled-down body, random fp32 weights (e.g. d_model=512,...)."""
    from .testing import VOCAB, write_checkpoint
    body = dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, mlp_hidden_size=1536, max_sequence_length=4096)
    for item in filter(None, spec.split(",")):
        k, v = item.split("=")
        body[k] = int(v)
    if "n_kv_heads" not in spec:
        body["n_kv_heads"] = body["n_heads"]
    return write_checkpoint(directory, seed=0, vocab=VOCAB, **body)


def main(argv=None, default_prompts=None, prog=None) -> int:
    """The bench_generate.py / `llada-rt bench` command line. default_prompts(n) gives the prompts when --prompts
    is not given (without --random)."""
    ap = argparse.ArgumentParser(prog=prog, description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--arrivals", type=int, default=None, metavar="N",
                    help="serve N requests arriving over time (Poisson) with the engine vs one after another")
    ap.add_argument("--rate", type=float, default=50.0, help="arrival rate per second with --arrivals")
    ap.add_argument("--mode", default="exact", help=f"with --arrivals or --scaling: the mode ({', '.join(MODE_OPTIONS)})")
    ap.add_argument("--seed", type=int, default=0, help="arrival schedule seed with --arrivals")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --arrivals: serve the schedule both ways this many times, alternating which goes first; "
                         "reports each round's ratio and the median")
    ap.add_argument("--scaling", default=None, metavar="B,B,...",
                    help="ms per step of one generate() call over 1..B prompts in --mode (e.g. 1,2,4,8)")
    ap.add_argument("--breakdown", action="store_true",
                    help="with --scaling: split each step into the compiled kernels and the host side (one more call "
                         "per row count)")
    ap.add_argument("--json", default="bench_generate.json", help="where to write the JSON (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.breakdown and args.scaling is None:
        ap.error("--breakdown splits the --scaling steps; give --scaling too (e.g. --scaling 1,8 --breakdown)")
    if args.arrivals is not None:
        args.num_prompts = args.arrivals
    batches = None
    if args.scaling is not None:
        try:
            batches = sorted({int(b) for b in args.scaling.split(",") if b.strip()})
        except ValueError:
            ap.error(f"--scaling takes a comma list of batch sizes, got {args.scaling!r}")
        if not batches or batches[0] < 1:
            ap.error(f"--scaling batch sizes must be >= 1, got {args.scaling!r}")
        args.num_prompts = max(args.num_prompts, batches[-1])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODE_OPTIONS]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {', '.join(MODE_OPTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(args.random, Path(tmp)) if args.random is not None else args.model
        from .runtime import Runtime
        rt = Runtime(path, device=args.device, dtype=args.dtype)
        if args.prompts:
            prompts = [l.rstrip("\n") for l in open(args.prompts) if l.strip()][: args.num_prompts]
        elif args.random is not None:
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(0, 100, (args.prompt_len,), generator=g).tolist()
                       for _ in range(args.num_prompts)]
        else:
            prompts = (default_prompts or example_prompts)(args.num_prompts)
        gen = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                   early_stop=args.early_stop)
        if args.arrivals is not None or batches is not None:
            if args.mode not in MODE_OPTIONS:
                ap.error(f"unknown --mode {args.mode!r}; choose from {', '.join(MODE_OPTIONS)}")
            opts = {k: (args.threshold if v is True else v) for k, v in MODE_OPTIONS[args.mode].items()}
            opts.update({k: v for k, v in gen.items() if v is not None})
        if args.breakdown and rt.device.type != "cpu":
            ap.error(f"--breakdown times the kernels on the CPU; on {rt.device.type} a call returns before its kernel "
                     "runs, so use bench/profile.sh (nsys) or ncu there")
        if batches is not None:
            out = run_scaling(rt, prompts, opts, batches, repeat=args.repeat, breakdown=args.breakdown)
            out["env"] = environment(rt, dict(scaling=batches, mode=args.mode))
        elif args.arrivals is not None:
            out = run_arrivals_rounds(rt, [prompts[i % len(prompts)] for i in range(args.arrivals)], opts, args.rate,
                                      args.seed, rounds=args.rounds)
            out["env"] = environment(rt, dict(arrivals=args.arrivals, rate=args.rate, mode=args.mode,
                                              rounds=args.rounds))
        else:
            out = run_benchmark(rt, prompts, modes, gen, threshold=args.threshold, repeat=args.repeat,
                                warmup=args.warmup, cuda_graph=args.cuda_graph)
    out["command"] = " ".join([prog or sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


