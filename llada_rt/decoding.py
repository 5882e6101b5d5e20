"""The denoising loop: canvas, blocks, transfer schedule, remasking rules; one forward pass per step."""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import torch

from . import model, ops
from .config import LLaDAConfig
from .weights import ModelWeights

REMASKING = ("low_confidence", "random")
MODES = ("exact",)


class GenerationConfigError(ValueError):
    """Generation settings that cannot run (the message says which and what to change)."""


@dataclasses.dataclass
class GenerationConfig:
    """Options of Runtime.generate. Defaults: 128 tokens in blocks of 32, one token per step (steps = gen_length)."""
    gen_length: int = 128
    block_length: int = 32
    steps: int | None = None            # total denoising steps over all blocks; None means gen_length
    temperature: float = 0.0            # Gumbel-max sampling temperature; 0 is greedy
    cfg_scale: float = 0.0              # classifier-free guidance: u + (s + 1)(c - u), unconditional = prompt masked
    remasking: str = "low_confidence"   # which masked positions to commit: 'low_confidence' or 'random'
    logits_eos_inf: bool = False        # EOS can never be predicted
    confidence_eos_eot_inf: bool = False  # EOS/EOT predictions get confidence 0 (committed last)
    seed: int = 0                       # Philox seed for temperature > 0 and random remasking
    mode: str = "exact"

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def total_steps(self) -> int:
        return self.gen_length if self.steps is None else self.steps

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


@dataclasses.dataclass
class StepInfo:
    """What one denoising step did (tensors stay on the device; nothing here forces a sync)."""
    step: int                 # steps so far in this call (1-based)
    nfe: int                  # forward passes so far
    block: int
    block_start: int
    committed: torch.Tensor   # (B,) int32 tokens committed by this step per row


class Decoder:
    """Runs the denoising loop for one batch; iterate it to advance step by step."""

    def __init__(self, cfg: LLaDAConfig, w: ModelWeights, gc: GenerationConfig, canvas: Canvas,
                 stop_ids: list[int], eot_id: int | None, backend: str = "ops"):
        self.cfg, self.w, self.gc, self.canvas, self.backend = cfg, w, gc, canvas, backend
        self.mask_id, self.eos_id, self.eot_id = cfg.mask_token_id, cfg.eos_token_id, eot_id
        self.stop_ids = stop_ids
        self.nfe = 0
        self.steps_done = 0
        self.forward_s = 0.0
        self.suppress_ids = [self.eos_id] if gc.logits_eos_inf else []
        self.zero_conf_ids = [i for i in (self.eos_id, eot_id) if i is not None] if gc.confidence_eos_eot_inf else []

    def _logits(self, rows: slice) -> torch.Tensor:
        """Logits (B, N, V) of the rows `rows`, with classifier-free guidance when cfg_scale > 0."""
        c, gc = self.canvas, self.gc
        if gc.cfg_scale > 0:
            uncond = c.tokens.clone()
            uncond[:, :c.prompt_len] = self.mask_id                              # prompt fully masked
            both = model.forward(self.cfg, self.w, torch.cat([c.tokens, uncond]), torch.cat([c.positions] * 2),
                                 torch.cat([c.key_start] * 2), rows=rows, backend=self.backend)
            cond, unc = both.chunk(2)
            return unc + (gc.cfg_scale + 1) * (cond - unc)
        return model.forward(self.cfg, self.w, c.tokens, c.positions, c.key_start, rows=rows, backend=self.backend)

    def __iter__(self) -> Iterator[StepInfo]:
        gc, c = self.gc, self.canvas
        B, dev = c.tokens.shape[0], c.tokens.device
        spb = gc.total_steps // gc.num_blocks
        k_table = torch.tensor(transfer_schedule(gc.block_length, spb), dtype=torch.int64, device=dev)
        k_table = k_table[:, None].expand(spb, B).contiguous()                 # (spb, B)
        for blk in range(gc.num_blocks):
            start = c.prompt_len + blk * gc.block_length
            rows = slice(start, start + gc.block_length)
            for i in range(spb):
                t0 = time.perf_counter()
                logits = self._logits(rows)                                      # (B, N, V)
                self.forward_s += time.perf_counter() - t0
                self.nfe += 1
                masked = c.tokens[:, rows] == self.mask_id                       # (B, N)
                token, prob = ops.confidence(
                    logits, masked, temperature=gc.temperature, seed=gc.seed, offset=self.nfe,
                    random_confidence=gc.remasking == "random", suppress_ids=self.suppress_ids,
                    zero_conf_ids=self.zero_conf_ids)
                count = ops.remask(c.tokens, token, prob, start=start, mask_id=self.mask_id, k=k_table[i],
                                   rule="topk")
                self.steps_done += 1
                yield StepInfo(step=self.steps_done, nfe=self.nfe, block=blk, block_start=start, committed=count)

    def run(self) -> torch.Tensor:
        for _ in self:
            pass
        return self.canvas.tokens
