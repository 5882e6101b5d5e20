"""bench/train_small.py --quick: the training code runs, the loss falls, runs are reproducible and resumable to the
same weights, the checkpoint loads, the loss is LLaDA's, the bf16 and compiled steps compute it."""
import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import tasks  # noqa: E402
import train_small  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "ckpt"
    res = train_small.train(train_small.TrainConfig(**train_small.QUICK), out, log=lambda s: None,
                            state=out.parent / "state.pt")
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
    h1 = train_small.train(tc, tmp_path / "a", log=lambda s: None, state=tmp_path / "a.pt")["history"]
    h2 = train_small.train(tc, tmp_path / "b", log=lambda s: None, state=tmp_path / "b.pt")["history"]
    assert h1 == h2
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_script_quick_mode(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "train_small.py"), "--quick", "--steps", "2",
                        "--out", str(tmp_path / "q"), "--state", str(tmp_path / "q.pt")], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "saved" in r.stdout and (tmp_path / "q" / "model.safetensors").is_file()


def test_the_shipped_models_stage_commands_give_its_recipe():
    """The shipped model's training.json: the options of its stages' commands (later stages override: the stage
    options), on top of the defaults, are its recorded train_config; fp32 eager steps and an fp32 checkpoint."""
    info = json.loads((ROOT / "llada_rt" / "models" / "small" / "training.json").read_text())
    fields = {f.name: f for f in dataclasses.fields(train_small.TrainConfig)}
    asked = dataclasses.asdict(train_small.TrainConfig())
    for st in info["stages"]:
        words = shlex.split(st["command"])[2:]
        pairs = [(w[2:].replace("-", "_"), words[k + 1]) for k, w in enumerate(words)
                 if w.startswith("--") and w[2:].replace("-", "_") in fields]
        for name, value in pairs:
            if name not in train_small.RUN_ONLY_FIELDS:
                asked[name] = type(fields[name].default)(value)
    recorded = {k: v for k, v in info["train_config"].items() if k not in train_small.RUN_ONLY_FIELDS}
    diff = {k: (v, asked.get(k)) for k, v in recorded.items() if json.loads(json.dumps(asked.get(k))) != v}
    print("stages", [st["command"] for st in info["stages"]], "differing:", diff)
    assert not diff and recorded["amp"] == "off" and recorded["compile"] == 0 and recorded["save_dtype"] == "float32"
    assert sum(st["steps"] for st in info["stages"]) == info["step"] == recorded["steps"]


def test_task_weights_option():
    assert train_small.parse_weights("add=3, reverse=1.5") == {"add": 3.0, "reverse": 1.5}
    assert train_small.parse_weights("") == {} and train_small.TrainConfig.task_weights == ""  # uniform
    for bad in ("add", "add=x", "plus=1", "add=1;sort=2"):
        with pytest.raises(ValueError, match="task=weight"):
            train_small.parse_weights(bad)


def test_word_tokenizer_option(tmp_path):
    tc = train_small.TrainConfig(**{**train_small.QUICK, "steps": 2, "tokenizer": "words",
                                    "task_weights": "reverse=1,capital=1"})
    res = train_small.train(tc, tmp_path / "w", log=lambda s: None, state=tmp_path / "w.pt")
    assert res["cfg"].vocab_size > 128 and res["cfg"].vocab_size % 128 == 0 and len(res["history"]) == 2
    with pytest.raises(ValueError, match="chars or words"):
        train_small.train(train_small.TrainConfig(**{**train_small.QUICK, "tokenizer": "bpe"}), tmp_path / "x",
                          state=tmp_path / "x.pt")


def test_script_rejects_bad_options(tmp_path):
    for args, needle in ((["--task-weights", "add=x"], "task=weight"), (["--tokenizer", "bpe"], "chars or words"),
                         (["--amp", "fp16"], "bf16 or off"), (["--save-dtype", "int8"], "float32 or bfloat16"),
                         (["--task-set", "3"], "--task-set 3: expected one of 1, 2"),
                         (["--state", str(ROOT / "llada_rt" / "s.pt")], "outside the package")):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "train_small.py"), "--quick", *args,
                            "--out", str(tmp_path / "q")], capture_output=True, text=True, timeout=600)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def quiet(s):
    pass


def run(tc, out, **kw):
    return train_small.train(tc, out, log=quiet, state=out.parent / (out.name + ".pt"), **kw)


