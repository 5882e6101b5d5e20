"""ops.attention (CPU, CUDA) and the CUDA kernel under the SIMT emulator against reference.attention.

Tolerance (flash-attention's rule): the kernel's max error against the fp32 reference must be at most twice the max
error of the same math run in the input dtype, plus 1e-5."""
from __future__ import annotations

import pytest
import torch

from llada_rt import ops, reference

try:
    from llada_rt import _emu
except ImportError:
    _emu = None

requires_emu = pytest.mark.skipif(_emu is None or not hasattr(_emu, "attention"),
                                  reason="llada_rt._emu (kernels under the SIMT emulator) is not built")


def _key_ranges(B: int, Lk: int, padded: bool, empty_row: bool):
    """key_start/key_end int32 (B,): row b starts at a left-padding offset; with empty_row the last row has none."""
    if not padded and not empty_row:
        return None, None
    start = torch.tensor([(b * 37) % max(Lk // 2, 1) if padded else 0 for b in range(B)], dtype=torch.int32)
    end = torch.full((B,), Lk, dtype=torch.int32)
    if padded and B > 1:
        end[0] = max(1, Lk - 3)  # a row that also stops early
    if empty_row:
        start[-1] = end[-1] = Lk // 2
    return start, end


def _inputs(B, Lq, Lk, Hq, Hkv, D, dtype, *, strided, padded=False, empty_row=False, device="cpu"):
    """q (B, Lq, Hq, D) contiguous; k, v (B, Lk, Hkv, D), as views of one bigger interleaved cache when strided."""
    q = torch.randn(B, Lq, Hq, D, dtype=dtype, device=device)
    if strided:
        cache = torch.randn(B, Lk + 9, 2, Hkv, D, dtype=dtype, device=device)  # (B, T_max, k|v, Hkv, D)
        k, v = cache[:, 3:Lk + 3, 0], cache[:, 3:Lk + 3, 1]
    else:
        k = torch.randn(B, Lk, Hkv, D, dtype=dtype, device=device)
        v = torch.randn(B, Lk, Hkv, D, dtype=dtype, device=device)
    key_start, key_end = _key_ranges(B, Lk, padded, empty_row)
    if key_start is not None:
        key_start, key_end = key_start.to(device), key_end.to(device)
    return q, k, v, key_start, key_end


def _low_precision_ref(q, k, v, key_start, key_end, scale):
    """The reference math in the input dtype (scale folded into q first, as FA's reorder_ops): the error budget."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    kr = k.repeat_interleave(Hq // Hkv, dim=2)
    vr = v.repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q * scale, kr)                           # (B, Hq, Lq, Lk) in q.dtype
    pos = torch.arange(Lk, device=q.device)
    start = torch.zeros(B, dtype=torch.long, device=q.device) if key_start is None else key_start.long()
    end = torch.full((B,), Lk, dtype=torch.long, device=q.device) if key_end is None else key_end.long()
    valid = (pos[None] >= start[:, None]) & (pos[None] < end[:, None])           # (B, Lk)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, vr)


def _check_close(out, q, k, v, key_start, key_end, scale, label):
    ref = reference.attention(q, k, v, key_start, key_end, scale).float()
    low = _low_precision_ref(q, k, v, key_start, key_end, scale).float()
    err = (out.float() - ref).abs()
    budget = 2 * (low - ref).abs().max().item() + 1e-5
    print(f"{label}: max err {err.max().item():.3g} mean {err.mean().item():.3g} | low-precision ref max "
          f"{(low - ref).abs().max().item():.3g} -> budget {budget:.3g}")
    assert torch.isfinite(out.float()).all(), f"{label}: non-finite output"
    assert err.max().item() <= budget, f"{label}: max error {err.max().item():.3g} > budget {budget:.3g}"
    if key_start is not None:
        empty = (key_end <= key_start).cpu()
        assert (out.cpu()[empty] == 0).all(), f"{label}: a row with no valid key must be zeros"


# (B, Lq, Lk, Hq, Hkv, D, strided, padded, empty_row)
CPU_SHAPES = [
    (1, 1, 1, 1, 1, 64, False, False, False),
    (3, 17, 113, 4, 1, 128, True, True, False),
    (1, 113, 17, 4, 4, 64, False, True, False),
    (3, 1, 1000, 4, 4, 128, True, True, True),
    (1, 1000, 113, 1, 1, 64, True, False, False),
    (3, 113, 1000, 4, 1, 64, False, True, False),
    (1, 1000, 1000, 4, 4, 128, True, True, False),
    (3, 17, 17, 1, 1, 128, False, False, True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "B{}-Lq{}-Lk{}-H{}/{}-D{}{}{}{}".format(
    *s[:6], "-strided" if s[6] else "", "-padded" if s[7] else "", "-empty" if s[8] else ""))
def test_cpu_matches_reference(shape, dtype):
    B, Lq, Lk, Hq, Hkv, D, strided, padded, empty_row = shape
    q, k, v, ks, ke = _inputs(B, Lq, Lk, Hq, Hkv, D, dtype, strided=strided, padded=padded, empty_row=empty_row)
    out = ops.attention(q, k, v, ks, ke)
    assert out.shape == q.shape and out.dtype == dtype
    _check_close(out, q, k, v, ks, ke, D ** -0.5, f"cpu {shape} {dtype}")


def test_cpu_float32_and_out_argument():
    q, k, v, ks, ke = _inputs(2, 33, 70, 4, 2, 64, torch.float32, strided=True, padded=True)
    out = torch.full_like(q, float("nan"))
    got = ops.attention(q, k, v, ks, ke, scale=0.1, out=out)
    ref = reference.attention(q, k, v, ks, ke, scale=0.1)
    print(f"fp32 max err {(got - ref).abs().max().item():.3g}")
    assert got is out
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_opcheck():
    q, k, v, ks, ke = _inputs(2, 17, 40, 4, 2, 64, torch.bfloat16, strided=True, padded=True)
    torch.library.opcheck(torch.ops.llada_rt.attention.default, (q, k, v, ks, ke, 0.125))
    torch.library.opcheck(torch.ops.llada_rt.attention.default, (q, k, v, None, None, 0.125))
    out = torch.empty_like(q)
    torch.library.opcheck(torch.ops.llada_rt.attention_out.default, (out, q, k, v, ks, ke, 0.125))


@pytest.mark.parametrize("make, match", [
    (lambda q, k, v: (q.float(), k, v), "share a dtype"),
    (lambda q, k, v: (q[..., :32], k, v), "k must be"),
    (lambda q, k, v: (q, torch.randn(1, 7, 3, 64).bfloat16(), torch.randn(1, 7, 3, 64).bfloat16()), "multiple of Hkv"),
    (lambda q, k, v: (q, k, v[:, :5]), "v must have k's shape"),
    (lambda q, k, v: (q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v), "unit stride over D"),
    (lambda q, k, v: (q[0], k, v), r"q must be \(B, Lq, Hq, D\)"),
])
def test_input_errors(make, match):
    q, k, v, _, _ = _inputs(1, 5, 7, 4, 2, 64, torch.bfloat16, strided=False)
    with pytest.raises(ops.OpInputError, match=match):
        ops.attention(*make(q, k, v))


def test_key_range_errors():
    q, k, v, _, _ = _inputs(2, 5, 7, 2, 2, 64, torch.bfloat16, strided=False)
    with pytest.raises(ops.OpInputError, match="integer tensor"):
        ops.attention(q, k, v, torch.zeros(2), None)
    with pytest.raises(ops.OpInputError, match="shape"):
        ops.attention(q, k, v, torch.zeros(3, dtype=torch.int32), None)


# ---- the CUDA kernel under the SIMT emulator (slow: keep the big shapes few) --------------------------------------

def _emu_attention(q, k, v, key_start, key_end, scale):
    out = torch.full_like(q, float("nan"))  # every element must be written
    args, _keep = ops._attention_args(out, q, k, v, key_start, key_end, scale)
    _emu.attention(*args)
    return out


EMU_SHAPES = [
    (1, 17, 113, 4, 1, 64, True, True, False),
    (3, 1, 17, 1, 1, 128, True, False, True),
    (1, 113, 1000, 1, 1, 128, False, True, False),
    (1, 1000, 17, 1, 1, 64, True, False, False),
    (3, 17, 70, 4, 4, 64, False, True, True),
    (1, 113, 113, 2, 1, 128, True, True, False),
    pytest.param((1, 1000, 1000, 1, 1, 128, True, True, False), marks=pytest.mark.slow),
]


@requires_emu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "B{}-Lq{}-Lk{}-H{}/{}-D{}".format(*s[:6]))
def test_emulated_kernel_matches_reference(shape, dtype):
    B, Lq, Lk, Hq, Hkv, D, strided, padded, empty_row = shape
    if (Lq >= 1000 or Lk >= 1000) and dtype == torch.float16:
        pytest.skip("the big shapes run once (bf16): the emulator is slow")
    q, k, v, ks, ke = _inputs(B, Lq, Lk, Hq, Hkv, D, dtype, strided=strided, padded=padded, empty_row=empty_row)
    out = _emu_attention(q, k, v, ks, ke, D ** -0.5)
    _check_close(out, q, k, v, ks, ke, D ** -0.5, f"emu {shape} {dtype}")


@requires_emu
def test_emulated_kernel_checks_layout_before_launch():
    q, k, v, _, _ = _inputs(1, 4, 4, 1, 1, 96, torch.bfloat16, strided=False)
    out = torch.empty_like(q)
    args, _keep = ops._attention_args(out, q, k, v, None, None, 0.1)
    with pytest.raises(ValueError, match="head dim 64 or 128"):
        _emu.attention(*args)


# ---- on a GPU ---------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCUDA:
    SHAPES = CPU_SHAPES + [
        (2, 64, 8192, 32, 32, 128, True, True, False),   # a block of queries against a long cached prefix
        (1, 1000, 8192, 8, 2, 128, False, False, False),
    ]

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Lq{}-Lk{}-H{}/{}-D{}".format(*s[:6]))
    def test_matches_reference(self, shape, dtype):
        B, Lq, Lk, Hq, Hkv, D, strided, padded, empty_row = shape
        q, k, v, ks, ke = _inputs(B, Lq, Lk, Hq, Hkv, D, dtype, strided=strided, padded=padded,
                                  empty_row=empty_row, device="cuda")
        out = ops.attention(q, k, v, ks, ke)
        torch.cuda.synchronize()
        _check_close(out, q, k, v, ks, ke, D ** -0.5, f"cuda {shape} {dtype}")

    def test_rejects_unaligned_views(self):
        q, k, v, _, _ = _inputs(1, 8, 16, 1, 1, 64, torch.bfloat16, strided=False, device="cuda")
        buf = torch.randn(1, 16, 1, 65, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(ops.OpInputError, match="16-byte aligned"):
            ops.attention(q, buf[..., 1:], v)

    def test_opcheck(self):
        q, k, v, ks, ke = _inputs(2, 17, 40, 4, 2, 64, torch.bfloat16, strided=True, padded=True, device="cuda")
        torch.library.opcheck(torch.ops.llada_rt.attention.default, (q, k, v, ks, ke, 0.125))
