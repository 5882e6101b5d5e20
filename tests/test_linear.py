"""ops.linear on every path (CPU kernels, torch layouts, the CUDA int8 kernel under the SIMT emulator) against
reference.linear over odd shapes; the Linear container; the path choice by measurement; no allocation with out=.

Tolerances: fp32 paths differ from the fp32 reference only by summation order (relative 1e-5 of sum |x| |w|); bf16
outputs are rounded once (2^-8 relative) on top of that. The CPU int8 kernels quantize each row of x first, to int16
(blocked_int8) or int8 (blocked_int8x4, W8A8), so each is held to the product of that quantized x
(reference.quantize_rows) and, separately, to the plain reference with the budget of that quantization (half a step,
max |x| / (2 qmax), per element, times sum |w|)."""
from __future__ import annotations

import json

import pytest
import torch

from llada_rt import ops, reference
from llada_rt.linear import (ACT_QMAX, CPU_INT8_CANDIDATES, INT8_PATH_ENV, Linear, choose_int8_path, choose_path,
                             measure_paths, quantize_int8)

try:
    from llada_rt import _emu
except ImportError:
    _emu = None

requires_emu = pytest.mark.skipif(_emu is None or not hasattr(_emu, "linear"),
                                  reason="llada_rt._emu (kernels under the SIMT emulator) is not built")


def _supported(path):
    return pytest.mark.skipif(not ops.linear_path_supported(path, "cpu"),
                              reason=f"this CPU cannot run {path} (cpu_features: {ops.cpu_features()})")


ROWS = (1, 7, 33, 64)
SHAPES = [(1, 1), (17, 33), (100, 129), (130, 2050), (64, 16)]   # (N, K): tails of every tile size, odd K
DENSE_PATHS = [("torch_nk", torch.float32), ("torch_kn", torch.float32), ("torch_nk", torch.bfloat16),
               ("torch_kn", torch.bfloat16),
               pytest.param("blocked_f32", torch.float32, marks=_supported("blocked_f32")),
               pytest.param("blocked_bf16", torch.bfloat16, marks=_supported("blocked_bf16"))]


def _check(out, x, w_dense, label, exact_x=None):
    """out vs the fp64 product of x (or exact_x, the activations the kernel really used) and w_dense (N, K)."""
    xs = (x if exact_x is None else exact_x).double()
    ref = xs @ w_dense.double().t()                                               # (M, N)
    mag = xs.abs() @ w_dense.double().abs().t()                                   # sum_k |x| |w|
    rounding = 2.0 ** -8 if out.dtype == torch.bfloat16 else 0.0
    tol = rounding * ref.abs() + 1e-5 * mag + 1e-30
    ratio = ((out.double() - ref).abs() / tol).max().item() if out.numel() else 0.0
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    print(f"{label}: max err {err:.3g}, max err / tol {ratio:.3g}")
    assert torch.isfinite(out.float()).all(), f"{label}: non-finite output"
    assert ratio <= 1.0, f"{label}: error {err:.3g} is {ratio:.3g} x the tolerance"


@pytest.mark.parametrize("path, dtype", DENSE_PATHS)
@pytest.mark.parametrize("N, K", SHAPES)
def test_dense_paths_match_reference(path, dtype, N, K):
    g = torch.Generator().manual_seed(N * 1000 + K)
    W = torch.randn(N, K, generator=g).to(dtype)
    lin = Linear.from_dense(W, path=path)
    assert torch.equal(lin.dense(), W), "dense() must give back the weight exactly"
    for M in ROWS:
        x = torch.randn(M, K, generator=g).to(dtype)
        out = ops.linear(x, lin)
        assert out.shape == (M, N) and out.dtype == dtype
        _check(out, x, W, f"{path} {dtype} M={M} N={N} K={K}")
        ref = reference.linear(x, lin)
        assert ref.shape == out.shape and ref.dtype == out.dtype


INT8_SHAPES = SHAPES + [(70, 4101)]   # K past one 4096-k chunk of blocked_int8x4, not a multiple of 4; N past a panel


