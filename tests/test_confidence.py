"""ops.confidence / confidence_partial / confidence_merge (CPU op, emulated CUDA kernel, CUDA op) against the fp64
reference.confidence: odd shapes, per-row settings mixed in one call, the Philox layout, vocabulary shards, the
float64 accuracy of issue 19 and allocation-free out= calls."""

import math

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
# |prob - p64| <= PROB_RTOL p (1 - p) + PROB_ATOL: every softmax term carries the error of one fp32 2^f (<= 2.4e-7
# relative on the CPU, ~6e-8 under the emulator), the sum is float64, and the token's own term is the same value in
# the numerator and the sum, so the error of p = a / (a + rest) is p (1 - p) times the terms' relative error.
PROB_RTOL = 1e-6
PROB_RTOL_CUDA = 4e-6  # ex2.approx on the GPU: a few ulp
PROB_ATOL = 1e-13
NOISY_GAP_TOL = 1e-3   # fp32 Gumbel keys of the kernels vs the fp64 keys of the reference
SHARD_PROB_ATOL = 1e-12


def settings(B, *, temperature=0.0, seed=0, offset=0, position=0, random=False, special=(), suppress=0,
             zero_conf=0, device="cpu"):
    """The per-row keyword arguments of confidence; a list value is cycled over the B rows."""
    def col(v, dtype):
        v = v if isinstance(v, (list, tuple)) else [v]
        return torch.tensor([v[b % len(v)] for b in range(B)], dtype=dtype, device=device)
    return dict(temperature=col(temperature, torch.float32), seed=col(seed, torch.int64),
                offset=col(offset, torch.int64), position=col(position, torch.int64),
                random_confidence=col(random, torch.bool), special_ids=list(special),
                suppress_mask=col(suppress, torch.int32), zero_conf_mask=col(zero_conf, torch.int32))


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


def run_emu(logits, masked, *, vocab_offset=0, full_vocab=None, partial=False, **kw):
    B, N, V = logits.shape
    full_vocab = vocab_offset + V if full_vocab is None else full_vocab
    rows = {name: kw[name] for name in ops._CONFIDENCE_ROWS}
    token = torch.full((B, N), 12345, dtype=torch.int64)
    if partial:
        state = ops.ConfidenceState(*(torch.full((B, N), 7, dtype=d) for d in ops._STATE_DTYPES))
        outputs = state._asdict()
    else:
        prob = torch.full((B, N), 12345.0, dtype=torch.float64)
        outputs = dict(token=token, prob=prob)
    masked = masked.contiguous()
    _emu.confidence(_emu.ConfidenceParams(**ops._confidence_kwargs(outputs, logits, masked, rows, kw["special_ids"],
                                                                   vocab_offset, full_vocab)))
    return state if partial else (token, prob)


