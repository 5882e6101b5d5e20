"""The llada-rt command through subprocesses: generate (argument, stdin, file, stream, json), chat, info, bench, help,
clear one-line errors with the documented exit codes for bad input, Ctrl-C at several moments, closed and non-UTF-8
streams, and a chat session that outgrows the context."""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import sys
import time
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


def test_bench_arrivals_and_scaling(tmp_path):
    """The engine benchmarks through the command: staggered requests give the same answers served together as one
    after another; the scaling rows cover every batch size asked for."""
    r = cli("bench", "--device", "cpu", "--arrivals", "3", "--mode", "dual", "--gen-length", "16", "--block-length",
            "8", "--rate", "200", "--rounds", "2", "--json", str(tmp_path / "a.json"))
    print(r.stdout[-600:], r.stderr[-600:])
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "a.json").read_text())
    assert out["identical"] is True and len(out["rounds"]) == len(out["speedups"]) == 2
    assert [x["engine_first"] for x in out["rounds"]] == [False, True]
    for x in out["rounds"]:
        assert x["identical"] is True and x["engine"]["requests"] == x["sequential"]["requests"] == 3
        assert x["speedup"] == x["engine"]["requests_per_s"] / x["sequential"]["requests_per_s"]
    assert min(out["speedups"]) <= out["speedup_median"] <= max(out["speedups"])
    assert_clean_error(cli("bench", "--arrivals", "3", "--rounds", "0"), 2, "--rounds")
    r = cli("bench", "--device", "cpu", "--scaling", "1,3", "--mode", "exact", "--gen-length", "8", "--block-length",
            "8", "--repeat", "1", "--breakdown", "--json", str(tmp_path / "s.json"))
    print(r.stdout[-900:], r.stderr[-600:])
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "s.json").read_text())["scaling"]
    assert [row["rows"] for row in rows] == [1, 3] and all(row["nfe"] == 8 for row in rows)
    n_layers = 4   # the shipped model: an rms_norm before attention and MLP in each layer, one before the LM head
    for row in rows:   # the breakdown counts each kernel call of the step, and its kernels fit in the step's time
        bd = row["breakdown"]
        assert bd["kernel_calls_per_step"]["rms_norm_cpu"] == 2 * n_layers + 1
        assert bd["kernel_calls_per_step"]["attention_cpu"] == n_layers
        assert all(ms > 0 for ms in bd["kernels_ms"].values())
        assert 0 < sum(bd["kernels_ms"].values()) < bd["ms_per_step"] and bd["host_ms"] > 0
    assert "each further row adds" in r.stdout
    assert_clean_error(cli("bench", "--scaling", "1,x"), 2, "--scaling")
    assert_clean_error(cli("bench", "--breakdown"), 2, "--breakdown")


def test_kernel_clock_times_and_restores():
    """KernelClock times the compiled kernels by name while entered and puts ops._C back on exit, also after an
    error inside it."""
    import torch

    from llada_rt import ops
    from llada_rt.benchmark import KernelClock
    real = ops._C
    x, w = torch.randn(5, 24), torch.randn(24)
    with KernelClock() as clock:
        y = ops.rms_norm(x, w, 1e-5, out=torch.empty_like(x))
        ops.rms_norm(x, w, 1e-5, out=torch.empty_like(x))
    assert ops._C is real and clock.calls == {"rms_norm_cpu": 2} and clock.seconds["rms_norm_cpu"] > 0
    torch.testing.assert_close(y, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w)
    with pytest.raises(ValueError, match="weight must be"), KernelClock():
        ops.rms_norm(x, torch.randn(7), 1e-5)
    assert ops._C is real


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


# ---- no tracebacks: exit codes, Ctrl-C, closed or odd streams, and a chat that outgrows the context ----------------

def test_help_lists_the_exit_codes():
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    for needle in ("exit codes", "0 done", "1 the checkpoint", "2 a bad argument", "130 interrupted", "141"):
        assert needle in r.stdout, needle


def _spawn(*args, stdin=subprocess.PIPE, stdout=subprocess.PIPE):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.Popen([sys.executable, "-m", "llada_rt.cli", *args], stdin=stdin, stdout=stdout,
                            stderr=subprocess.PIPE, cwd=tempfile.gettempdir(), env=env)


# Delays after the start: importing torch (about 0.5 to 3 s here), loading the checkpoint, then waiting on stdin. A
# signal within the interpreter's own start-up (the first ~0.1 s, before any llada_rt code runs) gets Python's
# default handling, which llada_rt cannot change.
@pytest.mark.parametrize("command,delay", [("chat", 0.5), ("chat", 1.5), ("generate", 1.0), ("chat", 8.0)])
def test_ctrl_c_exits_130_quietly(command, delay):
    p = _spawn(command)        # stdin stays open: generate waits for the prompt, chat for the first line
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    print(command, delay, p.returncode, repr(err[-400:]))
    assert p.returncode == 130
    assert b"Traceback" not in err and b"terminate called" not in err and err.strip() == b""


def _with_fd_closed(fd: int, *args):
    """The command run with file descriptor `fd` closed (as `cmd 0<&-` or `cmd 1>&-` in a shell)."""
    return subprocess.run(["bash", "-c", f'exec "$@" {fd}<&-', "_", sys.executable, "-m", "llada_rt.cli", *args],
                          capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir())


