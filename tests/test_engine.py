"""The engine: requests joining and leaving at any step give what they give alone (greedy and sampled, every mode),
cancel frees the row, interleaved streams, inference mode left as found, no allocation in a warm step, defaults from
generation_config.json, chat history, and clear errors for what cannot run."""
import json

import pytest
import torch

from llada_rt import Runtime
from llada_rt.engine import Engine
from llada_rt.generation_config import GenerationConfigError
from llada_rt.testing import SMALL_VOCAB, write_checkpoint

# every mode and rule; sampled rows use random remasking where the rule allows it
MODES = [
    dict(mode="exact"), dict(mode="prefix"), dict(mode="dual"),
    dict(mode="exact", threshold=0.3), dict(mode="prefix", threshold=0.3), dict(mode="dual", threshold=0.3),
    dict(mode="dual", factor=1.0),
]
GEN = dict(gen_length=24, block_length=8, steps=24)


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("engine"), seed=4, vocab=SMALL_VOCAB, eos_scale=0.13)
    return Runtime(ckpt, device="cpu", dtype=torch.float32)


def _prompts(n, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def _sampled(opts):
    extra = dict(temperature=0.9, seed=11)
    if "threshold" not in opts and "factor" not in opts:
        extra["remasking"] = "random"
    return {**opts, **extra}


@pytest.mark.parametrize("opts", MODES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_sampled_batch_invariance(rt, opts):
    """temperature > 0 (and random remasking): every prompt gives the same tokens alone and in a batch."""
    prompts = _prompts(3, [5, 17, 11], seed=2)
    gen = dict(**GEN, **_sampled(opts))
    batch = rt.generate(prompts, **gen)
    for b, p in enumerate(prompts):
        alone = rt.generate(p, **gen)
        print(opts, b, alone.token_ids[0][:8], batch.token_ids[b][:8])
        assert alone.token_ids[0] == batch.token_ids[b]
        assert torch.equal(alone.canvas[0, len(p):], batch.canvas[b, batch.prompt_len:])


@pytest.mark.parametrize("opts", MODES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_early_stop_is_text_exact_when_sampling(rt, opts):
    prompts = _prompts(5, [6, 13, 9, 7, 5], seed=3)
    gen = dict(gen_length=32, block_length=8, steps=32, **_sampled(opts))
    full = rt.generate(prompts, **gen)
    early = rt.generate(prompts, early_stop=True, **gen)
    print(opts, [len(t) for t in full.token_ids], "nfe", full.nfe_per_row, "->", early.nfe_per_row)
    assert early.texts == full.texts and early.token_ids == full.token_ids
    assert all(e <= f for e, f in zip(early.nfe_per_row, full.nfe_per_row))


def _run_until_done(rt, reqs):
    while not all(r.done for r in reqs):
        rt.step()


@pytest.mark.parametrize("opts", [dict(mode="exact"), dict(mode="dual", threshold=0.3),
                                  dict(mode="prefix", temperature=0.8, seed=5)],
                         ids=["exact", "dual-thr", "prefix-sampled"])
def test_request_joining_mid_block_gives_its_solo_tokens(rt, opts):
    a, b, c = _prompts(3, [7, 12, 4], seed=4)
    gc = rt.make_config(dict(**GEN, **opts))
    solo = [rt.generate(p, **GEN, **opts).token_ids[0] for p in (a, b, c)]
    ra = rt.add(a, gc)
    for _ in range(3):          # a is in the middle of its first block
        rt.step()
    rb = rt.add(b, rt.make_config(dict(**GEN, **opts)))
    rt.step()
    rc = rt.add(c, rt.make_config(dict(gen_length=16, block_length=8, steps=16, **opts)))   # another length too
    _run_until_done(rt, [ra, rb, rc])
    got = [rt.tokenizer.cut_at_stop(r.answer) for r in (ra, rb)]
    solo_c = rt.generate(c, gen_length=16, block_length=8, steps=16, **opts).token_ids[0]
    print(opts, got, solo[:2])
    assert got == solo[:2] and rt.tokenizer.cut_at_stop(rc.answer) == solo_c
    assert rt.engine.active == []


def test_cancel_frees_the_row_and_others_are_unaffected(rt):
    a, b, c = _prompts(3, [7, 12, 9], seed=5)
    gc = rt.make_config(GEN)
    ra, rb = rt.add(a, gc), rt.add(b, gc)
    rt.step()
    rt.step()
    slot = ra.slot
    rt.cancel(ra)
    assert ra.done and ra.cancelled and ra not in rt.engine.active and slot in rt.engine.free
    rc = rt.add(c, gc)
    assert rc.slot == slot                       # the freed row is reused
    _run_until_done(rt, [rb, rc])
    for r, p in ((rb, b), (rc, c)):
        assert rt.tokenizer.cut_at_stop(r.answer) == rt.generate(p, **GEN).token_ids[0]


def test_interleaved_streams_give_their_solo_results_and_leave_inference_mode_alone(rt):
    p1, p2 = _prompts(2, [6, 10], seed=6)
    g1, g2 = dict(**GEN, mode="dual", threshold=0.3), dict(**GEN, temperature=0.7, seed=2)
    s1, s2 = rt.stream(p1, **g1), rt.stream(p2, **g2)
    assert not torch.is_inference_mode_enabled()
    r1 = r2 = None
    while r1 is None or r2 is None:
        for s, which in ((s1, 1), (s2, 2)):
            if (r1 if which == 1 else r2) is not None:
                continue
            ev = next(s)
            assert not torch.is_inference_mode_enabled()   # the caller's code between events runs normally
            if ev.result is not None:
                if which == 1:
                    r1 = ev.result
                else:
                    r2 = ev.result
    assert not torch.is_inference_mode_enabled()
    assert r1.token_ids[0] == rt.generate(p1, **g1).token_ids[0]
    assert r2.token_ids[0] == rt.generate(p2, **g2).token_ids[0]


def test_a_stream_left_unfinished_frees_its_rows(rt):
    s = rt.stream(_prompts(2, [6, 10], seed=7), **GEN)
    next(s)
    assert len(rt.engine.active) == 2
    s.close()
    assert rt.engine.active == []


@pytest.mark.parametrize("mode", ["dual", "prefix"])
def test_a_refresh_shares_the_forward_of_cached_steps(rt, mode):
    """A row's refresh (a full window) and other rows' cached steps (their block or suffix) run as one forward, each
    row attending in its own rectangle, and every row still gives its solo tokens."""
    a, b, c = _prompts(3, [9, 5, 14], seed=6)
    opts = dict(**GEN, mode=mode)
    solo = [rt.generate(p, **opts).token_ids[0] for p in (a, b, c)]
    gc = rt.make_config(opts)
    ra, rb = rt.add(a, gc), rt.add(b, gc)
    for _ in range(2):
        rt.step()
    rc = rt.add(c, gc)
    before = rt.engine.forwards
    events = rt.step()
    print(mode, "forwards", rt.engine.forwards - before, "refresh flags", [e.refresh for e in events])
    assert rt.engine.forwards - before == 1 and sorted(e.refresh for e in events) == [False, False, True]
    _run_until_done(rt, [ra, rb, rc])
    got = [rt.tokenizer.cut_at_stop(r.answer) for r in (ra, rb, rc)]
    print(got, solo)
    assert got == solo


def test_warm_step_allocates_nothing(rt):
    """Once the engine has run a shape, its device step performs no allocation (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    real = Engine._device_step

    def profiled(self, plan):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            real(self, plan)
        key = (plan["phase"].window, plan["cfg"])
        counts.setdefault(key, []).append(sum(1 for e in prof.events() if e.cpu_memory_usage > 0))

    prompts = _prompts(2, [7, 12], seed=8)
    for opts in (dict(mode="exact"), dict(mode="dual", threshold=0.5), dict(mode="prefix"),
                 dict(mode="exact", cfg_scale=0.5), dict(mode="dual", temperature=0.7, remasking="random")):
        rt.generate(prompts, **GEN, **opts)               # warm: the workspace reaches its size
        Engine._device_step = profiled
        try:
            rt.generate(prompts, **GEN, **opts)
        finally:
            Engine._device_step = real
    print({k: (len(v), max(v)) for k, v in counts.items()})
    assert counts and all(max(v) == 0 for v in counts.values())


def test_defaults_come_from_generation_config(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck", seed=1, vocab=SMALL_VOCAB)
    gen_cfg = json.loads((ckpt / "generation_config.json").read_text())
    gen_cfg.update(gen_length=16, block_length=8, steps=8)
    (ckpt / "generation_config.json").write_text(json.dumps(gen_cfg))
    rt = Runtime(ckpt, device="cpu")
    res = rt.generate([5, 6, 7])
    assert res.config.gen_length == 16 and res.config.block_length == 8 and res.nfe == 8
    # a gen_length given alone takes its own steps (= gen_length) and a block that fits
    res = rt.generate([5, 6, 7], gen_length=4)
    assert (res.config.gen_length, res.config.block_length, res.nfe) == (4, 4, 4)


def test_shipped_defaults_agree_between_api_and_cli():
    rt = Runtime()
    gc = rt.make_config({})
    shipped = json.loads((rt.path / "generation_config.json").read_text())
    assert (gc.gen_length, gc.block_length, gc.total_steps) == (shipped["gen_length"], shipped["block_length"],
                                                                 shipped["steps"])


def test_chat_carries_the_history_as_chat_py(rt):
    """The conversation's ids are the first turn's ids, the answer and its end of turn, then the next turn's ids
    without their BOS: the history ML-GSAI chat.py builds."""
    tok = rt.tokenizer
    first = rt.chat([{"role": "user", "content": "Hi"}], **GEN)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first.text},
            {"role": "user", "content": "More"}]
    history = tok.encode_chat(msgs[:1]) + tok.encode(first.text) + [tok.eot_id] + \
        tok.encode_chat(msgs[2:])[1:]
    assert tok.encode_chat(msgs) == history
    second = rt.chat(msgs, **GEN)
    assert second.text == rt.generate(history, **GEN).text


def test_chat_drops_the_oldest_turns_when_the_context_is_full(rt):
    long = "x" * 150
    msgs = []
    for i in range(4):
        msgs += [{"role": "user", "content": long}, {"role": "assistant", "content": long}]
    msgs.append({"role": "user", "content": "last"})
    res = rt.chat(msgs, **GEN)
    print("dropped", res.dropped_turns)
    assert res.dropped_turns >= 1
    with pytest.raises(GenerationConfigError, match="the last message alone"):
        rt.chat([{"role": "user", "content": "y" * 600}], **GEN)


@pytest.mark.parametrize("opts,match", [
    ({"cuda_graph": True}, "cuda_graph=True needs a CUDA device"),
    ({"block_length": 2048, "gen_length": 2048}, "above the kernels' limit"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"seed": -1}, "seed must be an integer"),
    ({"steps": 48}, "more than gen_length"),
])
def test_settings_that_cannot_run(rt, opts, match):
    with pytest.raises(GenerationConfigError, match=match):
        rt.generate([1, 2, 3], **{**GEN, **opts})


def test_backend_torch_runs_every_op_from_reference(rt, monkeypatch):
    from llada_rt import ops

    def banned(*a, **k):
        raise AssertionError("a compiled op ran under backend='torch'")

    ref = Runtime(rt.path, device="cpu", backend="torch")
    for name in ("confidence", "remask", "advance", "attention", "rms_norm", "rope", "silu_mul", "linear"):
        monkeypatch.setattr(ops, name, banned, raising=False)
    p = _prompts(1, [6], seed=9)[0]
    got = ref.generate(p, gen_length=8, block_length=8, steps=8, mode="dual")
    monkeypatch.undo()
    want = rt.generate(p, gen_length=8, block_length=8, steps=8, mode="dual")
    assert got.token_ids == want.token_ids
