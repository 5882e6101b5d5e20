"""tokenizer.json through `tokenizers`, special ids read from the checkpoint's files, and the chat template."""
from __future__ import annotations

import json
from pathlib import Path

# Token strings of LLaDA's tokenizer (LLADA.md 2); their ids are always looked up in the checkpoint's files.
BOS_TEXT = "<|startoftext|>"
EOS_TEXT = "<|endoftext|>"
MASK_TEXT = "<|mdm_mask|>"
START_HEADER_TEXT = "<|start_header_id|>"
END_HEADER_TEXT = "<|end_header_id|>"
EOT_TEXT = "<|eot_id|>"


class TokenizerError(ValueError):
    """tokenizer.json / tokenizer_config.json missing, unreadable, or inconsistent with config.json."""


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    """Encodes prompts (chat template for Instruct checkpoints, plain text for Base) and decodes answers."""

    def __init__(self, ckpt_dir: str | Path, mask_id: int | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer as _HFTokenizer

        ckpt_dir = Path(ckpt_dir)
        path = ckpt_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: not found; the checkpoint directory must hold tokenizer.json")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: cannot be loaded by `tokenizers` ({e})") from None
        cfg_path = ckpt_dir / "tokenizer_config.json"
        self.config: dict = {}
        if cfg_path.is_file():
            try:
                self.config = json.loads(cfg_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{cfg_path}: not valid JSON ({e})") from None
        self.chat_template: str | None = self.config.get("chat_template")
        self.bos_id = self._id_of(_token_text(self.config.get("bos_token")) or BOS_TEXT)
        self.eos_id = self._id_of(_token_text(self.config.get("eos_token")) or EOS_TEXT)
        self.mask_id = self._id_of(MASK_TEXT)
        self.eot_id = self._id_of(EOT_TEXT)
        self.start_header_id = self._id_of(START_HEADER_TEXT)
        self.end_header_id = self._id_of(END_HEADER_TEXT)
        if mask_id is not None:
            if self.mask_id is not None and self.mask_id != mask_id:
                raise TokenizerError(f"{path}: {MASK_TEXT} has id {self.mask_id} but config.json says mask_token_id="
                                     f"{mask_id}")
            self.mask_id = mask_id
        if eos_id is not None and self.eos_id is None:
            self.eos_id = eos_id
        if self.mask_id is None:
            raise TokenizerError(f"{path}: no mask token ({MASK_TEXT}) and no mask_token_id in config.json")
        if self.eos_id is None:
            raise TokenizerError(f"{path}: no end-of-text token ({EOS_TEXT})")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _id_of(self, text: str | None) -> int | None:
        if not text:
            return None
        tid = self._tok.token_to_id(text)
        if tid is None:  # tokens known only from tokenizer_config.json's added_tokens_decoder
            for k, v in (self.config.get("added_tokens_decoder") or {}).items():
                if _token_text(v) == text:
                    return int(k)
        return tid

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an answer: EOS, and EOT where the tokenizer has it."""
        return [i for i in (self.eos_id, self.eot_id) if i is not None]

    @property
    def is_chat(self) -> bool:
        return bool(self.chat_template)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat_template rendered with jinja2 (as transformers does)."""
        if not self.chat_template:
            raise TokenizerError("this checkpoint has no chat_template (a Base model); pass chat=False")
        import jinja2.sandbox

        def raise_exception(msg):
            raise TokenizerError(f"chat template: {msg}")

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        special = {k: _token_text(self.config.get(k)) or "" for k in ("bos_token", "eos_token", "pad_token")}
        return env.from_string(self.chat_template).render(messages=messages,
                                                          add_generation_prompt=add_generation_prompt, **special)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, no special tokens added (LLaDA's add_bos_token is false)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict] | str, add_generation_prompt: bool = True) -> list[int]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def cut_at_stop(self, ids: list[int]) -> list[int]:
        """The answer ids before the first EOS/EOT."""
        stops = set(self.stop_ids)
        for i, t in enumerate(ids):
            if t in stops:
                return ids[:i]
        return ids
