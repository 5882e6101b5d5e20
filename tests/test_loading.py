"""config.json, safetensors and tokenizer loading: the happy paths, what the load-time checks must still accept, and
the errors a user hits most (the full table of bad inputs is tests/test_errors.py)."""
import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open

from llada_rt.testing import BOS, EOS, EOT, MASK, write_checkpoint
from llada_rt.config import ConfigError, LLaDAConfig, load_config, load_generation_config
from llada_rt.tokenizer import Tokenizer, TokenizerError
from llada_rt.weights import CheckpointError, expected_shapes, load_weights, read_header


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_config_reads_llada_keys(tiny_ckpt):
    cfg = load_config(tiny_ckpt)
    print(cfg)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (64, 2, 4, 4, 16)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.rope_theta) == (MASK, EOS, EOS, 500000.0)
    assert LLaDAConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("key", ["d_model", "n_layers", "n_heads", "vocab_size", "mask_token_id",
                                 "max_sequence_length"])
def test_config_missing_key(tiny_ckpt, tmp_path, key):
    d = json.loads((tiny_ckpt / "config.json").read_text())
    del d[key]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=f"missing key.*{key}"):
        load_config(tmp_path)


@pytest.mark.parametrize("key,value,match", [
    ("activation_type", "gelu", "activation_type='gelu' is not supported"),
    ("layer_norm_type", "default", "layer_norm_type"),
    ("alibi", True, "ALiBi"),
    ("include_bias", True, "bias"),
    ("model_type", "dream", "model_type 'dream' is not supported"),
    ("n_kv_heads", 3, "multiple of n_kv_heads"),
    ("d_model", 66, "not a multiple of n_heads"),
    ("mask_token_id", 10**7, "outside the vocabulary"),
])
def test_config_unsupported(tiny_ckpt, tmp_path, key, value, match):
    d = json.loads((tiny_ckpt / "config.json").read_text())
    d[key] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path)


def test_config_missing_or_corrupt_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_sharded"])
def test_weights_load_single_and_sharded(fixture, request):
    ckpt = request.getfixturevalue(fixture)
    cfg = load_config(ckpt)
    w = load_weights(ckpt, cfg, "cpu", torch.bfloat16)
    from safetensors.torch import load_file
    files = sorted(ckpt.glob("*.safetensors"))
    print([f.name for f in files])
    ref = {}
    for f in files:
        ref.update(load_file(str(f)))
    assert set(ref) == set(expected_shapes(cfg))
    q = ref["model.transformer.blocks.1.q_proj.weight"].to(torch.bfloat16)
    assert torch.equal(w.layers[1].wqkv.dense()[: q.shape[0]], q)
    up = ref["model.transformer.blocks.0.up_proj.weight"].to(torch.bfloat16)
    assert torch.equal(w.layers[0].w_gate_up.dense()[cfg.mlp_hidden_size:], up)
    assert w.dtype == torch.bfloat16 and w.num_parameters() == sum(t.numel() for t in ref.values())


def _rewrite(ckpt, edit):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(ckpt / "model.safetensors"))
    edit(sd)
    save_file(sd, str(ckpt / "model.safetensors"))