def assert_same_run(a, b):
    ra, rb = (json.loads((d / "training.json").read_text()) for d in (a, b))
    print("steps", ra["step"], rb["step"], "stages", len(ra["stages"]), len(rb["stages"]))
    assert ra["step"] == rb["step"]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def resumed_equals_uninterrupted(tmp_path, **overrides):
    tc = train_small.TrainConfig(**{**train_small.QUICK, "steps": 8, **overrides})
    full = run(tc, tmp_path / "full")
    part = run(dataclasses.replace(tc, stop_at=3), tmp_path / "part")
    assert part["step"] == 3 and part["history"] == full["history"][:3]
    rest = run(tc, tmp_path / "part", resume=True)
    print("uninterrupted", [round(x, 4) for x in full["history"]], "resumed", [round(x, 4) for x in rest["history"]])
    assert rest["history"] == full["history"] and rest["step"] == 8
    assert_same_run(tmp_path / "full", tmp_path / "part")
    stages = json.loads((tmp_path / "part" / "training.json").read_text())["stages"]
    assert [(st["first_step"], st["steps"]) for st in stages] == [(1, 3), (4, 5)]


def test_resume_is_identical_to_an_uninterrupted_run(tmp_path):
    """Weights, AdamW moments, data stream (with a pool of batches half used), masking RNG and step all restored:
    stop at step 3 (pool of 4 batches), resume, and the losses and the saved weights equal one run's, bit for bit."""
    resumed_equals_uninterrupted(tmp_path, gen_lengths=((16, 0.5), (32, 0.5)), task_set=2)


@pytest.mark.slow
def test_resume_is_identical_with_the_compiled_step(tmp_path):
    resumed_equals_uninterrupted(tmp_path, compile=1, threads=1)


def test_a_signal_stops_at_a_step_boundary_and_resumes(tmp_path):
    """SIGTERM during step 2 (from the log line): the run finishes step 2, writes its state, and --resume goes on."""
    tc = train_small.TrainConfig(**{**train_small.QUICK, "steps": 5})
    full = run(tc, tmp_path / "full")

    def log(line):
        if line.startswith("step     1 "):
            os.kill(os.getpid(), signal.SIGTERM)

    part = train_small.train(tc, tmp_path / "part", log=log, state=tmp_path / "part.pt")
    assert part["step"] == 1 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    rest = run(tc, tmp_path / "part", resume=True)
    assert rest["history"] == full["history"]
    assert_same_run(tmp_path / "full", tmp_path / "part")


def test_resume_checks_the_state(tmp_path):
    tc = train_small.TrainConfig(**{**train_small.QUICK, "steps": 4, "stop_at": 2})
    with pytest.raises(ValueError, match="no training state"):
        run(tc, tmp_path / "a", resume=True)
    run(tc, tmp_path / "a")
    with pytest.raises(ValueError, match="exists .step 2 of 4.*--resume"):
        run(tc, tmp_path / "a")  # a fresh start must not overwrite a run's state by accident
    with pytest.raises(ValueError, match="lr: saved 0.003, asked 0.001"):
        run(dataclasses.replace(tc, lr=1e-3), tmp_path / "a", resume=True)
    res = run(dataclasses.replace(tc, stop_at=0, eval_every=2, eval_per_task=1), tmp_path / "a", resume=True)
    assert res["step"] == 4  # run-only options may change
    with pytest.raises(ValueError, match="outside the package"):
        train_small.train(tc, tmp_path / "b", log=quiet, state=ROOT / "llada_rt" / "models" / "x.pt")
    assert str(train_small.default_state_path(tmp_path / "b")).startswith(str(train_small.DEFAULT_STATE_DIR))
    assert train_small.default_state_path(tmp_path / "b") != train_small.default_state_path(tmp_path / "c")


def test_a_resumed_stage_may_change_the_task_weights(tmp_path):
    """--task-weights is a stage option: a resumed run may draw its tasks in new proportions from its step on (a
    curriculum); the stage records them, the same chain of commands gives the same weights, and the stream's position
    carries over to the new proportions."""
    tc = train_small.TrainConfig(**{**train_small.QUICK, "steps": 6})
    for name in ("a", "b"):
        run(dataclasses.replace(tc, stop_at=3), tmp_path / name)
        run(dataclasses.replace(tc, task_weights="reverse=1"), tmp_path / name, resume=True)
    assert_same_run(tmp_path / "a", tmp_path / "b")
    run(tc, tmp_path / "c")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()
    info = json.loads((tmp_path / "a" / "training.json").read_text())
    print("stages", [(st["first_step"], st["steps"], st["options"]) for st in info["stages"]])
    assert [(st["first_step"], st["steps"], st["options"]["task_weights"]) for st in info["stages"]] == \
        [(1, 3, ""), (4, 3, "reverse=1")]
    assert info["train_config"]["task_weights"] == "reverse=1"
    first = tasks.TrainStream(1)
    drawn = [next(first).task for _ in range(20)]
    assert len(set(drawn)) > 1
    later = tasks.TrainStream(1, {"reverse": 1.0})
    later.setstate(first.getstate())
    assert {next(later).task for _ in range(50)} == {"reverse"}


