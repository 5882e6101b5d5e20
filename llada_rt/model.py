"""The LLaDA network as one forward function over a per-forward batch description (ForwardBatch)."""
from __future__ import annotations

import dataclasses

import torch

from . import parallel, reference
from .config import LLaDAConfig
from .weights import ModelWeights
from .workspace import Workspace, scratch


@dataclasses.dataclass
class RopeTable:
    """cos, sin (P, D/2) fp32 of RoPE positions 0..P-1 (NeoX layout: the halves of D share these frequencies)."""
    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def build(cls, cfg: LLaDAConfig, n_positions: int, device: torch.device) -> "RopeTable":
        D = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
        freqs = torch.arange(n_positions, device=device, dtype=torch.float32)[:, None] * inv_freq   # (P, D/2)
        return cls(freqs.cos(), freqs.sin())

    @property
    def n_positions(self) -> int:
        return self.cos.shape[0]


@dataclasses.dataclass
class ForwardBatch:
    """What one forward computes, shared by all layers: B rows of S query columns (all device tensors).

    pack: when rows have different lengths, the flat indices into B * S of the query columns that are real (Q of
    them, in order); the token-wise work (embedding, norms, linears, RoPE, MLP) then runs on those Q rows only and
    just the attention sees the padded (B, S) layout, so padding costs no linear-layer work. "Query rows" below are
    the Q packed rows when pack is given, else the B * S columns.

    attn_segments: the attention's padded layout as consecutive segments of rows, each (rows, width), instead of one
    (B, S): rows whose windows differ much in width (a refresh beside cached steps) then attend in their own
    rectangles, not all at the widest; attn_pack (Q,) gives each packed query row's index in that layout. Host ints,
    so a forward with segments has the shapes of its segments.

    last_window / logit_window: the last layer computes K/V for every query row (they are keys, and cache entries)
    but its attention only for the L query rows last_window[b] of each row and its output projection and MLP only for
    the M logit rows (last_window.view(-1)[logit_window] == logit_rows): nothing else of the last layer reaches the
    logits. The engine passes each row's block.
    """
    tokens: torch.Tensor                       # (B, S) int64 query tokens
    positions: torch.Tensor                    # (B, S) int64 RoPE positions (rows of the RopeTable)
    key_end: torch.Tensor | None = None        # (B,) int32: keys [key_start, key_end) of each row are valid (None: S)
    key_start: torch.Tensor | None = None      # (B,) int32 (None: 0)
    logit_rows: torch.Tensor | None = None     # (M,) int64 indices of the query rows that get logits
    write_index: torch.Tensor | None = None    # (query rows,) int64 flat cache index (row * T + column) of each
    pack: torch.Tensor | None = None           # (Q,) int64 flat indices into B * S of the real query columns
    kv_rows: torch.Tensor | None = None        # (B,) int32 cache row of each batch row, when cache_read
    cache_read: bool = False                   # attend over the cache rows (after the write), not the fresh K/V
    attn_segments: tuple | None = None         # ((rows, width), ...) summing to B rows, with pack (None: ((B, S),))
    attn_pack: torch.Tensor | None = None      # (Q,) int64 indices of the packed rows in the segments' layout
    last_window: torch.Tensor | None = None    # (B, L) int64 query rows of each row that contain its logit rows
    logit_window: torch.Tensor | None = None   # (M,) int64 index into B * L of each logit row (with last_window)

    @classmethod
    def full(cls, tokens: torch.Tensor, positions: torch.Tensor | None = None, key_start: torch.Tensor | None = None,
             rows: slice | None = None) -> "ForwardBatch":
        """An uncached forward over every column of tokens (B, S); logits for the columns `rows` (all when None)."""
        B, S = tokens.shape
        dev = tokens.device
        if positions is None:
            positions = torch.arange(S, device=dev).expand(B, S)
        logit_rows = None
        if rows is not None:
            cols = torch.arange(S, device=dev)[rows]                              # (R,)
            logit_rows = (torch.arange(B, device=dev)[:, None] * S + cols[None, :]).reshape(-1)
        ks = None if key_start is None else key_start.to(device=dev, dtype=torch.int32)
        return cls(tokens=tokens, positions=positions, key_start=ks, logit_rows=logit_rows)


