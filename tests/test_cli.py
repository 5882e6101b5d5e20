"""The llada-rt command through subprocesses: generate (argument, stdin, file, stream, json), chat, info, bench, help,
and clear one-line errors with exit code 2 for bad input."""
import json
import os
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "llada_rt" / "models" / "small"
sys.path.insert(0, str(ROOT / "bench"))

import tasks  # noqa: E402

REVERSE = next(e for e in tasks.heldout_set(per_task=3) if e.task == "reverse")  # a held-out prompt


def cli(*args, stdin=None, timeout=300):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    # run outside the checkout, so that the installed package is what runs (as for a user)
    return subprocess.run([sys.executable, "-m", "llada_rt.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=tempfile.gettempdir(), env=env)


def assert_clean_error(r, code=2, *needles):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "error" in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_shipped_model_present():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (SHIPPED / name).is_file(), name
    size = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert size < 20 * 2**20


def test_help():
    r = cli("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("generate", "chat", "bench", "info"))
    r = cli("generate", "--help")
    assert r.returncode == 0
    for opt in ("--gen-length", "--block-length", "--steps", "--temperature", "--cfg-scale", "--remasking",
                "--logits-eos-inf", "--confidence-eos-eot-inf", "--seed", "--mode", "--stream", "--file", "--model"):
        assert opt in r.stdout, opt


def test_no_command_is_a_usage_error():
    r = cli()
    assert r.returncode == 2 and "usage" in r.stderr


@pytest.fixture(scope="module")
def answer():
    """What the shipped model answers to REVERSE (greedy exact mode is deterministic)."""
    r = cli("generate", REVERSE.prompt)
    assert r.returncode == 0, r.stderr
    print(repr(REVERSE.prompt), "->", repr(r.stdout))
    return r.stdout


def test_generate_heldout_prompt_is_correct(answer):
    assert tasks.check(REVERSE, answer.strip()), (answer, REVERSE.answer)


def test_generate_from_stdin_and_file(tmp_path, answer):
    r = cli("generate", stdin=REVERSE.prompt + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == answer
    f = tmp_path / "prompt.txt"
    f.write_text(REVERSE.prompt)
    r = cli("generate", "--file", str(f))
    assert r.returncode == 0 and r.stdout == answer, r.stderr


def test_generate_json_and_options():
    r = cli("generate", REVERSE.prompt, "--json", "--gen-length", "64", "--block-length", "32", "--steps", "64")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["nfe"] == 64 and out["options"]["gen_length"] == 64 and isinstance(out["text"], str)


def test_generate_stream_shows_masks_and_progress():
    r = cli("generate", REVERSE.prompt, "--stream", "--gen-length", "16", "--block-length", "16")
    assert r.returncode == 0, r.stderr
    assert "step 1/16" in r.stdout and "step 16/16" in r.stdout
    assert "\u2591" in r.stdout                       # masks visible while unmasking
    plain = cli("generate", REVERSE.prompt, "--gen-length", "16", "--block-length", "16")
    assert r.stdout.rstrip().endswith("--- answer\n" + plain.stdout.strip()) or not plain.stdout.strip()


def test_chat_carries_the_conversation():
    r = cli("chat", stdin="What is 12 + 30?\nReverse the string: abc\n")
    assert r.returncode == 0, r.stderr
    assert len([l for l in r.stdout.splitlines() if l.strip()]) == 2


def test_info():
    r = cli("info")
    assert r.returncode == 0, r.stderr
    for needle in ("parameters", "d_model", "F32", "size on disk", "mask"):
        assert needle in r.stdout, needle
    info = json.loads(cli("info", "--json").stdout)
    tok = json.loads((SHIPPED / "tokenizer_config.json").read_text())
    by_content = {v["content"]: int(k) for k, v in tok["added_tokens_decoder"].items()}
    assert info["special_ids"]["mask"] == by_content["<|mdm_mask|>"]
    assert info["special_ids"]["eot"] == by_content["<|eot_id|>"]


def test_bench_runs(tmp_path):
    r = cli("bench", "--device", "cpu", "--num-prompts", "1", "--gen-length", "16", "--block-length", "16",
            "--repeat", "1", "--warmup", "0", "--modes", "exact", "--json", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b.json").is_file()


def test_bad_model_path():
    r = cli("generate", "--model", "/nonexistent/ckpt", "hi")
    assert_clean_error(r, 2, "/nonexistent/ckpt")
    assert_clean_error(cli("info", "--model", "/nonexistent/ckpt"), 2)


def test_bad_checkpoint_is_a_runtime_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert_clean_error(cli("generate", "--model", str(tmp_path), "hi"), 1, "config.json")


def test_bad_options():
    assert_clean_error(cli("generate", "hi", "--gen-length", "30", "--block-length", "32"), 2, "block_length")
    assert_clean_error(cli("generate", "hi", "--remasking", "sideways"), 2)
    assert_clean_error(cli("generate", "hi", "--steps", "many"), 2)
    assert_clean_error(cli("generate", "hi", "--no-such-option"), 2)
    assert_clean_error(cli("generate", "hi", "--temperature", "-1"), 2, "temperature")
    assert_clean_error(cli("generate", "--file", "/nonexistent/prompt.txt"), 2, "prompt.txt")
    assert_clean_error(cli("generate", stdin=""), 2, "empty")


@pytest.mark.skipif(shutil.which("llada-rt") is None, reason="package not installed (pip install .)")
def test_console_script():
    r = subprocess.run(["llada-rt", "generate", REVERSE.prompt], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == cli("generate", REVERSE.prompt).stdout, r.stderr
