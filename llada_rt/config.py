"""LLaDAConfig: the checkpoint's config.json (LLaDA's own keys) read, validated and turned into a dataclass."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

GENERATION_CONFIG_FILE = "generation_config.json"

# Sizes and token ids: the kernels index with int32 (llada_rt/ops.py checks sizes < 2**31).
_MAX_INT = 2**31 - 1
# The smallest normal float32: a smaller rms_norm_eps becomes 0 when added to a float32 mean (0 / 0 on a zero row).
_FLOAT32_TINY = 1.1754943508222875e-38


class ConfigError(ValueError):
    """config.json (or generation_config.json) is missing, unreadable, lacks a key the math needs, has a value of the
    wrong type or range, or asks for something llada_rt cannot run."""


def short_repr(v: Any, limit: int = 80) -> str:
    """repr() cut to `limit` characters, for error messages about values read from files (which may be huge)."""
    try:
        r = repr(v)
    except ValueError:  # it holds an int beyond Python's int-to-str digit limit
        return f"<a {type(v).__name__} too large to show>"
    return r if len(r) <= limit else r[: limit - 3] + "..."


def parse_json(data: bytes | str, source: str, error: type[ValueError], allow_nan: bool = True) -> Any:
    """JSON text -> value, every failure raised as `error` naming `source`: invalid UTF-8 or JSON, nesting too deep
    for the parser, integers beyond Python's digit limit, a key given twice in one object (json keeps the last), a
    string with a lone surrogate escape (not Unicode), and, unless allow_nan, NaN or Infinity (not JSON either)."""
    def no_duplicates(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise error(f"{source}: key {short_repr(k)} appears twice in one object; keep one")
            d[k] = v
        return d

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as e:
        raise error(f"{source}: not valid UTF-8 text (byte {e.start}); the file is corrupt or not JSON") from None
    except RecursionError:
        raise error(f"{source}: not valid JSON (nested too deeply to parse)") from None
    except error:
        raise
    except ValueError as e:  # json.JSONDecodeError, and int-digit-limit errors
        raise error(f"{source}: not valid JSON ({e})") from None
    where = find_in_json(value, _lone_surrogate)
    if where is not None:
        raise error(f"{source}: {where} is not valid Unicode text (it holds a lone surrogate escape such as "
                    "\\ud800)")
    if not allow_nan:
        where = find_in_json(value, lambda x: isinstance(x, float) and not math.isfinite(x))
        if where is not None:
            raise error(f"{source}: {where} is not a finite number (NaN and Infinity are not JSON)")
    return value


def _lone_surrogate(x: Any) -> bool:
    if not isinstance(x, str) or x.isascii():
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def find_in_json(v: Any, bad) -> str | None:
    """Where (key['k'][0]...) the first key or value x of a JSON value with bad(x) sits, or None; iterative, since
    files nest deeply. The whole value is 'the top-level value'."""
    todo = [(v, "")]
    while todo:
        x, at = todo.pop()
        if bad(x):
            return at or "the top-level value"
        if isinstance(x, dict):
            for k, y in reversed(list(x.items())):
                path = f"{at}[{short_repr(k)}]" if at else k if k.isprintable() and len(k) <= 80 else short_repr(k)
                if bad(k):
                    return f"the key {path}"
                todo.append((y, path))
        elif isinstance(x, list):
            todo.extend((y, f"{at}[{i}]" if at else f"[{i}]") for i, y in reversed(list(enumerate(x))))
    return None


def read_json(path: Path, error: type[ValueError], allow_nan: bool = True) -> Any:
    """The JSON value in the file at `path`; unreadable files and bad JSON raised as `error` naming the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    return parse_json(data, str(path), error, allow_nan)