def test_a_resumed_stage_may_lengthen_the_schedule(tmp_path):
    """--steps may grow on --resume (the cosine then runs over the new total: a warm restart), never shrink."""
    tc = train_small.TrainConfig(**{**train_small.QUICK, "steps": 4})
    run(tc, tmp_path / "a")
    longer = dataclasses.replace(tc, steps=8)
    res = run(longer, tmp_path / "a", resume=True)
    info = json.loads((tmp_path / "a" / "training.json").read_text())
    print("steps", res["step"], [(st["first_step"], st["steps"], st["options"]) for st in info["stages"]])
    assert res["step"] == 8 and len(res["history"]) == 8 and info["train_config"]["steps"] == 8
    assert [(st["steps"], st["options"]["steps"]) for st in info["stages"]] == [(4, 4), (4, 8)]
    lr_at = lambda c, step: train_small.Trainer.lr_at(types.SimpleNamespace(tc=c), step)  # noqa: E731
    assert lr_at(longer, 5) > lr_at(tc, 4)  # the longer schedule's rate at the resumed step: a warm restart
    with pytest.raises(ValueError, match="--steps 6 is below the 8 steps already run"):
        run(dataclasses.replace(tc, steps=6), tmp_path / "a", resume=True)


def script(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "train_small.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_script_resume_takes_the_saved_options(tmp_path):
    """--resume --state S alone continues the saved run (its options, its output directory); a weight-changing
    option given anew is a usage error, a run-only one is taken."""
    state = tmp_path / "s.pt"
    r = script("--quick", "--steps", 4, "--stop-at", 2, "--lr", 0.002, "--out", tmp_path / "q", "--state", state)
    assert r.returncode == 0, r.stderr
    r = script("--resume", "--state", state, "--lr", 0.001)
    assert r.returncode == 2 and "lr: saved 0.002, asked 0.001" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = script("--resume", "--state", state, "--stop-at", 3)
    assert r.returncode == 0 and "at step 3 of 4" in r.stdout, r.stderr
    r = script("--resume", "--state", state)
    assert r.returncode == 0 and "resumed" in r.stdout and "at step 4 of 4 (done)" in r.stdout, r.stderr
    info = json.loads((tmp_path / "q" / "training.json").read_text())
    assert info["step"] == 4 and info["train_config"]["lr"] == 0.002 and len(info["stages"]) == 3
    r = script("--resume", "--state", tmp_path / "none.pt")
    assert r.returncode == 2 and "no training state" in r.stderr and "Traceback" not in r.stderr, r.stderr


def batch_and_weights(G=16, prompt_lengths=(7, 12, 3, 9, 12)):
    from llada_rt.weights import init_weights

    tc = train_small.TrainConfig(**train_small.QUICK)
    cfg = train_small.model_config(tc, {"vocab_size": 128, "mask_token_id": 104, "eos_token_id": 102,
                                        "pad_token_id": 102})
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 100, (n,), generator=g).tolist() for n in prompt_lengths]
    responses = [torch.randint(0, 100, (G,), generator=g).tolist() for _ in prompt_lengths]
    return cfg, init_weights(cfg, seed=3), train_small.collate(prompts, responses, 102)


def reference_loss(cfg, w, tokens, positions, key_start, P, gen):
    """LLaDA's SFT loss written out on its own: the response rows' logits only, CE / p summed, / G, mean."""
    from llada_rt.model import forward

    B, T = tokens.shape
    G = T - P
    t = (torch.arange(B) + torch.rand(B, generator=gen)) / B
    p = (1 - train_small.EPS) * t + train_small.EPS
    m = torch.rand(B, G, generator=gen) < p[:, None]
    noisy = tokens.clone()
    noisy[:, P:][m] = cfg.mask_token_id
    logits = forward(cfg, w, noisy, positions, key_start, rows=slice(P, T), backend="torch").double()
    ce = F.cross_entropy(logits.flatten(0, 1), tokens[:, P:].flatten(), reduction="none").view(B, G)
    return ((ce * m).sum(1) / p.double() / G).mean()


