"""Safetensors checkpoints (single file or sharded index) straight to device tensors; the only HF-name table."""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import torch

from .config import ConfigError, LLaDAConfig, parse_json, read_json, short_repr

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# Bits per element of every safetensors dtype (the format's list), to check each header entry's byte span.
_ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
            "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
            "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}
_MAX_HEADER = 100 * 2**20   # safetensors' own limit on the JSON header


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupt (a malformed index or safetensors header entry), its tensors
    do not match config.json, or they hold NaN/inf."""


@dataclasses.dataclass
class LayerWeights:
    attn_norm: torch.Tensor   # (d,)
    wqkv: torch.Tensor        # ((Hq + 2 Hkv) D, d): q_proj, k_proj, v_proj stacked
    wo: torch.Tensor          # (d, Hq D)
    ff_norm: torch.Tensor     # (d,)
    w_gate_up: torch.Tensor   # (2 mlp, d): ff_proj (gate) then up_proj
    w_down: torch.Tensor      # (d, mlp)


@dataclasses.dataclass
class ModelWeights:
    embed: torch.Tensor       # (V, d)
    layers: list[LayerWeights]
    ln_f: torch.Tensor        # (d,)
    lm_head: torch.Tensor     # (V, d); the embedding itself when weight_tying

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def tensors(self) -> list[torch.Tensor]:
        """Every weight tensor (the tensors themselves: dataclasses.astuple would deep-copy them)."""
        return [self.embed, self.ln_f, self.lm_head] + [getattr(l, f.name) for l in self.layers
                                                        for f in dataclasses.fields(l)]

    def num_parameters(self) -> int:
        seen, n = set(), 0
        for t in self.tensors():
            if id(t) not in seen:
                seen.add(id(t))
                n += t.numel()
        return n


def expected_shapes(cfg: LLaDAConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor a LLaDA checkpoint must hold (LLADA.md 1.4)."""
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
    return shapes


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
    for name, shape in expected.items():
        if name in files:
            info = headers[files[name]].get(name)
            if info is None:
                problems.append(f"{name} is listed in the index but absent from {files[name].name}")
                continue
            if tuple(info["shape"]) != shape:
                wrong.append(f"{name} has shape {tuple(info['shape'])}, expected {shape}")
            if info["dtype"] not in _ST_DTYPES:
                wrong.append(f"{name} has dtype {info['dtype']}, expected one of {sorted(_ST_DTYPES)}")
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
                 dtype: torch.dtype = torch.float32, check_finite: bool = True) -> ModelWeights:
    """Loads and fuses the weights one tensor at a time onto `device` in `dtype` (no second full copy in RAM).

    check_finite: every tensor, as cast to `dtype` on `device`, is checked for NaN/inf (one reduction per tensor on
    the device; all offenders reported at once by name and file). False skips it, for trusted checkpoints."""
    from safetensors import safe_open

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

    def get(name: str) -> torch.Tensor:
        path = files[name]
        if path not in handles:
            try:
                handles[path] = safe_open(str(path), framework="pt", device=str(device))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot be opened as safetensors ({e})") from None
        try:
            stored = handles[path].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({e}); the file may be corrupt") from None
        t = stored.to(dtype=dtype)
        if check_finite and not _all_finite(t):
            non_finite.append(_non_finite_report(path, name, stored, t))
        return t

    def fused(*names: str) -> torch.Tensor:
        parts = [get(n) for n in names]
        out = torch.cat(parts, 0)
        del parts
        return out

    layers = []
    for i in range(cfg.n_layers):
        p = f"model.transformer.blocks.{i}."
        layers.append(LayerWeights(
            attn_norm=get(p + "attn_norm.weight"),
            wqkv=fused(p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"),
            wo=get(p + "attn_out.weight"), ff_norm=get(p + "ff_norm.weight"),
            w_gate_up=fused(p + "ff_proj.weight", p + "up_proj.weight"), w_down=get(p + "ff_out.weight"),
        ))
    embed = get("model.transformer.wte.weight")
    lm_head = embed if cfg.weight_tying else get("model.transformer.ff_out.weight")
    ln_f = get("model.transformer.ln_f.weight")
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


def to_hf_state_dict(cfg: LLaDAConfig, w: ModelWeights) -> dict[str, torch.Tensor]:
    """ModelWeights -> {HF name: tensor} (q/k/v and gate/up split back), contiguous, detached."""
    dq, dkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    sd = {"model.transformer.wte.weight": w.embed, "model.transformer.ln_f.weight": w.ln_f}
    if not cfg.weight_tying:
        sd["model.transformer.ff_out.weight"] = w.lm_head
    for i, l in enumerate(w.layers):
        p = f"model.transformer.blocks.{i}."
        q, k, v = torch.split(l.wqkv, [dq, dkv, dkv], 0)
        gate, up = torch.split(l.w_gate_up, [cfg.mlp_hidden_size] * 2, 0)
        sd.update({p + "attn_norm.weight": l.attn_norm, p + "q_proj.weight": q, p + "k_proj.weight": k,
                   p + "v_proj.weight": v, p + "attn_out.weight": l.wo, p + "ff_norm.weight": l.ff_norm,
                   p + "ff_proj.weight": gate, p + "up_proj.weight": up, p + "ff_out.weight": l.w_down})
    return {k: t.detach().contiguous() for k, t in sd.items()}


def from_hf_state_dict(cfg: LLaDAConfig, sd: dict[str, torch.Tensor]) -> ModelWeights:
    """{HF name: tensor} -> ModelWeights (fuses q/k/v and gate/up)."""
    layers = []
    for i in range(cfg.n_layers):
        p = f"model.transformer.blocks.{i}."
        layers.append(LayerWeights(
            attn_norm=sd[p + "attn_norm.weight"],
            wqkv=torch.cat([sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]], 0),
            wo=sd[p + "attn_out.weight"], ff_norm=sd[p + "ff_norm.weight"],
            w_gate_up=torch.cat([sd[p + "ff_proj.weight"], sd[p + "up_proj.weight"]], 0),
            w_down=sd[p + "ff_out.weight"]))
    embed = sd["model.transformer.wte.weight"]
    return ModelWeights(embed=embed, layers=layers, ln_f=sd["model.transformer.ln_f.weight"],
                        lm_head=embed if cfg.weight_tying else sd["model.transformer.ff_out.weight"])


