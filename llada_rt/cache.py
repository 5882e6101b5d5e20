"""KVCache: per-layer K/V buffers (post-RoPE keys) allocated once per call, written and read by model.forward."""
from __future__ import annotations

import torch

from .config import LLaDAConfig


class KVCache:
    """K and V of every canvas position for every layer: (L, B, T, Hkv, D) each.

    A forward over canvas columns [q_start, q_start + S) writes its fresh K/V there and attends over all T columns,
    so the refresh (q_start = 0, S = T) rewrites everything, a prefix-mode step (q_start = block start, S = T - q_start)
    rewrites the block and the suffix and reads the cached prefix, and a dual-mode step (S = block length) rewrites
    only the block and reads the cached prefix and suffix.
    """

    def __init__(self, cfg: LLaDAConfig, batch: int, length: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = length
        self.batch = batch
        self.q_start = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def at(self, q_start: int) -> "KVCache":
        """Sets where the next forward's fresh K/V go (canvas column of its first query); returns self."""
        self.q_start = q_start
        return self

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores fresh k, v (B, S, Hkv, D) at [q_start, q_start + S); returns the layer's full K, V (B, T, Hkv, D)."""
        B, S = k.shape[0], k.shape[1]
        end = self.q_start + S
        if end > self.length or B > self.batch:
            raise ValueError(f"KVCache: writing rows [{self.q_start}, {end}) of batch {B} into a cache of length "
                             f"{self.length} and batch {self.batch}")
        self.k[layer, :B, self.q_start:end] = k
        self.v[layer, :B, self.q_start:end] = v
        return self.k[layer, :B], self.v[layer, :B]
