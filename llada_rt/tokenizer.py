"""tokenizer.json through `tokenizers`, special ids read from the checkpoint's files, and the chat template."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import read_json, short_repr

# Token strings of LLaDA's tokenizer (LLADA.md 2); their ids are always looked up in the checkpoint's files.
BOS_TEXT = "<|startoftext|>"
EOS_TEXT = "<|endoftext|>"
MASK_TEXT = "<|mdm_mask|>"
START_HEADER_TEXT = "<|start_header_id|>"
END_HEADER_TEXT = "<|end_header_id|>"
EOT_TEXT = "<|eot_id|>"

# Special-token keys of tokenizer_config.json that llada_rt reads (each a string, an AddedToken object or null).
_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token")
# A conversation rendered at load to find the special tokens the chat template writes.
_PROBE_CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "Bye"}]


class TokenizerError(ValueError):
    """tokenizer.json / tokenizer_config.json missing, unreadable, malformed or inconsistent with config.json (or a chat
    template whose special tokens the tokenizer cannot encode); or text to encode that is not a valid str."""


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


def check_text(text: Any, what: str = "text") -> str:
    """`text` itself if it is a str that is valid Unicode; a lone surrogate (e.g. from bytes decoded with
    errors='surrogateescape') cannot be encoded, and is reported with its character position."""
    if not isinstance(text, str):
        hint = " (decode bytes first, e.g. data.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
        raise TokenizerError(f"{what} must be a str, got {type(text).__name__}{hint}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"{what} is not valid Unicode: the character at position {e.start} is "
                             f"{text[e.start]!r}, a lone surrogate (often from bytes decoded with "
                             "errors='surrogateescape'); remove it, or decode the input with errors='replace'") \
            from None
    return text


def check_conversation(messages: Any) -> None:
    """A conversation to render: a non-empty list of dicts with a str 'role' and a str 'content' that is valid
    Unicode (TokenizerError naming the message otherwise)."""
    if not isinstance(messages, list) or not messages:
        raise TokenizerError(f"messages must be a non-empty list of {{'role': str, 'content': str}}, got "
                             f"{short_repr(messages)}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise TokenizerError(f"messages[{i}] must be a dict with a str 'role' and 'content', got {short_repr(m)}")
        check_text(m.get("content"), f"messages[{i}]['content']")


def _read_config(path: Path) -> dict:
    """tokenizer_config.json, with the entries llada_rt reads checked ({} when the file does not exist)."""
    if not path.exists():
        return {}
    cfg = read_json(path, TokenizerError)
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    for key in _TOKEN_KEYS:
        v = cfg.get(key)
        if not (v is None or isinstance(v, str) or isinstance(v, dict) and isinstance(v.get("content"), str)):
            raise TokenizerError(f"{path}: {key} must be a token string, an object with a string 'content', or "
                                 f"null; got {short_repr(v)}")
    return cfg


def _chat_template(cfg: dict, path: Path) -> str | None:
    """The template string: chat_template is a string, or (as transformers writes several) a list of
    {"name", "template"} objects of which "default" is used; empty or null means none (a Base model)."""
    t = cfg.get("chat_template")
    if isinstance(t, list):
        named = {}
        for i, entry in enumerate(t):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and
                    isinstance(entry.get("template"), str)):
                raise TokenizerError(f"{path}: chat_template[{i}] must be an object with string 'name' and "
                                     f"'template', got {short_repr(entry)}")
            named[entry["name"]] = entry["template"]
        if "default" not in named:
            raise TokenizerError(f"{path}: chat_template lists templates {sorted(named)} but none is named "
                                 "'default', the one used for chat prompts")
        t = named["default"]
    if t is None:
        return None
    if not isinstance(t, str):
        raise TokenizerError(f"{path}: chat_template must be a Jinja template string (or a list of named "
                             f"templates), got {short_repr(t)}")
    return t or None


def _added_tokens(cfg: dict, path: Path) -> dict[int, str]:
    """added_tokens_decoder as id -> token text: keys are decimal ids, values objects with a string 'content'."""
    decoder = cfg.get("added_tokens_decoder")
    if decoder is None:
        return {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{path}: added_tokens_decoder must be an object mapping ids to tokens, got "
                             f"{short_repr(decoder)}")
    out = {}
    for k, v in decoder.items():
        if not (k.isascii() and k.isdigit() and int(k) < 2**31):
            raise TokenizerError(f"{path}: added_tokens_decoder key {short_repr(k)} is not a token id (a decimal "
                                 "integer below 2**31)")
        if not (isinstance(v, dict) and isinstance(v.get("content"), str)):
            raise TokenizerError(f"{path}: added_tokens_decoder[{k!r}] must be an object with a string 'content', "
                                 f"got {short_repr(v)}")
        out[int(k)] = v["content"]
    return out


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
        self.config: dict = _read_config(cfg_path)
        self._added = _added_tokens(self.config, cfg_path)
        for tid, text in self._added.items():
            known = self._tok.token_to_id(text)
            if known is not None and known != tid:
                raise TokenizerError(f"{cfg_path}: added_tokens_decoder gives {text!r} id {tid} but {path} has it at "
                                     f"id {known}; the two files come from different tokenizers")
        self.chat_template: str | None = _chat_template(self.config, cfg_path)
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
        self._template = None
        if self.chat_template:
            self._template = self._compile(self.chat_template, cfg_path)
            self._check_template_tokens(path, cfg_path)

    def _id_of(self, text: str | None) -> int | None:
        if not text:
            return None
        tid = self._tok.token_to_id(text)
        if tid is None:  # tokens known only from tokenizer_config.json's added_tokens_decoder
            return next((i for i, t in self._added.items() if t == text), None)
        return tid

    @staticmethod
    def _compile(template: str, cfg_path: Path):
        import jinja2
        import jinja2.sandbox

        def raise_exception(msg):
            raise TokenizerError(f"chat template: {msg}")

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{cfg_path}: chat_template is not a valid Jinja template (line {e.lineno}: "
                                 f"{e.message})") from None

    def _check_template_tokens(self, path: Path, cfg_path: Path) -> None:
        """Every special token the template writes must encode as one token, or a chat prompt would spell it out
        character by character (and the end of turn, never predicted, would not stop the answer)."""
        try:
            text = self.render_chat(_PROBE_CHAT)
        except TokenizerError as e:
            raise TokenizerError(f"{cfg_path}: chat_template cannot render a user/assistant conversation ({e})") \
                from None
        specials = {BOS_TEXT, EOS_TEXT, START_HEADER_TEXT, END_HEADER_TEXT, EOT_TEXT, *self._added.values(),
                    *(_token_text(self.config.get(k)) for k in _TOKEN_KEYS)}
        spelled = sorted(t for t in specials if t and t in text and len(self._tok.encode(
            t, add_special_tokens=False).ids) != 1)
        if spelled:
            raise TokenizerError(f"{cfg_path}: the chat_template writes {', '.join(spelled)}, but {path} does not "
                                 "encode each as a single token: chat prompts would spell them out character by "
                                 "character and answers would not stop at the end of a turn; add them to "
                                 "tokenizer.json's added_tokens (as LLaDA-8B-Instruct's tokenizer has them), or "
                                 "remove chat_template to use the checkpoint as a Base model")

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an answer: EOS, and EOT where the tokenizer has it."""
        return [i for i in (self.eos_id, self.eot_id) if i is not None]

    @property
    def is_chat(self) -> bool:
        return bool(self.chat_template)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat_template rendered with jinja2 (as transformers does)."""
        if self._template is None:
            raise TokenizerError("this checkpoint has no chat_template (a Base model); pass chat=False")
        check_conversation(messages)
        special = {k: _token_text(self.config.get(k)) or "" for k in _TOKEN_KEYS}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
        except TokenizerError:
            raise
        except Exception as e:  # the template is the checkpoint's code: any failure in it is reported as its own
            raise TokenizerError(f"chat template failed to render ({type(e).__name__}: {e})") from None

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, no special tokens added (LLaDA's add_bos_token is false)."""
        return self._tok.encode(check_text(text), add_special_tokens=False).ids

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
