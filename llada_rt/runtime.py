"""Runtime: load a LLaDA checkpoint once, then generate text or token ids with the exact or a fast sampler."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .config import load_config
from .decoding import Canvas, Decoder, GenerationConfig, GenerationConfigError, StepEvent
from .tokenizer import Tokenizer
from .weights import load_weights

SHIPPED_MODEL = Path(__file__).resolve().parent / "models" / "small"
MASK_GLYPH = "\u2591"   # how a still-masked position is shown in streamed text


@dataclasses.dataclass
class GenerationResult:
    texts: list[str]               # per prompt: the answer decoded up to the first EOS/EOT
    token_ids: list[list[int]]     # per prompt: the answer ids up to the first EOS/EOT
    canvas: torch.Tensor           # (B, T) the final canvas, left padding included
    prompt_len: int                # P, first generated column of the canvas
    nfe: int                       # forward passes
    refreshes: int                 # of which full forwards over the whole canvas (all of them in exact mode)
    steps: int                     # denoising steps
    tokens_committed: int          # generated positions committed, summed over the batch
    timings: dict                  # seconds: total_s, refresh_s (full forwards), step_s (cached forwards), other_s
    config: GenerationConfig
    finished_at: dict = dataclasses.field(default_factory=dict)   # row -> NFE at which early stop ended it

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def tokens_per_forward(self) -> float:
        """Positions committed per forward pass, per row."""
        return self.tokens_committed / max(self.nfe, 1) / max(len(self.texts), 1)

    @property
    def answer_tokens(self) -> int:
        """Answer tokens up to the first EOS/EOT, summed over the batch (Fast-dLLM's throughput numerator)."""
        return sum(len(t) for t in self.token_ids)


class StreamEvent:
    """One denoising step as Runtime.stream yields it; text is rendered (and the device synced) only on access."""

    def __init__(self, ev: StepEvent, tokenizer: Tokenizer):
        self.step, self.nfe, self.block, self.refresh = ev.step, ev.nfe, ev.block, ev.refresh
        self.rows, self.finished = ev.rows, ev.finished
        self._ev, self._tok = ev, tokenizer
        self.result: GenerationResult | None = None   # set on the last event

    @property
    def positions(self) -> list[list[int]]:
        """Per row of `rows`: answer positions committed by this step."""
        return self._ev.committed_positions

    @property
    def tokens(self) -> list[list[int]]:
        """Per row of `rows`: the token ids committed at `positions`."""
        return self._ev.committed_tokens

    @property
    def canvas_text(self) -> list[str]:
        """Per row of `rows`: the answer so far, each mask shown as MASK_GLYPH, cut after the first EOS/EOT."""
        out = []
        stops = set(self._tok.stop_ids)
        for ids in self._ev.canvas_ids():
            parts, run = [], []
            for t in ids:
                if t in stops:
                    break
                if t == self._ev.mask_id:
                    if run:
                        parts.append(self._tok.decode(run))
                        run = []
                    parts.append(MASK_GLYPH)
                else:
                    run.append(t)
            if run:
                parts.append(self._tok.decode(run))
            out.append("".join(parts))
        return out


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Runtime:
    """A loaded LLaDA checkpoint. `Runtime()` loads the small model shipped inside the package."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, quantize: str | None = None):
        self.path = Path(path) if path is not None else SHIPPED_MODEL
        if not self.path.is_dir():
            where = "the shipped model" if path is None else "the checkpoint directory"
            raise FileNotFoundError(f"{self.path}: {where} does not exist; pass the path of a LLaDA checkpoint "
                                    "directory (config.json, model.safetensors[.index.json], tokenizer.json)")
        self.device = _default_device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
        if isinstance(dtype, str):
            dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}.get(dtype, dtype)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self.dtype = dtype
        self.config = load_config(self.path)
        self.tokenizer = Tokenizer(self.path, mask_id=self.config.mask_token_id, eos_id=self.config.eos_token_id)
        # quantize "int8": every linear (LM head included) int8 with per-output-channel scales; an int8 checkpoint
        # (`llada-rt quantize`) loads as int8 without it
        self.weights = load_weights(self.path, self.config, self.device, dtype, quantize=quantize)

    def __repr__(self) -> str:
        c = self.config
        return (f"Runtime({str(self.path)!r}, device={self.device}, dtype={self.dtype}, layers={c.n_layers}, "
                f"d_model={c.d_model}, heads={c.n_heads})")

    # -- inputs --------------------------------------------------------------------------------------------------------
    def encode_prompts(self, prompt, chat: bool | None = None) -> list[list[int]]:
        """A prompt, a list of prompts, token ids or a batch of token ids -> list of id lists."""
        if chat is None:
            chat = self.tokenizer.is_chat
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() not in (1, 2) or prompt.dtype.is_floating_point:
                raise ValueError(f"token ids must be an integer tensor of shape (P,) or (B, P), got {prompt.dtype} "
                                 f"{tuple(prompt.shape)}")
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            batch = [prompt]
        elif isinstance(prompt, Sequence) and len(prompt) > 0 and all(isinstance(t, int) for t in prompt):
            batch = [list(prompt)]
        elif isinstance(prompt, Sequence) and len(prompt) > 0:
            batch = list(prompt)
        else:
            raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of such lists "
                             f"(got {type(prompt).__name__}{' (empty)' if not prompt else ''})")
        out = []
        for p in batch:
            if isinstance(p, str):
                ids = self.tokenizer.encode_chat(p) if chat else self.tokenizer.encode(p)
            elif isinstance(p, Sequence) and all(isinstance(t, int) for t in p):
                ids = list(p)
            else:
                raise ValueError(f"each prompt must be a string or a list of token ids, got {type(p).__name__}")
            if not ids:
                raise ValueError("a prompt encodes to zero tokens; give a non-empty prompt")
            vocab = self.config.embedding_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
            if self.config.mask_token_id in ids:
                raise ValueError(f"the prompt contains the mask token (id {self.config.mask_token_id}); prompts must be "
                                 "fully known text")
            out.append(ids)
        return out

    def make_config(self, options: dict) -> GenerationConfig:
        names = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise GenerationConfigError(f"unknown generation option(s) {', '.join(unknown)}; valid options: "
                                        f"{', '.join(sorted(names))}")
        return GenerationConfig(**options)

    # -- generation ----------------------------------------------------------------------------------------------------
    def decoder(self, prompt, chat: bool | None = None, backend: str = "ops", **options) -> Decoder:
        """A Decoder ready to run over the encoded, left-padded batch."""
        gc = self.make_config(options)
        prompts = self.encode_prompts(prompt, chat)
        gc.validate(max(len(p) for p in prompts), self.config.max_sequence_length)
        canvas = Canvas.build(prompts, gc.gen_length, self.config.mask_token_id, self.config.pad_token_id,
                              self.device)
        return Decoder(self.config, self.weights, gc, canvas, self.tokenizer.stop_ids, self.tokenizer.eot_id,
                       backend=backend)

    def stream(self, prompt, chat: bool | None = None, backend: str = "ops", **options) -> Iterator[StreamEvent]:
        """Yields a StreamEvent after every denoising step; the last one carries the GenerationResult in `.result`.

        Same arguments as generate(). Each event's `canvas_text` shows the answers so far with masks visible.
        """
        with torch.inference_mode():
            t0 = time.perf_counter()
            dec = self.decoder(prompt, chat, backend, **options)
            last = None
            for ev in dec:
                if last is not None:
                    yield StreamEvent(last, self.tokenizer)
                last = ev
            if dec.canvas.tokens.is_cuda:
                torch.cuda.synchronize(dec.canvas.tokens.device)
            final = StreamEvent(last, self.tokenizer)
            final.result = self._result(dec, time.perf_counter() - t0)
            yield final

    def generate(self, prompt, chat: bool | None = None, backend: str = "ops", **options) -> GenerationResult:
        """Generate for a prompt (str), a batch (list of str), token ids (list of int) or a batch of token ids.

        Options are the fields of GenerationConfig: gen_length, block_length, steps, temperature, cfg_scale,
        remasking, logits_eos_inf, confidence_eos_eot_inf, seed, mode ('exact', 'prefix', 'dual'), threshold,
        factor, early_stop, cuda_graph. chat: apply the chat template to string prompts (default: when the
        checkpoint has one, i.e. Instruct models). Built on stream(); the events' text is never rendered here.
        """
        for ev in self.stream(prompt, chat, backend, **options):
            pass
        return ev.result

    def _result(self, dec: Decoder, total_s: float) -> GenerationResult:
        P = dec.canvas.prompt_len
        rows = dec.canvas.tokens[:, P:].tolist()
        ids = [self.tokenizer.cut_at_stop(r) for r in rows]
        committed = int((dec.canvas.tokens[:, P:] != self.config.mask_token_id).sum()) - dec.filled
        phases = dec.timer.seconds()
        timings = {"total_s": total_s, "refresh_s": phases.get("refresh", 0.0), "step_s": phases.get("step", 0.0)}
        timings["other_s"] = total_s - timings["refresh_s"] - timings["step_s"]
        return GenerationResult(
            texts=[self.tokenizer.decode(r) for r in ids], token_ids=ids, canvas=dec.canvas.tokens, prompt_len=P,
            nfe=dec.nfe, refreshes=dec.refreshes, steps=dec.steps_done, tokens_committed=committed, timings=timings, config=dec.gc,
            finished_at=dict(dec.finished_at))