def run_backend(backend, logits, masked, **kw):
    if backend == "cpu":
        return ops.confidence(logits, masked, **kw)
    if backend == "emu":
        return run_emu(logits, masked, **kw)
    kw = {n: (v.cuda() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    token, prob = ops.confidence(logits.cuda(), masked.cuda(), **kw)
    torch.cuda.synchronize()
    return token.cpu(), prob.cpu()


def softmax_at(logits, token, kw):
    """fp64 softmax probability of `token` (B, N) with each row's exclusions; 0 where undefined."""
    V = logits.shape[-1]
    excluded = (R.special_mask(kw["special_ids"], kw["suppress_mask"], 0, V)
                | R.special_mask(kw["special_ids"], kw["zero_conf_mask"], 0, V))
    soft = logits.to(torch.float64).masked_fill(excluded[:, None, :], NEG_INF)
    p = torch.softmax(soft, -1).gather(-1, token.clamp(min=0)[..., None])[..., 0]
    return p.nan_to_num(0.0)


def check(token, prob, logits, masked, rtol=PROB_RTOL, **kw):
    """Tie-robust comparison with reference.confidence; returns the achieved max |err| / (p (1 - p))."""
    ref_token, ref_prob = R.confidence(logits, masked, **kw)
    keys = dict(temperature=kw["temperature"], seed=kw["seed"], offset=kw["offset"], position=kw["position"],
                special_ids=kw["special_ids"], suppress_mask=kw["suppress_mask"])
    key = R.confidence_keys(logits, **keys)                                        # (B, N, V) fp64
    top = key.topk(min(2, key.shape[-1]), dim=-1).values
    gap = top[..., 0] - top[..., -1] if key.shape[-1] > 1 else torch.full(masked.shape, math.inf)
    gap = gap.nan_to_num(math.inf)                                                  # -inf - -inf: a dead row
    noisy = (kw["temperature"] > 0)[:, None].expand_as(masked)
    tol = torch.where(noisy, NOISY_GAP_TOL, 0.0)
    decided = masked & ((gap > tol) | ~noisy)   # without noise the keys are exact: every row is decided
    tok_mismatch = int((decided & (token != ref_token)).sum())
    key_at = key.gather(-1, token.clamp(min=0)[..., None])[..., 0]
    short = torch.where(masked, (top[..., 0] - key_at).nan_to_num(0.0) - tol, 0.0)
    key_short = float(short.max()) if masked.numel() else 0.0
    random = kw["random_confidence"][:, None].expand_as(masked)
    expect = softmax_at(logits, token, kw)
    dead = ~(key.amax(-1) > NEG_INF)
    expect = torch.where(dead, 0.0, expect)
    expect = torch.where(random, ref_prob, expect)  # the same Philox draw, bit-exact
    err = torch.where(masked, (prob - expect).abs(), 0.0).nan_to_num(math.inf)
    scale = expect * (1 - expect)
    # (where p (1 - p) < 1e-9 the float64 rounding of p itself, ~1e-16, dominates the ratio: those rows are left out)
    rel = float(torch.where(masked & (scale > 1e-9), err / scale.clamp(min=1e-9), 0.0).max()) if err.numel() else 0.0
    over = int((masked & (err > rtol * scale + PROB_ATOL)).sum())
    print(f"token mismatches where decided: {tok_mismatch}, chosen key short of the max by {key_short:.3g}, "
          f"max |prob - p64| {float(err.max()) if err.numel() else 0:.3g}, at most {rel:.3g} p (1 - p), "
          f"{over} over {rtol:g} p (1 - p) + {PROB_ATOL:g}")
    assert tok_mismatch == 0 and key_short <= 0
    assert over == 0
    assert torch.equal(prob[random & masked], ref_prob[random & masked])
    assert torch.equal(token[~masked], torch.full_like(token[~masked], -1))
    assert torch.equal(prob[~masked], torch.full_like(prob[~masked], NEG_INF))
    assert prob.dtype == torch.float64 and not torch.isnan(prob).any()
    return rel


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 111), (1, 8, 111), (3, 33, 111), (3, 8, 32000), (1, 33, 32000)]
SPECIAL = (1, 5, 9, 2)
OPTIONS = [
    dict(),
    dict(temperature=[0.7, 0.0, 2.5], seed=[3, 2**40 + 5, 7], offset=[11, 2**33 + 1, 0], position=[0, 17, 2**32 - 3]),
    dict(special=SPECIAL, suppress=[0b0011, 0b0100, 0], zero_conf=[0b1100, 0b0001, 0b1111]),
    dict(temperature=[1.0, 0.0, 0.5], seed=7, offset=[1, 2, 3], special=SPECIAL, suppress=[0, 0b1000],
         zero_conf=[0b0100, 0b0010]),
    dict(random=[True, False, True], seed=[9, 4], offset=4, position=[5, 1000], special=SPECIAL, suppress=0b0001),
]
NOISY = [i for i, o in enumerate(OPTIONS) if "temperature" in o]


def case(shape, dtype, opt):
    B, N, V = shape
    kw = settings(B, **OPTIONS[opt])
    logits, masked = make_case(B, N, V, dtype, seed=opt)
    if kw["special_ids"]:   # a zero-confidence id wins row (0, 0): prob 0 is exercised
        logits = logits.clone()
        logits[0, 0, kw["special_ids"][2]] = 50.0
    return logits, masked, kw


def case_id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


# The reference draws Philox for every (b, n, c) of a noisy call (~1 s per million): noisy options on small V.
CPU_CASES = ([(shape, dtype, opt) for shape in SHAPES for dtype in DTYPES for opt in range(len(OPTIONS))
              if opt not in NOISY or shape[2] <= 111]
             + [((1, 8, 32000), dtype, opt) for dtype in (torch.float32, torch.bfloat16) for opt in NOISY])


