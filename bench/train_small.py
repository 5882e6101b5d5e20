"""Trains the shipped small LLaDA model from scratch on the task suite with LLaDA's masked-diffusion SFT objective.

    python bench/train_small.py                      # the shipped model: writes llada_rt/models/small/
    python bench/train_small.py --quick --out DIR    # a few steps of a tiny model (the test)

Objective (LLaDA paper, SFT; ML-GSAI GUIDELINES.md): each sequence is the chat-templated prompt followed by a response
of G positions (answer, <|eot_id|>, then <|endoftext|> up to G; the EOS padding is trained as part of the answer).
Per sequence t ~ U(0, 1) (stratified over the batch), p = (1 - eps) t + eps; each response position is replaced by
the mask token with probability p, the prompt never; loss = sum over masked positions of CE / p, divided by the
response length G, averaged over the batch. G is drawn per batch from GEN_LENGTHS so the model also sees the long
all-mask canvases of the runtime's default gen_length=128. Tasks are drawn uniformly unless --task-weights says
otherwise; --tokenizer words trains with the word-level variant of the tokenizer (see build_tokenizer.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import build_tokenizer  # noqa: E402
import tasks  # noqa: E402
from llada_rt.config import LLaDAConfig  # noqa: E402
from llada_rt.model import forward  # noqa: E402
from llada_rt.tokenizer import Tokenizer  # noqa: E402
from llada_rt.linear import Linear  # noqa: E402
from llada_rt.weights import ModelWeights, init_weights, save_checkpoint  # noqa: E402

DEFAULT_OUT = ROOT / "llada_rt" / "models" / "small"
EPS = 1e-3
GEN_LENGTHS = ((16, 0.7), (32, 0.25), (128, 0.05))  # (response length G, probability of a batch using it)
MULTI_TURN_P = 0.05  # share of batches whose prompts carry an earlier user/assistant turn (the chat REPL format)
# The recommended generation settings of the shipped model (written to generation_config.json for the CLI).
GENERATION_DEFAULTS = {"gen_length": 32, "block_length": 32, "steps": 32}


@dataclasses.dataclass
class TrainConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 2  # head_dim 64, a size the CUDA attention kernel takes
    mlp_hidden_size: int = 384
    steps: int = 9000  # 44.6 min on the 2-core development machine
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    init_std: float = 0.02  # normal std of every matrix (residual-branch outputs further / sqrt(2 n_layers))
    rope_theta: float = 10000.0
    embed_std: float = 0.02  # the embedding on the scale of the other matrices (init_weights draws it with std 1)
    seed: int = 1
    threads: int = 2  # float sums depend on the thread count: reproduce a run with the same value
    eval_every: int = 1500  # monitoring only (a minimal greedy sampler on a held-out prefix); 0 turns it off
    eval_per_task: int = 10
    stop_at: int = 0  # stop (and save) after this step, keeping the schedule of `steps`; 0: run all steps
    task_weights: str = ""  # relative share of each task, e.g. "reverse=2,add=3,..."; empty: uniform
    tokenizer: str = "chars"  # "chars" (shipped) or "words" (build_tokenizer.py --words, an experiment)
    gen_lengths: tuple = GEN_LENGTHS


QUICK = dict(d_model=64, n_layers=2, n_heads=1, mlp_hidden_size=128, steps=30, batch_size=16, lr=3e-3, warmup=5,
             eval_every=0, gen_lengths=((32, 1.0),))


class Encoder:
    """Prompt and response ids for the suite, through the runtime's own Tokenizer and chat template."""

    def __init__(self, tok_dir: Path):
        self.tok = Tokenizer(tok_dir)
        self.eos, self.eot, self.mask = self.tok.eos_id, self.tok.eot_id, self.tok.mask_id
        self._cache: dict[tuple, str] = {}
        self._checked = 0

    def prompt(self, messages: list[dict]) -> list[int]:
        """encode_chat(messages), with the template rendered once per conversation shape and filled by replace()."""
        shape = tuple(m["role"] for m in messages)
        fmt = self._cache.get(shape)
        if fmt is None:
            fmt = self._cache[shape] = self.tok.render_chat(
                [{"role": r, "content": f"\x00{i}\x00"} for i, r in enumerate(shape)])
        text = fmt
        for i, m in enumerate(messages):
            text = text.replace(f"\x00{i}\x00", m["content"].strip())
        ids = self.tok.encode(text)
        if self._checked < 100:  # the fast path must agree with the runtime's template rendering
            assert ids == self.tok.encode_chat(messages), messages
            self._checked += 1
        return ids

    def response(self, answer: str, G: int) -> list[int]:
        ids = self.tok.encode(answer) + [self.eot]
        if len(ids) > G:
            raise ValueError(f"answer {answer!r} does not fit a response of {G} positions")
        return ids + [self.eos] * (G - len(ids))


