"""ops.rms_norm against reference.rms_norm (LLaDA's RMSNorm as torch composes it): bit for bit on CPU in fp32, bf16
and fp16 (the kernel adds the squares in the order torch's CPU sum does); input errors; no allocation with out=."""
from __future__ import annotations

import pytest
import torch

from cpu_kernels import cpu_allocations, isa  # noqa: F401 (isa is a fixture)
from llada_rt import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def _inputs(rows: int, d: int, dtype: torch.dtype):
    x = (torch.randn(rows, d) * 3 + 0.5).to(dtype)                                 # (rows, d)
    weight = (torch.rand(d) + 0.5).to(dtype)                                        # (d,)
    return x, weight


def _assert_bit_exact(got: torch.Tensor, ref: torch.Tensor, label: str) -> None:
    diff = (got.float() - ref.float()).abs()
    mismatched = (got != ref).sum().item()
    print(f"{label}: {mismatched} of {ref.numel()} elements differ, max abs diff {diff.max().item():.3g}")
    assert mismatched == 0, (f"{label}: not bit-exact with torch's composition; if torch changed its CPU sum order, "
                             "update torch_row_sum in csrc/cpu/rms_norm.cpp")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 7, 33, 64])
def test_matches_reference_bit_for_bit(rows, dtype, isa):
    for d in (1, 7, 8, 31, 100, 128, 1000, 4097):
        x, weight = _inputs(rows, d, dtype)
        _assert_bit_exact(ops.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5),
                          f"{isa} rows={rows} d={d} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_llada_8b_rows_and_large_values(dtype, isa):
    """d = 4096 rows, several threads' worth of them, with magnitudes far from 1 (the sum of squares is large)."""
    x, weight = _inputs(70, 4096, dtype)
    x = x * 40
    _assert_bit_exact(ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), f"{isa} 70 x 4096 {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_rows_leading_dims_and_out(dtype, isa):
    """x (B, S, d) as a view with a row stride > d (a slice of a wider buffer); out another strided view."""
    buf = (torch.randn(3, 5, 150) * 2).to(dtype)
    x = buf[..., 10:110]                                                            # (3, 5, 100), row stride 150
    weight = (torch.rand(100) + 0.5).to(dtype)
    out_buf = torch.full((3, 5, 120), float("nan"), dtype=dtype)
    out = out_buf[..., :100]
    got = ops.rms_norm(x, weight, 1e-5, out=out)
    assert got is out
    _assert_bit_exact(out, reference.rms_norm(x, weight, 1e-5), f"{isa} strided {dtype}")
    assert torch.isnan(out_buf[..., 100:]).all(), "wrote past the rows of out"


def test_empty_and_opcheck():
    x, weight = _inputs(0, 16, torch.float32)
    assert ops.rms_norm(x, weight, 1e-5).shape == (0, 16)
    x, weight = _inputs(5, 24, torch.bfloat16)
    torch.library.opcheck(torch.ops.llada_rt.rms_norm.default, (x, weight, 1e-5))
    torch.library.opcheck(torch.ops.llada_rt.rms_norm_out.default, (torch.empty_like(x), x, weight, 1e-5))


def test_out_call_allocates_nothing():
    x, weight = _inputs(33, 100, torch.bfloat16)
    out = torch.empty_like(x)
    allocations = cpu_allocations(lambda: ops.rms_norm(x, weight, 1e-5, out=out))
    print(f"allocations: {allocations}")
    assert allocations == []


@pytest.mark.parametrize("make, match", [
    (lambda x, w: (x.to(torch.int32), w), "x must be float32, float16 or bfloat16"),
    (lambda x, w: (x, w[:-1]), r"weight must be \(d,\)"),
    (lambda x, w: (x, w.float()), "weight must have x's dtype"),
    (lambda x, w: (torch.cat([x, x], -1)[:, ::2], w), "unit stride over its last dim"),
    (lambda x, w: (torch.stack([x, x]).transpose(0, 1), w), "do not collapse"),
])
def test_input_errors(make, match):
    x, weight = _inputs(6, 16, torch.bfloat16)
    with pytest.raises(ops.OpInputError, match=match):
        ops.rms_norm(*make(x, weight), 1e-5)


def test_out_errors():
    x, weight = _inputs(6, 16, torch.float32)
    with pytest.raises(ops.OpInputError, match="out must have shape"):
        ops.rms_norm(x, weight, 1e-5, out=torch.empty(6, 15))
    with pytest.raises(ops.OpInputError, match="out must be torch.float32"):
        ops.rms_norm(x, weight, 1e-5, out=torch.empty(6, 16, dtype=torch.bfloat16))