@pytest.mark.parametrize("shape,dtype,opt", CPU_CASES, ids=case_id)
def test_cpu(shape, dtype, opt):
    logits, masked, kw = case(shape, dtype, opt)
    token, prob = run_backend("cpu", logits, masked, **kw)
    check(token, prob, logits, masked, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_real_vocab(dtype):
    logits, masked = make_case(3, 2, 126464, dtype, seed=1)
    kw = settings(3, special=(126081, 126348, 126336), suppress=[0b001, 0b100, 0b101], zero_conf=[0b010, 0b011, 0])
    logits[1, 0, 126348] = 60.0           # EOT chosen -> confidence 0
    token, prob = run_backend("cpu", logits, masked, **kw)
    check(token, prob, logits, masked, **kw)
    if dtype == torch.bfloat16:
        noisy = settings(1, temperature=0.9, seed=1234, offset=77, position=3)
        token, prob = run_backend("cpu", logits[:1], masked[:1], **noisy)
        check(token, prob, logits[:1], masked[:1], **noisy)


def test_cpu_strided_logits():
    logits, masked = make_case(3, 7, 500, torch.float32)
    wide = torch.zeros(3, 9, 700)
    wide[:, 1:8, 100:600] = logits
    view = wide[:, 1:8, 100:600]          # b and n strides differ from a contiguous tensor
    kw = settings(3, temperature=[0.0, 1.0], seed=5, special=SPECIAL, suppress=0b0110)
    token, prob = ops.confidence(view, masked, **kw)
    check(token, prob, logits, masked, **kw)


def test_cpu_exact_ties_lowest_id():
    logits = torch.zeros(2, 3, 300)
    logits[:, :, [7, 150, 299]] = 5.0
    logits[1, 2] = NEG_INF
    logits[1, 2, [250, 251]] = 1.0
    masked = torch.ones(2, 3, dtype=torch.bool)
    for dtype in DTYPES:
        token, prob = ops.confidence(logits.to(dtype), masked, **settings(2, special=(7,), suppress=1))
        print(dtype, token.tolist(), prob[1, 2].item())
        assert token[0].tolist() == [150, 150, 150] and token[1].tolist() == [150, 150, 250]
        assert abs(prob[1, 2].item() - 0.5) < 1e-15
    token, prob = ops.confidence(torch.full((1, 2, 40), NEG_INF), torch.ones(1, 2, dtype=torch.bool),
                                 **settings(1, special=(0, 1), suppress=0b11))
    assert token.tolist() == [[2, 2]] and prob.tolist() == [[0.0, 0.0]]


def test_single_finite_logit_is_certain():
    """The token's term and its term in the sum are the same value: one finite logit gives exactly 1.0."""
    for dtype in DTYPES:
        for x in (-1e4, -37.5, 0.0, 3.0, 1e4):
            logits = torch.full((1, 2, 3001), NEG_INF)
            logits[0, 0, 1234] = x
            logits[0, 1, 5] = x
            logits[0, 1, 6] = NEG_INF
            token, prob = ops.confidence(logits.to(dtype), torch.ones(1, 2, dtype=torch.bool), **settings(1))
            print(dtype, x, token.tolist(), prob.tolist())
            assert token.tolist() == [[1234, 5]] and prob.tolist() == [[1.0, 1.0]]


def test_cpu_accuracy_against_fp64():
    """The achieved accuracy of the float64 confidence on logits of every scale, stated as |err| / (p (1 - p))."""
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for scale in (0.1, 1.0, 3.0, 10.0, 30.0):
        for offset in (0.0, 100.0, -1000.0):
            logits = torch.randn(2, 16, 4099, generator=g) * scale + offset
            masked = torch.ones(2, 16, dtype=torch.bool)
            kw = settings(2)
            token, prob = ops.confidence(logits, masked, **kw)
            worst = max(worst, check(token, prob, logits, masked, **kw))
    print(f"CPU confidence: |prob - p64| <= {worst:.3g} p (1 - p) over logit scales 0.1..30, offsets -1000..100")


def test_cpu_negative_temperature_raises():
    logits, masked = make_case(2, 3, 50, torch.float32)
    with pytest.raises(ValueError, match=r"temperature\[1\] = -0.5"):
        ops.confidence(logits, masked, **settings(2, temperature=[0.0, -0.5]))
    with pytest.raises(ValueError, match=r"temperature\[0\] = nan"):
        ops.confidence(logits, masked, **settings(2, temperature=[math.nan, 0.0]))


# ---- per-row settings: batch invariance and the Philox layout --------------------------------------------------------

def one_row(kw, b):
    return {n: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}


@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu", marks=requires_emu),
                                     pytest.param("cuda", marks=requires_cuda)])
