"""Trains the shipped small LLaDA model from scratch on the task suite with LLaDA's masked-diffusion SFT objective.

    python bench/train_small.py                      # the shipped model: writes llada_rt/models/small/
    python bench/train_small.py --stop-at 3000       # only the first 3000 steps (same schedule), then:
    python bench/train_small.py --resume             # continue from the saved training state, as if never stopped
    python bench/train_small.py --measure-speed 5    # steps/s and examples/s of the step variants, interleaved
    python bench/train_small.py --quick --out DIR    # a few steps of a tiny model (the test)

Objective (LLaDA paper, SFT; ML-GSAI GUIDELINES.md): each sequence is the chat-templated prompt followed by a response
of G positions (answer, <|eot_id|>, then <|endoftext|> up to G; the EOS padding is trained as part of the answer).
Per sequence t ~ U(0, 1) (stratified over the batch), p = (1 - eps) t + eps; each response position is replaced by
the mask token with probability p, the prompt never; loss = sum over masked positions of CE / p, divided by the
response length G, averaged over the batch. G is drawn per batch from GEN_LENGTHS so the model also sees the long
all-mask canvases of the runtime's default gen_length=128. The task mix is --task-weights; --tokenizer words trains
with the word-level variant of the tokenizer (see build_tokenizer.py).

The step is fp32 and eager by default (the shipped model's arithmetic); --amp bf16 runs the matmuls under bf16
autocast and --compile 1 the loss, forward and backward, through torch.compile with dynamic shapes; the weights and
AdamW stay fp32 either way (--measure-speed compares the four).
The training state (weights, AdamW moments, data stream and RNG positions, loss history, time used) goes to --state,
outside the package, every --state-every steps, at --stop-at, and on SIGINT/SIGTERM (at the end of the current
step); --resume continues from it to the same weights, bit for bit, as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import signal
import statistics
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
from llada_rt.model import ForwardBatch, RopeTable, forward, forward_batch  # noqa: E402
from llada_rt.tokenizer import Tokenizer  # noqa: E402
from llada_rt.linear import Linear  # noqa: E402
from llada_rt.weights import ModelWeights, init_weights, save_checkpoint  # noqa: E402

DEFAULT_OUT = ROOT / "llada_rt" / "models" / "small"
DEFAULT_STATE_DIR = Path.home() / ".cache" / "llada_rt" / "train_state"  # never inside the package
EPS = 1e-3
GEN_LENGTHS = ((16, 0.7), (32, 0.25), (128, 0.05))  # (response length G, probability of a batch using it)
MULTI_TURN_P = 0.05  # share of batches whose prompts carry an earlier user/assistant turn (the chat REPL format)
# The recommended generation settings of the shipped model (written to generation_config.json for the CLI).
GENERATION_DEFAULTS = {"gen_length": 32, "block_length": 32, "steps": 32}
STATE_VERSION = 1


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
    threads: int = 2  # float sums depend on the thread count: reproduce (or resume) a run with the same value
    amp: str = "off"  # "bf16": matmuls under bf16 autocast; "off": fp32 throughout (the shipped model)
    # 1: the loss (forward + cross-entropy) through torch.compile; 0: eager (the shipped model). Compiled runs repeat
    # (and resume) bit for bit only with threads=1: with 2 a resumed run's last weights differed in the last bits
    compile: int = 0
    eval_every: int = 1500  # monitoring only (a minimal greedy sampler on a held-out prefix); 0 turns it off
    eval_per_task: int = 10
    stop_at: int = 0  # stop (and save) after this step, keeping the schedule of `steps`; 0: run all steps
    state_every: int = 500  # steps between two writes of the training state (--resume); 0: only when stopping
    task_weights: str = ""  # relative share of each task, e.g. "reverse=2,add=3,..."; empty: uniform
    tokenizer: str = "chars"  # "chars" (shipped) or "words" (build_tokenizer.py --words, an experiment)
    task_set: int = 1  # tasks.TASK_SETS: 1 the shipped model's stream; 2 adds fact phrasings and lead-ins
    save_dtype: str = "float32"  # dtype of model.safetensors: float32 or bfloat16 (half the size)
    gen_lengths: tuple = GEN_LENGTHS


# Fields that do not change the trained weights: a resumed run may set them anew.
RUN_ONLY_FIELDS = ("stop_at", "eval_every", "eval_per_task", "state_every")
# Fields that change the run from the resumed step on: the task proportions (a curriculum over a chain of resumed
# runs) and the schedule's length (steps may only grow: the cosine then runs over the new total, so the learning rate
# rises to its value at the resumed step of the longer schedule, a warm restart). A resumed run may set them anew;
# its stage records the values it ran with, so the chain of commands reproduces the weights.
STAGE_FIELDS = ("task_weights", "steps")

QUICK = dict(d_model=64, n_layers=2, n_heads=1, mlp_hidden_size=128, steps=30, batch_size=16, lr=3e-3, warmup=5,
             eval_every=0, compile=0, gen_lengths=((32, 1.0),))


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


class Batches:
    """Endless training batches (G, collate(...)). `pool` batches are drawn at once and cut by prompt length (less
    left padding); each batch gets its own response length G and, with probability MULTI_TURN_P, an earlier turn per
    example. getstate()/setstate() save and restore the position (the stream's, this rng's, the pool's rest)."""

    def __init__(self, enc: Encoder, stream: tasks.TrainStream, seed: int, B: int, gen_lengths, pool: int = 4):
        self.enc, self.stream, self.B, self.pool = enc, stream, B, pool
        self.lengths, self.weights = zip(*gen_lengths)
        self.rng = random.Random(seed)
        self.pending: list[list[tuple]] = []  # batches of the current pool not yet returned: (messages, answer)

    def __iter__(self) -> "Batches":
        return self

    def __next__(self):
        if not self.pending:
            items = []
            for _ in range(self.pool * self.B):
                e = next(self.stream)
                items.append(([{"role": "user", "content": e.prompt}], e.answer))
            items.sort(key=lambda it: len(it[0][0]["content"]))
            self.pending = [items[i * self.B:(i + 1) * self.B] for i in range(self.pool)]
            self.rng.shuffle(self.pending)
        chunk = self.pending.pop(0)
        G = self.rng.choices(self.lengths, self.weights)[0]
        prompts = []
        multi_turn = self.rng.random() < MULTI_TURN_P  # per batch, so long prompts do not pad every batch
        for msgs, _ in chunk:
            if multi_turn:
                prev = next(self.stream)
                msgs = [{"role": "user", "content": prev.prompt},
                        {"role": "assistant", "content": prev.answer}] + msgs
            prompts.append(self.enc.prompt(msgs))
        return G, collate(prompts, [self.enc.response(a, G) for _, a in chunk], self.enc.eos)

    def getstate(self) -> dict:
        return {"rng": self.rng.getstate(), "stream": self.stream.getstate(), "pending": copy.deepcopy(self.pending)}

    def setstate(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.stream.setstate(state["stream"])
        self.pending = copy.deepcopy(state["pending"])


def noise(tokens: torch.Tensor, P: int, mask_id: int, gen: torch.Generator):
    """LLaDA's forward process on the responses of tokens (B, T) (the prompt, [:, :P], is never masked):
    (noisy tokens (B, T), masked (B, T) bool, per-row masking probability p (B,))."""
    B, T = tokens.shape
    G = T - P
    t = (torch.arange(B) + torch.rand(B, generator=gen)) / B                   # stratified t ~ U(0, 1)
    p = (1 - EPS) * t + EPS                                                    # (B,)
    masked = torch.zeros(B, T, dtype=torch.bool)
    masked[:, P:] = torch.rand(B, G, generator=gen) < p[:, None]
    return torch.where(masked, mask_id, tokens), masked, p


def masked_ce(cfg: LLaDAConfig, w: ModelWeights, noisy, tokens, positions, key_start, masked, p, G,
              rows: slice | None, rope: RopeTable | None = None) -> torch.Tensor:
    """LLaDA SFT loss: CE on the masked positions / p, summed per row, / G (the response length), mean over rows.

    rows: slice(P, T), the logits of the response rows only (the eager step: the shipped model's arithmetic), or None,
    every row, prompt included, for torch.compile: a slice at the prompt length P would make it specialize on each P
    (a recompile per length); the LM head on the prompt rows costs a few % of the step. For the same reason the
    compiled step gets G as a 0-dim tensor, not an int, and a prebuilt RoPE table (rope; None: forward_batch builds
    one for the largest position, an int read from the data that would break the graph and be specialized on: the
    kernels run would then depend on which lengths came first, and a resumed run would not repeat them)."""
    B = tokens.shape[0]
    start = 0 if rows is None else rows.start
    fb = ForwardBatch.full(noisy, positions, key_start, rows)
    logits = forward_batch(cfg, w, fb, rope=rope, backend="torch")                # (B * (T - start), V)
    ce = F.cross_entropy(logits.float(), tokens[:, start:].flatten(), reduction="none").view(B, -1)
    return ((ce * masked[:, start:]).sum(1) / p / G).mean()


def diffusion_loss(cfg: LLaDAConfig, w: ModelWeights, tokens, positions, key_start, P: int,
                   gen: torch.Generator, loss_fn=masked_ce, rope: RopeTable | None = None) -> torch.Tensor:
    """LLaDA SFT loss on one batch: mask response positions with prob p per row, CE / p on them, / G, mean over rows.
    rope: a RoPE table of cfg.max_sequence_length positions, for the compiled loss_fn (masked_ce's form with every
    row); None: the eager form."""
    noisy, masked, p = noise(tokens, P, cfg.mask_token_id, gen)
    T = tokens.shape[1]
    if rope is not None:
        return loss_fn(cfg, w, noisy, tokens, positions, key_start, masked, p, torch.tensor(T - P), None, rope)
    return loss_fn(cfg, w, noisy, tokens, positions, key_start, masked, p, T - P, slice(P, T))


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
    """ValueError with what is wrong for a bad --task-weights, --tokenizer, --task-set, --amp, --compile or
    --save-dtype."""
    parse_weights(tc.task_weights)
    if tc.tokenizer not in ("chars", "words"):
        raise ValueError(f"--tokenizer {tc.tokenizer!r}: expected chars or words")
    if tc.task_set not in tasks.TASK_SETS:
        raise ValueError(f"--task-set {tc.task_set!r}: expected one of {', '.join(map(str, tasks.TASK_SETS))}")
    if tc.amp not in ("bf16", "off"):
        raise ValueError(f"--amp {tc.amp!r}: expected bf16 or off")
    if tc.compile not in (0, 1):
        raise ValueError(f"--compile {tc.compile!r}: expected 0 or 1")
    if tc.save_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--save-dtype {tc.save_dtype!r}: expected float32 or bfloat16")


def params_of(w: ModelWeights) -> list[torch.Tensor]:
    """The tensors themselves (dataclasses.astuple would deep-copy them, and the copies would be trained); a Linear's
    dense() is its held fp32 tensor (init_weights and load_weights build them on the plain torch_nk layout)."""
    return [w.embed, w.ln_f, w.lm_head.dense()] + [
        getattr(l, f.name).dense() if isinstance(getattr(l, f.name), Linear) else getattr(l, f.name)
        for l in w.layers for f in dataclasses.fields(l)]


def model_config(tc: TrainConfig, ids: dict) -> LLaDAConfig:
    return LLaDAConfig(d_model=tc.d_model, n_layers=tc.n_layers, n_heads=tc.n_heads, n_kv_heads=tc.n_heads,
                       mlp_hidden_size=tc.mlp_hidden_size, vocab_size=ids["vocab_size"],
                       embedding_size=ids["vocab_size"], max_sequence_length=512,
                       mask_token_id=ids["mask_token_id"], eos_token_id=ids["eos_token_id"],
                       pad_token_id=ids["pad_token_id"], rope_theta=tc.rope_theta)


def initial_weights(tc: TrainConfig, cfg: LLaDAConfig) -> ModelWeights:
    w = init_weights(cfg, seed=tc.seed, std=tc.init_std)
    w.embed.mul_(tc.embed_std)  # init_weights draws the embedding with std 1
    for l in w.layers:  # residual-branch outputs scaled down with depth (GPT-2 style) for a stable start
        l.wo.dense().mul_(1 / math.sqrt(2 * tc.n_layers))
        l.w_down.dense().mul_(1 / math.sqrt(2 * tc.n_layers))
    return w


class Trainer:
    """One training run's model, AdamW, data and RNGs, advanced one step at a time; state_dict() holds everything a
    resumed run needs to continue exactly where this one is."""

    def __init__(self, tc: TrainConfig, cfg: LLaDAConfig, enc: Encoder, w: ModelWeights):
        self.tc, self.cfg, self.w = tc, cfg, w
        self.params = params_of(w)
        for t in self.params:
            t.requires_grad_(True)
        decay = [t for t in self.params if t.dim() == 2]
        no_decay = [t for t in self.params if t.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))
        words = tc.tokenizer == "words"
        reject = frozenset(build_tokenizer.word_tokens(words)) if words else frozenset()  # whole-word tokens
        stream = tasks.TrainStream(tc.seed, parse_weights(tc.task_weights) or None, reject, tc.task_set)
        self.data = Batches(enc, stream, tc.seed + 1, tc.batch_size, tc.gen_lengths)
        self.gen = torch.Generator().manual_seed(tc.seed + 2)
        # dynamic=True: one graph for every prompt and response length (and one more above inductor's size limit
        # for a plain reduction), not one per shape
        self.loss_fn, self.rope = masked_ce, None
        if tc.compile:
            self.rope = RopeTable.build(cfg, cfg.max_sequence_length, "cpu")
            from torch._inductor import config as inductor_config

            inductor_config.compile_threads = 1  # compile in this process: its CPU time is counted
            self.loss_fn = torch.compile(masked_ce, dynamic=True)
        self.step = 0
        self.history: list[float] = []
        self.ema: float | None = None

    def lr_at(self, step: int) -> float:
        tc = self.tc
        return tc.lr * min(1.0, step / tc.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / tc.steps)))

    def train_step(self) -> tuple[int, float]:
        """One optimizer step on the next batch: (its response length G, its loss)."""
        self.step += 1
        lr = self.lr_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        G, batch = next(self.data)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.tc.amp == "bf16"):
            loss = diffusion_loss(self.cfg, self.w, *batch, self.gen, loss_fn=self.loss_fn, rope=self.rope)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        v = loss.item()
        if not math.isfinite(v):
            raise RuntimeError(f"step {self.step}: loss is {v}")
        self.history.append(v)
        self.ema = v if self.ema is None else 0.98 * self.ema + 0.02 * v
        return G, v

    def state_dict(self) -> dict:
        return {"step": self.step, "params": [t.detach().clone() for t in self.params],
                "opt": copy.deepcopy(self.opt.state_dict()), "gen": self.gen.get_state(),
                "data": self.data.getstate(), "history": list(self.history), "ema": self.ema}

    def load_state_dict(self, sd: dict) -> None:
        with torch.no_grad():
            for t, v in zip(self.params, sd["params"], strict=True):
                t.copy_(v)
        self.opt.load_state_dict(sd["opt"])
        self.gen.set_state(sd["gen"])
        self.data.setstate(sd["data"])
        self.step, self.history, self.ema = sd["step"], list(sd["history"]), sd["ema"]


