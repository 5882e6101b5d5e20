"""GenerationConfig: the options of one request, their checks, and the checkpoint's generation_config.json defaults."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

from .config import ConfigError, short_repr

REMASKING = ("low_confidence", "random")
MODES = ("exact", "prefix", "dual")
MAX_BLOCK_LENGTH = 1024   # the remask kernels keep one block per thread block / row in registers (csrc/remask.cuh)
MAX_LENGTH = 2**31 - 1    # gen_length and steps: the kernels index canvases with int32
# The engine keeps temperature and cfg_scale per row in float32 (engine.EngineState).
FLOAT32_MAX = 3.4028234663852886e38
# CFG multiplies the logit difference c - u by s + 1 in the logits' dtype: far above the published scales (0.5 to 2,
# LLADA.md 4) it only amplifies that difference, until float16 logits overflow to inf (then NaN confidences).
MAX_CFG_SCALE = 100.0
_U63 = 1 << 63


class GenerationConfigError(ValueError):
    """Generation settings that cannot run (the message says which and what to change): an option of the wrong type
    (a string for a number or a boolean, a bool for a number, a float for an integer, None), out of its range (NaN,
    inf, negative, beyond a kernel's limit), or options that do not fit together or with the prompt and model."""


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
        """Checks every option's type and range, then the options together (and with the prompt length, the model's
        max_sequence_length and the device when given); raises GenerationConfigError naming the option. Numpy
        scalars are converted to int/float/bool in place, so that what passes is plain Python values."""
        origin = getattr(self, "_origin", {})

        def bad(msg):
            raise GenerationConfigError(msg)

        def named(name):   # an option and, when it came from generation_config.json, that file
            v = getattr(self, name)
            return f"{name}={short_repr(v)}" + (f" (from {origin[name]})" if name in origin else "")

        for name in FIELDS:
            try:
                setattr(self, name, check_option(name, getattr(self, name)))
            except GenerationConfigError as e:
                bad(f"{origin[name]}: {e}" if name in origin else str(e))
        if self.gen_length % self.block_length:
            bad(f"{named('gen_length')} is not a multiple of {named('block_length')}; use a block_length that "
                f"divides it (e.g. {_divisor_hint(self.gen_length, self.block_length)})")
        steps = self.total_steps
        if steps % self.num_blocks:
            bad(f"steps={steps} is not divisible by the number of blocks ({self.gen_length}/{self.block_length} = "
                f"{self.num_blocks}); steps is the total over all blocks, so use a multiple of {self.num_blocks}"
                + (f" (steps is from {origin['steps']})" if "steps" in origin else ""))
        if steps > self.gen_length:
            bad(f"steps={steps} is more than gen_length={self.gen_length}: a block never needs more steps than it has "
                "positions (the extra steps would commit nothing); use steps <= gen_length")
        if self.cfg_scale > 0 and self.mode != "exact":
            bad(f"cfg_scale > 0 runs only in mode='exact' (the KV cache modes do not guide), got {named('mode')}")
        if self.threshold is not None and self.factor is not None:
            bad(f"give either threshold or factor, not both (got {named('threshold')}, {named('factor')})")
        if self.parallel and self.remasking != "low_confidence":
            bad(f"threshold/factor decoding ranks by confidence; use remasking='low_confidence' (got "
                f"{named('remasking')})")
        if self.cuda_graph and device_type is not None and device_type != "cuda":
            bad(f"cuda_graph=True needs a CUDA device, but this runtime runs on {device_type}; drop cuda_graph")
        if prompt_len is not None and max_sequence_length is not None and prompt_len + self.gen_length > \
                max_sequence_length:
            bad(f"prompt ({prompt_len} tokens) plus gen_length ({self.gen_length}) is {prompt_len + self.gen_length} "
                f"tokens, beyond the model's max_sequence_length of {max_sequence_length}; shorten the prompt or "
                "lower gen_length")


FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig))


def _kind(v: Any) -> str:
    return type(v).__name__


def is_bool(v: Any) -> bool:
    """A Python or numpy bool."""
    return isinstance(v, bool) or type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_")


def _integer(name: str, v: Any, lo: int, hi: int, allowed: str) -> int:
    """An integer option in [lo, hi] (`allowed` says so in words): Python or numpy integers; bool, float (even 32.0:
    integers are given as integers, as in config.json), strings and None are rejected."""
    if is_bool(v) or not isinstance(v, numbers.Integral):
        hint = ""
        if isinstance(v, str):
            hint = "; pass a number, not a string"
        elif isinstance(v, float) and math.isfinite(v) and v.is_integer():
            hint = f"; pass {int(v)}"
        raise GenerationConfigError(f"{name} must be {allowed}, got {short_repr(v)} ({_kind(v)}){hint}")
    v = int(v)
    if not lo <= v <= hi:
        raise GenerationConfigError(f"{name} must be {allowed}, got {short_repr(v)}")
    return v


def _number(name: str, v: Any) -> float:
    """A real option: Python or numpy ints and floats (bool, strings and None rejected), as a float."""
    if is_bool(v) or not isinstance(v, numbers.Real):
        hint = "; pass a number, not a string" if isinstance(v, str) else ""
        raise GenerationConfigError(f"{name} must be a number, got {short_repr(v)} ({_kind(v)}){hint}")
    try:
        return float(v)
    except OverflowError:   # an integer beyond the float range
        return math.inf