def test_stdin_closed_or_at_eof():
    assert_clean_error(cli("generate", stdin=""), 2, "the prompt is empty")                 # </dev/null
    assert_clean_error(_with_fd_closed(0, "generate"), 2, "stdin is closed")
    r = cli("chat", stdin="")                                                               # EOF at once: quits
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.returncode, r.stderr)
    assert_clean_error(_with_fd_closed(0, "chat"), 2, "stdin is closed")


def test_stdout_closed():
    r = _with_fd_closed(1, "info")
    print(r.returncode, r.stderr)
    assert r.returncode == 1 and "standard output is closed" in r.stderr and "Traceback" not in r.stderr
    for args in (["info"], ["info", "--json"], ["--help"]):
        p = _spawn(*args, stdin=subprocess.DEVNULL)
        p.stdout.close()             # the reader went away (as `llada-rt info | true`)
        err = p.stderr.read()
        p.wait(timeout=120)
        print(args, p.returncode, err)
        assert p.returncode in ((141, 0) if args == ["--help"] else (141,)) and err == b"", (p.returncode, err)


def test_prompt_that_is_not_utf8(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("Reverse the string: caf\u00e9".encode("latin-1"))
    assert_clean_error(cli("generate", "--file", str(f)), 2, "--file", "latin1.txt", "not UTF-8", "byte 23", "0xe9")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "-m", "llada_rt.cli", "generate"], input=b"caf\xe9", capture_output=True,
                       timeout=300, cwd=tempfile.gettempdir(), env=env)
    r.stderr = r.stderr.decode()
    assert_clean_error(r, 2, "stdin", "not UTF-8", "byte 3")
    # an argument that is not UTF-8 reaches Python as a lone surrogate: refused with its position
    r = subprocess.run([sys.executable, "-m", "llada_rt.cli", "generate", b"ab\xff"], capture_output=True,
                       timeout=300, cwd=tempfile.gettempdir(), env=env)
    r.stderr = r.stderr.decode()
    assert_clean_error(r, 2, "not valid Unicode", "position 2")


@pytest.mark.parametrize("args,words", [
    (("--device", "gpu0"), ("--device", "'gpu0'", "cpu, cuda or cuda:N")),
    (("--threads", "0"), ("--threads", "'0'")),
    (("--seed", "1.5"), ("--seed", "'1.5'")),
    (("--temperature", "nan"), ("temperature", "finite")),
    (("--cfg-scale", "inf"), ("cfg_scale", "finite")),
    (("--seed", str(2**64)), ("seed", "[0, 2**63)")),
    (("--block-length", "2048", "--gen-length", "2048"), ("block_length=2048", "limit of 1024")),
])
def test_bad_arguments_are_one_line_usage_errors(args, words, capsys):
    """In-process (main() as the console script calls it): exit code 2 and one error line naming the option."""
    from llada_rt import cli as cli_module

    try:
        rc = cli_module.main(["generate", "hi", *args])
    except SystemExit as e:   # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err
    print(args, rc, err.strip().splitlines()[-1])
    assert rc == 2 and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert all(w in err for w in words), words


def test_chat_keeps_the_session_when_the_history_outgrows_the_context(tmp_path, monkeypatch, capsys):
    """The oldest turns are left out with a notice, a turn too long even alone is refused, the session goes on, and
    /reset starts over (through cmd_chat in-process, on a checkpoint with a 96-token context)."""
    import io

    from llada_rt import Runtime, cli as cli_module
    from llada_rt.testing import SMALL_VOCAB, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", vocab=SMALL_VOCAB, max_sequence_length=96)
    seen = []
    chat = Runtime.chat

    def recording_chat(self, messages, **options):
        seen.append([m["content"] for m in messages])
        return chat(self, messages, **options)

    monkeypatch.setattr(Runtime, "chat", recording_chat)
    lines = ["a" * 30, "b" * 30, "c" * 30, "x" * 120, "d" * 10, "/reset", "e" * 10]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    rc = cli_module.main(["chat", "--model", str(ckpt), "--gen-length", "16", "--block-length", "16"])
    out, err = capsys.readouterr()
    print(rc, err, [len(s) for s in seen])
    assert rc == 0
    assert "outgrew the context" in err and "turn refused" in err and "does not fit" in err
    assert "(conversation cleared)" in out
    answers = [line for line in out.splitlines() if line != "(conversation cleared)"]
    assert len(answers) == 5                    # a, b, c, d and e answered; x refused
    users = [s[-1] for s in seen]
    assert users == [lines[0], lines[1], lines[2], lines[3], lines[4], lines[6]]
    assert seen[-1] == [lines[6]]                # after /reset: the new message alone
    assert seen[4][0] != lines[0]                # by d, the oldest turns had been left out of the history kept


def test_bench_packing_and_threads(capsys):
    """The packing benchmark runs both forwards and finds their logits equal; the threads benchmark reports the
    step from both threads for every row count asked for."""
    import torch

    import bench_packing
    import bench_threads
    threads = torch.get_num_threads()
    try:
        assert bench_packing.main(["--rows", "3", "--repeat", "1", "--threads", "1"]) == 0
        out = capsys.readouterr().out
        print(out)
        assert "max |logits padded - packed| = 0\n" in out and "packed is" in out
        assert bench_threads.main(["--rows", "1,2", "--repeat", "1", "--threads", "1"]) == 0
        out = capsys.readouterr().out
        print(out)
        assert out.count("loading thread") == 2 and "rows 2:" in out
    finally:
        torch.set_num_threads(threads)
