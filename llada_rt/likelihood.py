"""The Monte Carlo log-likelihood of a masked diffusion LM (ML-GSAI get_log_likelihood.py, LLADA.md 3.2), batched over
many (prompt, answer) pairs per forward, and the rolling log-likelihood (perplexity) of whole texts in windows.

The estimated quantity is LLaDA's lower bound on log p(answer | prompt), for an answer of L tokens:

    B = E_{l ~ U{1..L}} [ (L / l) * E_{M: l answer positions} [ sum_{j in M} log p(a_j | prompt, a masked at M) ] ]

One Monte Carlo sample is one row: a mask count l, a mask set M of that size (the prompt is never masked), one
forward, and (L / l) times the log-probabilities of the masked answer tokens, which is the official cross-entropy
divided by the mask ratio p_mask = l / L. mc_num rows are drawn in groups of batch_size rows; within a group the
counts are spread evenly over 1..L from one random offset (stratified, as the official forward_process), and each
row's mask set is drawn uniformly. The estimate is the mean over the mc_num rows.

Batching: the rows of many pairs are packed into one forward, left-padded to a common length with per-row key
ranges and positions (so a padded row computes what it computes alone), sorted by length to keep padding small, and
the LM head runs only on the answer columns. Which rows share a forward changes nothing but speed: every pair draws
its masks from its own generator, seeded from (seed, prompt ids, answer ids).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from typing import Sequence

import torch

from . import model, parallel
from .config import LLaDAConfig
from .weights import ModelWeights

# Tokens (rows x padded length) per forward; CFG doubles the rows. On the CPU a forward of ~2k tokens already keeps
# the cores busy, and larger ones run slower per token (their activations leave the caches: 32 held-out pairs of the
# shipped model take 1.5x longer at 16k than at 2k, bench_likelihood.py); on a GPU larger forwards fill the device,
# and LLaDA-8B's logits for 16k tokens stay a few GB.
MAX_TOKENS = {"cpu": 2048, "cuda": 16384}


def default_max_tokens(device: torch.device, prompts: Sequence[Sequence[int]] = (),
                       answers: Sequence[Sequence[int]] = ()) -> int:
    """MAX_TOKENS of the device, or the longest (prompt, answer) pair when that is longer (one pair per forward)."""
    longest = max((len(p) + len(a) for p, a in zip(prompts, answers)), default=0)
    return max(MAX_TOKENS.get(torch.device(device).type, MAX_TOKENS["cuda"]), longest)


@dataclasses.dataclass
class LikelihoodResult:
    """Runtime.log_likelihood's answer: per pair, the estimate of the bound on log p(answer | prompt) and its error."""
    estimates: list[float]       # per pair: mean over its mc_num rows (0.0 exactly for an empty answer)
    stderrs: list[float]         # per pair: standard error of that mean (see standard_error)
    answer_tokens: list[int]     # per pair: L
    mc_num: int
    batch_size: int              # rows per stratified group
    forwards: int                # model forwards run
    rows: int                    # sequences run (distinct masks of a pair run once; CFG rows counted twice)
    seconds: float


@dataclasses.dataclass
class RollingResult:
    """Runtime.log_likelihood_rolling's answer: per text, the sum of its windows' estimates."""
    estimates: list[float]                         # per text: estimate of log p(text), summed over its windows
    stderrs: list[float]                           # per text: sqrt of the summed window variances (independent draws)
    tokens: list[int]                              # per text: its number of tokens
    windows: list[list[tuple[int, int, int]]]      # per text: (prompt_start, answer_start, answer_end) per window
    forwards: int
    seconds: float

    @property
    def perplexities(self) -> list[float]:
        """Per text: exp(-estimate / tokens), the perplexity the bound implies (an upper bound's estimate)."""
        return [math.exp(-e / n) if n else float("nan") for e, n in zip(self.estimates, self.tokens)]


# How mask_counts rounds a tie: "uniform" (the default: every row's count exactly uniform over 1..L, so the estimate
# is unbiased for the bound) or "official" (get_log_likelihood.py's torch.round, half to even, biased at ties).
TIES = ("uniform", "official")