def test_mixed_rows_equal_one_call_per_row(backend):
    """Rows with different settings in one call give exactly what each row gives alone."""
    B, N, V = 5, 6, 777 if backend != "emu" else 301
    logits, masked = make_case(B, N, V, torch.bfloat16, seed=3)
    kw = settings(B, temperature=[0.0, 0.8, 0.0, 1.7, 0.3], seed=[1, 2, 3, 4, 5], offset=[0, 9, 2**35, 1, 7],
                  position=[0, 40, 3, 2**32 - 2, 100], random=[False, False, True, False, False], special=SPECIAL,
                  suppress=[0, 0b0011, 0b1111, 0b0100, 0], zero_conf=[0b1000, 0, 0, 0b0001, 0b0110])
    token, prob = run_backend(backend, logits, masked, **kw)
    for b in range(B):
        t, p = run_backend(backend, logits[b:b + 1], masked[b:b + 1], **one_row(kw, b))
        print(b, token[b].tolist(), t[0].tolist())
        assert torch.equal(t[0], token[b]) and torch.equal(p[0], prob[b])


def test_philox_layout():
    """The draws are reference.philox_uniform at (seed, position + n, offset) and column id; a row moved to another
    batch index (another position in the batch, other neighbours) gives the same tokens and probs."""
    B, N, V = 3, 5, 997
    logits = torch.zeros(B, N, V)                # flat logits: the token is decided by the noise alone
    masked = torch.ones(B, N, dtype=torch.bool)
    kw = settings(B, temperature=1.0, seed=[11, 2**62 + 3, 5], offset=[0, 7, 2**40], position=[0, 100, 2**32 - 2])
    token, _ = ops.confidence(logits, masked, **kw)
    n = torch.arange(N)
    u = R.philox_uniform(kw["seed"][:, None, None], kw["offset"][:, None, None],
                         kw["position"][:, None, None] + n[None, :, None], torch.arange(V))   # (B, N, V)
    g = -torch.log(-torch.log(u.double()))
    chosen = g.gather(-1, token[..., None])[..., 0]
    print("tokens", token.tolist(), "max gumbel short by", float((g.amax(-1) - chosen).max()))
    assert float((g.amax(-1) - chosen).max()) <= 1e-5
    assert len(set(token.flatten().tolist())) > B   # one draw per position, not one per row
    # random confidence: bit-exact uniforms at the random column
    rnd = settings(B, random=True, seed=kw["seed"].tolist(), offset=kw["offset"].tolist(),
                   position=kw["position"].tolist())
    _, prob = ops.confidence(logits, masked, **rnd)
    expect = R.philox_uniform(kw["seed"][:, None], kw["offset"][:, None], kw["position"][:, None] + n,
                              R.RANDOM_CONFIDENCE_COLUMN).double()
    assert torch.equal(prob, expect)
    # another batch composition: the rows reversed, with an unrelated row in front
    perm = [2, 1, 0]
    mixed = settings(B + 1, **{name: [v] + [kw[key][p].item() for p in perm] for name, key, v in (
        ("temperature", "temperature", 0.5), ("seed", "seed", 99), ("offset", "offset", 3),
        ("position", "position", 8))})
    token2, _ = ops.confidence(torch.cat([torch.randn(1, N, V), logits[perm]]), torch.ones(B + 1, N, dtype=torch.bool),
                               **mixed)
    assert torch.equal(token2[1:], token[perm])
    # the request's own step moves the draws; the batch row does not
    later = dict(kw, offset=kw["offset"] + 1)
    assert not torch.equal(ops.confidence(logits, masked, **later)[0], token)


# ---- vocabulary shards --------------------------------------------------------------------------------------------

def shard_bounds(V, parts):
    """Uneven cut points of [0, V) into len(parts) + 1 shards (parts are fractions)."""
    cuts = [0] + [max(1, min(V - 1, int(V * f))) for f in parts] + [V]
    return list(zip(cuts[:-1], cuts[1:]))


def sharded(run_partial, logits, masked, bounds, **kw):
    V = logits.shape[-1]
    states = [run_partial(logits[..., a:b].contiguous() if a % 2 else logits[..., a:b], masked, vocab_offset=a,
                          full_vocab=V, **kw) for a, b in bounds]
    return ops.confidence_merge(*states)


