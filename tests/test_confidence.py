"""ops.confidence (CPU op, emulated CUDA kernel, CUDA op) against reference.confidence over odd shapes and options."""

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

NEG_INF = float("-inf")
PROB_ATOL = 1e-5      # probs are computed in fp32 from logits converted exactly to fp32, whatever the input dtype
NOISY_GAP_TOL = 1e-3  # fp32 Gumbel keys of the kernels vs the fp64 keys of the reference


def make_case(B, N, V, dtype, seed=0):
    """Logits (B, N, V) with -inf entries, an all -inf row, an exact tie, and a partially masked (B, N)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, N, V, generator=g) * 3.0
    logits[torch.rand(B, N, V, generator=g) < 0.02] = NEG_INF
    if N > 1:
        i, j = V // 3, V - 2                          # exact tie far apart: the lower id must win
        logits[0, N - 1, i] = logits[0, N - 1, j] = 40.0
    if B * N > 2:
        logits[B - 1, N // 2] = NEG_INF               # all -inf: lowest non-suppressed id, prob 0
    masked = torch.rand(B, N, generator=g) > 0.25
    masked[0, 0] = True
    if N > 1:
        masked[0, N - 1] = True
    if B * N > 2:
        masked[B - 1, N // 2] = True
        masked[B - 1, N - 1] = False
    return logits.to(dtype), masked


def softmax_at(logits, token, suppress_ids, zero_conf_ids):
    """fp64 softmax probability of `token` (B, N) with the op's exclusions; 0 where undefined."""
    soft = logits.to(torch.float64).clone()
    excluded = list(suppress_ids) + list(zero_conf_ids)
    if excluded:
        soft[..., excluded] = NEG_INF
    p = torch.softmax(soft, -1).gather(-1, token.clamp(min=0)[..., None])[..., 0]
    return p.nan_to_num(0.0)


def run_emu(logits, masked, temperature=0.0, seed=0, offset=0, random_confidence=False, suppress_ids=(),
            zero_conf_ids=()):
    B, N, V = logits.shape
    masked = masked.contiguous()
    token = torch.empty(B, N, dtype=torch.int64)
    prob = torch.empty(B, N, dtype=torch.float32)
    _emu.confidence(token.data_ptr(), prob.data_ptr(), logits.data_ptr(), logits.stride(0), logits.stride(1),
                    masked.data_ptr(), B, N, V, ops.DTYPE_CODES[logits.dtype], temperature, seed, offset,
                    random_confidence, list(suppress_ids), list(zero_conf_ids))
    return token, prob


def run_backend(backend, logits, masked, **kw):
    if backend == "cpu":
        return ops.confidence(logits, masked, **kw)
    if backend == "emu":
        return run_emu(logits, masked, **kw)
    token, prob = ops.confidence(logits.cuda(), masked.cuda(), **kw)
    torch.cuda.synchronize()
    return token.cpu(), prob.cpu()


def check(token, prob, logits, masked, *, temperature=0.0, seed=0, offset=0, random_confidence=False,
          suppress_ids=(), zero_conf_ids=()):
    kw = dict(temperature=temperature, seed=seed, offset=offset, suppress_ids=suppress_ids)
    ref_token, ref_prob = R.confidence(logits, masked, random_confidence=random_confidence,
                                       zero_conf_ids=zero_conf_ids, **kw)
    key = R.confidence_keys(logits, **kw)                                          # (B, N, V) fp64
    top = key.topk(min(2, key.shape[-1]), dim=-1).values
    gap = top[..., 0] - top[..., -1] if key.shape[-1] > 1 else torch.full(masked.shape, float("inf"))
    gap = gap.nan_to_num(float("inf"))                                              # -inf - -inf: a dead row
    tol = 0.0 if temperature == 0 else NOISY_GAP_TOL
    decided = masked & (gap > tol)            # at temperature 0 the keys are exact: every row is decided
    if temperature == 0:
        decided = masked
    tok_mismatch = int((decided & (token != ref_token)).sum())
    key_at = key.gather(-1, token.clamp(min=0)[..., None])[..., 0]
    key_short = float(torch.where(masked, (top[..., 0] - key_at).nan_to_num(0.0), 0.0).max()) if masked.numel() else 0.0
    if random_confidence:
        expect_prob = ref_prob                # the same Philox draw, bit-exact
    else:
        expect_prob = softmax_at(logits, token, suppress_ids, zero_conf_ids).to(torch.float32)
        dead = ~(key.amax(-1) > NEG_INF)
        expect_prob = torch.where(dead, torch.zeros_like(expect_prob), expect_prob)
    def max_err(a, b, where):
        err = torch.where(where, (a - b).abs(), torch.zeros_like(a))
        return float(err.nan_to_num(float("inf")).max()) if err.numel() else 0.0
    prob_err = max_err(prob, expect_prob, masked)
    ref_err = max_err(prob, ref_prob, masked & (token == ref_token))
    print(f"token mismatches where decided: {tok_mismatch}, chosen key short of the max by {key_short:.3g}, "
          f"max |prob - softmax(token)| {prob_err:.3g}, max |prob - ref| where tokens agree {ref_err:.3g}")
    assert tok_mismatch == 0
    assert key_short <= tol
    assert prob_err <= PROB_ATOL and ref_err <= PROB_ATOL
    assert torch.equal(token[~masked], torch.full_like(token[~masked], -1))
    assert torch.equal(prob[~masked], torch.full_like(prob[~masked], NEG_INF))
    assert not torch.isnan(prob).any()


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 111), (1, 7, 111), (3, 33, 111), (3, 7, 32000), (1, 32, 32000)]
OPTIONS = [
    dict(),
    dict(temperature=0.7, seed=3, offset=11),
    dict(temperature=2.5, seed=2**40 + 5, offset=2**33 + 1, suppress_ids=(1, 5)),
    dict(suppress_ids=(0, 2, 3), zero_conf_ids=(4, 9)),
    dict(temperature=1.0, seed=7, offset=1, zero_conf_ids=(6,)),
    dict(random_confidence=True, seed=9, offset=4, suppress_ids=(1,)),
]