def default_state_path(out: Path) -> Path:
    """DEFAULT_STATE_DIR/<the output directory's absolute path, '/' -> '-'>.pt: one state per output directory."""
    return DEFAULT_STATE_DIR / (str(Path(out).resolve()).strip("/").replace("/", "-") + ".pt")


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (the compiler runs of torch.compile)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def check_state_path(path: Path) -> None:
    package = (ROOT / "llada_rt").resolve()
    if Path(path).resolve().is_relative_to(package):
        raise ValueError(f"--state {path}: the training state must live outside the package ({package}); it is "
                         "never shipped")


def save_state(path: Path, trainer: Trainer, clock: dict, out: Path) -> None:
    """The training state, written to a temporary file and renamed (a crash mid-write keeps the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"version": STATE_VERSION, "train_config": dataclasses.asdict(trainer.tc), "out": str(out),
                "clock": clock, **trainer.state_dict()}, tmp)
    os.replace(tmp, path)


def read_state(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"--resume: no training state at {path}; run without --resume to start, or pass the "
                         "--state of the run to continue")
    sd = torch.load(path, weights_only=False)  # our own file: python random states and the pool's examples
    if sd.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: training state version {sd.get('version')}, this script writes {STATE_VERSION}")
    return sd


def load_state(path: Path, tc: TrainConfig) -> dict:
    """The saved state, after checking that it belongs to a run of this configuration."""
    sd = read_state(path)
    saved, asked = sd["train_config"], dataclasses.asdict(tc)
    diff = [f"{k}: saved {saved.get(k)!r}, asked {asked[k]!r}" for k in asked
            if k not in RUN_ONLY_FIELDS + STAGE_FIELDS and _plain(saved.get(k)) != _plain(asked[k])]
    if diff:
        raise ValueError(f"--resume {path}: the state belongs to another configuration ({'; '.join(diff)}); resume "
                         f"with the same options (only {', '.join(RUN_ONLY_FIELDS + STAGE_FIELDS)} may change)")
    if tc.steps < sd["step"]:
        raise ValueError(f"--resume {path}: --steps {tc.steps} is below the {sd['step']} steps already run (a resumed "
                         "run may lengthen its schedule, not shorten it)")
    return sd


def _plain(v):
    return json.loads(json.dumps(v))  # tuples and lists compare alike


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads between steps, so that the state written is a whole step's."""

    def __init__(self):
        self.asked = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, the run is simply not interruptible
                pass
        return self

    def _handle(self, signum, frame):
        self.asked = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(tc: TrainConfig, out: Path, log=print, command: str | None = None, init_from: Path | None = None,
          state: Path | None = None, resume: bool = False) -> dict:
    """Trains (or, with resume, continues) the run of tc; writes the checkpoint into out and the training state to
    state (default: DEFAULT_STATE_DIR/<out name>.pt). Returns history, cfg, train_s, cpu_s, step."""
    check_options(tc)
    state = Path(state) if state is not None else default_state_path(out)
    check_state_path(state)
    saved = load_state(state, tc) if resume else None
    if saved is None and state.is_file():
        old = torch.load(state, weights_only=False)
        raise ValueError(f"training state {state} exists (step {old['step']} of {old['train_config']['steps']}): "
                         "pass --resume to continue that run, or delete it or choose another --state to start over")
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    out.mkdir(parents=True, exist_ok=True)
    words = tc.tokenizer == "words"
    build_tokenizer.write(out, words=words)
    ids = build_tokenizer.special_ids(out)
    max_prompt = 128  # the longest multi-turn prompt of the suite is ~100 tokens
    cfg = model_config(tc, ids)
    assert max_prompt + max(g for g, _ in tc.gen_lengths) <= cfg.max_sequence_length
    enc = Encoder(out)
    if init_from is not None and saved is None:  # continue training a checkpoint of the same shape
        from llada_rt.config import load_config
        from llada_rt.weights import load_weights

        if load_config(init_from) != cfg:
            raise ValueError(f"--init-from {init_from}: its config.json differs from the model asked for")
        w = load_weights(init_from, cfg, "cpu", torch.float32, path="torch_nk")
        log(f"initialised from {init_from}")
    else:
        w = initial_weights(tc, cfg)
    trainer = Trainer(tc, cfg, enc, w)
    # wall and process CPU seconds of training so far, and one entry per invocation (a resumed run adds one)
    clock = {"train_s": 0.0, "cpu_s": 0.0, "stages": []}
    if saved is not None:
        trainer.load_state_dict(saved)
        clock = copy.deepcopy(saved["clock"])
        log(f"resumed {state} at step {trainer.step} of {tc.steps}")
    log(f"model: d_model={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} (head_dim {cfg.head_dim}) "
        f"mlp={cfg.mlp_hidden_size} vocab={cfg.vocab_size} params={w.num_parameters():,}; train: {tc}")
    stage = {"command": command, "first_step": trainer.step + 1, "steps": 0, "train_s": 0.0, "cpu_s": 0.0,
             "options": {k: getattr(tc, k) for k in STAGE_FIELDS}}   # steps: this stage's; options.steps: schedule
    clock["stages"].append(stage)
    t_wall, t_cpu = time.perf_counter(), cpu_seconds()

    def tick() -> None:  # brings the clock up to now
        nonlocal t_wall, t_cpu
        now_wall, now_cpu = time.perf_counter(), cpu_seconds()
        for c in (clock, stage):
            c["train_s"] += now_wall - t_wall
            c["cpu_s"] += now_cpu - t_cpu
        t_wall, t_cpu = now_wall, now_cpu

    last = tc.stop_at if 0 < tc.stop_at < tc.steps else tc.steps
    with StopRequest() as stop:
        while trainer.step < last and not stop.asked:
            G, v = trainer.train_step()
            step = trainer.step
            stage["steps"] += 1
            if step % 50 == 0 or step == 1 or step == tc.steps:
                tick()
                log(f"step {step:5d}  G {G:3d}  loss {v:.4f}  ema {trainer.ema:.4f}  lr {trainer.lr_at(step):.2e}  "
                    f"{clock['train_s']:7.1f}s  cpu {clock['cpu_s']:7.1f}s")
            if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                res = evaluate(cfg, w, enc, tc.eval_per_task)
                log(f"eval step {step}: " + "  ".join(f"{k} {v:.2f}" for k, v in res.items()))
                if step < tc.steps:  # a usable checkpoint at every evaluation
                    tick()
                    save(out, cfg, w, ids, tc, step, clock, trainer.ema)
            if tc.state_every and step % tc.state_every == 0 and step < last:
                tick()
                save_state(state, trainer, clock, out)
    tick()
    save(out, cfg, w, ids, tc, trainer.step, clock, trainer.ema)
    save_state(state, trainer, clock, out)
    how = "stopped by a signal" if stop.asked else "done" if trainer.step == tc.steps else "stopped at --stop-at"
    log(f"saved {out} and the training state {state} at step {trainer.step} of {tc.steps} ({how}); "
        f"{clock['train_s']:.0f}s wall, {clock['cpu_s']:.0f}s CPU in all")
    return {"history": trainer.history, "cfg": cfg, "train_s": clock["train_s"], "cpu_s": clock["cpu_s"],
            "step": trainer.step}


