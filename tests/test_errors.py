"""Every bad input of the loading path, as a table: config.json values, generation_config.json, the sharded index,
safetensors header entries, non-finite weights, tokenizer_config.json, tokenizer.json without the chat template's
special tokens, and text to encode. Each row: how the checkpoint is spoiled, the call, the error type, and the words
its message must contain (the file and the key or entry at fault, and what is expected)."""
import contextlib
import io
import json
import shutil
import struct
from typing import Callable, NamedTuple

import pytest
import torch

import llada_rt.config
from llada_rt import cli
from llada_rt.config import ConfigError, load_config
from llada_rt.generation_config import GenerationConfigError
from llada_rt.testing import SMALL_VOCAB, special_id, write_checkpoint
from llada_rt.tokenizer import EOT_TEXT, MASK_TEXT, START_HEADER_TEXT, Tokenizer, TokenizerError
from llada_rt.weights import INDEX_FILE, SINGLE_FILE, CheckpointError, checkpoint_files, load_weights, read_header

DROP = object()   # a key to delete
BAD = "bad.safetensors"
EOT_ID, MASK_ID = (special_id(SMALL_VOCAB, t) for t in (EOT_TEXT, MASK_TEXT))


@pytest.fixture(scope="module")
def small_ckpts(tmp_path_factory):
    """Chat checkpoint (single file) and Base checkpoint (3 shards), vocabulary 256 so that copies are cheap."""
    root = tmp_path_factory.mktemp("errors")
    return {"single": write_checkpoint(root / "single", vocab=SMALL_VOCAB),
            "sharded": write_checkpoint(root / "sharded", vocab=SMALL_VOCAB, shards=3, chat=False)}


# ---- how a checkpoint is spoiled -------------------------------------------------------------------------------------

def _edit_json(name: str, **changes) -> Callable:
    def edit(ckpt):
        d = json.loads((ckpt / name).read_text())
        for k, v in changes.items():
            if v is DROP:
                d.pop(k, None)
            else:
                d[k] = v
        (ckpt / name).write_text(json.dumps(d))
    return edit


def config(**changes):
    return _edit_json("config.json", **changes)


def tok_config(**changes):
    return _edit_json("tokenizer_config.json", **changes)


def write(name: str, text: str) -> Callable:
    def edit(ckpt):
        (ckpt / name).write_text(text)
    return edit


def write_obj(name: str, obj) -> Callable:
    return write(name, json.dumps(obj))   # json.dumps writes NaN and Infinity, as a careless converter would


def with_config_text(extra: str) -> Callable:
    """config.json's text with `extra` inserted before the closing brace."""
    def edit(ckpt):
        text = (ckpt / "config.json").read_text().rstrip().rstrip("}")
        (ckpt / "config.json").write_text(text + extra + "}")
    return edit


def st_file(header=None, data: int = 0, raw: str | None = None) -> Callable:
    """A safetensors file BAD with this header (a dict, or raw JSON text) and `data` zero bytes after it."""
    def edit(ckpt):
        h = (raw if raw is not None else json.dumps(header)).encode()
        (ckpt / BAD).write_bytes(struct.pack("<Q", len(h)) + h + bytes(data))
    return edit


def index(weight_map) -> Callable:
    """model.safetensors.index.json with this weight_map (a callable gets the real tensor names)."""
    def edit(ckpt):
        names = list(read_header(ckpt / SINGLE_FILE).keys() - {"__metadata__"})
        wm = weight_map(ckpt, names) if callable(weight_map) else weight_map
        (ckpt / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return edit


def _outside(ckpt, names):
    shutil.copy(ckpt / SINGLE_FILE, ckpt.parent / "outside.safetensors")
    return {n: "../outside.safetensors" for n in names}


def _subdir(ckpt, names):
    (ckpt / "sub").mkdir()
    shutil.copy(ckpt / SINGLE_FILE, ckpt / "sub" / SINGLE_FILE)
    return {n: "sub/" + SINGLE_FILE for n in names}


def poison(*edits) -> Callable:
    """Writes (tensor name, value) into element 3 of each tensor, in whichever file holds it."""
    from safetensors.torch import load_file, save_file

    def edit(ckpt):
        files = checkpoint_files(ckpt)
        for name, value in edits:
            f = str(files[name])
            sd = load_file(f)
            sd[name].view(-1)[3] = value
            save_file(sd, f, metadata={"format": "pt"})
    return edit


def tok_json(fn) -> Callable:
    def edit(ckpt):
        d = json.loads((ckpt / "tokenizer.json").read_text())
        fn(d)
        (ckpt / "tokenizer.json").write_text(json.dumps(d))
    return edit


def _drop_token(text, from_vocab=True):
    def fn(d):
        d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] != text]
        if from_vocab:
            del d["model"]["vocab"][text]
    return fn


def _move_eot(ckpt):
    p = ckpt / "tokenizer_config.json"
    d = json.loads(p.read_text())
    d["added_tokens_decoder"]["5"] = d["added_tokens_decoder"].pop(str(EOT_ID))
    p.write_text(json.dumps(d))


# ---- the calls -------------------------------------------------------------------------------------------------------

def gen_config(**kw):
    # looked up at call time: a function this issue adds (so that each row, not the module, fails without it)
    return lambda ckpt: llada_rt.config.load_generation_config(ckpt, **kw)


def load_cfg(ckpt):
    return load_config(ckpt)


def files(ckpt):
    return checkpoint_files(ckpt)


def header(ckpt):
    return read_header(ckpt / BAD)


def weights(**kw):
    return lambda ckpt: load_weights(ckpt, load_config(ckpt), **kw)


