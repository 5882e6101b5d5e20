"""Pure-PyTorch fp32 (fp64 where it matters) twins of every llada_rt.ops function, same signatures: the test oracle."""
from __future__ import annotations

import torch


# ---- Philox, confidence, remask ------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mulhilo32(a: torch.Tensor, m: int):
    """(lo, hi) 32-bit words of a * m for int64 tensors a in [0, 2**32) and a constant m < 2**32, without overflow."""
    t = a * (m >> 16)            # < 2**48
    s = a * (m & 0xFFFF) + ((t & 0xFFFF) << 16)
    return s & _M32, ((t >> 16) + (s >> 32)) & _M32


def philox_uniform(seed: int, offset: int, rows, cols) -> torch.Tensor:
    """Philox4x32-10 uniform in (0, 1) per (row, col), bit-exact with csrc/philox.h: rows/cols int64 tensors
    (broadcastable) -> float32 tensor of their broadcast shape."""
    rows, cols = torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
    rows, cols = torch.broadcast_tensors(rows, cols)
    c0, c1 = cols & _M32, rows & _M32
    c2 = torch.full_like(c0, offset & _M32)
    c3 = torch.full_like(c0, (offset >> 32) & _M32)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        lo0, hi0 = _mulhilo32(c0, 0xD2511F53)
        lo1, hi1 = _mulhilo32(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return ((c0 >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


RANDOM_CONFIDENCE_COLUMN = 0xFFFFFFFF   # kRandomConfidenceColumn in csrc/philox.h


def confidence_keys(logits: torch.Tensor, *, temperature: float = 0.0, seed: int = 0, offset: int = 0,
                    suppress_ids=()) -> torch.Tensor:
    """The argmax keys of `confidence` in fp64: logits (B, N, V) + temperature * Gumbel(Philox), suppressed ids -inf."""
    B, N, V = logits.shape
    key = logits.to(torch.float64)                                               # (B, N, V)
    if temperature > 0:
        rows = torch.arange(B * N, dtype=torch.int64).view(B, N, 1)
        u = philox_uniform(seed, offset, rows, torch.arange(V, dtype=torch.int64)).to(torch.float64)
        key = key + temperature * -torch.log(-torch.log(u.to(logits.device)))
    if len(suppress_ids):
        key[..., list(suppress_ids)] = float("-inf")
    return key


def confidence(logits: torch.Tensor, masked: torch.Tensor, *, temperature: float = 0.0, seed: int = 0, offset: int = 0,
               random_confidence: bool = False, suppress_ids=(), zero_conf_ids=()):
    """Reference of ops.confidence: logits (B, N, V), masked bool (B, N) -> token int64 (B, N), prob float32 (B, N)."""
    B, N, V = logits.shape
    key = confidence_keys(logits, temperature=temperature, seed=seed, offset=offset, suppress_ids=suppress_ids)
    token = key.argmax(-1)                                                       # (B, N), first maximum on ties
    dead = ~(key.amax(-1) > float("-inf"))                                       # every key -inf: no finite choice
    lowest = min(set(range(len(suppress_ids) + 1)) - set(suppress_ids))          # lowest id that is not suppressed
    token = torch.where(dead, torch.full_like(token, lowest), token)
    soft = logits.to(torch.float64)                                              # (B, N, V)
    excluded = list(suppress_ids) + list(zero_conf_ids)
    if excluded:
        soft = soft.clone()
        soft[..., excluded] = float("-inf")
    prob = torch.softmax(soft, -1).gather(-1, token[..., None])[..., 0]          # (B, N); zero-conf token -> 0
    prob = torch.where(dead, torch.zeros_like(prob), prob.nan_to_num(0.0))
    if random_confidence:
        rows = torch.arange(B * N, dtype=torch.int64).view(B, N)
        prob = philox_uniform(seed, offset, rows, RANDOM_CONFIDENCE_COLUMN).to(prob.device, torch.float64)
    token = torch.where(masked, token, torch.full_like(token, -1))
    prob = torch.where(masked, prob, torch.full_like(prob, float("-inf")))
    return token, prob.to(torch.float32)


def remask_order(canvas: torch.Tensor, prob: torch.Tensor, *, start: int, mask_id: int):
    """Block positions (B, N) ranked as remask ranks them: masked first, by descending prob, ties to the lower
    position; also returns masked (B, N) and the sorted probs (B, N)."""
    B, N = prob.shape
    masked = canvas[:, start:start + N] == mask_id                               # (B, N)
    conf = torch.where(masked & ~prob.isnan(), prob, float("-inf"))
    order = torch.argsort(conf, dim=1, descending=True, stable=True)             # (B, N)
    order = order.gather(1, torch.argsort((~masked.gather(1, order)).to(torch.int8), dim=1, stable=True))
    return order, masked, conf.gather(1, order)


def remask(canvas: torch.Tensor, token: torch.Tensor, prob: torch.Tensor, *, start: int, mask_id: int,
           k: torch.Tensor | None = None, rule: str = "topk", threshold: float = 0.9, factor: float = 1.0):
    """Reference of ops.remask: commits into canvas (B, T) in place, returns count int32 (B,)."""
    B, N = token.shape
    order, masked, sorted_conf = remask_order(canvas, prob, start=start, mask_id=mask_id)
    m = masked.sum(1)                                                            # (B,) masked positions per row
    rank = torch.arange(N, device=canvas.device).expand(B, N)                    # (B, N)
    if rule == "topk":
        count = torch.minimum(k.clamp(min=0), m)
    elif rule == "threshold":
        passed = (sorted_conf >= threshold) & (rank < m[:, None])
        count = torch.maximum(passed.sum(1), m.clamp(max=1))
    elif rule == "factor":
        # Fast-dLLM get_transfer_index_dynamic, including its top_i quirk (see csrc/cpu/remask.cpp), in fp32.
        thr = 1.0 - torch.tensor(factor, dtype=torch.float32) / (rank + 2).to(torch.float32)
        fails = (sorted_conf < thr) & (rank >= 1) & (rank < m[:, None])
        top_i = torch.where(fails.any(1), fails.to(torch.int8).argmax(1), m - 1)
        top_i = torch.where((top_i == 0) | (top_i == m - 1), top_i + 1, top_i)
        count = torch.where(m > 0, top_i, torch.zeros_like(top_i))
    else:
        raise ValueError(f"unknown remask rule {rule!r}")
    commit = torch.zeros_like(masked).scatter(1, order, rank < count[:, None])  # (B, N)
    blk = canvas[:, start:start + N]
    canvas[:, start:start + N] = torch.where(commit, token, blk)
    return count.to(torch.int32)


# ---- attention -----------------------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor | None = None,
              key_end: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Bidirectional attention in fp32: q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D), keys [key_start[b], key_end[b]) of row b
    valid (None: 0 and Lk) -> o (B, Lq, Hq, D) in q's dtype; a row with no valid key outputs zeros."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    kf = k.float().repeat_interleave(Hq // Hkv, dim=2)                             # (B, Lk, Hq, D)
    vf = v.float().repeat_interleave(Hq // Hkv, dim=2)                             # (B, Lk, Hq, D)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale                     # (B, Hq, Lq, Lk)
    pos = torch.arange(Lk, device=q.device)
    start = torch.zeros(B, dtype=torch.int64, device=q.device) if key_start is None else key_start.to(q.device).long()
    end = torch.full((B,), Lk, dtype=torch.int64, device=q.device) if key_end is None else key_end.to(q.device).long()
    valid = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])      # (B, Lk)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)                       # all keys masked: avoid inf - inf
    p = torch.exp(s - m)                                                           # (B, Hq, Lq, Lk)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.einsum("bhqk,bkhd->bqhd", p, vf).to(q.dtype)


# ---- linear --------------------------------------------------------------------------------------------------------

def linear(x: torch.Tensor, w, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ops.linear in fp32: x (..., K) @ w.dense()^T -> (..., N) in x's dtype (int8 weights dequantised);
    differentiable: for fp32 x and dense fp32 weights this is F.linear on the held tensor itself (training)."""
    y = torch.nn.functional.linear(x.float(), w.dense().float()).to(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out