# Keys whose values change the math but that llada_rt runs only in one setting: key -> (supported values, meaning).
_FIXED = {
    "activation_type": ({"silu"}, "the MLP must be SwiGLU built as silu(ff_proj x) * up_proj x"),
    "block_type": ({"llama"}, "only LLaDA's llama-style block is implemented"),
    "block_group_size": ({1}, "weights are expected at model.transformer.blocks.{i}"),
    "layer_norm_type": ({"rms"}, "only RMSNorm is implemented"),
    "layer_norm_with_affine": ({True}, "RMSNorm must carry a weight"),
    "bias_for_layer_norm": ({False, None}, "RMSNorm has no bias"),
    "rope": ({True}, "positions are encoded by RoPE only"),
    "alibi": ({False}, "ALiBi is not implemented"),
    "attention_layer_norm": ({False}, "QK-norm is not implemented"),
    "include_bias": ({False}, "linear layers have no bias"),
    "include_qkv_bias": ({False, None}, "q/k/v projections have no bias"),
    "scale_logits": ({False}, "logit scaling is not implemented"),
    "input_emb_norm": ({False}, "embedding scaling is not implemented"),
    "clip_qkv": ({None}, "q/k/v clipping is not implemented"),
}
# The quantization_config of an int8 checkpoint written by `llada-rt quantize` (layout: weights.py).
INT8_QUANTIZATION_CONFIG = {"quant_method": "llada_rt_int8", "bits": 8, "scheme": "symmetric_per_output_channel",
                            "scale_suffix": "_scale"}
_REQUIRED = ("d_model", "n_layers", "n_heads", "vocab_size", "max_sequence_length", "mask_token_id", "eos_token_id")


