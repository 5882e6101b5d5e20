"""LLaDAConfig: the checkpoint's config.json (LLaDA's own keys) read, validated and turned into a dataclass."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """config.json is missing, unreadable, lacks a key the math needs, or asks for something llada_rt cannot run."""


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
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "llada")
        if model_type != "llada":
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported; llada_rt runs model_type 'llada' "
                              "(LLaDA-8B Base/Instruct, LLaDA-1.5)")
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}; a LLaDA config.json defines them "
                              "(see LLaDA-8B-Instruct's config.json)")
        for key, (allowed, why) in _FIXED.items():
            if key in d and d[key] not in allowed:
                raise ConfigError(f"{source}: {key}={d[key]!r} is not supported ({why}; supported: "
                                  f"{sorted(allowed, key=str)})")
        d_model, n_heads = _int(d, "d_model", source), _int(d, "n_heads", source)
        if d_model % n_heads:
            raise ConfigError(f"{source}: d_model={d_model} is not a multiple of n_heads={n_heads}")
        n_kv = d.get("n_kv_heads")
        if n_kv is None:
            n_kv = 1 if d.get("multi_query_attention") else n_heads
        n_kv = int(n_kv)
        if n_kv <= 0 or n_heads % n_kv:
            raise ConfigError(f"{source}: n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv}")
        if d.get("mlp_hidden_size") is not None:
            mlp = _int(d, "mlp_hidden_size", source)
        elif d.get("mlp_ratio") is not None:
            mlp = int(d["mlp_ratio"] * d_model)
        else:
            raise ConfigError(f"{source}: missing key mlp_hidden_size (or mlp_ratio)")
        vocab = _int(d, "vocab_size", source)
        emb = int(d.get("embedding_size") or vocab)
        if emb < vocab:
            raise ConfigError(f"{source}: embedding_size={emb} is smaller than vocab_size={vocab}")
        mask_id, eos_id = _int(d, "mask_token_id", source), _int(d, "eos_token_id", source)
        pad_id = int(d["pad_token_id"]) if d.get("pad_token_id") is not None else eos_id
        for name, tid in (("mask_token_id", mask_id), ("eos_token_id", eos_id), ("pad_token_id", pad_id)):
            if not 0 <= tid < vocab:
                raise ConfigError(f"{source}: {name}={tid} is outside the vocabulary [0, {vocab})")
        if pad_id == mask_id:
            raise ConfigError(f"{source}: pad_token_id equals mask_token_id ({mask_id}); padding would be decoded")
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
            pad_token_id=pad_id, rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_full_precision=bool(d.get("rope_full_precision", True)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), weight_tying=bool(d.get("weight_tying", False)),
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


def _int(d: dict, key: str, source: str) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 and key not in ("mask_token_id", "eos_token_id"):
        raise ConfigError(f"{source}: {key} must be a positive integer, got {v!r}")
    return v


def load_config(ckpt_dir: str | Path) -> LLaDAConfig:
    """Reads <ckpt_dir>/config.json."""
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a LLaDA checkpoint directory holds config.json, the safetensors "
                          "weights and tokenizer.json")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return LLaDAConfig.from_dict(d, source=str(path))
