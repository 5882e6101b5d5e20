"""Writes tiny LLaDA checkpoints in the exact Hugging Face layout: real config keys, tensor names and special ids."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from llada_rt.config import LLaDAConfig
from llada_rt.weights import init_weights, save_checkpoint

# LLaDA-8B's special tokens at their real ids (LLADA.md 2).
SPECIAL = {
    126080: "<|startoftext|>", 126081: "<|endoftext|>", 126082: "[CLS]", 126083: "[gMASK]",
    126336: "<|mdm_mask|>", 126340: "<role>", 126341: "</role>", 126346: "<|start_header_id|>",
    126347: "<|end_header_id|>", 126348: "<|eot_id|>",
}
BOS, EOS, MASK, EOT = 126080, 126081, 126336, 126348
VOCAB = 126464

# LLaDA's chat template logic (LLADA.md 2), written for these tests: BOS first, user/assistant turns, others dropped.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{% if message['role'] in ['user', 'assistant'] %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)

TINY = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=96, vocab_size=VOCAB,
            embedding_size=VOCAB, max_sequence_length=512, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS,
            rope_theta=500000.0, rms_norm_eps=1e-5)


def tiny_config(**overrides) -> LLaDAConfig:
    return LLaDAConfig.from_dict({**LLaDAConfig.from_dict({**TINY, **overrides}).to_dict()})


def tokenizer_json() -> dict:
    chars = list(string.printable)               # includes whitespace and newline
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["[UNK]"] = len(chars)
    vocab.update({t: i for i, t in SPECIAL.items()})
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in SPECIAL.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }


def tokenizer_config(chat: bool = True) -> dict:
    d = {
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, t in SPECIAL.items()},
    }
    if chat:
        d["chat_template"] = CHAT_TEMPLATE
    return d


def write_checkpoint(path: Path, seed: int = 0, shards: int = 1, chat: bool = True, dtype=torch.float32,
                     **overrides) -> Path:
    """A random-weight LLaDA checkpoint; EOS/EOT logits are boosted so the EOS options are exercised."""
    cfg = tiny_config(**overrides)
    w = init_weights(cfg, seed=seed, std=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    for tid in (EOS, EOT):
        if tid < cfg.embedding_size:
            w.lm_head[tid] = torch.randn(cfg.d_model, generator=g) * 0.4
    save_checkpoint(path, cfg, w, shards=shards, dtype=dtype)
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(chat), indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS, "eos_token_id": EOS}))
    return path
