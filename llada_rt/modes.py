"""The decoding modes as one table: per (mode, phase), the query window, what the KV cache does and where logits come from."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Phase:
    """How one forward of a row runs. Columns are canvas columns of the row (prompt at 0, answer after it).

    window: which columns are queries (and get fresh K/V); w0 = block_start - the family's logit_shift:
      'all'    [0, length)             every column (a full forward)
      'suffix' [w0, length)            the current block and the still-masked rest (Fast-dLLM prefix cache)
      'block'  [w0, w0 + block_length) the current block only (Fast-dLLM dual cache)
    cache_write: the fresh K/V of the window are stored in the row's cache columns.
    cache_read: attention reads keys [0, length) from the row's cache (after this forward's write) instead of the
      window's own fresh K/V (then the window must be 'all').
    """
    window: str
    cache_write: bool
    cache_read: bool


# (mode, phase) -> Phase. In the cache modes a row's first forward of a block is its 'refresh' (a full forward that
# rewrites its whole cache row; it is also the block's first decoding step) and the others are 'step's. Exact mode
# has no cache: every forward is 'full'.
PHASES = {
    ("exact", "full"): Phase(window="all", cache_write=False, cache_read=False),
    ("prefix", "refresh"): Phase(window="all", cache_write=True, cache_read=True),
    ("prefix", "step"): Phase(window="suffix", cache_write=True, cache_read=True),
    ("dual", "refresh"): Phase(window="all", cache_write=True, cache_read=True),
    ("dual", "step"): Phase(window="block", cache_write=True, cache_read=True),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family changes in the loop. logit_shift: the logits predicting column c come from query row
    c - logit_shift (0 for LLaDA; 1 for families trained to predict the next position, e.g. Dream)."""
    name: str
    logit_shift: int = 0


LLADA = Family("llada")


def phase_of(mode: str, step_in_block: int) -> str:
    """The phase of a row's next forward."""
    if mode == "exact":
        return "full"
    return "refresh" if step_in_block == 0 else "step"


def mergeable(mode: str) -> bool:
    """Whether rows of every phase of `mode` can share one forward: their phases differ in the query window alone
    (each row then has its own window start and width, and the forward packs their real columns)."""
    flags = {(p.cache_write, p.cache_read) for (m, _), p in PHASES.items() if m == mode}
    return len(flags) == 1


def uses_cache(mode: str) -> bool:
    return any(p.cache_write for (m, _), p in PHASES.items() if m == mode)
