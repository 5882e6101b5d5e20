"""Workspace: named scratch tensors reused by every step, so that a warm step allocates nothing."""
from __future__ import annotations

import math

import torch


class Workspace:
    """get(name, shape, dtype) returns a view of the front of that name's buffer, which is reallocated only when a
    larger size (or another dtype) is asked for. `version` counts reallocations: CUDA graphs captured over these
    buffers are valid only while it is unchanged."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}
        self.version = 0
        # (name, shape, dtype) -> the view get returned, valid while the name's buffer stays: a step asks for the same
        # few dozen views every time, and making one (a slice and a view) costs several us
        self._views: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
        """zero: a (re)allocated buffer starts as zeros, not uninitialised memory."""
        key = (name, tuple(shape), dtype)
        view = self._views.get(key)
        if view is not None:
            return view
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            size = max(n, buf.numel() if buf is not None and buf.dtype == dtype else 0)
            buf = self.buffers[name] = (torch.zeros if zero else torch.empty)(size, dtype=dtype, device=self.device)
            self.version += 1
            self._views = {k: v for k, v in self._views.items() if k[0] != name}
        view = self._views[key] = buf[:n].view(shape)
        return view

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


def scratch(ws: Workspace | None, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """The workspace's buffer, or None (the op then allocates its result: plain, differentiable calls)."""
    return ws.get(name, shape, dtype) if ws is not None else None
