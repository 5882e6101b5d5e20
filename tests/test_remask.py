"""ops.remask (CPU op, emulated CUDA kernel, CUDA op) against reference.remask: counts, placement, ties, rules."""

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
EPS = 1e-6


def make_case(B, N, P, S, seed=0, tied=False):
    """Canvas (B, P + N + S): prompt, a block with some positions already committed, masked suffix; candidates."""
    g = torch.Generator().manual_seed(seed)
    T = P + N + S
    canvas = torch.randint(0, 1000, (B, T), generator=g)
    canvas[:, P:] = MASK
    committed = torch.rand(B, N, generator=g) < 0.3
    canvas[:, P:P + N][committed] = torch.randint(0, 1000, (int(committed.sum()),), generator=g)
    if B > 1:
        canvas[B - 1, P:P + N] = 7            # a row with nothing masked
    token = torch.randint(1000, 2000, (B, N), generator=g)
    prob = torch.rand(B, N, generator=g)
    if tied:
        prob = (prob * 4).round() / 4         # many exact ties: the lower position must win
    prob[0, 0] = float("-inf")                # a masked position that a confidence op would never produce is legal
    return canvas, token, prob


def run_emu(canvas, token, prob, *, start, mask_id, k=None, rule="topk", threshold=0.9, factor=1.0):
    B, N = token.shape
    count = torch.full((B,), -7, dtype=torch.int32)
    _emu.remask(canvas.data_ptr(), canvas.stride(0), count.data_ptr(), token.data_ptr(), prob.data_ptr(),
                0 if k is None else k.data_ptr(), B, N, start, mask_id, ops.REMASK_RULES[rule], threshold, factor)
    return count