def _impl(backend: str):
    if backend == "ops":
        from . import ops
        return ops
    if backend == "torch":
        return reference
    raise ValueError(f"backend must be 'ops' (the compiled kernels) or 'torch' (reference.py), got {backend!r}")


def forward_batch(cfg: LLaDAConfig, w: ModelWeights, fb: ForwardBatch, cache=None, rope: RopeTable | None = None,
                  ws: Workspace | None = None, backend: str = "ops") -> torch.Tensor:
    """Logits (M, V) of the query rows fb.logit_rows (all of them when None).

    cache: the engine's KVCache, written at fb.write_index and read through fb.kv_rows (when fb.cache_read).
    rope: the RoPE table (built here for the largest position when None). ws: a Workspace that every intermediate is
    written into (no allocation once warm; not differentiable), or None (fresh tensors; with backend 'torch' the
    whole forward is differentiable). backend: 'ops' (llada_rt.ops, the compiled kernels) or 'torch' (reference.py).
    Weights of one rank of a tensor-parallel group (w.tp) run that rank's heads, MLP columns and vocabulary shard, with
    one all-reduce after the embedding, the attention output and the down projection; the logits are then this
    rank's shard (M, V / size) of the vocabulary.
    """
    impl = _impl(backend)
    tp = w.tp
    B, S = fb.tokens.shape
    BS, d, dt = B * S, cfg.d_model, w.dtype
    Hq, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    mlp, vocab = cfg.mlp_hidden_size, cfg.padded_vocab
    if tp is not None:   # this rank's heads (the KV cache holds only them), MLP columns and vocabulary rows
        Hq, Hkv, mlp, vocab = tp.local(Hq), tp.local(Hkv), tp.local(mlp), tp.local(vocab)
    if rope is None:
        rope = RopeTable.build(cfg, int(fb.positions.max()) + 1 if fb.positions.numel() else 1, fb.tokens.device)
    inplace = ws is not None
    pack = fb.pack
    if pack is None:
        Q, tokens, positions = BS, fb.tokens.reshape(-1), fb.positions                         # (BS,), (B, S)
    else:
        Q = pack.shape[0]
        tokens = torch.take(fb.tokens, pack, out=scratch(ws, "pack_tokens", (Q,), torch.int64))
        positions = torch.take(fb.positions, pack, out=scratch(ws, "pack_positions", (Q,), torch.int64)).view(1, Q)
    qrows = (B, S) if pack is None else (1, Q)                                                  # RoPE's view of rows
    segments = fb.attn_segments or ((B, S),)
    if sum(nb for nb, _ in segments) != B or (fb.attn_segments is not None and pack is None):
        raise ValueError(f"ForwardBatch.attn_segments {fb.attn_segments}: the segments must cover the B = {B} rows, "
                         "and need pack")
    AS = sum(nb * width for nb, width in segments)                                              # attention rows
    apack = fb.attn_pack if fb.attn_segments is not None else pack
    if fb.last_window is not None and (fb.logit_rows is None or fb.logit_window is None
                                       or (fb.attn_segments is not None and not fb.cache_read)):
        raise ValueError("ForwardBatch.last_window needs logit_rows and logit_window (and, with attn_segments, "
                         "cache_read)")
    M = fb.logit_rows.shape[0] if fb.logit_rows is not None else None
    last = len(w.layers) - 1
    nqkv = (Hq + 2 * Hkv) * D
    if tp is None:
        x = torch.index_select(w.embed, 0, tokens, out=scratch(ws, "x", (Q, d), dt))           # (Q, d)
    else:
        x = parallel.embed(tp, w.embed, tokens, out=scratch(ws, "x", (Q, d), dt))
    for i, layer in enumerate(w.layers):
        h = impl.rms_norm(x, layer.attn_norm, cfg.rms_norm_eps, out=scratch(ws, "h", (Q, d), dt))
        qkv = impl.linear(h, layer.wqkv, out=scratch(ws, "qkv", (Q, nqkv), dt))
        # the q and k heads sit side by side in qkv and rotate alike: one RoPE call over all Hq + Hkv of them
        qk = qkv[:, :(Hq + Hkv) * D].view(*qrows, Hq + Hkv, D)                    # strided views of qkv
        qk = impl.rope(qk, positions, rope.cos, rope.sin, cfg.rope_full_precision, out=qk if inplace else None)
        q, k = qk[..., :Hq, :], qk[..., Hq:, :]
        v = qkv[:, (Hq + Hkv) * D:].view(*qrows, Hkv, D)
        if fb.write_index is not None:
            ck, cv = cache.flat(i)                                                # (R * T, Hkv, D)
            ck.index_copy_(0, fb.write_index, k.reshape(Q, Hkv, D))
            cv.index_copy_(0, fb.write_index, v.reshape(Q, Hkv, D))
        if i == last and fb.last_window is not None:   # attention for the window rows, the rest for the logit rows
            a = _window_attention(impl, fb, q, k, v, cache, i, ws, dt, Q, Hq, Hkv, D, pack, apack, AS, inplace)
            x = torch.index_select(x, 0, fb.logit_rows, out=scratch(ws, "x_rows", (M, d), dt))   # (M, d)
            x = _mlp_half(impl, layer, cfg, tp, x, a, ws, dt, d, mlp, inplace)
            break
        if pack is not None:   # the attention's padded layout: the queries (and the fresh K/V when not cached)
            if fb.cache_read:
                src = q.reshape(Q, Hq * D)                                        # K/V come from the cache
            elif inplace:
                src = qkv                                                         # q, k were rotated in place
            else:
                src = torch.cat([q.reshape(Q, -1), k.reshape(Q, -1), v.reshape(Q, -1)], 1)
            # zeroed when allocated: the padding columns then only ever hold finite values (attention ignores them)
            if inplace:
                padded = ws.get("pack_qkv", (AS, src.shape[1]), dt, zero=True).index_copy_(0, apack, src)
            else:
                padded = torch.zeros((AS, src.shape[1]), dtype=dt, device=x.device).index_copy(0, apack, src)
        a_out = scratch(ws, "attn", (AS, Hq, D), dt)
        r0 = c0 = 0
        outs = []
        for nb, width in segments:   # one attention per segment of rows, over its own rectangle
            rows_ = slice(r0, r0 + nb)
            cut = lambda t: None if t is None else t[rows_]  # noqa: E731
            if pack is None:
                qs, ks, vs = q[rows_], k[rows_], v[rows_]
            else:
                blk = padded[c0:c0 + nb * width]
                qs = blk[:, :Hq * D].view(nb, width, Hq, D)
                ks = blk[:, Hq * D:(Hq + Hkv) * D].view(nb, width, Hkv, D) if not fb.cache_read else None
                vs = blk[:, (Hq + Hkv) * D:].view(nb, width, Hkv, D) if not fb.cache_read else None
            out = None if a_out is None else a_out[c0:c0 + nb * width].view(nb, width, Hq, D)
            if fb.cache_read:
                K, V = cache.layer(i)                                             # (R, T, Hkv, D)
                o_seg = impl.attention(qs, K, V, cut(fb.key_start), cut(fb.key_end), kv_rows=cut(fb.kv_rows), out=out)
            else:
                o_seg = impl.attention(qs, ks, vs, cut(fb.key_start), cut(fb.key_end), out=out)   # (nb, width, Hq, D)
            outs.append(o_seg.reshape(nb * width, Hq * D))
            r0, c0 = r0 + nb, c0 + nb * width
        a = a_out.view(AS, Hq * D) if a_out is not None else outs[0] if len(outs) == 1 else torch.cat(outs)
        if pack is not None:
            a = torch.index_select(a, 0, apack, out=scratch(ws, "pack_attn", (Q, Hq * D), dt))   # (Q, Hq * D)
        x = _mlp_half(impl, layer, cfg, tp, x, a, ws, dt, d, mlp, inplace)
    else:   # every layer ran on every query row: the logit rows now
        if fb.logit_rows is not None:
            x = torch.index_select(x, 0, fb.logit_rows, out=scratch(ws, "x_rows", (M, d), dt))   # (M, d)
    M = x.shape[0]
    x = impl.rms_norm(x, w.ln_f, cfg.rms_norm_eps, out=scratch(ws, "x_norm", (M, d), dt))
    return impl.linear(x, w.lm_head, out=scratch(ws, "logits", (M, vocab), dt))   # (M, V)


