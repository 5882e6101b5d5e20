"""Pure-PyTorch fp32 (fp64 where it matters) twins of every llada_rt.ops function, same signatures: the test oracle."""
from __future__ import annotations

import math

import torch

from . import ops


# ---- Philox, confidence, remask ------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
LOG2E = 1.4426950408889634


def _mulhilo32(a: torch.Tensor, m: int):
    """(lo, hi) 32-bit words of a * m for int64 tensors a in [0, 2**32) and a constant m < 2**32, without overflow."""
    t = a * (m >> 16)            # < 2**48
    s = a * (m & 0xFFFF) + ((t & 0xFFFF) << 16)
    return s & _M32, ((t >> 16) + (s >> 32)) & _M32


def philox_uniform(seed, offset, position, column) -> torch.Tensor:
    """Philox4x32-10 uniform in (0, 1), bit-exact with csrc/philox.h: key seed, counter (column, low 32 bits of
    position, offset low / high words); each argument an int or an int64 tensor (broadcast together) -> float32 tensor
    of the broadcast shape."""
    device = next((x.device for x in (seed, offset, position, column) if isinstance(x, torch.Tensor)), None)
    seed, offset, position, column = torch.broadcast_tensors(
        *(torch.as_tensor(x, dtype=torch.int64, device=device) for x in (seed, offset, position, column)))
    c0, c1 = column & _M32, position & _M32
    c2, c3 = offset & _M32, (offset >> 32) & _M32
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        lo0, hi0 = _mulhilo32(c0, 0xD2511F53)
        lo1, hi1 = _mulhilo32(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return ((c0 >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


RANDOM_CONFIDENCE_COLUMN = 0xFFFFFFFF   # kRandomConfidenceColumn in csrc/philox.h
REF_NONE = -(1 << 30)                   # kRefNone in csrc/confidence.h


def special_mask(special_ids, mask: torch.Tensor, vocab_offset: int, V: int) -> torch.Tensor:
    """(B, V) bool: local id c of row b is special_ids[i] with bit i of mask[b] (int32 (B,)) set."""
    out = torch.zeros(mask.shape[0], V, dtype=torch.bool, device=mask.device)
    for i, sid in enumerate(special_ids):
        if 0 <= sid - vocab_offset < V:
            out[:, sid - vocab_offset] |= ((mask >> i) & 1).bool()
    return out


def confidence_keys(logits: torch.Tensor, *, temperature: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                    position: torch.Tensor, special_ids, suppress_mask: torch.Tensor,
                    vocab_offset: int = 0) -> torch.Tensor:
    """The argmax keys of `confidence` in fp64: logits (B, N, V) + temperature[b] * Gumbel(Philox of (seed[b],
    position[b] + n, offset[b]) at column vocab_offset + c) where temperature[b] > 0; suppressed ids -inf."""
    B, N, V = logits.shape
    dev = logits.device
    key = logits.to(torch.float64)                                               # (B, N, V)
    noisy = temperature > 0                                                      # (B,)
    # on the CPU a host read is free and skips the draws when no row is noisy; elsewhere no sync: always drawn
    if logits.device.type != "cpu" or bool(noisy.any()):
        n = torch.arange(N, device=logits.device)
        u = philox_uniform(seed[:, None, None], offset[:, None, None], position[:, None, None] + n[None, :, None],
                           vocab_offset + torch.arange(V, device=logits.device)).to(torch.float64)  # (B, N, V)
        noisy_key = key + temperature.to(torch.float64)[:, None, None] * -torch.log(-torch.log(u))
        key = torch.where(noisy[:, None, None], noisy_key, key)
    suppressed = special_mask(special_ids, suppress_mask, vocab_offset, V)      # (B, V)
    return key.masked_fill(suppressed[:, None, :], float("-inf"))


def _random_prob(seed, offset, position, N: int) -> torch.Tensor:
    """(B, N) float64: the Philox uniform of (b, n) at RANDOM_CONFIDENCE_COLUMN."""
    n = torch.arange(N, device=position.device)
    return philox_uniform(seed[:, None], offset[:, None], position[:, None] + n[None, :],
                          RANDOM_CONFIDENCE_COLUMN).to(torch.float64)


def _confidence_pass(logits, temperature, seed, offset, position, special_ids, suppress_mask, zero_conf_mask,
                     vocab_offset, no_token: int):
    """fp64 keys, local token (dead rows: lowest id not suppressed, else no_token) and the softmax logits (B, N, V)."""
    B, N, V = logits.shape
    key = confidence_keys(logits, temperature=temperature, seed=seed, offset=offset, position=position,
                          special_ids=special_ids, suppress_mask=suppress_mask, vocab_offset=vocab_offset)
    token = key.argmax(-1)                                                       # (B, N), first maximum on ties
    dead = ~(key.amax(-1) > float("-inf"))                                       # every key -inf: no finite choice
    suppressed = special_mask(special_ids, suppress_mask, vocab_offset, V)      # (B, V)
    lowest = torch.where((~suppressed).any(-1), (~suppressed).to(torch.int8).argmax(-1), no_token)  # (B,)
    token = torch.where(dead, lowest[:, None].expand(B, N), token)
    excluded = suppressed | special_mask(special_ids, zero_conf_mask, vocab_offset, V)
    soft = logits.to(torch.float64).masked_fill(excluded[:, None, :], float("-inf"))  # (B, N, V)
    return key, token, dead, soft


def confidence(logits: torch.Tensor, masked: torch.Tensor, *, temperature: torch.Tensor, seed: torch.Tensor,
               offset: torch.Tensor, position: torch.Tensor, random_confidence: torch.Tensor, special_ids,
               suppress_mask: torch.Tensor, zero_conf_mask: torch.Tensor, vocab_offset: int = 0, out=None):
    """Reference of ops.confidence (fp64 softmax): logits (B, N, V), masked bool (B, N) -> token int64 (B, N),
    prob float64 (B, N), written into out = (token, prob) when given."""
    B, N, V = logits.shape
    _, token, dead, soft = _confidence_pass(logits, temperature, seed, offset, position, special_ids, suppress_mask,
                                            zero_conf_mask, vocab_offset, no_token=0)
    prob = torch.softmax(soft, -1).gather(-1, token[..., None])[..., 0]          # (B, N); zero-conf token -> 0
    prob = torch.where(dead, torch.zeros_like(prob), prob.nan_to_num(0.0))
    prob = torch.where(random_confidence[:, None], _random_prob(seed, offset, position, N), prob)
    token = torch.where(masked, token + vocab_offset, torch.full_like(token, -1))
    prob = torch.where(masked, prob, torch.full_like(prob, float("-inf")))
    if out is None:
        return token, prob
    out[0].copy_(token)
    out[1].copy_(prob)
    return out


def confidence_partial(logits: torch.Tensor, masked: torch.Tensor, *, temperature: torch.Tensor, seed: torch.Tensor,
                       offset: torch.Tensor, position: torch.Tensor, random_confidence: torch.Tensor, special_ids,
                       suppress_mask: torch.Tensor, zero_conf_mask: torch.Tensor, vocab_offset: int, full_vocab: int,
                       out=None):
    """Reference of ops.confidence_partial in fp64: one shard's ops.ConfidenceState, fields (B, N)."""
    B, N, V = logits.shape
    key, token, dead, soft = _confidence_pass(logits, temperature, seed, offset, position, special_ids,
                                              suppress_mask, zero_conf_mask, vocab_offset,
                                              no_token=full_vocab - vocab_offset)
    best_key = torch.where(dead, float("-inf"), key.amax(-1))                   # (B, N)
    m = soft.amax(-1)                                                            # (B, N)
    has = m > float("-inf")
    m0 = torch.where(has, m, 0.0)
    ref = torch.where(has, torch.round(m0 * LOG2E), float(REF_NONE))           # any integer would do
    shift = m0 - ref * math.log(2.0)                  # 2^(x log2 e - ref) = e^(x - m0 + shift)
    denom = torch.where(has, torch.exp(soft - m0[..., None]).sum(-1) * torch.exp(shift), 0.0)
    at_token = soft.gather(-1, token.clamp(max=V - 1)[..., None])[..., 0]       # -inf: zero-conf, suppressed or dead
    num = torch.where(has & ~dead & (token < V), torch.exp(at_token - m0 + shift), 0.0)
    num = torch.where(random_confidence[:, None], 0.0, num)
    denom = torch.where(random_confidence[:, None], 0.0, denom)
    ref = torch.where(random_confidence[:, None], float(REF_NONE), ref)
    random_prob = torch.where(random_confidence[:, None], _random_prob(seed, offset, position, N), -1.0)
    state = (torch.where(masked, best_key, float("-inf")), torch.where(masked, token + vocab_offset, -1),
             torch.where(masked, num, 0.0), torch.where(masked, ref, float(REF_NONE)).to(torch.int32),
             torch.where(masked, denom, 0.0), torch.where(masked, random_prob, -1.0))
    if out is None:
        return ops.ConfidenceState(*state)
    for o, s in zip(out, state):
        o.copy_(s)
    return out


def remask_order(block: torch.Tensor, prob: torch.Tensor, *, mask_id: int):
    """Block positions (B, N) ranked as remask ranks them: masked first, by descending prob, ties to the lower
    position; also returns masked (B, N) and the sorted probs (B, N)."""
    masked = block == mask_id                                                    # (B, N)
    conf = torch.where(masked & ~prob.isnan(), prob, float("-inf"))
    order = torch.argsort(conf, dim=1, descending=True, stable=True)             # (B, N)
    order = order.gather(1, torch.argsort((~masked.gather(1, order)).to(torch.int8), dim=1, stable=True))
    return order, masked, conf.gather(1, order)


def remask(block: torch.Tensor, token: torch.Tensor, prob: torch.Tensor, *, mask_id: int, k: torch.Tensor,
           rule: torch.Tensor, threshold: torch.Tensor, factor: torch.Tensor, out: torch.Tensor | None = None):
    """Reference of ops.remask: commits into block (B, N) in place, every row with its own rule; returns count int32
    (B,) (-1 for a rule code that is not one), written into out when given."""
    B, N = token.shape
    order, masked, sorted_conf = remask_order(block, prob, mask_id=mask_id)
    m = masked.sum(1)                                                            # (B,) masked positions per row
    rank = torch.arange(N, device=block.device).expand(B, N)                     # (B, N)
    topk = torch.minimum(k.clamp(min=0), m)
    passed = (sorted_conf >= threshold[:, None]) & (rank < m[:, None])
    by_threshold = torch.maximum(passed.sum(1), m.clamp(max=1))
    # Fast-dLLM get_transfer_index_dynamic, including its top_i quirk (see csrc/cpu/remask.cpp), in float64
    thr = 1.0 - factor[:, None] / (rank + 2).to(torch.float64)
    fails = (sorted_conf < thr) & (rank >= 1) & (rank < m[:, None])
    top_i = torch.where(fails.any(1), fails.to(torch.int8).argmax(1), m - 1)
    top_i = torch.where((top_i == 0) | (top_i == m - 1), top_i + 1, top_i)
    by_factor = torch.where(m > 0, top_i, torch.zeros_like(top_i))
    count = torch.where(rule == 0, topk, torch.where(rule == 1, by_threshold,
                                                     torch.where(rule == 2, by_factor, torch.full_like(m, -1))))
    commit = torch.zeros_like(masked).scatter(1, order, rank < count[:, None])  # (B, N)
    block.copy_(torch.where(commit, token, block))
    count = count.to(torch.int32)
    if out is None:
        return count
    out.copy_(count)
    return out


# ---- attention -----------------------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor | None = None,
              key_end: torch.Tensor | None = None, scale: float | None = None, kv_rows: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Bidirectional attention in fp32 (differentiable): q (B, Lq, Hq, D), k/v (R, Lk, Hkv, D) with q row b reading
    k/v row kv_rows[b] (None: row b), keys [key_start[b], key_end[b]) valid (None: 0 and Lk) -> o (B, Lq, Hq, D) in q's
    dtype; a row with no valid key outputs zeros."""
    B, Lq, Hq, D = q.shape
    if kv_rows is not None:
        k, v = k[kv_rows.to(k.device).long()], v[kv_rows.to(v.device).long()]
    Lk, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    pos = torch.arange(Lk, device=q.device)
    start = torch.zeros(B, dtype=torch.int64, device=q.device) if key_start is None else key_start.to(q.device).long()
    end = torch.full((B,), Lk, dtype=torch.int64, device=q.device) if key_end is None else key_end.to(q.device).long()
    valid = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])      # (B, Lk)
    kf = k.float().repeat_interleave(Hq // Hkv, dim=2)                             # (B, Lk, Hq, D)
    vf = v.float().repeat_interleave(Hq // Hkv, dim=2)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2), attn_mask=valid[:, None, None, :],
        scale=scale).transpose(1, 2)                                               # (B, Lq, Hq, D)
    o = torch.where(valid.any(1)[:, None, None, None], o, torch.zeros_like(o))     # no valid key: zeros, not NaN
    o = o.to(q.dtype)
    if out is not None:
        return out.copy_(o)
    return o


# ---- the model's per-layer ops -----------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """LLaDA's RMSNorm: normalise in fp32, cast back to x's dtype, then multiply by the weight (in x's dtype)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return out.copy_(y) if out is not None else y


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool = True,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, S, H, D) rotated NeoX-style (rotate_half: (x1, x2) -> (-x2, x1)) by the table rows cos/sin (P, D/2) of
    positions (B, S); in fp32 when full_precision, else in x's dtype. out may be x itself."""
    c = cos[positions][:, :, None, :]                                              # (B, S, 1, D/2)
    s_ = sin[positions][:, :, None, :]
    c, s_ = torch.cat([c, c], -1), torch.cat([s_, s_], -1)                         # (B, S, 1, D)
    t = x.float() if full_precision else x
    x1, x2 = t.chunk(2, dim=-1)
    y = (t * c.to(t.dtype) + torch.cat([-x2, x1], dim=-1) * s_.to(t.dtype)).to(x.dtype)
    return out.copy_(y) if out is not None else y


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(M, 2F) -> silu(gate_up[:, :F]) * gate_up[:, F:] (M, F), rounded as torch rounds it in the input dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch.nn.functional.silu(gate) * up
    return out.copy_(y) if out is not None else y


# ---- engine bookkeeping ------------------------------------------------------------------------------------------

ADVANCE_BLOCK_DONE, ADVANCE_DONE, ADVANCE_EARLY = 1, 2, 4   # status bits written by advance


def advance(status, canvas, slots, block_start, step, nsteps, k, spb, prompt_len, length, rule, early_stop, filled, *,
            block_length: int, mask_id: int, fill_id: int, stop_ids=(), skip_slot: int = -1) -> None:
    """Reference of ops.advance: after a denoising step of the rows `slots` (B,), moves each row's counters on (all
    per-slot tensors (R,), canvas (R, T), updated in place): step += 1, nsteps += 1; the block is done after spb steps
    (rule 0, the fixed schedule) or once it has no mask or has had block_length steps (threshold/factor); then
    block_start += block_length and step = 0. A row is done when its last block is done, or, with early_stop, as
    soon as a stop id is committed and every position before the first one is committed: everything after that stop
    id becomes fill_id (filled counts the masks so overwritten). k = the fixed schedule's commits for the next step.
    status[slot] = ADVANCE_BLOCK_DONE | ADVANCE_DONE | ADVANCE_EARLY (done by early stop) bits. Rows whose slot is
    skip_slot (the engine's scratch row, padding of CUDA-graph buckets) are left alone."""
    N = block_length
    T = canvas.shape[1]
    cols = torch.arange(T, device=canvas.device)
    stops = torch.tensor(list(stop_ids), dtype=canvas.dtype, device=canvas.device)
    for s in slots.tolist():
        if s == skip_slot:
            continue
        step[s] += 1
        nsteps[s] += 1
        bs, L, P = int(block_start[s]), int(length[s]), int(prompt_len[s])
        row = canvas[s]
        n_masked = int((row[bs:bs + N] == mask_id).sum())
        if int(rule[s]) == 0:
            block_done = int(step[s]) >= int(spb[s])
        else:
            block_done = n_masked == 0 or int(step[s]) >= N
        done = early = False
        if bool(early_stop[s]):
            is_stop = torch.isin(row, stops) & (cols >= P) & (cols < L)
            if bool(is_stop.any()):
                f = int(is_stop.int().argmax())
                if not bool((row[P:f] == mask_id).any()):
                    done = early = True
                    filled[s] = int((row[f + 1:L] == mask_id).sum())
                    row[f + 1:L] = fill_id
        if block_done:
            block_start[s] = bs + N
            step[s] = 0
            done = done or bs + N >= L
        sp = int(spb[s])
        k[s] = N // sp + (1 if int(step[s]) < N % sp else 0)
        status[s] = (ADVANCE_DONE if done else 0) | (ADVANCE_BLOCK_DONE if block_done else 0) | \
            (ADVANCE_EARLY if early else 0)
# ---- linear --------------------------------------------------------------------------------------------------------

def linear(x: torch.Tensor, w, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ops.linear in fp32: x (..., K) @ w.dense()^T -> (..., N) in x's dtype (int8 weights dequantised);
    differentiable: for fp32 x and dense fp32 weights this is F.linear on the held tensor itself (training)."""
    y = torch.nn.functional.linear(x.float(), w.dense().float()).to(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


def quantize_rows(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations as the CPU int8 kernels use them: each row of x (..., K) symmetric, scale = max |x| / qmax
    (fp32), q = round(x * (qmax / max |x|)) half to even in [-qmax, qmax] (32767: blocked_int8, 127: blocked_int8x4);
    an all-zero row gets scale 0 and q 0. -> (q as float64 (..., K), scale float64 (..., 1)); x ~ q * scale."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)                                        # (..., 1) fp32
    # qmax / amax as a true fp32 division, as the kernel does (torch's `qmax / amax` multiplies by 1 / amax instead,
    # which differs in the last bit a quarter of the time and then moves some q by one)
    inv = torch.where(amax > 0, torch.full_like(amax, qmax) / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv).clamp(-qmax, qmax)
    return q.double(), (amax / qmax).double()


