"""Log-likelihood pairs per second: llada_rt's batched Monte Carlo estimator against the official one-request-at-a-time
loop, and the lm-eval wall time of llada_rt's local tasks per runtime mode.

    python bench/bench_likelihood.py                         # 32 pairs, mc_num 128, batch 16 (get_log_likelihood.py)
    python bench/bench_likelihood.py --lm-eval               # ... then the local lm-eval tasks per mode
    python bench/bench_likelihood.py --lm-eval --write       # ... and the tables into bench/RESULTS.md

The official loop is reimplemented here from ML-GSAI get_log_likelihood.py's algorithm (LLADA.md 3.2), independently
of llada_rt.likelihood: per pair, mc_num // batch_size forwards of batch_size copies of prompt + answer, mask counts
round(linspace(k, ...)), a randperm per row, full logits, cross-entropy / p_mask. Both run the same checkpoint through
the same model code (llada_rt.model), with the same mc_num, batch_size and cfg_scale; what differs is the batching
(many pairs per forward, each distinct mask once) and that llada_rt.likelihood runs its last layer on the answer
columns only and its MLP and LM head on the masked positions only (the official loop computes every logit). The pairs
are held-out prompts of the task suite (chat template) with their reference answers. "Same estimate distribution":
per pair z = (batched - official) / sqrt(se_b^2 + se_o^2), which is ~N(0, 1) when both estimate the same value. It is
reported for the batched estimator with ties="official" (the official mask counts, so the same distribution) and
with the default ties (which removes the official rounding's bias at ties, so z grows where the errors are small).
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llada_rt import likelihood

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import tasks  # noqa: E402
from eval_tasks import RESULTS, write_results  # noqa: E402

BEGIN, END = "<!-- likelihood:begin -->", "<!-- likelihood:end -->"
# lm-eval rows: each mode of the runtime, and Fast-dLLM's parallel rule on the dual cache (LLADA.md 4)
LM_EVAL_MODES = [("exact", {}), ("prefix", {"mode": "prefix"}), ("dual", {"mode": "dual"}),
                 ("dual threshold=0.9", {"mode": "dual", "threshold": 0.9})]


def official_log_likelihood(rt, prompt: list[int], answer: list[int], mc_num: int, batch_size: int,
                            cfg_scale: float, gen: torch.Generator) -> tuple[float, float]:
    """The official get_log_likelihood loop for one pair: (estimate, standard error over its mc_num // batch_size
    rounds)."""
    from llada_rt import model

    cfg, w = rt.config, rt.weights
    mask_id = cfg.mask_token_id
    P, L = len(prompt), len(answer)
    seq = torch.tensor(prompt + answer)[None].repeat(batch_size, 1)
    rounds = []
    for _ in range(mc_num // batch_size):
        k = torch.randint(1, L + 1, (), generator=gen)
        x = torch.round(torch.linspace(float(k), k + (batch_size - 1) * (L / batch_size), steps=batch_size)).long()
        x = ((x - 1) % L) + 1
        is_mask = torch.arange(L).repeat(batch_size, 1) < x[:, None]
        for i in range(batch_size):
            is_mask[i] = is_mask[i][torch.randperm(L, generator=gen)]
        is_mask = torch.cat([torch.zeros(batch_size, P, dtype=torch.bool), is_mask], 1)
        noisy = torch.where(is_mask, mask_id, seq)
        p_mask = (x / L)[:, None].repeat(1, P + L)
        dev = w.device
        if cfg_scale > 0:
            un = noisy.clone()
            un[:, :P] = mask_id
            logits = model.forward(cfg, w, torch.cat([noisy, un]).to(dev)).float()
            c, u = logits.chunk(2)
            logits = u + (cfg_scale + 1) * (c - u)
        else:
            logits = model.forward(cfg, w, noisy.to(dev)).float()
        m = is_mask.to(dev)
        loss = F.cross_entropy(logits[m], seq.to(dev)[m], reduction="none") / p_mask.to(dev)[m]
        rounds.append(loss.sum().item() / batch_size)
    est = -sum(rounds) / len(rounds)
    se = (torch.tensor(rounds, dtype=torch.float64).std().item() / math.sqrt(len(rounds))) if len(rounds) > 1 \
        else float("nan")
    return est, se


def bench_pairs(rt, n_pairs: int, mc_num: int, batch_size: int, cfg_scale: float, repeat: int) -> dict:
    examples = tasks.heldout_set()
    step = max(1, len(examples) // n_pairs)
    chosen = examples[::step][:n_pairs]
    prompts = [rt.tokenizer.encode_chat(e.prompt) for e in chosen]
    answers = [rt.tokenizer.encode(e.answer) for e in chosen]
    t_off, t_bat, t_tie, t_all = [], [], [], []
    for r in range(repeat):                      # interleaved, so that load changes hit both alike
        gen = torch.Generator().manual_seed(1234 + r)
        t0 = time.perf_counter()
        with torch.inference_mode():
            off = [official_log_likelihood(rt, p, a, mc_num, batch_size, cfg_scale, gen)
                   for p, a in zip(prompts, answers)]
        t_off.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bat = rt.log_likelihood(prompts, answers, mc_num=mc_num, batch_size=batch_size, cfg_scale=cfg_scale, seed=r)
        t_bat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()   # the official tie rounding: the official loop's estimate distribution exactly
        bat_off = rt.log_likelihood(prompts, answers, mc_num=mc_num, batch_size=batch_size, cfg_scale=cfg_scale,
                                    seed=r, ties="official")
        t_tie.append(time.perf_counter() - t0)
        # attribution: the same packed forwards with every drawn row run (no distinct-mask sharing)
        masks = [likelihood.draw_masks(len(a), mc_num, batch_size, torch.Generator().manual_seed(
            likelihood.pair_seed(r, p, a))) for p, a in zip(prompts, answers)]
        t0 = time.perf_counter()
        with torch.inference_mode():
            _, all_forwards, all_rows = likelihood.masked_log_likelihood(rt.config, rt.weights, prompts, answers,
                                                                         masks, cfg_scale, unique_masks=False)
        t_all.append(time.perf_counter() - t0)
        print(f"repeat {r}: official loop {t_off[-1]:.2f} s, batched {t_bat[-1]:.2f} s "
              f"({t_off[-1] / t_bat[-1]:.2f}x), batched with the official ties {t_tie[-1]:.2f} s "
              f"({t_off[-1] / t_tie[-1]:.2f}x), batched with every row run {t_all[-1]:.2f} s "
              f"({t_off[-1] / t_all[-1]:.2f}x)", flush=True)

    def zs(res):
        return [(b - o[0]) / math.sqrt(sb ** 2 + o[1] ** 2) for b, sb, o in zip(res.estimates, res.stderrs, off)
                if sb ** 2 + o[1] ** 2 > 0]

    def rms(z):
        return math.sqrt(sum(x * x for x in z) / len(z)) if z else float("nan")

    def within_3(z):
        return sum(abs(x) < 3 for x in z) / max(len(z), 1)

    z, z_tie = zs(bat), zs(bat_off)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "pairs": n_pairs, "mc_num": mc_num, "batch_size": batch_size, "cfg_scale": cfg_scale, "repeat": repeat,
        "answer_tokens": [len(a) for a in answers], "prompt_tokens": [len(p) for p in prompts],
        "official_s": med(t_off), "batched_s": med(t_bat), "ratios": [o / b for o, b in zip(t_off, t_bat)],
        "official_ties_s": med(t_tie), "official_ties_forwards": bat_off.forwards, "official_ties_rows": bat_off.rows,
        "all_rows_s": med(t_all), "all_rows_forwards": all_forwards, "all_rows_run": all_rows,
        "official_forwards": n_pairs * (mc_num // batch_size), "batched_forwards": bat.forwards,
        "rows_drawn": n_pairs * mc_num, "rows_run": bat.rows,
        "mean_official": sum(o[0] for o in off) / n_pairs, "mean_batched": sum(bat.estimates) / n_pairs,
        "mean_official_ties": sum(bat_off.estimates) / n_pairs,
        "z": z, "z_rms": rms(z), "z_within_3": within_3(z), "z_zero_se": n_pairs - len(z),
        "z_ties": z_tie, "z_ties_rms": rms(z_tie), "z_ties_within_3": within_3(z_tie),
    }


def bench_lm_eval(model: str | None, device: str | None, dtype: str | None, threads: int, limit, mc_num: int) -> list:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llada_rt.lm_eval_model import TASKS_DIR, LLaDARuntimeLM

    rows = []
    runs = [(label, ["llada_rt_heldout"], opts) for label, opts in LM_EVAL_MODES]
    runs.append(("any (likelihood)", ["llada_rt_capitals"], {}))
    for label, task_names, opts in runs:
        lm = LLaDARuntimeLM(pretrained=model, device=device, dtype=dtype, batch_size="auto", mc_num=mc_num,
                            threads=threads, **opts)
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=task_names, limit=limit, apply_chat_template=True,
                                      task_manager=TaskManager(include_path=str(TASKS_DIR)), log_samples=False,
                                      bootstrap_iters=0)
        wall = time.perf_counter() - t0
        r = res["results"]
        if task_names == ["llada_rt_heldout"]:
            per = {t: r[f"llada_rt_heldout_{t}"]["exact_match,none"] for t in tasks.TASKS}
            score = {"overall": r["llada_rt_heldout"]["exact_match,none"], **per}
        else:
            score = {"acc": r["llada_rt_capitals"]["acc,none"], "acc_norm": r["llada_rt_capitals"]["acc_norm,none"]}
        n = sum(res["n-samples"][t]["effective"] for t in res["n-samples"])
        rows.append((label, task_names[0], score, wall, n))
        print(f"{label:20s} {task_names[0]:18s} {score} {wall:.1f} s ({n} docs)", flush=True)
    return rows


def markdown(r: dict, lm_rows: list | None, cmd: str, rt) -> str:
    device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    A, Pt = r["answer_tokens"], r["prompt_tokens"]
    lines = [
        "## Log-likelihood: batched estimator against the official loop; lm-eval on the local tasks",
        "",
        f"{datetime.date.today().isoformat()}, commit {commit}, {device}, torch {torch.__version__}, dtype "
        f"{str(rt.dtype).replace('torch.', '')}, model {rt.path.name}. Command: `{cmd}`",
        "",
        f"{r['pairs']} (prompt, answer) pairs from the held-out set (prompts {min(Pt)}-{max(Pt)} tokens with the chat "
        f"template, answers {min(A)}-{max(A)} tokens), mc_num {r['mc_num']}, batch_size {r['batch_size']} (rows per "
        f"stratified group), cfg_scale {r['cfg_scale']:g}. The official loop is the reimplementation of "
        "get_log_likelihood.py in bench/bench_likelihood.py (one pair at a time, batch_size rows per forward, full "
        f"logits); the batched estimator is Runtime.log_likelihood on all pairs at once. Median of {r['repeat']} "
        "interleaved run(s).",
        "",
        "| estimator | forwards | sequences run | wall s | pairs / s | speedup |",
        "|---|---|---|---|---|---|",
        f"| official loop | {r['official_forwards']} | {r['rows_drawn']} | {r['official_s']:.2f} | "
        f"{r['pairs'] / r['official_s']:.2f} | 1.00x |",
        f"| llada_rt batched | {r['batched_forwards']} | {r['rows_run']} | {r['batched_s']:.2f} | "
        f"{r['pairs'] / r['batched_s']:.2f} | **{r['official_s'] / r['batched_s']:.2f}x** |",
        f"| llada_rt batched, ties=\"official\" | {r['official_ties_forwards']} | {r['official_ties_rows']} | "
        f"{r['official_ties_s']:.2f} | {r['pairs'] / r['official_ties_s']:.2f} | "
        f"{r['official_s'] / r['official_ties_s']:.2f}x |",
        f"| llada_rt batched, every drawn row run (attribution only) | {r['all_rows_forwards']} | "
        f"{r['all_rows_run']} | {r['all_rows_s']:.2f} | {r['pairs'] / r['all_rows_s']:.2f} | "
        f"{r['official_s'] / r['all_rows_s']:.2f}x |",
        "",
        f"Sequences run: the batched estimator draws the same {r['rows_drawn']} rows but runs each distinct mask of a "
        "pair once (short answers repeat masks; the estimate is unchanged); the attribution row runs the same packed "
        "forwards over every drawn row, i.e. the speedup of batching alone (its rows, like the forwards and rows "
        "of the ties=\"official\" row, are those of the last repeat). Estimate distributions, per pair z = "
        "difference from the official loop / combined standard error (~N(0, 1) when both estimate the same value): "
        f"with ties=\"official\" (the official mask counts) rms {r['z_ties_rms']:.2f} (1 expected), "
        f"{100 * r['z_ties_within_3']:.0f}% within 3; with the default ties (rounded up: unbiased, where the "
        "official half-to-even rounding is biased at ties, likelihood.mask_counts) rms "
        f"{r['z_rms']:.2f}, {100 * r['z_within_3']:.0f}% within 3, which exceeds 1 where a pair's standard errors are "
        "smaller than the official rounding's bias. Mean estimate "
        f"{r['mean_official']:.3f} (official), {r['mean_official_ties']:.3f} (batched, official ties), "
        f"{r['mean_batched']:.3f} (batched)"
        + (f"; {r['z_zero_se']} pair(s) with both standard errors 0 (one-token answers, exact estimates) left out"
           if r["z_zero_se"] else "") + ".",
    ]
    if lm_rows:
        lines += [
            "",
            "lm-eval 0.4 `simple_evaluate` with the `llada_rt` model (`--apply_chat_template`, batch_size auto, "
            "mc_num 128, is_greedy computed), llada_rt's local tasks, offline. The generation task's canvas is its "
            "max_gen_toks (32, one block); the multiple-choice task runs only log-likelihoods (and is_greedy in "
            "exact mode), so it does not depend on the mode and runs once.",
            "",
            "| mode | task | score | wall s | docs |",
            "|---|---|---|---|---|",
        ]
        for label, task, score, wall, n in lm_rows:
            text = ", ".join(f"{k} {100 * v:.1f}" for k, v in score.items())
            lines.append(f"| {label} | {task} | {text} | {wall:.1f} | {n} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--mc-num", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="rows per stratified group (official default 16)")
    ap.add_argument("--cfg-scale", type=float, default=0.0)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repetitions (the median is reported)")
    ap.add_argument("--lm-eval", action="store_true", help="also time lm-eval on the local tasks per mode")
    ap.add_argument("--limit", type=int, default=None, help="lm-eval --limit per task (default: every document)")
    ap.add_argument("--write", action="store_true", help="write the tables into bench/RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llada_rt import Runtime

    rt = Runtime(args.model, device=args.device, dtype=args.dtype)
    r = bench_pairs(rt, args.pairs, args.mc_num, args.batch_size, args.cfg_scale, args.repeat)
    lm_rows = bench_lm_eval(args.model, args.device, args.dtype, args.threads, args.limit, args.mc_num) \
        if args.lm_eval else None
    cmd = "python bench/bench_likelihood.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    md = markdown(r, lm_rows, cmd.strip(), rt)
    print()
    print(md)
    if args.write:
        write_results(md, BEGIN, END)
        print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
