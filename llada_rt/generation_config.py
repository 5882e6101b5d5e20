"""GenerationConfig: the options of one request, their validation, and the checkpoint's generation_config.json defaults."""
from __future__ import annotations

import dataclasses
import math

REMASKING = ("low_confidence", "random")
MODES = ("exact", "prefix", "dual")
MAX_BLOCK_LENGTH = 1024   # the remask kernels keep one block per thread block / row in registers (csrc/remask.cuh)
_U63 = 1 << 63


class GenerationConfigError(ValueError):
    """Generation settings that cannot run (the message says which and what to change)."""


@dataclasses.dataclass
class GenerationConfig:
    """Options of one request. Defaults: 128 tokens in blocks of 32, one token per step (steps = gen_length), the
    exact official sampler; Runtime fills in the checkpoint's generation_config.json values before these."""
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
    cuda_graph: bool = False            # replay each step from a CUDA graph owned by the Runtime (CUDA only)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def total_steps(self) -> int:
        return self.gen_length if self.steps is None else self.steps

    @property
    def steps_per_block(self) -> int:
        return self.total_steps // self.num_blocks

    @property
    def parallel(self) -> bool:
        return self.threshold is not None or self.factor is not None

    @property
    def rule(self) -> str:
        """The remask rule: 'topk' (the fixed schedule), 'threshold' or 'factor'."""
        return "threshold" if self.threshold is not None else "factor" if self.factor is not None else "topk"

    def validate(self, prompt_len: int | None = None, max_sequence_length: int | None = None,
                 device_type: str | None = None) -> None:
        def bad(msg):
            raise GenerationConfigError(msg)

        for name in ("gen_length", "block_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(f"{name} must be a positive integer, got {v!r}")
        if self.block_length > MAX_BLOCK_LENGTH:
            bad(f"block_length={self.block_length} is above the kernels' limit of {MAX_BLOCK_LENGTH}; use a smaller "
                "block_length (LLaDA uses 32 to 1024)")
        if self.gen_length % self.block_length:
            bad(f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}; use a "
                f"block_length that divides it (e.g. {_divisor_hint(self.gen_length, self.block_length)})")
        steps = self.total_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            bad(f"steps must be a positive integer, got {self.steps!r}")
        if steps % self.num_blocks:
            bad(f"steps={steps} is not divisible by the number of blocks ({self.gen_length}/{self.block_length} = "
                f"{self.num_blocks}); steps is the total over all blocks, so use a multiple of {self.num_blocks}")
        if steps > self.gen_length:
            bad(f"steps={steps} is more than gen_length={self.gen_length}: a block never needs more steps than it has "
                "positions (the extra steps would commit nothing); use steps <= gen_length")
        if self.mode not in MODES:
            bad(f"mode={self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if self.remasking not in REMASKING:
            bad(f"remasking={self.remasking!r} is unknown; choose one of {', '.join(REMASKING)}")
        for name in ("temperature", "cfg_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(f"{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < _U63:
            bad(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.cfg_scale > 0 and self.mode != "exact":
            bad(f"cfg_scale > 0 runs only in mode='exact' (the KV cache modes do not guide), got mode={self.mode!r}")
        if self.threshold is not None and self.factor is not None:
            bad("give either threshold or factor, not both")
        if self.threshold is not None and (isinstance(self.threshold, bool) or
                                           not isinstance(self.threshold, (int, float)) or
                                           not 0.0 < self.threshold <= 1.0):
            bad(f"threshold must be in (0, 1], got {self.threshold!r}")
        if self.factor is not None and (isinstance(self.factor, bool) or not isinstance(self.factor, (int, float))
                                        or not math.isfinite(self.factor) or not self.factor > 0):
            bad(f"factor must be a finite number > 0, got {self.factor!r}")
        if self.parallel and self.remasking != "low_confidence":
            bad("threshold/factor decoding ranks by confidence; use remasking='low_confidence'")
        if self.cuda_graph and device_type is not None and device_type != "cuda":
            bad(f"cuda_graph=True needs a CUDA device, but this runtime runs on {device_type}; drop cuda_graph")
        if prompt_len is not None and max_sequence_length is not None and prompt_len + self.gen_length > \
                max_sequence_length:
            bad(f"prompt ({prompt_len} tokens) plus gen_length ({self.gen_length}) is {prompt_len + self.gen_length} "
                f"tokens, beyond the model's max_sequence_length of {max_sequence_length}; shorten the prompt or "
                "lower gen_length")


FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig))


def _divisor_hint(n: int, near: int) -> int:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return min(divs, key=lambda d: abs(d - near))


def make_config(options: dict, defaults: dict | None = None) -> GenerationConfig:
    """GenerationConfig from the caller's options over the checkpoint's defaults (generation_config.json keys that
    are GenerationConfig fields). A gen_length given without steps drops the default steps (steps follows it), and a
    default block_length longer than the given gen_length is cut to it."""
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise GenerationConfigError(f"unknown generation option(s) {', '.join(unknown)}; valid options: "
                                    f"{', '.join(sorted(FIELDS))}")
    merged = {k: v for k, v in (defaults or {}).items() if k in FIELDS}
    if "gen_length" in options and "steps" not in options:
        merged.pop("steps", None)
    if "gen_length" in options and "block_length" not in options and "block_length" in merged:
        g, n = options["gen_length"], merged["block_length"]
        if isinstance(g, int) and isinstance(n, int) and n > g:
            merged["block_length"] = g
    merged.update(options)
    return GenerationConfig(**merged)
