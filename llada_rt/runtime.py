"""Runtime: load a LLaDA checkpoint once; generate, stream and chat through the engine it owns."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .config import GENERATION_CONFIG_FILE, load_config, load_generation_config
from .engine import Engine
from .generation_config import GenerationConfig, GenerationConfigError, check_defaults, make_config
from .parallel import TPError, check_divisible, init_tensor_parallel, tp_device, world_from_env
from .prompts import PromptError, check_messages, encode_prompts
from .request import Request, StepEvent
from .tokenizer import Tokenizer
from .weights import load_weights

SHIPPED_MODEL = Path(__file__).resolve().parent / "models" / "small"
MASK_GLYPH = "\u2591"   # how a still-masked position is shown in streamed text


@dataclasses.dataclass
class GenerationResult:
    texts: list[str]               # per prompt: the answer decoded up to the first EOS/EOT
    token_ids: list[list[int]]     # per prompt: the answer ids up to the first EOS/EOT
    canvas: torch.Tensor           # (B, T) prompts left-padded to the longest (P columns), then the answers
    prompt_len: int                # P, first generated column of the canvas
    nfe: int                       # forward passes: the most any prompt of the call took
    refreshes: int                 # of which over the whole canvas (all of them in exact mode), likewise
    steps: int                     # denoising steps, likewise
    tokens_committed: int          # generated positions committed by a step, summed over the batch
    timings: dict                  # seconds: total_s, refresh_s (full forwards), step_s (cached forwards), other_s
    config: GenerationConfig
    finished_at: dict = dataclasses.field(default_factory=dict)   # row -> its NFE when early stop ended it
    nfe_per_row: list[int] = dataclasses.field(default_factory=list)
    masked_left: list[int] = dataclasses.field(default_factory=list)   # per row: answer positions still masked
    graph_captures: int = 0        # CUDA graphs captured during this call (0 once every shape has been seen)
    dropped_turns: int = 0         # chat(): oldest turns left out to fit max_sequence_length

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def tokens_per_forward(self) -> float:
        """Positions committed per forward pass, per row."""
        return self.tokens_committed / max(sum(self.nfe_per_row) or self.nfe, 1)

    @property
    def answer_tokens(self) -> int:
        """Answer tokens up to the first EOS/EOT, summed over the batch (Fast-dLLM's throughput numerator)."""
        return sum(len(t) for t in self.token_ids)


class StreamEvent:
    """One denoising step of a stream() call; text is rendered only on access. `rows` are the prompts (indices into
    the call's batch) this step advanced; positions/tokens/canvas_text are per row of `rows`."""

    def __init__(self, step: int, rows: list[int], events: list[StepEvent], tokenizer: Tokenizer, mask_id: int):
        self.step = self.nfe = step
        self.rows = rows
        self.refresh = any(e.refresh for e in events)
        self.finished = [b for b, e in zip(rows, events) if e.done and e.request.stopped_early]
        self._events, self._tok, self._mask = events, tokenizer, mask_id
        self.result: GenerationResult | None = None   # set on the last event

    @property
    def positions(self) -> list[list[int]]:
        """Per row of `rows`: answer positions committed by this step."""
        return [e.positions for e in self._events]

    @property
    def tokens(self) -> list[list[int]]:
        """Per row of `rows`: the token ids committed at `positions`."""
        return [e.tokens for e in self._events]

    @property
    def canvas_text(self) -> list[str]:
        """Per row of `rows`: the answer so far, each mask shown as MASK_GLYPH, cut before the first EOS/EOT."""
        return [render_canvas(e.canvas, self._tok, self._mask) for e in self._events]


def render_canvas(ids: list[int], tok: Tokenizer, mask_id: int) -> str:
    """Answer ids with masks shown as MASK_GLYPH, cut before the first EOS/EOT."""
    parts, run = [], []
    stops = set(tok.stop_ids)
    for t in ids:
        if t in stops:
            break
        if t == mask_id:
            if run:
                parts.append(tok.decode(run))
                run = []
            parts.append(MASK_GLYPH)
        else:
            run.append(t)
    if run:
        parts.append(tok.decode(run))
    return "".join(parts)


def stable_prefix(ids: list[int], tok: Tokenizer, mask_id: int) -> tuple[list[int], bool]:
    """The answer prefix whose every position is committed, cut before the first EOS/EOT, and whether it is final
    (a stop id is committed right after it: nothing after it can enter the text)."""
    out = []
    for t in ids:
        if t == mask_id:
            return out, False
        if t in tok.stop_ids:
            return out, True
        out.append(t)
    return out, True


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class Runtime:
    """A loaded LLaDA checkpoint and its engine. `Runtime()` loads the small model shipped inside the package.

    backend 'ops' runs the compiled kernels; 'torch' runs every op from reference.py (slow; for comparisons).
    max_rows caps the requests in flight at once (None: the engine grows as needed). check_finite: scan every weight
    for NaN/inf at load (skip it only for trusted checkpoints).

    tensor_parallel: None (default) shards the model over the torchrun world this process runs in, if any (each rank
    loads only its shard; NCCL on CUDA with GPU LOCAL_RANK, gloo on the CPU; every rank must make the same calls);
    False loads the whole model in every process; True requires a torchrun world of more than one process.
    """

    def __init__(self, path: str | Path | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, quantize: str | None = None, *, backend: str = "ops",
                 max_rows: int | None = None, check_finite: bool = True, tensor_parallel: bool | None = None):
        self.path = Path(path) if path is not None else SHIPPED_MODEL
        if not self.path.is_dir():
            where = "the shipped model" if path is None else "the checkpoint directory"
            raise FileNotFoundError(f"{self.path}: {where} does not exist; pass the path of a LLaDA checkpoint "
                                    "directory (config.json, model.safetensors[.index.json], tokenizer.json)")
        self.device = _default_device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
        world = world_from_env() if tensor_parallel is not False else None
        if tensor_parallel and world is None:
            raise TPError("tensor_parallel=True needs a torchrun world of more than one process; launch with "
                          "`torchrun --nproc-per-node N ...`")
        if world is not None:
            self.device = tp_device(self.device)
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self.dtype = dtype
        self.config = load_config(self.path)
        self.tp = None
        if world is not None:   # sizes first: a checkpoint that cannot split fails before any rendezvous
            check_divisible(self.config, world[1])
            self.tp = init_tensor_parallel(self.device)
        self.tokenizer = Tokenizer(self.path, mask_id=self.config.mask_token_id, eos_id=self.config.eos_token_id)
        # quantize "int8": every linear (LM head included) int8 with per-output-channel scales; an int8 checkpoint
        # (`llada-rt quantize`) loads as int8 without it
        self.weights = load_weights(self.path, self.config, self.device, dtype, quantize=quantize,
                                    check_finite=check_finite, tp=self.tp)
        self.generation_defaults = check_defaults(load_generation_config(self.path, vocab_size=self.config.vocab_size),
                                                  str(self.path / GENERATION_CONFIG_FILE))
        self.engine = Engine(self.config, self.weights, self.device, stop_ids=self.tokenizer.stop_ids,
                             eot_id=self.tokenizer.eot_id, backend=backend, max_rows=max_rows)

    def __repr__(self) -> str:
        c = self.config
        return (f"Runtime({str(self.path)!r}, device={self.device}, dtype={self.dtype}, layers={c.n_layers}, "
                f"d_model={c.d_model}, heads={c.n_heads})")

    # -- inputs --------------------------------------------------------------------------------------------------------
    def encode_prompts(self, prompt, chat: bool | None = None) -> list[list[int]]:
        """A prompt, a list of prompts, token ids or a batch of token ids -> list of id lists (prompts.encode_prompts:
        PromptError for anything else)."""
        return encode_prompts(prompt, self.tokenizer, vocab_size=self.config.embedding_size,
                              mask_id=self.config.mask_token_id, chat=chat)

    def make_config(self, options: dict) -> GenerationConfig:
        """GenerationConfig of `options` over the checkpoint's generation_config.json defaults."""
        return make_config(options, self.generation_defaults, str(self.path / GENERATION_CONFIG_FILE))

    # -- the step API --------------------------------------------------------------------------------------------------
    def add(self, prompt_ids, config: GenerationConfig | None = None, events: bool = False, **options) -> Request:
        """Adds one request (token ids, or a string encoded as generate() encodes it; a GenerationConfig or options)
        to the engine; it joins at the next `step()`. Returns its handle (a Request: .done, .answer, .take_events())."""
        if config is not None and options:
            raise GenerationConfigError("give either config or options, not both")
        if config is not None and not isinstance(config, GenerationConfig):
            raise GenerationConfigError(f"config must be a GenerationConfig, got {type(config).__name__}; pass the "
                                        "options as keywords instead")
        gc = config if config is not None else self.make_config(options)
        prompts = self.encode_prompts(prompt_ids)
        if len(prompts) != 1:
            raise PromptError(f"add() takes one prompt, got a batch of {len(prompts)}; add them one by one")
        self._validate(gc, len(prompts[0]))
        return self.engine.add(prompts[0], gc, events=events)

    def _validate(self, gc: GenerationConfig, prompt_len: int) -> None:
        gc.validate(prompt_len, self.config.max_sequence_length, self.device.type)
        if gc.cuda_graph and self.tp is not None:
            raise GenerationConfigError("cuda_graph=True is not supported under tensor parallelism (capturing the "
                                        "NCCL collectives of a step is unverified); drop cuda_graph")
        if gc.cuda_graph and self.engine.backend != "ops":
            raise GenerationConfigError("cuda_graph=True needs backend='ops' (reference.py ops read values back to the "
                                        "host and cannot be captured)")

    def step(self) -> list[StepEvent]:
        """Advances every request in flight by one denoising step (Engine.step)."""
        return self.engine.step()

    def cancel(self, request: Request) -> None:
        self.engine.cancel(request)

    # -- generation ----------------------------------------------------------------------------------------------------
    def _submit(self, prompt, chat, options, events: bool) -> tuple[list[Request], GenerationConfig]:
        gc = self.make_config(options)
        prompts = self.encode_prompts(prompt, chat)
        self._validate(gc, max(len(p) for p in prompts))
        reqs = []
        try:
            for p in prompts:
                reqs.append(self.engine.add(p, gc, events=events))
        except BaseException:
            for r in reqs:
                self.engine.cancel(r)
            raise
        return reqs, gc

    def stream(self, prompt, chat: bool | None = None, **options) -> Iterator[StreamEvent]:
        """Yields a StreamEvent after every denoising step; the last one carries the GenerationResult in `.result`.

        Same arguments as generate(). Each event's `canvas_text` shows the answers so far with masks visible. The
        caller's thread is never left in inference mode between events; other requests in the engine (other streams)
        advance too, and each request's tokens are what it gives alone.
        """
        t0 = time.perf_counter()
        mark = self._marks()
        reqs, gc = self._submit(prompt, chat, options, events=True)
        step = 0
        try:
            while True:
                if any(not r.pending and not r.done for r in reqs):
                    self.engine.step()
                rows, evs = [], []
                for b, r in enumerate(reqs):
                    if r.pending:
                        rows.append(b)
                        evs.append(r.pending.pop(0))
                finished = all(r.done and not r.pending for r in reqs)
                if not evs and not finished:
                    continue
                step += 1
                ev = StreamEvent(step, rows, evs, self.tokenizer, self.config.mask_token_id)
                if finished:
                    ev.result = self._result(reqs, gc, time.perf_counter() - t0, mark)
                    yield ev
                    return
                yield ev
        finally:
            for r in reqs:
                if not r.done:
                    self.engine.cancel(r)

    def generate(self, prompt, chat: bool | None = None, **options) -> GenerationResult:
        """Generate for a prompt (str), a batch (list of str), token ids (list of int) or a batch of token ids.

        Options are the fields of GenerationConfig (gen_length, block_length, steps, temperature, cfg_scale,
        remasking, logits_eos_inf, confidence_eos_eot_inf, seed, mode, threshold, factor, early_stop, cuda_graph) over
        the checkpoint's generation_config.json. chat: apply the chat template to string prompts (default: when the
        checkpoint has one, i.e. Instruct models). Each prompt of a batch is its own request in the engine and gives
        what it gives alone.
        """
        t0 = time.perf_counter()
        mark = self._marks()
        reqs, gc = self._submit(prompt, chat, options, events=False)
        try:
            while not all(r.done for r in reqs):
                self.engine.step()
        finally:
            for r in reqs:
                if not r.done:
                    self.engine.cancel(r)
        for r in reqs:
            r.pending.clear()
        return self._result(reqs, gc, time.perf_counter() - t0, mark)

    def chat(self, messages: list[dict], **options) -> GenerationResult:
        """The assistant's next turn for a conversation (a list of {'role', 'content'} dicts, the last one the user's),
        through the checkpoint's chat template. The history is carried as the official chat.py carries it: the whole
        conversation so far is the prompt (for answers this runtime generated, the template renders the same ids
        that chat.py keeps, the answer followed by its end-of-turn id). If the conversation no longer fits
        max_sequence_length with the answer, the oldest turns are left out (result.dropped_turns says how many)."""
        if not self.tokenizer.is_chat:
            raise GenerationConfigError(f"{self.path}: the checkpoint has no chat_template (a Base model); use "
                                        "generate() with plain text")
        check_messages(messages)
        gc = self.make_config(options)
        gc.validate(None, self.config.max_sequence_length, self.device.type)   # before gen_length is used below
        limit = self.config.max_sequence_length - gc.gen_length
        dropped = 0
        ids = self.tokenizer.encode_chat(messages)
        while len(ids) > limit:
            first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
            later = [i for i, m in enumerate(messages) if m.get("role") == "user" and i > first_user]
            if not later:
                raise GenerationConfigError(
                    f"the last message alone ({len(ids)} tokens) plus gen_length ({gc.gen_length}) does not fit "
                    f"max_sequence_length {self.config.max_sequence_length}; shorten it or lower gen_length")
            messages = [m for i, m in enumerate(messages) if i >= later[0] or m.get("role") == "system"]
            dropped += 1
            ids = self.tokenizer.encode_chat(messages)
        res = self.generate(ids, **options)
        res.dropped_turns = dropped
        return res

    # -- results -------------------------------------------------------------------------------------------------------
    def _marks(self) -> tuple:
        g = self.engine.graphs
        return self.engine.timer.seconds(), (g.captures if g is not None else 0)

    def _result(self, reqs: list[Request], gc: GenerationConfig, total_s: float, mark: tuple) -> GenerationResult:
        mask = self.config.mask_token_id
        P = max(r.prompt_len for r in reqs)
        pad = self.config.pad_token_id
        rows = [[pad] * (P - r.prompt_len) + r.prompt + (r.answer or [mask] * gc.gen_length) for r in reqs]
        answers = [r.answer or [mask] * gc.gen_length for r in reqs]
        ids = [self.tokenizer.cut_at_stop(a) for a in answers]
        committed = sum(sum(t != mask for t in a) - r.filled for a, r in zip(answers, reqs))
        before, captures0 = mark
        after = self.engine.timer.seconds()
        phase = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        # mixed_s: forwards where a refresh ran beside other requests' cached steps (requests added with add())
        timings = {"total_s": total_s, "refresh_s": phase.get("full", 0.0) + phase.get("refresh", 0.0),
                   "step_s": phase.get("step", 0.0), "mixed_s": phase.get("refresh+step", 0.0)}
        timings["other_s"] = total_s - timings["refresh_s"] - timings["step_s"] - timings["mixed_s"]
        g = self.engine.graphs
        return GenerationResult(
            texts=[self.tokenizer.decode(r) for r in ids], token_ids=ids,
            canvas=torch.tensor(rows, dtype=torch.int64), prompt_len=P,
            nfe=max(r.nfe for r in reqs), refreshes=max(r.refreshes for r in reqs), steps=max(r.nfe for r in reqs),
            tokens_committed=committed, timings=timings, config=gc,
            finished_at={b: r.nfe for b, r in enumerate(reqs) if r.stopped_early},
            nfe_per_row=[r.nfe for r in reqs],
            masked_left=[sum(t == mask for t in i) for i in ids],
            graph_captures=(g.captures if g is not None else 0) - captures0)

    # -- evaluation: thin wrappers over likelihood.py ------------------------------------------------------------------
    def _token_lists(self, items, chat: bool = False) -> list[list[int]]:
        """A text, token ids, or a list of either -> list of id lists (empty allowed; chat: the chat template)."""
        if isinstance(items, str) or (isinstance(items, Sequence) and all(isinstance(t, int) for t in items)
                                      and len(items) > 0):
            items = [items]
        if not isinstance(items, Sequence) or isinstance(items, str):
            raise ValueError(f"expected a string, token ids or a list of them, got {type(items).__name__}")
        enc = self.tokenizer.encode_chat if chat else self.tokenizer.encode
        return [enc(x) if isinstance(x, str) else [int(t) for t in x] for x in items]

    def log_likelihood(self, prompts, answers, mc_num: int = 128, batch_size: int = 16, cfg_scale: float = 0.0,
                       seed: int = 0, chat: bool = False, max_tokens: int | None = None, backend: str | None = None,
                       ties: str = "uniform"):
        """Monte Carlo estimate of LLaDA's bound on log p(answer | prompt) per pair, batched over pairs, and its
        standard error (llada_rt.likelihood; the official get_log_likelihood.py semantics). prompts and answers: texts
        or token ids, one prompt per answer (a single prompt is shared by every answer). Texts are encoded plainly;
        chat=True renders each prompt with the chat template first. ties="official" rounds the stratified mask counts
        as get_log_likelihood.py does (half to even, biased at ties; likelihood.mask_counts); the default rounds ties
        so that the estimate is unbiased. Returns a likelihood.LikelihoodResult."""
        from . import likelihood

        p, a = self._token_lists(prompts, chat), self._token_lists(answers)
        if len(p) == 1 and len(a) > 1:
            p = p * len(a)
        return likelihood.log_likelihood(self.config, self.weights, p, a, mc_num=mc_num, batch_size=batch_size,
                                         cfg_scale=cfg_scale, seed=seed,
                                         max_tokens=max_tokens,
                                         backend=backend or self.engine.backend, ties=ties)

    def log_likelihood_rolling(self, texts, window: int | None = None, context: int = 0, mc_num: int = 128,
                               batch_size: int = 16, seed: int = 0, max_tokens: int | None = None,
                               backend: str | None = None, ties: str = "uniform"):
        """Estimate of log p(text) per whole text: the text is cut into consecutive answer spans of window - context
        tokens (window: default max_sequence_length), each estimated given the `context` tokens before it, and the
        spans' estimates are summed (likelihood.rolling_windows). `.perplexities` is exp(-estimate / tokens).
        Returns a likelihood.RollingResult."""
        from . import likelihood

        return likelihood.log_likelihood_rolling(self.config, self.weights, self._token_lists(texts), window=window,
                                                 context=context, mc_num=mc_num, batch_size=batch_size, seed=seed,
                                                 max_tokens=max_tokens,
                                                 backend=backend or self.engine.backend, ties=ties)