def check_ties(ties) -> None:
    """Raises ValueError naming the valid values unless ties is one of TIES."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {', '.join(map(repr, TIES))}, got {ties!r}")


def mask_counts(answer_len: int, batch_size: int, offset: torch.Tensor, ties: str = "uniform") -> torch.Tensor:
    """(G, batch_size) int64 masked-token counts of G stratified groups, from offsets (G,) in 1..answer_len.

    Row b of a group masks ((k - 1 + round(b * L / B)) mod L) + 1 tokens: the counts of a group are spread evenly
    over 1..L from the random offset k, as in the official forward_process. The official code rounds k + b * L / B
    with torch.round, half to even, so at a tie (b * L / B ending in .5, e.g. L = 4, B = 16, b = 2) the count depends
    on the parity of k and that row never masks an odd count (L = 4: only 2 or 4), which biases the estimate. With
    ties="uniform" (the default) the tie is rounded up once, independently of k, so that every row's count is exactly
    uniform over 1..L and the estimate is unbiased for the bound; away from ties the counts are the official ones.
    ties="official" gives the official counts exactly (its float32 linspace and torch.round), to reproduce numbers
    computed with get_log_likelihood.py.
    """
    check_ties(ties)
    L, B = answer_len, batch_size
    if ties == "official":
        x = torch.stack([torch.round(torch.linspace(float(k), k + (B - 1) * (L / B), steps=B)).long()
                         for k in offset.tolist()]) if offset.numel() else torch.empty(0, B, dtype=torch.int64)
        return ((x - 1) % L) + 1
    b = torch.arange(B, dtype=torch.int64)
    shift = (2 * b * L + B) // (2 * B)                                   # round(b * L / B), ties up, exact integers
    return (offset.to(torch.int64)[:, None] - 1 + shift[None, :]) % L + 1


def draw_masks(answer_len: int, mc_num: int, batch_size: int, generator: torch.Generator,
               ties: str = "uniform") -> torch.Tensor:
    """(mc_num, answer_len) bool: which answer positions each Monte Carlo row masks (CPU, from `generator`)."""
    groups = mc_num // batch_size
    offset = torch.randint(1, answer_len + 1, (groups,), generator=generator)
    counts = mask_counts(answer_len, batch_size, offset, ties).reshape(mc_num)     # (mc_num,)
    # the rank of each position in a uniformly random order: the `count` lowest ranks are a uniform subset
    ranks = torch.rand(mc_num, answer_len, generator=generator).argsort(1).argsort(1)
    return ranks < counts[:, None]


def pair_seed(seed: int, prompt: Sequence[int], answer: Sequence[int]) -> int:
    """A 63-bit seed from (seed, prompt, answer): a pair's draws never depend on the other pairs or their order."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(16, "little", signed=True))
    h.update(len(prompt).to_bytes(8, "little"))
    h.update(b"".join(int(t).to_bytes(4, "little") for t in prompt))
    h.update(b"".join(int(t).to_bytes(4, "little") for t in answer))
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def standard_error(values: torch.Tensor, batch_size: int) -> float:
    """Standard error of values.mean() for rows drawn in stratified groups of batch_size.

    With two or more groups: the spread of the group means (the groups are independent draws), which is exact for
    the stratified design. With one group: the spread of the rows as if independent (the rows of a group are
    negatively correlated by the stratification, so this usually overstates the error). One row: nan.
    """
    n = values.numel()
    groups = n // batch_size
    if groups >= 2:
        means = values.reshape(groups, batch_size).mean(1)
        return float(means.std(correction=1) / math.sqrt(groups))
    if n >= 2:
        return float(values.std(correction=1) / math.sqrt(n))
    return float("nan")


def _forward(cfg: LLaDAConfig, w: ModelWeights, tokens: torch.Tensor, positions: torch.Tensor,
             key_start: torch.Tensor, scored: torch.Tensor, backend: str) -> torch.Tensor:
    """Logits (M, V) of the scored positions (R, La) bool of the right-aligned answers (the last La columns) of the
    left-padded batch tokens (R, S), in row-major order: this module's one model call. The last layer attends from
    the answer columns only and runs its MLP and the LM head on the scored positions only (ForwardBatch.last_window):
    nothing else of it reaches a scored logit."""
    R, S = tokens.shape
    La = scored.shape[1]
    dev = tokens.device
    window = torch.arange(R, device=dev)[:, None] * S + (S - La) + torch.arange(La, device=dev)[None, :]   # (R, La)
    logit_window = scored.reshape(-1).nonzero()[:, 0]                                                    # (M,)
    fb = model.ForwardBatch(tokens, positions, key_start=key_start.to(torch.int32),
                            logit_rows=window.reshape(-1)[logit_window], last_window=window,
                            logit_window=logit_window)
    return model.forward_batch(cfg, w, fb, backend=backend)