def _mlp_half(impl, layer, cfg, tp, x, a, ws, dt, d, mlp, inplace):
    """The rest of a layer after its attention a (R, Hq * D), on the residual rows x (R, d): output projection,
    residual, norm, MLP, residual."""
    R = x.shape[0]
    o = impl.linear(a, layer.wo, out=scratch(ws, "o", (R, d), dt))
    if tp is not None:   # row-parallel: each rank's heads give a partial sum of the projection
        tp.all_reduce_(o)
    x = x.add_(o) if inplace else x + o
    h = impl.rms_norm(x, layer.ff_norm, cfg.rms_norm_eps, out=scratch(ws, "h", (R, d), dt))
    gu = impl.linear(h, layer.w_gate_up, out=scratch(ws, "gate_up", (R, 2 * mlp), dt))
    m = impl.silu_mul(gu, out=scratch(ws, "mlp", (R, mlp), dt))
    o = impl.linear(m, layer.w_down, out=scratch(ws, "o", (R, d), dt))
    if tp is not None:
        tp.all_reduce_(o)
    return x.add_(o) if inplace else x + o


def _window_attention(impl, fb, q, k, v, cache, i, ws, dt, Q, Hq, Hkv, D, pack, apack, AS, inplace):
    """The last layer's attention for the query rows fb.last_window (B, L) only, against every key of each row:
    the rows fb.logit_window of it, (M, Hq * D)."""
    B, L = fb.last_window.shape
    qw = torch.index_select(q.reshape(Q, Hq * D), 0, fb.last_window.view(-1),
                            out=scratch(ws, "last_q", (B * L, Hq * D), dt)).view(B, L, Hq, D)
    out = scratch(ws, "last_attn", (B, L, Hq, D), dt)
    if fb.cache_read:
        K, V = cache.layer(i)                                                     # (R, T, Hkv, D)
        a = impl.attention(qw, K, V, fb.key_start, fb.key_end, kv_rows=fb.kv_rows, out=out)
    else:
        S = fb.tokens.shape[1]
        if pack is None:
            ks, vs = k, v                                                         # (B, S, Hkv, D) views of qkv
        else:   # the fresh K/V in the padded (B, S) layout (zeroed when allocated: padding stays finite)
            ks, vs = ((ws.get("pack_" + name, (AS, Hkv * D), dt, zero=True) if inplace else
                       torch.zeros((AS, Hkv * D), dtype=dt, device=t.device)).index_copy_(0, apack, t.reshape(Q, -1))
                      .view(B, S, Hkv, D) for name, t in (("k", k), ("v", v)))
        a = impl.attention(qw, ks, vs, fb.key_start, fb.key_end, out=out)         # (B, L, Hq, D)
    M = fb.logit_window.shape[0]
    return torch.index_select(a.reshape(B * L, Hq * D), 0, fb.logit_window,
                              out=scratch(ws, "last_rows", (M, Hq * D), dt))


def forward(cfg: LLaDAConfig, w: ModelWeights, tokens: torch.Tensor, positions: torch.Tensor | None = None,
            key_start: torch.Tensor | None = None, rows: slice | None = None, backend: str = "ops") -> torch.Tensor:
    """A plain uncached forward: logits (B, R, V) for the columns `rows` of tokens (B, S) (all when None).

    positions (B, S) int64: RoPE positions (arange when None); key_start (B,): keys before it are left padding and
    are not attended. backend 'torch' is differentiable (training); 'ops' runs the compiled kernels.
    """
    B, S = tokens.shape
    logits = forward_batch(cfg, w, ForwardBatch.full(tokens, positions, key_start, rows), backend=backend)
    return logits.view(B, -1, logits.shape[-1])
