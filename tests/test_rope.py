"""ops.rope against reference.rope and model.apply_rope (LLaDA's rotate_half RoPE as torch composes it): bit for bit on
CPU in fp32, bf16 and fp16, in full precision and op by op in the dtype; in place; strided q/k views of a fused qkv
projection; positions outside the table; no allocation with out=."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cpu_kernels import cpu_allocations, isa  # noqa: F401 (isa is a fixture)
from llada_rt import model, ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def _table(P: int, D: int, theta: float = 500000.0):
    """cos, sin (P, D/2) float32 for positions 0..P-1, as LLaDA's RotaryEmbedding computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.arange(P, dtype=torch.float32)[:, None] * inv_freq               # (P, D/2)
    return freqs.cos(), freqs.sin()


def _qkv(B: int, S: int, H: int, D: int, dtype):
    """q, k as strided (B, S, H, D) views of one fused (B, S, 3H, D) projection output."""
    qkv = (torch.randn(B, S, 3 * H, D) * 2).to(dtype)
    return qkv[:, :, :H], qkv[:, :, H:2 * H]


def _assert_bit_exact(got, ref, label):
    mismatched = (got != ref).sum().item()
    print(f"{label}: {mismatched} of {ref.numel()} differ, max abs diff {(got.float() - ref.float()).abs().max():.3g}")
    assert mismatched == 0, f"{label}: not bit-exact with torch's composition"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("full_precision", [True, False], ids=["fp32-math", "dtype-math"])
def test_matches_reference_bit_for_bit(dtype, full_precision, isa):
    for B, S, H, D in [(1, 1, 1, 2), (1, 7, 3, 22), (2, 33, 2, 64), (3, 64, 1, 128), (1, 5, 2, 100)]:
        P = 3 * S + 5
        cos, sin = _table(P, D)
        positions = torch.randint(0, P, (B, S))
        q, _ = _qkv(B, S, H, D, dtype)
        got = ops.rope(q, positions, cos, sin, full_precision)
        _assert_bit_exact(got, reference.rope(q, positions, cos, sin, full_precision),
                          f"{isa} {(B, S, H, D)} {dtype} full_precision={full_precision}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("full_precision", [True, False], ids=["fp32-math", "dtype-math"])
def test_in_place_matches_model_apply_rope(dtype, full_precision):
    """out = x (the engine rotates q and k where the projection wrote them) equals the out-of-place reference;
    positions as a left-padded batch has them."""
    B, S, H, D, P = 3, 40, 4, 128, 64
    cos, sin = _table(P, D)
    positions = (torch.arange(S)[None, :] - torch.tensor([0, 5, 17])[:, None]).clamp(min=0)   # (B, S)
    q, k = _qkv(B, S, H, D, dtype)
    want_q = reference.rope(q, positions, cos, sin, full_precision)
    want_k = reference.rope(k, positions, cos, sin, full_precision)
    assert ops.rope(q, positions, cos, sin, full_precision, out=q) is q
    ops.rope(k, positions, cos, sin, full_precision, out=k)
    _assert_bit_exact(q, want_q, f"in-place q {dtype}")
    _assert_bit_exact(k, want_k, f"in-place k {dtype}")


def test_table_of_model_rope_table():
    """The (P, D/2) table of _table is model.RopeTable's (what the engine builds once per process)."""
    cfg = SimpleNamespace(head_dim=128, rope_theta=500000.0)   # the two LLaDAConfig fields RopeTable.build reads
    cos, sin = _table(50, cfg.head_dim, cfg.rope_theta)
    t = model.RopeTable.build(cfg, 50, torch.device("cpu"))                           # (50, D/2)
    print(f"max diff cos {(t.cos - cos).abs().max():.3g}")
    assert torch.equal(t.cos, cos) and torch.equal(t.sin, sin)


def test_position_outside_table_raises_and_writes_nothing():
    cos, sin = _table(10, 64)
    q, _ = _qkv(2, 4, 2, 64, torch.bfloat16)
    out = torch.zeros_like(q)
    for bad in (10, -1):
        positions = torch.zeros(2, 4, dtype=torch.int64)
        positions[1, 2] = bad
        with pytest.raises(ops.OpInputError, match=rf"positions\[1, 2\] = {bad} is outside the RoPE table of P = 10"):
            ops.rope(q, positions, cos, sin, True, out=out)
        assert (out == 0).all(), "a call that raises must not write"


def test_empty_and_opcheck():
    cos, sin = _table(8, 64)
    q, _ = _qkv(2, 0, 2, 64, torch.float32)
    assert ops.rope(q, torch.zeros(2, 0, dtype=torch.int64), cos, sin, True).shape == (2, 0, 2, 64)
    q, _ = _qkv(2, 5, 2, 64, torch.bfloat16)
    positions = torch.randint(0, 8, (2, 5))
    torch.library.opcheck(torch.ops.llada_rt.rope.default, (q, positions, cos, sin, True))
    torch.library.opcheck(torch.ops.llada_rt.rope_out.default, (torch.empty_like(q), q, positions, cos, sin, False))


def test_in_place_call_allocates_nothing():
    cos, sin = _table(64, 128)
    q, _ = _qkv(2, 33, 4, 128, torch.bfloat16)
    positions = torch.randint(0, 64, (2, 33))
    allocations = cpu_allocations(lambda: ops.rope(q, positions, cos, sin, True, out=q))
    print(f"allocations: {allocations}")
    assert allocations == []


@pytest.mark.parametrize("make, match", [
    (lambda q, p, c, s: (q[0], p, c, s), r"x must be \(B, S, H, D\)"),
    (lambda q, p, c, s: (q[..., :63], p, c[:, :31], s[:, :31]), "must be even"),
    (lambda q, p, c, s: (q, p.int(), c, s), "positions must be int64"),
    (lambda q, p, c, s: (q, p[:, :-1], c, s), r"positions must be \(B, S\)"),
    (lambda q, p, c, s: (q, p, c.double(), s), "cos must be float32"),
    (lambda q, p, c, s: (q, p, c[:, :16], s), r"cos must be \(P, D/2\)"),
    (lambda q, p, c, s: (q, p, c, s[:5]), "same rows"),
    (lambda q, p, c, s: (q, p, c.t().contiguous().t(), s), "cos must be contiguous"),
    (lambda q, p, c, s: (q.transpose(-1, -2).contiguous().transpose(-1, -2), p, c, s), "unit stride over D"),
])
def test_input_errors(make, match):
    cos, sin = _table(32, 64)
    q, _ = _qkv(2, 4, 2, 64, torch.bfloat16)
    positions = torch.randint(0, 32, (2, 4))
    with pytest.raises(ops.OpInputError, match=match):
        ops.rope(*make(q, positions, cos, sin), True)
