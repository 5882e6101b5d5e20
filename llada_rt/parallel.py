"""Tensor parallelism over torch.distributed: the torchrun world, the shard plan (which slice of every weight a rank
holds) and the few collectives of a sharded forward and of the vocabulary-parallel confidence.

Megatron-style: q/k/v split by heads and gate/up split each on its own (column-parallel, no collective), the attention
output and down projections split along K (row-parallel, one all-reduce after each), embedding and LM head split over
the padded vocabulary (the embedding all-reduces its zero-padded rows; the LM head leaves each rank its logit shard,
which the confidence op reduces to a small per-row state that is all-gathered instead of the logits).
"""
from __future__ import annotations

import atexit
import math
import os

import torch

from .config import LLaDAConfig

WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")   # what torchrun sets for every process it starts


class TPError(ValueError):
    """A torchrun world that cannot run this checkpoint (sizes that do not divide, a device that does not fit)."""


def world_from_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) of the torchrun world this process belongs to, or None outside one (or in a
    world of one process, which runs unsharded)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, size, local = (int(os.environ.get(k, "0")) for k in WORLD_ENV)
    except ValueError:
        raise TPError(f"torchrun environment is malformed: RANK={os.environ.get('RANK')!r}, WORLD_SIZE="
                      f"{os.environ.get('WORLD_SIZE')!r}, LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} must be "
                      "integers") from None
    if size < 1 or not 0 <= rank < size:
        raise TPError(f"torchrun environment is malformed: RANK={rank} must lie in [0, WORLD_SIZE={size})")
    return None if size == 1 else (rank, size, local)


def split_sizes(cfg: LLaDAConfig) -> dict[str, int]:
    """The dimensions that tensor parallelism splits, by config name."""
    return {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "mlp_hidden_size": cfg.mlp_hidden_size,
            "embedding_size (padded vocabulary)": cfg.padded_vocab}


def check_divisible(cfg: LLaDAConfig, size: int) -> None:
    """Raises TPError naming every split dimension that `size` ranks do not divide, and the sizes that would work."""
    sizes = split_sizes(cfg)
    bad = [f"{name}={n}" for name, n in sizes.items() if n % size]
    if bad:
        g = math.gcd(*sizes.values())
        ok = [k for k in range(2, g + 1) if g % k == 0]
        fix = (f"this checkpoint splits over {', '.join(map(str, ok))} ranks; launch torchrun with --nproc-per-node "
               "one of those" if ok else "this checkpoint does not split at all; run it in one process")
        every = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise TPError(f"tensor parallelism over {size} ranks needs every split dimension divisible by {size}, but "
                      f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not ({every}); {fix}")


class TPGroup:
    """This process's place in the tensor-parallel group: rank, size, the torch.distributed process group, and the
    bytes each kind of collective moved (counted at the call, for the benchmark)."""

    def __init__(self, rank: int, size: int, group=None):
        self.rank, self.size, self.group = rank, size, group
        self.bytes_reduced = 0     # payload bytes of every all_reduce_ (one rank's tensor)
        self.bytes_gathered = 0    # payload bytes every all_gather contributed (one rank's tensor)

    def __repr__(self) -> str:
        return f"TPGroup(rank={self.rank}, size={self.size})"

    def span(self, total: int) -> tuple[int, int]:
        """This rank's contiguous [start, end) of a dimension of `total` (divisible by size)."""
        per = total // self.size
        return self.rank * per, (self.rank + 1) * per

    def local(self, total: int) -> int:
        return total // self.size

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sums (or maxes) t over the ranks, in place."""
        import torch.distributed as dist

        self.bytes_reduced += t.numel() * t.element_size()
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """(size, *t.shape): every rank's t, in rank order."""
        import torch.distributed as dist

        self.bytes_gathered += t.numel() * t.element_size()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)


