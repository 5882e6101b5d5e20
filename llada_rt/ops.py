"""The only importer of llada_rt._C: registers each kernel as a torch op, checks inputs, dispatches CPU vs CUDA."""
from __future__ import annotations

import torch

from . import _C

_lib = torch.library.Library("llada_rt", "DEF")

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class OpInputError(ValueError):
    """An op was called with a tensor of the wrong shape, dtype, device or layout."""


def _check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise OpInputError(f"llada_rt.ops.{op}: {msg}")


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _require_cuda_build(op: str) -> None:
    if not _C.with_cuda:
        raise RuntimeError(f"llada_rt.ops.{op}: this build of llada_rt has no CUDA kernels (it was built without nvcc "
                           "or with LLADA_CUDA=OFF); reinstall with nvcc on PATH to run on the GPU")


# ---- confidence ----------------------------------------------------------------------------------------------------

_lib.define("confidence(Tensor logits, Tensor masked, float temperature, int seed, int offset, bool random_confidence, "
            "int[] suppress_ids, int[] zero_conf_ids) -> (Tensor, Tensor)")

MAX_SPECIAL_IDS = 8   # kMaxSpecialIds in csrc/common.h
_U63 = 1 << 63


def _check_confidence(logits, masked, temperature, seed, offset, suppress_ids, zero_conf_ids) -> None:
    op = "confidence"
    _check(logits.dtype in DTYPE_CODES, op, f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    _check(logits.dim() == 3, op, f"logits must be (B, N, V), got shape {tuple(logits.shape)}")
    B, N, V = logits.shape
    _check(V > 0, op, "logits must have V > 0")
    _check(V < 2**31 and B * N < 2**31, op, f"logits shape {tuple(logits.shape)} is too large")
    _check(logits.stride(-1) == 1, op, f"logits must have unit stride over V, got strides {logits.stride()}")
    _check(masked.dtype == torch.bool, op, f"masked must be bool, got {masked.dtype}")
    _check(tuple(masked.shape) == (B, N), op, f"masked must be (B, N) = {(B, N)}, got {tuple(masked.shape)}")
    _check(masked.device == logits.device, op, f"masked is on {masked.device} but logits are on {logits.device}")
    _check(temperature >= 0.0 and temperature == temperature, op, f"temperature must be >= 0, got {temperature}")
    _check(0 <= seed < _U63 and 0 <= offset < _U63, op, f"seed and offset must be in [0, 2**63), got {seed}, {offset}")
    for name, ids in (("suppress_ids", suppress_ids), ("zero_conf_ids", zero_conf_ids)):
        _check(len(ids) <= MAX_SPECIAL_IDS, op, f"at most {MAX_SPECIAL_IDS} {name} are supported, got {len(ids)}")
        bad = [i for i in ids if not 0 <= i < V]
        _check(not bad, op, f"{name} {bad} are outside the vocabulary [0, {V})")
    _check(len(set(suppress_ids)) < V, op, "suppress_ids must leave at least one id of the vocabulary")


def _confidence_impl(logits, masked, temperature, seed, offset, random_confidence, suppress_ids, zero_conf_ids):
    _check_confidence(logits, masked, temperature, seed, offset, suppress_ids, zero_conf_ids)
    B, N, V = logits.shape
    masked = masked.contiguous()
    token = torch.empty((B, N), dtype=torch.int64, device=logits.device)   # (B, N)
    prob = torch.empty((B, N), dtype=torch.float32, device=logits.device)  # (B, N)
    args = (token.data_ptr(), prob.data_ptr(), logits.data_ptr(), logits.stride(0), logits.stride(1),
            masked.data_ptr(), B, N, V, DTYPE_CODES[logits.dtype], float(temperature), seed, offset,
            bool(random_confidence), list(suppress_ids), list(zero_conf_ids))
    if token.numel() > 0:
        if logits.is_cuda:
            _require_cuda_build("confidence")
            _C.confidence_cuda(*args, _stream(logits))
        else:
            _C.confidence_cpu(*args)
    return token, prob


_lib.impl("confidence", _confidence_impl, "CPU")
_lib.impl("confidence", _confidence_impl, "CUDA")


@torch.library.register_fake("llada_rt::confidence")
def _confidence_fake(logits, masked, temperature, seed, offset, random_confidence, suppress_ids, zero_conf_ids):
    _check_confidence(logits, masked, temperature, seed, offset, suppress_ids, zero_conf_ids)
    B, N, _ = logits.shape
    return (logits.new_empty((B, N), dtype=torch.int64), logits.new_empty((B, N), dtype=torch.float32))


def confidence(logits: torch.Tensor, masked: torch.Tensor, *, temperature: float = 0.0, seed: int = 0, offset: int = 0,
               random_confidence: bool = False, suppress_ids=(), zero_conf_ids=()):
    """Argmax token and its softmax probability per masked row: logits (B, N, V), masked bool (B, N) ->
    token int64 (B, N) (-1 where not masked), prob float32 (B, N) (-inf where not masked).

    temperature > 0 adds Gumbel noise (Philox, keyed by seed/offset) to the argmax only; suppress_ids are -inf before
    everything; zero_conf_ids can be chosen but get prob 0 and are left out of the softmax; random_confidence replaces
    prob by a Philox uniform draw per row. Rows whose logits are all -inf get the lowest non-suppressed id, prob 0.
    """
    return torch.ops.llada_rt.confidence(logits, masked, float(temperature), int(seed), int(offset),
                                         bool(random_confidence), [int(i) for i in suppress_ids],
                                         [int(i) for i in zero_conf_ids])


# ---- remask --------------------------------------------------------------------------------------------------------

_lib.define("remask(Tensor(a!) canvas, Tensor token, Tensor prob, Tensor? k, int start, int mask_id, int rule, "
            "float threshold, float factor) -> Tensor")

REMASK_RULES = {"topk": 0, "threshold": 1, "factor": 2}


def _check_remask(canvas, token, prob, k, start, rule) -> None:
    op = "remask"
    _check(canvas.dtype == torch.int64, op, f"canvas must be int64, got {canvas.dtype}")
    _check(canvas.dim() == 2, op, f"canvas must be (B, T), got shape {tuple(canvas.shape)}")
    _check(canvas.stride(-1) == 1, op, f"canvas must have unit stride over T (it is written in place), got strides "
           f"{canvas.stride()}")
    B, T = canvas.shape
    _check(token.dtype == torch.int64, op, f"token must be int64, got {token.dtype}")
    _check(prob.dtype == torch.float32, op, f"prob must be float32, got {prob.dtype}")
    _check(token.dim() == 2 and token.shape[0] == B, op, f"token must be (B, N) with B = {B}, got {tuple(token.shape)}")
    N = token.shape[1]
    _check(tuple(prob.shape) == (B, N), op, f"prob must be (B, N) = {(B, N)}, got {tuple(prob.shape)}")
    _check(N <= 1024, op, f"the block length N must be <= 1024, got {N}")
    _check(0 <= start and start + N <= T, op, f"the block [start, start + N) = [{start}, {start + N}) is outside the "
           f"canvas of length T = {T}")
    _check(rule in REMASK_RULES.values(), op, f"unknown rule code {rule}")
    for name, t in (("token", token), ("prob", prob)):
        _check(t.device == canvas.device, op, f"{name} is on {t.device} but canvas is on {canvas.device}")
    if rule == REMASK_RULES["topk"]:
        _check(k is not None, op, "rule 'topk' needs k, an int64 tensor (B,) of positions to commit per row")
        _check(k.dtype == torch.int64 and tuple(k.shape) == (B,), op,
               f"k must be int64 (B,) = ({B},), got {k.dtype} {tuple(k.shape)}")
        _check(k.device == canvas.device, op, f"k is on {k.device} but canvas is on {canvas.device}")


def _remask_impl(canvas, token, prob, k, start, mask_id, rule, threshold, factor):
    _check_remask(canvas, token, prob, k, start, rule)
    B, N = token.shape
    token, prob = token.contiguous(), prob.contiguous()
    k = k.contiguous() if (k is not None and rule == REMASK_RULES["topk"]) else None
    count = torch.zeros((B,), dtype=torch.int32, device=canvas.device)   # (B,)
    if B > 0 and N > 0:
        args = (canvas.data_ptr(), canvas.stride(0), count.data_ptr(), token.data_ptr(), prob.data_ptr(),
                0 if k is None else k.data_ptr(), B, N, start, mask_id, rule, float(threshold), float(factor))
        if canvas.is_cuda:
            _require_cuda_build("remask")
            _C.remask_cuda(*args, _stream(canvas))
        else:
            _C.remask_cpu(*args)
    return count


_lib.impl("remask", _remask_impl, "CPU")
_lib.impl("remask", _remask_impl, "CUDA")


@torch.library.register_fake("llada_rt::remask")
def _remask_fake(canvas, token, prob, k, start, mask_id, rule, threshold, factor):
    _check_remask(canvas, token, prob, k, start, rule)
    return canvas.new_empty((canvas.shape[0],), dtype=torch.int32)


def remask(canvas: torch.Tensor, token: torch.Tensor, prob: torch.Tensor, *, start: int, mask_id: int,
           k: torch.Tensor | None = None, rule: str = "topk", threshold: float = 0.9, factor: float = 1.0):
    """Commit masked positions of the block canvas[:, start:start+N] in place: canvas int64 (B, T) (mutated),
    token int64 (B, N), prob float32 (B, N) -> count int32 (B,) of positions committed per row.

    rule 'topk': the k[b] most confident masked positions (k int64 (B,), a device tensor: no host sync);
    'threshold': every masked position with prob >= threshold, at least the most confident one; 'factor':
    Fast-dLLM's factor rule. Ties in prob go to the lower position; committed positions are never touched.
    """
    _check(rule in REMASK_RULES, "remask", f"rule must be one of {', '.join(REMASK_RULES)}, got {rule!r}")
    return torch.ops.llada_rt.remask(canvas, token, prob, k, int(start), int(mask_id), REMASK_RULES[rule],
                                     float(threshold), float(factor))


# ---- attention -----------------------------------------------------------------------------------------------------

_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor? key_start, Tensor? key_end, float scale) -> Tensor")
_lib.define("attention_out(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor? key_start, Tensor? key_end, "
            "float scale) -> ()")

