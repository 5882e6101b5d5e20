"""Property-based fuzzing of the readers of a checkpoint: the safetensors header, config.json, the sharded index,
tokenizer_config.json, generation_config.json, and text to encode. Whatever they are given, they return a checked
value or raise one of the documented errors (ConfigError, CheckpointError, TokenizerError: ValueError subclasses);
any other exception fails. What they accept is checked against an independent oracle (the safetensors library for
headers; the facts the rest of the runtime relies on for the others).

Bounded for the default run: a fixed number of examples, derandomized (the same examples on every run), no example
database. LLADA_RT_FUZZ_EXAMPLES=N runs N random examples per test instead."""
import json
import math
import os
import shutil
import string
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from llada_rt.config import ConfigError, LLaDAConfig, load_config, load_generation_config
from llada_rt.testing import SMALL_VOCAB, special_tokens, tiny_config, tokenizer_config, tokenizer_json
from llada_rt.tokenizer import Tokenizer, TokenizerError
from llada_rt.weights import INDEX_FILE, SINGLE_FILE, CheckpointError, checkpoint_files, read_header

_N = os.environ.get("LLADA_RT_FUZZ_EXAMPLES")
# the deadline only catches a hang (an example takes milliseconds); it is not a speed assertion
BOUNDED = settings(max_examples=int(_N) if _N else 60, derandomize=not _N, database=None,
                   deadline=timedelta(seconds=20), suppress_health_check=[HealthCheck.too_slow])

EDGE_INTS = [0, 1, -1, 2, 3, 16, 64, 255, 256, 2**31 - 1, 2**31, 2**63, -2**63, 10**30]
ints = st.one_of(st.integers(-300, 300), st.sampled_from(EDGE_INTS), st.integers())
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-5, 1e-50, 1.5]))
# text with lone surrogates mixed in (hypothesis' characters() leaves them out)
texts = st.lists(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)), max_size=12).map("".join)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(texts, kids, max_size=4)), max_leaves=12)


def _numeric_string(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def attempt(fn, error: type):
    """fn(), or None when it raises `error` (a documented rejection); any other exception propagates and fails."""
    try:
        value = fn()
    except error as e:
        print(f"{type(e).__name__}: {str(e)[:200]}")
        event("rejected")
        return None
    event("accepted")
    return value


@pytest.fixture(scope="module")
def work():
    d = Path(tempfile.mkdtemp(prefix="llada_fuzz_"))
    yield d
    shutil.rmtree(d)


def _header_file(path: Path, header_bytes: bytes, data: int, length: int | None = None) -> None:
    n = len(header_bytes) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header_bytes + bytes(data))


