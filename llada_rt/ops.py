"""The only importer of llada_rt._C: registers each kernel as a torch op, checks inputs, dispatches CPU vs CUDA."""
from __future__ import annotations

import torch

from . import _C

_lib = torch.library.Library("llada_rt", "DEF")

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class OpInputError(ValueError):
    """An op was called with a tensor of the wrong shape, dtype, device or layout."""


def _check(cond: bool, op: str, msg) -> None:
    """Raises OpInputError(msg) unless cond; msg may be a callable that builds the text (formatting only on failure,
    for the per-layer ops whose checks run on every call)."""
    if not cond:
        raise OpInputError(f"llada_rt.ops.{op}: {msg() if callable(msg) else msg}")


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


# ---- the CPU kernels' instruction set (csrc/cpu/vec.h) ------------------------------------------------------------

CPU_ISAS = tuple(_C.cpu_isas)  # widest first: ("avx512", "avx2", "baseline")


def set_cpu_isa(name: str) -> str:
    """Limits the instruction set of the rms_norm, rope, silu_mul and attention CPU kernels to `name` (one of CPU_ISAS;
    "avx512" lifts the limit), so that tests and benchmarks can run the narrower paths; returns the previous limit."""
    _check(name in CPU_ISAS, "set_cpu_isa", lambda: f"name must be one of {CPU_ISAS}, got {name!r}")
    return _C.set_cpu_isa(name)


def cpu_isa() -> str:
    """The instruction set the rms_norm, rope, silu_mul and attention CPU kernels run with now (the CPU's widest, or
    narrower after set_cpu_isa)."""
    return _C.cpu_isa()


# ---- rows of (..., n) tensors: rms_norm and silu_mul -----------------------------------------------------------------

def _row_stride(t: torch.Tensor, op: str, name: str) -> int:
    """Element stride between the rows of t (..., n) seen as (M, n): the leading dims must collapse into one (as a
    view would, without a copy) and the last has unit stride."""
    _check(t.dim() >= 1, op, lambda: f"{name} must have at least one dimension, got a scalar")
    _check(t.stride(-1) == 1 or t.shape[-1] <= 1, op,
           lambda: f"{name} must have unit stride over its last dim, got strides {t.stride()}")
    lead = [(n, s) for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n != 1]
    for (_, outer), (n, inner) in zip(lead, lead[1:]):
        _check(outer == inner * n, op, lambda: f"{name}'s leading dims {tuple(t.shape[:-1])} (strides "
               f"{t.stride()[:-1]}) do not collapse into rows of one stride; pass a .contiguous() copy")
    return lead[-1][1] if lead else t.shape[-1]


