"""ops.attention (CPU, CUDA) and the CUDA kernel under the SIMT emulator against reference.attention, with per-row key
ranges, GQA, strided cache views and kv_rows (q row b reads row kv_rows[b] of a persistent cache); the dispatch table.

Tolerance (flash-attention's rule): the kernel's max error against the fp32 reference must be at most twice the max
error of the same math run in the input dtype, plus 1e-5."""
from __future__ import annotations

import pytest
import torch

from cpu_kernels import cpu_allocations, isa  # noqa: F401 (isa is a fixture)
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


def _inputs(B, Lq, Lk, Hq, Hkv, D, dtype, *, strided, padded=False, empty_row=False, cache_rows=0, device="cpu"):
    """q (B, Lq, Hq, D) contiguous; k, v (B, Lk, Hkv, D), as views of one bigger interleaved cache when strided. With
    cache_rows = R > 0, k/v are (R, Lk, Hkv, D) slots of a persistent cache laid out (T, R, k|v, Hkv, D) (so R is not
    the outermost stride) and kv_rows int32 (B,) picks q row b's slot; else kv_rows is None."""
    q = torch.randn(B, Lq, Hq, D, dtype=dtype, device=device)
    kv_rows = None
    if cache_rows:
        cache = torch.randn(Lk + 5, cache_rows, 2, Hkv, D, dtype=dtype, device=device)  # (T_max, R, k|v, Hkv, D)
        k, v = cache[2:Lk + 2, :, 0].transpose(0, 1), cache[2:Lk + 2, :, 1].transpose(0, 1)  # (R, Lk, Hkv, D)
        kv_rows = torch.tensor([(3 * b + 1) % cache_rows for b in range(B)], dtype=torch.int32, device=device)
    elif strided:
        cache = torch.randn(B, Lk + 9, 2, Hkv, D, dtype=dtype, device=device)  # (B, T_max, k|v, Hkv, D)
        k, v = cache[:, 3:Lk + 3, 0], cache[:, 3:Lk + 3, 1]
    else:
        k = torch.randn(B, Lk, Hkv, D, dtype=dtype, device=device)
        v = torch.randn(B, Lk, Hkv, D, dtype=dtype, device=device)
    key_start, key_end = _key_ranges(B, Lk, padded, empty_row)
    if key_start is not None:
        key_start, key_end = key_start.to(device), key_end.to(device)
    return q, k, v, key_start, key_end, kv_rows


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


def _check_close(out, q, k, v, key_start, key_end, scale, label, kv_rows=None):
    ref = reference.attention(q, k, v, key_start, key_end, scale, kv_rows=kv_rows).float()
    if kv_rows is not None:
        k, v = k[kv_rows.long()], v[kv_rows.long()]                                   # (B, Lk, Hkv, D)
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


# (B, Lq, Lk, Hq, Hkv, D, strided, padded, empty_row, cache_rows)
CPU_SHAPES = [
    (1, 1, 1, 1, 1, 64, False, False, False, 0),
    (3, 17, 113, 4, 1, 128, True, True, False, 0),
    (1, 113, 17, 4, 4, 64, False, True, False, 0),
    (3, 1, 1000, 4, 4, 128, True, True, True, 0),
    (1, 1000, 113, 1, 1, 64, True, False, False, 0),
    (3, 113, 1000, 4, 1, 64, False, True, False, 0),
    (1, 1000, 1000, 4, 4, 128, True, True, False, 0),
    (3, 17, 17, 1, 1, 128, False, False, True, 0),
    (3, 33, 70, 4, 2, 64, True, True, True, 5),      # three requests in slots of a 5-row persistent cache
    (2, 40, 170, 2, 2, 64, True, True, False, 8),    # the shipped model's shapes
    (1, 32, 300, 4, 4, 128, True, False, False, 1),
]


def _shape_id(s):
    return "B{}-Lq{}-Lk{}-H{}/{}-D{}".format(*s[:6]) + "".join(
        tag for flag, tag in zip(s[6:9], ("-strided", "-padded", "-empty")) if flag) + (f"-R{s[9]}" if s[9] else "")


