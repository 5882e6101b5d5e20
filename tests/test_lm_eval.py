"""The lm-eval model `llada_rt` (llada_rt/lm_eval_model.py) and the local tasks: lm-eval's simple_evaluate runs both
local tasks offline and its numbers are those of the runtime computed directly; generate_until honours until and
max_gen_toks; is_greedy; rolling; lm-eval's arguments (batch_size strings, device); `llada-rt eval` end to end."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install '.[test]')")
from lm_eval.api.instance import Instance  # noqa: E402

from llada_rt.lm_eval_model import TASKS_DIR, LLaDARuntimeLM, parse_batch_size  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}

import build_lm_eval_tasks  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    return LLaDARuntimeLM(batch_size="auto", mc_num=32)


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_task_data_is_fresh():
    """The committed task data is what bench/build_lm_eval_tasks.py writes from the task suite."""
    assert build_lm_eval_tasks.main(["--check"]) == 0
    rows = [json.loads(line) for line in (TASKS_DIR / "capitals.jsonl").read_text().splitlines()]
    assert all(r["choices"][r["label"]] and len(set(r["choices"])) == 4 for r in rows)


SIMPLE_EVALUATE = r"""
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
import llada_rt.lm_eval_model as m
r = lm_eval.simple_evaluate(model="llada_rt", model_args={"mc_num": 32},
                            tasks=["llada_rt_heldout", "llada_rt_capitals"], limit=2, batch_size="auto", device="cuda:0", apply_chat_template=True, log_samples=True,
                            task_manager=TaskManager(include_path=str(m.TASKS_DIR)))
samples = {t: [{"args": s["arguments"], "resps": s["resps"], "target": s["target"]} for s in v]
           for t, v in r["samples"].items()}
