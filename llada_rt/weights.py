"""Safetensors checkpoints (single file or sharded index) straight to device tensors; the only HF-name table.

int8 checkpoints (`llada-rt quantize`; config.json "quantization_config" = config.INT8_QUANTIZATION_CONFIG): every
linear weight of the float layout (q/k/v_proj, attn_out, ff_proj, up_proj, the block ff_out, and the LM head
model.transformer.ff_out when untied) is stored under its own name as I8 (N, K), row-major as in the float file, with
float32 scales (N,) under the name + "_scale": W[n] = q[n] * scale[n], scale[n] = max |W[n]| / 127, q = round(W / scale)
(symmetric, per output channel). The embedding and the norms keep their float dtype; a tied LM head is quantized from
the embedding at load.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import torch

from .config import INT8_QUANTIZATION_CONFIG, ConfigError, LLaDAConfig, parse_json, read_json, short_repr
from .linear import QUANTIZE_MODES, Linear, describe as describe_linears

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# Bits per element of every safetensors dtype (the format's list), to check each header entry's byte span.
_ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
            "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
            "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}
_MAX_HEADER = 100 * 2**20   # safetensors' own limit on the JSON header
_ST_INT8 = {"I8": torch.int8}   # the quantized linear weights of an int8 checkpoint
SCALE_SUFFIX = INT8_QUANTIZATION_CONFIG["scale_suffix"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupt (a malformed index or safetensors header entry), its tensors
    do not match config.json, or they hold NaN/inf."""


@dataclasses.dataclass
class LayerWeights:
    attn_norm: torch.Tensor   # (d,)
    wqkv: Linear              # W ((Hq + 2 Hkv) D, d): q_proj, k_proj, v_proj stacked
    wo: Linear                # W (d, Hq D)
    ff_norm: torch.Tensor     # (d,)
    w_gate_up: Linear         # W (2 mlp, d): ff_proj (gate) then up_proj
    w_down: Linear            # W (d, mlp)


@dataclasses.dataclass
class ModelWeights:
    embed: torch.Tensor       # (V, d), dense (the lookup), in the activation dtype
    layers: list[LayerWeights]
    ln_f: torch.Tensor        # (d,)
    lm_head: Linear           # W (V, d); when weight_tying, built on the embedding itself (or its int8 copy)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def quantized(self) -> bool:
        return any(lin.quantized for lin in self.linears().values())

    def linears(self) -> dict[str, Linear]:
        """Every Linear by name: layers.{i}.wqkv, ..., lm_head."""
        out = {f"layers.{i}.{f.name}": getattr(l, f.name) for i, l in enumerate(self.layers)
               for f in dataclasses.fields(l) if isinstance(getattr(l, f.name), Linear)}
        out["lm_head"] = self.lm_head
        return out

    def describe(self) -> str:
        """Which path each linear runs and why (llada_rt.linear.describe)."""
        return describe_linears(self.linears())

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (the tensors themselves: dataclasses.astuple would deep-copy them; a Linear's held tensor
        and scales)."""
        out = [self.embed, self.ln_f]
        for l in self.layers:
            out += [l.attn_norm, l.ff_norm]
        for lin in self.linears().values():
            out += [lin.tensor] + ([lin.scale] if lin.scale is not None else [])
        return out

    def num_parameters(self) -> int:
        """Parameters of the model (N K per linear, whatever its layout holds; a tied LM head counts once)."""
        n = self.embed.numel() + self.ln_f.numel() + sum(l.attn_norm.numel() + l.ff_norm.numel() for l in self.layers)
        tied = self.lm_head.tensor is self.embed
        return n + sum(lin.N * lin.K for name, lin in self.linears().items() if not (tied and name == "lm_head"))


def expected_shapes(cfg: LLaDAConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor a LLaDA checkpoint must hold (LLADA.md 1.4); an int8 checkpoint also
    holds a scale (N,) per quantized weight."""
    d, dh, v, mlp = cfg.d_model, cfg.head_dim, cfg.embedding_size, cfg.mlp_hidden_size
    shapes = {"model.transformer.wte.weight": (v, d), "model.transformer.ln_f.weight": (d,)}
    if not cfg.weight_tying:
        shapes["model.transformer.ff_out.weight"] = (v, d)
    for i in range(cfg.n_layers):
        p = f"model.transformer.blocks.{i}."
        shapes.update({
            p + "attn_norm.weight": (d,), p + "q_proj.weight": (cfg.n_heads * dh, d),
            p + "k_proj.weight": (cfg.n_kv_heads * dh, d), p + "v_proj.weight": (cfg.n_kv_heads * dh, d),
            p + "attn_out.weight": (d, cfg.n_heads * dh), p + "ff_norm.weight": (d,),
            p + "ff_proj.weight": (mlp, d), p + "up_proj.weight": (mlp, d), p + "ff_out.weight": (d, mlp),
        })
    if cfg.quantization == "int8":
        shapes.update({n + SCALE_SUFFIX: (shapes[n][0],) for n in quantized_names(cfg)})
    return shapes