def collate(prompts: list[list[int]], responses: list[list[int]], eos: int):
    """(tokens, positions, key_start, P): prompts left-padded to the longest (P), then the responses; positions
    and key_start as the runtime's canvas, so a row behaves as if it were alone."""
    B, G = len(prompts), len(responses[0])
    P = max(len(p) for p in prompts)
    tokens = torch.full((B, P + G), eos, dtype=torch.int64)
    pads = []
    for b, (p, r) in enumerate(zip(prompts, responses)):
        pad = P - len(p)
        tokens[b, pad:P] = torch.tensor(p)
        tokens[b, P:] = torch.tensor(r)
        pads.append(pad)
    key_start = torch.tensor(pads, dtype=torch.int32)
    positions = (torch.arange(P + G)[None, :] - key_start[:, None].long()).clamp(min=0)  # (B, T)
    return tokens, positions, key_start, P


def batches(enc: Encoder, stream, rng: random.Random, B: int, gen_lengths, pool: int = 4):
    """Endless training batches. `pool` batches are drawn at once and cut by prompt length (less left padding);
    each batch gets its own response length G and, with probability MULTI_TURN_P, an earlier turn per example."""
    lengths, weights = zip(*gen_lengths)
    while True:
        items = []
        for _ in range(pool * B):
            e = next(stream)
            items.append(([{"role": "user", "content": e.prompt}], e.answer))
        items.sort(key=lambda it: len(it[0][0]["content"]))
        chunks = [items[i * B:(i + 1) * B] for i in range(pool)]
        rng.shuffle(chunks)
        for chunk in chunks:
            G = rng.choices(lengths, weights)[0]
            prompts = []
            multi_turn = rng.random() < MULTI_TURN_P  # per batch, so long prompts do not pad every batch
            for msgs, _ in chunk:
                if multi_turn:
                    prev = next(stream)
                    msgs = [{"role": "user", "content": prev.prompt},
                            {"role": "assistant", "content": prev.answer}] + msgs
                prompts.append(enc.prompt(msgs))
            yield G, collate(prompts, [enc.response(a, G) for _, a in chunk], enc.eos)


def diffusion_loss(cfg: LLaDAConfig, w: ModelWeights, tokens, positions, key_start, P: int,
                   gen: torch.Generator) -> torch.Tensor:
    """LLaDA SFT loss on one batch: mask response positions with prob p per row, CE / p on them, / G, mean over rows."""
    B, T = tokens.shape
    G = T - P
    t = (torch.arange(B) + torch.rand(B, generator=gen)) / B                   # stratified t ~ U(0, 1)
    p = (1 - EPS) * t + EPS                                                    # (B,)
    masked = torch.zeros(B, T, dtype=torch.bool)
    masked[:, P:] = torch.rand(B, G, generator=gen) < p[:, None]               # prompt never masked
    noisy = torch.where(masked, torch.full_like(tokens, cfg.mask_token_id), tokens)
    logits = forward(cfg, w, noisy, positions, key_start, rows=slice(P, T), backend="torch")  # (B, G, V)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, P:].reshape(-1),
                         reduction="none").view(B, G)
    m = masked[:, P:]
    return ((ce * m).sum(1) / p / G).mean()


