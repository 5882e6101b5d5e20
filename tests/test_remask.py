"""ops.remask (CPU op, emulated CUDA kernel, CUDA op) against reference.remask: per-row rules mixed in one call, counts,
placement, ties, Fast-dLLM's float64 factor thresholds, allocation-free out= calls."""

import pytest
import torch

from llada_rt import ops
from llada_rt import reference as R

try:
    from llada_rt import _emu
except ImportError:   # built without CUDA headers, or before every emulated kernel exists
    _emu = None

requires_emu = pytest.mark.skipif(_emu is None, reason="llada_rt._emu is not built")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MASK = 126336
EPS = 1e-12
RULE = ops.REMASK_RULES


def rows(B, *, k=0, rule="topk", threshold=0.9, factor=1.0, device="cpu"):
    """The per-row keyword arguments of remask; a list value is cycled over the B rows."""
    def col(v, dtype, f=lambda x: x):
        v = v if isinstance(v, (list, tuple)) else [v]
        return torch.tensor([f(v[b % len(v)]) for b in range(B)], dtype=dtype, device=device)
    return dict(k=col(k, torch.int64), rule=col(rule, torch.int32, RULE.get),
                threshold=col(threshold, torch.float64), factor=col(factor, torch.float64))


def make_case(B, N, seed=0, tied=False):
    """A block (B, N) with some positions already committed (a row wholly committed when B > 1) and candidates."""
    g = torch.Generator().manual_seed(seed)
    block = torch.full((B, N), MASK)
    committed = torch.rand(B, N, generator=g) < 0.3
    block[committed] = torch.randint(0, 1000, (int(committed.sum()),), generator=g)
    if B > 1:
        block[B - 1] = 7                      # a row with nothing masked
    token = torch.randint(1000, 2000, (B, N), generator=g)
    prob = torch.rand(B, N, generator=g, dtype=torch.float64)
    if tied:
        prob = (prob * 4).round() / 4         # many exact ties: the lower position must win
    prob[0, 0] = float("-inf")                # a masked position that a confidence op would never produce is legal
    if N > 2:
        prob[0, 2] = float("nan")             # ranks as -inf
    return block, token, prob


def run_emu(block, token, prob, *, mask_id, k, rule, threshold, factor):
    B, N = token.shape
    count = torch.full((B,), -7, dtype=torch.int32)
    _emu.remask(_emu.RemaskParams(block=block.data_ptr(), count=count.data_ptr(), token=token.data_ptr(),
                                  prob=prob.data_ptr(), k=k.data_ptr(), rule=rule.data_ptr(),
                                  threshold=threshold.data_ptr(), factor=factor.data_ptr(), B=B, N=N,
                                  mask_id=mask_id))
    return count