ATTENTION_HEAD_DIMS = (64, 128)  # head dims the CUDA kernel is compiled for (csrc/attention.cu)


def _check_attention(q, k, v, key_start, key_end, out=None) -> None:
    op = "attention"
    _check(q.dim() == 4, op, f"q must be (B, Lq, Hq, D), got shape {tuple(q.shape)}")
    _check(k.dim() == 4, op, f"k must be (B, Lk, Hkv, D), got shape {tuple(k.shape)}")
    _check(tuple(v.shape) == tuple(k.shape), op, f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    B, Lq, Hq, D = q.shape
    _check(k.shape[0] == B and k.shape[3] == D, op, f"k must be (B={B}, Lk, Hkv, D={D}), got {tuple(k.shape)}")
    Lk, Hkv = k.shape[1], k.shape[2]
    _check(Hkv > 0 and Hq % Hkv == 0, op, f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    _check(q.dtype == k.dtype == v.dtype, op, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("k", k), ("v", v)):
        _check(t.device == q.device, op, f"{name} is on {t.device} but q is on {q.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(t.stride(-1) == 1, op, f"{name} must have unit stride over D, got strides {t.stride()}")
    _check(max(B * Lq, Lk, B * Hq) < 2**31, op, "tensor sizes must be < 2**31")
    for name, t in (("key_start", key_start), ("key_end", key_end)):
        if t is not None:
            _check(not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool, op,
                   f"{name} must be an integer tensor, got {t.dtype}")
            _check(tuple(t.shape) == (B,), op, f"{name} must have shape (B,) = ({B},), got {tuple(t.shape)}")
            _check(t.device == q.device, op, f"{name} is on {t.device} but q is on {q.device}")
    if out is not None:
        _check(tuple(out.shape) == tuple(q.shape), op, f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
        _check(out.dtype == q.dtype, op, f"out must have q's dtype {q.dtype}, got {out.dtype}")
        _check(out.device == q.device, op, f"out is on {out.device} but q is on {q.device}")
        _check(out.stride(-1) == 1, op, f"out must have unit stride over D, got strides {out.stride()}")
    if q.device.type == "cuda":
        _check_attention_kernel_layout(q, k, v, out)
    else:
        _check(q.dtype in (torch.float32, torch.float16, torch.bfloat16), op,
               f"q, k, v must be float32, float16 or bfloat16, got {q.dtype}")


def _check_attention_kernel_layout(q, k, v, out) -> None:
    """What the tensor-core kernel needs: bf16/fp16, D in ATTENTION_HEAD_DIMS, 16-byte aligned rows (cp.async)."""
    op = "attention"
    _check(q.dtype in (torch.float16, torch.bfloat16), op, f"the CUDA kernel takes float16 or bfloat16, got {q.dtype}")
    D = q.shape[3]
    _check(D in ATTENTION_HEAD_DIMS, op, f"the CUDA kernel supports head dim D in {ATTENTION_HEAD_DIMS}, got {D}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:3]), op,
               f"{name} rows must be 16-byte aligned (data pointer % 16 == 0, strides over B, L, H multiples of 8 "
               f"elements), got strides {t.stride()}; pass a .contiguous() copy")
    if out is not None:
        _check(out.data_ptr() % 4 == 0 and all(s % 2 == 0 for s in out.stride()[:3]), op,
               f"out must be 4-byte aligned with even strides, got strides {out.stride()}")


def _attention_args(out, q, k, v, key_start, key_end, scale) -> tuple:
    """The argument tuple of _C.attention_cuda / _emu.attention (without the stream); key ranges become int32."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    key_start = None if key_start is None else key_start.to(torch.int32).contiguous()
    key_end = None if key_end is None else key_end.to(torch.int32).contiguous()
    strides = [*out.stride()[:3], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3]]
    args = (out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), strides,
            0 if key_start is None else key_start.data_ptr(), 0 if key_end is None else key_end.data_ptr(),
            B, Lq, Lk, Hq, Hkv, D, float(scale), DTYPE_CODES[q.dtype])
    return args, (key_start, key_end)  # the int32 copies must outlive the call


def _attention_cpu(out, q, k, v, key_start, key_end, scale) -> None:
    # torch SDPA: faster on CPU than our C++ variant (bench/attention_cpu.cpp; numbers in bench/bench_kernels.py).
    # Host reads of the key ranges are free here (CPU tensors): one shared range becomes a slice of k/v (no mask).
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    start = torch.zeros(B, dtype=torch.int64) if key_start is None else key_start.long().clamp(min=0)
    end = torch.full((B,), Lk, dtype=torch.int64) if key_end is None else key_end.long().clamp(max=Lk)
    mask = None
    if bool((start == start[0]).all()) and bool((end == end[0]).all()):
        s, e = int(start[0]), int(end[0])
        if e <= s:
            out.zero_()
            return
        k, v = k[:, s:e], v[:, s:e]
    else:
        pos = torch.arange(Lk)
        valid = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])  # (B, Lk)
        mask = valid[:, None, None, :]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
        enable_gqa=Hq != Hkv)                                                      # (B, Hq, Lq, D)
    out.copy_(o.transpose(1, 2))
    if mask is not None:
        empty = end <= start  # SDPA gives NaN for a row with no valid key; the op's contract is zeros
        if bool(empty.any()):
            out[empty] = 0


def _attention_into(out, q, k, v, key_start, key_end, scale) -> None:
    _check_attention(q, k, v, key_start, key_end, out)
    if out.numel() == 0:
        return
    if q.is_cuda:
        _require_cuda_build("attention")
        args, _keep = _attention_args(out, q, k, v, key_start, key_end, scale)
        _C.attention_cuda(*args, _stream(q))
    else:
        _attention_cpu(out, q, k, v, key_start, key_end, scale)


def _attention_impl(q, k, v, key_start, key_end, scale):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)                    # (B, Lq, Hq, D)
    _attention_into(out, q, k, v, key_start, key_end, scale)
    return out


def _attention_out_impl(out, q, k, v, key_start, key_end, scale):
    _attention_into(out, q, k, v, key_start, key_end, scale)


_lib.impl("attention", _attention_impl, "CPU")
_lib.impl("attention", _attention_impl, "CUDA")
_lib.impl("attention_out", _attention_out_impl, "CPU")
_lib.impl("attention_out", _attention_out_impl, "CUDA")


@torch.library.register_fake("llada_rt::attention")
def _attention_fake(q, k, v, key_start, key_end, scale):
    _check_attention(q, k, v, key_start, key_end)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("llada_rt::attention_out")
def _attention_out_fake(out, q, k, v, key_start, key_end, scale):
    _check_attention(q, k, v, key_start, key_end, out)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor | None = None,
              key_end: torch.Tensor | None = None, scale: float | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Bidirectional attention: q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D) (views of a cache are fine: unit stride over D
    is all that is needed), keys [key_start[b], key_end[b]) valid for batch row b (int tensors (B,); None means 0 and
    Lk) -> o (B, Lq, Hq, D), written into `out` when given. Hq must be a multiple of Hkv (GQA); scale defaults to
    1/sqrt(D). A row with no valid key outputs zeros. CUDA: bf16/fp16, D in (64, 128), 16-byte aligned rows."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if out is None:
        return torch.ops.llada_rt.attention(q, k, v, key_start, key_end, scale)
    torch.ops.llada_rt.attention_out(out, q, k, v, key_start, key_end, scale)
    return out


# ---- linear --------------------------------------------------------------------------------------------------------

_lib.define("linear_out(Tensor(a!) out, Tensor x, Tensor w, Tensor? scale, int layout) -> ()")

# A Linear's path (llada_rt/linear.py) -> the WeightLayout code of csrc/linear.h that our kernels read; the torch paths
# ("torch_nk": W (N, K) as stored, "torch_kn": W^T (K, N) contiguous) go to torch.mm.
LINEAR_LAYOUTS = {"blocked_f32": 0, "blocked_bf16": 1, "blocked_int8": 2, "rows_int8": 3}
LINEAR_PATHS = ("torch_nk", "torch_kn", *LINEAR_LAYOUTS)
LINEAR_BLOCK_N = 16   # kLinearBlockN in csrc/linear.h
LINEAR_PANEL_N = 64   # kLinearPanelN: the blocked layouts pad N to a multiple of it
_LINEAR_TENSOR_DTYPES = {"blocked_f32": torch.float32, "blocked_bf16": torch.bfloat16, "blocked_int8": torch.int8,
                         "rows_int8": torch.int8}
# activation dtypes each kernel path takes (the output has the activations' dtype)
_LINEAR_X_DTYPES = {"blocked_f32": (torch.float32,), "blocked_bf16": (torch.bfloat16,),
                    "blocked_int8": (torch.float32, torch.bfloat16), "rows_int8": (torch.bfloat16,)}


def linear_weight_shape(path: str, N: int, K: int) -> tuple[int, ...]:
    """The shape of the tensor a Linear on `path` holds for W (N, K) (the layouts of csrc/linear.h)."""
    Np = -(-N // LINEAR_PANEL_N) * LINEAR_PANEL_N
    return {"torch_nk": (N, K), "torch_kn": (K, N), "rows_int8": (N, K),
            "blocked_f32": (Np // LINEAR_BLOCK_N, K, LINEAR_BLOCK_N),
            "blocked_bf16": (Np // LINEAR_BLOCK_N, -(-K // 2), LINEAR_BLOCK_N, 2),
            "blocked_int8": (Np // LINEAR_BLOCK_N, -(-K // 2), LINEAR_BLOCK_N, 2)}[path]


def linear_path_supported(path: str, device: torch.device | str) -> bool:
    """Whether ops.linear can run `path` on this device here (CPU: the kernel's instructions; CUDA: a CUDA build)."""
    device = torch.device(device)
    if path in ("torch_nk", "torch_kn"):
        return True
    if path == "rows_int8":
        return device.type == "cuda" and _C.with_cuda
    return device.type == "cpu" and path in LINEAR_LAYOUTS and _C.linear_cpu_supports(LINEAR_LAYOUTS[path])


def cpu_features() -> dict[str, bool]:
    """The x86 extensions the CPU kernels dispatch on (cpuid; AVX-512 ones only when the OS enables them)."""
    return dict(_C.cpu_features())


_LINEAR_PATH_OF = {c: p for p, c in LINEAR_LAYOUTS.items()}
_LINEAR_SUPPORTED: dict[int, bool] = {}   # layout code -> this CPU runs it (cpuid does not change)


def _check_linear_kernel(out, x, w, scale, layout) -> None:
    # The checks are plain conditions and the messages are built only on failure: a small model calls this for every
    # linear of every step, where formatting them each time cost several times the kernel.
    op = "linear"
    path = _LINEAR_PATH_OF.get(layout)
    _check(path is not None, op, f"unknown weight layout code {layout}")
    if x.dim() != 2 or out.dim() != 2:
        _check(False, op, f"x and out must be 2-D, got {tuple(x.shape)} and {tuple(out.shape)}")
    M, K = x.shape
    N = out.shape[1]
    if out.shape[0] != M:
        _check(False, op, f"out must have x's {M} rows, got {tuple(out.shape)}")
    if x.dtype not in _LINEAR_X_DTYPES[path]:
        _check(False, op, f"the {path} weights take activations in "
               f"{[str(d).replace('torch.', '') for d in _LINEAR_X_DTYPES[path]]}, got x in {x.dtype}")
    if out.dtype != x.dtype:
        _check(False, op, f"out must have x's dtype {x.dtype}, got {out.dtype}")
    if w.dtype != _LINEAR_TENSOR_DTYPES[path] or tuple(w.shape) != linear_weight_shape(path, N, K):
        _check(False, op, f"the {path} weight for (N, K) = ({N}, {K}) must be {_LINEAR_TENSOR_DTYPES[path]} "
               f"{linear_weight_shape(path, N, K)}, got {w.dtype} {tuple(w.shape)}")
    if not w.is_contiguous():
        _check(False, op, "the weight must be contiguous (as llada_rt.linear.Linear builds it)")
    if path in ("blocked_int8", "rows_int8") and (scale is None or scale.dtype != torch.float32
                                                  or tuple(scale.shape) != (N,) or not scale.is_contiguous()):
        _check(False, op, f"int8 weights need float32 contiguous scales of shape ({N},)")
    for name, t in (("x", x), ("w", w), ("scale", scale)):
        if t is not None and t.device != out.device:
            _check(False, op, f"{name} is on {t.device} but out is on {out.device}")
    if x.stride(1) != 1 or out.stride(1) != 1:
        _check(False, op, f"x and out must have unit stride over their last dimension, got strides {x.stride()} and "
               f"{out.stride()}")
    if max(M, N, K) >= 2**31:
        _check(False, op, f"sizes must be < 2**31, got (M, N, K) = ({M}, {N}, {K})")
    if out.is_cuda:
        _check(path == "rows_int8", op, f"the {path} weights are a CPU layout; on CUDA int8 weights are rows_int8")
        if K % 16 or x.stride(0) % 8 or x.data_ptr() % 16 or w.data_ptr() % 16:
            _check(False, op, f"the CUDA int8 kernel needs K % 16 == 0 and 16-byte aligned rows of x and W, got K = "
                   f"{K}, x row stride {x.stride(0)}")
    else:
        _check(path != "rows_int8", op, "rows_int8 is the CUDA layout; on the CPU int8 weights are blocked_int8")
        if layout not in _LINEAR_SUPPORTED:
            _LINEAR_SUPPORTED[layout] = _C.linear_cpu_supports(layout)
        if not _LINEAR_SUPPORTED[layout]:
            _check(False, op, f"this CPU lacks the instructions of the {path} kernel (cpu_features(): "
                   f"{cpu_features()}); build the Linear with a torch path instead")


def _linear_out_impl(out, x, w, scale, layout):
    _check_linear_kernel(out, x, w, scale, layout)
    M, K = x.shape
    N = out.shape[1]
    if M == 0 or N == 0:
        return
    args = (out.data_ptr(), x.data_ptr(), w.data_ptr(), 0 if scale is None else scale.data_ptr(), x.stride(0),
            out.stride(0), M, N, K, DTYPE_CODES[x.dtype], layout)
    if out.is_cuda:
        _require_cuda_build("linear")
        _C.linear_cuda(*args, _stream(out))
    else:
        _C.linear_cpu(*args, torch.get_num_threads())


_lib.impl("linear_out", _linear_out_impl, "CPU")
_lib.impl("linear_out", _linear_out_impl, "CUDA")


@torch.library.register_fake("llada_rt::linear_out")
def _linear_out_fake(out, x, w, scale, layout):
    _check_linear_kernel(out, x, w, scale, layout)


def linear(x: torch.Tensor, w, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W^T -> (..., N) for a llada_rt.linear.Linear w, by the path it was built for, written into `out`
    when given (then nothing is allocated: x must be contiguous, out (..., N) with contiguous rows).

    Paths: torch_nk / torch_kn run torch.mm on W (N, K) or W^T (K, N) (fp32/bf16/fp16, any device); blocked_f32 /
    blocked_bf16 (CPU) our AVX-512 kernels, fp32 or bf16 in and out, fp32 accumulation. int8 weights, output in x's
    dtype: blocked_int8 (CPU) quantizes each row of x (fp32 or bf16) to int16 (scale max |x| / 32767, half to even),
    sums x q exactly in int32 over 256 k at a time (AVX512-VNNI), then in fp32, times both scales; rows_int8 (CUDA)
    dequantises q exactly to bf16 for mma.sync with bf16 x, fp32 accumulation, times the column scale.
    """
    K, N = w.K, w.N
    if x.shape[-1] != K:
        _check(False, "linear", f"x has {x.shape[-1]} features (last dimension) but the weight takes K = {K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K) if x.dim() != 2 else x                                  # (M, K), a view when contiguous
    if out is None:
        out = torch.empty((*lead, N), dtype=x.dtype, device=x.device)
    if out.shape[:-1] != lead or out.shape[-1] != N:
        _check(False, "linear", f"out must have shape {(*lead, N)}, got {tuple(out.shape)}")
    out2 = out.view(-1, N) if out.dim() != 2 else out                            # (M, N)
    if w.path in ("torch_nk", "torch_kn"):
        t = w.tensor
        if x.dtype != t.dtype or out.dtype != t.dtype:
            _check(False, "linear", f"the weight is {t.dtype}; x and out must be too, got {x.dtype} and {out.dtype}")
        if t.device != x.device:
            _check(False, "linear", f"the weight is on {t.device} but x is on {x.device}")
        torch.mm(x2, t.t() if w.path == "torch_nk" else t, out=out2)
    elif w.path in LINEAR_LAYOUTS:
        torch.ops.llada_rt.linear_out(out2, x2, w.tensor, w.scale, LINEAR_LAYOUTS[w.path])
    else:
        raise OpInputError(f"llada_rt.ops.linear: unknown path {w.path!r}; paths: {', '.join(LINEAR_PATHS)}")
    return out