SHARD_CASES = [((3, 5, 1001), torch.float32, [0.4]), ((3, 5, 1001), torch.bfloat16, [0.13, 0.71]),
               ((2, 4, 32000), torch.float16, [0.5001]), ((2, 3, 32000), torch.bfloat16, [0.2, 0.33])]


def shard_settings(B, V):
    # special ids on both sides of the cuts, one shard wholly suppressed ([V-2, V) in the 3-way split of 1001)
    return settings(B, temperature=[0.0, 0.9, 0.0], seed=[3, 4, 5], offset=[1, 2, 3], position=[0, 33, 7],
                    random=[False, False, True], special=(0, V // 2, V - 2, V - 1, 7),
                    suppress=[0b01111, 0b00001, 0b11000], zero_conf=[0b10000, 0b00110, 0])


@pytest.mark.parametrize("shape,dtype,parts", SHARD_CASES, ids=case_id)
def test_shards_merge_to_the_whole(shape, dtype, parts):
    B, N, V = shape
    logits, masked = make_case(B, N, V, dtype, seed=7)
    logits[1, 1, V // 2] = 45.0                       # a zero-confidence id wins in shard 1 of row 1
    kw = shard_settings(B, V)
    token, prob = ops.confidence(logits, masked, **kw)
    for bounds in (shard_bounds(V, parts), [(0, 2), (2, V - 2), (V - 2, V)]):
        m_token, m_prob = sharded(ops.confidence_partial, logits, masked, bounds, **kw)
        diff = float(torch.where(masked, (m_prob - prob).abs(), 0.0).max())
        print(f"shards {bounds}: token mismatches {int((m_token != token).sum())}, max |prob diff| {diff:.3g}")
        assert torch.equal(m_token, token)   # the same fp32 keys per global id: no tolerance needed
        assert diff <= SHARD_PROB_ATOL
        assert torch.equal(m_prob[~masked], prob[~masked])


def test_reference_shards_merge_to_the_whole():
    B, N, V = 3, 4, 301
    logits, masked = make_case(B, N, V, torch.float32, seed=2)
    kw = shard_settings(B, V)
    token, prob = R.confidence(logits, masked, **kw)
    m_token, m_prob = sharded(R.confidence_partial, logits, masked, shard_bounds(V, [0.3, 0.6]), **kw)
    diff = float(torch.where(masked, (m_prob - prob).abs(), 0.0).max())
    print(f"reference: token mismatches {int((m_token != token).sum())}, max |prob diff| {diff:.3g}")
    assert torch.equal(m_token, token) and diff <= SHARD_PROB_ATOL


def test_merge_ties_go_to_the_lower_global_id():
    logits = torch.zeros(1, 1, 10)
    logits[0, 0, [3, 8]] = 2.0                       # the same key in both shards
    masked = torch.ones(1, 1, dtype=torch.bool)
    kw = settings(1)
    states = [ops.confidence_partial(logits[..., a:b].contiguous(), masked, vocab_offset=a, full_vocab=10, **kw)
              for a, b in ((5, 10), (0, 5))]      # rank order does not matter
    token, prob = ops.confidence_merge(*states)
    ref = R.confidence(logits, masked, **kw)
    print(token.tolist(), prob.tolist(), ref[1].tolist())
    p = ref[1].item()
    assert token.tolist() == [[3]] and abs(prob.item() - p) <= PROB_RTOL * p * (1 - p)
    stacked = ops.ConfidenceState(*(torch.stack(f) for f in zip(*states)))
    assert torch.equal(ops.confidence_merge(stacked)[0], token)


def test_partial_input_errors():
    logits, masked = make_case(1, 2, 50, torch.float32)
    kw = settings(1)
    with pytest.raises(ops.OpInputError, match="must lie in"):
        ops.confidence_partial(logits, masked, vocab_offset=10, full_vocab=55, **kw)
    with pytest.raises(ops.OpInputError, match="outside the vocabulary"):
        ops.confidence_partial(logits, masked, vocab_offset=0, full_vocab=60, **settings(1, special=(60,)))
    with pytest.raises(ops.OpInputError, match="ConfidenceState"):
        ops.confidence_merge()
    st = ops.confidence_partial(logits, masked, vocab_offset=0, full_vocab=50, **kw)
    with pytest.raises(ops.OpInputError, match="ref must be torch.int32"):
        ops.confidence_merge(st._replace(ref=st.ref.long()))


# ---- issue 19: float64-accurate confidences -------------------------------------------------------------------------

def near_tie_logits(dtype):
    """Four positions whose float64 confidences are ~1 - 1e-5 and differ by ~1e-8 (ordered against the position
    order): position j has the max logit 0 and 1003 - j ids at -18.375 (exact in bf16), the rest far below."""
    V, N = 5000, 4
    logits = torch.full((1, N, V), -80.0)
    logits[0, :, 17] = 0.0
    for j in range(N):
        logits[0, j, 100:100 + 1003 - j] = -18.375
    return logits.to(dtype)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu", marks=requires_emu),
                                     pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_near_ties_commit_as_float64(backend, dtype):
    logits = near_tie_logits(dtype)
    B, N, _ = logits.shape
    masked = torch.ones(B, N, dtype=torch.bool)
    kw = settings(B, special=(126,), suppress=1)
    token, prob = run_backend(backend, logits, masked, **kw)
    ref_token, ref_prob = R.confidence(logits, masked, **kw)
    gaps = (ref_prob[0, 1:] - ref_prob[0, :-1]).tolist()
    print("p64", ref_prob.tolist(), "gaps", gaps, "fp32", ref_prob.float().tolist())
    print("op ", prob.tolist(), "max |diff|", float((prob - ref_prob).abs().max()))
    assert all(9e-9 < g < 2e-8 for g in gaps)
    assert len(set(ref_prob.float()[0].tolist())) < N          # float32 confidences would tie here
    assert torch.equal(token, ref_token) and float((prob - ref_prob).abs().max()) < 1e-11
    block = torch.full((B, N), 126336)
    for rule, k, thr in (("topk", 2, 0.0), ("threshold", 0, float(ref_prob[0, 1] + ref_prob[0, 2]) / 2)):
        rows = dict(k=torch.full((B,), k), rule=torch.full((B,), ops.REMASK_RULES[rule], dtype=torch.int32),
                    threshold=torch.full((B,), thr, dtype=torch.float64), factor=torch.ones(B, dtype=torch.float64))
        ours, ref = block.clone(), block.clone()
        ops.remask(ours, token, prob, mask_id=126336, **rows)
        R.remask(ref, ref_token, ref_prob, mask_id=126336, **rows)
        committed = (ours != 126336).nonzero()[:, 1].tolist()
        print(rule, "committed", committed, "reference", (ref != 126336).nonzero()[:, 1].tolist())
        assert torch.equal(ours, ref) and committed == [2, 3]   # the float32 tie rule would pick [0, 1]


# ---- out=, no allocation, errors, schemas ---------------------------------------------------------------------------

def allocations(fn):
    fn()  # warm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0]


def test_out_allocates_nothing():
    logits, masked = make_case(3, 8, 3000, torch.bfloat16)
    kw = settings(3, temperature=[0.0, 0.5], special=SPECIAL, suppress=0b0001, zero_conf=0b0010)
    out = (torch.empty(3, 8, dtype=torch.int64), torch.empty(3, 8, dtype=torch.float64))
    found = allocations(lambda: ops.confidence(logits, masked, **kw, out=out))
    print("confidence(out=) allocations:", found)
    assert found == []
    assert torch.equal(out[0], ops.confidence(logits, masked, **kw)[0])
    state = ops.ConfidenceState(*(torch.empty(3, 8, dtype=d) for d in ops._STATE_DTYPES))
    found = allocations(lambda: ops.confidence_partial(logits, masked, vocab_offset=0, full_vocab=3000, **kw,
                                                       out=state))
    print("confidence_partial(out=) allocations:", found)
    assert found == []
    assert allocations(lambda: ops.confidence(logits, masked, **kw)) != []   # the check can see an allocation


def test_cpu_input_errors():
    logits, masked = make_case(1, 4, 50, torch.float32)
    kw = settings(1)
    with pytest.raises(ops.OpInputError, match="float32, float16 or bfloat16"):
        ops.confidence(logits.to(torch.int64), masked, **kw)
    with pytest.raises(ops.OpInputError, match=r"\(B, N, V\)"):
        ops.confidence(logits[0], masked, **kw)
    with pytest.raises(ops.OpInputError, match="masked must be"):
        ops.confidence(logits, masked[:, :3], **kw)
    with pytest.raises(ops.OpInputError, match="masked must be bool"):
        ops.confidence(logits, masked.to(torch.int32), **kw)
    with pytest.raises(ops.OpInputError, match="unit stride"):
        ops.confidence(logits.transpose(1, 2).contiguous().transpose(1, 2), masked, **kw)
    with pytest.raises(ops.OpInputError, match="outside the vocabulary"):
        ops.confidence(logits, masked, **settings(1, special=(50,)))
    with pytest.raises(ops.OpInputError, match="outside the vocabulary"):
        ops.confidence(logits, masked, **settings(1, special=(-1,)))
    with pytest.raises(ops.OpInputError, match="at most 8"):
        ops.confidence(logits, masked, **settings(1, special=tuple(range(9))))
    with pytest.raises(ops.OpInputError, match="cover the whole vocabulary"):
        ops.confidence(logits[..., :3], masked, **settings(1, special=(0, 1, 2)))
    with pytest.raises(ops.OpInputError, match=r"temperature must be torch.float32 \(1,\)"):
        ops.confidence(logits, masked, **dict(kw, temperature=torch.zeros(1, dtype=torch.float64)))
    with pytest.raises(ops.OpInputError, match=r"seed must be torch.int64 \(1,\)"):
        ops.confidence(logits, masked, **dict(kw, seed=torch.zeros(2, dtype=torch.int64)))
    with pytest.raises(ops.OpInputError, match="suppress_mask must be a tensor, got int"):
        ops.confidence(logits, masked, **dict(kw, suppress_mask=0))
    with pytest.raises(ops.OpInputError, match="out prob must be torch.float64"):
        ops.confidence(logits, masked, **kw, out=(torch.empty(1, 4, dtype=torch.int64), torch.empty(1, 4)))
    with pytest.raises(ops.OpInputError, match="out token must be contiguous"):
        ops.confidence(logits, masked, **kw, out=(torch.empty(1, 8, dtype=torch.int64)[:, ::2],
                                                   torch.empty(1, 4, dtype=torch.float64)))


@pytest.mark.parametrize("name", ["confidence", "confidence_partial", "remask"])
def test_reference_has_the_signature_of_the_op(name):
    """reference.py is also the engine's backend="torch": its functions must take exactly the ops' arguments."""
    import inspect
    ours = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(ops, name)).parameters.values()]
    ref = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(R, name)).parameters.values()]
    print(ours)
    assert ours == ref