def test_weights_missing_tensor(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    _rewrite(ckpt, lambda sd: sd.pop("model.transformer.blocks.1.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.transformer\.blocks\.1\.k_proj\.weight"):
        load_weights(ckpt, load_config(ckpt))


def test_weights_unexpected_tensor(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    _rewrite(ckpt, lambda sd: sd.__setitem__("model.transformer.blocks.0.q_proj.bias", torch.zeros(64)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.transformer\.blocks\.0\.q_proj\.bias"):
        load_weights(ckpt, load_config(ckpt))


def test_weights_wrong_shape(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    _rewrite(ckpt, lambda sd: sd.__setitem__("model.transformer.blocks.0.ff_out.weight", torch.zeros(64, 95)))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ff_out\.weight has shape \(64, 95\), expected \(64, 96\)"):
        load_weights(ckpt, load_config(ckpt))


def test_weights_truncated_file(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(ckpt, load_config(ckpt))
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(ckpt, load_config(ckpt))


def test_weights_corrupt_header(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(ckpt, load_config(ckpt))


def test_weights_missing_shard_and_no_weights(tiny_ckpt_sharded, tmp_path):
    ckpt = _copy(tiny_ckpt_sharded, tmp_path)
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard 'model-00002-of-00003.safetensors'.*is missing"):
        load_weights(ckpt, load_config(ckpt))
    for f in ckpt.glob("model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_weights(ckpt, load_config(ckpt))


def test_tokenizer_special_ids_and_template(tiny_ckpt, tiny_ckpt_sharded):
    tok = Tokenizer(tiny_ckpt)
    assert (tok.bos_id, tok.eos_id, tok.mask_id, tok.eot_id) == (BOS, EOS, MASK, EOT)
    text = tok.render_chat([{"role": "system", "content": "dropped"}, {"role": "user", "content": "  Hi!\n"}])
    print(repr(text))
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.encode_chat("Hi!")
    assert ids[0] == BOS and ids.count(EOT) == 1 and tok.decode(ids) == "user\n\nHi!assistant\n\n"
    assert tok.cut_at_stop([5, 6, EOT, 7, EOS]) == [5, 6]
    base = Tokenizer(tiny_ckpt_sharded)
    assert not base.is_chat and base.encode("ab") == [10, 11]
    with pytest.raises(TokenizerError, match="no chat_template"):
        base.encode_chat("x")


def test_tokenizer_errors(tmp_path, tiny_ckpt):
    with pytest.raises(TokenizerError, match="tokenizer.json: not found"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="cannot be loaded"):
        Tokenizer(tmp_path)
    shutil.copy(tiny_ckpt / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="config.json says mask_token_id=5"):
        Tokenizer(tmp_path, mask_id=5)


def test_config_accepts_json_integers_and_nulls(tiny_ckpt, tmp_path):
    """What the checks must not reject: an integer rope_theta, null for optional keys (their defaults)."""
    d = json.loads((tiny_ckpt / "config.json").read_text())
    d.update(rope_theta=500000, rms_norm_eps=None, weight_tying=None, embedding_size=None, pad_token_id=None,
             n_kv_heads=None, multi_query_attention=None)
    cfg = LLaDAConfig.from_dict(d)
    print(cfg)
    assert cfg.rope_theta == 500000.0 and type(cfg.rope_theta) is float and cfg.rms_norm_eps == 1e-5
    assert (cfg.weight_tying, cfg.embedding_size, cfg.pad_token_id, cfg.n_kv_heads) == (False, cfg.vocab_size,
                                                                                       EOS, cfg.n_heads)


def test_check_finite_false_loads_non_finite_weights(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    _rewrite(ckpt, lambda sd: sd["model.transformer.blocks.0.attn_out.weight"].view(-1).__setitem__(7, float("nan")))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn_out\.weight has 1 NaN"):
        load_weights(ckpt, load_config(ckpt))
    w = load_weights(ckpt, load_config(ckpt), check_finite=False)
    wo = w.layers[0].wo.dense()
    print(wo.reshape(-1)[:8])
    assert torch.isnan(wo).sum() == 1


def test_header_metadata_null_and_zero_size_tensors(tmp_path):
    """Headers the safetensors library opens: __metadata__ null, a zero-size tensor, entries in any order."""
    header = {"b": {"dtype": "BF16", "shape": [3], "data_offsets": [8, 14]}, "__metadata__": None,
              "z": {"dtype": "F32", "shape": [0, 5], "data_offsets": [8, 8]},
              "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(14))
    got = read_header(f)
    with safe_open(str(f), framework="pt") as lib:
        print(got, list(lib.keys()))
        assert sorted(lib.keys()) == sorted(k for k in got if k != "__metadata__")


def test_base_tokenizer_without_chat_tokens_loads(tiny_ckpt_sharded, tmp_path):
    """Without a chat template, a tokenizer lacking <|eot_id|> and the header tokens is fine (a Base model)."""
    ckpt = _copy(tiny_ckpt_sharded, tmp_path)
    d = json.loads((ckpt / "tokenizer.json").read_text())
    drop = {"<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"}
    d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] not in drop]
    for t in drop:
        del d["model"]["vocab"][t]
    (ckpt / "tokenizer.json").write_text(json.dumps(d))
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if v["content"] not in drop}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(ckpt)
    print(tok.stop_ids)
    assert not tok.is_chat and tok.eot_id is None and tok.stop_ids == [EOS]


def test_chat_template_list_uses_default(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "unused"}, {"name": "default",
                                                                        "template": cfg["chat_template"]}]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(ckpt)
    assert tok.render_chat([{"role": "user", "content": "Hi!"}]) == Tokenizer(tiny_ckpt).render_chat(
        [{"role": "user", "content": "Hi!"}])


def test_load_generation_config(tiny_ckpt, tmp_path):
    got = load_generation_config(tiny_ckpt, vocab_size=load_config(tiny_ckpt).vocab_size)
    print(got)
    assert got == {"bos_token_id": BOS, "eos_token_id": EOS}
    assert load_generation_config(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, EOT], "pad_token_id": None,
                                                                "gen_length": 64, "temperature": 0.0}))
    assert load_generation_config(tmp_path)["eos_token_id"] == [EOS, EOT]
