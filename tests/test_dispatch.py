"""The per-step ops given `out` skip the dispatcher for plain CPU tensors (ops._eager) and must stay the same op:
the same result as the registered op, the same errors, and under a dispatch mode (what fake tensors, tracing and
torch.compile use) the registered op itself runs, so the mode sees it."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llada_rt import ops
from llada_rt.linear import Linear


class Seen(TorchDispatchMode):
    """Records the name of every op dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g)
    w = torch.randn(64, generator=g)
    gu = torch.randn(7, 96, generator=g)
    q = torch.randn(2, 5, 2, 32, generator=g)
    k, v = torch.randn(2, 9, 2, 32, generator=g), torch.randn(2, 9, 2, 32, generator=g)
    ke = torch.tensor([9, 4], dtype=torch.int32)
    pos = torch.arange(10, dtype=torch.int64).view(2, 5)
    inv = 1.0 / (10000 ** (torch.arange(16, dtype=torch.float32) / 16))
    ang = torch.arange(16, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    yield "rms_norm_out", lambda out: ops.rms_norm(x, w, 1e-5, out=out), torch.empty_like(x)
    yield "silu_mul_out", lambda out: ops.silu_mul(gu, out=out), torch.empty(7, 48)
    yield "rope_out", lambda out: ops.rope(q, pos, cos, sin, True, out=out), torch.empty_like(q)
    yield "attention_out", lambda out: ops.attention(q, k, v, None, ke, out=out), torch.empty_like(q)
    if ops.linear_path_supported("blocked_f32", "cpu"):
        lin = Linear.from_dense(torch.randn(40, 64, generator=g), path="blocked_f32")
        yield "linear_out", lambda out: ops.linear(x, lin, out=out), torch.empty(3, 5, 40)


@pytest.mark.parametrize("name,call,out", list(_cases()), ids=[c[0] for c in _cases()])
def test_undispatched_path_is_the_registered_op(name, call, out):
    eager = call(out.clone()).clone()
    seen = Seen()
    with seen:
        traced = call(out.clone())
    diff = (eager - traced).abs().max().item()
    print(name, "ops seen under the mode:", [n for n in seen.names if "llada_rt" in n], "max |diff|", diff)
    assert f"llada_rt.{name}.default" in seen.names
    assert diff == 0.0


def test_undispatched_path_keeps_the_checks():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ops.OpInputError, match="weight must be"):
        ops.rms_norm(x, torch.randn(7), 1e-5, out=torch.empty_like(x))
    with pytest.raises(ops.OpInputError, match="out must"):
        ops.rms_norm(x, w, 1e-5, out=torch.empty(4, 9))


def test_only_plain_cpu_tensors_skip_the_dispatcher():
    cpu, meta = torch.empty(2), torch.empty(2, device="meta")
    assert ops._eager(cpu, cpu)
    assert not ops._eager(meta, cpu) and not ops._eager(cpu, cpu.as_subclass(torch.nn.Parameter))
    with Seen():
        assert not ops._eager(cpu)