def test_cpu_empty():
    token, prob = ops.confidence(torch.randn(0, 3, 10), torch.ones(0, 3, dtype=torch.bool), **settings(0))
    assert token.shape == (0, 3) and prob.shape == (0, 3)


def test_opcheck():
    logits, masked = make_case(2, 3, 64, torch.bfloat16)
    kw = settings(2, temperature=[0.0, 1.0], seed=5, offset=2, special=(3, 4, 5), suppress=0b001, zero_conf=0b110)
    rows = [kw[n] for n in ("temperature", "seed", "offset", "position", "random_confidence")]
    args = (logits, masked, *rows, kw["special_ids"], kw["suppress_mask"], kw["zero_conf_mask"], 0)
    torch.library.opcheck(torch.ops.llada_rt.confidence.default, args)
    out = (torch.empty(2, 3, dtype=torch.int64), torch.empty(2, 3, dtype=torch.float64))
    torch.library.opcheck(torch.ops.llada_rt.confidence_out.default, (*out, *args))
    torch.library.opcheck(torch.ops.llada_rt.confidence_partial.default, (*args[:-1], 10, 100))
    state = [torch.empty(2, 3, dtype=d) for d in ops._STATE_DTYPES]
    torch.library.opcheck(torch.ops.llada_rt.confidence_partial_out.default, (*state, *args[:-1], 10, 100))


