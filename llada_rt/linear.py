"""Linear: one linear layer's weight as held for inference (one representation, picked at load), int8 quantization, and
the per-shape choice of the fastest CPU path (float or int8 weights) by measurement (cached per machine)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import torch

QUANTIZE_MODES = ("int8",)

# The CPU paths measured for dense weights of each dtype; the first is the plain layout W (N, K), kept on near-ties.
CPU_CANDIDATES = {torch.float32: ("torch_nk", "torch_kn", "blocked_f32"),
                  torch.bfloat16: ("torch_nk", "torch_kn", "blocked_bf16"),
                  torch.float16: ("torch_nk", "torch_kn")}
# The CPU paths measured for int8 weights (csrc/linear.h): x quantized per row to int16 (vpdpwssd), kept on near-ties,
# or to int8 (W8A8, vpdpbusd: twice the multiply rate, coarser activations; only up to K = ops.LINEAR_INT8X4_MAX_K).
CPU_INT8_CANDIDATES = ("blocked_int8", "blocked_int8x4")
INT8_PATH_ENV = "LLADA_RT_INT8_PATH"   # set to one of CPU_INT8_CANDIDATES: every CPU int8 weight takes it, unmeasured
ACT_QMAX = {"blocked_int8": 32767, "blocked_int8x4": 127}   # the CPU int8 kernels' activation grids (quantize_rows)
MEASURE_ROWS = (1, 8, 32, 64, 256)   # the step shapes: one masked row up to a 64-position block, and an engine step of
                                     # 8 requests' 32-position blocks
SAMPLE_BYTES = 32 << 20          # weight rows measured per shape: about an L3's worth, so streaming from memory counts
ROTATE_BYTES = 8 << 20           # smaller samples are measured in turn over copies of this many bytes in all: in a
                                 # forward each weight comes back after every other layer's, out of L2 by then
ROTATE_COPIES = 64               # at most this many copies (a tiny weight's copies would take seconds to time)
NEAR_TIE = 0.03                  # another path must be this much faster than the plain layout to replace it
CACHE_VERSION = 2                # bump when the kernels or the measurement change, to measure afresh
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # candidate vs fp32 ref, of max |ref|
# int8 paths vs the fp32 product of the dequantised weights: rounding x to the grid s = max |x| / qmax of its row moves
# each x[k] by at most s / 2, roughly uniformly (std s / sqrt(12)) and independently over k, so an output moves by about
# N(0, (s / sqrt(12))^2 sum_k w[n, k]^2); a working kernel stays within _ACT_SIGMAS of that std (the measured sample has
# at most 64 x 8192 outputs: a normal tail beyond 6 sigma is 2e-9 per output), plus fp32 summation slack.
_ACT_SIGMAS = 6.0


def _ops():
    from . import ops  # the compiled kernels; the dense torch paths and the reference never need them

    return ops


@dataclasses.dataclass(eq=False)
class Linear:
    """The weight W (N, K) (out x in, as safetensors stores it) of one linear layer, held in the layout of `path`
    (see ops.linear): torch_nk W itself, torch_kn W^T contiguous, blocked_f32 / blocked_bf16 / blocked_int8 /
    blocked_int8x4 (W8A8) the packed CPU layouts of csrc/linear.h, rows_int8 int8 (N, K) for CUDA. int8 paths carry
    per-output-channel scales (N,)."""
    path: str
    tensor: torch.Tensor
    N: int
    K: int
    scale: torch.Tensor | None = None
    reason: str = dataclasses.field(default="", repr=False)   # how the path was chosen (describe())

    @classmethod
    def from_dense(cls, w: torch.Tensor, *, path: str | None = None, quantize: str | None = None) -> "Linear":
        """From the dense weight w (N, K) on its device and in its dtype; path None picks the fastest by measurement
        (choose_path); quantize "int8" holds symmetric per-output-channel int8 weights instead."""
        if w.dim() != 2:
            raise ValueError(f"Linear.from_dense: the weight must be (N, K), got shape {tuple(w.shape)}")
        if quantize is not None:
            if quantize not in QUANTIZE_MODES:
                raise ValueError(f"quantize must be None or one of {QUANTIZE_MODES}, got {quantize!r}")
            if path is not None:
                raise ValueError("Linear.from_dense: give either path or quantize, not both")
            return cls.from_int8(*quantize_int8(w))
        reason = "given"
        if path is None:
            path, reason = choose_path(w)
        _require_path(path, w.device)
        if path in _ops().LINEAR_INT8_PATHS:
            raise ValueError(f"Linear.from_dense: {path} holds int8 weights; pass quantize='int8' (or build it with "
                             "Linear.from_int8)")
        if path == "blocked_f32" and w.dtype != torch.float32 or path == "blocked_bf16" and w.dtype != torch.bfloat16:
            raise ValueError(f"Linear.from_dense: the {path} layout holds {path.split('_')[1]} weights, got {w.dtype}")
        N, K = w.shape
        return cls(path=path, tensor=_pack(w, path), N=N, K=K, reason=reason)

    @classmethod
    def from_int8(cls, q: torch.Tensor, scale: torch.Tensor, *, path: str | None = None) -> "Linear":
        """From int8 q (N, K) and float32 scales (N,) (W = q * scale[:, None]) on their device: rows_int8 on CUDA; on
        the CPU `path` (blocked_int8 or blocked_int8x4), None: choose_int8_path (measured, or $LLADA_RT_INT8_PATH)."""
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"Linear.from_int8: q must be int8 (N, K), got {q.dtype} {tuple(q.shape)}")
        if tuple(scale.shape) != (q.shape[0],) or not scale.is_floating_point():
            raise ValueError(f"Linear.from_int8: scale must be float ({q.shape[0]},), got {scale.dtype} "
                             f"{tuple(scale.shape)}")
        scale = scale.to(device=q.device, dtype=torch.float32).contiguous()
        reason = "given"
        if path is None:
            path, reason = choose_int8_path(q, scale)
        if path not in _ops().LINEAR_INT8_PATHS:
            raise ValueError(f"Linear.from_int8: {path!r} is not an int8 path; int8 paths: "
                             f"{', '.join(_ops().LINEAR_INT8_PATHS)}")
        _require_path(path, q.device)
        N, K = q.shape
        if path == "blocked_int8x4" and K > _ops().LINEAR_INT8X4_MAX_K:
            raise ValueError(f"Linear.from_int8: blocked_int8x4 sums exactly in int32 only up to K = "
                             f"{_ops().LINEAR_INT8X4_MAX_K}, got K = {K}; use blocked_int8")
        return cls(path=path, tensor=_pack(q, path), N=N, K=K, scale=scale, reason=reason)

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes held (padding of the blocked layouts and the scales included)."""
        n = self.tensor.numel() * self.tensor.element_size()
        return n + (self.scale.numel() * 4 if self.scale is not None else 0)

    def dense(self) -> torch.Tensor:
        """W (N, K): for torch_nk the held tensor itself (so in-place edits and autograd reach it), for torch_kn a view;
        the blocked layouts unpacked into a new tensor; int8 dequantised to float32."""
        if self.path == "torch_nk":
            return self.tensor
        if self.path == "torch_kn":
            return self.tensor.t()
        if self.quantized:
            q, scale = self.int8()
            return q.float() * scale[:, None]
        return _unpack(self.tensor, self.path, self.N, self.K)

    def int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 (N, K), scale float32 (N,)) of an int8 Linear, q in the checkpoint's row-major layout."""
        if not self.quantized:
            raise ValueError(f"Linear.int8: this weight is not quantized (path {self.path})")
        q = self.tensor if self.path == "rows_int8" else _unpack(self.tensor, self.path, self.N, self.K)
        if self.path == "blocked_int8x4":
            q = (q.contiguous().view(torch.int8) ^ -128)                               # q + 128 (uint8) -> q
        return q.contiguous(), self.scale


