"""Safetensors checkpoints (single file or sharded index) straight to device tensors; the only HF-name table."""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import torch

from .config import LLaDAConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupt, or its tensors do not match config.json."""


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
    """The safetensors JSON header of one file, checked against the file's size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes; a safetensors file starts with an 8-byte "
                                      "header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header length {n} but the file "
                                      f"has {size} bytes); re-download it")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-download the file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            shape, dtype = info["shape"], info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if end > data_bytes:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section but the "
                                  f"file holds only {data_bytes} data bytes; re-download the file")
        itemsize = torch.finfo(_ST_DTYPES[dtype]).bits // 8 if dtype in _ST_DTYPES else None
        numel = 1
        for s in shape:
            numel *= s
        if itemsize is not None and end - start != numel * itemsize:
            raise CheckpointError(f"{path}: corrupt safetensors header: {name!r} has shape {shape} {dtype} but spans "
                                  f"{end - start} bytes")
    return header


def checkpoint_files(ckpt_dir: str | Path) -> dict[str, Path]:
    """HF tensor name -> the file that holds it, from model.safetensors or model.safetensors.index.json."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}") from None
        files = {}
        for name, fname in weight_map.items():
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
                 dtype: torch.dtype = torch.float32) -> ModelWeights:
    """Loads and fuses the weights one tensor at a time onto `device` in `dtype` (no second full copy in RAM)."""
    from safetensors import safe_open

    files = validate(cfg, ckpt_dir)
    device = torch.device(device)
    handles = {}

    def get(name: str) -> torch.Tensor:
        path = files[name]
        if path not in handles:
            try:
                handles[path] = safe_open(str(path), framework="pt", device=str(device))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot be opened as safetensors ({e})") from None
        try:
            t = handles[path].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({e}); the file may be corrupt") from None
        return t.to(dtype=dtype)

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
    return ModelWeights(embed=embed, layers=layers, ln_f=get("model.transformer.ln_f.weight"), lm_head=lm_head)


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