@pytest.mark.parametrize("path", [pytest.param(p, marks=_supported(p)) for p in CPU_INT8_CANDIDATES])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K", INT8_SHAPES)
def test_int8_cpu_matches_reference(path, x_dtype, N, K):
    g = torch.Generator().manual_seed(N * 1000 + K + 7)
    W = torch.randn(N, K, generator=g)
    q, scale = quantize_int8(W)
    lin = Linear.from_int8(q, scale, path=path)
    assert lin.path == path and torch.equal(lin.int8()[0], q) and torch.equal(lin.int8()[1], scale)
    assert torch.equal(Linear.from_dense(W, quantize="int8").int8()[0], q)
    deq = q.double() * scale.double()[:, None]
    qmax = ACT_QMAX[path]
    for M in ROWS:
        x = torch.randn(M, K, generator=g).to(x_dtype)
        x[0, :] *= 40                                                             # rows of different scales
        if M > 1:
            x[1, :] = 0                                                           # an all-zero row: scale 0
        out = ops.linear(x, lin)
        assert out.dtype == x_dtype
        if M > 1:
            assert (out[1] == 0).all(), f"{path}: an all-zero row of x must give zeros"
        # the kernel's activations: x per row as q_x * s_x, s_x = max |x| / qmax, q_x rounded half to even
        xq, xs = reference.quantize_rows(x, qmax)
        label = f"{path} x={x_dtype} M={M} N={N} K={K}"
        _check(out, x, deq, label, exact_x=xq * xs)
        ref = reference.linear(x, lin).double()                                   # plain x, dequantised W
        amax = x.float().abs().amax(1, keepdim=True).double()
        bound = ((amax / (2 * qmax)) * deq.abs().sum(1)[None, :] + 2.0 ** -8 * ref.abs()
                 * (x_dtype == torch.bfloat16)).max().item() * 1.01 + 1e-6
        err = (out.double() - ref).abs().max().item()
        print(f"  vs reference.linear: {err:.3g} (bound of the {qmax}-step activation grid {bound:.3g})")
        assert err <= bound
        if path == "blocked_int8x4" and K >= 16 and x_dtype == torch.float32:
            # the exact check above has power: the plain x (no 8-bit rounding) misses the kernel's output by far more
            plain = x.double() @ deq.t()
            mag = x.double().abs() @ deq.abs().t()
            print(f"  vs the plain-x product: {(out.double() - plain).abs().max().item():.3g} "
                  f"(exact tolerance {(1e-5 * mag).max().item():.3g})")
            assert ((out.double() - plain).abs() > 1e-5 * mag).any()


INT8_PATHS = [pytest.param(p, d, marks=_supported(p)) for p in CPU_INT8_CANDIDATES
              for d in (torch.float32, torch.bfloat16)]


def _make(W, path):
    if path in CPU_INT8_CANDIDATES:
        return Linear.from_int8(*quantize_int8(W), path=path)
    return Linear.from_dense(W, path=path)


@pytest.mark.parametrize("path, dtype", DENSE_PATHS + INT8_PATHS)
def test_out_is_written_in_place_without_allocation(path, dtype):
    """With out= nothing is allocated (torch.profiler memory events), 3-D x works, and out may have strided rows."""
    from torch.profiler import ProfilerActivity, profile

    W = torch.randn(96, 48).to(dtype)
    lin = _make(W, path)
    x = torch.randn(2, 5, 48).to(dtype)
    out = torch.empty(2, 5, 96, dtype=dtype)
    ops.linear(x, lin, out=out)   # warm: first calls may set up thread pools
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = ops.linear(x, lin, out=out)
    allocs = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0]
    print(f"{path} {dtype}: allocations with out= {allocs}")
    assert got is out and not allocs
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    if path in CPU_INT8_CANDIDATES:   # the product of the activations as the kernel quantizes them
        xq, xs = reference.quantize_rows(x, ACT_QMAX[path])
        q, scale = lin.int8()
        want = ((xq * xs) @ (q.double() * scale.double()[:, None]).t()).to(dtype)
    else:
        want = reference.linear(x, lin)
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    wide = torch.zeros(10, 100, dtype=dtype)                                      # rows 100 apart
    ops.linear(x.reshape(10, 48), lin, out=wide[:, :96])
    assert torch.equal(wide[:, :96], ops.linear(x.reshape(10, 48), lin)) and (wide[:, 96:] == 0).all()


