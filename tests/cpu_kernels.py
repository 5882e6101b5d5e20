"""Helpers of the CPU kernels' tests: run a test once per instruction set, and count the host allocations of a call
with the torch profiler's memory events."""
from __future__ import annotations

import pytest
from torch.profiler import ProfilerActivity, profile

from llada_rt import ops


@pytest.fixture(params=ops.CPU_ISAS)
def isa(request):
    """Runs the test with the CPU kernels limited to each instruction set in turn (on a CPU without AVX-512 the wider
    ones run the widest it has); yields the one active."""
    previous = ops.set_cpu_isa(request.param)
    try:
        yield ops.cpu_isa()
    finally:
        ops.set_cpu_isa(previous)


def cpu_allocations(fn) -> list[tuple[str, int]]:
    """(op name, bytes) of every profiler event that allocated host memory during one call of fn, after a warm-up
    call (first calls may build caches)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0]
