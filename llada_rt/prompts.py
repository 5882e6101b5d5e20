"""Prompts -> token ids: what generate(), stream(), add() and chat() take as a prompt, checked before any forward."""
from __future__ import annotations

import numbers
import sys
from collections.abc import Sequence
from typing import Any

from .config import short_repr
from .generation_config import is_bool
from .tokenizer import MASK_TEXT, Tokenizer, TokenizerError, check_conversation, check_text

_FORMS = ("a string, a list of strings (a batch), a list of token ids, a list of such lists (a batch of ids), or an "
          "integer numpy array / torch tensor of ids of shape (P,) or (B, P)")
_BYTES = (bytes, bytearray, memoryview)


class PromptError(ValueError):
    """A prompt that cannot be generated for (the message says which prompt, where, and what to give instead): not
    one of the accepted forms (bytes, bool or float ids, None, a dict, mixed or too deeply nested lists), empty or
    only whitespace (with or without the chat template), text that is not valid Unicode (the position is named),
    ids outside the vocabulary, or the mask token."""


def _is_int(v: Any) -> bool:
    """A token id: a Python or numpy integer, not a bool."""
    return isinstance(v, numbers.Integral) and not is_bool(v)


def _array_kind(x: Any) -> str | None:
    """'tensor' or 'ndarray' when x is a torch tensor or numpy array (looked up only if that library is imported:
    a value cannot be one otherwise), else None."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "tensor"
    np = sys.modules.get("numpy")
    if np is not None and isinstance(x, np.ndarray):
        return "ndarray"
    return None


def _integer_dtype(x: Any, kind: str) -> bool:
    """Signed integers, or unsigned ones wider than a byte: uint8 is how raw bytes arrive (torch.frombuffer,
    np.frombuffer), and LLaDA's ids do not fit in it."""
    if kind == "tensor":
        import torch

        return x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64) + tuple(
            getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))
    return x.dtype.kind == "i" or x.dtype.kind == "u" and x.dtype.itemsize > 1


def _array_to_lists(x: Any, kind: str, where: str, max_dim: int) -> list:
    """An integer array/tensor of ids as (nested) Python lists; anything else is a PromptError."""
    dtype = str(x.dtype)
    shape = tuple(x.shape)
    if not _integer_dtype(x, kind):
        hint = ""
        if "uint8" in dtype:
            hint = ("; uint8 holds raw bytes (decode them to a str), and LLaDA's ids do not fit in it: if these are "
                    "ids, convert to int64")
        elif "bool" in dtype:
            hint = "; a boolean mask is not a prompt"
        elif kind == "ndarray" and x.dtype.kind in "USO":
            hint = "; pass strings as a Python list of str (array.tolist())"
        raise PromptError(f"{where} is a {dtype} {kind} of shape {shape}: token ids must be integers{hint}")
    if not 1 <= x.ndim <= max_dim:
        form = "(P,) or (B, P)" if max_dim == 2 else "(P,)"
        raise PromptError(f"{where} is a {kind} of shape {shape}: token ids go in shape {form}")
    if kind == "tensor" and (x.device.type == "meta" or x.layout != sys.modules["torch"].strided):
        raise PromptError(f"{where} is a {x.layout} tensor on {x.device}: pass a dense tensor with values")
    return x.tolist()


def _ids(p: Any, where: str, vocab: int, mask_id: int) -> list[int]:
    """One prompt given as token ids (a sequence of integers, or a 1-D integer array/tensor), checked."""
    kind = _array_kind(p)
    if kind is not None:
        p = _array_to_lists(p, kind, where, max_dim=1)
    if isinstance(p, (str,) + _BYTES) or not isinstance(p, Sequence):
        raise PromptError(f"{where} must be a list of token ids, got {short_repr(p)} ({type(p).__name__})")
    for j, t in enumerate(p):
        if not _is_int(t):
            nested = isinstance(t, Sequence) and not isinstance(t, str) or _array_kind(t) is not None
            why = ("nested too deeply: token ids go at most two levels deep, [[ids], [ids]]" if nested else
                   "token ids are integers, not booleans" if is_bool(t) else "token ids are integers")
            raise PromptError(f"{where}[{j}] is {short_repr(t)} ({type(t).__name__}): {why}")
    ids = [int(t) for t in p]
    if not ids:
        raise PromptError(f"{where} is an empty list of token ids; give at least one token")
    _check_ids(ids, where, vocab, mask_id)
    return ids


def _check_ids(ids: list[int], where: str, vocab: int, mask_id: int, text: bool = False) -> None:
    bad = [j for j, t in enumerate(ids) if not 0 <= t < vocab]
    if bad:
        shown = ", ".join(f"{ids[j] if abs(ids[j]) < 10**12 else short_repr(ids[j], 24)} at {j}" for j in bad[:5])
        raise PromptError(f"{where}: token ids outside the vocabulary [0, {vocab}): {shown}"
                          f"{' ...' if len(bad) > 5 else ''} ({len(bad)} in all)")
    if mask_id in ids:
        src = f"the text contains {MASK_TEXT}" if text else f"position {ids.index(mask_id)} is the mask token"
        raise PromptError(f"{where}: {src} (id {mask_id}); a prompt must be fully known text, and the mask token "
                          "marks the positions still to generate")


