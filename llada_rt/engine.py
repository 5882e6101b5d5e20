"""Engine: the decode state that outlives one call (canvas, per-row settings and counters, K/V cache, RoPE table,
workspace, CUDA graphs) and the step that advances every active request by one denoising step."""
from __future__ import annotations

import collections
import functools
import threading
import time

import numpy as np
import torch

from . import parallel, reference
from .reference import ADVANCE_BLOCK_DONE as BLOCK_DONE, ADVANCE_DONE as DONE, ADVANCE_EARLY as EARLY
from .cache import KVCache
from .config import LLaDAConfig
from .generation_config import GenerationConfig
from .graphs import StepGraphs
from .model import ForwardBatch, RopeTable, forward_batch
from .ops import REMASK_RULES
from .modes import LLADA, PHASES, Family, Phase, mergeable, uses_cache
from .request import Request, StepEvent
from .weights import ModelWeights
from .workspace import Workspace

_COL_QUANTUM = 64                                  # canvas columns grow in multiples of this (and CUDA windows round to it)


class EngineState:
    """Per-process device tensors: R slots plus one scratch row (padding rows of a CUDA-graph bucket point at it),
    T columns plus one dump column (window columns past a row's end are written there)."""

    PER_ROW = {
        "block_start": torch.int64,   # canvas column of the current block
        "step": torch.int64,          # steps done in the current block
        "nsteps": torch.int64,        # steps done in total: the Philox offset of the next step
        "k": torch.int64,             # fixed schedule: positions to commit at the next step
        "spb": torch.int64,           # steps per block (fixed schedule)
        "prompt_len": torch.int64,
        "length": torch.int64,        # prompt + gen_length
        "seed": torch.int64,
        "key_end": torch.int32,       # = length, the attention's key range [0, key_end)
        "rule": torch.int32,          # ops.REMASK_RULES
        "suppress_mask": torch.int32,  # bits over Engine.special_ids: -inf before the argmax
        "zero_conf_mask": torch.int32,  # bits over Engine.special_ids: chosen, but confidence 0
        "status": torch.int32,        # BLOCK_DONE | DONE | EARLY after the row's last step
        "filled": torch.int32,        # masks overwritten by early stop
        "temperature": torch.float32,
        "cfg_scale": torch.float32,
        "threshold": torch.float64,
        "factor": torch.float64,
        "random_conf": torch.bool,
        "early_stop": torch.bool,
    }

    def __init__(self, rows: int, cols: int, mask_id: int, device: torch.device):
        self.rows, self.cols, self.device = rows, cols, device
        self.canvas = torch.full((rows + 1, cols + 1), mask_id, dtype=torch.int64, device=device)   # (R+1, T+1)
        for name, dt in self.PER_ROW.items():
            setattr(self, name, torch.zeros(rows + 1, dtype=dt, device=device))             # (R+1,)

    @property
    def scratch(self) -> int:
        return self.rows

    def grown(self, rows: int, cols: int, mask_id: int) -> "EngineState":
        new = EngineState(rows, cols, mask_id, self.device)
        new.canvas[:self.rows, :self.cols] = self.canvas[:self.rows, :self.cols]
        for name in self.PER_ROW:
            getattr(new, name)[:self.rows] = getattr(self, name)[:self.rows]
        return new


