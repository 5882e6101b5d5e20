"""llada_rt as an lm-eval-harness model, registered as `llada_rt` (importing this module registers it; lm-eval has no
plugin discovery): batched Monte Carlo loglikelihood, loglikelihood_rolling (perplexity), batched generate_until with
every runtime option, and the checkpoint's chat template. `run_cli` is lm-eval's command line with this model and the
packaged local tasks (llada_rt/lm_eval_tasks) on the include path; `llada-rt eval` calls it.

    lm-eval ... --model llada_rt --model_args pretrained=DIR,mode=dual,threshold=0.9,mc_num=128 --batch_size auto
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from . import likelihood
from .generation_config import GenerationConfig
from .runtime import Runtime

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
NAME = "llada_rt"
_log = logging.getLogger(__name__)
_GENERATION_OPTIONS = {f.name for f in dataclasses.fields(GenerationConfig)}
_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature"}   # lm-eval gen_kwargs this model honours


def parse_batch_size(batch_size) -> int | None:
    """lm-eval's batch_size (an int, '8', 'auto' or 'auto:N') -> requests per runtime call, None for auto."""
    if isinstance(batch_size, str) and batch_size.strip().lower().split(":")[0] == "auto":
        return None
    try:
        n = int(batch_size)
    except (TypeError, ValueError):
        n = 0
    if n <= 0 or isinstance(batch_size, bool):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return n


def _pick_device(device) -> str | None:
    """lm-eval's CLI passes device='cuda:0' by default; on a machine without a GPU run on the CPU, and say so."""
    if device is None:
        return None
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        _log.warning("llada_rt: device %r was given but torch sees no CUDA GPU; running on the CPU", device)
        return "cpu"
    return device


