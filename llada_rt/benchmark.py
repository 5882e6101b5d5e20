"""Generation benchmark core (bench/bench_generate.py and `llada-rt bench`): every mode on the same prompts, one process."""
from __future__ import annotations

import dataclasses
import platform
import resource
import statistics
import subprocess
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