def _run_cpu(shape, dtype, label):
    B, Lq, Lk, Hq, Hkv, D, strided, padded, empty_row, cache_rows = shape
    q, k, v, ks, ke, kv_rows = _inputs(B, Lq, Lk, Hq, Hkv, D, dtype, strided=strided, padded=padded,
                                       empty_row=empty_row, cache_rows=cache_rows)
    out = ops.attention(q, k, v, ks, ke, kv_rows=kv_rows)
    assert out.shape == q.shape and out.dtype == dtype
    _check_close(out, q, k, v, ks, ke, D ** -0.5, label, kv_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_shape_id)
def test_cpu_matches_reference(shape, dtype):
    _run_cpu(shape, dtype, f"cpu {ops.cpu_isa()} {_shape_id(shape)} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpu_each_instruction_set(dtype, isa):
    """The AVX2 and baseline paths (what CPUs without AVX-512 run), on the shapes that exercise every tail."""
    for shape in [(3, 17, 113, 4, 1, 128, True, True, False, 0), (3, 33, 70, 4, 2, 64, True, True, True, 5),
                  (2, 9, 31, 2, 1, 40, True, True, False, 0), (1, 5, 7, 1, 1, 1, False, False, False, 0)]:
        _run_cpu(shape, dtype, f"cpu {isa} {_shape_id(shape)} {dtype}")


def test_cpu_odd_head_dims():
    """Head dims that are not a multiple of the vector width, up to the CPU kernel's limit."""
    for D in (1, 2, 24, 40, 72, 100, 250, 256):
        _run_cpu((2, 9, 37, 2, 1, D, True, True, False, 3), torch.bfloat16, f"cpu D={D}")


def test_cpu_float32_and_out_argument():
    q, k, v, ks, ke, _ = _inputs(2, 33, 70, 4, 2, 64, torch.float32, strided=True, padded=True)
    out = torch.full_like(q, float("nan"))
    got = ops.attention(q, k, v, ks, ke, scale=0.1, out=out)
    ref = reference.attention(q, k, v, ks, ke, scale=0.1)
    print(f"fp32 max err {(got - ref).abs().max().item():.3g}")
    assert got is out
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cpu_kv_rows_read_the_cache_in_place():
    """kv_rows int64 (converted) and int32 give the same result as attending the gathered rows; rows may repeat."""
    q, k, v, ks, ke, _ = _inputs(3, 20, 50, 2, 2, 64, torch.bfloat16, strided=False, padded=True, cache_rows=0)
    cache_k, cache_v = torch.randn(6, 50, 2, 64).bfloat16(), torch.randn(6, 50, 2, 64).bfloat16()  # (R, T, Hkv, D)
    rows = torch.tensor([5, 2, 5])
    want = ops.attention(q, cache_k[rows], cache_v[rows], ks, ke)
    for kv_rows in (rows, rows.int()):
        got = ops.attention(q, cache_k, cache_v, ks, ke, kv_rows=kv_rows)
        print(f"kv_rows {kv_rows.dtype}: max diff to the gathered rows {(got.float() - want.float()).abs().max():.3g}")
        assert torch.equal(got, want)


def test_cpu_kv_rows_outside_the_cache_raise_and_write_nothing():
    q, k, v, _, _, _ = _inputs(2, 5, 7, 2, 2, 64, torch.float32, strided=False, cache_rows=3)
    out = torch.zeros_like(q)
    for bad in (3, -1):
        with pytest.raises(ops.OpInputError, match=rf"kv_rows\[1\] = {bad} is outside the R = 3 rows of k/v"):
            ops.attention(q, k, v, kv_rows=torch.tensor([0, bad], dtype=torch.int32), out=out)
        assert (out == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_out_call_allocates_nothing(dtype):
    q, k, v, ks, ke, kv_rows = _inputs(3, 33, 70, 4, 2, 64, dtype, strided=True, padded=True, cache_rows=5)
    out = torch.empty_like(q)
    allocations = cpu_allocations(lambda: ops.attention(q, k, v, ks, ke, kv_rows=kv_rows, out=out))
    print(f"allocations: {allocations}")
    assert allocations == []


def test_opcheck():
    q, k, v, ks, ke, kv_rows = _inputs(2, 17, 40, 4, 2, 64, torch.bfloat16, strided=True, padded=True, cache_rows=3)
    torch.library.opcheck(torch.ops.llada_rt.attention.default, (q, k, v, ks, ke, kv_rows, 0.125))
    q, k, v, ks, ke, _ = _inputs(2, 17, 40, 4, 2, 64, torch.bfloat16, strided=True, padded=True)
    torch.library.opcheck(torch.ops.llada_rt.attention.default, (q, k, v, None, None, None, 0.125))
    out = torch.empty_like(q)
    torch.library.opcheck(torch.ops.llada_rt.attention_out.default, (out, q, k, v, ks, ke, None, 0.125))


@pytest.mark.parametrize("make, match", [
    (lambda q, k, v: (q.float(), k, v), "share a dtype"),
    (lambda q, k, v: (q[..., :32], k, v), "k must be"),
    (lambda q, k, v: (q, torch.randn(1, 7, 3, 64).bfloat16(), torch.randn(1, 7, 3, 64).bfloat16()), "multiple of Hkv"),
    (lambda q, k, v: (q, k, v[:, :5]), "v must have k's shape"),
    (lambda q, k, v: (q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v), "unit stride over D"),
    (lambda q, k, v: (q[0], k, v), r"q must be \(B, Lq, Hq, D\)"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "no attention for float64 on cpu; supported: cpu float32"),
])
def test_input_errors(make, match):
    q, k, v, _, _, _ = _inputs(1, 5, 7, 4, 2, 64, torch.bfloat16, strided=False)
    with pytest.raises(ops.OpInputError, match=match):
        ops.attention(*make(q, k, v))


def test_key_range_and_kv_rows_errors():
    q, k, v, _, _, _ = _inputs(2, 5, 7, 2, 2, 64, torch.bfloat16, strided=False)
    with pytest.raises(ops.OpInputError, match="integer tensor"):
        ops.attention(q, k, v, torch.zeros(2), None)
    with pytest.raises(ops.OpInputError, match="shape"):
        ops.attention(q, k, v, torch.zeros(3, dtype=torch.int32), None)
    with pytest.raises(ops.OpInputError, match=r"kv_rows must have shape \(B,\)"):
        ops.attention(q, k, v, kv_rows=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ops.OpInputError, match="kv_rows must be an integer tensor"):
        ops.attention(q, k, v, kv_rows=torch.zeros(2))
    with pytest.raises(ops.OpInputError, match=r"k must be \(B=2, Lk, Hkv, D=64\)"):
        ops.attention(q, k[:1], v[:1])
    with pytest.raises(ops.OpInputError, match="head dim D in \\[1, 256\\]"):
        q2 = torch.randn(1, 2, 1, 264)
        ops.attention(q2, q2, q2)


def test_dispatch_table():
    """One table by (device, dtype); CUDA fp32 is SDPA by choice; anything else raises naming what is supported."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert "csrc/cpu/attention.cpp" in ops.attention_backend("cpu", dtype, 128)
    assert "csrc/attention.cu" in ops.attention_backend("cuda", torch.bfloat16, 128)
    assert "csrc/attention.cu" in ops.attention_backend(torch.device("cuda:0"), torch.float16, 64)
    assert "scaled_dot_product_attention" in ops.attention_backend("cuda", torch.float32, 96)
    with pytest.raises(ops.OpInputError, match=r"CUDA kernel supports head dim D in \(64, 128\), got 96"):
        ops.attention_backend("cuda", torch.bfloat16, 96)
    with pytest.raises(ops.OpInputError,
                       match="no attention for float64 on cuda; supported: cpu float32, cpu bfloat16"):
        ops.attention_backend("cuda", torch.float64, 128)


# ---- the CUDA kernel under the SIMT emulator (slow: keep the big shapes few) --------------------------------------

def _emu_attention(q, k, v, key_start, key_end, scale, kv_rows=None, n_splits=0):
    out = torch.full_like(q, float("nan"))  # every element must be written
    args, _keep = ops._attention_args(out, q, k, v, key_start, key_end, kv_rows, scale)
    _emu.attention(*args, n_splits=n_splits)
    return out


EMU_SHAPES = [
    (1, 17, 113, 4, 1, 64, True, True, False, 0),
    (3, 1, 17, 1, 1, 128, True, False, True, 0),
    (1, 113, 1000, 1, 1, 128, False, True, False, 0),
    (1, 1000, 17, 1, 1, 64, True, False, False, 0),
    (3, 17, 70, 4, 4, 64, False, True, True, 0),
    (1, 113, 113, 2, 1, 128, True, True, False, 0),
    (3, 17, 150, 2, 1, 64, True, True, True, 5),
    pytest.param((1, 1000, 1000, 1, 1, 128, True, True, False, 0), marks=pytest.mark.slow),
]


@requires_emu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=_shape_id)
def test_emulated_kernel_matches_reference(shape, dtype):
    B, Lq, Lk, Hq, Hkv, D, strided, padded, empty_row, cache_rows = shape
    if (Lq >= 1000 or Lk >= 1000) and dtype == torch.float16:
        pytest.skip("the big shapes run once (bf16): the emulator is slow")
    q, k, v, ks, ke, kv_rows = _inputs(B, Lq, Lk, Hq, Hkv, D, dtype, strided=strided, padded=padded,
                                       empty_row=empty_row, cache_rows=cache_rows)
    out = _emu_attention(q, k, v, ks, ke, D ** -0.5, kv_rows)
    _check_close(out, q, k, v, ks, ke, D ** -0.5, f"emu {_shape_id(shape)} {dtype}", kv_rows)


@requires_emu
def test_emulated_split_kv_with_kv_rows():
    """The split-KV path (several blocks per query block, then the combine kernel) reading cache slots."""
    q, k, v, ks, ke, kv_rows = _inputs(3, 20, 200, 2, 1, 64, torch.bfloat16, strided=True, padded=True,
                                       empty_row=True, cache_rows=4)
    out = _emu_attention(q, k, v, ks, ke, 0.125, kv_rows, n_splits=3)
    _check_close(out, q, k, v, ks, ke, 0.125, "emu split-KV x3 with kv_rows", kv_rows)


@requires_emu
def test_emulated_kernel_checks_layout_before_launch():
    q, k, v, _, _, _ = _inputs(1, 4, 4, 1, 1, 96, torch.bfloat16, strided=False)
    out = torch.empty_like(q)
    args, _keep = ops._attention_args(out, q, k, v, None, None, None, 0.1)
    with pytest.raises(ValueError, match="head dim 64 or 128"):
        _emu.attention(*args)


# ---- on a GPU ---------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCUDA:
    SHAPES = CPU_SHAPES + [
        (2, 64, 8192, 32, 32, 128, True, True, False, 0),   # a block of queries against a long cached prefix
        (1, 1000, 8192, 8, 2, 128, False, False, False, 0),
        (2, 64, 4096, 32, 32, 128, True, True, True, 6),    # split-KV over cache slots
    ]

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32-sdpa"])
    @pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
    def test_matches_reference(self, shape, dtype):
        B, Lq, Lk, Hq, Hkv, D, strided, padded, empty_row, cache_rows = shape
        q, k, v, ks, ke, kv_rows = _inputs(B, Lq, Lk, Hq, Hkv, D, dtype, strided=strided, padded=padded,
                                           empty_row=empty_row, cache_rows=cache_rows, device="cuda")
        out = ops.attention(q, k, v, ks, ke, kv_rows=kv_rows)
        torch.cuda.synchronize()
        _check_close(out, q, k, v, ks, ke, D ** -0.5, f"cuda {_shape_id(shape)} {dtype}", kv_rows)

    def test_rejects_unaligned_views(self):
        q, k, v, _, _, _ = _inputs(1, 8, 16, 1, 1, 64, torch.bfloat16, strided=False, device="cuda")
        buf = torch.randn(1, 16, 1, 65, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(ops.OpInputError, match="16-byte aligned"):
            ops.attention(q, buf[..., 1:], v)

    def test_opcheck(self):
        q, k, v, ks, ke, kv_rows = _inputs(2, 17, 40, 4, 2, 64, torch.bfloat16, strided=True, padded=True,
                                           cache_rows=3, device="cuda")
        torch.library.opcheck(torch.ops.llada_rt.attention.default, (q, k, v, ks, ke, kv_rows, 0.125))
