"""StepGraphs: CUDA graphs of the engine's device step, owned by the engine for the whole process."""
from __future__ import annotations

from typing import Callable

import torch


class StepGraphs:
    """One graph per step shape (mode, phase, block length, guidance, row bucket, window, logit rows), captured the
    first time that shape runs and replayed for every block of every later call; all of them share one memory pool.
    Everything a step reads per row (block start, step, Philox offset, k, settings) lives in device tensors, so a
    replay needs only the new slots and logit-row indices copied into the plan's buffers beforehand."""

    def __init__(self, device: torch.device):
        self.device = device
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.captures = 0          # graphs captured so far (a call that captured none replayed only)
        self._version = None

    def invalidate(self) -> None:
        """Buffers moved (the engine grew): every captured graph points at freed memory."""
        self.graphs.clear()

    def run(self, key: tuple, version: Callable[[], int], step: Callable[[], None], slots: list[torch.Tensor],
            scratch_slot: int) -> None:
        """Replays key's graph (capturing it first if needed); slots: the plan's slot buffers (int64 and int32)."""
        graph = self.graphs.get(key)
        if graph is None or self._version != version():
            real = [t.clone() for t in slots]
            for t in slots:             # warm-up and capture run on the scratch row only: no real row is touched
                t.fill_(scratch_slot)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                step()                  # sizes the workspace buffers outside the capture
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._version != version():
                self.graphs.clear()     # the warm-up reallocated buffers the older graphs captured
                self._version = version()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                step()
            self.graphs[key] = graph
            self.captures += 1
            for t, r in zip(slots, real):
                t.copy_(r)
        graph.replay()