def run_backend(backend, canvas, token, prob, **kw):
    if backend == "cpu":
        return ops.remask(canvas, token, prob, **kw)
    if backend == "emu":
        return run_emu(canvas, token, prob, **kw)
    kw = {n: (v.cuda() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    c = canvas.cuda()
    count = ops.remask(c, token.cuda(), prob.cuda(), **kw).cpu()
    canvas.copy_(c.cpu())
    return count


def check(backend, canvas, token, prob, *, start, **kw):
    B, N = token.shape
    before = canvas.clone()
    ref_canvas = canvas.clone()
    ref_count = R.remask(ref_canvas, token, prob, start=start, mask_id=MASK, **kw)
    count = run_backend(backend, canvas, token, prob, start=start, mask_id=MASK, **kw)
    changed = canvas != before                                                  # (B, T)
    masked = before[:, start:start + N] == MASK
    order, _, sorted_conf = R.remask_order(before, prob, start=start, mask_id=MASK)
    # the reference's count-th largest masked confidence, per row (+inf where nothing is committed)
    kth = torch.where(ref_count > 0, sorted_conf.gather(1, (ref_count.long() - 1).clamp(min=0)[:, None])[:, 0],
                      torch.full((B,), float("inf")))
    blk_changed = changed[:, start:start + N]
    short = torch.where(blk_changed & (prob < kth[:, None]), kth[:, None] - prob, torch.zeros_like(prob))
    low = float(short.max()) if short.numel() else 0.0
    outside = int(changed[:, :start].sum() + changed[:, start + N:].sum())
    on_committed = int((blk_changed & ~masked).sum())
    wrong_token = int((blk_changed & (canvas[:, start:start + N] != token)).sum())
    print(f"{backend}: count {count.tolist()} ref {ref_count.tolist()}; committed below the ref's k-th by {low:.3g}; "
          f"outside the block {outside}, on committed {on_committed}, wrong tokens {wrong_token}")
    assert count.dtype == torch.int32 and torch.equal(count, ref_count)
    assert torch.equal(blk_changed.sum(1).to(torch.int32), count)              # tokens never equal MASK, so every
    assert outside == 0 and on_committed == 0 and wrong_token == 0              # commit shows as a change
    assert low <= EPS
    # the tie rule (lower position first) is exact in every backend, so the canvases agree exactly
    assert torch.equal(canvas, ref_canvas)


RULES = [
    dict(rule="topk", k=None),
    dict(rule="threshold", threshold=0.5),
    dict(rule="threshold", threshold=0.9),
    dict(rule="threshold", threshold=1.5),    # nobody passes: exactly the most confident one
    dict(rule="factor", factor=1.0),
    dict(rule="factor", factor=0.3),
    dict(rule="factor", factor=3.0),
]
SHAPES = [(1, 1, 0, 0), (1, 7, 5, 0), (3, 32, 13, 96), (3, 33, 1, 4), (2, 64, 37, 0), (1, 1024, 3, 5)]


def ks_for(B, N, seed):
    g = torch.Generator().manual_seed(100 + seed)
    k = torch.randint(0, N + 3, (B,), generator=g)
    k[0] = min(N, 2)
    return k


@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu", marks=requires_emu),
                                     pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rule", range(len(RULES)))
@pytest.mark.parametrize("tied", [False, True])
def test_remask(backend, shape, rule, tied):
    B, N, P, S = shape
    kw = dict(RULES[rule])
    canvas, token, prob = make_case(B, N, P, S, seed=rule, tied=tied)
    if kw["rule"] == "topk":
        kw["k"] = ks_for(B, N, rule)
    check(backend, canvas, token, prob, start=P, **kw)


def test_factor_rule_by_hand():
    # conf sorted: 0.99, 0.9, 0.6, 0.5; factor 1 -> thresholds -1, 1-1/3, 1-1/4, 1-1/5 = -1, .667, .75, .8
    # rank 2 (0.6 < 0.75) fails first -> top_i = 2 -> commit 2
    canvas = torch.full((1, 4), MASK)
    token = torch.tensor([[10, 11, 12, 13]])
    prob = torch.tensor([[0.5, 0.99, 0.6, 0.9]])
    assert ops.remask(canvas, token, prob, start=0, mask_id=MASK, rule="factor").tolist() == [2]
    assert canvas.tolist() == [[MASK, 11, MASK, 13]]
    # only the last rank fails -> Fast-dLLM's quirk bumps top_i from m-1 to m: all four committed
    canvas = torch.full((1, 4), MASK)
    prob = torch.tensor([[0.1, 0.99, 0.95, 0.9]])
    assert ops.remask(canvas, token, prob, start=0, mask_id=MASK, rule="factor").tolist() == [4]
    # one masked position: always committed
    canvas = torch.tensor([[1, MASK, 2, 3]])
    assert ops.remask(canvas, token, torch.zeros(1, 4), start=0, mask_id=MASK, rule="factor").tolist() == [1]
    assert canvas.tolist() == [[1, 11, 2, 3]]


def test_threshold_and_ties_by_hand():
    canvas = torch.tensor([[5, MASK, MASK, 6, MASK, MASK, 9]])
    token = torch.tensor([[20, 21, 22, 23, 24]])
    prob = torch.tensor([[0.95, 0.3, 0.99, 0.3, 0.3]])   # block starts at 1; j = 2 (0.99) is committed already
    c = canvas.clone()
    assert ops.remask(c, token, prob, start=1, mask_id=MASK, rule="threshold", threshold=0.9).tolist() == [1]
    assert c.tolist() == [[5, 20, MASK, 6, MASK, MASK, 9]]
    c = canvas.clone()
    k = torch.tensor([2])
    assert ops.remask(c, token, prob, start=1, mask_id=MASK, k=k).tolist() == [2]
    assert c.tolist() == [[5, 20, 21, 6, MASK, MASK, 9]]              # tie at 0.3: the lower position
    c = canvas.clone()
    assert ops.remask(c, token, prob, start=1, mask_id=MASK, k=torch.tensor([10])).tolist() == [4]
    assert c.tolist() == [[5, 20, 21, 6, 23, 24, 9]]


def test_input_errors():
    canvas, token, prob = make_case(2, 8, 4, 0)
    k = torch.tensor([1, 2])
    with pytest.raises(ops.OpInputError, match="canvas must be int64"):
        ops.remask(canvas.int(), token, prob, start=4, mask_id=MASK, k=k)
    with pytest.raises(ops.OpInputError, match="outside the canvas"):
        ops.remask(canvas, token, prob, start=5, mask_id=MASK, k=k)
    with pytest.raises(ops.OpInputError, match="needs k"):
        ops.remask(canvas, token, prob, start=4, mask_id=MASK)
    with pytest.raises(ops.OpInputError, match="k must be int64"):
        ops.remask(canvas, token, prob, start=4, mask_id=MASK, k=k.int())
    with pytest.raises(ops.OpInputError, match="prob must be float32"):
        ops.remask(canvas, token, prob.double(), start=4, mask_id=MASK, k=k)
    with pytest.raises(ops.OpInputError, match="prob must be"):
        ops.remask(canvas, token, prob[:, :3], start=4, mask_id=MASK, k=k)
    with pytest.raises(ops.OpInputError, match="unit stride"):
        ops.remask(canvas.t().contiguous().t(), token, prob, start=4, mask_id=MASK, k=k)
    with pytest.raises(ops.OpInputError, match="rule must be one of"):
        ops.remask(canvas, token, prob, start=4, mask_id=MASK, rule="nope")


def test_strided_canvas_view():
    canvas, token, prob = make_case(3, 16, 5, 7)
    big = torch.zeros(3, 40, dtype=torch.int64)
    big[:, 2:30] = canvas
    view = big[:, 2:30]                       # b stride 40, not T
    ref = canvas.clone()
    k = torch.tensor([3, 20, 0])
    ref_count = R.remask(ref, token, prob, start=5, mask_id=MASK, k=k)
    count = ops.remask(view, token, prob, start=5, mask_id=MASK, k=k)
    assert torch.equal(count, ref_count) and torch.equal(view, ref) and int(big[:, :2].abs().sum()) == 0


def test_opcheck():
    canvas, token, prob = make_case(3, 16, 5, 7)
    torch.library.opcheck(torch.ops.llada_rt.remask.default,
                          (canvas, token, prob, torch.tensor([1, 4, 0]), 5, MASK, 0, 0.9, 1.0))
    torch.library.opcheck(torch.ops.llada_rt.remask.default, (canvas, token, prob, None, 5, MASK, 1, 0.7, 1.0))
    torch.library.opcheck(torch.ops.llada_rt.remask.default, (canvas, token, prob, None, 5, MASK, 2, 0.9, 2.0))


@requires_cuda
def test_cuda_opcheck():
    canvas, token, prob = make_case(3, 16, 5, 7)
    torch.library.opcheck(torch.ops.llada_rt.remask.default,
                          (canvas.cuda(), token.cuda(), prob.cuda(), torch.tensor([1, 4, 0]).cuda(), 5, MASK, 0,
                           0.9, 1.0))

# The C++ emulator test tests/emu/test_remask.cpp is built and run plain, under TSAN and under ASan by tests/test_emu.py.
