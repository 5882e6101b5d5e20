"""bench/train_small.py --quick: the training code runs, the loss falls, runs are reproducible, the checkpoint loads."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import train_small  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "ckpt"
    res = train_small.train(train_small.TrainConfig(**train_small.QUICK), out, log=lambda s: None)
    return out, res


def test_loss_finite_and_falling(quick_run):
    _, res = quick_run
    h = res["history"]
    print(f"loss first 5 {[round(x, 3) for x in h[:5]]}, last 5 {[round(x, 3) for x in h[-5:]]}")
    assert len(h) == train_small.QUICK["steps"] and all(math.isfinite(x) for x in h)
    assert sum(h[-5:]) / 5 < 0.8 * sum(h[:5]) / 5


def test_checkpoint_files(quick_run):
    out, res = quick_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llada" and cfg["architectures"] == ["LLaDAModelLM"]
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    by_content = {v["content"]: int(k) for k, v in tok_cfg["added_tokens_decoder"].items()}
    assert cfg["mask_token_id"] == by_content["<|mdm_mask|>"]
    assert cfg["eos_token_id"] == cfg["pad_token_id"] == by_content["<|endoftext|>"]
    assert cfg["d_model"] // cfg["n_heads"] in (64, 128)


def test_checkpoint_runs_in_the_runtime(quick_run):
    from llada_rt import Runtime

    out, _ = quick_run
    rt = Runtime(out, device="cpu")
    assert rt.tokenizer.is_chat and rt.config.mask_token_id == rt.tokenizer.mask_id
    res = rt.generate("Reverse the string: abc", gen_length=32, block_length=32, steps=32)
    assert res.nfe == 32 and isinstance(res.text, str)
    # the runtime's forward on the saved weights equals the trained forward (same math, same weights)
    enc = train_small.Encoder(out)
    ids = enc.prompt([{"role": "user", "content": "What is 12 + 30?"}])
    x = torch.tensor([ids + [rt.config.mask_token_id] * 8])
    from llada_rt.model import forward

    a = forward(rt.config, rt.weights, x, backend="torch")
    b = forward(rt.config, rt.weights, x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_training_is_reproducible(tmp_path):
    tc = train_small.TrainConfig(**{**train_small.QUICK, "steps": 3})
    h1 = train_small.train(tc, tmp_path / "a", log=lambda s: None)["history"]
    h2 = train_small.train(tc, tmp_path / "b", log=lambda s: None)["history"]
    assert h1 == h2
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_script_quick_mode(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "train_small.py"), "--quick", "--steps", "2",
                        "--out", str(tmp_path / "q")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "saved" in r.stdout and (tmp_path / "q" / "model.safetensors").is_file()


def test_task_weights_option():
    assert train_small.parse_weights("add=3, reverse=1.5") == {"add": 3.0, "reverse": 1.5}
    assert train_small.parse_weights("") == {} and train_small.TrainConfig.task_weights == ""  # uniform
    for bad in ("add", "add=x", "plus=1", "add=1;sort=2"):
        with pytest.raises(ValueError, match="task=weight"):
            train_small.parse_weights(bad)


def test_word_tokenizer_option(tmp_path):
    tc = train_small.TrainConfig(**{**train_small.QUICK, "steps": 2, "tokenizer": "words",
                                    "task_weights": "reverse=1,capital=1"})
    res = train_small.train(tc, tmp_path / "w", log=lambda s: None)
    assert res["cfg"].vocab_size == 256 and len(res["history"]) == 2
    with pytest.raises(ValueError, match="chars or words"):
        train_small.train(train_small.TrainConfig(**{**train_small.QUICK, "tokenizer": "bpe"}), tmp_path / "x")


def test_script_rejects_bad_options(tmp_path):
    for args, needle in ((["--task-weights", "add=x"], "task=weight"), (["--tokenizer", "bpe"], "chars or words")):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "train_small.py"), "--quick", *args,
                            "--out", str(tmp_path / "q")], capture_output=True, text=True, timeout=600)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
