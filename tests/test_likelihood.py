"""The Monte Carlo log-likelihood (llada_rt/likelihood.py): the packed estimator against an independent per-row
implementation of the official formula fed the same masks; the estimate against the exact value of the bound by
enumerating every mask set of a short answer; the stratified mask counts; rolling perplexity as the sum of windows."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from llada_oracle import PlainLLaDA
from llada_rt import Runtime, likelihood
from llada_rt.runtime import SHIPPED_MODEL
from llada_rt.testing import SMALL_VOCAB, write_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("ll_tiny"), seed=3, vocab=SMALL_VOCAB)
    return Runtime(path, device="cpu"), PlainLLaDA(path)


@pytest.fixture(scope="module")
def shipped():
    return Runtime(device="cpu"), PlainLLaDA(SHIPPED_MODEL)


def official_row_values(plain, cfg, prompt, answer, masks, cfg_scale=0.0):
    """The official get_log_likelihood.py arithmetic, one unpadded row at a time through the plain fp64 model:
    -CE(masked) / p_mask summed, negated, per row (the official loss of a row is its negative)."""
    P, L = len(prompt), len(answer)
    seq = torch.tensor(prompt + answer)
    out = []
    for m in masks:
        is_mask = torch.cat([torch.zeros(P, dtype=torch.bool), m])
        noisy = torch.where(is_mask, cfg.mask_token_id, seq)[None]
        logits = plain(noisy)
        if cfg_scale > 0:
            un = noisy.clone()
            un[0, :P] = cfg.mask_token_id
            u = plain(un)
            logits = u + (cfg_scale + 1) * (logits - u)
        p_mask = m.sum().double() / L
        loss = F.cross_entropy(logits[0][is_mask], seq[is_mask], reduction="none") / p_mask
        out.append(-loss.sum().item())
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("cfg_scale", [0.0, 0.7])
@pytest.mark.parametrize("max_tokens", [16384, 40])
def test_packed_rows_match_official_formula(tiny, cfg_scale, max_tokens):
    """Pairs of odd lengths (an empty prompt included) packed into shared left-padded forwards (max_tokens 40 splits
    pairs across forwards) give the per-row values of the official formula run row by row."""
    rt, plain = tiny
    cfg = rt.config
    g = torch.Generator().manual_seed(5)
    shapes = [(0, 3), (1, 1), (7, 5), (13, 9), (4, 2), (19, 6)]
    prompts = [torch.randint(0, 90, (p,), generator=g).tolist() for p, _ in shapes]
    answers = [torch.randint(0, 90, (a,), generator=g).tolist() for _, a in shapes]
    masks = []
    for _, a in shapes:
        m = torch.rand(5, a, generator=g) < 0.5
        m[torch.arange(5), torch.randint(0, a, (5,), generator=g)] = True     # at least one masked per row
        masks.append(m)
    masks[2][1] = masks[2][0]                                                  # a repeated mask (run once)
    got, forwards, rows = likelihood.masked_log_likelihood(cfg, rt.weights, prompts, answers, masks, cfg_scale,
                                                           max_tokens=max_tokens)
    worst = 0.0
    for p, a, m, v in zip(prompts, answers, masks, got):
        ref = official_row_values(plain, cfg, p, a, m, cfg_scale)
        worst = max(worst, ((v - ref).abs() / ref.abs().clamp(min=1)).max().item())
    print(f"cfg {cfg_scale} max_tokens {max_tokens}: {forwards} forwards, {rows} rows, max rel err {worst:.2e}")
    assert worst < 1e-5
    assert (forwards > 1) == (max_tokens < 100)


def _official_counts(L, B, k):
    """The official forward_process counts: round(linspace(k, k + (B-1) L / B, B)), half to even, wrapped."""
    x = torch.round(torch.linspace(float(k), k + (B - 1) * (L / B), steps=B)).long()
    return ((x - 1) % L) + 1


@pytest.mark.parametrize("L,B", [(1, 16), (3, 16), (4, 16), (5, 32), (7, 3), (13, 16), (16, 16), (40, 16)])
def test_mask_counts_are_stratified_and_uniform(L, B):
    ks = torch.arange(1, L + 1)
    counts = likelihood.mask_counts(L, B, ks)                                 # (L, B)
    official = torch.stack([_official_counts(L, B, int(k)) for k in ks])
    ties = [b for b in range(B) if (2 * b * L) % (2 * B) == B]                # b * L / B ends in .5
    same = [b for b in range(B) if b not in ties]
    print(f"L={L} B={B}: tie rows {ties}")
    for b in range(B):                                                         # every row exactly uniform over k
        assert sorted(counts[:, b].tolist()) == list(range(1, L + 1)), b
    assert torch.equal(counts[:, same], official[:, same])                     # the official counts away from ties
    for b in ties if L > 1 else []:                                            # the official tie rows are not uniform
        assert sorted(official[:, b].tolist()) != list(range(1, L + 1)), b
    assert torch.equal(likelihood.mask_counts(L, B, ks, ties="official"), official)   # ties="official": every row


def test_ties_option_draws_the_official_counts_and_rejects_other_values():
    L, mc, B = 4, 64, 16
    m = likelihood.draw_masks(L, mc, B, torch.Generator().manual_seed(3), ties="official")
    for row in m.sum(1).reshape(mc // B, B):                                   # each group: the official spread
        assert torch.equal(row, _official_counts(L, B, int(row[0])))
    assert set(m.sum(1).reshape(mc // B, B)[:, 2].tolist()) <= {2, 4}       # the biased tie row (docstring example)
    for bad in ("even", None, "Official"):
        with pytest.raises(ValueError, match="ties must be one of 'uniform', 'official'"):
            likelihood.mask_counts(L, B, torch.tensor([1]), ties=bad)


def test_draw_masks_counts_and_reproducibility():
    L, mc, B = 6, 64, 16
    m = likelihood.draw_masks(L, mc, B, torch.Generator().manual_seed(1))
    again = likelihood.draw_masks(L, mc, B, torch.Generator().manual_seed(1))
    assert torch.equal(m, again) and m.shape == (mc, L) and m.dtype == torch.bool
    per_group = m.sum(1).reshape(mc // B, B)
    for row in per_group:                                                      # each group: one offset, official spread
        k = int(row[0])
        assert torch.equal(row, likelihood.mask_counts(L, B, torch.tensor([k]))[0])
    assert m.any(1).all()


def exact_bound(plain, cfg, prompt, answer):
    """E_{l ~ U{1..L}} (L / l) E_{|M| = l} sum_{j in M} log p(a_j | ...), enumerating every mask set (fp64)."""
    P, L = len(prompt), len(answer)
    seq = torch.tensor(prompt + answer)
    total = 0.0
    for l in range(1, L + 1):
        sets = list(itertools.combinations(range(L), l))
        acc = 0.0
        for s in sets:
            noisy = seq.clone()
            noisy[[P + j for j in s]] = cfg.mask_token_id
            lp = plain(noisy[None])[0].log_softmax(-1)
            acc += sum(lp[P + j, answer[j]].item() for j in s)
        total += (L / l) * acc / len(sets)
    return total / L


@pytest.mark.parametrize("answer", ["kxwq", "Paris", "zq"])
def test_estimate_matches_exact_bound(shipped, answer):
    """On the shipped model (real, peaked log-probabilities), 16 seeds of mc_num=256 (16 groups, so that each
    standard error has 15 degrees of freedom) land within a few standard errors of the enumerated bound, and the
    standard errors describe the spread (mean z^2 near 1)."""
    rt, plain = shipped
    prompt = rt.tokenizer.encode_chat("Reverse the string: qwxk" if answer == "kxwq" else
                                      "Which city is the capital of France?")
    ans = rt.tokenizer.encode(answer)
    exact = exact_bound(plain, rt.config, prompt, ans)
    zs = []
    for seed in range(16):
        r = rt.log_likelihood([prompt], [ans], mc_num=256, batch_size=16, seed=seed)
        zs.append((r.estimates[0] - exact) / r.stderrs[0])
    z2 = sum(z * z for z in zs) / len(zs)
    big = rt.log_likelihood([prompt], [ans], mc_num=2048, batch_size=16, seed=99)
    zbig = (big.estimates[0] - exact) / big.stderrs[0]
    print(f"{answer!r} L={len(ans)}: exact {exact:.4f}; mc 2048 {big.estimates[0]:.4f} +- {big.stderrs[0]:.4f} "
          f"(z {zbig:+.2f}); 16 seeds at mc 256: max |z| {max(map(abs, zs)):.2f}, mean z^2 {z2:.2f}")
    assert abs(zbig) < 4
    assert max(map(abs, zs)) < 5
    assert 0.25 < z2 < 3.0


def test_single_token_answer_is_exact(shipped):
    """L = 1: every row masks the one answer token, so the estimate is log p(a | prompt) exactly, with stderr 0."""
    rt, plain = shipped
    prompt = rt.tokenizer.encode_chat("Sort 3 1 2")
    r = rt.log_likelihood([prompt], [[rt.tokenizer.encode("1")[0]]], mc_num=32, batch_size=16)
    exact = exact_bound(plain, rt.config, prompt, rt.tokenizer.encode("1"))
    print("L=1:", r.estimates[0], exact, r.rows)
    assert abs(r.estimates[0] - exact) < 1e-4 and r.stderrs[0] == 0.0 and r.rows == 1


def test_estimate_independent_of_batch_and_order(tiny):
    rt, _ = tiny
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 90, (n,), generator=g).tolist() for n in (5, 11, 2, 8)]
    answers = [torch.randint(0, 90, (n,), generator=g).tolist() for n in (4, 2, 7, 3)]
    full = rt.log_likelihood(prompts, answers, mc_num=32, batch_size=8, seed=4)
    alone = [rt.log_likelihood([p], [a], mc_num=32, batch_size=8, seed=4).estimates[0]
             for p, a in zip(prompts, answers)]
    shuffled = rt.log_likelihood(prompts[::-1], answers[::-1], mc_num=32, batch_size=8, seed=4, max_tokens=64)
    err = max(abs(x - y) for x, y in zip(full.estimates, alone))
    err = max(err, max(abs(x - y) for x, y in zip(full.estimates, shuffled.estimates[::-1])))
    print("batch/order/packing differences:", err)
    assert err < 1e-5                           # float32 sums over other padded lengths; the draws are the same
    other = rt.log_likelihood(prompts, answers, mc_num=32, batch_size=8, seed=5)
    assert other.estimates != full.estimates                                   # the seed does change the draws


def test_texts_and_broadcast(shipped):
    rt, _ = shipped
    prompt = "Which city is the capital of France?"
    by_text = rt.log_likelihood(prompt, ["Paris", "Rome"], mc_num=32, chat=True)
    ids = rt.tokenizer.encode_chat(prompt)
    by_ids = rt.log_likelihood([ids, ids], [rt.tokenizer.encode("Paris"), rt.tokenizer.encode("Rome")], mc_num=32)
    print(by_text.estimates, by_ids.estimates)
    assert by_text.estimates == by_ids.estimates and by_text.answer_tokens == [5, 4]
    empty = rt.log_likelihood(ids, "", mc_num=32)
    assert empty.estimates == [0.0] and empty.rows == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(mc_num=24, batch_size=16), "multiple of batch_size"),
    (dict(mc_num=0), "mc_num must be a positive integer"),
    (dict(cfg_scale=-1.0), "cfg_scale"),
])
def test_bad_options(tiny, kwargs, match):
    rt, _ = tiny
    with pytest.raises(ValueError, match=match):
        rt.log_likelihood([[1, 2]], [[3]], **kwargs)


def test_bad_inputs(tiny):
    rt, _ = tiny
    cfg = rt.config
    with pytest.raises(ValueError, match="mask token"):
        rt.log_likelihood([[1, cfg.mask_token_id]], [[3]])
    with pytest.raises(ValueError, match="max_sequence_length"):
        rt.log_likelihood([[1] * cfg.max_sequence_length], [[3]])
    with pytest.raises(ValueError, match="2 prompts but 3 answers"):
        rt.log_likelihood([[1], [2]], [[3], [4], [5]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rt.log_likelihood([[1]], [[cfg.embedding_size + 3]])


@pytest.mark.parametrize("n,window,context", [(1, 8, 0), (24, 8, 0), (24, 10, 3), (25, 7, 6), (7, 7, 2)])
def test_rolling_windows_cover_once(n, window, context):
    wins = likelihood.rolling_windows(n, window, context)
    covered = [j for _, a0, a1 in wins for j in range(a0, a1)]
    print(n, window, context, wins)
    assert covered == list(range(n))
    for p0, a0, a1 in wins:
        assert a1 - p0 <= window and a0 - p0 == min(context, a0)


def test_rolling_equals_sum_of_windows(tiny):
    """A text's rolling estimate is the sum of log_likelihood over its windows (same draws: seeds follow content)."""
    rt, _ = tiny
    g = torch.Generator().manual_seed(8)
    texts = [torch.randint(0, 90, (n,), generator=g).tolist() for n in (23, 5, 40)]
    roll = rt.log_likelihood_rolling(texts, window=12, context=4, mc_num=32, batch_size=16, seed=1)
    for t, est, se, wins in zip(texts, roll.estimates, roll.stderrs, roll.windows):
        parts = rt.log_likelihood([t[p0:a0] for p0, a0, _ in wins], [t[a0:a1] for _, a0, a1 in wins], mc_num=32,
                                  batch_size=16, seed=1)
        print(len(t), len(wins), est, sum(parts.estimates))
        # the same draws; only float32 sums differ with the padded length of the forward a row shares
        assert math.isclose(est, sum(parts.estimates), rel_tol=1e-6)
        assert math.isclose(se, math.sqrt(sum(s * s for s in parts.stderrs)), rel_tol=1e-4)
    assert roll.tokens == [23, 5, 40]
    assert all(p > 1 for p in roll.perplexities)
    with pytest.raises(ValueError, match="context"):
        rt.log_likelihood_rolling(texts, window=8, context=8)
    with pytest.raises(ValueError, match="max_sequence_length"):
        rt.log_likelihood_rolling(texts, window=rt.config.max_sequence_length + 1)