class PhaseTimer:
    """Time per phase without a sync inside a step: CUDA events on the GPU (read at the end), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host_s: dict[str, float] = collections.defaultdict(float)
        self.events: list = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, phase: str, t0) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append((phase, t0, ev))
        else:
            self.host_s[phase] += time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        """Seconds per phase so far (syncs on the last CUDA event)."""
        if self.events:
            self.events[-1][2].synchronize()
            for phase, a, b in self.events:
                self.host_s[phase] += a.elapsed_time(b) / 1e3
            self.events.clear()
        return dict(self.host_s)


class Engine:
    """Requests join (add) and leave (done, cancel) at any step; each step() advances every active request by one
    denoising step. Requests with the same block length, mode and guidance share one forward pass, whatever their
    block and step; a row's refresh joins the cached steps of the others (modes.mergeable: each row has its own query
    window, and the two kinds attend in separate segments), except under CUDA graphs, which replay per phase.
    Thread-safe: add/step/cancel take one lock.

    backend 'ops': the compiled kernels (llada_rt.ops); 'torch': every op from reference.py.
    """

    def __init__(self, cfg: LLaDAConfig, weights: ModelWeights, device: torch.device, *, stop_ids: list[int],
                 eot_id: int | None, backend: str = "ops", family: Family = LLADA, max_rows: int | None = None):
        if backend not in ("ops", "torch"):
            raise ValueError(f"backend must be 'ops' (the compiled kernels) or 'torch' (reference.py), got {backend!r}")
        self.cfg, self.w, self.device, self.backend, self.family = cfg, weights, device, backend, family
        self.max_rows = max_rows
        self.mask_id, self.eos_id = cfg.mask_token_id, cfg.eos_token_id
        self.stop_ids = list(stop_ids)
        # the special ids the confidence op can suppress or zero per row, as bits of suppress/zero_conf masks
        self.special_ids = [self.eos_id] + ([eot_id] if eot_id is not None else []) + [self.mask_id]
        self._bit = {i: 1 << j for j, i in enumerate(self.special_ids)}
        self.eot_id = eot_id
        self.st: EngineState | None = None
        self.cache: KVCache | None = None
        self.rope: RopeTable | None = None
        self.ws = Workspace(device)
        self.graphs = StepGraphs(device) if device.type == "cuda" else None
        self.active: list[Request] = []
        self.free: list[int] = []
        self.timer = PhaseTimer(device)
        self.forwards = 0                       # forward passes run (one per group per step)
        self.lock = threading.RLock()
        self._consts: dict = {}
        self._ar: torch.Tensor | None = None
        if device.type == "cuda":
            self._host_status = None

    # -- capacity --------------------------------------------------------------------------------------------------
    def _const(self, value, dtype=torch.int64) -> torch.Tensor:
        """A 0-dim device tensor, made once per value (ops with a Python scalar argument would allocate one per call)."""
        key = (value, dtype)
        t = self._consts.get(key)
        if t is None:
            t = self._consts[key] = torch.tensor(value, dtype=dtype, device=self.device)
        return t

    def _ensure(self, rows: int, cols: int) -> None:
        """Room for `rows` slots of `cols` canvas columns; grows the state, the cache and the RoPE table."""
        st = self.st
        if st is not None and rows <= st.rows and cols <= st.cols:
            return
        new_rows = max(rows, 2 * st.rows if st is not None else rows, 1)
        if self.max_rows is not None:
            new_rows = min(new_rows, self.max_rows)
        new_cols = -(-max(cols, st.cols if st is not None else 0) // _COL_QUANTUM) * _COL_QUANTUM
        if st is None:
            self.st = EngineState(new_rows, new_cols, self.mask_id, self.device)
            self.free = list(range(new_rows))
        else:
            self.st = st.grown(new_rows, new_cols, self.mask_id)
            self.free += list(range(st.rows, new_rows))
        if self.cache is not None:
            self.cache.grow(new_rows + 1, new_cols + 1)
        self.rope = RopeTable.build(self.cfg, new_cols + 1, self.device)
        self._ar = torch.arange(max(new_cols + 1, new_rows + 1), dtype=torch.int64, device=self.device)
        if self.graphs is not None:
            self.graphs.invalidate()
            self._host_status = torch.empty(new_rows + 1, dtype=torch.int32, pin_memory=True)

    @property
    def capacity(self) -> int:
        return 0 if self.st is None else self.st.rows

    # -- requests --------------------------------------------------------------------------------------------------
    def add(self, prompt: list[int], config: GenerationConfig, events: bool = False) -> Request:
        """A new request (validated prompt ids and config); it joins at the next step(), whose forward is its first."""
        with self.lock, torch.inference_mode():
            req = Request(prompt=list(prompt), config=config, events=events)
            if self.max_rows is not None and len(self.active) >= self.max_rows:
                raise RuntimeError(f"the engine is full ({self.max_rows} rows in flight); wait for a request to finish")
            need_rows = len(self.active) + 1
            self._ensure(max(need_rows, self.capacity if self.free else need_rows), req.length)
            if uses_cache(config.mode) and self.cache is None:
                tp = self.w.tp
                self.cache = KVCache(self.cfg, self.st.rows + 1, self.st.cols + 1, self.w.dtype, self.device,
                                     n_kv_heads=None if tp is None else tp.local(self.cfg.n_kv_heads))
                if self.graphs is not None:
                    self.graphs.invalidate()
            req.slot = self.free.pop(0)
            self._write_row(req)
            self.active.append(req)
            return req

    def _write_row(self, r: Request) -> None:
        st, s, gc = self.st, r.slot, r.config
        P, L, N = r.prompt_len, r.length, gc.block_length
        row = torch.tensor(r.prompt + [self.mask_id] * (st.cols + 1 - P), dtype=torch.int64)
        st.canvas[s].copy_(row)
        spb = gc.steps_per_block
        # the mask id is never a candidate outside exact mode's fixed schedule: committing it would leave the position
        # masked, and a dynamic rule would then never finish the block (exact mode keeps the official behaviour)
        never_mask = gc.parallel or gc.mode != "exact"
        sup = (self._bit[self.eos_id] if gc.logits_eos_inf else 0) | (self._bit[self.mask_id] if never_mask else 0)
        zero = 0
        if gc.confidence_eos_eot_inf:
            zero = self._bit[self.eos_id] | (self._bit[self.eot_id] if self.eot_id is not None else 0)
        values = dict(block_start=P, step=0, nsteps=0, k=N // spb + (1 if N % spb else 0), spb=spb, prompt_len=P,
                      length=L, seed=gc.seed, key_end=L, rule=REMASK_RULES[gc.rule], suppress_mask=sup, zero_conf_mask=zero,
                      status=0, filled=0, temperature=gc.temperature, cfg_scale=gc.cfg_scale,
                      threshold=gc.threshold if gc.threshold is not None else 1.0,
                      factor=gc.factor if gc.factor is not None else 1.0,
                      random_conf=gc.remasking == "random", early_stop=gc.early_stop)
        for name, v in values.items():
            getattr(st, name)[s] = v

    def cancel(self, req: Request) -> None:
        """Ends a request now; its slot is free for the next one."""
        with self.lock:
            if req.done:
                return
            req.cancelled = True
            self._finish(req, read_answer=False)

    def _finish(self, r: Request, read_answer: bool = True) -> None:
        if read_answer:
            r.answer = self.st.canvas[r.slot, r.prompt_len:r.length].tolist()
            r.filled = int(self.st.filled[r.slot])
        r.done = True
        self.active.remove(r)
        self.free.append(r.slot)
        self.free.sort()

    # -- the step --------------------------------------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        """Advances every active request by one denoising step; returns one event per request stepped (also queued on
        the request, see Request.take_events)."""
        with self.lock, torch.inference_mode():
            groups: dict[tuple, list[Request]] = {}
            for r in self.active:
                gc = r.config
                # a row's refresh joins the other rows' cached steps (same cache use, its own window), except under
                # CUDA graphs, whose replayed shapes are per phase
                phase = None if mergeable(gc.mode) and not gc.cuda_graph else r.phase
                key = (gc.mode, phase, gc.block_length, gc.cfg_scale > 0, gc.cuda_graph)
                groups.setdefault(key, []).append(r)
            events = []
            for key, rows in groups.items():
                events += self._run_group(key, rows)
            return events

    def _run_group(self, key: tuple, rows: list[Request]) -> list[StepEvent]:
        mode, group_phase, N, cfg, graph = key
        phases = [PHASES[(mode, group_phase or r.phase)] for r in rows]   # the same cache use, per-row windows
        phase = phases[0]
        shift = self.family.logit_shift
        B = len(rows)
        # each row's query window: its real columns; S, the padded window, is the longest
        real = [r.length if ph.window == "all" else r.length - r.block_start + shift if ph.window == "suffix" else N
                for r, ph in zip(rows, phases)]
        full = [ph.window == "all" for ph in phases]
        segments = None
        if not graph and len(set(full)) > 1:   # refreshes beside steps: full windows first, each kind attends apart
            order = sorted(range(B), key=lambda b: not full[b])
            rows, real, full = [rows[b] for b in order], [real[b] for b in order], [full[b] for b in order]
            nf = sum(full)
            segments = ((nf, max(real[:nf])), (B - nf, max(real[nf:])))
        S = max(real)
        cuda = self.device.type == "cuda"
        Bb = B
        if graph:   # fixed shapes for replay: row buckets of powers of two, windows rounded up
            Bb = 1 << (B - 1).bit_length()
            S = min(-(-S // _COL_QUANTUM) * _COL_QUANTUM, self.st.cols) if phase.window != "block" else S
        slots = [r.slot for r in rows] + [self.st.scratch] * (Bb - B)
        if cuda:   # CUDA: logits for every block position (stable shapes; a mask read would sync)
            sel = np.arange(Bb * N)
        else:      # CPU: logits only for the positions still masked (read between steps, free on the host)
            canvas = self.st.canvas.numpy()
            sel = np.concatenate([b * N + np.flatnonzero(canvas[r.slot, r.block_start:r.block_start + N] ==
                                                          self.mask_id) for b, r in enumerate(rows)])
            if sel.size == 0:
                sel = np.zeros(1, dtype=np.int64)   # a row of masked=False: computed, never committed
        M = int(sel.size)
        # when some rows are shorter than the window, the forward runs its token-wise work on their real columns
        # only (ForwardBatch.pack); CUDA graphs keep the padded shapes, which replay needs (and pad no real column
        # out: S only grows there)
        real = real + [S] * (Bb - B)
        full = full + [full[0]] * (Bb - B)
        plan = self._plan(Bb, S, N, M, phase, cfg, slots, sel, None if graph or sum(real) == Bb * S else real, full,
                          segments)
        t0 = self.timer.start()
        if graph:
            self.graphs.run((mode, group_phase, N, cfg, Bb, S, M), lambda: self.ws.version,
                            lambda: self._device_step(plan), [plan["slots"], plan["slots32"]], self.st.scratch)
        else:
            self._device_step(plan)
        kinds = {"full" if mode == "exact" else "refresh" if f else "step" for f in full[:B]}
        self.timer.stop(kinds.pop() if len(kinds) == 1 else "refresh+step", t0)
        self.forwards += 1
        return self._after_step(rows, full[:B])

    def _plan(self, Bb, S, N, M, phase: Phase, cfg: bool, slots, sel, real, full, segments=None) -> dict:
        """The step's host inputs written into device buffers: slots (Bb,), sel (M,) (flat block positions b * N + n
        that get logits), rowsel (M,) (their batch row), rowS (Bb,) (the query row of each row's first column),
        windowed (Bb,) (1 where the row's window starts at its block, 0 where it is every column: `full`) and, when
        real (each row's real query columns, None: all S) is given, pack (Q,) (ForwardBatch.pack; with guidance the
        second half's too) and, with segments, apack (Q,) (ForwardBatch.attn_pack)."""
        g = self.ws.get
        i64 = torch.int64
        host = dict(slots=np.asarray(slots, dtype=np.int64), sel=np.asarray(sel, dtype=np.int64),
                    windowed=1 - np.asarray(full, dtype=np.int64))
        host["slots32"] = host["slots"].astype(np.int32)
        host["rowsel"] = host["sel"] // N
        if real is None:
            host["rowS"] = np.arange(Bb, dtype=np.int64) * S
        else:
            real = np.asarray(real, dtype=np.int64)
            host["rowS"] = np.concatenate([[0], np.cumsum(real)[:-1]])
            pack = np.concatenate([b * S + np.arange(c) for b, c in enumerate(real)])
            host["pack"] = np.concatenate([pack, pack + Bb * S]) if cfg else pack
            if segments is not None:
                assert not cfg, "guidance runs uncached, one phase: no segments"
                starts, c0 = [], 0   # each row's first attention row: segments follow one another
                for nb, width in segments:
                    starts += [c0 + i * width for i in range(nb)]
                    c0 += nb * width
                host["apack"] = np.concatenate([s0 + np.arange(c) for s0, c in zip(starts, real)])
        p = dict(B=Bb, S=S, N=N, M=M, phase=phase, cfg=cfg, Q=Bb * S if real is None else int(real.sum()),
                 slots=g("eng.slots", (Bb,), i64), slots32=g("eng.slots32", (Bb,), torch.int32),
                 sel=g("eng.sel", (M,), i64), rowsel=g("eng.rowsel", (M,), i64), rowS=g("eng.rowS", (Bb,), i64),
                 windowed=g("eng.windowed", (Bb,), i64), segments=segments,
                 apack=None if segments is None else g("eng.apack", (host["apack"].size,), i64),
                 pack=None if real is None else g("eng.pack", (host["pack"].size,), i64))
        for name, h in host.items():
            if self.device.type == "cuda":
                p[name].copy_(torch.from_numpy(h), non_blocking=True)
            else:
                p[name].numpy()[:] = h
        return p

    def _device_step(self, p: dict) -> None:
        """One forward, confidence, remask and advance for the rows p['slots']: device work only (no host read, and no
        allocation once the workspace is warm), so that it can be captured as a CUDA graph."""
        st, ws, impl = self.st, self.ws, self._impl()
        Bb, S, N, M, Q, phase, cfg = p["B"], p["S"], p["N"], p["M"], p["Q"], p["phase"], p["cfg"]
        pack = p["pack"]                                                             # (Q,) or (2Q,), or None
        i64, i32, f32, f64, b8 = torch.int64, torch.int32, torch.float32, torch.float64, torch.bool

        def g(name, shape, dt=i64):
            return ws.get("eng." + name, shape, dt)

        ar = self._ar
        sl = p["slots"]                                                              # (Bb,)
        bs = torch.take(st.block_start, sl, out=g("bs", (Bb,)))
        P = torch.take(st.prompt_len, sl, out=g("P", (Bb,)))
        key_end = torch.take(st.key_end, sl, out=g("key_end", (Bb,), i32))
        rowbase = torch.mul(sl, self._const(st.cols + 1), out=g("rowbase", (Bb,)))  # first flat index of each row
        q0 = torch.sub(bs, self._const(self.family.logit_shift), out=g("q0", (Bb,)))
        q0.mul_(p["windowed"])                                                       # a full window starts at 0
        cols = torch.add(q0[:, None], ar[:S], out=g("cols", (Bb, S))).clamp_(max=st.cols)   # (Bb, S); st.cols = dump
        flat = torch.add(rowbase[:, None], cols, out=g("flat", (Bb, S)))
        tokens = torch.take(st.canvas, flat, out=g("tokens", (Bb, S)))
        bflat = torch.add(bs[:, None], ar[:N], out=g("bflat", (Bb, N)))
        bflat.add_(rowbase[:, None])                                                 # (Bb, N) the block's flat indices
        block = torch.take(st.canvas, bflat, out=g("block", (Bb, N)))
        # the query row of each block position: rowS[b] + (block_start - q0 - logit_shift) + n
        win = torch.sub(bs, q0, out=g("win0", (Bb,)))
        if self.family.logit_shift:
            win.sub_(self._const(self.family.logit_shift))
        win = torch.add(win[:, None], ar[:N], out=g("win", (Bb, N)))
        win.add_(p["rowS"][:, None])
        logit_rows = torch.take(win, p["sel"], out=g("logit_rows", (M,)))
        if cfg:   # classifier-free guidance: a second half with the prompt masked (exact mode: no cache)
            is_prompt = torch.lt(cols, P[:, None], out=g("is_prompt", (Bb, S), b8))
            tok2, pos2 = g("tokens2", (2 * Bb, S)), g("pos2", (2 * Bb, S))
            tok2[:Bb].copy_(tokens)
            torch.where(is_prompt, self._const(self.mask_id), tokens, out=tok2[Bb:])
            pos2[:Bb].copy_(cols)
            pos2[Bb:].copy_(cols)
            ke2 = g("key_end2", (2 * Bb,), i32)
            ke2[:Bb].copy_(key_end)
            ke2[Bb:].copy_(key_end)
            lr2 = g("logit_rows2", (2 * M,))
            lr2[:M].copy_(logit_rows)
            torch.add(logit_rows, self._const(Q), out=lr2[M:])
            fb = ForwardBatch(tok2, pos2, key_end=ke2, logit_rows=lr2, pack=pack)
        else:
            write_index = None
            if phase.cache_write:
                write_index = flat.view(-1) if pack is None else torch.take(flat, pack, out=g("write_index", (Q,)))
            fb = ForwardBatch(tokens, cols, key_end=key_end, logit_rows=logit_rows, write_index=write_index,
                              kv_rows=p["slots32"] if phase.cache_read else None, cache_read=phase.cache_read,
                              pack=pack, attn_segments=p["segments"], attn_pack=p["apack"],
                              last_window=win, logit_window=p["sel"])   # the last layer: the block, the logit rows
        logits = forward_batch(self.cfg, self.w, fb, cache=self.cache, rope=self.rope, ws=ws,
                               backend=self.backend)                                 # (M or 2M, V)
        V = logits.shape[-1]
        slM = torch.take(sl, p["rowsel"], out=g("slM", (M,)))                        # slot of each selected position
        if cfg:
            cond, unc = logits[:M], logits[M:]
            scale = torch.take(st.cfg_scale, slM, out=g("cfgM", (M,), f32)).add_(self._const(1.0, f32))
            scale = g("cfgM_dt", (M,), cond.dtype).copy_(scale)                     # s + 1 in the logits' dtype
            torch.sub(cond, unc, out=cond)
            cond.mul_(scale[:, None])
            cond.add_(unc)
            logits = cond                                                            # u + (s + 1)(c - u)
        ans = torch.sub(bs, P, out=g("ans0", (Bb,)))                                 # answer position of the block
        ans = torch.add(ans[:, None], ar[:N], out=g("ans", (Bb, N)))
        blk_sel = torch.take(block, p["sel"], out=g("blk_sel", (M,)))
        token, prob = self._confidence(impl)(
            logits.view(M, 1, V), torch.eq(blk_sel, self._const(self.mask_id), out=g("maskedM", (M,), b8)).view(M, 1),
            temperature=torch.take(st.temperature, slM, out=g("tempM", (M,), f32)),
            seed=torch.take(st.seed, slM, out=g("seedM", (M,))),
            offset=torch.take(st.nsteps, slM, out=g("offsetM", (M,))),
            position=torch.take(ans, p["sel"], out=g("posM", (M,))),
            random_confidence=torch.take(st.random_conf, slM, out=g("randM", (M,), b8)),
            special_ids=self.special_ids,
            suppress_mask=torch.take(st.suppress_mask, slM, out=g("supM", (M,), i32)),
            zero_conf_mask=torch.take(st.zero_conf_mask, slM, out=g("zeroM", (M,), i32)),
            out=(g("tokM", (M, 1)), g("probM", (M, 1), f64)))
        tok_b = g("tok_b", (Bb * N,)).fill_(-1)
        prob_b = g("prob_b", (Bb * N,), f64).fill_(float("-inf"))
        tok_b.index_copy_(0, p["sel"], token.view(M))
        prob_b.index_copy_(0, p["sel"], prob.view(M))
        impl.remask(block, tok_b.view(Bb, N), prob_b.view(Bb, N), mask_id=self.mask_id,
                    k=torch.take(st.k, sl, out=g("kB", (Bb,))), rule=torch.take(st.rule, sl, out=g("ruleB", (Bb,), i32)),
                    threshold=torch.take(st.threshold, sl, out=g("thrB", (Bb,), f64)),
                    factor=torch.take(st.factor, sl, out=g("facB", (Bb,), f64)), out=g("count", (Bb,), i32))
        st.canvas.view(-1).index_copy_(0, bflat.view(-1), block.view(-1))
        impl.advance(st.status, st.canvas, sl, st.block_start, st.step, st.nsteps, st.k, st.spb, st.prompt_len,
                     st.length, st.rule, st.early_stop, st.filled, block_length=N, mask_id=self.mask_id,
                     fill_id=self.eos_id, stop_ids=self.stop_ids, skip_slot=st.scratch)

    def _confidence(self, impl):
        """impl.confidence, or under tensor parallelism its sharded form: the logits are this rank's vocabulary shard
        and the ranks merge small per-row states (parallel.confidence)."""
        if self.w.tp is None:
            return impl.confidence
        return functools.partial(parallel.confidence, impl, self.w.tp, full_vocab=self.cfg.padded_vocab)

    def _impl(self):
        if self.backend == "ops":
            from . import ops
            return ops
        return reference

    def _after_step(self, rows: list[Request], full: list[bool]) -> list[StepEvent]:
        """Host bookkeeping between steps: each row's block and phase, its events, and the rows that are done."""
        st = self.st
        read = self.device.type == "cpu" or not all(r.predictable for r in rows)
        status = None
        if read:
            if self.device.type == "cpu":
                status = st.status.numpy()
            else:
                self._host_status.copy_(st.status, non_blocking=True)
                torch.cuda.current_stream().synchronize()
                status = self._host_status.numpy()
        events = []
        for r, refresh in zip(rows, full):
            gc = r.config
            r.nfe += 1
            r.refreshes += refresh
            nxt = r.step_in_block + 1
            if status is not None:
                s = int(status[r.slot])
                block_done, done, early = bool(s & BLOCK_DONE), bool(s & DONE), bool(s & EARLY)
                if r.predictable and (block_done != (nxt == gc.steps_per_block)):
                    raise RuntimeError(f"engine: request {r.id} finished its block at step {nxt} on the device, but its "
                                       f"fixed schedule has {gc.steps_per_block} steps per block")
            else:
                block_done, early = nxt == gc.steps_per_block, False
                done = block_done and r.block + 1 == gc.num_blocks
            if block_done:
                r.block, r.step_in_block = r.block + 1, 0
            else:
                r.step_in_block = nxt
            r.stopped_early = early
            ev = StepEvent(request=r, nfe=r.nfe, refresh=refresh, done=done)
            if r.events:
                answer = st.canvas[r.slot, r.prompt_len:r.length].tolist()
                before = r.last if r.last is not None else [self.mask_id] * len(answer)
                end = len(answer)
                if early:   # the EOS written after the first stop id by early stop was not committed by this step
                    end = next(j for j, t in enumerate(answer) if t in self.stop_ids) + 1
                ev.positions = [j for j in range(end) if before[j] != answer[j] and answer[j] != self.mask_id]
                ev.tokens = [answer[j] for j in ev.positions]
                ev.canvas = answer
                r.last = answer
            if done:
                self._finish(r)
            r.pending.append(ev)
            events.append(ev)
        return events