def quantized_names(cfg: LLaDAConfig) -> list[str]:
    """The tensors an int8 checkpoint stores as int8: every 2-D weight but the embedding."""
    names = [] if cfg.weight_tying else ["model.transformer.ff_out.weight"]
    for i in range(cfg.n_layers):
        p = f"model.transformer.blocks.{i}."
        names += [p + n for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "attn_out.weight",
                                  "ff_proj.weight", "up_proj.weight", "ff_out.weight")]
    return names


def read_header(path: Path) -> dict:
    """The safetensors JSON header of one file, every entry checked (dtype, shape, data_offsets against the dtype,
    the file's size and each other) so that nothing later indexes a malformed one."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes; a safetensors file starts with an 8-byte "
                                      "header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > _MAX_HEADER:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header length {n} but the file "
                                      f"has {size} bytes); re-download it")
            text = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    header = parse_json(text, f"{path}: corrupt safetensors header", CheckpointError, allow_nan=False)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not (info is None or isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings, "
                                      f"got {short_repr(info)}; re-download the file")
            continue
        problem = _entry_problem(info)
        if problem:
            raise CheckpointError(f"{path}: corrupt safetensors header entry {short_repr(name)}: {problem}; "
                                  "re-download the file")
        start, end = info["data_offsets"]
        if end > data_bytes:
            raise CheckpointError(f"{path}: truncated: tensor {short_repr(name)} ends at byte {end} of the data "
                                  f"section but the file holds only {data_bytes} data bytes; re-download the file")
        spans.append((start, end, name))
    # as the safetensors library requires: the tensors tile the data section, without overlaps or gaps
    spans.sort()
    covered, last = 0, None
    for start, end, name in spans:
        if start < covered:
            raise CheckpointError(f"{path}: corrupt safetensors header: the bytes of {short_repr(last)} and "
                                  f"{short_repr(name)} overlap (one ends at {covered}, the other starts at {start}); "
                                  "re-download the file")
        if start > covered:
            raise CheckpointError(f"{path}: corrupt safetensors header: data bytes [{covered}, {start}) belong to no "
                                  "tensor; re-download the file")
        covered, last = end, name
    if covered != data_bytes:
        raise CheckpointError(f"{path}: corrupt safetensors header: the last {data_bytes - covered} data bytes belong "
                              "to no tensor; re-download the file")
    return header


def _entry_problem(info) -> str | None:
    """What is wrong with one header entry {"dtype", "shape", "data_offsets"}, or None."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        return f"expected an object with dtype, shape and data_offsets, got {short_repr(info)}"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_BITS:
        return f"unknown dtype {short_repr(dtype)} (safetensors dtypes: {', '.join(_ST_BITS)})"

    def naturals(v, n=None) -> bool:
        return isinstance(v, list) and (n is None or len(v) == n) and \
            all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)

    if not naturals(shape):
        return f"shape must be a list of non-negative integers, got {short_repr(shape)}"
    if not naturals(offsets, 2):
        return f"data_offsets must be two non-negative integers [start, end], got {short_repr(offsets)}"
    start, end = offsets
    if start > end:
        return f"data_offsets {short_repr(offsets)} start after they end"
    numel = 1
    for s in shape:   # in 64 bits, as the safetensors library computes it
        numel *= s
        if numel >= 2**64:
            return f"shape {short_repr(shape)} is too large (2**64 elements or more)"
    bits = numel * _ST_BITS[dtype]
    if bits >= 2**64:
        return f"shape {short_repr(shape)} {dtype} is too large (2**64 bits or more)"
    if bits != 8 * (end - start):
        return f"shape {short_repr(shape)} {dtype} needs {short_repr(-(-bits // 8))} bytes but spans {end - start}"
    return None