# ---- the emulated CUDA kernel ---------------------------------------------------------------------------------------

EMU_CASES = [c if c[0][2] <= 111 else pytest.param(*c, marks=pytest.mark.slow)  # noisy V = 32000: ~10 s each
             for c in CPU_CASES if c[0][1] * c[0][0] * c[0][2] <= 8 * 32000]


@requires_emu
@pytest.mark.parametrize("shape,dtype,opt", EMU_CASES, ids=case_id)
def test_emu_sweep(shape, dtype, opt):
    logits, masked, kw = case(shape, dtype, opt)
    token, prob = run_backend("emu", logits, masked, **kw)
    check(token, prob, logits, masked, **kw)


@requires_emu
def test_emu_real_vocab_and_strides():
    logits, masked = make_case(1, 2, 126464, torch.float32, seed=4)
    kw = settings(1, special=(126081, 126348), suppress=0b01, zero_conf=0b10)
    token, prob = run_backend("emu", logits, masked, **kw)
    check(token, prob, logits, masked, **kw)
    logits, masked = make_case(3, 7, 500, torch.bfloat16)
    wide = torch.zeros(3, 9, 700, dtype=torch.bfloat16)
    wide[:, 1:8, 101:601] = logits
    view = wide[:, 1:8, 101:601]          # rows that start off a 16-byte boundary
    kw = settings(3, temperature=[0.0, 1.0], seed=5, special=SPECIAL, suppress=0b0110)
    token, prob = run_emu(view, masked, **kw)
    check(token, prob, logits, masked, **kw)


