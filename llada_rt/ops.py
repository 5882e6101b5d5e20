"""The only importer of llada_rt._C: registers each kernel as a torch op, checks inputs, dispatches CPU vs CUDA. The
per-step ops given `out` run the op's own body directly for plain CPU tensors outside tracing (_eager): the same checks
and kernel, without the dispatcher's round trip; anything else goes through the registered op."""
from __future__ import annotations

from typing import NamedTuple

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


def _eager(first: torch.Tensor, *rest: torch.Tensor) -> bool:
    """Whether these are plain tensors, the first on the CPU, outside any tracing (no fake or dispatch mode, no torch
    function mode, not compiling): then an op's body may run without the dispatcher's round trip (several us a call,
    as much as a small kernel; the body's own checks catch a tensor on another device); otherwise the registered op
    runs, so tracing and fake tensors see it, and CUDA keeps its verified path."""
    if type(first) is not torch.Tensor or first.device.type != "cpu":
        return False
    for t in rest:   # a loop: all() over a generator cost more than the dispatcher round trip it saves
        if type(t) is not torch.Tensor:
            return False
    return not (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
                or torch.compiler.is_compiling())


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _require_cuda_build(op: str) -> None:
    if not _C.with_cuda:
        raise RuntimeError(f"llada_rt.ops.{op}: this build of llada_rt has no CUDA kernels (it was built without nvcc "
                           "or with LLADA_CUDA=OFF); reinstall with nvcc on PATH to run on the GPU")


# ---- confidence ----------------------------------------------------------------------------------------------------

_CONFIDENCE_INPUTS = ("Tensor logits, Tensor masked, Tensor temperature, Tensor seed, Tensor offset, Tensor position, "
                      "Tensor random_confidence, int[] special_ids, Tensor suppress_mask, Tensor zero_conf_mask, "
                      "int vocab_offset")
_STATE_OUTPUTS = ("Tensor(a!) key, Tensor(b!) token, Tensor(c!) num, Tensor(d!) ref, Tensor(e!) denom, "
                  "Tensor(f!) random_prob")