def zero_conf_favoured(logits, ids):
    """Make the zero-confidence ids the argmax of some rows, so that prob = 0 is exercised."""
    logits = logits.clone()
    if ids:
        logits[0, 0, ids[0]] = 50.0
    return logits


NOISY = [i for i, o in enumerate(OPTIONS) if o.get("temperature", 0) > 0 or o.get("random_confidence")]
# Philox in the reference costs ~1 s per million draws: the noisy options run on the smaller shapes.
CPU_CASES = ([(shape, dtype, opt) for shape in SHAPES for dtype in DTYPES for opt in range(len(OPTIONS))
              if opt not in NOISY or shape[2] <= 111]
             + [((1, 7, 32000), dtype, opt) for dtype in (torch.float32, torch.bfloat16) for opt in NOISY])


@pytest.mark.parametrize("shape,dtype,opt", CPU_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_cpu(shape, dtype, opt):
    kw = OPTIONS[opt]
    logits, masked = make_case(*shape, dtype, seed=opt)
    logits = zero_conf_favoured(logits, kw.get("zero_conf_ids", ()))
    token, prob = run_backend("cpu", logits, masked, **kw)
    check(token, prob, logits, masked, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_real_vocab(dtype):
    logits, masked = make_case(2, 5, 126464, dtype, seed=1)
    kw = dict(zero_conf_ids=(126081, 126348), suppress_ids=(126081,))
    logits[1, 0, 126348] = 60.0           # EOT chosen -> confidence 0
    token, prob = run_backend("cpu", logits, masked, **kw)
    check(token, prob, logits, masked, **kw)
    if dtype == torch.bfloat16:
        noisy = dict(temperature=0.9, seed=1234, offset=77)
        token, prob = run_backend("cpu", logits[:1, :2], masked[:1, :2], **noisy)
        check(token, prob, logits[:1, :2], masked[:1, :2], **noisy)


def test_cpu_strided_logits():
    logits, masked = make_case(3, 7, 500, torch.float32)
    wide = torch.zeros(3, 9, 700)
    wide[:, 1:8, 100:600] = logits
    view = wide[:, 1:8, 100:600]          # b and n strides differ from a contiguous tensor
    token, prob = ops.confidence(view, masked)
    check(token, prob, logits, masked)


def test_cpu_exact_ties_lowest_id():
    logits = torch.zeros(2, 3, 300)
    logits[:, :, [7, 150, 299]] = 5.0
    logits[1, 2] = NEG_INF
    logits[1, 2, [250, 251]] = 1.0
    masked = torch.ones(2, 3, dtype=torch.bool)
    for dtype in DTYPES:
        token, prob = ops.confidence(logits.to(dtype), masked, suppress_ids=(7,))
        print(dtype, token.tolist())
        assert token[0].tolist() == [150, 150, 150] and token[1].tolist() == [150, 150, 250]
        assert torch.allclose(prob[1, 2], torch.tensor(0.5))
    token, prob = ops.confidence(torch.full((1, 2, 40), NEG_INF), torch.ones(1, 2, dtype=torch.bool),
                                 suppress_ids=(0, 1))
    assert token.tolist() == [[2, 2]] and prob.tolist() == [[0.0, 0.0]]


def test_cpu_noise_is_reproducible_and_keyed():
    logits = torch.zeros(1, 4, 1000)      # flat logits: the token is decided by the noise alone
    masked = torch.ones(1, 4, dtype=torch.bool)
    a = ops.confidence(logits, masked, temperature=1.0, seed=1, offset=0)[0]
    b = ops.confidence(logits, masked, temperature=1.0, seed=1, offset=0)[0]
    c = ops.confidence(logits, masked, temperature=1.0, seed=1, offset=1)[0]
    d = ops.confidence(logits, masked, temperature=1.0, seed=2, offset=0)[0]
    print(a.tolist(), c.tolist(), d.tolist())
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert len(set(a[0].tolist())) > 1   # one draw per row, not one per call


def test_cpu_input_errors():
    logits, masked = make_case(1, 4, 50, torch.float32)
    with pytest.raises(ops.OpInputError, match="int64|float32, float16 or bfloat16"):
        ops.confidence(logits.to(torch.int64), masked)
    with pytest.raises(ops.OpInputError, match=r"\(B, N, V\)"):
        ops.confidence(logits[0], masked)
    with pytest.raises(ops.OpInputError, match="masked must be"):
        ops.confidence(logits, masked[:, :3])
    with pytest.raises(ops.OpInputError, match="masked must be bool"):
        ops.confidence(logits, masked.to(torch.int32))
    with pytest.raises(ops.OpInputError, match="unit stride"):
        ops.confidence(logits.transpose(1, 2).contiguous().transpose(1, 2), masked)
    with pytest.raises(ops.OpInputError, match="outside the vocabulary"):
        ops.confidence(logits, masked, suppress_ids=(50,))
    with pytest.raises(ops.OpInputError, match="outside the vocabulary"):
        ops.confidence(logits, masked, zero_conf_ids=(-1,))
    with pytest.raises(ops.OpInputError, match="at most 8"):
        ops.confidence(logits, masked, suppress_ids=tuple(range(9)))
    with pytest.raises(ops.OpInputError, match="temperature"):
        ops.confidence(logits, masked, temperature=-1.0)


def test_cpu_empty():
    token, prob = ops.confidence(torch.randn(0, 3, 10), torch.ones(0, 3, dtype=torch.bool))
    assert token.shape == (0, 3) and prob.shape == (0, 3)


def test_opcheck():
    logits, masked = make_case(2, 3, 64, torch.bfloat16)
    torch.library.opcheck(torch.ops.llada_rt.confidence.default, (logits, masked, 0.0, 0, 0, False, [], []))
    torch.library.opcheck(torch.ops.llada_rt.confidence.default, (logits, masked, 1.0, 5, 2, False, [3], [4, 5]))
    torch.library.opcheck(torch.ops.llada_rt.confidence.default, (logits, masked, 0.0, 5, 2, True, [], []))


EMU_CASES = [
    ((1, 1, 111), torch.float32, dict()),
    ((3, 7, 111), torch.bfloat16, dict(temperature=0.7, seed=3, offset=11)),
    ((1, 33, 111), torch.float16, dict(suppress_ids=(0, 2), zero_conf_ids=(4, 9))),
    ((3, 3, 1000), torch.float32, dict(temperature=1.5, seed=2**40 + 5, offset=2**33 + 1, suppress_ids=(1,))),
    ((2, 3, 32000), torch.bfloat16, dict(zero_conf_ids=(6,))),
    ((1, 3, 1001), torch.float16, dict(random_confidence=True, seed=9, offset=4)),
    ((1, 2, 126464), torch.float32, dict(suppress_ids=(126081,), zero_conf_ids=(126348,))),
]


@requires_emu
@pytest.mark.parametrize("shape,dtype,opt", [c for c in CPU_CASES if c[2] not in NOISY or c[0][2] <= 111],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_emu_sweep(shape, dtype, opt):
    kw = OPTIONS[opt]
    logits, masked = make_case(*shape, dtype, seed=opt)
    logits = zero_conf_favoured(logits, kw.get("zero_conf_ids", ()))
    token, prob = run_backend("emu", logits, masked, **kw)
    check(token, prob, logits, masked, **kw)


@requires_emu
@pytest.mark.parametrize("case", range(len(EMU_CASES)))
def test_emu(case):
    shape, dtype, kw = EMU_CASES[case]
    logits, masked = make_case(*shape, dtype, seed=case)
    logits = zero_conf_favoured(logits, kw.get("zero_conf_ids", ()))
    token, prob = run_backend("emu", logits, masked, **kw)
    check(token, prob, logits, masked, **kw)


@requires_emu
def test_emu_strided_and_ties():
    logits, masked = make_case(3, 7, 500, torch.bfloat16)
    wide = torch.zeros(3, 9, 700, dtype=torch.bfloat16)
    wide[:, 1:8, 100:601] = torch.cat([logits, torch.zeros(3, 7, 1, dtype=torch.bfloat16)], -1)
    view = wide[:, 1:8, 100:600]
    token, prob = run_emu(view, masked)
    check(token, prob, logits, masked)


@requires_cuda
@pytest.mark.parametrize("shape,dtype,opt",
                         CPU_CASES + [((2, 5, 126464), torch.bfloat16, 0), ((2, 5, 126464), torch.float32, 3)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_cuda(shape, dtype, opt):
    kw = OPTIONS[opt]
    logits, masked = make_case(*shape, dtype, seed=opt)
    logits = zero_conf_favoured(logits, kw.get("zero_conf_ids", ()))
    token, prob = run_backend("cuda", logits, masked, **kw)
    check(token, prob, logits, masked, **kw)


@requires_cuda
def test_cuda_opcheck():
    logits, masked = make_case(2, 3, 64, torch.bfloat16)
    torch.library.opcheck(torch.ops.llada_rt.confidence.default,
                          (logits.cuda(), masked.cuda(), 1.0, 5, 2, False, [3], [4, 5]))

# The C++ emulator test tests/emu/test_confidence.cpp is built and run plain, under TSAN and under ASan by tests/test_emu.py.
