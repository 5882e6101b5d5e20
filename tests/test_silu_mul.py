"""ops.silu_mul against reference.silu_mul (F.silu(gate) * up in the dtype, as LLaDA's SwiGLU computes it) on CPU:
the same two roundings as torch (silu rounded to the dtype, then the product); the exp differs from torch's (Sleef)
by an ulp, so fp32 results agree within a few fp32 ulps and bf16/fp16 results almost always exactly."""
from __future__ import annotations

import pytest
import torch

from cpu_kernels import cpu_allocations, isa  # noqa: F401 (isa is a fixture)
from llada_rt import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
MAX_ULPS = {torch.float32: 4, torch.bfloat16: 1, torch.float16: 1}


def _ulps(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|got - ref| in units of the spacing of ref's dtype at ref (the subnormal spacing near 0); 0 where equal (inf)."""
    fi = torch.finfo(ref.dtype)
    r = ref.double()
    spacing = torch.exp2(torch.floor(torch.log2(r.abs().clamp(min=fi.smallest_normal)))) * fi.eps
    return torch.where(got == ref, 0.0, (got.double() - r).abs() / spacing)


def _check(got, ref, label):
    ulps = _ulps(got, ref)
    exact = (got == ref).double().mean().item()
    print(f"{label}: max {ulps.max().item():.2f} ulps, {100 * exact:.3f}% bit-exact, max abs diff "
          f"{(got.double() - ref.double()).abs().max().item():.3g}")
    assert torch.isfinite(got).all()
    assert ulps.max().item() <= MAX_ULPS[ref.dtype], f"{label}: more than {MAX_ULPS[ref.dtype]} ulps from torch"
    if ref.dtype != torch.float32:
        assert exact >= 0.999, f"{label}: the rounding steps differ from torch's"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 7, 33, 64])
def test_matches_reference(rows, dtype, isa):
    for F in (1, 7, 16, 100, 2049):
        gate_up = (torch.randn(rows, 2 * F) * 4).to(dtype)                          # (rows, 2F)
        _check(ops.silu_mul(gate_up), reference.silu_mul(gate_up), f"{isa} rows={rows} F={F} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_extreme_gates(dtype):
    """Gates where exp(-g) over- and underflows (silu -> 0 and -> g), zeros and the dtype's extremes."""
    fi = torch.finfo(dtype)
    g = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 87.0, -87.0, 88.5, -88.5, 89.0, -89.0, 100.0, -100.0,
                      fi.max, -fi.max, fi.tiny, -fi.tiny], dtype=torch.float32).clamp(-fi.max, fi.max).to(dtype)
    gate_up = torch.cat([g, torch.full_like(g, 1.5)])[None]                          # (1, 2F)
    got, ref = ops.silu_mul(gate_up), reference.silu_mul(gate_up)
    print(f"{dtype}: got {got.tolist()} ref {ref.tolist()}")
    assert (_ulps(got, ref) <= MAX_ULPS[dtype]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_llada_8b_rows_leading_dims_and_strided_out(dtype):
    """(B, S, 2F) with F = 12288 (LLaDA-8B's MLP), out a strided view of a wider buffer."""
    gate_up = (torch.randn(2, 3, 2 * 12288) * 3).to(dtype)
    out_buf = torch.full((2, 3, 12300), float("nan"), dtype=dtype)
    out = out_buf[..., :12288]
    assert ops.silu_mul(gate_up, out=out) is out
    _check(out, reference.silu_mul(gate_up), f"(2, 3, 2x12288) {dtype}")
    assert torch.isnan(out_buf[..., 12288:]).all(), "wrote past the rows of out"


def test_empty_and_opcheck():
    assert ops.silu_mul(torch.randn(0, 8)).shape == (0, 4)
    gate_up = torch.randn(5, 48).bfloat16()
    torch.library.opcheck(torch.ops.llada_rt.silu_mul.default, (gate_up,))
    torch.library.opcheck(torch.ops.llada_rt.silu_mul_out.default, (torch.empty(5, 24, dtype=torch.bfloat16), gate_up))


def test_out_call_allocates_nothing():
    gate_up = torch.randn(33, 2 * 100).bfloat16()
    out = torch.empty(33, 100, dtype=torch.bfloat16)
    allocations = cpu_allocations(lambda: ops.silu_mul(gate_up, out=out))
    print(f"allocations: {allocations}")
    assert allocations == []


def test_input_errors():
    with pytest.raises(ops.OpInputError, match="even last dim"):
        ops.silu_mul(torch.randn(3, 7))
    with pytest.raises(ops.OpInputError, match="float32, float16 or bfloat16"):
        ops.silu_mul(torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(ops.OpInputError, match=r"out must have shape \(3, 4\)"):
        ops.silu_mul(torch.randn(3, 8), out=torch.empty(3, 8))
    with pytest.raises(ops.OpInputError, match="unit stride"):
        ops.silu_mul(torch.randn(3, 16)[:, ::2])
