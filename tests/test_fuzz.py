"""Property-based fuzzing of the readers of a checkpoint (the safetensors header, config.json, the sharded index,
tokenizer_config.json, generation_config.json, text to encode) and of what a caller passes (generation options through
make_config and GenerationConfig.validate, prompts through encode_prompts). Whatever they are given, they return a
checked value or raise one of the documented errors (ConfigError, CheckpointError, TokenizerError,
GenerationConfigError, PromptError: ValueError subclasses); any other exception fails. What they accept is checked
against an independent oracle (the safetensors library for headers, the values given for token ids, the tokenizer for
text; the facts the rest of the runtime relies on for the others), and accepted generation options are run:
generate() on a tiny checkpoint must finish.

Bounded for the default run: a fixed number of examples, derandomized (the same examples on every run), no example
database. LLADA_RT_FUZZ_EXAMPLES=N runs N random examples per test instead."""
import json
import math
import os
import shutil
import string
import struct
import tempfile
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from llada_rt.config import ConfigError, LLaDAConfig, load_config, load_generation_config
from llada_rt.generation_config import (FIELDS as OPTION_FIELDS, MAX_BLOCK_LENGTH, GenerationConfig,
                                        GenerationConfigError, make_config)
from llada_rt.prompts import PromptError, encode_prompts
from llada_rt.testing import (SMALL_VOCAB, special_id, special_tokens, tiny_config, tokenizer_config, tokenizer_json,
                              write_checkpoint)
from llada_rt.tokenizer import MASK_TEXT, Tokenizer, TokenizerError
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


# ---- generation options and prompts ---------------------------------------------------------------------------------

OPTION_STRINGS = ["false", "true", "True", "0", "1", "32", "0.5", "nan", "exact", "prefix", "dual", "turbo",
                  "low_confidence", "random", "", " "]


def _numpy_scalars():
    import numpy as np

    return st.one_of(st.integers(-2**63, 2**63 - 1).map(np.int64), st.integers(0, 2**16 - 1).map(np.uint16),
                     st.floats(width=32).map(np.float32), st.booleans().map(np.bool_))


option_values = st.one_of(st.none(), st.booleans(), ints, floats, st.sampled_from(OPTION_STRINGS), texts,
                          _numpy_scalars(), st.lists(st.integers(0, 64), max_size=2), st.binary(max_size=3))
NEAR_VALID = {   # values near the valid ones, for options that often pass
    "gen_length": [1, 2, 3, 4, 6, 8, 12, 16, 0, -4, 16.0, "8", True],
    "block_length": [1, 2, 3, 4, 8, 16, 0, 2048, 4.0, None],
    "steps": [None, 1, 2, 4, 8, 16, 32, 0, 3.0],
    "temperature": [0, 0.0, 0.5, 1, 2.5, 1e30, -1.0, math.inf, math.nan, "0.5"],
    "cfg_scale": [0, 0.0, 0.5, 2.0, 100.0, 101.0, math.nan],
    "remasking": ["low_confidence", "random", "lowest", None],
    "logits_eos_inf": [False, True, "false", 0],
    "confidence_eos_eot_inf": [False, True, None],
    "seed": [0, 1, 12345, 2**63 - 1, 2**63, -1, 1.0, "7"],
    "mode": ["exact", "prefix", "dual", "fast", 0],
    "threshold": [None, 1e-9, 0.3, 0.9, 1.0, 1, 0.0, 1.5, math.nan],
    "factor": [None, 1e-9, 0.5, 1.0, 1e300, 0.0, math.inf],
    "early_stop": [False, True, "true"],
    "cuda_graph": [False, True],
}
small_options = st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in NEAR_VALID.items()})