_lib.define(f"confidence({_CONFIDENCE_INPUTS}) -> (Tensor, Tensor)")
_lib.define(f"confidence_out(Tensor(a!) token, Tensor(b!) prob, {_CONFIDENCE_INPUTS}) -> ()")
_lib.define(f"confidence_partial({_CONFIDENCE_INPUTS}, int full_vocab) -> "
            "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_lib.define(f"confidence_partial_out({_STATE_OUTPUTS}, {_CONFIDENCE_INPUTS}, int full_vocab) -> ()")

MAX_SPECIAL_IDS = 8     # kMaxSpecialIds in csrc/common.h
REF_NONE = -(1 << 30)   # kRefNone in csrc/confidence.h: the softmax reference of a state with no softmax term


class ConfidenceState(NamedTuple):
    """One vocabulary shard's confidence state per (b, n): every field (B, N), or (R, B, N) stacked over R ranks.
    Softmax terms are in base 2 against an integer reference, so that shards merge by exact power-of-two scalings:
    the term of a logit x is 2^(x log2(e) - ref) (csrc/confidence.h)."""
    key: torch.Tensor          # float64: the shard's best key (logit + temperature * Gumbel); -inf: none is finite
    token: torch.Tensor        # int64: its global id; -1: row not masked; full_vocab: every id of the shard suppressed
    num: torch.Tensor          # float64: its softmax term (0 for a zero-confidence id or a dead row)
    ref: torch.Tensor          # int32: the shard's softmax reference (REF_NONE: no id of the shard is in the softmax)
    denom: torch.Tensor        # float64: the sum of the shard's softmax terms
    random_prob: torch.Tensor  # float64: the Philox uniform of random_confidence rows (the same on every rank), else -1


_STATE_DTYPES = ConfidenceState(torch.float64, torch.int64, torch.float64, torch.int32, torch.float64, torch.float64)
# per-row inputs of confidence and their dtypes
_CONFIDENCE_ROWS = {"temperature": torch.float32, "seed": torch.int64, "offset": torch.int64,
                    "position": torch.int64, "random_confidence": torch.bool, "suppress_mask": torch.int32,
                    "zero_conf_mask": torch.int32}


def _check_rows(op: str, B: int, device: torch.device, rows: dict, dtypes: dict) -> None:
    """Per-row inputs: tensors (B,) of their dtype on the device of the op."""
    for name, dtype in dtypes.items():
        t = rows[name]
        _check(isinstance(t, torch.Tensor), op,
               lambda: f"{name} must be a tensor ({B},) of {dtype}, got {type(t).__name__}")
        _check(t.dtype == dtype and tuple(t.shape) == (B,), op,
               lambda: f"{name} must be {dtype} ({B},), got {t.dtype} {tuple(t.shape)}")
        _check(t.device == device, op, lambda: f"{name} is on {t.device} but the op runs on {device}")


def _require_tensors(op: str, **named) -> None:
    """Before the dispatcher sees them (it would only say 'Unable to cast')."""
    for name, t in named.items():
        _check(isinstance(t, torch.Tensor), op, lambda: f"{name} must be a tensor, got {type(t).__name__}")


def _check_outputs(op: str, shape: tuple, device: torch.device, outputs) -> None:
    """Output tensors (name, tensor, dtype): that dtype and shape, contiguous, on the device of the op."""
    for name, t, dtype in outputs:
        _check(isinstance(t, torch.Tensor), op, lambda: f"out {name} must be a tensor {shape} of {dtype}")
        _check(t.dtype == dtype and tuple(t.shape) == shape, op,
               lambda: f"out {name} must be {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
        _check(t.device == device, op, lambda: f"out {name} is on {t.device} but the op runs on {device}")
        _check(t.is_contiguous(), op, lambda: f"out {name} must be contiguous (it is written as a flat array)")


def _check_confidence(op, logits, masked, rows, special_ids, vocab_offset, full_vocab) -> None:
    """full_vocab None: the full op, whose vocabulary ends with the slice."""
    _check(logits.dtype in DTYPE_CODES, op, lambda: f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    _check(logits.dim() == 3, op, lambda: f"logits must be (B, N, V), got shape {tuple(logits.shape)}")
    B, N, V = logits.shape
    _check(V > 0, op, "logits must have V > 0")
    _check(B * N < 2**31, op, lambda: f"logits shape {tuple(logits.shape)} is too large")
    _check(logits.stride(-1) == 1, op, lambda: f"logits must have unit stride over V, got strides {logits.stride()}")
    _check(masked.dtype == torch.bool, op, lambda: f"masked must be bool, got {masked.dtype}")
    _check(tuple(masked.shape) == (B, N), op, lambda: f"masked must be (B, N) = {(B, N)}, got {tuple(masked.shape)}")
    _check(masked.device == logits.device, op,
           lambda: f"masked is on {masked.device} but logits are on {logits.device}")
    _check_rows(op, B, logits.device, rows, _CONFIDENCE_ROWS)
    full_vocab = vocab_offset + V if full_vocab is None else full_vocab
    _check(0 <= vocab_offset and vocab_offset + V <= full_vocab < 2**31, op,
           lambda: f"the vocabulary slice [vocab_offset, vocab_offset + V) = [{vocab_offset}, {vocab_offset + V}) "
           f"must lie in [0, full_vocab) = [0, {full_vocab}), full_vocab < 2**31")
    _check(len(special_ids) <= MAX_SPECIAL_IDS, op,
           lambda: f"at most {MAX_SPECIAL_IDS} special_ids are supported, got {len(special_ids)}")
    bad = [i for i in special_ids if not 0 <= i < full_vocab]
    _check(not bad, op, lambda: f"special_ids {bad} are outside the vocabulary [0, {full_vocab})")
    if op == "confidence":  # every row needs an id of the slice that no mask can suppress
        inside = {i for i in special_ids if vocab_offset <= i < vocab_offset + V}
        _check(len(inside) < V, op, lambda: f"special_ids {sorted(inside)} cover the whole vocabulary of V = {V}: a "
               "row that suppresses them all would have no token")
    else:  # the merged vocabulary needs one; a shard may have none (its token is then full_vocab)
        _check(len(set(special_ids)) < full_vocab, op,
               lambda: f"special_ids {sorted(set(special_ids))} cover the whole vocabulary of {full_vocab} ids")


def _confidence_kwargs(outputs: dict, logits, masked, rows: dict, special_ids, vocab_offset, full_vocab) -> dict:
    """Keyword arguments of _C.ConfidenceParams / _emu.ConfidenceParams (integer pointers, sizes); outputs holds
    prob (the full op) or the six ConfidenceState fields (the partial op); full_vocab None: the full op's, the end
    of the slice. The tensors must outlive the call."""
    B, N, V = logits.shape
    full_vocab = vocab_offset + V if full_vocab is None else full_vocab
    kw = {name: 0 for name in ("prob", *ConfidenceState._fields)}
    kw.update({name: t.data_ptr() for name, t in outputs.items()})
    kw.update({name: t.data_ptr() for name, t in rows.items()})
    kw.update(logits=logits.data_ptr(), b_stride=logits.stride(0), n_stride=logits.stride(1),
              masked=masked.data_ptr(), B=B, N=N, V=V, dtype=DTYPE_CODES[logits.dtype], vocab_offset=vocab_offset,
              full_vocab=full_vocab, special_ids=list(special_ids))
    return kw


def _confidence_run(outputs: dict, logits, masked, rows: dict, special_ids, vocab_offset, full_vocab) -> None:
    """Runs the kernel of logits' device into outputs (no allocation when the inputs are contiguous)."""
    rows = {name: t.contiguous() for name, t in rows.items()}
    masked = masked.contiguous()
    if masked.numel() == 0:
        return
    kw = _confidence_kwargs(outputs, logits, masked, rows, special_ids, vocab_offset, full_vocab)
    if logits.is_cuda:
        _require_cuda_build("confidence")
        _C.confidence_cuda(_C.ConfidenceParams(**kw), _stream(logits))
    else:
        _C.confidence_cpu(_C.ConfidenceParams(**kw))


def _rows(temperature, seed, offset, position, random_confidence, suppress_mask, zero_conf_mask) -> dict:
    return dict(temperature=temperature, seed=seed, offset=offset, position=position,
                random_confidence=random_confidence, suppress_mask=suppress_mask, zero_conf_mask=zero_conf_mask)


def _confidence_impl(logits, masked, temperature, seed, offset, position, random_confidence, special_ids,
                     suppress_mask, zero_conf_mask, vocab_offset):
    rows = _rows(temperature, seed, offset, position, random_confidence, suppress_mask, zero_conf_mask)
    _check_confidence("confidence", logits, masked, rows, special_ids, vocab_offset, None)
    B, N, _ = logits.shape
    token = torch.empty((B, N), dtype=torch.int64, device=logits.device)    # (B, N)
    prob = torch.empty((B, N), dtype=torch.float64, device=logits.device)   # (B, N)
    _confidence_run(dict(token=token, prob=prob), logits, masked, rows, special_ids, vocab_offset, None)
    return token, prob


def _confidence_out_impl(token, prob, logits, masked, temperature, seed, offset, position, random_confidence,
                         special_ids, suppress_mask, zero_conf_mask, vocab_offset):
    rows = _rows(temperature, seed, offset, position, random_confidence, suppress_mask, zero_conf_mask)
    _check_confidence("confidence", logits, masked, rows, special_ids, vocab_offset, None)
    _check_outputs("confidence", tuple(masked.shape), logits.device,
                   (("token", token, torch.int64), ("prob", prob, torch.float64)))
    _confidence_run(dict(token=token, prob=prob), logits, masked, rows, special_ids, vocab_offset, None)


def _confidence_partial_impl(logits, masked, temperature, seed, offset, position, random_confidence, special_ids,
                             suppress_mask, zero_conf_mask, vocab_offset, full_vocab):
    rows = _rows(temperature, seed, offset, position, random_confidence, suppress_mask, zero_conf_mask)
    _check_confidence("confidence_partial", logits, masked, rows, special_ids, vocab_offset, full_vocab)
    B, N, _ = logits.shape
    state = ConfidenceState(*(torch.empty((B, N), dtype=d, device=logits.device) for d in _STATE_DTYPES))
    _confidence_run(state._asdict(), logits, masked, rows, special_ids, vocab_offset, full_vocab)
    return tuple(state)


def _confidence_partial_out_impl(key, token, num, ref, denom, random_prob, logits, masked, temperature, seed, offset,
                                 position, random_confidence, special_ids, suppress_mask, zero_conf_mask, vocab_offset,
                                 full_vocab):
    rows = _rows(temperature, seed, offset, position, random_confidence, suppress_mask, zero_conf_mask)
    _check_confidence("confidence_partial", logits, masked, rows, special_ids, vocab_offset, full_vocab)
    state = ConfidenceState(key, token, num, ref, denom, random_prob)
    _check_outputs("confidence_partial", tuple(masked.shape), logits.device,
                   zip(state._fields, state, _STATE_DTYPES))
    _confidence_run(state._asdict(), logits, masked, rows, special_ids, vocab_offset, full_vocab)


for _name, _impl in (("confidence", _confidence_impl), ("confidence_out", _confidence_out_impl),
                     ("confidence_partial", _confidence_partial_impl),
                     ("confidence_partial_out", _confidence_partial_out_impl)):
    _lib.impl(_name, _impl, "CPU")
    _lib.impl(_name, _impl, "CUDA")


@torch.library.register_fake("llada_rt::confidence")
def _confidence_fake(logits, masked, temperature, seed, offset, position, random_confidence, special_ids,
                     suppress_mask, zero_conf_mask, vocab_offset):
    rows = _rows(temperature, seed, offset, position, random_confidence, suppress_mask, zero_conf_mask)
    _check_confidence("confidence", logits, masked, rows, special_ids, vocab_offset, None)
    B, N, _ = logits.shape
    return logits.new_empty((B, N), dtype=torch.int64), logits.new_empty((B, N), dtype=torch.float64)


@torch.library.register_fake("llada_rt::confidence_out")
def _confidence_out_fake(token, prob, logits, masked, temperature, seed, offset, position, random_confidence,
                         special_ids, suppress_mask, zero_conf_mask, vocab_offset):
    rows = _rows(temperature, seed, offset, position, random_confidence, suppress_mask, zero_conf_mask)
    _check_confidence("confidence", logits, masked, rows, special_ids, vocab_offset, None)


@torch.library.register_fake("llada_rt::confidence_partial")
def _confidence_partial_fake(logits, masked, temperature, seed, offset, position, random_confidence, special_ids,
                             suppress_mask, zero_conf_mask, vocab_offset, full_vocab):
    rows = _rows(temperature, seed, offset, position, random_confidence, suppress_mask, zero_conf_mask)
    _check_confidence("confidence_partial", logits, masked, rows, special_ids, vocab_offset, full_vocab)
    B, N, _ = logits.shape
    return tuple(logits.new_empty((B, N), dtype=d) for d in _STATE_DTYPES)


@torch.library.register_fake("llada_rt::confidence_partial_out")
def _confidence_partial_out_fake(key, token, num, ref, denom, random_prob, logits, masked, temperature, seed, offset,
                                 position, random_confidence, special_ids, suppress_mask, zero_conf_mask, vocab_offset,
                                 full_vocab):
    rows = _rows(temperature, seed, offset, position, random_confidence, suppress_mask, zero_conf_mask)
    _check_confidence("confidence_partial", logits, masked, rows, special_ids, vocab_offset, full_vocab)


def confidence(logits: torch.Tensor, masked: torch.Tensor, *, temperature: torch.Tensor, seed: torch.Tensor,
               offset: torch.Tensor, position: torch.Tensor, random_confidence: torch.Tensor, special_ids,
               suppress_mask: torch.Tensor, zero_conf_mask: torch.Tensor, vocab_offset: int = 0, out=None):
    """Argmax token and its float64 softmax probability per masked row, every setting per batch row: logits (B, N, V)
    (unit stride over V), masked bool (B, N) -> token int64 (B, N) (-1 where not masked), prob float64 (B, N) (-inf
    where not masked; unmasked rows' logits are never read). Written into out = (token, prob) when given (no
    allocation on the CPU).

    Per row b (tensors (B,) on logits' device, read by the kernel: no host sync, capturable): temperature float32 (0:
    argmax; > 0: Gumbel-max, the noise added to the argmax only), seed / offset int64 (Philox key / the request's own
    step), position int64 (answer position of column 0: the draw of (b, n, id c) is keyed by (seed, position + n,
    offset) and column vocab_offset + c, never by b), random_confidence bool (prob = the Philox uniform at column
    kRandomConfidenceColumn of csrc/philox.h instead), suppress_mask / zero_conf_mask int32 (bit i set: special_ids[i], <= 8 host ints,
    is -inf before the argmax / may be chosen but gets prob 0; both leave the softmax). Rows whose keys are all -inf
    get the lowest id that is not suppressed, prob 0. vocab_offset: the logits hold ids [vocab_offset, vocab_offset +
    V) (token is a global id; special ids below the slice are ignored). The CPU raises on a negative or NaN
    temperature; CUDA treats it as 0. prob is a float64 softmax up to the error of fp32 exponentials: within about
    1e-6 p (1 - p) of the exact value (tests/test_confidence.py), so near-1 ties resolve as in float64."""
    _require_tensors("confidence", logits=logits, masked=masked, temperature=temperature, seed=seed, offset=offset,
                     position=position, random_confidence=random_confidence, suppress_mask=suppress_mask,
                     zero_conf_mask=zero_conf_mask)
    args = (logits, masked, temperature, seed, offset, position, random_confidence, [int(i) for i in special_ids],
            suppress_mask, zero_conf_mask, int(vocab_offset))
    if out is None:
        return torch.ops.llada_rt.confidence(*args)
    token, prob = out
    if _eager(logits, token, prob, masked, temperature, seed, offset, position, random_confidence, suppress_mask,
              zero_conf_mask):
        _confidence_out_impl(token, prob, *args)
    else:
        torch.ops.llada_rt.confidence_out(token, prob, *args)
    return token, prob


def confidence_partial(logits: torch.Tensor, masked: torch.Tensor, *, temperature: torch.Tensor, seed: torch.Tensor,
                       offset: torch.Tensor, position: torch.Tensor, random_confidence: torch.Tensor, special_ids,
                       suppress_mask: torch.Tensor, zero_conf_mask: torch.Tensor, vocab_offset: int, full_vocab: int,
                       out: ConfidenceState | None = None) -> ConfidenceState:
    """confidence over one shard of the vocabulary: logits (B, N, V) hold the global ids [vocab_offset, vocab_offset +
    V) of a vocabulary of full_vocab ids; the other inputs as confidence (the same on every rank) -> the shard's
    ConfidenceState, fields (B, N), written into out when given. confidence_merge of every rank's state (any split)
    equals confidence over the whole vocabulary: the same noise per global id, ties to the lower global id."""
    _require_tensors("confidence_partial", logits=logits, masked=masked, temperature=temperature, seed=seed,
                     offset=offset, position=position, random_confidence=random_confidence,
                     suppress_mask=suppress_mask, zero_conf_mask=zero_conf_mask)
    args = (logits, masked, temperature, seed, offset, position, random_confidence, [int(i) for i in special_ids],
            suppress_mask, zero_conf_mask, int(vocab_offset), int(full_vocab))
    if out is None:
        return ConfidenceState(*torch.ops.llada_rt.confidence_partial(*args))
    torch.ops.llada_rt.confidence_partial_out(*out, *args)
    return out


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2.0 ** e as float64 for integer e <= 0, exact (built from the exponent bits); 0 below the normal range."""
    e = e.to(torch.int64)
    bits = (e.clamp(min=-1022) + 1023) << 52
    return torch.where(e >= -1022, bits.view(torch.float64), torch.zeros((), dtype=torch.float64, device=e.device))


def confidence_merge(*states: ConfidenceState):
    """Merges vocabulary shards (pure torch, small tensors): one ConfidenceState with fields (R, B, N) stacked over
    the R ranks, or R states with fields (B, N) -> (token int64 (B, N), prob float64 (B, N)), exactly what confidence
    returns over the whole vocabulary (up to float64 rounding of the softmax sum)."""
    _check(len(states) > 0 and all(isinstance(s, ConfidenceState) for s in states), "confidence_merge",
           "pass one ConfidenceState stacked over ranks (fields (R, B, N)) or one ConfidenceState (B, N) per rank")
    st = states[0] if len(states) == 1 and states[0].key.dim() == 3 else ConfidenceState(
        *(torch.stack(field) for field in zip(*states)))                                 # fields (R, B, N)
    shape = tuple(st.key.shape)
    _check(len(shape) == 3, "confidence_merge", lambda: f"state fields must be (R, B, N), got {shape}")
    for name, t, dtype in zip(st._fields, st, _STATE_DTYPES):
        _check(t.dtype == dtype and tuple(t.shape) == shape, "confidence_merge",
               lambda: f"{name} must be {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
    ref = st.ref.amax(0)                                                                 # (B, N)
    scale = _pow2(st.ref - ref)                                                          # (R, B, N), exact
    denom = (st.denom * scale).sum(0)                                                    # (B, N)
    best = st.key.amax(0)                                                                # (B, N)
    cand = torch.where(st.key == best, st.token, torch.iinfo(torch.int64).max)          # (R, B, N)
    token = cand.amin(0)                                                                 # ties: lower global id
    winner = (cand == token).to(torch.int8).argmax(0, keepdim=True)                      # (1, B, N) rank index
    num = (st.num * scale).gather(0, winner)[0]                                          # (B, N)
    prob = torch.where(num > 0, num / denom, torch.zeros_like(num))
    random_prob = st.random_prob[0]
    prob = torch.where(random_prob >= 0, random_prob, prob)
    unmasked = st.token[0] < 0
    token = torch.where(unmasked, torch.full_like(token, -1), token)
    prob = torch.where(unmasked, torch.full_like(prob, float("-inf")), prob)
    return token, prob


# ---- remask --------------------------------------------------------------------------------------------------------

_REMASK_INPUTS = "Tensor token, Tensor prob, int mask_id, Tensor k, Tensor rule, Tensor threshold, Tensor factor"
_lib.define(f"remask(Tensor(a!) block, {_REMASK_INPUTS}) -> Tensor")
_lib.define(f"remask_out(Tensor(a!) block, Tensor(b!) count, {_REMASK_INPUTS}) -> ()")

REMASK_RULES = {"topk": 0, "threshold": 1, "factor": 2}   # codes of the per-row rule tensor (RemaskRule in remask.h)
REMASK_MAX_N = 1024                                       # kRemaskMaxN in csrc/remask.h
_REMASK_ROWS = {"k": torch.int64, "rule": torch.int32, "threshold": torch.float64, "factor": torch.float64}


def _check_remask(block, token, prob, k, rule, threshold, factor) -> None:
    op = "remask"
    _check(block.dtype == torch.int64, op, lambda: f"block must be int64, got {block.dtype}")
    _check(block.dim() == 2, op, lambda: f"block must be (B, N), got shape {tuple(block.shape)}")
    _check(block.is_contiguous(), op, lambda: f"block must be contiguous (it is written in place), got strides "
           f"{block.stride()}; gather it into a contiguous (B, N) buffer")
    B, N = block.shape
    _check(N <= REMASK_MAX_N, op, lambda: f"the block length N must be <= {REMASK_MAX_N}, got {N}")
    _check(token.dtype == torch.int64, op, lambda: f"token must be int64, got {token.dtype}")
    _check(prob.dtype == torch.float64, op,
           lambda: f"prob must be float64 (as confidence returns it), got {prob.dtype}")
    for name, t in (("token", token), ("prob", prob)):
        _check(tuple(t.shape) == (B, N), op, lambda: f"{name} must be (B, N) = {(B, N)}, got {tuple(t.shape)}")
        _check(t.device == block.device, op, lambda: f"{name} is on {t.device} but block is on {block.device}")
    _check_rows(op, B, block.device, dict(k=k, rule=rule, threshold=threshold, factor=factor), _REMASK_ROWS)


def _remask_run(block, count, token, prob, mask_id, k, rule, threshold, factor) -> None:
    B, N = block.shape
    if B == 0 or N == 0:
        return
    token, prob, k, rule = token.contiguous(), prob.contiguous(), k.contiguous(), rule.contiguous()
    threshold, factor = threshold.contiguous(), factor.contiguous()
    params = _C.RemaskParams(block=block.data_ptr(), count=count.data_ptr(), token=token.data_ptr(),
                             prob=prob.data_ptr(), k=k.data_ptr(), rule=rule.data_ptr(),
                             threshold=threshold.data_ptr(), factor=factor.data_ptr(), B=B, N=N, mask_id=mask_id)
    if block.is_cuda:
        _require_cuda_build("remask")
        _C.remask_cuda(params, _stream(block))
    else:
        _C.remask_cpu(params)


def _remask_impl(block, token, prob, mask_id, k, rule, threshold, factor):
    _check_remask(block, token, prob, k, rule, threshold, factor)
    count = torch.zeros((block.shape[0],), dtype=torch.int32, device=block.device)   # (B,)
    _remask_run(block, count, token, prob, mask_id, k, rule, threshold, factor)
    return count


def _remask_out_impl(block, count, token, prob, mask_id, k, rule, threshold, factor):
    _check_remask(block, token, prob, k, rule, threshold, factor)
    _check_outputs("remask", (block.shape[0],), block.device, (("count", count, torch.int32),))
    if block.numel() == 0:
        count.zero_()
    _remask_run(block, count, token, prob, mask_id, k, rule, threshold, factor)


for _name, _impl in (("remask", _remask_impl), ("remask_out", _remask_out_impl)):
    _lib.impl(_name, _impl, "CPU")
    _lib.impl(_name, _impl, "CUDA")


@torch.library.register_fake("llada_rt::remask")
def _remask_fake(block, token, prob, mask_id, k, rule, threshold, factor):
    _check_remask(block, token, prob, k, rule, threshold, factor)
    return block.new_empty((block.shape[0],), dtype=torch.int32)


@torch.library.register_fake("llada_rt::remask_out")
def _remask_out_fake(block, count, token, prob, mask_id, k, rule, threshold, factor):
    _check_remask(block, token, prob, k, rule, threshold, factor)


def remask(block: torch.Tensor, token: torch.Tensor, prob: torch.Tensor, *, mask_id: int, k: torch.Tensor,
           rule: torch.Tensor, threshold: torch.Tensor, factor: torch.Tensor, out: torch.Tensor | None = None):
    """Commit masked positions (block == mask_id) of each row's current block in place: block int64 (B, N)
    contiguous (mutated), token int64 (B, N), prob float64 (B, N) -> count int32 (B,) of positions committed per row,
    written into out when given (no allocation on the CPU).

    Per row b (tensors (B,), read by the kernel: no host sync, capturable): rule int32 (REMASK_RULES: 0 'topk' commits
    the k[b] (int64) most confident masked positions; 1 'threshold' every masked position with prob >= threshold[b]
    (float64), at least the most confident one; 2 'factor' Fast-dLLM's factor rule with factor[b] (float64), its
    thresholds 1 - factor / (n + 1) in float64). Ties in prob go to the lower position; a committed token is written
    even if it equals mask_id (the position then stays masked, as in the official sampler). A rule code outside
    REMASK_RULES raises on the CPU; on CUDA that row commits nothing and gets count -1."""
    _require_tensors("remask", block=block, token=token, prob=prob, k=k, rule=rule, threshold=threshold,
                     factor=factor)
    args = (token, prob, int(mask_id), k, rule, threshold, factor)
    if out is None:
        return torch.ops.llada_rt.remask(block, *args)
    if _eager(block, out, token, prob, k, rule, threshold, factor):
        _remask_out_impl(block, out, *args)
    else:
        torch.ops.llada_rt.remask_out(block, out, *args)
    return out


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
    if t.dim() >= 1 and t.is_contiguous():
        return t.shape[-1]
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
    if _eager(out, x, weight):
        _rms_norm_into(out, x, weight, float(eps))
    else:
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
    if _eager(out, x, positions, cos, sin):
        _rope_into(out, x, positions, cos, sin, bool(full_precision))
    else:
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
    if _eager(out, gate_up):
        _silu_mul_into(out, gate_up)
    else:
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
    if _eager(out, q, k, v, *(t for t in (key_start, key_end, kv_rows) if t is not None)):
        _attention_into(out, q, k, v, key_start, key_end, kv_rows, scale)
    else:
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
    # the messages are built only on failure: this runs after every step
    for (name, dtype), t in zip(_ADVANCE_STATE, tensors):
        if t.dtype != dtype:
            _check(False, op, f"{name} must be {dtype}, got {t.dtype}")
        if t.device != canvas.device:
            _check(False, op, f"{name} is on {t.device} but canvas is on {canvas.device}")
        if name not in ("canvas", "slots") and not (t.shape == (R,) and t.is_contiguous()):
            _check(False, op, f"{name} must be a contiguous ({R},) tensor (one entry per canvas row), got "
                   f"{tuple(t.shape)}")
    if not (slots.dim() == 1 and slots.is_contiguous()):
        _check(False, op, f"slots must be a contiguous (B,) tensor, got {tuple(slots.shape)}")
    if not 0 < block_length <= canvas.shape[1]:
        _check(False, op, f"block_length must be in [1, T = {canvas.shape[1]}], got {block_length}")
    if len(stop_ids) > MAX_SPECIAL_IDS:
        _check(False, op, f"at most {MAX_SPECIAL_IDS} stop ids, got {len(stop_ids)}")


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


# ---- linear --------------------------------------------------------------------------------------------------------

_lib.define("linear_out(Tensor(a!) out, Tensor x, Tensor w, Tensor? scale, int layout) -> ()")

# A Linear's path (llada_rt/linear.py) -> the WeightLayout code of csrc/linear.h that our kernels read; the torch paths
# ("torch_nk": W (N, K) as stored, "torch_kn": W^T (K, N) contiguous) go to torch.mm.
LINEAR_LAYOUTS = {"blocked_f32": 0, "blocked_bf16": 1, "blocked_int8": 2, "rows_int8": 3, "blocked_int8x4": 4}
LINEAR_PATHS = ("torch_nk", "torch_kn", *LINEAR_LAYOUTS)
LINEAR_BLOCK_N = 16   # kLinearBlockN in csrc/linear.h
LINEAR_PANEL_N = 64   # kLinearPanelN: the blocked layouts pad N to a multiple of it
LINEAR_INT8X4_MAX_K = 65536   # kLinearInt8x4MaxK: blocked_int8x4's int32 sums are exact up to this K
LINEAR_INT8_PATHS = ("blocked_int8", "blocked_int8x4", "rows_int8")   # the paths of int8 weights (with scales)
_LINEAR_TENSOR_DTYPES = {"blocked_f32": torch.float32, "blocked_bf16": torch.bfloat16, "blocked_int8": torch.int8,
                         "rows_int8": torch.int8, "blocked_int8x4": torch.uint8}
# activation dtypes each kernel path takes (the output has the activations' dtype)
_LINEAR_X_DTYPES = {"blocked_f32": (torch.float32,), "blocked_bf16": (torch.bfloat16,),
                    "blocked_int8": (torch.float32, torch.bfloat16), "rows_int8": (torch.bfloat16,),
                    "blocked_int8x4": (torch.float32, torch.bfloat16)}


def linear_weight_shape(path: str, N: int, K: int) -> tuple[int, ...]:
    """The shape of the tensor a Linear on `path` holds for W (N, K) (the layouts of csrc/linear.h)."""
    if path in ("torch_nk", "rows_int8"):
        return (N, K)
    if path == "torch_kn":
        return (K, N)
    blocks = -(-N // LINEAR_PANEL_N) * LINEAR_PANEL_N // LINEAR_BLOCK_N
    if path == "blocked_f32":
        return (blocks, K, LINEAR_BLOCK_N)
    if path in ("blocked_bf16", "blocked_int8"):
        return (blocks, -(-K // 2), LINEAR_BLOCK_N, 2)
    if path == "blocked_int8x4":
        return (blocks, -(-K // 4), LINEAR_BLOCK_N, 4)
    raise KeyError(path)


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
    if path is None:
        _check(False, op, f"unknown weight layout code {layout}")
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
    if path in LINEAR_INT8_PATHS and (scale is None or scale.dtype != torch.float32
                                      or tuple(scale.shape) != (N,) or not scale.is_contiguous()):
        _check(False, op, f"int8 weights need float32 contiguous scales of shape ({N},)")
    if path == "blocked_int8x4" and K > LINEAR_INT8X4_MAX_K:
        _check(False, op, f"blocked_int8x4 sums exactly in int32 only up to K = {LINEAR_INT8X4_MAX_K}, got K = {K}; "
               "hold the weight as blocked_int8")
    device = out.device
    if x.device != device or w.device != device or scale is not None and scale.device != device:
        for name, t in (("x", x), ("w", w), ("scale", scale)):
            if t is not None and t.device != device:
                _check(False, op, f"{name} is on {t.device} but out is on {device}")
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
        _check(path != "rows_int8", op, "rows_int8 is the CUDA layout; on the CPU int8 weights are blocked_int8 or "
               "blocked_int8x4")
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
    sums x q exactly in int32 over 256 k at a time (AVX512-VNNI), then in fp32, times both scales; blocked_int8x4 (CPU,
    W8A8) quantizes each row of x to int8 (scale max |x| / 127, half to even), sums x q exactly in int32 over all of K
    (K <= LINEAR_INT8X4_MAX_K; vpdpbusd on weights held as q + 128, the offset taken off per row), times both scales;
    rows_int8 (CUDA)
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
        if _eager(out2, x2):
            _linear_out_impl(out2, x2, w.tensor, w.scale, LINEAR_LAYOUTS[w.path])   # the op's own body, undispatched
        else:
            torch.ops.llada_rt.linear_out(out2, x2, w.tensor, w.scale, LINEAR_LAYOUTS[w.path])
    else:
        raise OpInputError(f"llada_rt.ops.linear: unknown path {w.path!r}; paths: {', '.join(LINEAR_PATHS)}")
    return out