def _text(p: str, where: str, tokenizer: Tokenizer, chat: bool, vocab: int, mask_id: int) -> list[int]:
    try:
        check_text(p, where)
    except TokenizerError as e:
        raise PromptError(str(e)) from None
    if not p.strip():
        raise PromptError(f"{where} is {'empty' if not p else 'only whitespace'} ({short_repr(p, 24)}); give the "
                          "text to answer")
    ids = tokenizer.encode_chat(p) if chat else tokenizer.encode(p)
    if not ids:
        raise PromptError(f"{where} encodes to zero tokens; give a non-empty prompt")
    _check_ids(ids, where, vocab, mask_id, text=True)
    return ids


def encode_prompts(prompt: Any, tokenizer: Tokenizer, *, vocab_size: int, mask_id: int,
                   chat: bool | None = None) -> list[list[int]]:
    """A prompt, a batch of prompts, token ids or a batch of token ids -> one list of ids per prompt, each checked
    (non-empty, ids in [0, vocab_size), no mask token). Strings get the chat template when chat is True, or None and
    the tokenizer has one; ids are used as given. Raises PromptError naming the prompt and position at fault."""
    if chat is not None and not isinstance(chat, bool):
        raise PromptError(f"chat must be True, False or None (the checkpoint's default), got {short_repr(chat)} "
                          f"({type(chat).__name__})")
    if chat and not tokenizer.is_chat:
        raise PromptError("chat=True, but the checkpoint has no chat_template (a Base model); pass chat=False or "
                          "leave chat unset")
    use_chat = tokenizer.is_chat if chat is None else chat
    kind = _array_kind(prompt)
    if kind is not None:
        prompt = _array_to_lists(prompt, kind, "the prompt", max_dim=2)
    if isinstance(prompt, str):
        return [_text(prompt, "the prompt", tokenizer, use_chat, vocab_size, mask_id)]
    if isinstance(prompt, _BYTES):
        raise PromptError(f"the prompt is {type(prompt).__name__}: decode it to a str first (e.g. "
                          "data.decode('utf-8')), or pass a list of ints if these are token ids")
    if not isinstance(prompt, Sequence) or not prompt:
        hint = "; for a conversation use Runtime.chat(messages)" if isinstance(prompt, dict) else ""
        got = "an empty " + type(prompt).__name__ if isinstance(prompt, Sequence) else \
            f"{short_repr(prompt)} ({type(prompt).__name__})"
        raise PromptError(f"prompt must be {_FORMS}; got {got}{hint}")
    if all(_is_int(t) for t in prompt):
        return [_ids(prompt, "the prompt", vocab_size, mask_id)]
    if all(isinstance(t, str) for t in prompt):
        return [_text(p, f"prompt[{b}]", tokenizer, use_chat, vocab_size, mask_id) for b, p in enumerate(prompt)]

    def form(t):
        if isinstance(t, str):
            return "str"
        if _is_int(t):
            return "int"
        if _array_kind(t) is not None or isinstance(t, Sequence) and not isinstance(t, _BYTES):
            return "list"
        return None
    forms = [form(t) for t in prompt]
    if "list" in forms and all(f == "list" for f in forms):
        return [_ids(p, f"prompt[{b}]", vocab_size, mask_id) for b, p in enumerate(prompt)]
    odd = next((b for b, f in enumerate(forms) if f is None), None)
    if odd is not None:
        t = prompt[odd]
        why = ("token ids are integers, not booleans" if is_bool(t) else
               "decode bytes to a str first" if isinstance(t, _BYTES) else
               "each item must be a str (a batch of texts), an int (one prompt of ids) or a list of ids (a batch)")
        raise PromptError(f"prompt[{odd}] is {short_repr(t)} ({type(t).__name__}): {why}")
    other = next(b for b, f in enumerate(forms) if f != forms[0])
    article = {"str": "a str", "int": "an int", "list": "a list"}
    raise PromptError(f"the prompt list mixes kinds: prompt[0] is {article[forms[0]]} but prompt[{other}] is "
                      f"{article[forms[other]]}; give strings (a batch of texts), token ids (one prompt) or lists of "
                      "ids (a batch), not a mix")


def check_messages(messages: Any) -> None:
    """A chat conversation: a non-empty list of {'role': str, 'content': str} dicts whose contents are valid Unicode,
    the last one the user's with some text in it. Raises PromptError naming the message."""
    try:
        check_conversation(messages)
    except TokenizerError as e:
        raise PromptError(str(e)) from None
    last = messages[-1]
    if last["role"] != "user":
        raise PromptError(f"the last message must be the user's, got role {short_repr(last['role'])}")
    if not last["content"].strip():
        raise PromptError(f"messages[{len(messages) - 1}]['content'] (the user's turn) is "
                          f"{'empty' if not last['content'] else 'only whitespace'}; give the text to answer")