def _check_float(t: torch.Tensor, op: str, name: str) -> None:
    _check(t.dtype in DTYPE_CODES, op, lambda: f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_out(out, shape, dtype, device, op: str) -> None:
    _check(tuple(out.shape) == tuple(shape), op, lambda: f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    _check(out.dtype == dtype, op, lambda: f"out must be {dtype}, got {out.dtype}")
    _check(out.device == device, op, lambda: f"out is on {out.device}, the inputs on {device}")


def _define_out_op(name: str, schema_args: str, into, check, out_shape) -> None:
    """Registers torch.ops.llada_rt.<name>(schema_args) -> Tensor, which allocates out (shape out_shape(*inputs), the
    first input's dtype and device), and <name>_out(Tensor(a!) out, schema_args) -> (), which writes into a given out;
    both run into(out, *inputs) on CPU and CUDA. The fake impls run check(*inputs, out=...) and allocate fakes."""
    _lib.define(f"{name}({schema_args}) -> Tensor")
    _lib.define(f"{name}_out(Tensor(a!) out, {schema_args}) -> ()")

    def allocate(first, *rest):
        return torch.empty(out_shape(first, *rest), dtype=first.dtype, device=first.device)

    def impl(*inputs):
        out = allocate(*inputs)
        into(out, *inputs)
        return out

    def fake(*inputs):
        check(*inputs)
        return allocate(*inputs)

    def fake_out(out, *inputs):
        check(*inputs, out=out)

    for device in ("CPU", "CUDA"):
        _lib.impl(name, impl, device)
        _lib.impl(f"{name}_out", into, device)
    torch.library.register_fake(f"llada_rt::{name}", fake)
    torch.library.register_fake(f"llada_rt::{name}_out", fake_out)


# ---- rms_norm -------------------------------------------------------------------------------------------------------
# CPU: csrc/cpu/rms_norm.cpp. CUDA: the torch composition, deliberately (a CUDA graph replays it without allocating).

def _check_rms_norm(x, weight, eps, out=None) -> None:
    op = "rms_norm"
    _check_float(x, op, "x")
    _check(x.dim() >= 1 and x.shape[-1] > 0, op, lambda: f"x must be (..., d) with d > 0, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    _check(d < 2**31 and x.numel() < 2**62, op, lambda: f"x shape {tuple(x.shape)} is too large")
    _check(tuple(weight.shape) == (d,), op, lambda: f"weight must be (d,) = ({d},), got {tuple(weight.shape)}")
    _check(weight.dtype == x.dtype, op, lambda: f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    _check(weight.device == x.device, op, lambda: f"weight is on {weight.device} but x is on {x.device}")
    _check(weight.stride(0) == 1 or d == 1, op, lambda: f"weight must be contiguous, got stride {weight.stride()}")
    _row_stride(x, op, "x")
    if out is not None:
        _check_out(out, x.shape, x.dtype, x.device, op)
        _row_stride(out, op, "out")


def _rms_norm_into(out, x, weight, eps) -> None:
    _check_rms_norm(x, weight, eps, out)
    if x.numel() == 0:
        return
    if x.is_cuda:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        torch.mul(y, weight, out=out)
        return
    d = x.shape[-1]
    _C.rms_norm_cpu(out.data_ptr(), _row_stride(out, "rms_norm", "out"), x.data_ptr(), _row_stride(x, "rms_norm", "x"),
                    weight.data_ptr(), x.numel() // d, d, float(eps), DTYPE_CODES[x.dtype])


_define_out_op("rms_norm", "Tensor x, Tensor weight, float eps", _rms_norm_into, _check_rms_norm,
               lambda x, *_: x.shape)                                            # (..., d)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """LLaDA's RMSNorm: x (..., d), weight (d,) of x's dtype -> (x * rsqrt(mean(x^2) + eps) in fp32, cast to x's dtype)
    * weight in x's dtype (two roundings for bf16/fp16), written into `out` when given. Equal bit for bit to that torch
    composition on CPU (the sum of squares follows torch's own summation order)."""
    if out is None:
        return torch.ops.llada_rt.rms_norm(x, weight, float(eps))
    torch.ops.llada_rt.rms_norm_out(out, x, weight, float(eps))
    return out


# ---- rope -----------------------------------------------------------------------------------------------------------
# CPU: csrc/cpu/rope.cpp. CUDA: the torch composition, deliberately (as rms_norm).

def _check_rope(x, positions, cos, sin, full_precision, out=None) -> None:
    op = "rope"
    _check_float(x, op, "x")
    _check(x.dim() == 4, op, lambda: f"x must be (B, S, H, D), got shape {tuple(x.shape)}")
    B, S, H, D = x.shape
    _check(D % 2 == 0, op, lambda: f"the head dim D must be even (rotate_half pairs i with i + D/2), got {D}")
    _check(max(B * S, B * S * H, D) < 2**31, op, lambda: f"x shape {tuple(x.shape)} is too large")
    _check(x.stride(-1) == 1 or D <= 1, op, lambda: f"x must have unit stride over D, got strides {x.stride()}")
    _check(positions.dtype == torch.int64, op, lambda: f"positions must be int64, got {positions.dtype}")
    _check(tuple(positions.shape) == (B, S), op,
           lambda: f"positions must be (B, S) = {(B, S)}, got {tuple(positions.shape)}")
    _check(positions.device == x.device, op, lambda: f"positions is on {positions.device} but x is on {x.device}")
    for name, t in (("cos", cos), ("sin", sin)):
        _check(t.dtype == torch.float32, op, lambda: f"{name} must be float32 (the RoPE table), got {t.dtype}")
        _check(t.dim() == 2 and t.shape[1] == D // 2, op, lambda: f"{name} must be (P, D/2) = (P, {D // 2}), got "
               f"{tuple(t.shape)}")
        _check(t.is_contiguous(), op, lambda: f"{name} must be contiguous, got strides {t.stride()}")
        _check(t.device == x.device, op, lambda: f"{name} is on {t.device} but x is on {x.device}")
    _check(cos.shape[0] == sin.shape[0], op, lambda: f"cos and sin must have the same rows, got {cos.shape[0]} and "
           f"{sin.shape[0]}")
    if out is not None:
        _check_out(out, x.shape, x.dtype, x.device, op)
        _check(out.stride(-1) == 1 or D <= 1, op,
               lambda: f"out must have unit stride over D, got strides {out.stride()}")


def _rope_into(out, x, positions, cos, sin, full_precision) -> None:
    _check_rope(x, positions, cos, sin, full_precision, out)
    if x.numel() == 0:
        return
    B, S, H, D = x.shape
    if x.is_cuda:
        # contract on CUDA: positions in [0, P) (checking would need a host sync; torch's indexing asserts on device)
        tt = x.float() if full_precision else x
        c = cos[positions].repeat(1, 1, 2)[:, :, None, :].to(tt.dtype)           # (B, S, 1, D)
        s = sin[positions].repeat(1, 1, 2)[:, :, None, :].to(tt.dtype)
        x1, x2 = tt.chunk(2, dim=-1)
        out.copy_(tt * c + torch.cat([-x2, x1], dim=-1) * s)
        return
    strides = [*out.stride()[:3], *x.stride()[:3], *positions.stride()]
    bad = _C.rope_cpu(out.data_ptr(), x.data_ptr(), strides, positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                      cos.shape[0], B, S, H, D, bool(full_precision), DTYPE_CODES[x.dtype])
    if bad >= 0:
        b, s = divmod(bad, S)
        raise OpInputError(f"llada_rt.ops.rope: positions[{b}, {s}] = {int(positions[b, s])} is outside the RoPE "
                           f"table of P = {cos.shape[0]} rows; build the table for every position the engine uses")


_define_out_op("rope", "Tensor x, Tensor positions, Tensor cos, Tensor sin, bool full_precision", _rope_into,
               _check_rope, lambda x, *_: x.shape)                               # (B, S, H, D)


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding, NeoX rotate_half layout: x (B, S, H, D) (unit stride over D), positions int64 (B, S), cos/sin
    float32 (P, D/2) (row p: cos/sin(p * inv_freq)) -> x * cos + rotate_half(x) * sin with each (b, s)'s table row,
    written into `out` when given; out may be x itself (in place). full_precision: rotate in fp32 and round once
    (LLaDA's rope_full_precision); else torch's op-by-op rounding in x's dtype. Equal bit for bit to model.apply_rope
    with the same table on CPU. A position outside [0, P) raises on CPU; on CUDA it is the caller's contract."""
    if out is None:
        return torch.ops.llada_rt.rope(x, positions, cos, sin, bool(full_precision))
    torch.ops.llada_rt.rope_out(out, x, positions, cos, sin, bool(full_precision))
    return out


# ---- silu_mul -------------------------------------------------------------------------------------------------------
# CPU: csrc/cpu/silu_mul.cpp. CUDA: the torch composition, deliberately (as rms_norm).

def _check_silu_mul(gate_up, out=None) -> None:
    op = "silu_mul"
    _check_float(gate_up, op, "gate_up")
    _check(gate_up.dim() >= 1 and gate_up.shape[-1] % 2 == 0, op,
           lambda: f"gate_up must be (..., 2F) with an even last dim, got shape {tuple(gate_up.shape)}")
    _check(gate_up.shape[-1] < 2**31 and gate_up.numel() < 2**62, op,
           lambda: f"gate_up shape {tuple(gate_up.shape)} is too large")
    _row_stride(gate_up, op, "gate_up")
    if out is not None:
        _check_out(out, (*gate_up.shape[:-1], gate_up.shape[-1] // 2), gate_up.dtype, gate_up.device, op)
        _row_stride(out, op, "out")


def _silu_mul_into(out, gate_up) -> None:
    _check_silu_mul(gate_up, out)
    if out.numel() == 0:
        return
    F = gate_up.shape[-1] // 2
    if gate_up.is_cuda:
        gate, up = gate_up.chunk(2, dim=-1)
        torch.mul(torch.nn.functional.silu(gate), up, out=out)
        return
    _C.silu_mul_cpu(out.data_ptr(), _row_stride(out, "silu_mul", "out"), gate_up.data_ptr(),
                    _row_stride(gate_up, "silu_mul", "gate_up"), out.numel() // F, F, DTYPE_CODES[gate_up.dtype])


_define_out_op("silu_mul", "Tensor gate_up", _silu_mul_into, _check_silu_mul,
               lambda gate_up: (*gate_up.shape[:-1], gate_up.shape[-1] // 2))    # (..., F)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU's activation: gate_up (..., 2F) = [gate | up] -> silu(gate) * up (..., F), rounded as torch rounds
    F.silu(gate) * up in that dtype (silu rounded, then the product), written into `out` when given."""
    if out is None:
        return torch.ops.llada_rt.silu_mul(gate_up)
    torch.ops.llada_rt.silu_mul_out(out, gate_up)
    return out


# ---- attention -----------------------------------------------------------------------------------------------------

ATTENTION_HEAD_DIMS = (64, 128)  # head dims the CUDA kernel is compiled for (csrc/attention.cu)
CPU_ATTENTION_MAX_HEAD_DIM = 256  # kMaxHeadDim in csrc/cpu/attention.cpp

# The one dispatch of ops.attention: (device type, dtype) -> implementation. fp32 on CUDA runs torch SDPA on purpose:
# the tensor-core kernel has no fp32 path, and fp32 on a GPU is a reference configuration, not a fast one (kv_rows
# goes through index_select there, a copy).
ATTENTION_BACKENDS = {
    ("cpu", torch.float32): "cpu", ("cpu", torch.bfloat16): "cpu", ("cpu", torch.float16): "cpu",
    ("cuda", torch.bfloat16): "mma", ("cuda", torch.float16): "mma",
    ("cuda", torch.float32): "sdpa",
}
_ATTENTION_BACKEND_NAMES = {
    "cpu": "llada_rt CPU flash attention (csrc/cpu/attention.cpp)",
    "mma": "llada_rt mma.sync flash attention (csrc/attention.cu)",
    "sdpa": "torch scaled_dot_product_attention (fp32 on CUDA)",
}


def _attention_backend_code(device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    op = "attention"
    code = ATTENTION_BACKENDS.get((device_type, dtype))
    _check(code is not None, op, lambda: f"no attention for {str(dtype).replace('torch.', '')} on {device_type}; "
           "supported: " + ", ".join(f"{dev} {str(dt).replace('torch.', '')}" for dev, dt in ATTENTION_BACKENDS))
    if code == "mma":
        _check(head_dim in ATTENTION_HEAD_DIMS, op,
               lambda: f"the CUDA kernel supports head dim D in {ATTENTION_HEAD_DIMS}, got {head_dim}")
    elif code == "cpu":
        _check(1 <= head_dim <= CPU_ATTENTION_MAX_HEAD_DIM, op, lambda: f"the CPU kernel supports head dim D in [1, "
               f"{CPU_ATTENTION_MAX_HEAD_DIM}], got {head_dim}")
    return code


def attention_backend(device, dtype: torch.dtype, head_dim: int) -> str:
    """What ops.attention runs for tensors on `device` of `dtype` with head dim `head_dim` (for reports); raises
    OpInputError, naming the supported combinations, where nothing does."""
    return _ATTENTION_BACKEND_NAMES[_attention_backend_code(torch.device(device).type, dtype, head_dim)]


def _check_attention(q, k, v, key_start, key_end, kv_rows, scale, out=None) -> str:
    """Checks the inputs; returns the ATTENTION_BACKENDS code that runs them."""
    op = "attention"
    _check(q.dim() == 4, op, lambda: f"q must be (B, Lq, Hq, D), got shape {tuple(q.shape)}")
    _check(k.dim() == 4, op, lambda: f"k must be (B, Lk, Hkv, D) (or (R, Lk, Hkv, D) with kv_rows), got shape "
           f"{tuple(k.shape)}")
    _check(v.shape == k.shape, op, lambda: f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    B, Lq, Hq, D = q.shape
    R = k.shape[0]
    if kv_rows is None:
        _check(R == B and k.shape[3] == D, op, lambda: f"k must be (B={B}, Lk, Hkv, D={D}), got {tuple(k.shape)}")
    else:
        _check(R > 0 and k.shape[3] == D, op, lambda: f"k must be (R, Lk, Hkv, D={D}) with R > 0, got {tuple(k.shape)}")
    Lk, Hkv = k.shape[1], k.shape[2]
    _check(Hkv > 0 and Hq % Hkv == 0, op, lambda: f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    _check(q.dtype == k.dtype == v.dtype, op,
           lambda: f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("k", k), ("v", v)):
        _check(t.device == q.device, op, lambda: f"{name} is on {t.device} but q is on {q.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(t.stride(-1) == 1, op, lambda: f"{name} must have unit stride over D, got strides {t.stride()}")
    _check(max(B * Lq, Lk, B * Hq, R) < 2**31, op, "tensor sizes must be < 2**31")
    for name, t in (("key_start", key_start), ("key_end", key_end), ("kv_rows", kv_rows)):
        if t is not None:
            _check(not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool, op,
                   lambda: f"{name} must be an integer tensor, got {t.dtype}")
            _check(tuple(t.shape) == (B,), op, lambda: f"{name} must have shape (B,) = ({B},), got {tuple(t.shape)}")
            _check(t.device == q.device, op, lambda: f"{name} is on {t.device} but q is on {q.device}")
    if out is not None:
        _check(out.shape == q.shape, op, lambda: f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
        _check(out.dtype == q.dtype, op, lambda: f"out must have q's dtype {q.dtype}, got {out.dtype}")
        _check(out.device == q.device, op, lambda: f"out is on {out.device} but q is on {q.device}")
        _check(out.stride(-1) == 1, op, lambda: f"out must have unit stride over D, got strides {out.stride()}")
    code = _attention_backend_code(q.device.type, q.dtype, D)
    if code == "mma":
        _check_attention_kernel_layout(q, k, v, out)
    return code


def _check_attention_kernel_layout(q, k, v, out) -> None:
    """What the tensor-core kernel needs: 16-byte aligned rows (cp.async)."""
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:3]), op,
               lambda: f"{name} rows must be 16-byte aligned (data pointer % 16 == 0, strides over B, L, H multiples "
               f"of 8 elements), got strides {t.stride()}; pass a .contiguous() copy")
    if out is not None:
        _check(out.data_ptr() % 4 == 0 and all(s % 2 == 0 for s in out.stride()[:3]), op,
               lambda: f"out must be 4-byte aligned with even strides, got strides {out.stride()}")


def _int32(t: torch.Tensor | None) -> torch.Tensor | None:
    """An int32 contiguous view of t (a copy only when t is not already int32 and contiguous)."""
    return None if t is None else t.to(torch.int32).contiguous()


def _attention_args(out, q, k, v, key_start, key_end, kv_rows, scale) -> tuple:
    """The argument tuple of _C.attention_cpu / _C.attention_cuda (without the stream) / _emu.attention; key ranges
    and kv_rows as int32 (pass int32 tensors to avoid the conversion's copy)."""
    B, Lq, Hq, D = q.shape
    R, Lk, Hkv = k.shape[0], k.shape[1], k.shape[2]
    key_start, key_end, kv_rows = _int32(key_start), _int32(key_end), _int32(kv_rows)
    strides = [*out.stride()[:3], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3]]
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    args = (out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), strides, ptr(key_start), ptr(key_end),
            ptr(kv_rows), B, Lq, Lk, Hq, Hkv, D, R, float(scale), DTYPE_CODES[q.dtype])
    return args, (key_start, key_end, kv_rows)  # the int32 copies must outlive the call


def _attention_sdpa(out, q, k, v, key_start, key_end, kv_rows, scale) -> None:
    """fp32 on CUDA (see ATTENTION_BACKENDS): torch SDPA with a key mask; no host sync."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    if kv_rows is not None:
        k, v = k.index_select(0, kv_rows.long()), v.index_select(0, kv_rows.long())   # (B, Lk, Hkv, D)
    pos = torch.arange(Lk, device=q.device)
    valid = torch.ones((B, Lk), dtype=torch.bool, device=q.device)                      # (B, Lk)
    if key_start is not None:
        valid &= pos[None, :] >= key_start.long()[:, None]
    if key_end is not None:
        valid &= pos[None, :] < key_end.long()[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=valid[:, None, None, :], scale=scale,
        enable_gqa=Hq != Hkv)                                                           # (B, Hq, Lq, D)
    # SDPA gives NaN for a row with no valid key; the op's contract is zeros
    out.copy_(torch.where(valid.any(-1)[:, None, None, None], o, 0.0).transpose(1, 2))


def _attention_into(out, q, k, v, key_start, key_end, kv_rows, scale) -> None:
    code = _check_attention(q, k, v, key_start, key_end, kv_rows, scale, out)
    if out.numel() == 0:
        return
    if code == "sdpa":
        _attention_sdpa(out, q, k, v, key_start, key_end, kv_rows, scale)
        return
    args, _keep = _attention_args(out, q, k, v, key_start, key_end, kv_rows, scale)
    if code == "mma":
        _require_cuda_build("attention")
        _C.attention_cuda(*args, _stream(q))
        return
    bad = _C.attention_cpu(*args)
    if bad >= 0:
        raise OpInputError(f"llada_rt.ops.attention: kv_rows[{bad}] = {int(kv_rows[bad])} is outside the R = "
                           f"{k.shape[0]} rows of k/v")


_define_out_op("attention", "Tensor q, Tensor k, Tensor v, Tensor? key_start, Tensor? key_end, Tensor? kv_rows, "
               "float scale", _attention_into, _check_attention, lambda q, *_: q.shape)   # (B, Lq, Hq, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor | None = None,
              key_end: torch.Tensor | None = None, scale: float | None = None, kv_rows: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Bidirectional attention: q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D) -> o (B, Lq, Hq, D), written into `out` when
    given. With kv_rows (int (B,)), k/v are (R, Lk, Hkv, D) (e.g. one layer of the persistent cache) and q row b
    attends k[kv_rows[b]], v[kv_rows[b]] in place. Views are fine: unit stride over D is all that is needed. Keys
    [key_start[b], key_end[b]) are valid for q row b (int (B,); None means 0 and Lk); a row with no valid key outputs
    zeros. Hq must be a multiple of Hkv (GQA); scale defaults to 1/sqrt(D). Pass key ranges and kv_rows as int32 to
    keep the call allocation-free (other integer dtypes are converted, a copy). Implementations: ATTENTION_BACKENDS /
    attention_backend(); kv_rows outside [0, R) raise on CPU and are the caller's contract on CUDA."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if out is None:
        return torch.ops.llada_rt.attention(q, k, v, key_start, key_end, kv_rows, scale)
    torch.ops.llada_rt.attention_out(out, q, k, v, key_start, key_end, kv_rows, scale)
    return out


# ---- advance -------------------------------------------------------------------------------------------------------

_ADVANCE_STATE = (("status", torch.int32), ("canvas", torch.int64), ("slots", torch.int64),
                  ("block_start", torch.int64), ("step", torch.int64), ("nsteps", torch.int64), ("k", torch.int64),
                  ("spb", torch.int64), ("prompt_len", torch.int64), ("length", torch.int64), ("rule", torch.int32),
                  ("early_stop", torch.bool), ("filled", torch.int32))


def _check_advance(tensors, block_length, stop_ids) -> None:
    op = "advance"
    named = dict(zip((n for n, _ in _ADVANCE_STATE), tensors))
    canvas, slots = named["canvas"], named["slots"]
    _check(canvas.dim() == 2 and canvas.stride(1) == 1, op, f"canvas must be (R, T) with unit stride over T, got shape "
           f"{tuple(canvas.shape)} strides {canvas.stride()}")
    R = canvas.shape[0]
    for (name, dtype), t in zip(_ADVANCE_STATE, tensors):
        _check(t.dtype == dtype, op, f"{name} must be {dtype}, got {t.dtype}")
        _check(t.device == canvas.device, op, f"{name} is on {t.device} but canvas is on {canvas.device}")
        if name not in ("canvas", "slots"):
            _check(tuple(t.shape) == (R,) and t.is_contiguous(), op,
                   f"{name} must be a contiguous ({R},) tensor (one entry per canvas row), got {tuple(t.shape)}")
    _check(slots.dim() == 1 and slots.is_contiguous(), op, f"slots must be a contiguous (B,) tensor, got "
           f"{tuple(slots.shape)}")
    _check(0 < block_length <= canvas.shape[1], op, f"block_length must be in [1, T = {canvas.shape[1]}], got "
           f"{block_length}")
    _check(len(stop_ids) <= MAX_SPECIAL_IDS, op, f"at most {MAX_SPECIAL_IDS} stop ids, got {len(stop_ids)}")


def advance(status, canvas, slots, block_start, step, nsteps, k, spb, prompt_len, length, rule, early_stop, filled, *,
            block_length: int, mask_id: int, fill_id: int, stop_ids=(), skip_slot: int = -1) -> None:
    """After a denoising step of the canvas rows `slots` (B,): moves each row's counters on in place (semantics and
    status bits: reference.advance). Every state tensor is one entry per canvas row (R,); nothing is read back to
    the host and nothing is allocated, so it can run inside a CUDA graph."""
    tensors = (status, canvas, slots, block_start, step, nsteps, k, spb, prompt_len, length, rule, early_stop, filled)
    _check_advance(tensors, block_length, stop_ids)
    B = slots.shape[0]
    if B == 0:
        return
    args = ([t.data_ptr() for t in tensors], canvas.stride(0), B, int(block_length), int(mask_id), int(fill_id),
            [int(i) for i in stop_ids], int(skip_slot))
    if canvas.is_cuda:
        _require_cuda_build("advance")
        _C.advance_cuda(*args, _stream(canvas))
    else:
        _C.advance_cpu(*args)
