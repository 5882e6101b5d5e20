"""Linear: one linear layer's weight as held for inference (one representation, picked at load), int8 quantization, and
the per-shape choice of the fastest CPU path by measurement (cached per machine)."""
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
MEASURE_ROWS = (1, 8, 32, 64)    # the step shapes: one masked row up to a 64-position block
SAMPLE_BYTES = 32 << 20          # weight rows measured per shape: about an L3's worth, so streaming from memory counts
NEAR_TIE = 0.03                  # another path must be this much faster than the plain layout to replace it
CACHE_VERSION = 1                # bump when the kernels or the measurement change, to measure afresh
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # candidate vs fp32 ref, of max |ref|


def _ops():
    from . import ops  # the compiled kernels; the dense torch paths and the reference never need them

    return ops


@dataclasses.dataclass(eq=False)
class Linear:
    """The weight W (N, K) (out x in, as safetensors stores it) of one linear layer, held in the layout of `path`
    (see ops.linear): torch_nk W itself, torch_kn W^T contiguous, blocked_f32 / blocked_bf16 / blocked_int8 the packed
    CPU layouts of csrc/linear.h, rows_int8 int8 (N, K) for CUDA. int8 paths carry per-output-channel scales (N,)."""
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
        if path in ("blocked_int8", "rows_int8"):
            raise ValueError(f"Linear.from_dense: {path} holds int8 weights; pass quantize='int8'")
        if path == "blocked_f32" and w.dtype != torch.float32 or path == "blocked_bf16" and w.dtype != torch.bfloat16:
            raise ValueError(f"Linear.from_dense: the {path} layout holds {path.split('_')[1]} weights, got {w.dtype}")
        N, K = w.shape
        return cls(path=path, tensor=_pack(w, path), N=N, K=K, reason=reason)

    @classmethod
    def from_int8(cls, q: torch.Tensor, scale: torch.Tensor) -> "Linear":
        """From int8 q (N, K) and float32 scales (N,) (W = q * scale[:, None]) on their device: rows_int8 on CUDA,
        blocked_int8 on the CPU."""
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"Linear.from_int8: q must be int8 (N, K), got {q.dtype} {tuple(q.shape)}")
        if tuple(scale.shape) != (q.shape[0],) or not scale.is_floating_point():
            raise ValueError(f"Linear.from_int8: scale must be float ({q.shape[0]},), got {scale.dtype} "
                             f"{tuple(scale.shape)}")
        path = "rows_int8" if q.device.type == "cuda" else "blocked_int8"
        _require_path(path, q.device)
        N, K = q.shape
        return cls(path=path, tensor=_pack(q, path), N=N, K=K,
                   scale=scale.to(device=q.device, dtype=torch.float32).contiguous(),
                   reason="int8 weights: the CUDA mma.sync kernel" if path == "rows_int8" else
                   "int8 weights: the AVX512-VNNI kernel (x as int16 per row)")

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
               else "it is the CUDA layout (int8 on the CPU is blocked_int8)")
    elif device.type != "cpu":
        why = "it is a CPU layout"
    else:
        why = (f"this CPU lacks the kernel's instructions (AVX-512F; AVX-512 BF16 for bf16, AVX-512 VNNI for int8; "
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
    Np, Kp = shape[0] * ops.LINEAR_BLOCK_N, (K if path == "blocked_f32" else 2 * shape[1])
    if (Np, Kp) != (N, K):
        padded = w.new_zeros((Np, Kp))                                              # (Np, Kp)
        padded[:N, :K] = w
        w = padded
    if path == "blocked_f32":
        return w.reshape(shape[0], ops.LINEAR_BLOCK_N, K).transpose(1, 2).contiguous()          # (Np/16, K, 16)
    return w.reshape(shape[0], ops.LINEAR_BLOCK_N, shape[1], 2).permute(0, 2, 1, 3).contiguous()  # (Np/16, K2, 16, 2)


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
    key = f"cpu {str(w.dtype).replace('torch.', '')} N={N} K={K}"
    cache = _cache()
    entry = cache.get(key)
    if entry is None or entry.get("path") not in paths:
        entry = measure_paths(w, paths)
        _cache_store(key, entry)
    times = ", ".join(f"{p} {us:.0f} us" for p, us in entry["us"].items())
    return entry["path"], f"measured ({times}; geometric mean over rows {tuple(entry['rows'])})"


def measure_paths(w: torch.Tensor, paths, rows=MEASURE_ROWS) -> dict:
    """Times ops.linear for each path on the first rows of w (up to SAMPLE_BYTES) at each row count, on one thread in
    that thread's CPU time (so that other processes on a shared machine change nothing; the ranking is taken to hold for
    every thread count); a path whose output leaves the fp32 reference by more than _TOLERANCE is dropped with a
    warning. -> {"path": fastest, "us": {path: geometric mean over rows of the fastest of 5 batches, us per call},
    "rows": rows, "sample_rows": rows of w used}."""
    ops = _ops()
    N, K = w.shape
    n = min(N, max(ops.LINEAR_PANEL_N, SAMPLE_BYTES // (K * w.element_size())))
    # non-finite weights (loaded with check_finite=False) would fail every path's check; the timing needs only the shape
    sample = torch.nan_to_num(w[:n], nan=0.0, posinf=0.0, neginf=0.0)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(m, K, generator=g).to(w.dtype) for m in rows]
    refs = [torch.nn.functional.linear(x.float(), sample.float()) for x in xs]
    lins, outs = {}, {}
    for p in paths:
        lin = Linear.from_dense(sample, path=p)
        bad = []
        for x, ref in zip(xs, refs):
            err = (ops.linear(x, lin).float() - ref).abs().max().item()
            if not err <= _TOLERANCE[w.dtype] * max(ref.abs().max().item(), 1e-30):
                bad.append(f"rows {x.shape[0]}: max error {err:.3g} vs max |ref| {ref.abs().max().item():.3g}")
        if bad:
            warnings.warn(f"llada_rt.linear: path {p} gives wrong results for {w.dtype} (N, K) = ({n}, {K}) and is "
                          f"not used: {'; '.join(bad)}")
            continue
        lins[p] = lin
        outs[p] = [torch.empty(x.shape[0], n, dtype=w.dtype) for x in xs]
    per_call = {p: [] for p in lins}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the calling thread's CPU time is then all the work: other processes cannot add to it
    try:
        for i, x in enumerate(xs):
            calls = {}
            for p, lin in lins.items():   # calls per batch: enough for about half a millisecond
                t0 = time.thread_time()
                ops.linear(x, lin, out=outs[p][i])
                calls[p] = max(1, min(1000, int(5e-4 / max(time.thread_time() - t0, 1e-7))))
            samples = {p: [] for p in lins}
            for _ in range(5):
                for p, lin in lins.items():
                    out = outs[p][i]
                    t0 = time.thread_time()
                    for _ in range(calls[p]):
                        ops.linear(x, lin, out=out)
                    samples[p].append((time.thread_time() - t0) / calls[p])
            for p in lins:
                per_call[p].append(min(samples[p]))
    finally:
        torch.set_num_threads(threads)
    us = {p: 1e6 * math.exp(sum(math.log(t) for t in ts) / len(ts)) for p, ts in per_call.items()}
    best = min(us, key=us.get)
    first = next(iter(us))
    if best != first and us[best] > (1 - NEAR_TIE) * us[first]:
        best = first
    return {"path": best, "us": us, "rows": list(rows), "sample_rows": n}


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