json.dump({"results": r["results"], "samples": samples}, sys.stdout, default=str)
"""


def test_simple_evaluate_runs_local_tasks_offline(lm):
    """Both local tasks through lm-eval's own simple_evaluate, offline, in a fresh process (device 'cuda:0' as lm-eval's
    CLI default, on a machine without a GPU too); every generation and every choice's score is then recomputed
    directly with the runtime and the metrics must follow from them."""
    env = {**os.environ, **OFFLINE}
    r = subprocess.run([sys.executable, "-c", SIMPLE_EVALUATE], capture_output=True, text=True, timeout=900, env=env,
                       cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    res, samples = out["results"], out["samples"]
    rt = lm.rt
    for task in ("reverse", "sort", "add", "capital", "country"):
        name = f"llada_rt_heldout_{task}"
        got = [s["resps"][0][0] for s in samples[name]]
        contexts = [s["args"][0][0] for s in samples[name]]                  # arguments: (context, gen_kwargs)
        assert all(c.startswith(rt.tokenizer.render_chat([{"role": "user", "content": ""}])[:10]) for c in contexts)
        direct = rt.generate([rt.tokenizer.encode(c) for c in contexts], chat=False, gen_length=32,
                             block_length=32).texts
        direct = [t.split("\n")[0] for t in direct]
        em = sum(g.strip() == s["target"] for g, s in zip(got, samples[name])) / len(got)
        print(name, got, direct, em, res[name]["exact_match,none"])
        assert got == direct
        assert res[name]["exact_match,none"] == pytest.approx(em)
    assert res["llada_rt_heldout"]["exact_match,none"] == pytest.approx(
        sum(res[f"llada_rt_heldout_{t}"]["exact_match,none"] for t in ("reverse", "sort", "add", "capital", "country"))
        / 5)
    docs = samples["llada_rt_capitals"]
    correct = 0
    for s in docs:
        conts = [a[1] for a in s["args"]]                                     # per choice: (context, continuation)
        lls = [x[0][0] for x in s["resps"]]
        ctx = rt.tokenizer.encode(s["args"][0][0])
        direct = rt.log_likelihood([ctx] * 4, conts, mc_num=32, batch_size=32)
        print(conts, lls, direct.estimates)
        assert lls == pytest.approx(direct.estimates, rel=1e-6)
        best = max(range(4), key=lambda i: lls[i])
        correct += best == int(s["target"])
    assert res["llada_rt_capitals"]["acc,none"] == pytest.approx(correct / len(docs))


def test_generate_until_honours_until_and_max_gen_toks(lm):
    rt = lm.rt
    prompts = [lm.apply_chat_template([{"role": "user", "content": q}]) for q in
               ("Reverse the string: qwxkab", "Sort the list: 5 2 9 2 7", "Which city is the capital of France?")]
    ids = [rt.tokenizer.encode(p) for p in prompts]
    full = rt.generate(ids, chat=False, gen_length=32, block_length=32)
    stop = full.texts[0][2:4]
    out = lm.generate_until([_req("generate_until", p, {"until": [stop] if i == 0 else stop, "max_gen_toks": 32})
                             for i, p in enumerate(prompts)])
    expect = [t[:t.index(stop)] if stop in t else t for t in full.texts]
    print("until", repr(stop), out, expect)
    assert out == expect and stop not in out[0] and len(out[0]) < len(full.texts[0])
    # a canvas of gen_length 32 cut to 3 tokens: the first 3 answer tokens
    lm32 = LLaDARuntimeLM(batch_size=2, gen_length=32, block_length=32)
    cut = lm32.generate_until([_req("generate_until", p, {"until": [], "max_gen_toks": 3}) for p in prompts])
    print("cut", cut)
    assert cut == [rt.tokenizer.decode(t[:3]) for t in full.token_ids]
    # without gen_length the canvas is max_gen_toks (here 4, one block of 4): as Runtime.generate with those settings
    small = lm.generate_until([_req("generate_until", p, {"max_gen_toks": 4, "do_sample": False}) for p in prompts])
    direct = rt.generate(ids, chat=False, gen_length=4, block_length=4).texts
    print("max_gen_toks 4", small, direct)
    assert small == direct and all(len(rt.tokenizer.encode(t)) <= 4 for t in small)


def test_generate_until_passes_runtime_options():
    lm_fast = LLaDARuntimeLM(batch_size="auto", mode="dual", threshold=0.9, block_length=8)
    rt = lm_fast.rt
    prompts = [lm_fast.apply_chat_template([{"role": "user", "content": "Reverse the string: hello"}])]
    out = lm_fast.generate_until([_req("generate_until", prompts[0], {"max_gen_toks": 32})])
    direct = rt.generate([rt.tokenizer.encode(prompts[0])], chat=False, gen_length=32, block_length=8, mode="dual",
                         threshold=0.9)
    print(out, direct.texts, direct.nfe)
    assert out == direct.texts and direct.nfe < 32


def test_loglikelihood_is_greedy(lm):
    rt = lm.rt
    ctx = lm.apply_chat_template([{"role": "user", "content": "Reverse the string: qwxk"}])
    L = 4
    res = rt.generate([rt.tokenizer.encode(ctx)], chat=False, gen_length=L, block_length=L, steps=L)
    greedy = rt.tokenizer.decode(res.canvas[0, res.prompt_len:].tolist(), skip_special_tokens=False)
    other = "abcd" if greedy != "abcd" else "abce"
    out = lm.loglikelihood([_req("loglikelihood", ctx, greedy), _req("loglikelihood", ctx, other)])
    print(repr(greedy), out)
    assert [g for _, g in out] == [True, False]
    assert out[0][0] > out[1][0]
    no_check = LLaDARuntimeLM(mc_num=32, check_greedy=False).loglikelihood([_req("loglikelihood", ctx, greedy)])
    assert no_check[0] == (out[0][0], False)


def test_loglikelihood_empty_context_and_rolling(lm):
    rt = lm.rt
    out = lm.loglikelihood([_req("loglikelihood", "", "Paris")])
    direct = rt.log_likelihood([[rt.tokenizer.bos_id]], ["Paris"], mc_num=32, batch_size=32)
    assert out[0][0] == pytest.approx(direct.estimates[0], rel=1e-9)
    texts = ["Reverse the string: qwxk", "a" * 700]
    rolled = lm.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in texts])
    direct = rt.log_likelihood_rolling(texts, mc_num=32, batch_size=32)
    print(rolled, direct.estimates, direct.windows)
    assert rolled == pytest.approx(direct.estimates, rel=1e-6) and len(direct.windows[1]) == 2
    official = LLaDARuntimeLM(mc_num=32, check_greedy=False, ties="official")   # model_args ties reaches the estimator
    out = official.loglikelihood([_req("loglikelihood", "", "Paris")])
    direct = rt.log_likelihood([[rt.tokenizer.bos_id]], ["Paris"], mc_num=32, batch_size=32, ties="official")
    print("ties=official", out, direct.estimates)
    assert out[0][0] == pytest.approx(direct.estimates[0], rel=1e-9)


def test_arguments():
    assert parse_batch_size("auto") is None and parse_batch_size("auto:4") is None
    assert parse_batch_size("8") == 8 and parse_batch_size(3) == 3
    for bad in ("0", "x", -1, None):
        with pytest.raises(ValueError, match="batch_size"):
            parse_batch_size(bad)
    with pytest.raises(ValueError, match="unknown model_args tempreature"):
        LLaDARuntimeLM(tempreature=0.5)
    with pytest.raises(ValueError, match="block_length"):
        LLaDARuntimeLM(gen_length=30, block_length=8)
    with pytest.raises(ValueError, match="ties must be one of 'uniform', 'official', got 'even'"):
        LLaDARuntimeLM(ties="even")
    lm_ = LLaDARuntimeLM(device="cuda:0", mc_num=16)
    assert lm_.rt.device.type == ("cuda" if torch.cuda.is_available() else "cpu") and lm_.mc_batch_size == 16
    assert lm_.tokenizer_name.startswith("llada_rt:") and "{%" in lm_.chat_template()
    with pytest.raises(ValueError, match="unsupported gen_kwargs top_p"):
        lm_.generate_until([_req("generate_until", "x", {"top_p": 0.9})])


def test_llada_rt_eval_command():
    """`llada-rt eval` runs lm-eval's CLI with the model registered and the packaged tasks found, outside the
    checkout (the installed package's task files)."""
    env = {**os.environ, **OFFLINE, "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "-m", "llada_rt.cli", "eval", "--threads", "2", "--tasks", "llada_rt_capitals",
                        "--limit", "1", "--apply_chat_template", "--model_args", "mc_num=16"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=tempfile.gettempdir())
    print(r.stdout[-2000:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "llada_rt_capitals" in r.stdout and "acc" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "llada_rt.cli", "eval"], capture_output=True, text=True, timeout=300,
                         env=env, cwd=tempfile.gettempdir())
    assert bad.returncode == 2 and "no lm-eval options" in bad.stderr
