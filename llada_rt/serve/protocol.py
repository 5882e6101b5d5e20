"""The OpenAI wire format: request bodies of /v1/completions and /v1/chat/completions checked and turned into a JobSpec
(one engine row per choice), OpenAI's error body, and the response and stream-chunk objects."""
from __future__ import annotations

import dataclasses
import math
import re
import secrets
import time

from ..generation_config import FIELDS, GenerationConfig, GenerationConfigError, make_config

# LLaDA options accepted as extra body fields: every GenerationConfig field but gen_length (max_tokens sets it) and
# the two with an OpenAI name of their own.
LLADA_FIELDS = tuple(f for f in FIELDS if f not in ("gen_length", "temperature", "seed"))
CANVAS_FIELD = "llada_canvas"   # extension: each stream chunk carries the provisional canvas of the step

COMMON_FIELDS = ("model", "max_tokens", "temperature", "seed", "stop", "n", "stream", "stream_options", "user",
                 "top_p", CANVAS_FIELD) + LLADA_FIELDS
ENDPOINT_FIELDS = {"completion": ("prompt",), "chat": ("messages", "max_completion_tokens")}

# OpenAI fields this server does not implement, accepted only at their no-op value (what a client may send by
# default); any other value is a 400 naming the field.
NO_OP = {
    "top_p": lambda v: v is None or v == 1, "frequency_penalty": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0), "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0), "echo": lambda v: v in (None, False), "suffix": lambda v: v is None,
    "best_of": lambda v: v in (None, 1), "logit_bias": lambda v: not v, "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"), "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"), "parallel_tool_calls": lambda v: v in (None, False),
    "response_format": lambda v: v is None or v == {"type": "text"}, "store": lambda v: v in (None, False),
    "metadata": lambda v: not v, "service_tier": lambda v: v in (None, "auto", "default"),
    "modalities": lambda v: v in (None, ["text"]), "audio": lambda v: v is None, "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None, "web_search_options": lambda v: v is None,
}
WHY_UNSUPPORTED = {
    "top_p": "LLaDA samples with Gumbel-max over the whole distribution; only top_p=1 is supported",
    "logprobs": "log-probabilities are not returned by this server",
    "top_logprobs": "log-probabilities are not returned by this server",
    "best_of": "best_of is not supported; use n",
}

# JSON types of the fields: int, number, bool, str (None is 'not given' for every optional field)
_INT = ("max_tokens", "max_completion_tokens", "seed", "n", "steps", "block_length")
_NUM = ("temperature", "top_p", "threshold", "factor", "cfg_scale")
_BOOL = ("stream", CANVAS_FIELD, "early_stop", "logits_eos_inf", "confidence_eos_eot_inf", "cuda_graph")
_STR = ("model", "user", "mode", "remasking")
CHAT_ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An HTTP error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclasses.dataclass
class ChoiceSpec:
    """One engine row: choice `index` of the response."""
    index: int
    prompt_ids: list[int]
    config: GenerationConfig


@dataclasses.dataclass
class JobSpec:
    """A checked request: its choices (prompt i, sample j is choice i * n + j) and how to answer."""
    kind: str                  # 'completion' or 'chat'
    model: str
    choices: list[ChoiceSpec]
    prompt_tokens: int         # each prompt counted once (not per sample)
    max_tokens: int
    stop: list[str]
    stream: bool
    include_usage: bool
    canvas: bool
    id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(12))
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


@dataclasses.dataclass
class ServeSettings:
    """What the server answers with when a request does not say: model name, defaults, capacity."""
    model_name: str
    max_rows: int
    max_queue: int
    defaults: dict             # generation options over the checkpoint's generation_config.json (no gen_length)
    max_tokens: int            # the answer limit of a request that gives none


