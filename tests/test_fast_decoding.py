"""Fast decoding: KV cache modes, parallel decoding, early stop, streaming, batch invariance, no host sync in a step."""
import contextlib

import pytest
import torch

from llada_rt.testing import SMALL_VOCAB, write_checkpoint
from llada_rt import Runtime
from llada_rt.cache import KVCache
from llada_rt.engine import Engine
from llada_rt.model import ForwardBatch, forward, forward_batch

MODES = [
    dict(mode="exact"), dict(mode="prefix"), dict(mode="dual"),
    dict(mode="exact", threshold=0.3), dict(mode="prefix", threshold=0.3), dict(mode="dual", threshold=0.3),
    dict(mode="dual", factor=1.0),
]


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    """A small-vocabulary tiny model whose answers end with EOS after 3 tokens for some prompts and never for others."""
    ckpt = write_checkpoint(tmp_path_factory.mktemp("fast"), seed=4, vocab=SMALL_VOCAB, eos_scale=0.13)
    return Runtime(ckpt, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def gqa_rt(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("fast_gqa"), seed=5, vocab=SMALL_VOCAB, n_heads=4, n_kv_heads=2)
    return Runtime(ckpt, device="cpu", dtype=torch.float32)


def _prompts(n, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("which", ["rt", "gqa_rt"])
def test_cached_forward_equals_uncached(request, which):
    """The refresh writes K/V and gives the uncached logits; a prefix or dual step right after it (same canvas) reads
    the cache and gives them again. Rows of different lengths (keys [0, length) valid) sit in cache rows 2 and 0."""
    rt = request.getfixturevalue(which)
    cfg, w = rt.config, rt.weights
    B, T, start, end = 2, 40, 16, 24
    lengths = torch.tensor([T, T - 3], dtype=torch.int32)
    tokens = torch.randint(0, 100, (B, T))
    tokens[:, start:] = cfg.mask_token_id
    cols = torch.arange(T).expand(B, T)
    ref = [forward(cfg, w, tokens[b:b + 1, :int(lengths[b])], rows=slice(start, end))[0] for b in range(B)]
    cache = KVCache(cfg, 3, T, w.dtype, w.device)
    kv_rows = torch.tensor([2, 0])

    def cached(q0, q1):
        S = q1 - q0
        write = (kv_rows[:, None] * T + torch.arange(q0, q1)[None, :]).reshape(-1)
        logit_rows = (torch.arange(B)[:, None] * S + torch.arange(start - q0, end - q0)[None, :]).reshape(-1)
        fb = ForwardBatch(tokens[:, q0:q1], cols[:, q0:q1], key_end=lengths, logit_rows=logit_rows,
                          write_index=write, kv_rows=kv_rows, cache_read=True)
        return forward_batch(cfg, w, fb, cache=cache).view(B, end - start, -1)

    got = {"refresh": cached(0, T), "prefix": cached(start, T), "dual": cached(start, end)}
    errs = {n: max((x[b] - ref[b]).abs().max().item() for b in range(B)) for n, x in got.items()}
    print(which, errs)
    assert all(e < 1e-4 for e in errs.values())


def test_cache_on_threshold_off_agrees_with_exact_on_most_positions(rt, gqa_rt):
    """The cache is an approximation; measure how often its tokens match exact mode's on the tiny models."""
    for r in (rt, gqa_rt):
        prompts = _prompts(4, [9, 14, 20], seed=1)
        opts = dict(gen_length=32, block_length=8, steps=32)
        exact = r.generate(prompts, **opts)
        G = exact.canvas.shape[1] - exact.prompt_len
        for mode in ("prefix", "dual"):
            got = r.generate(prompts, mode=mode, **opts)
            agree = (got.canvas == exact.canvas)[:, exact.prompt_len:].float().mean().item()
            print(f"{r.config.n_kv_heads} kv heads, {mode}: {agree:.1%} of {len(prompts) * G} positions agree")
            assert got.nfe == exact.nfe
            assert agree >= 0.5


@pytest.mark.parametrize("opts", MODES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_batch_invariance(rt, opts):
    """float32, temperature 0: every prompt gives the same tokens alone and inside a batch of other lengths."""
    prompts = _prompts(3, [5, 17, 11], seed=2)
    gen = dict(gen_length=24, block_length=8, steps=24, confidence_eos_eot_inf=True, **opts)
    batch = rt.generate(prompts, **gen)
    for b, p in enumerate(prompts):
        alone = rt.generate(p, **gen)
        same = torch.equal(alone.canvas[0, len(p):], batch.canvas[b, batch.prompt_len:])
        print(opts, b, "alone", alone.token_ids[0][:8], "batch", batch.token_ids[b][:8], same)
        assert same


@pytest.mark.parametrize("opts", MODES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_early_stop_is_exact_for_the_text(rt, opts):
    """early_stop returns exactly the text of the same run without it; rows whose EOS comes early stop early."""
    prompts = _prompts(5, [6, 13, 9, 7, 5], seed=3)
    for eos_opt in ({}, {"confidence_eos_eot_inf": True}):
        gen = dict(gen_length=32, block_length=8, steps=32, **eos_opt, **opts)
        full = rt.generate(prompts, **gen)
        early = rt.generate(prompts, early_stop=True, **gen)
        lengths = [len(t) for t in full.token_ids]
        print(opts, eos_opt, "answer lengths", lengths, "nfe", full.nfe, "->", early.nfe, "finished at",
              early.finished_at)
        assert early.token_ids == full.token_ids and early.texts == full.texts
        assert early.nfe <= full.nfe
        for b, ids in enumerate(early.token_ids):
            if lengths[b] < 32:
                assert b in early.finished_at and early.finished_at[b] < full.nfe
                assert (early.canvas[b, early.prompt_len + len(ids) + 1:] == rt.config.eos_token_id).all()
        for b in range(len(prompts)):   # alone, a short answer costs fewer forwards
            if lengths[b] < 32:
                alone = rt.generate(prompts[b], early_stop=True, **gen)
                assert alone.token_ids[0] == full.token_ids[b] and alone.nfe < full.nfe
    assert min(lengths) < 32 <= max(lengths), "the fixture should give both short and full-length answers"


@pytest.mark.parametrize("opts", [dict(mode="exact"), dict(mode="dual", threshold=0.3, early_stop=True)])
def test_stream_events_add_up_to_the_result(rt, opts):
    prompts = _prompts(2, [7, 12], seed=6)
    events = list(rt.stream(prompts, gen_length=16, block_length=8, steps=16, **opts))
    res = events[-1].result
    assert res is not None and all(e.result is None for e in events[:-1])
    assert [e.nfe for e in events] == list(range(1, res.nfe + 1))
    seen = {0: {}, 1: {}}
    for e in events:
        for row, pos, tok in zip(e.rows, e.positions, e.tokens):
            for p, t in zip(pos, tok):
                assert p not in seen[row], "a position was committed twice"
                seen[row][p] = t
    for b in range(2):
        final = res.canvas[b, res.prompt_len:].tolist()
        ans = res.token_ids[b]
        print(b, len(seen[b]), "positions streamed; answer", ans)
        for p in range(len(ans) + 1 if len(ans) < len(final) else len(ans)):
            assert seen[b].get(p) == final[p]
    first = events[0].canvas_text
    assert len(first) == 2 and all(isinstance(t, str) for t in first)
    assert events[0].canvas_text[0].count("\u2591") >= 1 or res.token_ids[0] == []


_SYNCING = ("item", "tolist", "nonzero", "__bool__", "cpu", "numpy")


@contextlib.contextmanager
def _no_host_sync():
    """.item(), .tolist(), nonzero, bool(), .cpu() and boolean indexing raise inside this context."""
    saved = {n: getattr(torch.Tensor, n) for n in _SYNCING}
    real_getitem, real_nonzero = torch.Tensor.__getitem__, torch.nonzero

    def boom(name):
        def f(*a, **k):
            raise AssertionError(f"host sync inside a step: {name}")
        return f

    def getitem(self, idx):
        parts = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            raise AssertionError("host sync inside a step: boolean indexing")
        return real_getitem(self, idx)

    try:
        for n in saved:
            setattr(torch.Tensor, n, boom(f"Tensor.{n}"))
        torch.Tensor.__getitem__ = getitem
        torch.nonzero = boom("torch.nonzero")
        yield saved
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        torch.Tensor.__getitem__ = real_getitem
        torch.nonzero = real_nonzero


def test_no_host_sync_inside_a_step(rt, monkeypatch):
    """Engine._device_step (gathers, forward, confidence, remask, advance) never reads device values back to the host,
    in any mode, with guidance, sampling and random remasking."""
    real_step = Engine._device_step
    calls = {"steps": 0}

    def checked_step(self, *args, **kwargs):
        calls["steps"] += 1
        with _no_host_sync():
            return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_device_step", checked_step)
    for opts in MODES:
        rt.generate(_prompts(2, [5, 9]), gen_length=16, block_length=8, steps=16, early_stop=True, **opts)
    rt.generate("Hi", gen_length=16, block_length=8, cfg_scale=1.0)
    rt.generate("Hi", gen_length=16, block_length=8, temperature=0.8, remasking="random")
    print("steps checked:", calls["steps"])
    assert calls["steps"] > 50
    with pytest.raises(AssertionError, match="host sync inside a step"):   # the guard itself works
        with _no_host_sync():
            torch.ones(2).sum().item()


def test_parallel_decoding_commits_at_least_one_and_threshold_one_is_greedy(rt):
    p = _prompts(1, [10], seed=7)
    gen = dict(gen_length=16, block_length=8, steps=16)
    exact = rt.generate(p, **gen)
    # threshold 1.0 commits only the single most confident token per step: the same as k = 1 top-k decoding
    th1 = rt.generate(p, threshold=1.0, **gen)
    assert th1.nfe == 16 and torch.equal(th1.canvas, exact.canvas)
    loose = rt.generate(p, threshold=1e-9, **gen)   # everything clears the bar: one step per block
    print("threshold 1e-9 nfe", loose.nfe)
    assert loose.nfe == 2 and loose.tokens_per_forward == 8


@pytest.mark.parametrize("opts,match", [
    ({"threshold": 1.5}, "threshold must be in"),
    ({"threshold": 0.9, "factor": 1.0}, "not both"),
    ({"factor": 0.0}, r"factor must be > 0 \(a finite number\)"),
    ({"mode": "dual", "cfg_scale": 1.0}, "cfg_scale > 0 runs only in mode='exact'"),
    ({"threshold": 0.9, "remasking": "random"}, "remasking='low_confidence'"),
    ({"cuda_graph": True}, "cuda_graph=True needs a CUDA device"),
    ({"steps": 32}, "more than gen_length"),
])
def test_fast_mode_setting_errors(rt, opts, match):
    from llada_rt.generation_config import GenerationConfigError
    with pytest.raises(GenerationConfigError, match=match):
        rt.generate("Hi", gen_length=16, block_length=8, **opts)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("opts", [dict(mode="exact"), dict(mode="prefix"), dict(mode="dual", threshold=0.3),
                                  dict(mode="dual", temperature=0.7, seed=3), dict(mode="exact", cfg_scale=1.0)])
def test_cuda_graph_replay_gives_the_same_tokens(rt, opts):
    """Graphs are captured once per shape and replayed for every block of every call (0 captures on a second call)."""
    gpu = Runtime(rt.path, device="cuda", dtype=torch.bfloat16)
    prompts = _prompts(2, [7, 12], seed=8)
    gen = dict(gen_length=32, block_length=8, steps=32, **opts)
    plain = gpu.generate(prompts, **gen)
    graphed = gpu.generate(prompts, cuda_graph=True, **gen)
    again = gpu.generate(prompts, cuda_graph=True, **gen)
    print(opts, "nfe", plain.nfe, graphed.nfe, "captures", graphed.graph_captures, again.graph_captures)
    assert torch.equal(plain.canvas, graphed.canvas) and plain.nfe == graphed.nfe
    assert torch.equal(plain.canvas, again.canvas) and again.graph_captures == 0 < graphed.graph_captures