@requires_emu
def test_emu_shards_merge_to_the_whole():
    B, N, V = 3, 3, 1001
    logits, masked = make_case(B, N, V, torch.bfloat16, seed=7)
    kw = shard_settings(B, V)
    token, prob = run_emu(logits, masked, **kw)
    m_token, m_prob = sharded(lambda *a, **k: run_emu(*a, partial=True, **k), logits, masked,
                              shard_bounds(V, [0.13, 0.71]), **kw)
    diff = float(torch.where(masked, (m_prob - prob).abs(), 0.0).max())
    print(f"emulated shards: token mismatches {int((m_token != token).sum())}, max |prob diff| {diff:.3g}")
    assert torch.equal(m_token, token) and diff <= SHARD_PROB_ATOL


# ---- CUDA (runs where a GPU is present) ---------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("shape,dtype,opt", CPU_CASES + [((2, 5, 126464), torch.bfloat16, 0),
                                                         ((2, 5, 126464), torch.float32, 2)], ids=case_id)
def test_cuda(shape, dtype, opt):
    logits, masked, kw = case(shape, dtype, opt)
    token, prob = run_backend("cuda", logits, masked, **kw)
    check(token, prob, logits, masked, rtol=PROB_RTOL_CUDA, **kw)


@requires_cuda
@pytest.mark.parametrize("shape,dtype,parts", SHARD_CASES, ids=case_id)
def test_cuda_shards_merge_to_the_whole(shape, dtype, parts):
    B, N, V = shape
    logits, masked = make_case(B, N, V, dtype, seed=7)
    kw = {n: (v.cuda() if isinstance(v, torch.Tensor) else v) for n, v in shard_settings(B, V).items()}
    logits, masked = logits.cuda(), masked.cuda()
    token, prob = ops.confidence(logits, masked, **kw)
    m_token, m_prob = sharded(ops.confidence_partial, logits, masked, shard_bounds(V, parts), **kw)
    diff = float(torch.where(masked, (m_prob - prob).abs(), 0.0).max())
    print(f"CUDA shards: token mismatches {int((m_token != token).sum())}, max |prob diff| {diff:.3g}")
    assert torch.equal(m_token, token) and diff <= SHARD_PROB_ATOL


@requires_cuda
def test_cuda_opcheck_and_graph_capture():
    logits, masked = make_case(2, 3, 64, torch.bfloat16)
    logits, masked = logits.cuda(), masked.cuda()
    kw = settings(2, temperature=[0.0, 1.0], seed=5, offset=2, special=(3, 4, 5), suppress=0b001, zero_conf=0b110,
                  device="cuda")
    rows = [kw[n] for n in ("temperature", "seed", "offset", "position", "random_confidence")]
    torch.library.opcheck(torch.ops.llada_rt.confidence.default,
                          (logits, masked, *rows, kw["special_ids"], kw["suppress_mask"], kw["zero_conf_mask"], 0))
    out = (torch.empty(2, 3, dtype=torch.int64, device="cuda"), torch.empty(2, 3, dtype=torch.float64, device="cuda"))
    ops.confidence(logits, masked, **kw, out=out)   # warm
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.confidence(logits, masked, **kw, out=out)
    kw["offset"].add_(1)                             # a per-row setting changed on the device, then replayed
    graph.replay()
    torch.cuda.synchronize()
    expect = ops.confidence(logits, masked, **kw)
    assert torch.equal(out[0], expect[0]) and torch.equal(out[1], expect[1])

# The C++ emulator test tests/emu/test_confidence.cpp is built and run plain, under TSAN and under ASan by tests/test_emu.py.