def _target_log_probs(logits: torch.Tensor, uncond: torch.Tensor | None, targets: torch.Tensor,
                      cfg_scale: float, rows_per_pass: int = 2048, tp=None) -> torch.Tensor:
    """log_softmax(logits)[targets] in fp32 for logits (M, V) in any dtype, CFG-combined with uncond (M, V) when
    given, a slice of rows at a time so that an fp32 copy of LLaDA-8B's (M, 126464) logits never exists at once.
    tp: logits are this rank's vocabulary shard (M, V / size); the log-softmax is reduced across the group."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for a in range(0, logits.shape[0], rows_per_pass):
        part = logits[a:a + rows_per_pass].float()
        if uncond is not None:
            u = uncond[a:a + rows_per_pass].float()
            part = u + (cfg_scale + 1) * (part - u)
        if tp is not None:
            out[a:a + rows_per_pass] = parallel.log_softmax_at(tp, part, targets[a:a + rows_per_pass])
            continue
        out[a:a + rows_per_pass] = part.gather(1, targets[a:a + rows_per_pass, None])[:, 0] - part.logsumexp(-1)
    return out


def _check_ids(what: str, seqs: Sequence[Sequence[int]], cfg: LLaDAConfig) -> None:
    for i, s in enumerate(seqs):
        bad = [t for t in s if not 0 <= int(t) < cfg.embedding_size]
        if bad:
            raise ValueError(f"{what} {i}: token ids {bad[:5]} are outside the vocabulary [0, {cfg.embedding_size})")
        if cfg.mask_token_id in s:
            raise ValueError(f"{what} {i} contains the mask token (id {cfg.mask_token_id}); it must be known text")


def masked_log_likelihood(cfg: LLaDAConfig, w: ModelWeights, prompts: Sequence[Sequence[int]],
                          answers: Sequence[Sequence[int]], masks: Sequence[torch.Tensor], cfg_scale: float = 0.0,
                          max_tokens: int | None = None, backend: str = "ops",
                          unique_masks: bool = True) -> tuple[list[torch.Tensor], int, int]:
    """The packed core: per pair i, a float64 tensor (n_i,) with, for each row r of masks[i] (n_i, L_i) bool,
    (L_i / m_r) * sum_{j masked} log p(answer_j | prompt, answer masked at masks[i][r]), m_r = masks[i][r].sum() >= 1.

    cfg_scale > 0: classifier-free guidance, logits u + (s + 1)(c - u) with the unconditional row's prompt masked.
    unique_masks: run each distinct mask of a pair once (the values are the same; False runs every row, for the
    benchmark's attribution of the speedup). Returns (the per-pair tensors, forwards run, sequences run).
    """
    n_pairs = len(prompts)
    device = w.device
    if max_tokens is None:
        max_tokens = default_max_tokens(device, prompts, answers)
    order = sorted(range(n_pairs), key=lambda i: -(len(prompts[i]) + len(answers[i])))   # longest pairs first
    unique, inverse = [None] * n_pairs, [None] * n_pairs
    for i in order:
        m = masks[i]
        if m.dim() != 2 or m.shape[1] != len(answers[i]) or m.dtype != torch.bool:
            raise ValueError(f"masks[{i}] must be a bool tensor (rows, {len(answers[i])}), got {m.dtype} "
                             f"{tuple(m.shape)}")
        if m.shape[0] and not bool(m.any(1).all()):
            raise ValueError(f"masks[{i}]: every row must mask at least one answer token")
        # a row's value depends only on its mask, and short answers repeat masks often (L = 1: every row is the
        # same), so each distinct mask of a pair is run once
        unique[i], inverse[i] = torch.unique(m.cpu(), dim=0, return_inverse=True) if m.shape[0] and unique_masks \
            else (m.cpu(), None)
    masks = unique
    out = [torch.empty(masks[i].shape[0], dtype=torch.float64) for i in range(n_pairs)]
    per_row = 2 if cfg_scale > 0 else 1
    chunks: list[list[tuple[int, int, int]]] = []
    current, cur_rows, cur_len = [], 0, 0
    for i in order:                              # rows are packed greedily; the first pair of a chunk is its longest
        S = len(prompts[i]) + len(answers[i])
        r0, n = 0, masks[i].shape[0]
        while r0 < n:
            if not current:
                cur_len = S
            room = max(max_tokens // (cur_len * per_row) - cur_rows, 0)
            if room == 0 and current:
                chunks.append(current)
                current, cur_rows = [], 0
                continue
            take = min(n - r0, max(room, 1))
            current.append((i, r0, take))
            cur_rows += take
            r0 += take
    if current:
        chunks.append(current)

    for chunk in chunks:
        S = max(len(prompts[i]) + len(answers[i]) for i, _, _ in chunk)
        La = max(len(answers[i]) for i, _, _ in chunk)
        R = sum(n for _, _, n in chunk)
        tokens = torch.full((R, S), cfg.pad_token_id, dtype=torch.int64)
        is_prompt = torch.zeros(R, S, dtype=torch.bool)
        targets = torch.zeros(R, La, dtype=torch.int64)
        scored = torch.zeros(R, La, dtype=torch.bool)             # masked answer positions, right-aligned
        pads = torch.empty(R, dtype=torch.int64)
        row = 0
        for i, r0, n in chunk:
            p = torch.tensor(list(prompts[i]), dtype=torch.int64)
            a = torch.tensor(list(answers[i]), dtype=torch.int64)
            m = masks[i][r0:r0 + n]
            P, A = p.numel(), a.numel()
            pad = S - P - A
            tokens[row:row + n, pad:pad + P] = p
            tokens[row:row + n, S - A:] = torch.where(m, cfg.mask_token_id, a)
            is_prompt[row:row + n, pad:pad + P] = True
            targets[row:row + n, La - A:] = a
            scored[row:row + n, La - A:] = m
            pads[row:row + n] = pad
            row += n
        positions = (torch.arange(S)[None, :] - pads[:, None]).clamp_(min=0)
        key_start = pads.to(torch.int32)
        tokens, positions, key_start = tokens.to(device), positions.to(device), key_start.to(device)
        scored_d = scored.to(device)
        if cfg_scale > 0:
            uncond = tokens.masked_fill(is_prompt.to(device), cfg.mask_token_id)    # the prompt fully masked
            both = _forward(cfg, w, torch.cat([tokens, uncond]), torch.cat([positions] * 2),
                            torch.cat([key_start] * 2), torch.cat([scored_d] * 2), backend)
            sel, sel_u = both.chunk(2)                                                # (M, V) each, masked positions
        else:
            sel = _forward(cfg, w, tokens, positions, key_start, scored_d, backend)  # (M, V)
            sel_u = None
        lp = _target_log_probs(sel, sel_u, targets.to(device)[scored_d], cfg_scale, tp=w.tp)  # (M,)
        lp_rows = torch.zeros(R, La, dtype=torch.float64, device=device)
        lp_rows[scored_d] = lp.double()
        count = scored.sum(1).to(torch.float64)
        length = torch.tensor([len(answers[i]) for i, _, n in chunk for _ in range(n)], dtype=torch.float64)
        value = (lp_rows.sum(1).cpu() * length / count)                               # (R,) one sample per row
        row = 0
        for i, r0, n in chunk:
            out[i][r0:r0 + n] = value[row:row + n]
            row += n
    rows_run = sum(m.shape[0] for m in masks) * per_row
    return [o[inv] if inv is not None else o for o, inv in zip(out, inverse)], len(chunks), rows_run


def _check_options(mc_num: int, batch_size: int, cfg_scale: float, max_tokens: int) -> None:
    for name, v in (("mc_num", mc_num), ("batch_size", batch_size), ("max_tokens", max_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if mc_num % batch_size:
        raise ValueError(f"mc_num={mc_num} is not a multiple of batch_size={batch_size} (the rows of one stratified "
                         f"group); pass a batch_size that divides it, e.g. {math.gcd(mc_num, batch_size)}")
    if not cfg_scale >= 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale!r}")


def log_likelihood(cfg: LLaDAConfig, w: ModelWeights, prompts: Sequence[Sequence[int]],
                   answers: Sequence[Sequence[int]], mc_num: int = 128, batch_size: int = 16, cfg_scale: float = 0.0,
                   seed: int = 0, max_tokens: int | None = None, backend: str = "ops",
                   ties: str = "uniform") -> LikelihoodResult:
    """Monte Carlo estimate of the bound on log p(answer | prompt) for each pair of token-id lists (module doc).

    mc_num rows per pair in stratified groups of batch_size (the official defaults of get_log_likelihood.py);
    an empty answer has log-likelihood 0 exactly and runs nothing. max_tokens bounds rows x padded length per forward
    (None: MAX_TOKENS of the weights' device, or the longest pair). ties: how the stratified counts round a tie
    (mask_counts; "official" reproduces get_log_likelihood.py's biased rounding).
    """
    t0 = time.perf_counter()
    if max_tokens is None:
        max_tokens = default_max_tokens(w.device, prompts, answers)
    _check_options(mc_num, batch_size, cfg_scale, max_tokens)
    check_ties(ties)
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers; give one prompt per answer")
    _check_ids("prompt", prompts, cfg)
    _check_ids("answer", answers, cfg)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        if len(p) + len(a) > cfg.max_sequence_length:
            raise ValueError(f"pair {i}: prompt ({len(p)} tokens) plus answer ({len(a)}) is beyond the model's "
                             f"max_sequence_length of {cfg.max_sequence_length}; shorten the prompt")
        if len(p) + len(a) > max_tokens:
            raise ValueError(f"pair {i} has {len(p) + len(a)} tokens, more than max_tokens={max_tokens} per forward")
    keep = [i for i, a in enumerate(answers) if len(a)]
    masks = [draw_masks(len(answers[i]), mc_num, batch_size,
                        torch.Generator().manual_seed(pair_seed(seed, prompts[i], answers[i])), ties) for i in keep]
    with torch.inference_mode():
        values, forwards, rows = masked_log_likelihood(cfg, w, [prompts[i] for i in keep], [answers[i] for i in keep],
                                                 masks, cfg_scale, max_tokens, backend)
    est, se = [0.0] * len(answers), [0.0] * len(answers)
    for i, v in zip(keep, values):
        est[i] = float(v.mean())
        se[i] = standard_error(v, batch_size)
    return LikelihoodResult(estimates=est, stderrs=se, answer_tokens=[len(a) for a in answers], mc_num=mc_num,
                            batch_size=batch_size, forwards=forwards, rows=rows, seconds=time.perf_counter() - t0)


def rolling_windows(n_tokens: int, window: int, context: int) -> list[tuple[int, int, int]]:
    """(prompt_start, answer_start, answer_end) per window of a text of n_tokens tokens.

    The answers are consecutive spans of window - context tokens (the last one shorter) covering the text once; each
    is conditioned on the (up to) `context` tokens just before it, so no forward holds more than `window` tokens.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if isinstance(context, bool) or not isinstance(context, int) or not 0 <= context < window:
        raise ValueError(f"context must be an integer in [0, window={window}), got {context!r}")
    stride = window - context
    return [(max(0, s - context), s, min(s + stride, n_tokens)) for s in range(0, n_tokens, stride)]


def log_likelihood_rolling(cfg: LLaDAConfig, w: ModelWeights, texts: Sequence[Sequence[int]],
                           window: int | None = None, context: int = 0, mc_num: int = 128, batch_size: int = 16,
                           seed: int = 0, max_tokens: int | None = None, backend: str = "ops",
                           ties: str = "uniform") -> RollingResult:
    """Estimate of log p(text) for whole texts: the sum over the text's windows (rolling_windows) of the window's
    Monte Carlo estimate of log p(answer span | context before it). window defaults to the model's
    max_sequence_length; with context 0 the windows are disjoint and each is estimated unconditionally."""
    t0 = time.perf_counter()
    window = cfg.max_sequence_length if window is None else window
    if isinstance(window, int) and window > cfg.max_sequence_length:
        raise ValueError(f"window={window} is beyond the model's max_sequence_length of {cfg.max_sequence_length}")
    all_windows = [rolling_windows(len(t), window, context) for t in texts]
    prompts, answers, owner = [], [], []
    for ti, (t, wins) in enumerate(zip(texts, all_windows)):
        for p0, a0, a1 in wins:
            prompts.append(list(t[p0:a0]))
            answers.append(list(t[a0:a1]))
            owner.append(ti)
    res = log_likelihood(cfg, w, prompts, answers, mc_num, batch_size, 0.0, seed, max_tokens, backend, ties)
    est, var = [0.0] * len(texts), [0.0] * len(texts)
    for ti, e, s in zip(owner, res.estimates, res.stderrs):
        est[ti] += e
        var[ti] += s * s
    return RollingResult(estimates=est, stderrs=[math.sqrt(v) for v in var], tokens=[len(t) for t in texts],
                         windows=all_windows, forwards=res.forwards, seconds=time.perf_counter() - t0)
