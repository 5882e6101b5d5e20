"""Builds the shipped model's tokenizer.json and tokenizer_config.json: characters plus LLaDA's special tokens.

Usage: python bench/build_tokenizer.py [--words] OUT_DIR

The vocabulary is every printable ASCII character, newline and tab, a few whole words of the chat template (the role
names, "\\n\\n") and LLaDA's special tokens, which sit after the ordinary ones as in LLaDA-8B. Nothing downstream
knows an id: the runtime (and special_ids() below) look the special tokens up by content in the written files.
With --words (an experiment, not the shipped tokenizer) it also holds the words of the task suite's training phrasings
and the names of its fact table (tasks.vocabulary_words()), each one token where it stands as a whole word; other text
(the strings to reverse, digits, words only the held-out phrasings use) stays one token per character.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import tasks
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
UNK = "<|unk|>"
SPECIAL_TOKENS = [BOS, EOS, UNK, MASK, START_HEADER, END_HEADER, EOT]
TEMPLATE_TOKENS = ["user", "assistant", "system", "\n\n"]
VOCAB_ROUND = 128  # rows of the embedding and LM head: the tokenizer's size rounded up; the extra ids are never produced

# LLaDA-8B-Instruct's chat_template, logic verbatim (LLADA.md section 2): BOS once, user/assistant turns with
# trimmed content and <|eot_id|>, other roles dropped, then the assistant header or EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)


def word_tokens(words: bool = False) -> list[str]:
    """The multi-character tokens: the template's, then (words=True) the suite's words."""
    extra = [w for w in tasks.vocabulary_words() if w not in TEMPLATE_TOKENS] if words else []
    return TEMPLATE_TOKENS + extra


def vocabulary(words: bool = False) -> dict[str, int]:
    """token -> id: characters first, then whole words, then the special tokens."""
    tokens = ["\n", "\t"] + [chr(c) for c in range(32, 127)] + word_tokens(words) + SPECIAL_TOKENS
    assert len(set(tokens)) == len(tokens)
    return {t: i for i, t in enumerate(tokens)}


def pre_tokenizer_regex(words: bool = False) -> str:
    """A whole vocabulary word (longest first, so a longer name wins over its prefix), a blank line, or one character.
    """
    ws = sorted((w for w in word_tokens(words) if w != "\n\n"), key=lambda w: (-len(w), w))
    return "|".join([rf"\b{re.escape(w)}\b" for w in ws] + [r"\n\n", r"[\s\S]"])


def build_tokenizer(words: bool = False) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab=vocabulary(words), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pre_tokenizer_regex(words)), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    return {
        "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added,
        "bos_token": BOS, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": EOS, "fast_tokenizer": True, "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656, "pad_token": EOS, "unk_token": UNK,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write(out_dir: str | Path, words: bool = False) -> Path:
    """Writes tokenizer.json and tokenizer_config.json into out_dir (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(words)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2, ensure_ascii=False) + "\n")
    return out


def special_ids(tok_dir: str | Path) -> dict[str, int]:
    """The config.json ids (mask, eos, pad) and the template ids, read by content from the written files."""
    d = Path(tok_dir)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    by_content = {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}
    for content, tid in by_content.items():
        assert tok.token_to_id(content) == tid, f"{content}: tokenizer.json and tokenizer_config.json disagree"
    return {"mask_token_id": by_content[MASK], "eos_token_id": by_content[cfg["eos_token"]],
            "pad_token_id": by_content[cfg["pad_token"]], "bos_token_id": by_content[cfg["bos_token"]],
            "eot_token_id": by_content[EOT], "start_header_id": by_content[START_HEADER],
            "end_header_id": by_content[END_HEADER],
            "vocab_size": -(-tok.get_vocab_size() // VOCAB_ROUND) * VOCAB_ROUND}


if __name__ == "__main__":
    args = sys.argv[1:]
    use_words = "--words" in args
    args = [a for a in args if a != "--words"]
    if len(args) != 1:
        sys.exit("usage: python bench/build_tokenizer.py [--words] OUT_DIR")
    out_dir = write(args[0], words=use_words)
    print(f"wrote {out_dir}/tokenizer.json, tokenizer_config.json; ids {special_ids(out_dir)}")