@st.composite
def runnable_options(draw):
    """A setting generate() should run (every mode, rule, sampling and EOS option, small sizes), then, one time in
    four, one option replaced by a value near the valid ones (which may or may not pass)."""
    G = draw(st.sampled_from([1, 2, 4, 6, 8, 12]))
    N = draw(st.sampled_from([d for d in range(1, G + 1) if G % d == 0]))
    opts = dict(gen_length=G, block_length=N, mode=draw(st.sampled_from(["exact", "prefix", "dual"])),
                seed=draw(st.integers(0, 2**63 - 1)), temperature=draw(st.sampled_from([0.0, 0.7, 3.0])),
                early_stop=draw(st.booleans()), logits_eos_inf=draw(st.booleans()),
                confidence_eos_eot_inf=draw(st.booleans()))
    steps = draw(st.sampled_from([None] + [G // N * k for k in range(1, N + 1)]))
    if steps is not None:
        opts["steps"] = steps
    rule = draw(st.sampled_from(["topk", "threshold", "factor"]))
    if rule == "threshold":
        opts["threshold"] = draw(st.floats(1e-6, 1.0))
    elif rule == "factor":
        opts["factor"] = draw(st.floats(1e-6, 10.0))
    else:
        opts["remasking"] = draw(st.sampled_from(["low_confidence", "random"]))
    if opts["mode"] == "exact" and draw(st.booleans()):
        opts["cfg_scale"] = draw(st.sampled_from([0.5, 2.0]))
    if draw(st.integers(0, 3)) == 0:
        key = draw(st.sampled_from(sorted(NEAR_VALID)))
        opts[key] = draw(st.sampled_from(NEAR_VALID[key]))
    return opts


def _check_accepted(gc: GenerationConfig) -> None:
    """What the engine relies on in a config that passed validation: plain Python values in range."""
    for name in ("gen_length", "block_length", "seed"):
        assert type(getattr(gc, name)) is int, name
    assert 1 <= gc.block_length <= MAX_BLOCK_LENGTH and gc.gen_length % gc.block_length == 0
    assert gc.steps is None or type(gc.steps) is int
    assert 1 <= gc.total_steps <= gc.gen_length and gc.total_steps % gc.num_blocks == 0
    assert 0 <= gc.seed < 2**63
    for name in ("temperature", "cfg_scale"):
        v = getattr(gc, name)
        assert type(v) is float and math.isfinite(v) and v >= 0, name
    assert gc.threshold is None or type(gc.threshold) is float and 0 < gc.threshold <= 1
    assert gc.factor is None or type(gc.factor) is float and math.isfinite(gc.factor) and gc.factor > 0
    assert gc.mode in ("exact", "prefix", "dual") and gc.remasking in ("low_confidence", "random")
    for name in ("logits_eos_inf", "confidence_eos_eot_inf", "early_stop", "cuda_graph"):
        assert type(getattr(gc, name)) is bool, name


@BOUNDED
@given(options=st.one_of(st.dictionaries(st.sampled_from(OPTION_FIELDS + ("block_len", "")), option_values,
                                         max_size=6), small_options, json_values),
       defaults=st.one_of(st.none(), st.dictionaries(st.sampled_from(OPTION_FIELDS + ("eos_token_id",)),
                                                     json_values, max_size=3)))
def test_make_config_random_options(options, defaults):
    """make_config over random options and defaults, then validate(): a checked config or GenerationConfigError (an
    option, or a default, that cannot run); nothing else."""
    gc = attempt(lambda: make_config(options, defaults, "fuzz/generation_config.json"), GenerationConfigError)
    if gc is None or attempt(lambda: gc.validate() or gc, GenerationConfigError) is None:
        return
    _check_accepted(gc)
    if not (isinstance(options, dict) and options.get("gen_length") is not None):
        return
    assert gc.gen_length == options["gen_length"]   # the caller's value wins over the file's


@BOUNDED
@given(fields=st.dictionaries(st.sampled_from(OPTION_FIELDS), option_values, max_size=5),
       prompt_len=st.one_of(st.none(), st.integers(0, 600)), device=st.sampled_from([None, "cpu", "cuda"]))
def test_generation_config_validate_random(fields, prompt_len, device):
    """GenerationConfig built directly (as the step API's add(config=...) takes it), then validated."""
    gc = GenerationConfig(**fields)
    if attempt(lambda: gc.validate(prompt_len, 512, device) or gc, GenerationConfigError) is None:
        return
    _check_accepted(gc)
    if prompt_len is not None:
        assert prompt_len + gc.gen_length <= 512


@pytest.fixture(scope="module")
def fuzz_runtime(work):
    from llada_rt import Runtime

    ckpt = write_checkpoint(work / "gen_ckpt", vocab=SMALL_VOCAB, eos_scale=0.3, max_sequence_length=64)
    return Runtime(ckpt, device="cpu")


@settings(BOUNDED, max_examples=int(_N) if _N else 25)
@given(options=runnable_options(), prompt=st.lists(st.integers(0, 100), min_size=1, max_size=12))
def test_accepted_configs_run(fuzz_runtime, options, prompt):
    """Whatever generate() accepts runs to the end: at most gen_length forwards (one per step of the fixed schedule,
    at most block_length per block for threshold/factor), an answer of gen_length ids, and a free engine after."""
    rt = fuzz_runtime
    try:
        res = rt.generate(prompt, **options)
    except GenerationConfigError as e:
        print("GenerationConfigError:", e)
        event("rejected")
        return
    event("accepted")
    gc = res.config
    print(options, "-> nfe", res.nfe, repr(res.text))
    _check_accepted(gc)
    assert 1 <= res.nfe <= gc.gen_length
    if not gc.parallel and not gc.early_stop:
        assert res.nfe == gc.total_steps
    assert res.canvas.shape == (1, len(prompt) + gc.gen_length)
    assert res.masked_left[0] <= len(res.token_ids[0])
    assert not rt.engine.active


def _tensors():
    """Tensors of every dtype torch can fill (ids, bools, floats, complex, float8...), 0-D to 3-D."""
    import torch

    def make(dtype, shape, seed):
        g = torch.Generator().manual_seed(seed)
        base = torch.randint(-3, 300, shape, generator=g)
        try:
            with warnings.catch_warnings():   # complex32 is "experimental"
                warnings.simplefilter("ignore", UserWarning)
                return base.to(dtype)
        except (RuntimeError, TypeError):   # a dtype with no conversion from int64 (quantized, sub-byte)
            return None

    dtypes = [d for d in vars(torch).values() if isinstance(d, torch.dtype)]
    return st.builds(make, st.sampled_from(sorted(set(dtypes), key=str)),
                     st.lists(st.integers(0, 3), max_size=3).map(tuple), st.integers(0, 100)).filter(
        lambda t: t is not None)


def _arrays():
    import numpy as np
    from hypothesis.extra import numpy as hnp

    dtypes = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                       hnp.complex_number_dtypes(), hnp.boolean_dtypes(), hnp.unicode_string_dtypes(max_len=3),
                       hnp.byte_string_dtypes(max_len=3), st.just(np.dtype(object)))
    return hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))