@dataclasses.dataclass(frozen=True)
class LLaDAConfig:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    max_sequence_length: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    rope_theta: float = 10000.0
    rope_full_precision: bool = True
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    quantization: str | None = None   # "int8": the linear weights are stored int8 with per-row scales (weights.py)
    extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # informational keys, kept for to_dict

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and LM head (embedding_size, which may exceed vocab_size)."""
        return self.embedding_size

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LLaDAConfig":
        """A config.json object checked key by key (errors name `source` and the key). Types are JSON's: integers
        for sizes and ids (no bools, floats or strings), numbers for rope_theta / rms_norm_eps / mlp_ratio (integers
        fine, strings such as "1e-5" rejected rather than parsed: a quoted number means the file was written by hand
        or by a broken converter), booleans for flags; null means absent."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "llada")
        if model_type != "llada":
            raise ConfigError(f"{source}: model_type {short_repr(model_type)} is not supported; llada_rt runs "
                              "model_type 'llada' (LLaDA-8B Base/Instruct, LLaDA-1.5)")
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}; a LLaDA config.json defines them "
                              "(see LLaDA-8B-Instruct's config.json)")
        for key, (allowed, why) in _FIXED.items():
            if key in d and not any(_same(d[key], a) for a in allowed):
                raise ConfigError(f"{source}: {key}={short_repr(d[key])} is not supported ({why}; supported: "
                                  f"{sorted(allowed, key=str)})")
        d_model, n_heads = _int(d, "d_model", source), _int(d, "n_heads", source)
        if d_model % n_heads:
            raise ConfigError(f"{source}: d_model={d_model} is not a multiple of n_heads={n_heads}")
        if (d_model // n_heads) % 2:
            raise ConfigError(f"{source}: the head dimension d_model/n_heads = {d_model}/{n_heads} = "
                              f"{d_model // n_heads} is odd; RoPE rotates the two halves of each head, so it must be "
                              "even (the CPU path runs any even head dimension; the CUDA attention kernel's head "
                              "dimensions are checked when the weights are loaded onto a GPU)")
        if d.get("n_kv_heads") is not None:
            n_kv = _int(d, "n_kv_heads", source)
        else:
            n_kv = 1 if _bool(d, "multi_query_attention", source, False) else n_heads
        if n_heads % n_kv:
            raise ConfigError(f"{source}: n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv}")
        if d.get("mlp_hidden_size") is not None:
            mlp = _int(d, "mlp_hidden_size", source)
        elif d.get("mlp_ratio") is not None:
            hidden = _float(d, "mlp_ratio", source, None, above=0.0) * d_model
            if not (hidden.is_integer() and 1 <= hidden <= _MAX_INT):
                raise ConfigError(f"{source}: mlp_ratio={short_repr(d['mlp_ratio'])} times d_model={d_model} is "
                                  f"{hidden}, not a whole number of MLP units in [1, {_MAX_INT}]; give "
                                  "mlp_hidden_size instead")
            mlp = int(hidden)
        else:
            raise ConfigError(f"{source}: missing key mlp_hidden_size (or mlp_ratio)")
        vocab = _int(d, "vocab_size", source)
        emb = vocab if d.get("embedding_size") is None else _int(d, "embedding_size", source)
        if emb < vocab:
            raise ConfigError(f"{source}: embedding_size={emb} is smaller than vocab_size={vocab}")
        mask_id, eos_id = _int(d, "mask_token_id", source, 0), _int(d, "eos_token_id", source, 0)
        pad_id = eos_id if d.get("pad_token_id") is None else _int(d, "pad_token_id", source, 0)
        for name, tid in (("mask_token_id", mask_id), ("eos_token_id", eos_id), ("pad_token_id", pad_id)):
            if not 0 <= tid < vocab:
                raise ConfigError(f"{source}: {name}={tid} is outside the vocabulary [0, {vocab})")
        for name, tid in (("pad_token_id", pad_id), ("eos_token_id", eos_id)):
            if tid == mask_id:
                raise ConfigError(f"{source}: {name} equals mask_token_id ({mask_id}); the sampler could not tell "
                                  "that token from a still-masked position")
        quantization = None
        qc = d.get("quantization_config")
        if qc is not None:
            if qc != INT8_QUANTIZATION_CONFIG:
                raise ConfigError(f"{source}: quantization_config {qc!r} is not supported; llada_rt reads float "
                                  f"checkpoints and its own int8 ones (`llada-rt quantize`, quantization_config "
                                  f"{INT8_QUANTIZATION_CONFIG})")
            quantization = "int8"
        known = {f.name for f in dataclasses.fields(cls)} | set(_FIXED) | {"model_type", "multi_query_attention",
                                                                             "mlp_ratio", "quantization_config"}
        return cls(
            d_model=d_model, n_layers=_int(d, "n_layers", source), n_heads=n_heads, n_kv_heads=n_kv,
            mlp_hidden_size=mlp, vocab_size=vocab, embedding_size=emb,
            max_sequence_length=_int(d, "max_sequence_length", source), mask_token_id=mask_id, eos_token_id=eos_id,
            pad_token_id=pad_id,
            # theta >= 1: RoPE wavelengths 2 pi theta^(2i/D) of at least 2 pi (LLaDA: 500000); far below 1 the
            # float32 frequency table overflows to inf and the forward gives NaN
            rope_theta=_float(d, "rope_theta", source, 10000.0, at_least=1.0,
                              why=" (the RoPE base; LLaDA-8B uses 500000)"),
            rope_full_precision=_bool(d, "rope_full_precision", source, True),
            rms_norm_eps=_float(d, "rms_norm_eps", source, 1e-5, at_least=_FLOAT32_TINY,
                                why=", the smallest normal float32 (LLaDA-8B uses 1e-05)"),
            weight_tying=_bool(d, "weight_tying", source, False),
            quantization=quantization, extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """A config.json in LLaDA's format (the keys of LLaDA-8B-Instruct's file)."""
        d = {
            "architectures": ["LLaDAModelLM"], "model_type": "llada",
            "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0,
            "attention_layer_norm": False, "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False,
            "block_group_size": 1, "block_type": "llama", "d_model": self.d_model, "embedding_dropout": 0.0,
            "embedding_size": self.embedding_size, "eos_token_id": self.eos_token_id, "flash_attention": False,
            "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
            "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
            "layer_norm_with_affine": True, "mask_token_id": self.mask_token_id,
            "max_sequence_length": self.max_sequence_length, "mlp_hidden_size": self.mlp_hidden_size,
            "mlp_ratio": 4, "multi_query_attention": None, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers, "pad_token_id": self.pad_token_id, "precision": "amp_bf16",
            "residual_dropout": 0.0, "rms_norm_eps": self.rms_norm_eps, "rope": True,
            "rope_full_precision": self.rope_full_precision, "rope_theta": self.rope_theta, "scale_logits": False,
            "use_cache": False, "vocab_size": self.vocab_size, "weight_tying": self.weight_tying,
        }
        if self.quantization == "int8":
            d["quantization_config"] = dict(INT8_QUANTIZATION_CONFIG)
        d.update(self.extra)
        return d


def _same(v: Any, allowed: Any) -> bool:
    """Equal and of the same JSON type: 1 is not true, 1.0 is not 1, and an unhashable value is just unequal."""
    return type(v) is type(allowed) and v == allowed


def _int(d: dict, key: str, source: str, lo: int = 1) -> int:
    """d[key] as an integer in [lo, 2**31 - 1]; bools, floats and numeric strings are rejected (JSON has integers)."""
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        hint = "; write it as a JSON number, without quotes" if isinstance(v, str) else ""
        raise ConfigError(f"{source}: {key} must be an integer, got {short_repr(v)} ({type(v).__name__}){hint}")
    if not lo <= v <= _MAX_INT:
        raise ConfigError(f"{source}: {key}={short_repr(v)} is out of range; it must be an integer in [{lo}, "
                          f"{_MAX_INT}]")
    return v


def _float(d: dict, key: str, source: str, default: float | None, at_least: float | None = None,
           above: float | None = None, why: str = "") -> float:
    """d[key] as a finite float (the default when absent or null), >= at_least or > above; JSON integers are fine,
    bools and numeric strings are rejected."""
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        hint = "; write it as a JSON number, without quotes" if isinstance(v, str) else ""
        raise ConfigError(f"{source}: {key} must be a number, got {short_repr(v)} ({type(v).__name__}){hint}")
    try:
        f = float(v)
    except OverflowError:   # an integer beyond the float range
        f = math.inf
    if not math.isfinite(f):
        raise ConfigError(f"{source}: {key}={short_repr(v)} is not a finite number")
    if at_least is not None and not f >= at_least:
        raise ConfigError(f"{source}: {key}={short_repr(v)} is out of range; it must be >= {at_least:g}{why}")
    if above is not None and not f > above:
        raise ConfigError(f"{source}: {key}={short_repr(v)} is out of range; it must be > {above:g}{why}")
    return f


def _bool(d: dict, key: str, source: str, default: bool) -> bool:
    """d[key] as a JSON boolean (the default when absent or null): the string 'false' is not False."""
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{source}: {key} must be true or false (a JSON boolean), got {short_repr(v)} "
                          f"({type(v).__name__})")
    return v


def load_config(ckpt_dir: str | Path) -> LLaDAConfig:
    """Reads <ckpt_dir>/config.json."""
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a LLaDA checkpoint directory holds config.json, the safetensors "
                          "weights and tokenizer.json")
    return LLaDAConfig.from_dict(read_json(path, ConfigError), source=str(path))


def load_generation_config(ckpt_dir: str | Path, vocab_size: int | None = None) -> dict[str, Any]:
    """<ckpt_dir>/generation_config.json ({} when there is none), checked as a file: a JSON object whose numbers are
    finite and whose *_token_id entries are token ids (an integer >= 0, below vocab_size when given, a list of them,
    or null). Which keys are generation options, and their ranges, is GenerationConfig's to check."""
    path = Path(ckpt_dir) / GENERATION_CONFIG_FILE
    if not path.exists():
        return {}
    d = read_json(path, ConfigError, allow_nan=False)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object of generation settings, got {type(d).__name__}")
    for key, v in d.items():
        if key.endswith("_token_id") and v is not None:
            ids = v if isinstance(v, list) else [v]
            if not ids or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids) or \
                    vocab_size is not None and any(t >= vocab_size for t in ids):
                vocab = "" if vocab_size is None else f" below the vocabulary size {vocab_size}"
                raise ConfigError(f"{path}: {key}={short_repr(v)} is not a token id; it must be an integer >= 0"
                                  f"{vocab}, a non-empty list of them, or null")
    return d