@pytest.mark.parametrize("G", [16, 32])
def test_loss_is_llada_sft_loss(G):
    cfg, w, (tokens, positions, key_start, P) = batch_and_weights(G)
    got = train_small.diffusion_loss(cfg, w, tokens, positions, key_start, P, torch.Generator().manual_seed(1))
    want = reference_loss(cfg, w, tokens, positions, key_start, P, torch.Generator().manual_seed(1))
    print(f"G {G}: loss {got.item():.6f} reference {want.item():.6f} diff {abs(got.item() - want.item()):.2e}")
    assert abs(got.item() - want.item()) < 1e-5 * want.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = train_small.diffusion_loss(cfg, w, tokens, positions, key_start, P, torch.Generator().manual_seed(1))
    print(f"bf16 autocast: {bf16.item():.6f} (rel diff {abs(bf16.item() - want.item()) / want.item():.2e})")
    assert abs(bf16.item() - want.item()) < 2e-2 * want.item()


@pytest.mark.slow
def test_compiled_loss_and_gradients_equal_eager():
    from llada_rt.model import RopeTable

    compiled = torch.compile(train_small.masked_ce, dynamic=True)
    for G, lengths in ((16, (7, 12, 3, 9, 12)), (32, (5, 21, 8, 2, 13))):  # two shapes through one compiled graph
        cfg, w, (tokens, positions, key_start, P) = batch_and_weights(G, lengths)
        params = train_small.params_of(w)
        for t in params:
            t.requires_grad_(True)
        got = {}
        rope = RopeTable.build(cfg, cfg.max_sequence_length, "cpu")
        for name, fn, r in (("eager", train_small.masked_ce, None), ("compiled", compiled, rope)):
            loss = train_small.diffusion_loss(cfg, w, tokens, positions, key_start, P,
                                              torch.Generator().manual_seed(1), loss_fn=fn, rope=r)
            got[name] = (loss.item(), torch.autograd.grad(loss, params))
        (le, ge), (lc, gc) = got["eager"], got["compiled"]
        err = max((a - b).abs().max().item() for a, b in zip(ge, gc))
        print(f"G {G} P {P}: compiled {lc:.6f} eager {le:.6f} max grad diff {err:.2e}")
        assert abs(lc - le) < 1e-5 * le and err < 1e-5


def test_measure_speed_times_each_variant():
    tc = train_small.TrainConfig(**{**train_small.QUICK, "batch_size": 4})
    lines = []
    res = train_small.measure_speed(tc, rounds=2, log=lines.append, steps_per_round=2,
                                    variants=("fp32 eager", "bf16 eager"))
    print("\n".join(lines))
    assert set(res) == {"fp32 eager", "bf16 eager"}
    for m in res.values():
        assert m["steps_per_s"] > 0 and m["examples_per_s"] == pytest.approx(4 * m["steps_per_s"])
        assert m["examples_per_cpu_s"] > 0
    assert any(line.startswith("bf16 eager") and "x," in line for line in lines)


def test_average_checkpoints_is_the_mean_of_one_runs_checkpoints(tmp_path):
    """bench/average_checkpoints.py: each tensor of the result is the fp64 mean of the checkpoints' (an independent
    sum here), the record is the latest checkpoint's plus the steps averaged; checkpoints of another run, one
    checkpoint, or the same step twice are refused with a message, from the command line too."""
    import shutil

    import average_checkpoints
    from safetensors.torch import load_file

    tc = train_small.TrainConfig(**{**train_small.QUICK, "steps": 4})
    run(dataclasses.replace(tc, stop_at=2), tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "at2")
    run(tc, tmp_path / "run", resume=True)
    info = average_checkpoints.average([tmp_path / "at2", tmp_path / "run"], tmp_path / "avg")
    a, b, m = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "at2", tmp_path / "run", tmp_path / "avg"))
    err = max((m[k].double() - (a[k].double() + b[k].double()) / 2).abs().max().item() for k in m)
    print("max |avg - (a + b) / 2|", err)
    assert set(m) == set(a) and err <= 1e-7 and any(not torch.equal(a[k], b[k]) for k in a)
    assert info["average"]["steps"] == [2, 4] and info["step"] == 4 and len(info["stages"]) == 2
    assert json.loads((tmp_path / "avg" / "training.json").read_text()) == info
    from llada_rt import Runtime
    assert Runtime(str(tmp_path / "avg"), device="cpu").generate("hi", gen_length=8, steps=8) is not None

    other = tmp_path / "other"
    run(dataclasses.replace(tc, seed=tc.seed + 1, steps=2), other)
    for ckpts, needle in (([tmp_path / "run", other], "not a prefix"), ([tmp_path / "run"], "at least two"),
                          ([tmp_path / "run", tmp_path / "run"], "same step")):
        with pytest.raises(ValueError, match=needle):
            average_checkpoints.average(ckpts, tmp_path / "bad")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "average_checkpoints.py"), "--out", str(tmp_path / "x"),
                        str(tmp_path / "run"), str(other)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a prefix" in r.stderr and "Traceback" not in r.stderr, r.stderr