prompt_leaves = st.one_of(texts, st.text(string.printable, max_size=8), ints, st.booleans(), floats, st.none(),
                          st.binary(max_size=4), st.integers(0, 255), st.sampled_from([MASK_TEXT, " ", ""]))
prompt_values = st.one_of(
    prompt_leaves, _tensors(), _arrays(),
    st.recursive(prompt_leaves, lambda kids: st.one_of(st.lists(kids, max_size=4), st.tuples(kids, kids)),
                 max_leaves=10),
    st.lists(st.lists(st.integers(-2, 300), max_size=4), max_size=3),
    st.lists(st.integers(0, 255), min_size=1, max_size=6),
    st.lists(st.one_of(_tensors(), _arrays()), max_size=2))


def _flat_ints(v):
    """v's leaves if it is an integer array/tensor or (nested) sequence of integers, else None (the oracle of what
    encode_prompts returns for ids: the values themselves)."""
    if hasattr(v, "tolist") and hasattr(v, "dtype"):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [_flat_ints(x) for x in v]
    return v


@BOUNDED
@given(value=prompt_values, chat=st.sampled_from([None, True, False]))
def test_encode_prompts_random_values(tokenizer, value, chat):
    """Prompt encoding over random Python values, arrays and tensors: lists of checked ids, or PromptError."""
    mask_id = special_id(SMALL_VOCAB, MASK_TEXT)
    got = attempt(lambda: encode_prompts(value, tokenizer, vocab_size=SMALL_VOCAB, mask_id=mask_id, chat=chat),
                  PromptError)
    if got is None:
        return
    assert isinstance(got, list) and got
    for ids in got:
        assert ids and all(type(t) is int and 0 <= t < SMALL_VOCAB and t != mask_id for t in ids)
    if isinstance(value, str):
        want = tokenizer.encode_chat(value) if chat in (None, True) else tokenizer.encode(value)
        assert got == [want] and value.strip()
    elif isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        assert len(got) == len(value) and all(s.strip() for s in value)
    else:   # ids: exactly the values given, as one prompt or a batch
        flat = _flat_ints(value)
        assert got == ([flat] if flat and not isinstance(flat[0], list) else flat)
