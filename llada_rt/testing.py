"""Random-weight LLaDA checkpoints in the exact Hugging Face layout (real config keys, tensor names and special ids),
for tests and benchmarks; a WordLevel tokenizer over printable characters plus LLaDA's special tokens."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from .config import LLaDAConfig
from .weights import init_weights, save_checkpoint

# LLaDA-8B's special tokens at their real ids (LLADA.md 2).
SPECIAL = {
    126080: "<|startoftext|>", 126081: "<|endoftext|>", 126082: "[CLS]", 126083: "[gMASK]",
    126336: "<|mdm_mask|>", 126340: "<role>", 126341: "</role>", 126346: "<|start_header_id|>",
    126347: "<|end_header_id|>", 126348: "<|eot_id|>",
}
BOS, EOS, MASK, EOT = 126080, 126081, 126336, 126348
VOCAB = 126464
SMALL_VOCAB = 256   # for tests of the decoding loop that do not need LLaDA's real vocabulary (faster)


def special_tokens(vocab: int) -> dict[int, str]:
    """LLaDA's special tokens: at their real ids for the real vocabulary, else packed at the top of a small one."""
    if vocab == VOCAB:
        return SPECIAL
    base = vocab - len(SPECIAL)
    return {base + i: t for i, t in enumerate(SPECIAL.values())}


def special_id(vocab: int, text: str) -> int:
    return next(i for i, t in special_tokens(vocab).items() if t == text)

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


def tiny_config(vocab: int = VOCAB, **overrides) -> LLaDAConfig:
    ids = dict(vocab_size=vocab, embedding_size=vocab, mask_token_id=special_id(vocab, "<|mdm_mask|>"),
               eos_token_id=special_id(vocab, "<|endoftext|>"), pad_token_id=special_id(vocab, "<|endoftext|>"))
    return LLaDAConfig.from_dict({**TINY, **ids, **overrides})


def tokenizer_json(vocab_size: int = VOCAB) -> dict:
    chars = list(string.printable)               # includes whitespace and newline
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["[UNK]"] = len(chars)
    special = special_tokens(vocab_size)
    vocab.update({t: i for i, t in special.items()})
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in special.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }


def tokenizer_config(chat: bool = True, vocab_size: int = VOCAB) -> dict:
    d = {
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for i, t in special_tokens(vocab_size).items()},
    }
    if chat:
        d["chat_template"] = CHAT_TEMPLATE
    return d


def write_checkpoint(path: Path, seed: int = 0, shards: int = 1, chat: bool = True, dtype=torch.float32,
                     vocab: int = VOCAB, eos_scale: float = 0.4, **overrides) -> Path:
    """A random-weight LLaDA checkpoint; EOS/EOT logits are boosted (eos_scale) so the EOS options are exercised."""
    cfg = tiny_config(vocab, **overrides)
    w = init_weights(cfg, seed=seed, std=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    for text in ("<|endoftext|>", "<|eot_id|>"):
        w.lm_head.dense()[special_id(vocab, text)] = torch.randn(cfg.d_model, generator=g) * eos_scale
    save_checkpoint(path, cfg, w, shards=shards, dtype=dtype)
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json(vocab)))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(chat, vocab), indent=1))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": special_id(vocab, "<|startoftext|>"), "eos_token_id": special_id(vocab, "<|endoftext|>")}))
    return path
