"""KVCache: the engine's per-layer K/V buffers (post-RoPE keys) for every slot and column, kept for the process."""
from __future__ import annotations

import torch

from .config import LLaDAConfig


class KVCache:
    """K and V of every canvas column of every engine row, for every layer: (L, R, T, Hkv, D) each.

    Row r, column c holds the K/V that row's last forward over column c computed. A forward writes the fresh K/V
    of its query window (flat index r * T + c) and then attends over its rows' columns [0, length): a refresh
    rewrites the whole row, a prefix-mode step the block and the suffix, a dual-mode step only the block.
    """

    def __init__(self, cfg: LLaDAConfig, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.rows, self.cols = rows, cols
        shape = (cfg.n_layers, rows, cols, cfg.n_kv_heads, cfg.head_dim)
        # zeros, not empty: masked-out keys are multiplied by 0 in attention, and 0 * NaN garbage would be NaN
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def grow(self, rows: int, cols: int) -> None:
        """At least rows x cols, keeping every row's contents at the same (row, column)."""
        if rows <= self.rows and cols <= self.cols:
            return
        rows, cols = max(rows, self.rows), max(cols, self.cols)
        old_k, old_v, r, c = self.k, self.v, self.rows, self.cols
        self.__init__(self.cfg, rows, cols, self.dtype, self.device)
        self.k[:, :r, :c] = old_k
        self.v[:, :r, :c] = old_v

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's K, V: (R, T, Hkv, D) views."""
        return self.k[i], self.v[i]

    def flat(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's K, V as (R * T, Hkv, D) views, indexed by row * T + column."""
        L, R, T, H, D = self.k.shape
        return self.k[i].view(R * T, H, D), self.v[i].view(R * T, H, D)