def init_tensor_parallel(device: torch.device) -> TPGroup | None:
    """The TPGroup of the torchrun world (None outside one): initializes the default process group once, NCCL on
    CUDA (after selecting the GPU LOCAL_RANK) and gloo on the CPU."""
    world = world_from_env()
    if world is None:
        return None
    import torch.distributed as dist

    rank, size, local = world
    device = torch.device(device)
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local >= n:
            raise TPError(f"torchrun rank {rank} has LOCAL_RANK={local} but this machine has {n} CUDA GPUs; launch "
                          f"at most {n} processes per node")
        torch.cuda.set_device(local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, **({"device_id": torch.device("cuda", local)}
                                                    if device.type == "cuda" else {}))
        atexit.register(dist.destroy_process_group)   # NCCL warns about (and may hang on) a group left at exit
    elif dist.get_world_size() != size or dist.get_rank() != rank:
        raise TPError(f"torch.distributed is initialized as rank {dist.get_rank()} of {dist.get_world_size()}, but "
                      f"the torchrun environment says rank {rank} of {size}")
    return TPGroup(rank, size, None)


def tp_device(device: torch.device) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK for a CUDA run inside a torchrun world, else `device` itself."""
    world = world_from_env()
    if world is None or torch.device(device).type != "cuda":
        return torch.device(device)
    return torch.device("cuda", world[2])


def embed(tp: TPGroup, table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Vocabulary-parallel embedding: rows (BS, d) of ids (BS,) from this rank's table shard (V/size, d); ids of the
    other ranks give zeros here and their rows after the all-reduce."""
    Vr = table.shape[0]
    local = ids - tp.rank * Vr                                                    # (BS,)
    outside = (local < 0) | (local >= Vr)
    x = torch.index_select(table, 0, local.clamp_(0, Vr - 1), out=out)            # (BS, d)
    x.masked_fill_(outside[:, None], 0)
    return tp.all_reduce_(x)


def confidence(impl, tp: TPGroup, logits: torch.Tensor, masked: torch.Tensor, *, full_vocab: int, out=None,
               **kwargs):
    """confidence (impl.confidence's arguments) over the vocabulary split across the group: logits (B, N, V/size) are
    this rank's shard; each rank reduces its shard to impl.confidence_partial's state, the states (6 small fields,
    packed into one float64 tensor) are all-gathered, and every rank merges them into the same (token, prob)."""
    B, N, Vr = logits.shape
    state = impl.confidence_partial(logits, masked, vocab_offset=tp.rank * Vr, full_vocab=full_vocab, **kwargs)
    # every field is exact in float64: float64 fields, token ids < 2^53, int32 references
    packed = torch.stack([f.to(torch.float64) for f in state])                    # (6, B, N)
    every = tp.all_gather(packed)                                                 # (R, 6, B, N)
    fields = [every[:, j].to(f.dtype) for j, f in enumerate(state)]               # (R, B, N) each
    from . import ops   # the merge is pure torch (small tensors); reference.py has no second copy of it

    token, prob = ops.confidence_merge(ops.ConfidenceState(*fields))
    if out is None:
        return token, prob
    out[0].copy_(token)
    out[1].copy_(prob)
    return out


def log_softmax_at(tp: TPGroup, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(full logits)[targets] (M,) fp32 from this rank's shard logits (M, V / size) fp32 and global target
    ids (M,): a distributed logsumexp (max, then sum of exponentials) and the target logit from the rank holding it,
    three all-reduces of (M,) each."""
    Vr = logits.shape[1]
    m = tp.all_reduce_(logits.amax(-1), op="max")                                 # (M,)
    total = tp.all_reduce_(torch.exp(logits - m[:, None]).sum(-1))                # (M,)
    local = targets - tp.rank * Vr
    here = (local >= 0) & (local < Vr)
    at = logits.gather(1, local.clamp(0, Vr - 1)[:, None])[:, 0]
    at = tp.all_reduce_(torch.where(here, at, torch.zeros_like(at)))               # (M,) the target's logit
    return at - m - total.log()