def tokenizer(ckpt):
    return Tokenizer(ckpt)


def encode(text):
    return lambda ckpt: Tokenizer(ckpt).encode(text)


def encode_chat(messages):
    return lambda ckpt: Tokenizer(ckpt).encode_chat(messages)


# The compiled ops path (ops.rms_norm and the other ops of the engine) is not on main yet; every check here runs before
# the first op, and the tests of accepted inputs only need some backend, so Runtimes here use the reference ops.
BACKEND = "torch"
GENERATION_FILE = "generation_config.json"


def runtime_load(ckpt):
    from llada_rt import Runtime

    return Runtime(ckpt, device="cpu", backend=BACKEND)


def runtime_generate(**options):
    return lambda ckpt: runtime_load(ckpt).generate("Hi", **options)


class Case(NamedTuple):
    id: str
    edit: Callable | None
    call: Callable
    error: type
    words: tuple
    base: str = "single"


W = "model.transformer.blocks.1.q_proj.weight"
NAN, INF = float("nan"), float("inf")
F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}

CASES = [
    # config.json: ranges and types of every value, the key named
    Case("rope_theta-zero", config(rope_theta=0), load_cfg, ConfigError, ("config.json", "rope_theta", ">= 1")),
    Case("rope_theta-negative", config(rope_theta=-5e5), load_cfg, ConfigError, ("rope_theta", "out of range")),
    Case("rope_theta-tiny", config(rope_theta=1e-40), load_cfg, ConfigError, ("rope_theta", "out of range")),
    Case("rope_theta-nan", config(rope_theta=NAN), load_cfg, ConfigError, ("rope_theta", "not a finite number")),
    Case("rope_theta-inf", config(rope_theta=INF), load_cfg, ConfigError, ("rope_theta", "not a finite number")),
    Case("rope_theta-string", config(rope_theta="500000.0"), load_cfg, ConfigError,
         ("rope_theta", "must be a number", "without quotes")),
    Case("rope_theta-bool", config(rope_theta=True), load_cfg, ConfigError, ("rope_theta", "must be a number")),
    Case("rms_norm_eps-negative", config(rms_norm_eps=-1e-5), load_cfg, ConfigError, ("rms_norm_eps", "out of range")),
    Case("rms_norm_eps-zero", config(rms_norm_eps=0), load_cfg, ConfigError, ("rms_norm_eps", "out of range")),
    Case("rms_norm_eps-below-float32", config(rms_norm_eps=1e-50), load_cfg, ConfigError,
         ("rms_norm_eps", "out of range")),
    Case("rms_norm_eps-nan", config(rms_norm_eps=NAN), load_cfg, ConfigError, ("rms_norm_eps", "not a finite")),
    Case("rms_norm_eps-string", config(rms_norm_eps="1e-5"), load_cfg, ConfigError,
         ("rms_norm_eps", "must be a number")),
    Case("weight_tying-string-false", config(weight_tying="false"), load_cfg, ConfigError,
         ("weight_tying", "true or false", "'false'")),
    Case("rope_full_precision-int", config(rope_full_precision=1), load_cfg, ConfigError,
         ("rope_full_precision", "true or false")),
    Case("n_kv_heads-string", config(n_kv_heads="4"), load_cfg, ConfigError,
         ("n_kv_heads", "must be an integer", "without quotes")),
    Case("n_kv_heads-float", config(n_kv_heads=2.0), load_cfg, ConfigError, ("n_kv_heads", "must be an integer")),
    Case("n_kv_heads-bool", config(n_kv_heads=True), load_cfg, ConfigError, ("n_kv_heads", "must be an integer")),
    Case("multi_query_attention-string", config(n_kv_heads=DROP, multi_query_attention="no"), load_cfg, ConfigError,
         ("multi_query_attention", "true or false")),
    Case("pad_token_id-float", config(pad_token_id=5.5), load_cfg, ConfigError, ("pad_token_id", "integer")),
    Case("pad_token_id-string", config(pad_token_id="3"), load_cfg, ConfigError, ("pad_token_id", "integer")),
    Case("embedding_size-string", config(embedding_size="256"), load_cfg, ConfigError,
         ("embedding_size", "integer")),
    Case("mlp_ratio-string", config(mlp_hidden_size=DROP, mlp_ratio="4"), load_cfg, ConfigError,
         ("mlp_ratio", "must be a number")),
    Case("mlp_ratio-negative", config(mlp_hidden_size=DROP, mlp_ratio=-1), load_cfg, ConfigError,
         ("mlp_ratio", "out of range")),
    Case("mlp_ratio-fractional-width", config(mlp_hidden_size=DROP, mlp_ratio=1.3), load_cfg, ConfigError,
         ("mlp_ratio", "whole number", "mlp_hidden_size")),
    Case("head_dim-odd", config(d_model=60), load_cfg, ConfigError, ("head dimension", "= 15", "odd", "even")),
    Case("max_sequence_length-huge", config(max_sequence_length=2**40), load_cfg, ConfigError,
         ("max_sequence_length", "out of range", "2147483647")),
    Case("n_layers-huge", config(n_layers=2**31), load_cfg, ConfigError, ("n_layers", "out of range")),
    Case("alibi-list", config(alibi=[]), load_cfg, ConfigError, ("alibi", "not supported")),
    Case("layer_norm_with_affine-int", config(layer_norm_with_affine=1), load_cfg, ConfigError,
         ("layer_norm_with_affine=1", "not supported")),
    Case("block_group_size-bool", config(block_group_size=True), load_cfg, ConfigError,
         ("block_group_size=True", "not supported")),
    Case("eos-equals-mask", config(eos_token_id=MASK_ID), load_cfg, ConfigError,
         ("eos_token_id equals mask_token_id",)),
    Case("config-nested-too-deeply", write("config.json", "[" * 100000), load_cfg, ConfigError,
         ("config.json", "nested too deeply")),
    Case("config-int-too-long", write("config.json", '{"d_model": ' + "1" * 5000 + "}"), load_cfg, ConfigError,
         ("config.json", "not valid JSON")),
    Case("config-duplicate-key", with_config_text(', "rope_theta": 1e9'), load_cfg, ConfigError,
         ("config.json", "'rope_theta' appears twice")),

    # generation_config.json: the file and the entry named
    Case("generation-not-json", write("generation_config.json", "{"), gen_config(), ConfigError,
         ("generation_config.json", "not valid JSON")),
    Case("generation-list", write_obj("generation_config.json", [1, 2]), gen_config(), ConfigError,
         ("generation_config.json", "JSON object", "list")),
    Case("generation-eos-string", write_obj("generation_config.json", {"eos_token_id": "126081"}), gen_config(),
         ConfigError, ("generation_config.json", "eos_token_id", "not a token id")),
    Case("generation-eos-negative-in-list", write_obj("generation_config.json", {"eos_token_id": [1, -1]}),
         gen_config(), ConfigError, ("eos_token_id", "not a token id")),
    Case("generation-bos-bool", write_obj("generation_config.json", {"bos_token_id": True}), gen_config(),
         ConfigError, ("bos_token_id", "not a token id")),
    Case("generation-eos-outside-vocab", write_obj("generation_config.json", {"eos_token_id": 10**6}),
         gen_config(vocab_size=SMALL_VOCAB), ConfigError, ("eos_token_id", "below the vocabulary size 256")),
    Case("generation-nan", write_obj("generation_config.json", {"temperature": NAN}), gen_config(), ConfigError,
         ("generation_config.json", "temperature", "not a finite number")),

    # model.safetensors.index.json
    Case("index-weight_map-list", index([]), files, CheckpointError,
         (INDEX_FILE, "weight_map must be an object")),
    Case("index-shard-not-a-string", index({"x": 5}), files, CheckpointError,
         (INDEX_FILE, "weight_map['x'] = 5", "shard file name")),
    Case("index-shard-dotdot", index(_outside), files, CheckpointError,
         (INDEX_FILE, "'../outside.safetensors'", "plain file name")),
    Case("index-shard-absolute", index(lambda ckpt, names: {n: str(ckpt / SINGLE_FILE) for n in names}), files,
         CheckpointError, (INDEX_FILE, "plain file name", "absolute")),
    Case("index-shard-subdir", index(_subdir), files, CheckpointError, (INDEX_FILE, "'sub/model.safetensors'",
                                                                        "no path separators")),
    Case("index-nested-too-deeply", write(INDEX_FILE, "[" * 100000), files, CheckpointError,
         (INDEX_FILE, "nested too deeply")),

    # safetensors header entries
    Case("header-offsets-strings", st_file({"w": {**F32_4, "data_offsets": ["0", "16"]}}, 16), header,
         CheckpointError, (BAD, "'w'", "data_offsets must be two non-negative integers")),
    Case("header-offsets-negative", st_file({"w": {**F32_4, "shape": [1], "data_offsets": [-4, 0]}}, 16), header,
         CheckpointError, (BAD, "'w'", "data_offsets must be two non-negative integers")),
    Case("header-start-after-end", st_file({"w": {**F32_4, "shape": [], "data_offsets": [8, 4]}}, 16), header,
         CheckpointError, (BAD, "'w'", "start after they end")),
    Case("header-shape-not-a-list", st_file({"w": {**F32_4, "shape": 5}}, 16), header, CheckpointError,
         (BAD, "'w'", "shape must be a list of non-negative integers")),
    Case("header-shape-float", st_file({"w": {**F32_4, "shape": [2.0, 2]}}, 16), header, CheckpointError,
         (BAD, "shape must be a list of non-negative integers")),
    Case("header-shape-bool", st_file({"w": {**F32_4, "shape": [True, 4]}}, 16), header, CheckpointError,
         (BAD, "shape must be a list of non-negative integers")),
    Case("header-shape-negative", st_file({"w": {**F32_4, "shape": [-2], "data_offsets": [8, 0]}}, 16), header,
         CheckpointError, (BAD, "shape must be a list of non-negative integers")),
    Case("header-overlap", st_file({"a": F32_4, "b": {**F32_4, "data_offsets": [8, 24]}}, 24), header,
         CheckpointError, (BAD, "'a' and 'b' overlap")),
    Case("header-gap", st_file({"a": F32_4, "b": {**F32_4, "data_offsets": [20, 36]}}, 36), header, CheckpointError,
         (BAD, "data bytes [16, 20) belong to no tensor")),
    Case("header-trailing-bytes", st_file({"w": F32_4}, 20), header, CheckpointError,
         (BAD, "the last 4 data bytes belong to no tensor")),
    Case("header-unknown-dtype", st_file({"w": {**F32_4, "dtype": "Q4", "data_offsets": [0, 2]}}, 16), header,
         CheckpointError, (BAD, "'w'", "unknown dtype 'Q4'")),
    Case("header-dtype-not-a-string", st_file({"w": {**F32_4, "dtype": 5}}, 16), header, CheckpointError,
         (BAD, "unknown dtype 5")),
    Case("header-metadata-not-an-object", st_file({"__metadata__": 5, "w": F32_4}, 16), header, CheckpointError,
         (BAD, "__metadata__ must map strings to strings")),
    Case("header-metadata-int-value", st_file({"__metadata__": {"format": 1}, "w": F32_4}, 16), header,
         CheckpointError, (BAD, "__metadata__ must map strings to strings")),
    Case("header-duplicate-tensor", st_file(raw='{"w": %s, "w": %s}' % (json.dumps(F32_4), json.dumps(F32_4)),
                                            data=16), header, CheckpointError, (BAD, "'w' appears twice")),
    Case("header-nested-too-deeply", st_file(raw="[" * 50000), header, CheckpointError, (BAD, "nested too deeply")),

    # non-finite weights: the tensor and its file named
    Case("weight-nan", poison((W, NAN)), weights(), CheckpointError,
         (SINGLE_FILE, W, "1 NaN and 0 inf", "check_finite=False")),
    Case("weight-inf", poison(("model.transformer.ln_f.weight", INF)), weights(), CheckpointError,
         ("model.transformer.ln_f.weight", "0 NaN and 1 inf")),
    Case("weights-several-reported-at-once",
         poison(("model.transformer.wte.weight", NAN), ("model.transformer.blocks.0.ff_out.weight", -INF)),
         weights(), CheckpointError, ("model.transformer.wte.weight", "model.transformer.blocks.0.ff_out.weight")),
    Case("weight-nan-in-a-shard", poison((W, NAN)), weights(), CheckpointError,
         ("-of-00003.safetensors", W, "NaN"), base="sharded"),
    Case("weight-overflows-float16", poison((W, 1e6)), weights(dtype=torch.float16), CheckpointError,
         (W, "finite as stored in float32", "overflow float16", "load in bfloat16 or float32")),
    Case("cuda-head-dim-unsupported", None, weights(device="cuda", dtype=torch.bfloat16), ConfigError,
         ("config.json", "head dimension", "= 16", "(64, 128)", "float32")),

    # tokenizer_config.json
    Case("tokenizer_config-list", write_obj("tokenizer_config.json", []), tokenizer, TokenizerError,
         ("tokenizer_config.json", "expected a JSON object", "list")),
    Case("chat_template-int", tok_config(chat_template=5), tokenizer, TokenizerError,
         ("tokenizer_config.json", "chat_template must be a Jinja template string")),
    Case("chat_template-syntax", tok_config(chat_template="{% for %}"), tokenizer, TokenizerError,
         ("tokenizer_config.json", "chat_template is not a valid Jinja template", "line 1")),
    Case("chat_template-unknown-filter", tok_config(chat_template="{{ messages | nosuchfilter }}"), tokenizer,
         TokenizerError, ("chat_template is not a valid Jinja template", "nosuchfilter")),
    Case("chat_template-list-without-default", tok_config(chat_template=[{"name": "tool_use", "template": "x"}]),
         tokenizer, TokenizerError, ("chat_template", "'tool_use'", "none is named 'default'")),
    Case("chat_template-raises", tok_config(chat_template="{{ raise_exception('roles must alternate') }}"),
         tokenizer, TokenizerError, ("cannot render a user/assistant conversation", "roles must alternate")),
    Case("bos_token-int", tok_config(bos_token=5), tokenizer, TokenizerError,
         ("tokenizer_config.json", "bos_token must be a token string")),
    Case("eos_token-content-int", tok_config(eos_token={"content": 5}), tokenizer, TokenizerError,
         ("eos_token must be a token string",)),
    Case("bos_token-surrogate", tok_config(bos_token="\ud800"), tokenizer, TokenizerError,
         ("tokenizer_config.json: bos_token is not valid Unicode",)),
    Case("header-name-surrogate", st_file(raw='{"w\\ud800": %s}' % json.dumps(F32_4), data=16), header,
         CheckpointError, (BAD, "the key 'w", "not valid Unicode")),
    Case("header-nan", st_file(raw='{"w": %s}' % json.dumps({**F32_4, "note": float("nan")}), data=16), header,
         CheckpointError, (BAD, "w['note'] is not a finite number")),
    Case("header-shape-overflow", st_file({"w": {**F32_4, "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}),
         header, CheckpointError, (BAD, "too large")),
    Case("added_tokens_decoder-list", tok_config(added_tokens_decoder=[]), tokenizer, TokenizerError,
         ("added_tokens_decoder must be an object",)),
    Case("added_tokens_decoder-bad-id", tok_config(added_tokens_decoder={"abc": {"content": "x"}}), tokenizer,
         TokenizerError, ("added_tokens_decoder key 'abc'", "not a token id")),
    Case("added_tokens_decoder-value-string", tok_config(added_tokens_decoder={"5": "x"}), tokenizer,
         TokenizerError, ("added_tokens_decoder['5']", "string 'content'")),
    Case("added_tokens_decoder-disagrees", _move_eot, tokenizer, TokenizerError,
         (EOT_TEXT, "id 5", f"id {EOT_ID}", "different tokenizers")),

    # a chat template whose special tokens the tokenizer cannot encode as one token each
    Case("template-token-missing", tok_json(_drop_token(EOT_TEXT)), tokenizer, TokenizerError,
         ("chat_template writes <|eot_id|>", "tokenizer.json", "single token", "added_tokens")),
    Case("template-token-not-special", tok_json(_drop_token(START_HEADER_TEXT, from_vocab=False)), tokenizer,
         TokenizerError, ("<|start_header_id|>", "single token")),
    Case("template-bos-unknown", tok_config(bos_token="<s>"), tokenizer, TokenizerError,
         ("chat_template writes <s>", "single token")),

    # text to encode
    Case("encode-lone-surrogate", None, encode("ab\ud800c"), TokenizerError,
         ("not valid Unicode", "position 2", "surrogate")),
    Case("encode-bytes", None, encode(b"abc"), TokenizerError, ("must be a str", "got bytes", "decode")),
    Case("encode_chat-surrogate", None, encode_chat("hi \udfff"), TokenizerError,
         ("messages[0]['content']", "position 3")),
    Case("encode_chat-no-content", None, encode_chat([{"role": "user"}]), TokenizerError,
         ("messages[0]['content'] must be a str",)),
    Case("encode_chat-empty-list", None, encode_chat([]), TokenizerError, ("non-empty list",)),
    # generation options of generation_config.json: reported at load, naming the file and key
    Case("generation-temperature-string", write_obj(GENERATION_FILE, {"temperature": "hot"}), runtime_load,
         ConfigError, (GENERATION_FILE, "temperature must be a number", "'hot'")),
    Case("generation-gen_length-float", write_obj(GENERATION_FILE, {"gen_length": 64.0}), runtime_load,
         ConfigError, (GENERATION_FILE, "gen_length", "pass 64")),
    Case("generation-early_stop-string", write_obj(GENERATION_FILE, {"early_stop": "false"}), runtime_load,
         ConfigError, (GENERATION_FILE, "early_stop", "True or False")),
    Case("generation-seed-negative", write_obj(GENERATION_FILE, {"seed": -1}), runtime_load, ConfigError,
         (GENERATION_FILE, "seed", "[0, 2**63)")),
    Case("generation-block_length-kernel-limit", write_obj(GENERATION_FILE, {"block_length": 4096}), runtime_load,
         ConfigError, (GENERATION_FILE, "block_length=4096", "kernels' limit of 1024")),
    Case("generation-mode-unknown", write_obj(GENERATION_FILE, {"mode": "fast"}), runtime_load, ConfigError,
         (GENERATION_FILE, "mode='fast' is unknown")),
    # a file value that does not fit the other settings: the file named beside the value
    Case("generation-block_length-does-not-divide", write_obj(GENERATION_FILE, {"block_length": 48}),
         runtime_generate(), GenerationConfigError, (GENERATION_FILE, "block_length=48", "not a multiple")),
    Case("generation-steps-does-not-divide", write_obj(GENERATION_FILE, {"gen_length": 64, "block_length": 16,
                                                                         "steps": 6}),
         runtime_generate(), GenerationConfigError, ("steps=6", "not divisible", GENERATION_FILE)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, small_ckpts, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(small_ckpts[case.base], ckpt)
    if case.edit is not None:
        case.edit(ckpt)
    with pytest.raises(Exception) as info:
        case.call(ckpt)
    msg = str(info.value)
    print(f"{type(info.value).__name__}: {msg}")
    assert isinstance(info.value, case.error), f"expected {case.error.__name__}, got {type(info.value).__name__}"
    missing = [w for w in case.words if w not in msg]
    assert not missing, f"message lacks {missing}"


@pytest.mark.parametrize("text", ["{", "[1, 2]", '{"eos_token_id": "x"}', '{"temperature": NaN}',
                                  '{"temperature": "hot"}', '{"early_stop": "false"}', '{"gen_length": 64.0}'])
def test_info_reports_a_bad_generation_config(small_ckpts, tmp_path, text):
    """`llada-rt info` names the file in one line, exit code 1, no traceback."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(small_ckpts["single"], ckpt)
    (ckpt / "generation_config.json").write_text(text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["info", "--model", str(ckpt)])
    print(rc, err.getvalue())
    assert rc == 1 and "Traceback" not in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1
    assert "generation_config.json" in err.getvalue()


# ---- generation options, prompts and messages: what generate() and add() refuse before any forward ------------------

INF_OR_NAN = (INF, -INF, NAN)


def _error_class(name: str) -> type:
    """An error class by dotted name, looked up when the row runs (so that a class this issue adds fails its rows,
    not the module)."""
    import importlib

    module, cls = name.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


PE = "llada_rt.prompts.PromptError"


@pytest.fixture(scope="module")
def runtimes(small_ckpts):
    from llada_rt import Runtime

    return {"chat": Runtime(small_ckpts["single"], device="cpu", backend=BACKEND),
            "base": Runtime(small_ckpts["sharded"], device="cpu", backend=BACKEND)}


class Opt(NamedTuple):
    id: str
    options: dict
    words: tuple


OPTS = [
    *(Opt(f"{name}-{v}", {name: v}, (name, "finite")) for name in ("temperature", "cfg_scale") for v in INF_OR_NAN),
    Opt("temperature-negative", {"temperature": -0.5}, ("temperature", ">= 0", "-0.5")),
    Opt("temperature-string", {"temperature": "0.7"}, ("temperature", "must be a number", "'0.7'", "not a string")),
    Opt("temperature-bool", {"temperature": True}, ("temperature", "must be a number", "bool")),
    Opt("temperature-None", {"temperature": None}, ("temperature", "must be a number", "None")),
    Opt("temperature-beyond-float32", {"temperature": 1e39}, ("temperature", "float32")),
    Opt("temperature-huge-int", {"temperature": 10**400}, ("temperature",)),
    Opt("temperature-list", {"temperature": [0.5]}, ("temperature", "must be a number", "list")),
    Opt("cfg_scale-string", {"cfg_scale": "1"}, ("cfg_scale", "must be a number", "'1'")),
    Opt("cfg_scale-too-large", {"cfg_scale": 1e6}, ("cfg_scale", "at most 100")),
    Opt("cfg_scale-in-dual-mode", {"cfg_scale": 1.0, "mode": "dual"}, ("cfg_scale > 0", "mode='exact'")),
    *(Opt(f"{name}-string-false", {name: "false"}, (name, "True or False", "'false'", "read as True"))
      for name in ("early_stop", "logits_eos_inf", "confidence_eos_eot_inf", "cuda_graph")),
    Opt("early_stop-int", {"early_stop": 1}, ("early_stop", "True or False", "int")),
    Opt("logits_eos_inf-None", {"logits_eos_inf": None}, ("logits_eos_inf", "True or False", "None")),
    Opt("seed-float", {"seed": 1.5}, ("seed", "integer", "1.5", "float")),
    Opt("seed-integral-float", {"seed": 3.0}, ("seed", "integer", "pass 3")),
    Opt("seed-huge", {"seed": 2**64}, ("seed", "[0, 2**63)", str(2**64))),
    Opt("seed-too-long-to-print", {"seed": 10**5000}, ("seed", "[0, 2**63)", "too large to show")),
    Opt("seed-negative", {"seed": -1}, ("seed", "[0, 2**63)")),
    Opt("seed-string", {"seed": "42"}, ("seed", "integer", "'42'", "not a string")),
    Opt("seed-bool", {"seed": True}, ("seed", "integer", "bool")),
    Opt("seed-None", {"seed": None}, ("seed", "integer", "None")),
    Opt("gen_length-integral-float", {"gen_length": 64.0}, ("gen_length", "integer", "pass 64")),
    Opt("gen_length-string", {"gen_length": "64"}, ("gen_length", "integer", "'64'")),
    Opt("gen_length-bool", {"gen_length": True}, ("gen_length", "integer", "bool")),
    Opt("gen_length-None", {"gen_length": None}, ("gen_length", "integer", "None")),
    Opt("gen_length-zero", {"gen_length": 0}, ("gen_length", "positive integer")),
    Opt("gen_length-negative", {"gen_length": -32}, ("gen_length", "positive integer")),
    Opt("gen_length-huge", {"gen_length": 10**30}, ("gen_length", "at most 2147483647")),
    Opt("gen_length-beyond-context", {"gen_length": 640, "block_length": 32}, ("max_sequence_length of 512",)),
    Opt("block_length-kernel-limit", {"gen_length": 2048, "block_length": 2048},
        ("block_length=2048", "kernels' limit of 1024")),
    Opt("block_length-huge", {"block_length": 2**40}, ("block_length", "kernels' limit of 1024")),
    Opt("block_length-float", {"block_length": 8.0}, ("block_length", "integer", "pass 8")),
    Opt("block_length-not-dividing", {"gen_length": 30, "block_length": 8}, ("not a multiple", "e.g. 6")),
    Opt("block_length-not-dividing-a-big-gen_length", {"gen_length": 2**31 - 1, "block_length": 1000},
        ("not a multiple",)),
    Opt("steps-float", {"gen_length": 16, "block_length": 8, "steps": 16.0}, ("steps", "integer", "pass 16")),
    Opt("steps-zero", {"steps": 0}, ("steps", "positive integer", "or None")),
    Opt("steps-string", {"steps": "32"}, ("steps", "'32'")),
    Opt("steps-more-than-gen_length", {"gen_length": 16, "block_length": 8, "steps": 32}, ("more than gen_length",)),
    Opt("steps-not-divisible", {"gen_length": 32, "block_length": 8, "steps": 6}, ("not divisible",)),
    *(Opt(f"threshold-{v}", {"threshold": v}, ("threshold", "(0, 1]")) for v in (NAN, INF, 0.0, 1.5, -0.1)),
    Opt("threshold-string", {"threshold": "0.9"}, ("threshold", "must be a number", "'0.9'")),
    Opt("threshold-bool", {"threshold": True}, ("threshold", "must be a number", "bool")),
    *(Opt(f"factor-{v}", {"factor": v}, ("factor", "> 0")) for v in (NAN, INF, 0.0, -1.0)),
    Opt("factor-string", {"factor": "1"}, ("factor", "must be a number")),
    Opt("threshold-and-factor", {"threshold": 0.9, "factor": 1.0}, ("either threshold or factor",)),
    Opt("threshold-random-remasking", {"threshold": 0.9, "remasking": "random"}, ("remasking='low_confidence'",)),
    Opt("mode-unknown", {"mode": "turbo"}, ("mode='turbo' is unknown", "exact, prefix, dual")),
    Opt("mode-None", {"mode": None}, ("mode must be a string", "None")),
    Opt("mode-int", {"mode": 1}, ("mode must be a string",)),
    Opt("remasking-unknown", {"remasking": "lowest"}, ("remasking='lowest' is unknown",)),
    Opt("remasking-list", {"remasking": ["random"]}, ("remasking must be a string", "list")),
    Opt("unknown-option", {"block_len": 8}, ("unknown generation option", "block_len", "block_length")),
    Opt("cuda_graph-on-cpu", {"cuda_graph": True}, ("cuda_graph=True needs a CUDA device",)),
]


@pytest.mark.parametrize("case", OPTS, ids=[c.id for c in OPTS])
def test_bad_generation_option(case, runtimes):
    """generate() and the step API's add() refuse the same options, with the option named, before any forward."""
    rt = runtimes["chat"]
    forwards = rt.engine.forwards
    for call in (lambda: rt.generate("Hi", **case.options), lambda: rt.add([1, 2, 3], **case.options)):
        with pytest.raises(Exception) as info:
            call()
        msg = str(info.value)
        print(f"{type(info.value).__name__}: {msg}")
        assert isinstance(info.value, GenerationConfigError), type(info.value).__name__
        missing = [w for w in case.words if w not in msg]
        assert not missing, f"message lacks {missing}"
    assert rt.engine.forwards == forwards and not rt.engine.active


def test_step_api_config_object(runtimes):
    """add(config=...) takes a GenerationConfig only, and checks it as options are checked."""
    from llada_rt.generation_config import GenerationConfig

    rt = runtimes["chat"]
    for config, words in (({"gen_length": 8}, ("config must be a GenerationConfig", "dict")),
                          (GenerationConfig(temperature=INF), ("temperature", "finite")),
                          (GenerationConfig(seed=2.0), ("seed", "pass 2"))):
        with pytest.raises(Exception) as info:
            rt.add([1, 2, 3], config=config)
        print(f"{type(info.value).__name__}: {info.value}")
        assert isinstance(info.value, GenerationConfigError)
        assert all(w in str(info.value) for w in words), words
    assert not rt.engine.active




class Prompt(NamedTuple):
    id: str
    prompt: Callable          # () -> the prompt (built at run time: tensors, huge ints)
    words: tuple
    chat: object = "default"  # the chat= argument; 'default' leaves it out (and add() is tried too)
    runtime: str = "chat"


def np_array(*args, **kw):
    import numpy as np

    return lambda: np.array(*args, **kw)


def tensor(*args, **kw):
    return lambda: torch.tensor(*args, **kw)


def value(v):
    return lambda: v


PROMPTS = [
    # text: empty or whitespace only, with the chat template (default here), forced, and without it
    *(Prompt(f"{name}-chat={chat}", value(text), ("the prompt is", what), chat)
      for name, text, what in (("empty", "", "empty"), ("whitespace", " \n\t ", "only whitespace"))
      for chat in ("default", True, False)),
    Prompt("whitespace-base-model", value("   "), ("only whitespace",), runtime="base"),
    Prompt("whitespace-in-a-batch", value(["fine", "\n"]), ("prompt[1]", "only whitespace")),
    Prompt("lone-surrogate", value("ab\ud800c"), ("not valid Unicode", "position 2", "surrogate")),
    Prompt("lone-surrogate-base", value("xyz\udcff"), ("position 3",), runtime="base"),
    Prompt("lone-surrogate-in-a-batch", value(["ok", "\udc80"]), ("prompt[1]", "position 0")),
    Prompt("mask-token-in-text", value("a<|mdm_mask|>b"), ("contains <|mdm_mask|>", "mask token")),
    # bytes
    Prompt("bytes", value(b"hello"), ("bytes", "decode it to a str")),
    Prompt("bytearray", value(bytearray(b"hi")), ("bytearray", "decode")),
    Prompt("bytes-in-a-batch", value(["a", b"b"]), ("prompt[1]", "bytes", "decode")),
    # tensors and arrays that are not integer ids
    Prompt("tensor-bool", tensor([True, False, True]), ("torch.bool tensor", "integers")),
    Prompt("tensor-float", tensor([1.0, 2.0]), ("torch.float32 tensor", "integers")),
    Prompt("tensor-bfloat16", lambda: torch.ones(3, dtype=torch.bfloat16), ("torch.bfloat16", "integers")),
    Prompt("tensor-uint8", lambda: torch.frombuffer(bytearray(b"abc"), dtype=torch.uint8), ("uint8", "raw bytes")),
    Prompt("tensor-complex", lambda: torch.ones(2, dtype=torch.complex64), ("complex64", "integers")),
    Prompt("tensor-0d", tensor(5), ("shape ()", "(P,) or (B, P)")),
    Prompt("tensor-3d", lambda: torch.ones(1, 2, 3, dtype=torch.int64), ("shape (1, 2, 3)", "(P,) or (B, P)")),
    Prompt("tensor-empty", lambda: torch.zeros(0, dtype=torch.int64), ("empty",)),
    Prompt("tensor-meta", lambda: torch.ones(3, dtype=torch.int64, device="meta"), ("meta",)),
    Prompt("ndarray-float", np_array([1.0, 2.0]), ("float64 ndarray", "integers")),
    Prompt("ndarray-bool", np_array([True]), ("bool ndarray", "integers")),
    Prompt("ndarray-str", np_array(["hi", "there"]), ("ndarray", "list of str", "tolist")),
    Prompt("ndarray-object", np_array([1, "a"], dtype=object), ("object ndarray", "integers")),
    Prompt("ndarray-3d", lambda: __import__("numpy").ones((2, 2, 2), dtype="int64"), ("shape (2, 2, 2)",)),
    Prompt("ndarray-uint8", lambda: __import__("numpy").frombuffer(b"abc", dtype="uint8"), ("uint8", "raw bytes")),
    Prompt("ndarray-2d-in-a-batch", lambda: [__import__("numpy").ones((2, 2), dtype="int64")],
           ("prompt[0]", "shape (2, 2)", "(P,)")),
    # lists of the wrong kind
    Prompt("ids-bools", value([True, False]), ("prompt[0]", "True", "not booleans")),
    Prompt("ids-with-a-bool", value([1, 2, True]), ("prompt[2]", "not booleans")),
    Prompt("ids-numpy-bool", lambda: [1, __import__("numpy").True_], ("prompt[1]", "not booleans")),
    Prompt("ids-floats", value([1.0, 2.0]), ("prompt[0]", "1.0", "float")),
    Prompt("ids-and-strings", value([1, "a"]), ("mixes kinds", "prompt[1] is a str")),
    Prompt("lists-and-an-int", value([[1, 2], 3]), ("mixes kinds", "prompt[1] is an int")),
    Prompt("nested-too-deeply", value([[1, [2, 3]]]), ("prompt[0][1]", "nested too deeply")),
    Prompt("nested-three-levels", value([[[1]]]), ("prompt[0][0]", "nested too deeply")),
    Prompt("None-in-a-list", value([None]), ("prompt[0] is None",)),
    Prompt("empty-list", value([]), ("prompt must be", "an empty list")),
    Prompt("empty-inner-list", value([[1], []]), ("prompt[1]", "empty")),
    Prompt("None", value(None), ("prompt must be", "got None")),
    Prompt("int", value(5), ("prompt must be", "got 5 (int)")),
    Prompt("float", value(1.5), ("prompt must be", "float")),
    Prompt("dict", value({"role": "user", "content": "hi"}), ("Runtime.chat(messages)",)),
    Prompt("generator", lambda: (i for i in [1, 2]), ("prompt must be", "generator")),
    # ids out of range
    Prompt("id-outside-vocab", value([1, 10**6]), ("outside the vocabulary [0, 256)", "1000000 at 1")),
    Prompt("id-negative", value([-1, 2]), ("outside the vocabulary", "-1 at 0")),
    Prompt("id-too-long-to-print", value([10**5000]), ("outside the vocabulary", "too large to show")),
    Prompt("id-mask", value([1, MASK_ID]), ("position 1 is the mask token",)),
    Prompt("tensor-id-outside-vocab", tensor([[1, 2], [3, 999]]), ("prompt[1]", "999 at 1")),
    # chat=
    Prompt("chat-string", value("hi"), ("chat must be True, False or None", "'false'"), chat="false"),
    Prompt("chat-True-base-model", value("hi"), ("chat=True", "no chat_template"), chat=True, runtime="base"),
]


@pytest.mark.parametrize("case", PROMPTS, ids=[c.id for c in PROMPTS])
def test_bad_prompt(case, runtimes):
    """generate() (and add(), which takes one prompt) refuse the prompt with a PromptError naming it, before any
    forward."""
    rt = runtimes[case.runtime]
    forwards = rt.engine.forwards
    kw = {} if case.chat == "default" else {"chat": case.chat}
    calls = [lambda: rt.generate(case.prompt(), gen_length=8, block_length=8, **kw)]
    if not kw:
        calls.append(lambda: rt.add(case.prompt(), gen_length=8, block_length=8))
    for call in calls:
        with pytest.raises(Exception) as info:
            call()
        msg = str(info.value)
        print(f"{type(info.value).__name__}: {msg}")
        assert isinstance(info.value, _error_class(PE)), type(info.value).__name__
        missing = [w for w in case.words if w not in msg]
        assert not missing, f"message lacks {missing}"
    assert rt.engine.forwards == forwards and not rt.engine.active


MESSAGES = [
    ("not-a-list", {"role": "user", "content": "hi"}, ("messages must be a non-empty list",)),
    ("empty", [], ("messages must be a non-empty list",)),
    ("not-a-dict", ["hi"], ("messages[0] must be a dict",)),
    ("content-missing", [{"role": "user"}], ("messages[0]['content'] must be a str",)),
    ("content-bytes", [{"role": "user", "content": b"hi"}], ("messages[0]['content']", "bytes", "decode")),
    ("content-surrogate", [{"role": "user", "content": "a\udcffb"}], ("messages[0]['content']", "position 1")),
    ("last-is-assistant", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
     ("last message must be the user's", "'assistant'")),
    ("last-is-empty", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                       {"role": "user", "content": ""}], ("messages[2]['content']", "empty")),
    ("last-is-whitespace", [{"role": "user", "content": " \n "}], ("messages[0]['content']", "only whitespace")),
]


@pytest.mark.parametrize("case", MESSAGES, ids=[c[0] for c in MESSAGES])
def test_bad_chat_messages(case, runtimes):
    rt = runtimes["chat"]
    _, messages, words = case
    with pytest.raises(Exception) as info:
        rt.chat(messages, gen_length=8, block_length=8)
    print(f"{type(info.value).__name__}: {info.value}")
    assert isinstance(info.value, _error_class(PE)), type(info.value).__name__
    missing = [w for w in words if w not in str(info.value)]
    assert not missing, f"message lacks {missing}"


def test_prompt_forms_still_accepted(runtimes):
    """What the checks must keep accepting: integer arrays and tensors of shape (P,) or (B, P) (numpy integers in
    lists too) give the same ids as lists, strings give the tokenizer's ids, and generation runs on them."""
    import numpy as np

    rt = runtimes["chat"]
    ids = [[5, 17, 3], [9, 1, 4]]
    for p in (np.array(ids), np.array(ids, dtype=np.int32), torch.tensor(ids), torch.tensor(ids, dtype=torch.int16),
              [np.array(ids[0], dtype=np.uint16), torch.tensor(ids[1])], [[np.int64(t) for t in r] for r in ids]):
        got = rt.encode_prompts(p)
        print(type(p).__name__, got)
        assert got == ids and all(type(t) is int for r in got for t in r)
    assert rt.encode_prompts(np.array(ids[0])) == [ids[0]]
    assert rt.encode_prompts("Hi") == [rt.tokenizer.encode_chat("Hi")]
    assert rt.encode_prompts(["Hi", "a b"], chat=False) == [rt.tokenizer.encode("Hi"), rt.tokenizer.encode("a b")]
    res = rt.generate(np.array(ids), gen_length=8, block_length=8)
    assert len(res.texts) == 2 and res.nfe == 8