def test_profiler_sees_an_allocation_without_out():
    """The check above can fail: without out= the same call allocates its result."""
    from torch.profiler import ProfilerActivity, profile

    lin = Linear.from_dense(torch.randn(96, 48), path="torch_nk")
    x = torch.randn(5, 48)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ops.linear(x, lin)
    assert any(e.cpu_memory_usage > 0 for e in prof.events())


@pytest.mark.parametrize("path, dtype", DENSE_PATHS + INT8_PATHS)
def test_row_subset_gives_the_same_tokens(path, dtype):
    """The LM head over only the rows that can be committed (a subset of the block) gives the same argmax tokens as
    over every row; our CPU kernels compute each row independently of the others, bit for bit."""
    g = torch.Generator().manual_seed(3)
    V, d, M = 1000, 64, 32
    W = torch.randn(V, d, generator=g).to(dtype)
    lin = _make(W, path)
    x = torch.randn(M, d, generator=g).to(dtype)
    rows = torch.tensor([0, 3, 4, 9, 17, 30, 31])
    full = ops.linear(x, lin)
    part = ops.linear(x[rows].contiguous(), lin)
    if path.startswith("blocked"):
        assert torch.equal(part, full[rows])
    top2 = full[rows].float().topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 1e-2 * top2[:, 0].abs()                 # ties may go either way
    same = part.float().argmax(-1) == full[rows].float().argmax(-1)
    print(f"{path} {dtype}: {int(decided.sum())} of {len(rows)} rows decided, tokens equal on all of them: "
          f"{bool(same[decided].all())}")
    assert same[decided].all()


def test_linear_errors_name_the_problem():
    lin = Linear.from_dense(torch.randn(8, 4), path="torch_nk")
    with pytest.raises(ops.OpInputError, match="x has 5 features"):
        ops.linear(torch.randn(2, 5), lin)
    with pytest.raises(ops.OpInputError, match="out must have shape"):
        ops.linear(torch.randn(2, 4), lin, out=torch.empty(2, 7))
    with pytest.raises(ops.OpInputError, match="x and out must be too"):
        ops.linear(torch.randn(2, 4).bfloat16(), lin)
    with pytest.raises(ValueError, match="unknown linear path"):
        Linear.from_dense(torch.randn(8, 4), path="fast")
    with pytest.raises(ValueError, match="quantize must be"):
        Linear.from_dense(torch.randn(8, 4), quantize="int4")
    with pytest.raises(ValueError, match="'rows_int8' cannot run on cpu: it is the CUDA layout"):
        Linear.from_dense(torch.randn(8, 4), path="rows_int8")
    if ops.linear_path_supported("blocked_bf16", "cpu"):
        with pytest.raises(ValueError, match="holds bf16 weights"):
            Linear.from_dense(torch.randn(8, 4), path="blocked_bf16")
        with pytest.raises(ops.OpInputError, match="take activations in"):
            ops.linear(torch.randn(2, 4), Linear.from_dense(torch.randn(8, 4).bfloat16(), path="blocked_bf16"))


def test_quantize_int8_is_symmetric_per_row():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(50, 77, generator=g) * torch.logspace(-3, 2, 50)[:, None]
    W[7] = 0                                                                       # an all-zero row
    q, scale = quantize_int8(W, chunk_rows=16)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (50,)
    torch.testing.assert_close(scale, W.abs().amax(1) / 127, rtol=0, atol=0)
    assert q.abs().max() <= 127 and (q.abs().amax(1)[scale > 0] == 127).all() and (q[7] == 0).all()
    err = (q.float() * scale[:, None] - W).abs()
    print(f"max |dequant - W| / (scale / 2): {(err / (scale[:, None] / 2 + 1e-30)).max().item():.4f}")
    assert (err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-30).all()