def run_backend(backend, block, token, prob, **kw):
    if backend == "cpu":
        return ops.remask(block, token, prob, **kw)
    if backend == "emu":
        return run_emu(block, token, prob, **kw)
    kw = {n: (v.cuda() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    b = block.cuda()
    count = ops.remask(b, token.cuda(), prob.cuda(), **kw).cpu()
    block.copy_(b.cpu())
    return count


def check(backend, block, token, prob, **kw):
    before = block.clone()
    ref_block = block.clone()
    ref_count = R.remask(ref_block, token, prob, mask_id=MASK, **kw)
    count = run_backend(backend, block, token, prob, mask_id=MASK, **kw)
    changed = block != before                                                   # (B, N)
    masked = before == MASK
    _, _, sorted_conf = R.remask_order(before, prob, mask_id=MASK)
    conf = torch.where(prob.isnan(), float("-inf"), prob)
    # the reference's count-th largest masked confidence, per row (+inf where nothing is committed)
    kth = torch.where(ref_count > 0, sorted_conf.gather(1, (ref_count.long() - 1).clamp(min=0)[:, None])[:, 0],
                      torch.full((block.shape[0],), float("inf"), dtype=torch.float64))
    short = torch.where(changed & (conf < kth[:, None]), kth[:, None] - conf, torch.zeros_like(conf))
    low = float(short.max()) if short.numel() else 0.0
    on_committed = int((changed & ~masked).sum())
    wrong_token = int((changed & (block != token)).sum())
    print(f"{backend}: count {count.tolist()} ref {ref_count.tolist()}; committed below the ref's k-th by {low:.3g}; "
          f"on committed {on_committed}, wrong tokens {wrong_token}")
    assert count.dtype == torch.int32 and torch.equal(count, ref_count)
    assert torch.equal(changed.sum(1).to(torch.int32), count.clamp(min=0))  # tokens never equal MASK here, so
    assert on_committed == 0 and wrong_token == 0                             # every commit shows as a change
    assert low <= EPS
    # the tie rule (lower position first) is exact in every backend, so the blocks agree exactly
    assert torch.equal(block, ref_block)


RULES = [
    dict(rule="topk"),
    dict(rule="threshold", threshold=[0.5, 0.9]),
    dict(rule="threshold", threshold=1.5),    # nobody passes: exactly the most confident one
    dict(rule="factor", factor=[1.0, 0.3, 3.0]),
    dict(rule=["topk", "threshold", "factor"], threshold=0.6, factor=[1.0, 2.0]),  # every rule in one call
]
SHAPES = [(1, 1), (1, 7), (3, 32), (3, 33), (2, 64), (1, 1024)]
BACKENDS = ["cpu", pytest.param("emu", marks=requires_emu), pytest.param("cuda", marks=requires_cuda)]


def ks_for(B, N, seed):
    g = torch.Generator().manual_seed(100 + seed)
    k = torch.randint(-1, N + 3, (B,), generator=g)
    k[0] = min(N, 2)
    return k.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rule", range(len(RULES)))
@pytest.mark.parametrize("tied", [False, True])
def test_remask(backend, shape, rule, tied):
    B, N = shape
    block, token, prob = make_case(B, N, seed=rule, tied=tied)
    kw = rows(B, k=ks_for(B, N, rule), **RULES[rule])
    check(backend, block, token, prob, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_rows_equal_one_call_per_row(backend):
    B, N = 6, 40
    block, token, prob = make_case(B, N, seed=9, tied=True)
    kw = rows(B, k=[3, 0, 50, 1, 2, 9], rule=["threshold", "topk", "factor", "topk", "factor", "threshold"],
              threshold=[0.7, 0.1, 0.2, 0.9, 0.5, 0.25], factor=[1.0, 1.0, 0.5, 2.0, 1.0, 3.0])
    together = block.clone()
    count = run_backend(backend, together, token, prob, mask_id=MASK, **kw)
    for b in range(B):
        alone = block[b:b + 1].clone()
        c = run_backend(backend, alone, token[b:b + 1].contiguous(), prob[b:b + 1].contiguous(), mask_id=MASK,
                        **{n: v[b:b + 1] for n, v in kw.items()})
        print(b, count[b].item(), c.item())
        assert c.item() == count[b].item() and torch.equal(alone[0], together[b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_factor_rule_by_hand(backend):
    # conf sorted: 0.99, 0.9, 0.6, 0.5; factor 1 -> thresholds -1, 1-1/3, 1-1/4, 1-1/5 = -1, .667, .75, .8
    # rank 2 (0.6 < 0.75) fails first -> top_i = 2 -> commit 2
    token = torch.tensor([[10, 11, 12, 13]])
    kw = rows(1, rule="factor", factor=1.0)
    block = torch.full((1, 4), MASK)
    prob = torch.tensor([[0.5, 0.99, 0.6, 0.9]], dtype=torch.float64)
    assert run_backend(backend, block, token, prob, mask_id=MASK, **kw).tolist() == [2]
    assert block.tolist() == [[MASK, 11, MASK, 13]]
    # only the last rank fails -> Fast-dLLM's quirk bumps top_i from m-1 to m: all four committed
    block = torch.full((1, 4), MASK)
    prob = torch.tensor([[0.1, 0.99, 0.95, 0.9]], dtype=torch.float64)
    assert run_backend(backend, block, token, prob, mask_id=MASK, **kw).tolist() == [4]
    # one masked position: always committed
    block = torch.tensor([[1, MASK, 2, 3]])
    assert run_backend(backend, block, token, torch.zeros(1, 4, dtype=torch.float64), mask_id=MASK,
                       **kw).tolist() == [1]
    assert block.tolist() == [[1, 11, 2, 3]]
    # the thresholds are Fast-dLLM's Python floats, 1 - factor / (n + 1): a confidence exactly at rank 2's 1 - 0.3 / 4
    # passes (3 committed: rank 3 fails), one float64 ulp below fails (2 committed); float32 would decide both alike
    thr = 1 - 0.3 / 4
    below = float(torch.nextafter(torch.tensor(thr, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)))
    for conf2, expect in ((thr, 3), (below, 2)):
        block = torch.full((1, 5), MASK)
        prob = torch.tensor([[0.999, 0.99, conf2, 0.5, 0.4]], dtype=torch.float64)
        got = run_backend(backend, block, torch.arange(5)[None], prob, mask_id=MASK, **rows(1, rule="factor",
                                                                                             factor=0.3))
        print(f"rank 2 at {conf2!r} vs threshold {thr!r}: committed {got.tolist()}")
        assert got.tolist() == [expect]


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_and_ties_by_hand(backend):
    block = torch.tensor([[MASK, MASK, 6, MASK, MASK]])
    token = torch.tensor([[20, 21, 22, 23, 24]])
    prob = torch.tensor([[0.95, 0.3, 0.99, 0.3, 0.3]], dtype=torch.float64)   # 0.99 is committed already
    b = block.clone()
    count = run_backend(backend, b, token, prob, mask_id=MASK, **rows(1, rule="threshold", threshold=0.9))
    assert count.tolist() == [1] and b.tolist() == [[20, MASK, 6, MASK, MASK]]
    b = block.clone()   # prob == threshold commits (the rule is >=)
    count = run_backend(backend, b, token, prob, mask_id=MASK, **rows(1, rule="threshold", threshold=0.3))
    assert count.tolist() == [4]
    b = block.clone()
    assert run_backend(backend, b, token, prob, mask_id=MASK, **rows(1, k=2)).tolist() == [2]
    assert b.tolist() == [[20, 21, 6, MASK, MASK]]              # tie at 0.3: the lower position
    b = block.clone()
    assert run_backend(backend, b, token, prob, mask_id=MASK, **rows(1, k=10)).tolist() == [4]
    assert b.tolist() == [[20, 21, 6, 23, 24]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_committed_mask_token_stays_masked(backend):
    """A committed token equal to mask_id is written (the official sampler's behaviour): the position stays masked."""
    block = torch.full((1, 3), MASK)
    token = torch.tensor([[MASK, 5, 6]])
    prob = torch.tensor([[0.9, 0.5, 0.1]], dtype=torch.float64)
    assert run_backend(backend, block, token, prob, mask_id=MASK, **rows(1, k=2)).tolist() == [2]
    assert block.tolist() == [[MASK, 5, MASK]]


@requires_emu
def test_unknown_rule_code():
    block, token, prob = make_case(2, 8)
    kw = rows(2, k=3)
    kw["rule"][1] = 7
    with pytest.raises(ValueError, match=r"rule\[1\] = 7 is not a rule code"):
        ops.remask(block.clone(), token, prob, mask_id=MASK, **kw)
    emu_block, ref_block = block.clone(), block.clone()
    count = run_emu(emu_block, token, prob, mask_id=MASK, **kw)
    ref = R.remask(ref_block, token, prob, mask_id=MASK, **kw)
    print("emulated", count.tolist(), "reference", ref.tolist())
    assert count.tolist() == ref.tolist() == [3, -1]          # that row commits nothing
    assert torch.equal(emu_block, ref_block) and torch.equal(emu_block[1], block[1])


def test_out_allocates_nothing():
    block, token, prob = make_case(4, 64)
    kw = rows(4, k=[1, 5], rule=["topk", "threshold", "factor", "topk"], threshold=0.5)
    count = torch.empty(4, dtype=torch.int32)
    work = block.clone()

    def step():
        work.copy_(block)
        ops.remask(work, token, prob, mask_id=MASK, **kw, out=count)

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    found = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0]
    print("remask(out=) allocations:", found)
    assert found == []
    assert torch.equal(count, R.remask(block.clone(), token, prob, mask_id=MASK, **kw))


def test_input_errors():
    block, token, prob = make_case(2, 8)
    kw = rows(2, k=[1, 2])
    with pytest.raises(ops.OpInputError, match="block must be int64"):
        ops.remask(block.int(), token, prob, mask_id=MASK, **kw)
    with pytest.raises(ops.OpInputError, match="block must be contiguous"):
        ops.remask(torch.full((8, 2), MASK).t(), token, prob, mask_id=MASK, **kw)
    with pytest.raises(ops.OpInputError, match=r"k must be torch.int64 \(2,\)"):
        ops.remask(block, token, prob, mask_id=MASK, **dict(kw, k=kw["k"].int()))
    with pytest.raises(ops.OpInputError, match=r"rule must be torch.int32 \(2,\)"):
        ops.remask(block, token, prob, mask_id=MASK, **dict(kw, rule=kw["rule"][:1]))
    with pytest.raises(ops.OpInputError, match="threshold must be a tensor"):
        ops.remask(block, token, prob, mask_id=MASK, **dict(kw, threshold=0.9))
    with pytest.raises(ops.OpInputError, match="prob must be float64"):
        ops.remask(block, token, prob.float(), mask_id=MASK, **kw)
    with pytest.raises(ops.OpInputError, match="prob must be"):
        ops.remask(block, token, prob[:, :3], mask_id=MASK, **kw)
    with pytest.raises(ops.OpInputError, match="N must be <= 1024"):
        ops.remask(torch.full((1, 1025), MASK), token[:1, :1].expand(1, 1025), prob[:1, :1].expand(1, 1025),
                   mask_id=MASK, **rows(1))
    with pytest.raises(ops.OpInputError, match="out count must be torch.int32"):
        ops.remask(block, token, prob, mask_id=MASK, **kw, out=torch.empty(2, dtype=torch.int64))


def test_opcheck():
    block, token, prob = make_case(3, 16)
    kw = rows(3, k=[1, 4, 0], rule=["topk", "threshold", "factor"], threshold=0.7, factor=2.0)
    args = (token, prob, MASK, kw["k"], kw["rule"], kw["threshold"], kw["factor"])
    torch.library.opcheck(torch.ops.llada_rt.remask.default, (block, *args))
    torch.library.opcheck(torch.ops.llada_rt.remask_out.default, (block, torch.empty(3, dtype=torch.int32), *args))


@requires_cuda
def test_cuda_opcheck_and_graph_capture():
    block, token, prob = make_case(3, 16)
    block, token, prob = block.cuda(), token.cuda(), prob.cuda()
    kw = rows(3, k=[1, 4, 0], rule=["topk", "threshold", "factor"], threshold=0.7, factor=2.0, device="cuda")
    args = (token, prob, MASK, kw["k"], kw["rule"], kw["threshold"], kw["factor"])
    torch.library.opcheck(torch.ops.llada_rt.remask.default, (block, *args))
    count = torch.empty(3, dtype=torch.int32, device="cuda")
    work = block.clone()
    ops.remask(work, token, prob, mask_id=MASK, **kw, out=count)   # warm
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.remask(work, token, prob, mask_id=MASK, **kw, out=count)
    kw["k"].fill_(2)                                                  # a per-row setting changed on the device
    work.copy_(block)
    graph.replay()
    expect_block = block.clone()
    expect = R.remask(expect_block, token, prob, mask_id=MASK, **kw)
    assert torch.equal(count, expect) and torch.equal(work, expect_block)

# The C++ emulator test tests/emu/test_remask.cpp is built and run plain, under TSAN and under ASan by tests/test_emu.py.