@torch.no_grad()
def greedy_generate(cfg: LLaDAConfig, w: ModelWeights, enc: Encoder, prompts: list[str], G: int = 32) -> list[str]:
    """A minimal exact-mode sampler for monitoring: one block, one token committed per step, low confidence."""
    ids = [enc.prompt([{"role": "user", "content": p}]) for p in prompts]
    B = len(ids)
    x, positions, key_start, P = collate(ids, [[cfg.mask_token_id] * G] * B, enc.eos)
    for _ in range(G):
        logits = forward(cfg, w, x, positions, key_start, rows=slice(P, P + G), backend="torch").float()
        prob, tok = logits.softmax(-1).max(-1)                                  # (B, G)
        masked = x[:, P:] == cfg.mask_token_id
        conf = torch.where(masked, prob, torch.full_like(prob, -1.0))
        j = conf.argmax(-1)                                                     # (B,)
        rows = torch.arange(B)
        commit = masked[rows, j]
        x[rows[commit], P + j[commit]] = tok[rows, j][commit]
    out = []
    for row in x[:, P:].tolist():
        out.append(enc.tok.decode(enc.tok.cut_at_stop(row)))
    return out


def evaluate(cfg, w, enc, per_task: int) -> dict[str, float]:
    exs = tasks.heldout_set(per_task=per_task)
    outs = []
    for i in range(0, len(exs), 64):
        outs += greedy_generate(cfg, w, enc, [e.prompt for e in exs[i:i + 64]])
    acc: dict[str, list[bool]] = {}
    for e, o in zip(exs, outs):
        acc.setdefault(e.task, []).append(tasks.check(e, o))
    res = {k: sum(v) / len(v) for k, v in acc.items()}
    res["overall"] = sum(sum(v) for v in acc.values()) / len(exs)
    return res