def init_weights(cfg: LLaDAConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", std: float = 0.02) -> ModelWeights:
    """Random weights (normal(0, std) matrices, norms near 1), for tests, benchmarks and training from scratch."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=std):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    def norm_w(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(device=device, dtype=dtype)

    d, dh, mlp, v = cfg.d_model, cfg.head_dim, cfg.mlp_hidden_size, cfg.embedding_size
    layers = [LayerWeights(attn_norm=norm_w(d), wqkv=randn((cfg.n_heads + 2 * cfg.n_kv_heads) * dh, d),
                           wo=randn(d, cfg.n_heads * dh), ff_norm=norm_w(d), w_gate_up=randn(2 * mlp, d),
                           w_down=randn(d, mlp)) for _ in range(cfg.n_layers)]
    embed = randn(v, d, scale=1.0)
    return ModelWeights(embed=embed, layers=layers, ln_f=norm_w(d),
                        lm_head=embed if cfg.weight_tying else randn(v, d))


def save_checkpoint(ckpt_dir: str | Path, cfg: LLaDAConfig, w: ModelWeights, shards: int = 1,
                    dtype: torch.dtype | None = None) -> None:
    """Writes config.json and model.safetensors (shards == 1) or model-0000i-of-0000n + index (HF layout)."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    sd = {k: (t.to(dtype) if dtype else t).cpu().contiguous() for k, t in to_hf_state_dict(cfg, w).items()}
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
