"""The LLaDA network as one forward function over a per-forward batch description (ForwardBatch)."""
from __future__ import annotations

import dataclasses

import torch

from . import reference
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
    """What one forward computes, shared by all layers: B rows of S query columns (all device tensors)."""
    tokens: torch.Tensor                       # (B, S) int64 query tokens
    positions: torch.Tensor                    # (B, S) int64 RoPE positions (rows of the RopeTable)
    key_end: torch.Tensor | None = None        # (B,) int32: keys [key_start, key_end) of each row are valid (None: S)
    key_start: torch.Tensor | None = None      # (B,) int32 (None: 0)
    logit_rows: torch.Tensor | None = None     # (M,) int64 flat indices into B * S of the rows that get logits
    write_index: torch.Tensor | None = None    # (B * S,) int64 flat cache index (row * T + column) of each query
    kv_rows: torch.Tensor | None = None        # (B,) int32 cache row of each batch row, when cache_read
    cache_read: bool = False                   # attend over the cache rows (after the write), not the fresh K/V

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
    """Logits (M, V) of the rows fb.logit_rows (all B * S rows when None).

    cache: the engine's KVCache, written at fb.write_index and read through fb.kv_rows (when fb.cache_read).
    rope: the RoPE table (built here for the largest position when None). ws: a Workspace that every intermediate is
    written into (no allocation once warm; not differentiable), or None (fresh tensors; with backend 'torch' the
    whole forward is differentiable). backend: 'ops' (llada_rt.ops, the compiled kernels) or 'torch' (reference.py).
    """
    impl = _impl(backend)
    B, S = fb.tokens.shape
    BS, d, dt = B * S, cfg.d_model, w.dtype
    Hq, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if rope is None:
        rope = RopeTable.build(cfg, int(fb.positions.max()) + 1 if fb.positions.numel() else 1, fb.tokens.device)
    inplace = ws is not None
    x = torch.index_select(w.embed, 0, fb.tokens.reshape(-1), out=scratch(ws, "x", (BS, d), dt))   # (BS, d)
    for i, layer in enumerate(w.layers):
        h = impl.rms_norm(x, layer.attn_norm, cfg.rms_norm_eps, out=scratch(ws, "h", (BS, d), dt))
        qkv = impl.linear(h, layer.wqkv, out=scratch(ws, "qkv", (BS, (Hq + 2 * Hkv) * D), dt))
        q = qkv[:, :Hq * D].view(B, S, Hq, D)                                     # strided views of qkv
        k = qkv[:, Hq * D:(Hq + Hkv) * D].view(B, S, Hkv, D)
        v = qkv[:, (Hq + Hkv) * D:].view(B, S, Hkv, D)
        q = impl.rope(q, fb.positions, rope.cos, rope.sin, cfg.rope_full_precision, out=q if inplace else None)
        k = impl.rope(k, fb.positions, rope.cos, rope.sin, cfg.rope_full_precision, out=k if inplace else None)
        if fb.write_index is not None:
            ck, cv = cache.flat(i)                                                # (R * T, Hkv, D)
            ck.index_copy_(0, fb.write_index, k.reshape(BS, Hkv, D))
            cv.index_copy_(0, fb.write_index, v.reshape(BS, Hkv, D))
        a_out = scratch(ws, "attn", (B, S, Hq, D), dt)
        if fb.cache_read:
            K, V = cache.layer(i)                                                 # (R, T, Hkv, D)
            a = impl.attention(q, K, V, fb.key_start, fb.key_end, kv_rows=fb.kv_rows, out=a_out)
        else:
            a = impl.attention(q, k, v, fb.key_start, fb.key_end, out=a_out)      # (B, S, Hq, D)
        o = impl.linear(a.reshape(BS, Hq * D), layer.wo, out=scratch(ws, "o", (BS, d), dt))
        x = x.add_(o) if inplace else x + o
        h = impl.rms_norm(x, layer.ff_norm, cfg.rms_norm_eps, out=scratch(ws, "h", (BS, d), dt))
        gu = impl.linear(h, layer.w_gate_up, out=scratch(ws, "gate_up", (BS, 2 * cfg.mlp_hidden_size), dt))
        m = impl.silu_mul(gu, out=scratch(ws, "mlp", (BS, cfg.mlp_hidden_size), dt))
        o = impl.linear(m, layer.w_down, out=scratch(ws, "o", (BS, d), dt))
        x = x.add_(o) if inplace else x + o
    if fb.logit_rows is not None:
        M = fb.logit_rows.shape[0]
        x = torch.index_select(x, 0, fb.logit_rows, out=scratch(ws, "x_rows", (M, d), dt))   # (M, d)
    M = x.shape[0]
    x = impl.rms_norm(x, w.ln_f, cfg.rms_norm_eps, out=scratch(ws, "x_norm", (M, d), dt))
    return impl.linear(x, w.lm_head, out=scratch(ws, "logits", (M, cfg.padded_vocab), dt))     # (M, V)


def forward(cfg: LLaDAConfig, w: ModelWeights, tokens: torch.Tensor, positions: torch.Tensor | None = None,
            key_start: torch.Tensor | None = None, rows: slice | None = None, backend: str = "ops") -> torch.Tensor:
    """A plain uncached forward: logits (B, R, V) for the columns `rows` of tokens (B, S) (all when None).

    positions (B, S) int64: RoPE positions (arange when None); key_start (B,): keys before it are left padding and
    are not attended. backend 'torch' is differentiable (training); 'ops' runs the compiled kernels.
    """
    B, S = tokens.shape
    logits = forward_batch(cfg, w, ForwardBatch.full(tokens, positions, key_start, rows), backend=backend)
    return logits.view(B, -1, logits.shape[-1])
