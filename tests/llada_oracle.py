"""Independent oracles for the tests, written from LLADA.md and the public ML-GSAI/LLaDA code in our own words:
a plain fp32 forward of modeling_llada's math over HF-named tensors, and the official generate.py denoising loop."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


class PlainLLaDA:
    """modeling_llada's math, unfused, straight from the HF tensors, fp64 by default (absolute positions 0..L-1)."""

    def __init__(self, ckpt: Path, dtype=torch.float64):
        ckpt = Path(ckpt)
        self.c = json.loads((ckpt / "config.json").read_text())
        files = [ckpt / "model.safetensors"] if (ckpt / "model.safetensors").exists() else sorted(
            ckpt.glob("model-*.safetensors"))
        self.t = {}
        for f in files:
            self.t.update({k: v.to(dtype) for k, v in load_file(str(f)).items()})
        self.dtype = dtype

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        c, t = self.c, self.t
        B, L = ids.shape
        H, Hkv = c["n_heads"], c["n_kv_heads"]
        hd = c["d_model"] // H
        eps = c["rms_norm_eps"]

        def norm(x, w):
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

        if positions is None:
            positions = torch.arange(L)[None].expand(B, L)
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = positions.to(torch.float64)[..., None] * inv                 # (B, L, hd/2)
        cos = torch.cat([ang.cos()] * 2, -1)[:, None].to(self.dtype)       # (B, 1, L, hd)
        sin = torch.cat([ang.sin()] * 2, -1)[:, None].to(self.dtype)

        def rope(x):                                                       # (B, H, L, hd)
            half = hd // 2
            rot = torch.cat([-x[..., half:], x[..., :half]], -1)
            return x * cos + rot * sin

        bias = torch.zeros(B, 1, 1, L, dtype=self.dtype)
        if attention_mask is not None:
            bias = bias.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        x = t["model.transformer.wte.weight"][ids]
        for i in range(c["n_layers"]):
            p = f"model.transformer.blocks.{i}."
            h = norm(x, t[p + "attn_norm.weight"])
            q = (h @ t[p + "q_proj.weight"].T).view(B, L, H, hd).transpose(1, 2)
            k = (h @ t[p + "k_proj.weight"].T).view(B, L, Hkv, hd).transpose(1, 2)
            v = (h @ t[p + "v_proj.weight"].T).view(B, L, Hkv, hd).transpose(1, 2)
            q, k = rope(q), rope(k)
            k = k.repeat_interleave(H // Hkv, 1)
            v = v.repeat_interleave(H // Hkv, 1)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, -1)
            x = x + (att @ v).transpose(1, 2).reshape(B, L, H * hd) @ t[p + "attn_out.weight"].T
            h = norm(x, t[p + "ff_norm.weight"])
            gate = h @ t[p + "ff_proj.weight"].T
            x = x + (gate * torch.sigmoid(gate) * (h @ t[p + "up_proj.weight"].T)) @ t[p + "ff_out.weight"].T
        x = norm(x, t["model.transformer.ln_f.weight"])
        head = t.get("model.transformer.ff_out.weight", t["model.transformer.wte.weight"])
        return x @ head.T


def official_generate(model, prompt: torch.Tensor, attention_mask=None, steps=128, gen_length=128, block_length=128,
                      temperature=0.0, cfg_scale=0.0, remasking="low_confidence", mask_id=126336, eos_id=126081,
                      eot_id=126348, logits_eos_inf=False, confidence_eos_eot_inf=False, uniform=None):
    """The loop of ML-GSAI/LLaDA generate.py. Two deliberate differences: top-k breaks exact ties toward the lower
    position (torch.topk leaves it unspecified), and the random draws (Gumbel noise, random confidences) come from
    `uniform(step, kind, block_start, block_end, shape)` so that they can be matched; CFG does not need an attention
    mask; with confidence_eos_eot_inf both EOS and EOT leave the softmax at every temperature (the official code drops
    only EOT when temperature > 0, quirk Q2 of LLADA.md)."""
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype)], 1)
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    n_blocks = gen_length // block_length
    assert steps % n_blocks == 0
    spb = steps // n_blocks
    nfe = 0
    for blk in range(n_blocks):
        bs, be = P + blk * block_length, P + (blk + 1) * block_length
        m = (x[:, bs:be] == mask_id).sum(1, keepdim=True)
        ntt = (m // spb).repeat(1, spb)
        ntt[torch.arange(spb)[None, :] < (m % spb)] += 1
        for i in range(spb):
            mask_index = x == mask_id
            nfe += 1
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                both = model(torch.cat([x, un_x]), am)
                cond, unc = both.chunk(2)
                logits = unc + (cfg_scale + 1) * (cond - unc)
            else:
                logits = model(x, attention_mask)
            if logits_eos_inf:
                logits[:, :, eos_id] = float("-inf")
            if temperature > 0:
                u = uniform(nfe, "gumbel", bs, be, logits.shape).to(torch.float64)
                noisy = logits.to(torch.float64).exp() / (-u.log()) ** temperature
                noisy = torch.where(logits == float("-inf"), torch.zeros_like(noisy), noisy)
            else:
                noisy = logits
            x0 = noisy.argmax(-1)
            if confidence_eos_eot_inf:
                logits = logits.clone()
                logits[:, :, eot_id] = float("-inf")
                logits[:, :, eos_id] = float("-inf")
            if remasking == "low_confidence":
                x0_p = torch.gather(torch.softmax(logits.to(torch.float64), -1), -1, x0[..., None])[..., 0]
            else:
                x0_p = uniform(nfe, "confidence", bs, be, x0.shape).to(torch.float64)
            x0_p[:, be:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=x0_p.dtype))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(B):
                k = int(ntt[j, i])
                order = torch.sort(confidence[j], descending=True, stable=True).indices
                transfer[j, order[:k]] = True
            x[transfer] = x0[transfer]
    return x, nfe