def save(out: Path, cfg: LLaDAConfig, w: ModelWeights, ids: dict, tc: TrainConfig, step: int, clock: dict,
         ema: float | None) -> None:
    """config.json + model.safetensors + generation_config.json + training.json into out."""
    save_checkpoint(out, cfg, w, dtype=getattr(torch, tc.save_dtype))  # to_hf_state_dict detaches every tensor
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"], **GENERATION_DEFAULTS},
        indent=2) + "\n")
    info = {"params": w.num_parameters(), "step": step, "steps": tc.steps, "train_s": round(clock["train_s"], 1),
            "cpu_s": round(clock["cpu_s"], 1), "loss_ema": ema,
            "stages": [{k: round(v, 1) if isinstance(v, float) else v for k, v in st.items()}
                       for st in clock["stages"]],
            "train_config": dataclasses.asdict(tc)}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


# The step variants --measure-speed compares: label -> (amp, compile).
STEP_VARIANTS = {"fp32 eager": ("off", 0), "bf16 eager": ("bf16", 0), "fp32 compiled": ("off", 1),
                 "bf16 compiled": ("bf16", 1)}


def measure_speed(tc: TrainConfig, rounds: int, log=print, steps_per_round: int = 8, tok_dir: Path | None = None,
                  variants: tuple[str, ...] = tuple(STEP_VARIANTS)) -> dict[str, dict]:
    """Steps/s and examples/s, wall and process CPU, of each step variant at tc's model, batch size and threads.

    Every variant trains its own copy of the same model on the same batches; the variants take turns, steps_per_round
    steps each, for `rounds` rounds after one warm-up round (compilation), so that a shared machine's load falls on
    all of them alike. Reports the median round of each, and its ratio to the first variant."""
    import tempfile

    torch.set_num_threads(tc.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tok_dir or tmp)
        build_tokenizer.write(tok_dir, words=tc.tokenizer == "words")
        ids = build_tokenizer.special_ids(tok_dir)
        cfg = model_config(tc, ids)
        enc = Encoder(tok_dir)
        trainers = {}
        for label in variants:
            amp, comp = STEP_VARIANTS[label]
            trainers[label] = Trainer(dataclasses.replace(tc, amp=amp, compile=comp), cfg, enc, initial_weights(tc, cfg))
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in variants}
        for r in range(rounds + 1):
            for label, trainer in trainers.items():
                t0, c0 = time.perf_counter(), cpu_seconds()
                for _ in range(steps_per_round):
                    trainer.train_step()
                dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
                if r == 0:
                    log(f"warm-up {label}: {dt:.1f}s wall, {dc:.1f}s CPU for {steps_per_round} steps")
                else:
                    times[label].append((dt, dc))
    res = {}
    for label, ts in times.items():
        wall, cpu = statistics.median(t for t, _ in ts), statistics.median(c for _, c in ts)
        res[label] = {"steps_per_s": steps_per_round / wall, "examples_per_s": steps_per_round * tc.batch_size / wall,
                      "examples_per_cpu_s": steps_per_round * tc.batch_size / cpu}
    base = res[variants[0]]
    log(f"{'step':16s} {'steps/s':>8s} {'examples/s':>11s} {'examples/CPU-s':>15s}  ratio (wall, CPU) to {variants[0]}")
    for label, m in res.items():
        log(f"{label:16s} {m['steps_per_s']:8.2f} {m['examples_per_s']:11.1f} {m['examples_per_cpu_s']:15.1f}  "
            f"{m['examples_per_s'] / base['examples_per_s']:.2f}x, "
            f"{m['examples_per_cpu_s'] / base['examples_per_cpu_s']:.2f}x")
    log(f"model d_model {tc.d_model}, {tc.n_layers} layers, batch {tc.batch_size}, {tc.threads} thread(s), "
        f"response lengths {tc.gen_lengths}; {rounds} rounds of {steps_per_round} steps, median round")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="checkpoint directory (default: the shipped model's; with --resume, the saved run's)")
    ap.add_argument("--quick", action="store_true", help="a tiny model for a few steps (the test)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from this checkpoint's weights instead of a random init (same shape)")
    ap.add_argument("--state", type=Path, default=None,
                    help=f"training state file (default: one per --out in {DEFAULT_STATE_DIR}; never in the package)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run saved in --state with its options (run-only ones, such as --stop-at, may "
                         "be given anew)")
    ap.add_argument("--measure-speed", type=int, default=0, metavar="ROUNDS",
                    help="time the step variants (fp32/bf16, eager/compiled) interleaved for ROUNDS rounds; no training")
    for f in dataclasses.fields(TrainConfig):
        if f.name != "gen_lengths":
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    args = ap.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if f.name != "gen_lengths" and getattr(args, f.name) is not None}
    command = "python bench/train_small.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out
    try:
        if args.state is not None:
            check_state_path(args.state)
        if args.resume:  # the saved run's options; one given anew that changes the weights is refused by train()
            args.state = args.state or default_state_path(out or DEFAULT_OUT)
            saved = read_state(args.state)
            base = {**saved["train_config"], "stop_at": 0, **given}  # a --stop-at is for one invocation
            if out is None and "out" not in saved:
                raise ValueError(f"{args.state} does not name its output directory: pass --out")
            out = out or Path(saved["out"])
        else:
            base = {**(QUICK if args.quick else {}), **given}
        tc = TrainConfig(**base)
        check_options(tc)
    except ValueError as e:
        ap.error(str(e))
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.measure_speed:
        measure_speed(tc, args.measure_speed, log=log)
        return 0
    try:
        train(tc, out or DEFAULT_OUT, log=log, command=command.strip(), init_from=args.init_from, state=args.state,
              resume=args.resume)
    except ValueError as e:  # a missing or foreign training state, or an existing one without --resume
        print(f"train_small.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