@register_model(NAME)
class LLaDARuntimeLM(LM):
    """An lm-eval model over llada_rt.Runtime.

    model_args: pretrained (checkpoint directory; default the shipped small model), dtype, threads, mc_num (Monte
    Carlo rows per likelihood, default 128), mc_batch_size (rows per stratified group, default 32 as the official
    eval_llada.py, or mc_num when smaller), check_greedy (compute loglikelihood's is_greedy, default True; False
    returns False without computing it, as the official is_check_greedy=False), seed, max_tokens (tokens per
    likelihood forward), ties (how the stratified mask counts round a tie: uniform, the default, or official, as
    get_log_likelihood.py; see Runtime.log_likelihood), window and context (loglikelihood_rolling, see
    Runtime.log_likelihood_rolling), and every
    generation option of Runtime.generate (mode, threshold, factor, early_stop, block_length, steps, cfg_scale,
    remasking, ...); cfg_scale is used by loglikelihood too (the official `cfg`). generate_until's canvas is
    max_gen_toks tokens (rounded up to a multiple of block_length) unless gen_length is given; the answer is cut to
    max_gen_toks tokens, then at the first `until` string. batch_size: requests per runtime call ('auto': all the
    requests of a likelihood call at once, and as many prompts per generate call as fit max_tokens).
    """

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size=1, max_batch_size: int | None = None, mc_num: int = 128, mc_batch_size: int | None = None,
                 check_greedy: bool = True, seed: int = 0, max_tokens: int | None = None, window: int | None = None,
                 context: int = 0, threads: int | None = None, ties: str = "uniform", **options):
        super().__init__()
        unknown = sorted(set(options) - _GENERATION_OPTIONS)
        if unknown:
            raise ValueError(f"llada_rt: unknown model_args {', '.join(unknown)}; valid: pretrained, dtype, threads, "
                             "mc_num, mc_batch_size, check_greedy, seed, max_tokens, ties, window, context, and the "
                             f"generation options {', '.join(sorted(_GENERATION_OPTIONS))}")
        if threads:
            torch.set_num_threads(int(threads))
        self.rt = Runtime(pretrained, device=_pick_device(device), dtype=dtype)
        self._device = self.rt.device
        self.batch_size = parse_batch_size(batch_size)
        self.max_batch_size = int(max_batch_size) if max_batch_size else None
        self.mc_num, self.seed = int(mc_num), int(seed)
        self.mc_batch_size = int(mc_batch_size) if mc_batch_size else min(32, self.mc_num)
        self.check_greedy = bool(check_greedy)
        self.max_tokens = max_tokens
        self.window, self.context = window, int(context)
        likelihood.check_ties(ties)
        self.ties = ties
        self.options = dict(options)
        probe = {"gen_length": self.options.get("block_length", GenerationConfig.block_length), **self.options}
        self.rt.make_config(probe).validate()   # bad values fail here, not after the likelihood requests

    # -- identity, chat template -----------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return f"{NAME}:{self.rt.path}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.rt.tokenizer.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.rt.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    # -- helpers ---------------------------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self.rt.config.max_sequence_length

    def _encode_context(self, text: str) -> list[int]:
        """An empty context is the BOS token, as lm-eval's TemplateLM conditions on its prefix token."""
        ids = self.rt.tokenizer.encode(text) if text else []
        return ids or [self.rt.tokenizer.bos_id]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Trailing spaces of the context move to the continuation, and the continuation's ids are those of the whole
        text after the context's (lm-eval's TemplateLM convention, for tokenizers that merge a space into the next
        word). Unlike TemplateLM, trailing newlines stay in the context: a chat template's generation prompt ends in
        one, and it is part of the prompt, not of the answer to score. The context is cut from the left to fit."""
        n = len(context) - len(context.rstrip(" \t"))
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self._encode_context(context)
        whole = self.rt.tokenizer.encode(context + continuation)
        cont = whole[len(ctx):] if context and whole[:len(ctx)] == ctx else self.rt.tokenizer.encode(continuation)
        if len(cont) >= self.max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's max_sequence_length "
                             f"{self.max_length}")
        return ctx[-(self.max_length - len(cont)):], cont

    def _chunks(self, n: int, per_item_tokens: int) -> list[range]:
        size = self.batch_size
        if size is None:
            budget = self.max_tokens or 16384
            size = max(1, budget // max(per_item_tokens, 1))
            if self.max_batch_size:
                size = min(size, self.max_batch_size)
        return [range(i, min(i + size, n)) for i in range(0, n, size)]

    # -- the three request types -------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args) for r in requests]
        out: list[tuple[float, bool]] = []
        # auto: one call; the likelihood packs the rows of all pairs into forwards of max_tokens itself
        chunks = [range(len(pairs))] if self.batch_size is None else self._chunks(len(pairs), per_item_tokens=1)
        bar = tqdm(total=len(pairs), desc="llada_rt loglikelihood", disable=disable_tqdm)
        for idx in chunks:
            ctx, cont = [pairs[i][0] for i in idx], [pairs[i][1] for i in idx]
            res = self.rt.log_likelihood(ctx, cont, mc_num=self.mc_num, batch_size=self.mc_batch_size,
                                         cfg_scale=float(self.options.get("cfg_scale", 0.0)), seed=self.seed,
                                         max_tokens=self.max_tokens, ties=self.ties)
            greedy = self._greedy(ctx, cont) if self.check_greedy else [False] * len(idx)
            for i, ll, g in zip(idx, res.estimates, greedy):
                out.append((ll, g))
                self.cache_hook.add_partial("loglikelihood", requests[i].args, (ll, g))
            bar.update(len(idx))
        bar.close()
        return out

    def _greedy(self, prompts: list[list[int]], answers: list[list[int]]) -> list[bool]:
        """Whether greedy decoding from the prompt gives the answer: Runtime.generate in exact mode with one token
        per step over a canvas of the answer's length (the official suffix_greedy_prediction), batched by length."""
        out = [False] * len(prompts)
        by_len: dict[int, list[int]] = {}
        for i, a in enumerate(answers):
            if a:
                by_len.setdefault(len(a), []).append(i)
            else:
                out[i] = True
        cfg_scale = float(self.options.get("cfg_scale", 0.0))
        for L, idx in by_len.items():
            for part in self._chunks(len(idx), per_item_tokens=L + max(len(prompts[i]) for i in idx)):
                rows = [idx[j] for j in part]
                res = self.rt.generate([prompts[i] for i in rows], chat=False, gen_length=L, block_length=L, steps=L,
                                       cfg_scale=cfg_scale)
                gen = res.canvas[:, res.prompt_len:].tolist()
                for i, g in zip(rows, gen):
                    out[i] = g == answers[i]
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [self.rt.tokenizer.encode(r.args[0]) for r in requests]
        res = self.rt.log_likelihood_rolling(texts, window=self.window, context=self.context, mc_num=self.mc_num,
                                             batch_size=self.mc_batch_size, seed=self.seed,
                                             max_tokens=self.max_tokens, ties=self.ties)
        for r, ll in zip(requests, res.estimates):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, ll)
        return list(res.estimates)

    def _generation_options(self, gen_kwargs: dict) -> tuple[dict, list[str], int]:
        """(Runtime.generate options, stop strings, max_gen_toks) for one request's gen_kwargs."""
        unknown = sorted(set(gen_kwargs) - _GEN_KWARGS)
        if unknown:
            raise ValueError(f"llada_rt generate_until: unsupported gen_kwargs {', '.join(unknown)}; supported: "
                             f"{', '.join(sorted(_GEN_KWARGS))} (runtime options go in model_args)")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        opts = dict(self.options)
        max_toks = int(gen_kwargs.get("max_gen_toks", opts.get("gen_length", 256)))
        if "do_sample" in gen_kwargs or "temperature" in gen_kwargs:   # do_sample false is greedy, as in HF
            sample = gen_kwargs.get("do_sample", float(gen_kwargs.get("temperature") or 0) > 0)
            opts["temperature"] = float(gen_kwargs.get("temperature") or 1.0) if sample else 0.0
        if "gen_length" not in opts:
            block = min(opts.get("block_length", GenerationConfig.block_length), max_toks)
            opts["block_length"] = block
            opts["gen_length"] = -(-max_toks // block) * block
        return opts, until, max_toks

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, r in enumerate(requests):
            context, gen_kwargs = r.args
            opts, until, max_toks = self._generation_options(dict(gen_kwargs or {}))
            settings.append((opts, until, max_toks))
            groups.setdefault((tuple(sorted(opts.items())), max_toks), []).append(i)
        bar = tqdm(total=len(requests), desc="llada_rt generate_until", disable=disable_tqdm)
        for (_, max_toks), idx in groups.items():
            opts = settings[idx[0]][0]
            room = self.max_length - opts["gen_length"]
            if room <= 0:
                raise ValueError(f"gen_length {opts['gen_length']} leaves no room for a prompt within the model's "
                                 f"max_sequence_length {self.max_length}; lower max_gen_toks or gen_length")
            prompts = {i: self._encode_context(requests[i].args[0])[-room:] for i in idx}
            idx = sorted(idx, key=lambda i: len(prompts[i]))                 # similar lengths share a batch
            for part in self._chunks(len(idx), per_item_tokens=opts["gen_length"] + len(prompts[idx[-1]])):
                rows = [idx[j] for j in part]
                res = self.rt.generate([prompts[i] for i in rows], chat=False, **opts)
                for i, ids in zip(rows, res.token_ids):
                    text = self.rt.tokenizer.decode(ids[:max_toks])
                    for stop in settings[i][1]:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(rows))
        bar.close()
        return out


def run_cli(argv: list[str], model: str | None = None, device: str | None = None, dtype: str | None = None,
            threads: int | None = None) -> int:
    """lm-eval's `run` command with model llada_rt and llada_rt's local tasks on the include path; argv are lm-eval's
    options (--tasks, --model_args, --limit, --apply_chat_template, ...). batch_size defaults to auto."""
    from lm_eval.__main__ import cli_evaluate

    args = ["run", "--model", NAME, "--include_path", str(TASKS_DIR)]
    extra = {"pretrained": model, "dtype": dtype, "threads": threads}
    pairs = [f"{k}={v}" for k, v in extra.items() if v is not None]
    if pairs:
        args += ["--model_args", ",".join(pairs)]
    if not any(a == "--batch_size" or a.startswith("--batch_size=") for a in argv):
        args += ["--batch_size", "auto"]
    if device is not None:
        args += ["--device", device]
    saved = sys.argv
    sys.argv = ["lm-eval", *args, *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
