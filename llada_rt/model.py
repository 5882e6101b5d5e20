"""The LLaDA network as one forward function: embeddings, LLaDA blocks, final norm and LM head on the rows asked for."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LLaDAConfig
from .weights import ModelWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaDA's RMSNorm: normalise in fp32, cast back to the input dtype, then multiply by the weight."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


def rope_tables(cfg: LLaDAConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, S, 1, D) in fp32 for absolute positions (B, S); NeoX layout (frequencies repeated, not interleaved)."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, device=positions.device, dtype=torch.float32) / D))
    freqs = positions.to(torch.float32)[..., None] * inv_freq   # (B, S, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]        # (B, S, 1, D)
    return emb.cos(), emb.sin()


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool) -> torch.Tensor:
    """t (B, S, H, D) rotated by rotate_half: (x1, x2) -> (-x2, x1)."""
    tt = t.float() if full_precision else t
    x1, x2 = tt.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (tt * cos.to(tt.dtype) + rotated * sin.to(tt.dtype)).to(t.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor | None) -> torch.Tensor:
    """Differentiable bidirectional attention through torch SDPA; q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D) -> (B, Lq, Hq, D)."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=2)
        v = v.repeat_interleave(Hq // Hkv, dim=2)
    mask = None
    if key_start is not None:
        mask = (torch.arange(Lk, device=q.device)[None, :] >= key_start[:, None].to(q.device))[:, None, None, :]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


def forward(cfg: LLaDAConfig, w: ModelWeights, tokens: torch.Tensor, positions: torch.Tensor | None = None,
            key_start: torch.Tensor | None = None, rows: slice | None = None, cache=None,
            backend: str = "ops") -> torch.Tensor:
    """Logits (B, R, V) for the rows `rows` of tokens (B, S) (all rows when None).

    positions (B, S) int64: absolute RoPE positions (arange when None). key_start (B,) int32: keys before it are left
    padding and are not attended. cache: a KVCache (cache.py) that this call writes and/or reads, or None.
    backend "ops" runs attention through llada_rt.ops (the compiled kernels; float32 on CUDA, which the bf16/fp16
    kernel does not take, goes through SDPA); "torch" through SDPA everywhere (differentiable).
    """
    B, S = tokens.shape
    if positions is None:
        positions = torch.arange(S, device=tokens.device).expand(B, S)
    cos, sin = rope_tables(cfg, positions)
    Hq, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if backend == "ops" and not (tokens.is_cuda and w.dtype == torch.float32):
        from .ops import attention as attend
    elif backend in ("ops", "torch"):
        attend = sdpa_attention
    else:
        raise ValueError(f"backend must be 'ops' or 'torch', got {backend!r}")
    if backend == "ops":
        from .ops import linear
    else:
        from .reference import linear
    x = F.embedding(tokens, w.embed)                                           # (B, S, d)
    for i, layer in enumerate(w.layers):
        h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
        q, k, v = linear(h, layer.wqkv).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q = apply_rope(q.view(B, S, Hq, D), cos, sin, cfg.rope_full_precision)  # (B, S, Hq, D)
        k = apply_rope(k.view(B, S, Hkv, D), cos, sin, cfg.rope_full_precision)
        v = v.view(B, S, Hkv, D)
        if cache is not None:
            k, v = cache.update(i, k, v)                                       # (B, Lk, Hkv, D) views of the cache
        a = attend(q, k, v, key_start)                                         # (B, S, Hq, D)
        x = x + linear(a.reshape(B, S, Hq * D), layer.wo)
        h = rms_norm(x, layer.ff_norm, cfg.rms_norm_eps)
        gate, up = linear(h, layer.w_gate_up).chunk(2, dim=-1)
        x = x + linear(F.silu(gate) * up, layer.w_down)
    if rows is not None:
        x = x[:, rows]
    x = rms_norm(x, w.ln_f, cfg.rms_norm_eps)
    return linear(x, w.lm_head)                                               # (B, R, V)