def _library_view(path: Path):
    """(names, shapes, dtypes) as the safetensors library reads the file, or None if it refuses it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception:  # the library's own error types; refusing is an answer here
        return None


def _check_header_against_library(path: Path, raw: bytes):
    try:
        header = read_header(path)
    except CheckpointError as e:
        ours = None
        msg = str(e)
    else:
        ours = {k: (v["shape"], v["dtype"]) for k, v in header.items() if k != "__metadata__"}
        msg = ""
    lib = _library_view(path)
    duplicates = b'"' in raw and ours is None and "appears twice" in msg  # refused on purpose; the library keeps one
    print(f"ours={ours} library={lib} {msg[:160]}")
    event("accepted" if ours is not None else "rejected")
    if not duplicates:
        assert (ours is None) == (lib is None), "read_header and the safetensors library disagree on this file"
    if ours is not None:
        assert ours == lib


ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
VALID_HEADER = {"__metadata__": {"format": "pt"}, "a": ENTRY,
                "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
                "c": {"dtype": "I8", "shape": [0], "data_offsets": [22, 22]}}
VALID_DATA = 22
FIELDS = ("dtype", "shape", "data_offsets")
field_values = st.one_of(json_values, st.sampled_from(["F32", "BF16", "F16", "I8", "F4", "Q4", "f32"]),
                         st.lists(st.integers(-2, 40), max_size=3))


@BOUNDED
@given(data=st.binary(max_size=200), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)), pad=st.integers(0, 64))
def test_read_header_random_bytes(work, data, length, pad):
    path = work / "random.safetensors"
    _header_file(path, data, pad, length)
    _check_header_against_library(path, data)


@BOUNDED
@given(edits=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "__metadata__", "d"]),
                                st.sampled_from(FIELDS + ("(entry)", "(delete)")), field_values), max_size=4),
       data=st.integers(0, 40), spaces=st.integers(0, 3))
def test_read_header_mutated(work, edits, data, spaces):
    header = json.loads(json.dumps(VALID_HEADER))
    for name, field, value in edits:
        if field == "(delete)":
            header.pop(name, None)
        elif field == "(entry)" or not isinstance(header.get(name), dict):
            header[name] = value
        else:
            header[name][field] = value
    raw = (json.dumps(header) + " " * spaces).encode("utf-8", "surrogatepass")
    path = work / "mutated.safetensors"
    _header_file(path, raw, data)
    _check_header_against_library(path, raw)


# Element sizes of a few safetensors dtypes, from the format's description (F4 packs two per byte).
SOME_DTYPE_BITS = {"F32": 32, "BF16": 16, "F16": 16, "F64": 64, "I8": 8, "BOOL": 8, "F4": 4}


@st.composite
def near_valid_headers(draw):
    """A valid header (tensors tiling the data section, in random order), then at most one small perturbation."""
    entries, offset = [], 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(SOME_DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        numel = math.prod(shape)
        size = -(-numel * SOME_DTYPE_BITS[dtype] // 8)
        entries.append([f"t{i}", {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}])
        offset += size
    data = offset
    kind = draw(st.sampled_from(["none", "offset", "data", "shape", "dtype"]))
    if entries and kind != "none":
        e = draw(st.sampled_from(entries))[1]
        delta = draw(st.sampled_from([-2, -1, 1, 2]))
        if kind == "offset":
            e["data_offsets"][draw(st.integers(0, 1))] += delta
        elif kind == "shape":
            e["shape"] = e["shape"] + [2] if draw(st.booleans()) else e["shape"][:-1]
        elif kind == "dtype":
            e["dtype"] = draw(st.sampled_from(sorted(SOME_DTYPE_BITS)))
    if kind == "data":
        data = max(0, data + draw(st.sampled_from([-2, -1, 1, 2])))
    order = draw(st.permutations(range(len(entries))))
    return {entries[i][0]: entries[i][1] for i in order}, data


@BOUNDED
@given(header_data=near_valid_headers())
def test_read_header_near_valid(work, header_data):
    header, data = header_data
    raw = json.dumps(header).encode()
    path = work / "near.safetensors"
    _header_file(path, raw, data)
    _check_header_against_library(path, raw)


BASE_CONFIG = tiny_config(SMALL_VOCAB).to_dict()
CONFIG_KEYS = sorted(BASE_CONFIG) + ["multi_query_attention", "clip_qkv", "unknown_key"]


def _check_config(cfg: LLaDAConfig, d: dict) -> None:
    """What the rest of the runtime assumes of a loaded config."""
    for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
                 "max_sequence_length"):
        v = getattr(cfg, name)
        assert type(v) is int and 1 <= v < 2**31, (name, v)
    assert cfg.d_model % cfg.n_heads == 0 and cfg.head_dim % 2 == 0 and cfg.n_heads % cfg.n_kv_heads == 0
    assert cfg.embedding_size >= cfg.vocab_size
    for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, name)
        assert type(v) is int and 0 <= v < cfg.vocab_size, (name, v)
    assert cfg.mask_token_id not in (cfg.eos_token_id, cfg.pad_token_id)
    assert type(cfg.rope_theta) is float and math.isfinite(cfg.rope_theta) and cfg.rope_theta >= 1
    assert type(cfg.rms_norm_eps) is float and math.isfinite(cfg.rms_norm_eps) and cfg.rms_norm_eps > 0
    assert type(cfg.weight_tying) is bool and type(cfg.rope_full_precision) is bool
    for key in ("rope_theta", "rms_norm_eps"):   # given numbers are taken as they are, never parsed from strings
        if d.get(key) is not None:
            assert _numeric_string(d[key]) and getattr(cfg, key) == d[key]
    assert LLaDAConfig.from_dict(cfg.to_dict()) == cfg


@BOUNDED
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), st.one_of(json_values, st.just("(delete)")),
                               max_size=5))
def test_config_from_dict(changes):
    d = dict(BASE_CONFIG)
    for k, v in changes.items():
        if v == "(delete)":
            d.pop(k, None)
        else:
            d[k] = v
    cfg = attempt(lambda: LLaDAConfig.from_dict(d), ConfigError)
    if cfg is not None:
        _check_config(cfg, d)


@BOUNDED
@given(text=st.one_of(st.binary(max_size=120), json_values.map(lambda v: json.dumps(v).encode("utf-8",
                                                                                               "surrogatepass"))))
def test_load_config_random_file(work, text):
    (work / "config.json").write_bytes(text)
    cfg = attempt(lambda: load_config(work), ConfigError)
    if cfg is not None:
        _check_config(cfg, json.loads(text))


SHARD_NAMES = [SINGLE_FILE, "missing.safetensors", "../" + SINGLE_FILE, "/" + SINGLE_FILE, "sub/" + SINGLE_FILE,
               "", ".", "..", "a\\b", "x\x00y", "sub"]


@pytest.fixture(scope="module")
def index_dir(work):
    d = work / "index"
    (d / "sub").mkdir(parents=True)
    _header_file(d / SINGLE_FILE, json.dumps({"w": ENTRY}).encode(), 16)
    shutil.copy(d / SINGLE_FILE, d / "sub" / SINGLE_FILE)
    shutil.copy(d / SINGLE_FILE, work / SINGLE_FILE)   # what '../model.safetensors' would reach
    return d


@BOUNDED
@given(index=st.one_of(json_values, st.fixed_dictionaries(
    {"weight_map": st.one_of(json_values, st.dictionaries(texts, st.one_of(st.sampled_from(SHARD_NAMES), json_values),
                                                          max_size=4))})))
def test_checkpoint_files_random_index(index_dir, index):
    (index_dir / INDEX_FILE).write_text(json.dumps(index), encoding="utf-8", errors="surrogatepass")
    files = attempt(lambda: checkpoint_files(index_dir), CheckpointError)
    if files is None:
        return
    assert set(files) == set(index["weight_map"])
    for p in files.values():   # only files of the checkpoint directory itself
        assert p.parent == index_dir and p.is_file() and p.name == os.path.basename(p.name)


TEMPLATE_BITS = ["{{ bos_token }}", "{% for m in messages %}", "{% endfor %}", "{{ m['content'] }}", "{{",
                 "}}", "{%", "%}", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<s>", "x", "\n",
                 "{{ raise_exception('no') }}", "{% if add_generation_prompt %}", "{% endif %}", "{{ eos_token }}"]
templates = st.lists(st.sampled_from(TEMPLATE_BITS), max_size=6).map("".join)
token_texts = st.one_of(st.sampled_from(list(special_tokens(SMALL_VOCAB).values()) + ["<s>", "", "a"]), json_values)
token_values = st.one_of(token_texts, st.fixed_dictionaries({"content": token_texts}))
decoders = st.one_of(json_values, st.dictionaries(st.one_of(st.integers(0, 300).map(str), texts),
                                                  st.one_of(st.fixed_dictionaries({"content": token_texts}),
                                                            json_values), max_size=4))


@pytest.fixture(scope="module")
def tok_dir(work):
    d = work / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json(SMALL_VOCAB)))
    return d


@BOUNDED
@given(changes=st.fixed_dictionaries({}, optional={
    "chat_template": st.one_of(templates, json_values, st.lists(st.fixed_dictionaries(
        {"name": st.sampled_from(["default", "tool_use"]), "template": templates}), max_size=2)),
    "bos_token": token_values, "eos_token": token_values, "pad_token": token_values,
    "added_tokens_decoder": decoders}), whole=st.one_of(st.none(), json_values))
def test_tokenizer_config_random(tok_dir, changes, whole):
    cfg = tokenizer_config(chat=True, vocab_size=SMALL_VOCAB) if whole is None else whole
    if isinstance(cfg, dict):
        cfg.update(changes)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8", errors="surrogatepass")
    tok = attempt(lambda: Tokenizer(tok_dir), TokenizerError)
    if tok is None:
        return
    assert tok.is_chat == bool(tok.chat_template)
    assert all(isinstance(i, int) and 0 <= i < 2**31 for i in tok.stop_ids + [tok.mask_id])
    if tok.is_chat:
        try:
            ids = tok.encode_chat("hello")
        except TokenizerError as e:   # a template may refuse a conversation; it must say so as a TokenizerError
            print("render:", e)
        else:
            assert all(isinstance(i, int) for i in ids)


@BOUNDED
@given(value=st.one_of(json_values, st.dictionaries(st.sampled_from(["eos_token_id", "bos_token_id", "pad_token_id",
                                                                     "gen_length", "temperature", "x"]),
                                                    json_values, max_size=4)),
       raw=st.one_of(st.none(), st.binary(max_size=60)))
def test_load_generation_config_random(work, value, raw):
    d = work / "gen"
    d.mkdir(exist_ok=True)
    text = raw if raw is not None else json.dumps(value).encode("utf-8", "surrogatepass")
    (d / "generation_config.json").write_bytes(text)
    got = attempt(lambda: load_generation_config(d, vocab_size=SMALL_VOCAB), ConfigError)
    if got is None:
        return
    assert isinstance(got, dict)
    todo = list(got.values())
    while todo:   # no NaN or infinity anywhere
        v = todo.pop()
        assert not (isinstance(v, float) and not math.isfinite(v))
        todo.extend(v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())
    for k, v in got.items():
        if k.endswith("_token_id") and v is not None:
            for t in v if isinstance(v, list) else [v]:
                assert type(t) is int and 0 <= t < SMALL_VOCAB


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(chat=True, vocab_size=SMALL_VOCAB)))
    return Tokenizer(tok_dir)


@BOUNDED
@given(text=st.one_of(texts, st.text(string.printable, max_size=20), st.binary(max_size=8), st.integers(),
                      st.none(), st.lists(st.integers(), max_size=3)))
def test_encode_random_text(tokenizer, text):
    surrogate = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) < 0xE000), None) \
        if isinstance(text, str) else None
    for encode in (tokenizer.encode, tokenizer.encode_chat):
        try:
            ids = encode(text)
        except TokenizerError as e:
            print("TokenizerError:", e)
            assert not isinstance(text, str) or surrogate is not None
            if surrogate is not None and encode is tokenizer.encode:
                assert f"position {surrogate}" in str(e)
            continue
        assert isinstance(text, str) and surrogate is None
        assert all(isinstance(i, int) and 0 <= i < SMALL_VOCAB for i in ids)
        if encode is tokenizer.encode and set(text) <= set(string.printable):
            assert tokenizer.decode(ids) == text   # every printable character is one token of this tokenizer