def test_choose_path_measures_once_and_caches(tmp_path, monkeypatch):
    import llada_rt.linear as L

    monkeypatch.setenv("LLADA_RT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(L, "_CACHE", None)
    W = torch.randn(200, 96)
    path, reason = choose_path(W)
    print(path, reason)
    candidates = [p for p in L.CPU_CANDIDATES[torch.float32] if ops.linear_path_supported(p, "cpu")]
    assert path in candidates
    if len(candidates) > 1:
        files = list(tmp_path.glob("linear_paths-*.json"))
        assert len(files) == 1 and "N=200 K=96" in files[0].read_text()
        monkeypatch.setattr(L, "_CACHE", None)   # a new process: the file decides, nothing is measured again
        monkeypatch.setattr(L, "measure_paths", lambda *a, **k: pytest.fail("measured again despite the cache"))
        assert choose_path(W)[0] == path
    assert Linear.from_dense(W).path == path


def test_the_choice_is_per_thread_count(tmp_path, monkeypatch):
    """The paths scale differently with threads, so the choice is measured (and cached) at torch's thread count at
    the time: another count measures afresh, and each measurement records the count it ran with."""
    import llada_rt.linear as L

    candidates = [p for p in L.CPU_CANDIDATES[torch.float32] if ops.linear_path_supported(p, "cpu")]
    if len(candidates) < 2:
        pytest.skip("one float32 path on this CPU: nothing is measured")
    monkeypatch.setenv("LLADA_RT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(L, "_CACHE", None)
    seen = []
    real = L.measure_paths

    def counting(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(L, "measure_paths", counting)
    W = torch.randn(72, 40)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            path, reason = choose_path(W)
            print(n, path, reason)
            assert f"{n} thread" in reason
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 2]
    cache = json.loads(next(tmp_path.glob("linear_paths-*.json")).read_text())
    assert {cache[f"cpu float32 N=72 K=40 threads={n}"]["threads"] for n in (1, 2)} == {1, 2}


def test_measure_paths_drops_a_wrong_path(monkeypatch):
    """A path whose results are wrong is never chosen, however fast (the check the choice makes on every path)."""
    real = ops.linear

    def broken(x, w, out=None):
        y = real(x, w, out)
        if w.path == "torch_kn":
            y.add_(1.0)
        return y

    monkeypatch.setattr(ops, "linear", broken)
    with pytest.warns(UserWarning, match="torch_kn gives wrong results"):
        res = measure_paths(torch.randn(64, 32), ["torch_nk", "torch_kn"], rows=(1, 4))
    print(res)
    assert res["path"] == "torch_nk" and "torch_kn" not in res["us"]


requires_both_int8 = pytest.mark.skipif(
    not all(ops.linear_path_supported(p, "cpu") for p in CPU_INT8_CANDIDATES),
    reason=f"this CPU cannot run every int8 path (cpu_features: {ops.cpu_features()})")


@requires_both_int8
def test_int8_choice_checks_w8a8_within_its_tolerance_and_drops_a_wrong_one(monkeypatch):
    """Both int8 kernels pass the activation-rounding tolerance of the measurement; a W8A8 kernel off by half an
    8-bit step of one activation per output (a bias of 0.5 |w| max |x| / 127) is dropped, however fast."""
    g = torch.Generator().manual_seed(11)
    q, scale = quantize_int8(torch.randn(200, 300, generator=g))
    res = measure_paths(q, CPU_INT8_CANDIDATES, rows=(1, 7, 33), scale=scale)
    print(res)
    assert set(res["us"]) == set(CPU_INT8_CANDIDATES) and res["path"] in CPU_INT8_CANDIDATES
    real = ops.linear

    def biased(x, w, out=None):
        y = real(x, w, out)
        if w.path == "blocked_int8x4":
            amax = x.float().abs().amax(1, keepdim=True)
            y.add_((0.5 * amax / 127 * 20 * w.dense().abs().amax(1)[None, :]).to(y.dtype))   # 20 activations off
        return y

    monkeypatch.setattr(ops, "linear", biased)
    with pytest.warns(UserWarning, match="blocked_int8x4 gives wrong results for int8"):
        res = measure_paths(q, CPU_INT8_CANDIDATES, rows=(1, 7), scale=scale)
    print(res)
    assert res["path"] == "blocked_int8" and "blocked_int8x4" not in res["us"]


@requires_both_int8
def test_int8_path_is_measured_cached_and_forced_by_env(tmp_path, monkeypatch):
    import llada_rt.linear as L

    monkeypatch.setenv("LLADA_RT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(INT8_PATH_ENV, raising=False)
    monkeypatch.setattr(L, "_CACHE", None)
    q, scale = quantize_int8(torch.randn(150, 72))
    path, reason = choose_int8_path(q, scale)
    print(path, reason)
    assert path in CPU_INT8_CANDIDATES and "measured" in reason
    assert "cpu int8 N=150 K=72" in next(tmp_path.glob("linear_paths-*.json")).read_text()
    monkeypatch.setattr(L, "_CACHE", None)
    monkeypatch.setattr(L, "measure_paths", lambda *a, **k: pytest.fail("measured again despite the cache"))
    assert Linear.from_int8(q, scale).path == path
    for forced in CPU_INT8_CANDIDATES:
        monkeypatch.setenv(INT8_PATH_ENV, forced)
        lin = Linear.from_int8(q, scale)
        assert lin.path == forced and INT8_PATH_ENV in lin.reason and torch.equal(lin.int8()[0], q)
    monkeypatch.setenv(INT8_PATH_ENV, "w8a8")
    with pytest.raises(ValueError, match="LLADA_RT_INT8_PATH must be one of blocked_int8, blocked_int8x4"):
        Linear.from_int8(q, scale)


@_supported("blocked_int8x4")
def test_w8a8_errors_name_the_problem():
    q, scale = quantize_int8(torch.randn(8, 12))
    with pytest.raises(ValueError, match="'blocked_f32' is not an int8 path"):
        Linear.from_int8(q, scale, path="blocked_f32")
    with pytest.raises(ValueError, match="holds int8 weights"):
        Linear.from_dense(torch.randn(8, 12), path="blocked_int8x4")
    big = torch.ones(2, ops.LINEAR_INT8X4_MAX_K + 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="only up to K = 65536, got K = 65537; use blocked_int8"):
        Linear.from_int8(big, torch.ones(2), path="blocked_int8x4")
    assert choose_int8_path(big, torch.ones(2))[0] == "blocked_int8"   # the only int8 path at that K
    lin = Linear.from_int8(q, scale, path="blocked_int8x4")
    with pytest.raises(ops.OpInputError, match="take activations in"):
        ops.linear(torch.randn(3, 12).half(), lin)


# ---- the CUDA int8 kernel under the SIMT emulator ------------------------------------------------------------------

def _emu_linear(x, q, scale, n_splits):
    M, K = x.shape
    N = q.shape[0]
    out = torch.full((M, N), 12345.0, dtype=torch.bfloat16)
    _emu.linear(out.data_ptr(), x.data_ptr(), q.data_ptr(), scale.data_ptr(), x.stride(0), out.stride(0), M, N, K,
                ops.DTYPE_CODES[torch.bfloat16], ops.LINEAR_LAYOUTS["rows_int8"], n_splits)
    return out


@requires_emu
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N, K, n_splits", [(8, 16, 1), (100, 80, 1), (130, 208, 2), (40, 336, 0)])
def test_cuda_int8_kernel_emulated(M, N, K, n_splits):
    """linear_kernel (csrc/linear.cuh) on host memory against reference.linear on the same int8 Linear (K % 16 == 0,
    not a multiple of the 64-k chunk; N not a multiple of the 128-column tile; split-K as given or as on an H100)."""
    g = torch.Generator().manual_seed(M * 7 + N + K)
    W = torch.randn(N, K, generator=g)
    q, scale = quantize_int8(W)
    x = torch.randn(M, K, generator=g).bfloat16()
    out = _emu_linear(x, q, scale, n_splits)
    deq = q.double() * scale.double()[:, None]
    _check(out, x, deq, f"emu int8 M={M} N={N} K={K} splits={n_splits}")
    lin = Linear(path="rows_int8", tensor=q, N=N, K=K, scale=scale)   # the CUDA layout, held here on the CPU
    ref = reference.linear(x, lin)
    print(f"  vs reference.linear: {(out.float() - ref.float()).abs().max().item():.3g}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N, K", [(100, 80), (4096, 4096), (130, 208)])
def test_cuda_int8_matches_reference(M, N, K):
    g = torch.Generator().manual_seed(M + N + K)
    W = torch.randn(N, K, generator=g)
    lin = Linear.from_dense(W.cuda(), quantize="int8")
    assert lin.path == "rows_int8"
    x = torch.randn(M, K, generator=g).bfloat16()
    out = ops.linear(x.cuda(), lin).cpu()
    q, scale = lin.int8()
    _check(out, x, q.cpu().double() * scale.cpu().double()[:, None], f"cuda int8 M={M} N={N} K={K}")