def quantize_int8(w: torch.Tensor, chunk_rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: scale = max |w[n]| / 127, q = round(w / scale) in [-127, 127] (half to even),
    computed in fp32 a chunk of rows at a time; w (N, K) any float dtype -> q int8 (N, K), scale float32 (N,)."""
    N, K = w.shape
    q = torch.empty((N, K), dtype=torch.int8, device=w.device)
    scale = torch.empty((N,), dtype=torch.float32, device=w.device)
    for r in range(0, N, chunk_rows):
        wf = w[r:r + chunk_rows].float()                                            # (n, K)
        s = wf.abs().amax(dim=1) / 127.0
        # an all-zero row keeps scale 0 and q 0 (tiny only avoids 0 / 0)
        q[r:r + chunk_rows] = torch.round(wf / s.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).clamp_(
            -127, 127).to(torch.int8)
        scale[r:r + chunk_rows] = s
    return q, scale


def _require_path(path: str, device: torch.device) -> None:
    ops = _ops()
    if path not in ops.LINEAR_PATHS:
        raise ValueError(f"unknown linear path {path!r}; paths: {', '.join(ops.LINEAR_PATHS)}")
    if ops.linear_path_supported(path, device):
        return
    if path == "rows_int8":
        why = ("this llada_rt build has no CUDA kernels (it was built without nvcc)" if device.type == "cuda"
               else "it is the CUDA layout (int8 on the CPU is blocked_int8 or blocked_int8x4)")
    elif device.type != "cpu":
        why = "it is a CPU layout"
    else:
        why = (f"this CPU lacks the kernel's instructions (AVX-512F; AVX-512 BF16 for bf16, AVX-512 VNNI for int8 "
               f"and W8A8; "
               f"cpu_features(): {ops.cpu_features()}); use float32 or bfloat16 weights on a torch path")
    raise ValueError(f"linear path {path!r} cannot run on {device}: {why}")


def _pack(w: torch.Tensor, path: str) -> torch.Tensor:
    """w (N, K) -> the tensor `path` holds (ops.linear_weight_shape); zero padding; no copy when w already fits."""
    N, K = w.shape
    if path in ("torch_nk", "rows_int8"):
        return w.contiguous()
    if path == "torch_kn":
        return w.t().contiguous()                                                   # (K, N)
    ops = _ops()
    shape = ops.linear_weight_shape(path, N, K)
    Np, Kp = shape[0] * ops.LINEAR_BLOCK_N, (K if path == "blocked_f32" else shape[1] * shape[3])
    if (Np, Kp) != (N, K):
        padded = w.new_zeros((Np, Kp))                                              # (Np, Kp)
        padded[:N, :K] = w
        w = padded
    if path == "blocked_f32":
        return w.reshape(shape[0], ops.LINEAR_BLOCK_N, K).transpose(1, 2).contiguous()          # (Np/16, K, 16)
    # (Np/16, K2, 16, 2) or, blocked_int8x4, (Np/16, K4, 16, 4)
    blocked = w.reshape(shape[0], ops.LINEAR_BLOCK_N, shape[1], shape[3]).permute(0, 2, 1, 3)
    if path != "blocked_int8x4":
        return blocked.contiguous()
    out = torch.empty(shape, dtype=torch.uint8, device=w.device)
    out.copy_(blocked.view(torch.uint8))
    return out.bitwise_xor_(0x80)                                                   # two's complement q -> q + 128


def _unpack(t: torch.Tensor, path: str, N: int, K: int) -> torch.Tensor:
    """The inverse of _pack for the blocked layouts: -> (N, K)."""
    if path == "blocked_f32":
        return t.transpose(1, 2).reshape(-1, K)[:N]
    return t.permute(0, 2, 1, 3).reshape(t.shape[0] * t.shape[2], -1)[:N, :K]


# ---- the path choice ------------------------------------------------------------------------------------------------

def choose_path(w: torch.Tensor) -> tuple[str, str]:
    """(path, reason) for the dense weight w (N, K) on its device in its dtype. CUDA: torch_nk (cuBLAS). CPU: the
    fastest of CPU_CANDIDATES that this CPU runs, measured once per (dtype, N, K) on this machine on w's first
    rows at MEASURE_ROWS rows (measure_paths) and cached in the per-machine file of cache_file()."""
    if w.device.type != "cpu":
        return "torch_nk", "dense weights on CUDA go to cuBLAS"
    ops = _ops()
    paths = [p for p in CPU_CANDIDATES.get(w.dtype, ("torch_nk",)) if ops.linear_path_supported(p, w.device)]
    if len(paths) == 1:
        return paths[0], f"the only {str(w.dtype).replace('torch.', '')} path on this CPU"
    N, K = w.shape
    key = f"cpu {str(w.dtype).replace('torch.', '')} N={N} K={K} threads={torch.get_num_threads()}"
    cache = _cache()
    entry = cache.get(key)
    if entry is None or entry.get("path") not in paths:
        entry = measure_paths(w, paths)
        _cache_store(key, entry)
    return entry["path"], _measured(entry)


def _measured(entry: dict, note: str = "") -> str:
    """The reason choose_path / choose_int8_path give for a measured choice (measure_paths' entry)."""
    times = ", ".join(f"{p} {us:.0f} us" for p, us in entry["us"].items())
    threads = entry["threads"]
    return (f"measured ({times}; geometric mean over rows {tuple(entry['rows'])}, {threads} "
            f"thread{'s' if threads > 1 else ''}{note})")


def choose_int8_path(q: torch.Tensor, scale: torch.Tensor) -> tuple[str, str]:
    """(path, reason) for int8 weights q (N, K) with scales (N,) on the CPU: $LLADA_RT_INT8_PATH when set (for
    comparisons and evaluations of one kernel), else the fastest of CPU_INT8_CANDIDATES that this CPU runs at this K,
    measured once per (N, K) as choose_path does (geometric mean over MEASURE_ROWS, fp32 x) and cached with it."""
    if q.device.type != "cpu":
        return "rows_int8", "int8 weights on CUDA: the mma.sync kernel"
    ops = _ops()
    forced = os.environ.get(INT8_PATH_ENV)
    if forced:
        if forced not in CPU_INT8_CANDIDATES:
            raise ValueError(f"${INT8_PATH_ENV} must be one of {', '.join(CPU_INT8_CANDIDATES)}, got {forced!r}")
        return forced, f"${INT8_PATH_ENV}={forced}"
    N, K = q.shape
    paths = [p for p in CPU_INT8_CANDIDATES if ops.linear_path_supported(p, q.device)
             and not (p == "blocked_int8x4" and K > ops.LINEAR_INT8X4_MAX_K)]
    if not paths:
        return "blocked_int8", "no int8 kernel runs on this CPU"   # from_int8 then raises with the reason
    if len(paths) == 1:
        return paths[0], f"the only int8 path on this CPU at K = {K}"
    key = f"cpu int8 N={N} K={K} threads={torch.get_num_threads()}"
    entry = _cache().get(key)
    if entry is None or entry.get("path") not in paths:
        entry = measure_paths(q, paths, scale=scale)
        _cache_store(key, entry)
    return entry["path"], _measured(entry, ", fp32 x")


def _max_error(path: str, x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The largest error of `path` accepted per output of x (M, K) @ w (n, K)^T (w dense, or dequantised for int8) with
    fp32 reference ref (M, n): _TOLERANCE of max |ref| for dense paths; for int8 ones the activation rounding bound
    above _ACT_SIGMAS plus 1e-5 of max |ref| (fp32 sums), and bf16 output rounding."""
    if path not in ACT_QMAX:
        return torch.full_like(ref, _TOLERANCE[x.dtype] * max(ref.abs().max().item(), 1e-30))
    step = x.float().abs().amax(1, keepdim=True) / ACT_QMAX[path]                 # (M, 1) the grid of each row
    sigma = step / math.sqrt(12.0) * w.float().square().sum(1).sqrt()[None, :]     # (M, n)
    rounding = 2.0 ** -8 * ref.abs() if x.dtype == torch.bfloat16 else 0.0
    return _ACT_SIGMAS * sigma + 1e-5 * ref.abs().max() + rounding + 1e-30


def measure_paths(w: torch.Tensor, paths, rows=MEASURE_ROWS, scale: torch.Tensor | None = None) -> dict:
    """Times ops.linear for each path on the first rows of w (up to SAMPLE_BYTES) at each row count, with torch's
    current number of threads (the runtime's: the paths scale differently, e.g. MKL's sgemm gains less from a second
    thread at these sizes than the blocked kernel), in the calling thread's CPU time on one thread (so that other
    processes on a shared machine change nothing) and in wall time on more; a sample under ROTATE_BYTES is measured in
    turn over copies of it (up to ROTATE_COPIES), so that each call reads its weight from beyond L2, as a forward
    does. A path whose output leaves the fp32 reference by more than _max_error allows is dropped with a warning.
    With scale, w is int8 q (N, K) of scales (N,), the paths are int8 ones, x is fp32 and the reference uses the
    dequantised weights. -> {"path": fastest, "us": {path: geometric mean over rows of the fastest of 5 batches, us
    per call}, "rows": rows, "sample_rows": rows of w used, "threads": threads}."""
    ops = _ops()
    N, K = w.shape
    n = min(N, max(ops.LINEAR_PANEL_N, SAMPLE_BYTES // (K * w.element_size())))
    if scale is None:
        # non-finite weights (loaded with check_finite=False) would fail every path's check; timing needs the shape only
        sample = torch.nan_to_num(w[:n], nan=0.0, posinf=0.0, neginf=0.0)
        dense, x_dtype = sample, w.dtype
    else:
        sample, sample_scale = w[:n], torch.nan_to_num(scale[:n], nan=0.0, posinf=0.0, neginf=0.0)
        dense, x_dtype = sample.float() * sample_scale[:, None], torch.float32                   # (n, K)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(m, K, generator=g).to(x_dtype) for m in rows]
    refs = [torch.nn.functional.linear(x.float(), dense.float()) for x in xs]
    lins, outs = {}, {}
    for p in paths:
        lin = Linear.from_dense(sample, path=p) if scale is None else Linear.from_int8(sample, sample_scale, path=p)
        bad = []
        for x, ref in zip(xs, refs):
            err = (ops.linear(x, lin).float() - ref).abs()
            allowed = _max_error(p, x, dense, ref)
            if not (err <= allowed).all():
                i = (err / allowed).flatten().argmax()
                bad.append(f"rows {x.shape[0]}: error {err.flatten()[i].item():.3g} where "
                           f"{allowed.flatten()[i].item():.3g} is allowed (max |ref| {ref.abs().max().item():.3g})")
        if bad:
            what = "int8" if scale is not None else w.dtype
            warnings.warn(f"llada_rt.linear: path {p} gives wrong results for {what} (N, K) = ({n}, {K}) and is "
                          f"not used: {'; '.join(bad)}")
            continue
        copies = min(ROTATE_COPIES, max(1, -(-ROTATE_BYTES // max(lin.nbytes, 1))))
        lins[p] = [lin] + [dataclasses.replace(lin, tensor=lin.tensor.clone()) for _ in range(copies - 1)]
        outs[p] = [torch.empty(x.shape[0], n, dtype=x_dtype) for x in xs]
    if not lins:
        raise RuntimeError(f"llada_rt.linear: every candidate path ({', '.join(paths)}) failed its accuracy check for "
                           f"(N, K) = ({N}, {K}); see the warnings above")
    threads = torch.get_num_threads()
    # one thread: its CPU time is all the work, so other processes cannot add to it; more: wall time
    clock = time.thread_time if threads == 1 else time.perf_counter
    per_call = {p: [] for p in lins}
    for i, x in enumerate(xs):
        calls = {}
        for p, copies in lins.items():   # calls per batch: enough for about half a millisecond, whole rotations
            t0 = clock()
            for lin in copies:
                ops.linear(x, lin, out=outs[p][i])
            one = max(clock() - t0, 1e-7) / len(copies)
            rotations = max(1, min(1000, int(5e-4 / one)) // len(copies))
            calls[p] = rotations * len(copies)
        samples = {p: [] for p in lins}
        for _ in range(5):
            for p, copies in lins.items():
                out = outs[p][i]
                t0 = clock()
                for c in range(calls[p]):
                    ops.linear(x, copies[c % len(copies)], out=out)
                samples[p].append((clock() - t0) / calls[p])
        for p in lins:
            per_call[p].append(min(samples[p]))
    us = {p: 1e6 * math.exp(sum(math.log(t) for t in ts) / len(ts)) for p, ts in per_call.items()}
    best = min(us, key=us.get)
    first = next(iter(us))
    if best != first and us[best] > (1 - NEAR_TIE) * us[first]:
        best = first
    return {"path": best, "us": us, "rows": list(rows), "sample_rows": n, "threads": threads}


def cache_file() -> Path | None:
    """This machine's file of measured choices: $LLADA_RT_CACHE_DIR (empty: no file) or ~/.cache/llada_rt, one file per
    CPU model, instruction set, torch and llada_rt build (a rebuilt _C measures afresh)."""
    base = os.environ.get("LLADA_RT_CACHE_DIR")
    if base == "":
        return None
    root = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llada_rt"
    ops = _ops()
    so = Path(ops._C.__file__).stat()
    ident = json.dumps([CACHE_VERSION, cpu_name(), sorted(k for k, v in ops.cpu_features().items() if v),
                        torch.__version__, so.st_size, so.st_mtime_ns])
    return root / f"linear_paths-{hashlib.sha1(ident.encode()).hexdigest()[:16]}.json"


def cpu_name() -> str:
    """The CPU model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_CACHE: dict | None = None


def _cache() -> dict:
    global _CACHE
    if _CACHE is None:
        _CACHE = {}
        path = cache_file()
        if path is not None and path.is_file():
            try:
                _CACHE = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                _CACHE = {}
    return _CACHE


def _cache_store(key: str, entry: dict) -> None:
    """Keeps the entry for this process and merges it into the file (written whole and renamed: readers never see a
    partial file; a concurrent writer may drop an entry, which is then measured again)."""
    cache = _cache()
    cache[key] = entry
    path = cache_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        on_disk = json.loads(path.read_text()) if path.is_file() else {}
        on_disk[key] = entry
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(on_disk, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        pass   # an unwritable cache only costs a measurement in the next process


def describe(linears: dict[str, Linear]) -> str:
    """A fixed-width table: name, (N, K), path, MiB held and why that path, one line per Linear."""
    lines = [f"{'linear':<18} {'N x K':>15} {'path':<13} {'MiB':>8}  why"]
    for name, lin in linears.items():
        lines.append(f"{name:<18} {f'{lin.N} x {lin.K}':>15} {lin.path:<13} {lin.nbytes / 2**20:8.2f}  {lin.reason}")
    return "\n".join(lines)
