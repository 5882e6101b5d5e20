"""The denoising loop: canvas, blocks, transfer schedule, remasking rules, KV caches, early stop, step events."""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import nvtx
import torch

from . import model, ops
from .cache import KVCache
from .config import LLaDAConfig
from .weights import ModelWeights

REMASKING = ("low_confidence", "random")
MODES = ("exact", "prefix", "dual")


class GenerationConfigError(ValueError):
    """Generation settings that cannot run (the message says which and what to change)."""


@dataclasses.dataclass
class GenerationConfig:
    """Options of Runtime.generate. Defaults: 128 tokens in blocks of 32, one token per step (steps = gen_length),
    the exact official sampler."""
    gen_length: int = 128
    block_length: int = 32
    steps: int | None = None            # total denoising steps over all blocks; None means gen_length
    temperature: float = 0.0            # Gumbel-max sampling temperature; 0 is greedy
    cfg_scale: float = 0.0              # classifier-free guidance: u + (s + 1)(c - u), unconditional = prompt masked
    remasking: str = "low_confidence"   # which masked positions to commit: 'low_confidence' or 'random'
    logits_eos_inf: bool = False        # EOS can never be predicted
    confidence_eos_eot_inf: bool = False  # EOS/EOT predictions get confidence 0 (committed last)
    seed: int = 0                       # Philox seed for temperature > 0 and random remasking
    mode: str = "exact"                 # 'exact' (full forward every step), 'prefix' or 'dual' (KV cache per block)
    threshold: float | None = None      # parallel decoding: commit every masked position with confidence >= threshold
    factor: float | None = None         # parallel decoding: Fast-dLLM's factor rule
    early_stop: bool = False            # stop once the text before the first EOS/EOT is fully committed
    cuda_graph: bool = False            # replay each block's step as a CUDA graph (CUDA, temperature 0 only)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def total_steps(self) -> int:
        return self.gen_length if self.steps is None else self.steps

    @property
    def parallel(self) -> bool:
        return self.threshold is not None or self.factor is not None

    def validate(self, prompt_len: int | None = None, max_sequence_length: int | None = None) -> None:
        def bad(msg):
            raise GenerationConfigError(msg)

        for name in ("gen_length", "block_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(f"{name} must be a positive integer, got {v!r}")
        if self.gen_length % self.block_length:
            bad(f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}; use a "
                f"block_length that divides it (e.g. {_divisor_hint(self.gen_length, self.block_length)})")
        steps = self.total_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            bad(f"steps must be a positive integer, got {self.steps!r}")
        if steps % self.num_blocks:
            bad(f"steps={steps} is not divisible by the number of blocks ({self.gen_length}/{self.block_length} = "
                f"{self.num_blocks}); steps is the total over all blocks, so use a multiple of {self.num_blocks}")
        if self.mode not in MODES:
            bad(f"mode={self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if self.remasking not in REMASKING:
            bad(f"remasking={self.remasking!r} is unknown; choose one of {', '.join(REMASKING)}")
        if not self.temperature >= 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not self.cfg_scale >= 0:
            bad(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.cfg_scale > 0 and self.mode != "exact":
            bad(f"cfg_scale > 0 runs only in mode='exact' (the KV cache modes do not guide), got mode={self.mode!r}")
        if self.threshold is not None and self.factor is not None:
            bad("give either threshold or factor, not both")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            bad(f"threshold must be in (0, 1], got {self.threshold}")
        if self.factor is not None and not self.factor > 0:
            bad(f"factor must be > 0, got {self.factor}")
        if self.parallel and self.remasking != "low_confidence":
            bad("threshold/factor decoding ranks by confidence; use remasking='low_confidence'")
        if self.cuda_graph and (self.temperature > 0 or self.remasking != "low_confidence"):
            bad("cuda_graph=True needs temperature=0 and remasking='low_confidence' (the RNG offset would be frozen "
                "into the graph)")
        if prompt_len is not None and max_sequence_length is not None and prompt_len + self.gen_length > \
                max_sequence_length:
            bad(f"prompt ({prompt_len} tokens) plus gen_length ({self.gen_length}) is {prompt_len + self.gen_length} "
                f"tokens, beyond the model's max_sequence_length of {max_sequence_length}; shorten the prompt or "
                "lower gen_length")


def _divisor_hint(n: int, near: int) -> int:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return min(divs, key=lambda d: abs(d - near))


def transfer_schedule(n_masked: int, steps: int) -> list[int]:
    """Tokens to commit at each of `steps` steps of a block with n_masked masks; earlier steps take the remainder."""
    base, rem = divmod(n_masked, steps)
    return [base + (1 if s < rem else 0) for s in range(steps)]


@dataclasses.dataclass
class Canvas:
    """The batch being denoised: left-padded prompts followed by gen_length masks."""
    tokens: torch.Tensor      # (B, T) int64
    positions: torch.Tensor   # (B, T) int64: index minus the row's padding (padded rows behave like the prompt alone)
    key_start: torch.Tensor   # (B,) int32: number of left-pad positions per row
    prompt_len: int           # P, the padded prompt length (first generated column)

    @classmethod
    def build(cls, prompts: list[list[int]], gen_length: int, mask_id: int, pad_id: int,
              device: torch.device) -> "Canvas":
        P = max(len(p) for p in prompts)
        B, T = len(prompts), P + gen_length
        tokens = torch.full((B, T), mask_id, dtype=torch.int64)
        pads = []
        for b, p in enumerate(prompts):
            pad = P - len(p)
            tokens[b, :pad] = pad_id
            tokens[b, pad:P] = torch.tensor(p, dtype=torch.int64)
            pads.append(pad)
        key_start = torch.tensor(pads, dtype=torch.int32)
        positions = (torch.arange(T)[None, :] - key_start[:, None].long()).clamp_(min=0)
        return cls(tokens.to(device), positions.to(device), key_start.to(device), P)

    def rows(self, idx: torch.Tensor) -> "Canvas":
        return Canvas(self.tokens[idx], self.positions[idx], self.key_start[idx], self.prompt_len)


class PhaseTimer:
    """Accumulates time per phase without syncing inside a step: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host_s: dict[str, float] = {}
        self.events: list[tuple[str, object, object]] = []

    def start(self, phase: str):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return phase, ev
        return phase, time.perf_counter()

    def stop(self, token) -> None:
        phase, t0 = token
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append((phase, t0, ev))
        else:
            self.host_s[phase] = self.host_s.get(phase, 0.0) + time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        out = dict(self.host_s)
        if self.events:
            self.events[-1][2].synchronize()
            for phase, a, b in self.events:
                out[phase] = out.get(phase, 0.0) + a.elapsed_time(b) / 1e3
        return out


@dataclasses.dataclass
class StepEvent:
    """One denoising step. Device tensors are read (and the device synced) only when a property is asked for."""
    step: int                 # steps so far in this call (1-based)
    nfe: int                  # forward passes so far
    block: int
    refresh: bool             # this step's forward refreshed the KV cache (or ran without one)
    rows: list[int]           # the batch rows this step ran for (finished rows drop out under early_stop)
    before: torch.Tensor      # (B_active, T) canvas before the step
    after: torch.Tensor       # (B_active, T) canvas after the step
    prompt_len: int
    mask_id: int
    finished: list[int] = dataclasses.field(default_factory=list)   # rows that stopped early after this step

    @property
    def committed_positions(self) -> list[list[int]]:
        """Per active row, the generated positions (0 = first generated token) committed by this step."""
        changed = (self.before != self.after)[:, self.prompt_len:].cpu()
        return [torch.nonzero(r).flatten().tolist() for r in changed]

    @property
    def committed_tokens(self) -> list[list[int]]:
        after = self.after[:, self.prompt_len:].cpu()
        return [after[i, pos].tolist() for i, pos in enumerate(self.committed_positions)]

    def canvas_ids(self) -> list[list[int]]:
        return self.after[:, self.prompt_len:].tolist()


class Decoder:
    """Runs the denoising loop for one batch; iterate it to advance step by step (each step yields a StepEvent)."""

    def __init__(self, cfg: LLaDAConfig, w: ModelWeights, gc: GenerationConfig, canvas: Canvas,
                 stop_ids: list[int], eot_id: int | None, backend: str = "ops"):
        self.cfg, self.w, self.gc, self.canvas, self.backend = cfg, w, gc, canvas, backend
        self.mask_id, self.eos_id = cfg.mask_token_id, cfg.eos_token_id
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.int64, device=canvas.tokens.device)
        self.nfe = 0
        self.refreshes = 0                     # forwards over the whole canvas (every forward in exact mode)
        self.steps_done = 0
        self.timer = PhaseTimer(canvas.tokens.device)
        self.suppress_ids = [self.eos_id] if gc.logits_eos_inf else []
        self.zero_conf_ids = [i for i in (self.eos_id, eot_id) if i is not None] if gc.confidence_eos_eot_inf else []
        self.rule = "topk" if not gc.parallel else ("threshold" if gc.threshold is not None else "factor")
        B, T = canvas.tokens.shape
        self.cache = KVCache(cfg, B, T, w.dtype, w.device) if gc.mode != "exact" else None
        self.active = list(range(B))          # rows of `canvas` still being denoised, in the order of the work batch
        self.finished_at: dict[int, int] = {}  # row -> nfe when it stopped early
        self._graphs: dict = {}
        self.filled = 0                        # masked positions filled with EOS by early stop (not committed by a step)

    # -- one step: device work only, no host sync (tests/test_fast_decoding.py enforces it) --------------------------
    def _forward(self, work: Canvas, refresh: bool, start: int, end: int) -> torch.Tensor:
        """Logits (B, N, V) of the block [start, end)."""
        gc, cfg = self.gc, self.cfg
        if self.cache is None or refresh:
            q0 = 0
        else:
            q0 = start
        q1 = work.tokens.shape[1] if (self.cache is None or refresh or gc.mode == "prefix") else end
        cache = self.cache.at(q0) if self.cache is not None else None
        tokens, positions = work.tokens[:, q0:q1], work.positions[:, q0:q1]
        rows = slice(start - q0, end - q0)
        if gc.cfg_scale > 0:
            uncond = tokens.clone()
            uncond[:, :work.prompt_len] = self.mask_id                          # prompt fully masked
            both = model.forward(cfg, self.w, torch.cat([tokens, uncond]), torch.cat([positions] * 2),
                                 torch.cat([work.key_start] * 2), rows=rows, backend=self.backend)
            cond, unc = both.chunk(2)
            return unc + (gc.cfg_scale + 1) * (cond - unc)
        return model.forward(cfg, self.w, tokens, positions, work.key_start, rows=rows, cache=cache,
                             backend=self.backend)

    def _step(self, work: Canvas, refresh: bool, start: int, end: int, k: torch.Tensor | None) -> None:
        """One forward, confidence and remask over the block [start, end) of work.tokens (mutated in place)."""
        gc = self.gc
        logits = self._forward(work, refresh, start, end)                         # (B, N, V)
        with nvtx.annotate("confidence"):
            masked = work.tokens[:, start:end] == self.mask_id                    # (B, N)
            token, prob = ops.confidence(
                logits, masked, temperature=gc.temperature, seed=gc.seed, offset=self.nfe + 1,
                random_confidence=gc.remasking == "random", suppress_ids=self.suppress_ids,
                zero_conf_ids=self.zero_conf_ids)
        with nvtx.annotate("remask"):
            ops.remask(work.tokens, token, prob, start=start, mask_id=self.mask_id, k=k, rule=self.rule,
                       threshold=gc.threshold if gc.threshold is not None else 0.9,
                       factor=gc.factor if gc.factor is not None else 1.0)

    def _graphed_step(self, work: Canvas, refresh: bool, start: int, end: int, k: torch.Tensor | None) -> None:
        """_step replayed from a CUDA graph captured once per (block, phase, batch); k is copied into a static buffer."""
        key = (start, refresh, work.tokens.shape[0], work.tokens.data_ptr())
        entry = self._graphs.get(key)
        if entry is None:
            k_static = k.clone() if k is not None else None
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):   # warm-up outside the graph on a scratch copy, so the canvas is untouched
                scratch = Canvas(work.tokens.clone(), work.positions, work.key_start, work.prompt_len)
                self._step(scratch, refresh, start, end, k_static)
            torch.cuda.current_stream().wait_stream(side)
            saved = work.tokens.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(work, refresh, start, end, k_static)
            work.tokens.copy_(saved)        # capture does not run the kernels, but keep the canvas exact regardless
            entry = self._graphs[key] = (graph, k_static)
        graph, k_static = entry
        if k is not None:
            k_static.copy_(k)
        graph.replay()

    # -- the loop ------------------------------------------------------------------------------------------------------
    def _done_rows(self, work: Canvas) -> torch.Tensor:
        """(B_active,) bool: the row holds a committed EOS/EOT and every position before the first one is committed."""
        gen = work.tokens[:, work.prompt_len:]                                     # (B, G)
        is_stop = torch.isin(gen, self.stop_ids)
        G = gen.shape[1]
        first = torch.where(is_stop.any(1), is_stop.int().argmax(1), torch.full_like(gen[:, 0], G))
        before = torch.arange(G, device=gen.device)[None, :] < first[:, None]
        return is_stop.any(1) & ~((gen == self.mask_id) & before).any(1)

    def _finalize(self, work: Canvas, done: list[bool]) -> None:
        """Writes rows that just finished into the canvas: everything after the first EOS/EOT becomes EOS."""
        P = work.prompt_len
        stops = set(self.stop_ids.tolist())
        for i, d in enumerate(done):
            row_id = self.active[i]
            if not d or row_id in self.finished_at:
                continue
            row = work.tokens[i].clone()
            self.filled += int((row == self.mask_id).sum())
            gen = row[P:].tolist()
            first = next(j for j, t in enumerate(gen) if t in stops)
            row[P + first + 1:] = self.eos_id
            self.canvas.tokens[row_id] = row
            self.finished_at[row_id] = self.nfe

    def _drop_finished(self, work: Canvas) -> Canvas:
        keep = [i for i, r in enumerate(self.active) if r not in self.finished_at]
        self.active = [self.active[i] for i in keep]
        return work.rows(torch.tensor(keep, dtype=torch.long, device=work.tokens.device))

    def __iter__(self) -> Iterator[StepEvent]:
        gc, canvas = self.gc, self.canvas
        dev = canvas.tokens.device
        spb = gc.total_steps // gc.num_blocks
        k_table = torch.tensor(transfer_schedule(gc.block_length, spb), dtype=torch.int64, device=dev)
        # rows still being denoised; under early_stop a copy, so that finished rows written into `canvas` stay final
        work = canvas.rows(torch.arange(canvas.tokens.shape[0], device=dev)) if gc.early_stop else canvas
        step_fn = self._graphed_step if (gc.cuda_graph and dev.type == "cuda") else self._step
        for blk in range(gc.num_blocks):
            if work.tokens.shape[0] == 0:
                break
            start = canvas.prompt_len + blk * gc.block_length
            end = start + gc.block_length
            i = 0
            while True:
                refresh = i == 0 or self.cache is None
                B = work.tokens.shape[0]
                k = None if gc.parallel else k_table[i].expand(B).contiguous()
                before = work.tokens.clone()
                t = self.timer.start("refresh" if refresh else "step")
                with nvtx.annotate("refresh" if refresh else "step"):
                    step_fn(work, refresh, start, end, k)
                self.timer.stop(t)
                self.nfe += 1
                self.refreshes += refresh
                self.steps_done += 1
                i += 1
                if gc.parallel:   # dynamic step count: one host read between steps (never inside one)
                    block_done = not bool((work.tokens[:, start:end] == self.mask_id).any())
                else:
                    block_done = i == spb
                event = StepEvent(step=self.steps_done, nfe=self.nfe, block=blk, refresh=refresh,
                                  rows=list(self.active), before=before, after=work.tokens.clone(),
                                  prompt_len=canvas.prompt_len, mask_id=self.mask_id)
                if gc.early_stop:   # one host read between steps
                    done = self._done_rows(work).tolist()
                    new = [self.active[j] for j, d in enumerate(done) if d and self.active[j] not in self.finished_at]
                    if new:
                        event.finished = new
                        self._finalize(work, done)
                    # without a cache a finished row leaves at once; with one, the cache rows stay aligned until the
                    # next refresh, so it keeps riding along (its result already final) until the block ends
                    if self.finished_at and (self.cache is None or block_done or all(done)):
                        work = self._drop_finished(work)
                yield event
                if block_done or work.tokens.shape[0] == 0:
                    break
        if work is not canvas and work.tokens.shape[0]:
            idx = torch.tensor(self.active, dtype=torch.long, device=dev)
            canvas.tokens[idx] = work.tokens

    def run(self) -> torch.Tensor:
        for _ in self:
            pass
        return self.canvas.tokens