def _shard_name_problem(fname) -> str | None:
    """Why a weight_map value is not a shard file name inside the checkpoint directory, or None."""
    if not isinstance(fname, str):
        return f"must be a shard file name (a string), got {type(fname).__name__}"
    if fname in ("", ".", "..") or "/" in fname or "\\" in fname or "\0" in fname or os.path.isabs(fname):
        return ("must be a plain file name inside the checkpoint directory (no path separators, '..' or absolute "
                "paths)")
    return None


def checkpoint_files(ckpt_dir: str | Path) -> dict[str, Path]:
    """HF tensor name -> the file that holds it, from model.safetensors or model.safetensors.index.json."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        d = read_json(index, CheckpointError)
        if not isinstance(d, dict) or "weight_map" not in d:
            got = "an object without one" if isinstance(d, dict) else type(d).__name__
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object mapping "
                                  f"tensor names to shard files; got {got})")
        weight_map = d["weight_map"]
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object mapping tensor names to shard files, got "
                                  f"{short_repr(weight_map)}")
        files = {}
        for name, fname in weight_map.items():
            problem = _shard_name_problem(fname)
            if problem:
                raise CheckpointError(f"{index}: weight_map[{short_repr(name)}] = {short_repr(fname)}: {problem}")
            p = ckpt_dir / fname
            if not p.is_file():
                raise CheckpointError(f"{index}: shard {fname!r} (holding {name!r}) is missing from {ckpt_dir}")
            files[name] = p
        return files
    single = ckpt_dir / SINGLE_FILE
    if single.is_file():
        return {name: single for name in read_header(single) if name != "__metadata__"}
    raise CheckpointError(f"{ckpt_dir}: no {SINGLE_FILE} or {INDEX_FILE}; point llada_rt at a LLaDA checkpoint "
                          "directory in the Hugging Face layout")


def _fmt(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def validate(cfg: LLaDAConfig, ckpt_dir: str | Path) -> dict[str, Path]:
    """Checks every tensor by name and shape before anything is loaded; reports all problems by name at once."""
    files = checkpoint_files(ckpt_dir)
    headers = {p: read_header(p) for p in set(files.values())}
    expected = expected_shapes(cfg)
    problems = []
    missing = [n for n in expected if n not in files]
    unexpected = [n for n in files if n not in expected]
    if missing:
        problems.append(f"missing tensors: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_fmt(unexpected)}")
    wrong = []
    int8 = set(quantized_names(cfg)) if cfg.quantization == "int8" else set()
    for name, shape in expected.items():
        if name in files:
            info = headers[files[name]].get(name)
            if info is None:
                problems.append(f"{name} is listed in the index but absent from {files[name].name}")
                continue
            if tuple(info["shape"]) != shape:
                wrong.append(f"{name} has shape {tuple(info['shape'])}, expected {shape}")
            allowed = _ST_INT8 if name in int8 else {"F32": torch.float32} if name.endswith(SCALE_SUFFIX) else _ST_DTYPES
            if info["dtype"] not in allowed:
                wrong.append(f"{name} has dtype {info['dtype']}, expected {' or '.join(sorted(allowed))}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:8]) + (f" and {len(wrong) - 8} more" if len(wrong) > 8
                                                                    else ""))
    if problems:
        raise CheckpointError(f"{ckpt_dir}: checkpoint does not match config.json "
                              f"(d_model={cfg.d_model}, n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, "
                              f"n_kv_heads={cfg.n_kv_heads}, mlp_hidden_size={cfg.mlp_hidden_size}, "
                              f"embedding_size={cfg.embedding_size}): " + " | ".join(problems))
    return files


def load_weights(ckpt_dir: str | Path, cfg: LLaDAConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, quantize: str | None = None, path: str | None = None,
                 check_finite: bool = True) -> ModelWeights:
    """Loads and fuses the weights one tensor at a time onto `device`: embedding and norms in `dtype`, each linear as a
    Linear (no second full copy in RAM): float weights in `dtype` on `path` (None: the one choose_path measures
    fastest for the shape), or int8 when the checkpoint is int8 or quantize="int8" (quantized here from the
    checkpoint's own precision).

    check_finite: every float tensor, as it will be used (cast to `dtype`, or as stored when it is quantized here or
    is an int8 checkpoint's scale), is checked for NaN/inf on the device (one reduction per tensor; all offenders
    reported at once by name and file). False skips it, for trusted checkpoints."""
    from safetensors import safe_open

    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be None or one of {QUANTIZE_MODES}, got {quantize!r}")
    device = torch.device(device)
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        from .ops import ATTENTION_HEAD_DIMS

        if cfg.head_dim not in ATTENTION_HEAD_DIMS:
            raise ConfigError(f"{Path(ckpt_dir) / 'config.json'}: head dimension d_model/n_heads = {cfg.head_dim}; "
                              f"the CUDA attention kernel runs head dimensions {ATTENTION_HEAD_DIMS} in float16/"
                              "bfloat16; load this checkpoint in float32 (attention through torch SDPA) or on the CPU "
                              "(any even head dimension)")
    files = validate(cfg, ckpt_dir)
    handles = {}
    non_finite = []

    def raw(name: str) -> torch.Tensor:
        file = files[name]
        if file not in handles:
            try:
                handles[file] = safe_open(str(file), framework="pt", device=str(device))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{file}: cannot be opened as safetensors ({e})") from None
        try:
            return handles[file].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({e}); the file may be corrupt") from None

    def checked(name: str, stored: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if check_finite and t.is_floating_point() and not _all_finite(t):
            non_finite.append(_non_finite_report(files[name], name, stored, t))
        return t

    def get(name: str) -> torch.Tensor:
        stored = raw(name)
        return checked(name, stored, stored.to(dtype=dtype))

    def as_stored(name: str) -> torch.Tensor:
        stored = raw(name)
        return checked(name, stored, stored)

    def linear(*names: str) -> Linear:
        """The Linear of the named (N_i, K) weights stacked along N."""
        if cfg.quantization == "int8":
            q = torch.cat([raw(n) for n in names], 0)
            scale = torch.cat([as_stored(n + SCALE_SUFFIX) for n in names], 0)
            return Linear.from_int8(q, scale)
        if quantize is not None:
            w = torch.cat([as_stored(n) for n in names], 0)
            return Linear.from_dense(w, quantize=quantize)
        parts = [get(n) for n in names]
        w = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        del parts
        return Linear.from_dense(w, path=path)

    layers = []
    for i in range(cfg.n_layers):
        p = f"model.transformer.blocks.{i}."
        layers.append(LayerWeights(
            attn_norm=get(p + "attn_norm.weight"),
            wqkv=linear(p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"),
            wo=linear(p + "attn_out.weight"), ff_norm=get(p + "ff_norm.weight"),
            w_gate_up=linear(p + "ff_proj.weight", p + "up_proj.weight"), w_down=linear(p + "ff_out.weight"),
        ))
    embed = get("model.transformer.wte.weight")
    ln_f = get("model.transformer.ln_f.weight")
    if cfg.weight_tying:
        lm_head = tied_lm_head(embed, quantize or cfg.quantization)
    else:
        lm_head = linear("model.transformer.ff_out.weight")
    if non_finite:
        raise CheckpointError(f"{ckpt_dir}: weights with NaN or inf values, which make every answer garbage: "
                              + "; ".join(non_finite[:8]) + (f" and {len(non_finite) - 8} more tensors"
                                                             if len(non_finite) > 8 else "")
                              + "; re-download or re-convert the checkpoint, or pass check_finite=False to load it "
                              "anyway")
    return ModelWeights(embed=embed, layers=layers, ln_f=ln_f, lm_head=lm_head)


def _all_finite(t: torch.Tensor) -> bool:
    # aminmax: one read pass in the tensor's own dtype, no tensor-sized temporary, NaN propagates to both ends (on CPU
    # it is about 25x faster than isfinite(t).all(), and a float32 sum of bf16 needs a converted copy).
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _non_finite_report(path: Path, name: str, stored: torch.Tensor, t: torch.Tensor) -> str:
    """'<file>: <tensor> has N NaN, M inf (of K)', and whether the stored values were finite before the cast."""
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    msg = f"{path.name}: {name} has {nan} NaN and {inf} inf of {t.numel()} values"
    if t.dtype != stored.dtype and bool(torch.isfinite(stored).all()):
        msg += (f" (finite as stored in {str(stored.dtype).removeprefix('torch.')}: they overflow "
                f"{str(t.dtype).removeprefix('torch.')}; load in bfloat16 or float32)")
    return msg


def tied_lm_head(embed: torch.Tensor, quantize: str | None) -> Linear:
    """The LM head of a tied model: the embedding tensor itself on the plain layout (no copy), or its int8 copy."""
    if quantize is not None:
        return Linear.from_dense(embed, quantize=quantize)
    lin = Linear.from_dense(embed, path="torch_nk")
    lin.reason = "tied to the embedding: its own tensor, no second copy"
    return lin


def to_hf_state_dict(cfg: LLaDAConfig, w: ModelWeights) -> dict[str, torch.Tensor]:
    """ModelWeights -> {HF name: tensor} (q/k/v and gate/up split back), contiguous, detached; int8 linears as int8
    weights plus their "_scale" tensors (the int8 checkpoint layout), dense ones as their dense weight."""
    dq, dkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    sd = {"model.transformer.wte.weight": w.embed, "model.transformer.ln_f.weight": w.ln_f}

    def put(lin: Linear, names: list[str], sizes: list[int]) -> None:
        if lin.quantized:
            q, scale = lin.int8()
            sd.update(zip(names, torch.split(q, sizes, 0)))
            sd.update(zip([n + SCALE_SUFFIX for n in names], torch.split(scale, sizes, 0)))
        else:
            sd.update(zip(names, torch.split(lin.dense(), sizes, 0)))

    if not cfg.weight_tying:
        put(w.lm_head, ["model.transformer.ff_out.weight"], [w.lm_head.N])
    for i, l in enumerate(w.layers):
        p = f"model.transformer.blocks.{i}."
        sd.update({p + "attn_norm.weight": l.attn_norm, p + "ff_norm.weight": l.ff_norm})
        put(l.wqkv, [p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"], [dq, dkv, dkv])
        put(l.wo, [p + "attn_out.weight"], [l.wo.N])
        put(l.w_gate_up, [p + "ff_proj.weight", p + "up_proj.weight"], [cfg.mlp_hidden_size] * 2)
        put(l.w_down, [p + "ff_out.weight"], [l.w_down.N])
    return {k: t.detach().contiguous() for k, t in sd.items()}


def from_hf_state_dict(cfg: LLaDAConfig, sd: dict[str, torch.Tensor]) -> ModelWeights:
    """{HF name: tensor} -> ModelWeights (fuses q/k/v and gate/up) with dense Linears on the plain layout, or int8 ones
    where the state dict holds "_scale" tensors."""
    def linear(*names: str) -> Linear:
        if names[0] + SCALE_SUFFIX in sd:
            return Linear.from_int8(torch.cat([sd[n] for n in names], 0),
                                    torch.cat([sd[n + SCALE_SUFFIX] for n in names], 0))
        return Linear.from_dense(torch.cat([sd[n] for n in names], 0), path="torch_nk")

    layers = []
    for i in range(cfg.n_layers):
        p = f"model.transformer.blocks.{i}."
        layers.append(LayerWeights(
            attn_norm=sd[p + "attn_norm.weight"],
            wqkv=linear(p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"),
            wo=linear(p + "attn_out.weight"), ff_norm=sd[p + "ff_norm.weight"],
            w_gate_up=linear(p + "ff_proj.weight", p + "up_proj.weight"), w_down=linear(p + "ff_out.weight")))
    embed = sd["model.transformer.wte.weight"]
    lm_head = tied_lm_head(embed, cfg.quantization) if cfg.weight_tying else linear("model.transformer.ff_out.weight")
    return ModelWeights(embed=embed, layers=layers, ln_f=sd["model.transformer.ln_f.weight"], lm_head=lm_head)


def init_weights(cfg: LLaDAConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", std: float = 0.02) -> ModelWeights:
    """Random weights (normal(0, std) matrices, norms near 1), for tests, benchmarks and training from scratch."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=std):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    def norm_w(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(device=device, dtype=dtype)

    def dense(*shape):   # the plain layout: Linear.dense() is the tensor itself (trainable, editable in place)
        return Linear.from_dense(randn(*shape), path="torch_nk")

    d, dh, mlp, v = cfg.d_model, cfg.head_dim, cfg.mlp_hidden_size, cfg.embedding_size
    layers = [LayerWeights(attn_norm=norm_w(d), wqkv=dense((cfg.n_heads + 2 * cfg.n_kv_heads) * dh, d),
                           wo=dense(d, cfg.n_heads * dh), ff_norm=norm_w(d), w_gate_up=dense(2 * mlp, d),
                           w_down=dense(d, mlp)) for _ in range(cfg.n_layers)]
    embed = randn(v, d, scale=1.0)
    return ModelWeights(embed=embed, layers=layers, ln_f=norm_w(d),
                        lm_head=tied_lm_head(embed, None) if cfg.weight_tying else dense(v, d))


def save_checkpoint(ckpt_dir: str | Path, cfg: LLaDAConfig, w: ModelWeights, shards: int = 1,
                    dtype: torch.dtype | None = None) -> None:
    """Writes config.json and model.safetensors (shards == 1) or model-0000i-of-0000n + index (HF layout); int8 weights
    as the int8 checkpoint layout (dtype converts only the float tensors other than the scales)."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, quantization="int8" if w.quantized else None)
    (ckpt_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    sd = {k: (t.to(dtype) if dtype and t.is_floating_point() and not k.endswith(SCALE_SUFFIX) else t).cpu().contiguous()
          for k, t in to_hf_state_dict(cfg, w).items()}
    if shards <= 1:
        save_file(sd, str(ckpt_dir / SINGLE_FILE), metadata={"format": "pt"})
        return
    names = list(sd)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, str(ckpt_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (ckpt_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2) + "\n")


def quantize_checkpoint(src: str | Path, dst: str | Path) -> dict:
    """Writes the int8 checkpoint (the layout of this module's docstring) of the float checkpoint `src` into the new
    directory `dst`, one source file at a time (a sharded source gives the same shards); the other files of src
    (tokenizer, generation config) are copied. Returns {"quantized": names, "bytes_in": .., "bytes_out": ..}."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from .config import load_config
    from .linear import quantize_int8

    src, dst = Path(src), Path(dst)
    cfg = load_config(src)
    if cfg.quantization is not None:
        raise CheckpointError(f"{src}: already quantized ({cfg.quantization}); quantize its float original instead")
    files = validate(cfg, src)
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst}: exists and is not empty; give a new directory for the int8 checkpoint")
    dst.mkdir(parents=True, exist_ok=True)
    qcfg = dataclasses.replace(cfg, quantization="int8")
    int8 = set(quantized_names(qcfg))
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    sharded = (src / INDEX_FILE).is_file()
    weight_map, bytes_in, bytes_out = {}, 0, 0
    for path in sorted(by_file):
        out = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in by_file[path]:
                t = f.get_tensor(name)
                bytes_in += t.numel() * t.element_size()
                if name in int8:
                    out[name], out[name + SCALE_SUFFIX] = quantize_int8(t)
                else:
                    out[name] = t.contiguous()
        fname = path.name if sharded else SINGLE_FILE
        save_file(out, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in out})
        bytes_out += sum(t.numel() * t.element_size() for t in out.values())
        del out
    if sharded:
        (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": bytes_out}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps(qcfg.to_dict(), indent=2) + "\n")
    weights = {p.name for p in by_file} | {INDEX_FILE, "config.json"}
    for p in src.iterdir():
        if p.is_file() and p.name not in weights:
            shutil.copy2(p, dst / p.name)
    return {"quantized": sorted(int8), "bytes_in": bytes_in, "bytes_out": bytes_out}