def check_option(name: str, v: Any) -> Any:
    """One option's value, type- and range-checked on its own, as a plain Python value (GenerationConfigError
    naming the option otherwise)."""
    if name == "gen_length":
        return _integer(name, v, 1, MAX_LENGTH, f"a positive integer (at most {MAX_LENGTH})")
    if name == "block_length":
        if isinstance(v, numbers.Integral) and not is_bool(v) and v > MAX_BLOCK_LENGTH:
            raise GenerationConfigError(f"block_length={short_repr(v)} is above the kernels' limit of "
                                        f"{MAX_BLOCK_LENGTH} (the remask kernels hold one block in registers); use "
                                        "a smaller block_length (LLaDA uses 32 to 1024)")
        return _integer(name, v, 1, MAX_BLOCK_LENGTH, f"a positive integer (at most {MAX_BLOCK_LENGTH})")
    if name == "steps":
        return None if v is None else _integer(name, v, 1, MAX_LENGTH, "a positive integer, or None for "
                                                                     "gen_length (one step per position)")
    if name == "seed":
        return _integer(name, v, 0, _U63 - 1, "an integer in [0, 2**63)")
    if name in ("temperature", "cfg_scale"):
        f = _number(name, v)
        hi = FLOAT32_MAX if name == "temperature" else MAX_CFG_SCALE
        if not (math.isfinite(f) and f >= 0):
            raise GenerationConfigError(f"{name} must be a finite number >= 0, got {short_repr(v)}")
        if f > hi:
            why = ("the engine keeps it in float32" if name == "temperature" else
                   "guidance far above the published scales (0.5 to 2) only amplifies the logit difference until "
                   "float16 logits overflow")
            raise GenerationConfigError(f"{name}={short_repr(v)} is too large: it must be at most {hi:g} ({why})")
        return f
    if name in ("threshold", "factor"):   # parallel decoding; None is off
        if v is None:
            return None
        f = _number(name, v)
        ok, allowed = (0.0 < f <= 1.0, "in (0, 1] (a confidence)") if name == "threshold" else \
            (math.isfinite(f) and f > 0, "> 0 (a finite number)")
        if not ok:
            raise GenerationConfigError(f"{name} must be {allowed}, got {short_repr(v)}")
        return f
    if name in ("mode", "remasking"):
        choices = MODES if name == "mode" else REMASKING
        if not isinstance(v, str) or v not in choices:
            what = f"{name}={short_repr(v)} is unknown" if isinstance(v, str) else \
                f"{name} must be a string, got {short_repr(v)} ({_kind(v)})"
            raise GenerationConfigError(f"{what}; choose one of {', '.join(choices)}")
        return v
    if name in _BOOLS:
        if not is_bool(v):
            hint = f" (a non-empty string such as {v!r} would read as True)" if isinstance(v, str) else ""
            raise GenerationConfigError(f"{name} must be True or False, got {short_repr(v)} ({_kind(v)}){hint}")
        return bool(v)
    raise GenerationConfigError(f"unknown generation option {short_repr(name)}; valid options: "
                                f"{', '.join(sorted(FIELDS))}")


_BOOLS = tuple(f.name for f in dataclasses.fields(GenerationConfig) if f.type in ("bool", bool))


def _divisor_hint(n: int, near: int) -> int:
    """The divisor of n closest to `near` (divisors found up to sqrt(n), so any int32 n is fast)."""
    divs = set()
    d = 1
    while d * d <= n:
        if n % d == 0:
            divs.update((d, n // d))
        d += 1
    return min(sorted(divs), key=lambda d: abs(d - near))


def _checked(values: Mapping, source: str | None) -> dict:
    """The GenerationConfig fields among `values` (null values left out), each checked by check_option; errors are
    GenerationConfigError, prefixed with `source` when given."""
    out = {}
    for k, v in values.items():
        if k in FIELDS and v is not None:
            try:
                out[k] = check_option(k, v)
            except GenerationConfigError as e:
                raise GenerationConfigError(f"{source}: {e}" if source else str(e)) from None
    return out


def check_defaults(defaults: Mapping, source: str) -> dict:
    """The GenerationConfig fields of a checkpoint's generation_config.json (other keys, and null values, are left
    out), each type- and range-checked on its own. A bad one is a fault of the checkpoint: ConfigError naming
    `source` and the key."""
    try:
        return _checked(defaults, source)
    except GenerationConfigError as e:
        raise ConfigError(str(e)) from None


def make_config(options: Mapping, defaults: Mapping | None = None, source: str | None = None) -> GenerationConfig:
    """GenerationConfig from the caller's options over defaults (e.g. the GenerationConfig fields of the checkpoint's
    generation_config.json; `source` names where they come from). The defaults are checked here, each on its own
    (GenerationConfigError naming `source` and the key); the options, and how everything fits together and with the
    prompt, model and device, are GenerationConfig.validate's (Runtime runs it before any forward; its errors name
    `source` for a value that came from there). A gen_length given without steps drops the default steps (steps
    follows it), and a default block_length longer than the given gen_length is cut to it."""
    if not isinstance(options, Mapping):
        raise GenerationConfigError(f"generation options must be a dict of option names to values, got "
                                    f"{short_repr(options)} ({_kind(options)})")
    unknown = sorted((k for k in options if k not in FIELDS), key=short_repr)
    if unknown:
        raise GenerationConfigError(f"unknown generation option(s) {', '.join(short_repr(k) for k in unknown)}; "
                                    f"valid options: {', '.join(sorted(FIELDS))}")
    merged = _checked(defaults or {}, source)
    if "gen_length" in options and "steps" not in options:
        merged.pop("steps", None)
    g = options.get("gen_length")
    if "block_length" not in options and isinstance(g, numbers.Integral) and not is_bool(g) and \
            merged.get("block_length", 0) > g > 0:
        merged["block_length"] = int(g)
    origin = {k: source for k in merged if k not in options} if source else {}
    merged.update(options)
    cfg = GenerationConfig(**merged)
    cfg._origin = origin
    return cfg
