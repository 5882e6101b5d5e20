"""The only importer of llada_rt._C: registers each kernel as a torch op, checks inputs, dispatches CPU vs CUDA."""
from __future__ import annotations

import torch

from . import _C

_lib = torch.library.Library("llada_rt", "DEF")

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class OpInputError(ValueError):
    """An op was called with a tensor of the wrong shape, dtype, device or layout."""


def _check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise OpInputError(f"llada_rt.ops.{op}: {msg}")


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _require_cuda_build(op: str) -> None:
    if not _C.with_cuda:
        raise RuntimeError(f"llada_rt.ops.{op}: this build of llada_rt has no CUDA kernels (it was built without nvcc "
                           "or with LLADA_CUDA=OFF); reinstall with nvcc on PATH to run on the GPU")