def parse_request(kind: str, body, rt, settings: ServeSettings) -> JobSpec:
    """The JobSpec of a /v1/completions (kind 'completion') or /v1/chat/completions (kind 'chat') body; raises
    APIError (400 naming the field, 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", None)
    allowed = set(COMMON_FIELDS) | set(ENDPOINT_FIELDS[kind]) | set(NO_OP)
    for name in body:
        if name not in allowed:
            hint = "; use max_tokens (the answer limit)" if name == "gen_length" else ""
            raise bad(f"unrecognized request field {name!r}{hint}", name, "unknown_parameter")
    for name, ok in NO_OP.items():
        if name in body and not ok(body[name]):
            why = WHY_UNSUPPORTED.get(name, f"{name} is not supported by this server")
            raise bad(f"{why} (got {name}={body[name]!r})", name, "unsupported_parameter")
    _check_types(body)
    model = body.get("model")
    if model is None:
        raise bad("model is required (GET /v1/models lists the served model)", "model", "missing_required_parameter")
    if model != settings.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {settings.model_name!r}",
                       param="model", code="model_not_found")
    stream = bool(body.get("stream"))
    include_usage = _stream_options(body.get("stream_options"), stream)
    if kind == "chat":
        if "max_tokens" in body and "max_completion_tokens" in body:
            raise bad("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        prompts, prompt_param = [_chat_prompt(body.get("messages"), rt)], "messages"
        limit_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    else:
        prompts, prompt_param = _completion_prompts(body.get("prompt"), rt), "prompt"
        limit_field = "max_tokens"
    max_tokens = body.get(limit_field)
    if max_tokens is None:
        max_tokens = settings.max_tokens
    elif max_tokens <= 0:
        raise bad(f"{limit_field} must be a positive integer, got {max_tokens}", limit_field)
    n = body.get("n")
    n = 1 if n is None else n
    if n < 1:
        raise bad(f"n must be at least 1, got {n}", "n")
    rows = n * len(prompts)
    if rows > settings.max_rows + settings.max_queue:
        raise bad(f"this request needs {rows} rows (n={n} x {len(prompts)} prompt(s)), more than the server holds "
                  f"({settings.max_rows} in flight + {settings.max_queue} queued); lower n or send fewer prompts", "n")
    config = _config(body, rt, settings, max_tokens, limit_field)
    longest = max(len(p) for p in prompts)
    try:
        config.validate(longest, rt.config.max_sequence_length, rt.device.type)
    except GenerationConfigError as e:
        prompt_too_long = longest >= rt.config.max_sequence_length
        raise bad(_explain(str(e)), _param_of(str(e), prompt_param if prompt_too_long else limit_field,
                                              limit_field)) from None
    if n > 1 and config.seed + n > 2 ** 63:
        raise bad(f"seed + n must stay below 2**63 (choice j uses seed + j), got seed={config.seed}, n={n}", "seed")
    choices = [ChoiceSpec(i * n + j, p, dataclasses.replace(config, seed=config.seed + j))
               for i, p in enumerate(prompts) for j in range(n)]
    return JobSpec(kind=kind, model=model, choices=choices, prompt_tokens=sum(len(p) for p in prompts),
                   max_tokens=max_tokens, stop=_stop(body.get("stop")), stream=stream, include_usage=include_usage,
                   canvas=bool(body.get(CANVAS_FIELD)))


def _check_types(body: dict) -> None:
    for name, v in body.items():
        if v is None:
            continue
        if name in _INT and (isinstance(v, bool) or not isinstance(v, int)):
            raise bad(f"{name} must be an integer, got {v!r}", name)
        if name in _NUM and (isinstance(v, bool) or not isinstance(v, (int, float)) or
                             isinstance(v, float) and not math.isfinite(v)):   # json.loads takes NaN, Infinity
            raise bad(f"{name} must be a finite number, got {v!r}", name)
        if name in _BOOL and not isinstance(v, bool):
            raise bad(f"{name} must be true or false, got {v!r}", name)
        if name in _STR and not isinstance(v, str):
            raise bad(f"{name} must be a string, got {v!r}", name)


def _stream_options(opts, stream: bool) -> bool:
    if opts is None:
        return False
    if not stream:
        raise bad("stream_options is only allowed with stream=true", "stream_options")
    if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(opts.get("include_usage", False),
                                                                                     bool):
        raise bad(f"stream_options must be {{\"include_usage\": true|false}}, got {opts!r}", "stream_options")
    return bool(opts.get("include_usage"))


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(f"stop must be a string or a list of strings, got {stop!r}", "stop")
    if any(s == "" for s in stops):
        raise bad("stop strings must not be empty", "stop")
    return stops


def _completion_prompts(prompt, rt) -> list[list[int]]:
    """Raw text (no chat template, as OpenAI's completions), a list of texts, token ids or lists of token ids."""
    if prompt is None:
        raise bad("prompt is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and not prompt:
        raise bad("prompt must not be an empty list", "prompt")
    if isinstance(prompt, list) and all(isinstance(p, list) for p in prompt) and any(not p for p in prompt):
        raise bad("a prompt of token ids must not be empty", "prompt")
    flat = [t for p in prompt for t in (p if isinstance(p, list) else [p])] if isinstance(prompt, list) else []
    if any(isinstance(t, bool) for t in flat):
        raise bad("token ids must be integers, not booleans", "prompt")
    try:
        return rt.encode_prompts(prompt, chat=False)
    except (ValueError, TypeError) as e:
        raise bad(f"prompt: {e}", "prompt") from None


def _chat_prompt(messages, rt) -> list[int]:
    if messages is None:
        raise bad("messages is required", "messages", "missing_required_parameter")
    if not rt.tokenizer.is_chat:
        raise bad("this model has no chat template (a Base model); use /v1/completions with plain text", "messages",
                  "model_not_chat")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content, got {m!r}", where)
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise bad(f"{where}: field(s) {', '.join(sorted(extra))} are not supported (no tools or audio)", where,
                      "unsupported_parameter")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}", f"{where}.role")
        turns.append({"role": "system" if role == "developer" else role, "content": _content(m.get("content"), where)})
    try:
        (ids,) = rt.encode_prompts([rt.tokenizer.encode_chat(turns)], chat=False)
    except ValueError as e:
        raise bad(f"messages: {e}", "messages") from None
    return ids


def _content(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = []
        for j, part in enumerate(content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                          f"supported, got type {part.get('type')!r}", f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where}.content must be a string or a list of text parts, got {content!r}", f"{where}.content")


def _config(body: dict, rt, settings: ServeSettings, max_tokens: int, limit_field: str) -> GenerationConfig:
    """The GenerationConfig: the request's options over the server's defaults over generation_config.json. The
    canvas is max_tokens rounded up to the block length; steps follow it unless given (or the canvas is the
    default's)."""
    defaults = {**rt.generation_defaults, **settings.defaults}
    options = {k: body[k] for k in LLADA_FIELDS + ("temperature", "seed") if body.get(k) is not None}
    try:
        base = make_config({k: v for k, v in options.items() if k == "block_length"}, defaults)
    except GenerationConfigError as e:
        raise bad(str(e), "block_length") from None
    block = base.block_length
    if isinstance(block, int) and block > 0:
        gen_length = -(-max_tokens // block) * block
        if gen_length != base.gen_length:
            options["gen_length"] = gen_length
    try:
        return make_config(options, defaults)
    except GenerationConfigError as e:
        raise bad(str(e), limit_field) from None


def _explain(message: str) -> str:
    if "gen_length" in message:
        message += " (gen_length is max_tokens rounded up to block_length)"
    return message


def _param_of(message: str, prompt_param: str, limit_field: str) -> str | None:
    """The request field a GenerationConfigError is about (its message starts with the option's name); a prompt that
    does not fit with the answer is about `prompt_param` (the field to change: the prompt itself when it alone is
    too long, else max_tokens)."""
    m = re.match(r"\w+", message)
    name = m.group(0) if m else ""
    if name == "prompt":
        return prompt_param
    if name == "gen_length":
        return limit_field
    return name if name in FIELDS else None


# -- responses ---------------------------------------------------------------------------------------------------------
OBJECT = {"completion": ("text_completion", "text_completion"), "chat": ("chat.completion", "chat.completion.chunk")}
ID_PREFIX = {"completion": "cmpl-", "chat": "chatcmpl-"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(spec: JobSpec, chunk: bool) -> dict:
    return {"id": ID_PREFIX[spec.kind] + spec.id, "object": OBJECT[spec.kind][chunk], "created": spec.created,
            "model": spec.model}


def response(spec: JobSpec, texts: list[str], finish: list[str], completion_tokens: int) -> dict:
    """The non-streamed answer."""
    if spec.kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finish))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finish))]
    return {**_envelope(spec, False), "choices": choices, "usage": usage(spec.prompt_tokens, completion_tokens)}


def chunk(spec: JobSpec, index: int, text: str | None, finish: str | None, canvas: str | None = None,
          nfe: int | None = None, role: bool = False) -> dict:
    """One stream chunk for one choice: `text` is the delta (None: none), `finish` its finish_reason once final."""
    if spec.kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    if canvas is not None:
        choice["llada"] = {"canvas": canvas, "nfe": nfe}
    out = {**_envelope(spec, True), "choices": [choice]}
    if spec.include_usage:
        out["usage"] = None
    return out


def usage_chunk(spec: JobSpec, completion_tokens: int) -> dict:
    return {**_envelope(spec, True), "choices": [], "usage": usage(spec.prompt_tokens, completion_tokens)}