def parse_weights(text: str) -> dict[str, float]:
    """"reverse=2,add=3,..." -> {"reverse": 2.0, "add": 3.0, ...}; a task left out gets weight 0."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or name.strip() not in tasks.TASKS:
            raise ValueError(f"--task-weights {text!r}: expected task=weight pairs separated by commas, tasks among "
                             f"{', '.join(tasks.TASKS)}")
    return out


def check_options(tc: TrainConfig) -> None:
    """ValueError with what is wrong for a bad --task-weights or --tokenizer."""
    parse_weights(tc.task_weights)
    if tc.tokenizer not in ("chars", "words"):
        raise ValueError(f"--tokenizer {tc.tokenizer!r}: expected chars or words")


def params_of(w: ModelWeights) -> list[torch.Tensor]:
    """The tensors themselves (dataclasses.astuple would deep-copy them, and the copies would be trained); a Linear's
    dense() is its held fp32 tensor (init_weights and load_weights build them on the plain torch_nk layout)."""
    return [w.embed, w.ln_f, w.lm_head.dense()] + [
        getattr(l, f.name).dense() if isinstance(getattr(l, f.name), Linear) else getattr(l, f.name)
        for l in w.layers for f in dataclasses.fields(l)]


def train(tc: TrainConfig, out: Path, log=print, command: str | None = None, init_from: Path | None = None) -> dict:
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    out.mkdir(parents=True, exist_ok=True)
    check_options(tc)
    words = tc.tokenizer == "words"
    build_tokenizer.write(out, words=words)
    ids = build_tokenizer.special_ids(out)
    max_prompt = 128  # the longest multi-turn prompt of the suite is ~100 tokens
    cfg = LLaDAConfig(d_model=tc.d_model, n_layers=tc.n_layers, n_heads=tc.n_heads, n_kv_heads=tc.n_heads,
                      mlp_hidden_size=tc.mlp_hidden_size, vocab_size=ids["vocab_size"],
                      embedding_size=ids["vocab_size"], max_sequence_length=512, mask_token_id=ids["mask_token_id"],
                      eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"], rope_theta=tc.rope_theta)
    assert max_prompt + max(g for g, _ in tc.gen_lengths) <= cfg.max_sequence_length
    enc = Encoder(out)
    if init_from is not None:  # continue training a checkpoint of the same shape (fresh optimizer and schedule)
        from llada_rt.config import load_config
        from llada_rt.weights import load_weights

        if load_config(init_from) != cfg:
            raise ValueError(f"--init-from {init_from}: its config.json differs from the model asked for")
        w = load_weights(init_from, cfg, "cpu", torch.float32, path="torch_nk")
        log(f"initialised from {init_from}")
    else:
        w = init_weights(cfg, seed=tc.seed, std=tc.init_std)
        w.embed.mul_(tc.embed_std)  # init_weights draws the embedding with std 1
        for l in w.layers:  # residual-branch outputs scaled down with depth (GPT-2 style) for a stable start
            l.wo.dense().mul_(1 / math.sqrt(2 * tc.n_layers))
            l.w_down.dense().mul_(1 / math.sqrt(2 * tc.n_layers))
    params = params_of(w)
    for t in params:
        t.requires_grad_(True)
    decay = [t for t in params if t.dim() == 2]
    no_decay = [t for t in params if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))
    n_params = w.num_parameters()
    log(f"model: d_model={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} (head_dim {cfg.head_dim}) "
        f"mlp={cfg.mlp_hidden_size} vocab={cfg.vocab_size} params={n_params:,}; train: {tc}")
    reject = frozenset(build_tokenizer.word_tokens(words)) if words else frozenset()  # whole-word tokens
    stream = tasks.train_stream(tc.seed, parse_weights(tc.task_weights) or None, reject)
    data = batches(enc, stream, random.Random(tc.seed + 1), tc.batch_size, tc.gen_lengths)
    gen = torch.Generator().manual_seed(tc.seed + 2)
    history = []
    t_start = time.perf_counter()
    ema = None
    for step in range(1, tc.steps + 1):
        lr = tc.lr * min(1.0, step / tc.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / tc.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        G, batch = next(data)
        loss = diffusion_loss(cfg, w, *batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        v = loss.item()
        if not math.isfinite(v):
            raise RuntimeError(f"step {step}: loss is {v}")
        history.append(v)
        ema = v if ema is None else 0.98 * ema + 0.02 * v
        if step % 50 == 0 or step == 1 or step == tc.steps:
            log(f"step {step:5d}  G {G:3d}  loss {v:.4f}  ema {ema:.4f}  lr {lr:.2e}  "
                f"{time.perf_counter() - t_start:7.1f}s")
        if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
            res = evaluate(cfg, w, enc, tc.eval_per_task)
            log(f"eval step {step}: " + "  ".join(f"{k} {v:.2f}" for k, v in res.items()))
            if step < tc.steps:  # a usable checkpoint at every evaluation
                save(out, cfg, w, ids, tc, step, time.perf_counter() - t_start, ema, command)
        if step == tc.stop_at:
            break
    train_s = time.perf_counter() - t_start
    save(out, cfg, w, ids, tc, step, train_s, ema, command)
    log(f"saved {out} after {train_s:.0f}s")
    return {"history": history, "cfg": cfg, "train_s": train_s}


def save(out: Path, cfg: LLaDAConfig, w: ModelWeights, ids: dict, tc: TrainConfig, step: int, train_s: float,
         ema: float, command: str | None) -> None:
    """config.json + model.safetensors (fp32) + generation_config.json + training.json into out."""
    save_checkpoint(out, cfg, w)  # to_hf_state_dict detaches every tensor
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"], **GENERATION_DEFAULTS},
        indent=2) + "\n")
    info = {"command": command, "params": w.num_parameters(), "step": step, "steps": tc.steps,
            "train_s": round(train_s, 1), "loss_ema": ema, "train_config": dataclasses.asdict(tc)}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory (default: the shipped model)")
    ap.add_argument("--quick", action="store_true", help="a tiny model for a few steps (the test)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from this checkpoint's weights instead of a random init (same shape)")
    for f in dataclasses.fields(TrainConfig):
        if f.name != "gen_lengths":
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    args = ap.parse_args(argv)
    base = dict(QUICK) if args.quick else {}
    base.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name != "gen_lengths" and getattr(args, f.name) is not None})
    command = "python bench/train_small.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        check_options(TrainConfig(**base))
    except ValueError as e:
        ap.error(str(e))
    train(TrainConfig(**base), args.out, log=lambda s: print(s, flush=True), command=command.strip(),
          init_from=args.init_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
