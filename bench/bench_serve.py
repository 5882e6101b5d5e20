"""Server benchmark: the same chat requests sent by N concurrent openai-client streams and one at a time, against one
`llada-rt serve` (started here as a subprocess on a loopback port, or --url for a running server). Rounds alternate
the two (one at a time first) so that both see the same machine; per round and as medians: requests/s and output
tokens/s over the round's span, time to first stable text and latency p50/p99, whether both gave the same texts;
JSON.

    python bench/bench_serve.py                                   # shipped model, 8 clients, 32 requests, 3 rounds
    python bench/bench_serve.py --clients 16 --requests 64 --mode dual --threshold 0.9
    python bench/bench_serve.py --url http://127.0.0.1:8000 --model-name LLaDA-8B-Instruct --clients 8
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one_request(client, model: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    """One streamed chat request: its text, completion tokens, time to first stable text and latency (seconds)."""
    t0 = time.perf_counter()
    first, parts, tokens = None, [], None
    for ch in client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=max_tokens, stream=True,
                                             stream_options={"include_usage": True}, extra_body=extra):
        if ch.usage is not None:
            tokens = ch.usage.completion_tokens
        for c in ch.choices:
            if c.delta.content and first is None:
                first = time.perf_counter() - t0
            parts.append(c.delta.content or "")
    latency = time.perf_counter() - t0
    return {"text": "".join(parts), "tokens": tokens, "ttft_s": latency if first is None else first,
            "latency_s": latency}


def run_round(base_url: str, model: str, prompts: list[str], clients: int, max_tokens: int, extra: dict) -> dict:
    """All prompts through `clients` closed-loop clients (each sends its next request when the last is answered)."""
    import openai

    pool_clients = [openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=3600)
                    for _ in range(clients)]
    todo = list(enumerate(prompts))
    lock = threading.Lock()
    out: list[dict | None] = [None] * len(prompts)

    def worker(c):
        while True:
            with lock:
                if not todo:
                    return
                i, p = todo.pop(0)
            out[i] = one_request(pool_clients[c], model, p, max_tokens, extra)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        for f in [ex.submit(worker, c) for c in range(clients)]:
            f.result()
    span = time.perf_counter() - t0
    from llada_rt.benchmark import _percentile

    lat, ttft = [r["latency_s"] for r in out], [r["ttft_s"] for r in out]
    tokens = sum(r["tokens"] for r in out)
    return {"clients": clients, "requests": len(prompts), "span_s": span, "requests_per_s": len(prompts) / span,
            "output_tokens": tokens, "output_tokens_per_s": tokens / span,
            "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
            "latency_p50_s": _percentile(lat, 50), "latency_p99_s": _percentile(lat, 99),
            "texts": [r["text"] for r in out]}


def engine_counters(base_url: str) -> dict | None:
    """The server's engine step series (llada_rt_engine_step_seconds / _rows sums and counts) from /metrics, or None
    when the server has none (another server, or an older llada_rt)."""
    import re
    import urllib.request

    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for key, name in (("steps", "llada_rt_engine_step_seconds_count"), ("seconds", "llada_rt_engine_step_seconds_sum"),
                      ("rows", "llada_rt_engine_step_rows_sum")):
        m = re.search("^" + re.escape(name) + r" (\S+)$", text, re.M)
        if m is None:
            return None
        out[key] = float(m.group(1))
    return out


def engine_share(before: dict | None, after: dict | None) -> dict:
    """ms per engine step and rows per step between two engine_counters readings (empty when unknown)."""
    if before is None or after is None or after["steps"] <= before["steps"]:
        return {}
    n = after["steps"] - before["steps"]
    return {"engine_steps": n, "engine_ms_per_step": 1e3 * (after["seconds"] - before["seconds"]) / n,
            "engine_rows_per_step": (after["rows"] - before["rows"]) / n}


@contextlib.contextmanager
def local_server(args):
    """`llada-rt serve` in a subprocess on a free loopback port (its own process, so that the clients here do not
    share its interpreter lock); yields (base_url, model name, environment). SIGTERM at the end."""
    import openai
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llada_rt.cli", "serve", "--port", str(port), "--backend", args.backend,
           "--max-rows", str(args.max_rows), "--max-queue", str(args.max_queue), "--gen-length", str(args.max_tokens),
           "--log-level", "warning"]
    for flag, value in (("--model", args.model), ("--device", args.device), ("--dtype", args.dtype),
                        ("--threads", args.threads)):
        if value is not None:
            cmd += [flag, str(value)]
    proc = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=5)
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}: {' '.join(cmd)}")
            try:
                name = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                if time.monotonic() - t0 > 300:
                    raise RuntimeError("the server did not come up in 300 s") from None
                time.sleep(0.2)
        info = {"server": " ".join(cmd[1:]), "torch": torch.__version__}
        yield base, name, info
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/bench_serve.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running llada-rt serve (default: start one here)")
    ap.add_argument("--model-name", help="with --url: the served model id (default: the first of /v1/models)")
    ap.add_argument("--model", help="checkpoint directory for the server started here (default: the shipped model)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--backend", default="ops", choices=["ops", "torch"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of the server started here "
                                                               "(default: torch's)")
    ap.add_argument("--max-rows", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--clients", type=int, default=8, help="concurrent streams")
    ap.add_argument("--requests", type=int, default=32, help="requests per round (the same for both ways)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each: one at a time, then concurrent")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", help="file with one prompt per line (default: held-out task prompts)")
    for name, kind in (("block_length", int), ("steps", int), ("mode", str), ("threshold", float),
                       ("factor", float), ("temperature", float)):
        ap.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                        help=f"{name} of every request (default: the server's)")
    ap.add_argument("--early-stop", action="store_true", help="early_stop=true in every request")
    ap.add_argument("--json", default=str(HERE / "out" / "bench_serve.json"), help="where to write the results")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.rounds < 1:
        ap.error("--clients, --requests and --rounds must be >= 1")
    if args.prompts:
        lines = [s for s in Path(args.prompts).read_text().splitlines() if s.strip()]
        prompts = [lines[i % len(lines)] for i in range(args.requests)]
    else:
        sys.path.insert(0, str(HERE))
        from bench_generate import task_prompts
        prompts = task_prompts(args.requests)
    extra = {k: getattr(args, k) for k in ("block_length", "steps", "mode", "threshold", "factor")
             if getattr(args, k) is not None}
    if args.early_stop:
        extra["early_stop"] = True
    if args.temperature is not None:
        extra["temperature"] = args.temperature

    with contextlib.ExitStack() as stack:
        if args.url:
            import openai
            base = args.url.rstrip("/")
            name = args.model_name or openai.OpenAI(base_url=base + "/v1", api_key="unused").models.list().data[0].id
            info = {"url": base}
        else:
            base, name, info = stack.enter_context(local_server(args))
        info |= {"clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens, "options": extra}
        print("# " + "  ".join(f"{k}={v}" for k, v in info.items()), flush=True)
        run_round(base, name, prompts[:min(4, len(prompts))], min(args.clients, 4), args.max_tokens, extra)  # warm-up
        print(f"{'round':<6}{'serving':<14}{'req/s':>8}{'out tok/s':>11}{'ttft p50':>10}{'ttft p99':>10}"
              f"{'lat p50':>9}{'lat p99':>9}{'span s':>8}{'ms/step':>9}{'rows/step':>10}", flush=True)
        rounds = []
        for r in range(args.rounds):
            pair = {}
            for label, clients in (("one at a time", 1), (f"{args.clients} clients", args.clients)):
                before = engine_counters(base)
                res = run_round(base, name, prompts, clients, args.max_tokens, extra)
                res |= engine_share(before, engine_counters(base))   # the server's own step timing
                pair["sequential" if clients == 1 else "concurrent"] = res
                eng = f"{res['engine_ms_per_step']:>9.2f}{res['engine_rows_per_step']:>10.2f}" if "engine_steps" in res \
                    else f"{'-':>9}{'-':>10}"
                print(f"{r:<6}{label:<14}{res['requests_per_s']:>8.2f}{res['output_tokens_per_s']:>11.1f}"
                      f"{res['ttft_p50_s']:>10.3f}{res['ttft_p99_s']:>10.3f}{res['latency_p50_s']:>9.3f}"
                      f"{res['latency_p99_s']:>9.3f}{res['span_s']:>8.2f}{eng}", flush=True)
            pair["speedup"] = pair["concurrent"]["requests_per_s"] / pair["sequential"]["requests_per_s"]
            pair["identical"] = pair["concurrent"]["texts"] == pair["sequential"]["texts"]
            rounds.append(pair)
    speedups = [p["speedup"] for p in rounds]
    summary = {"speedup_median": statistics.median(speedups), "speedups": speedups,
               "identical": all(p["identical"] for p in rounds),
               **{f"{way}_{k}_median": statistics.median(p[way][k] for p in rounds)
                  for way in ("sequential", "concurrent")
                  for k in ("requests_per_s", "output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "latency_p50_s",
                            "latency_p99_s")}}
    print(f"{args.clients} clients / one at a time: {summary['speedup_median']:.2f}x requests/s (median of "
          f"{len(rounds)} rounds: {', '.join(f'{s:.2f}' for s in speedups)}); concurrent latency p99 "
          f"{summary['concurrent_latency_p99_s_median']:.3f} s; identical texts: {summary['identical']}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": info, "summary": summary, "rounds": rounds}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
