"""Tensor parallelism on the CPU over gloo: 2 processes started here with torchrun's environment (tests/tp_worker.py)
against one process: logits within fp32 tolerance, the same tokens in exact, prefix and dual mode (tie-robust), half
the weight bytes per rank, the CLI through torchrun, and the clear error for sizes that do not divide."""
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from llada_rt import Runtime, ops
from llada_rt.config import load_config
from llada_rt.model import forward
from llada_rt.parallel import TPError, check_divisible
from llada_rt.runtime import SHIPPED_MODEL
from llada_rt.testing import SMALL_VOCAB, tiny_config, write_checkpoint
from llada_rt.weights import quantize_checkpoint

SHIPPED = SHIPPED_MODEL
WORKER = Path(__file__).resolve().parent / "tp_worker.py"
RANKS = 2
GEN = dict(gen_length=32, block_length=8, steps=16)
RUNS = {"exact": dict(GEN, mode="exact"), "prefix": dict(GEN, mode="prefix"), "dual": dict(GEN, mode="dual"),
        "exact_cfg": dict(GEN, mode="exact", cfg_scale=1.0),
        # random weights collapse onto one token greedily: sampling exercises every mode on varied tokens
        "exact_temperature": dict(GEN, mode="exact", temperature=0.7, seed=3),
        "prefix_temperature": dict(GEN, mode="prefix", temperature=0.7, seed=4),
        "dual_temperature": dict(GEN, mode="dual", temperature=0.7, seed=5),
        "dual_threshold": dict(GEN, mode="dual", threshold=0.5),
        # EOS/EOT (rank 1's shard of LLaDA's vocabulary) suppressed or zero-confidence; random remasking
        "exact_eos": dict(GEN, mode="exact", logits_eos_inf=True, confidence_eos_eot_inf=True),
        "prefix_random": dict(GEN, mode="prefix", remasking="random", seed=7),
        # a batch of prompts of different lengths (left padding, per-row positions) in one sharded forward
        "prefix_batch": dict(GEN, mode="prefix", temperature=0.7, seed=6, prompt=["reverse: abc", "sort: cab ba"])}
LOGIT_TOL = 1e-5    # of max |logit|: fp32 with the sums of the row-parallel projections in another order


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_env(rank: int, size: int, port: int) -> dict:
    """What torchrun sets for rank `rank` of a one-node world (the threads: one per rank on shared cores)."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size),
            "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1"}


def run_world(spec: dict, tmp: Path, size: int = RANKS, timeout: int = 300) -> list[dict]:
    """Runs tp_worker.py on `spec` in a world of `size` processes; each rank's saved results."""
    (tmp / "spec.json").write_text(json.dumps(spec))
    port = _free_port()
    # the llada_rt this test imports (the installed package, or PYTHONPATH's), not the checkout's by its location
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp / "spec.json"), str(tmp / f"rank{r}.pt")],
                              env=world_env(r, size, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=tempfile.gettempdir()) for r in range(size)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{out[-4000:]}"
    return [torch.load(tmp / f"rank{r}.pt") for r in range(size)]


class TieRecorder:
    """Wraps ops.confidence in the single-process run: the smallest top-2 logit gap of a masked row, and the smallest
    gap between two masked positions' confidences of one step, over the whole generation (the decisions that an fp32
    difference of the sharded run could flip)."""

    def __init__(self):
        self.logit_gap, self.prob_gap, self.scale = float("inf"), float("inf"), 0.0

    def __call__(self, logits, masked, **kw):
        token, prob = self.inner(logits, masked, **kw)
        rows = masked.view(-1)
        if rows.any():
            top2 = logits.view(-1, logits.shape[-1])[rows].float().topk(2, dim=-1).values
            self.logit_gap = min(self.logit_gap, float((top2[:, 0] - top2[:, 1]).min()))
            self.scale = max(self.scale, float(top2[:, 0].abs().max()))
            p = prob.view(-1)[rows].sort().values
            if p.numel() > 1:
                self.prob_gap = min(self.prob_gap, float((p[1:] - p[:-1]).min()))
        return token, prob


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A random GQA checkpoint with LLaDA's vocabulary (3 shards), its int8 copy, a tied one (the LM head is the
    embedding shard), and the shipped model."""
    base = tmp_path_factory.mktemp("tp")
    rand = write_checkpoint(base / "random", seed=5, shards=3, n_kv_heads=2)
    quantize_checkpoint(rand, base / "int8")
    tied = write_checkpoint(base / "tied", seed=6, vocab=SMALL_VOCAB, weight_tying=True)
    return {"random": rand, "int8": base / "int8", "tied": tied, "small": SHIPPED}


def _ids(ckpt: Path) -> list[list[int]]:
    cfg = load_config(ckpt)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(cfg.vocab_size, 90), (2, 29), generator=g)
    ids[0, 17:] = cfg.mask_token_id
    ids[1, 5:11] = cfg.mask_token_id
    return ids.tolist()


PROMPT = "reverse: abc"
LIKELIHOOD = dict(prompts=["reverse: abc", "sort: cab"], answers=["cba", "abc"], mc_num=8, batch_size=4, cfg_scale=0.5)


@pytest.fixture(scope="module")
def world(checkpoints, tmp_path_factory):
    spec = {"load_peak": str(checkpoints["random"]), "jobs": [
        {"name": "random", "ckpt": str(checkpoints["random"]), "ids": _ids(checkpoints["random"]), "prompt": PROMPT,
         "generate": RUNS},
        {"name": "int8", "ckpt": str(checkpoints["int8"]), "ids": _ids(checkpoints["int8"])},
        {"name": "tied", "ckpt": str(checkpoints["tied"]), "ids": _ids(checkpoints["tied"])},
        {"name": "bf16", "ckpt": str(checkpoints["small"]), "ids": _ids(checkpoints["small"]),
         "runtime": {"dtype": "bfloat16"}},
        {"name": "small", "ckpt": str(checkpoints["small"]), "ids": _ids(checkpoints["small"]), "prompt": PROMPT,
         "generate": RUNS, "likelihood": LIKELIHOOD},
    ]}
    return run_world(spec, tmp_path_factory.mktemp("tp_world"))


@pytest.fixture(scope="module")
def single(checkpoints):
    """One process, whole model: logits, tokens per run with their recorded near-ties, weight bytes."""
    torch.set_num_threads(1)
    out = {}
    with torch.inference_mode():
        for name in ("random", "int8", "tied", "small", "bf16"):
            ckpt = checkpoints["small" if name == "bf16" else name]
            rt = Runtime(ckpt, device="cpu", dtype="bfloat16" if name == "bf16" else None)
            r = {"logits": forward(rt.config, rt.weights, torch.tensor(_ids(ckpt))),
                 "weight_bytes": sum(t.numel() * t.element_size() for t in rt.weights.tensors()), "tokens": {}}
            if name == "int8":   # the float original, for the scale of int8's own error
                r["fp32_logits"] = forward(rt.config, Runtime(checkpoints["random"], device="cpu").weights,
                                           torch.tensor(_ids(checkpoints[name])))
            if name == "small":
                r["likelihood"] = rt.log_likelihood(**LIKELIHOOD).estimates
            if name in ("random", "small"):
                for run, options in RUNS.items():
                    rec = TieRecorder()
                    rec.inner = ops.confidence
                    ops.confidence = rec
                    try:
                        options = dict(options)
                        r["tokens"][run] = (rt.generate(options.pop("prompt", PROMPT), **options).token_ids, rec)
                    finally:
                        ops.confidence = rec.inner
            out[name] = r
    return out


@pytest.mark.parametrize("name", ["random", "tied", "small"])
def test_logits_match_one_process(world, single, name):
    """The ranks' logit shards, concatenated over the vocabulary, equal one process's logits in fp32."""
    got = torch.cat([w[name]["logits"] for w in world], dim=-1)                  # (B, S, V)
    ref = single[name]["logits"]
    err = float((got - ref).abs().max() / ref.abs().max())
    print(f"{name}: {RANKS} ranks vs 1 process: max |logit error| {err:.2e} of max |logit| "
          f"({float(ref.abs().max()):.2f}); shard shape {tuple(world[0][name]['logits'].shape)}")
    assert got.shape == ref.shape and err < LOGIT_TOL


def test_bfloat16_logits(world, single):
    """bf16 weights and activations (gloo all-reduces bf16, so the partial sums round once more): within the bf16
    runtime's own error of one process's bf16 logits."""
    got = torch.cat([w["bf16"]["logits"] for w in world], dim=-1).float()
    ref, fp32 = single["bf16"]["logits"].float(), single["small"]["logits"]
    err = float((got - ref).abs().max() / ref.abs().max())
    own = float((ref - fp32).abs().max() / fp32.abs().max())
    print(f"bf16: {RANKS} ranks vs 1 process {err:.2e}, bf16 vs fp32 in one process {own:.2e} (of max |logit|)")
    assert err < 2 * own


def test_int8_checkpoint_logits(world, single):
    """int8 weights split with their scales: the sharded logits are within the int8 runtime's own error of one
    process's (the CPU int8 kernel quantizes activations per row over its K, which a row-parallel split halves)."""
    got = torch.cat([w["int8"]["logits"] for w in world], dim=-1)
    ref, fp32 = single["int8"]["logits"], single["int8"]["fp32_logits"]
    err = float((got - ref).abs().max() / ref.abs().max())
    own = float((ref - fp32).abs().max() / fp32.abs().max())
    print(f"int8: {RANKS} ranks vs 1 process {err:.2e}, int8 vs fp32 in one process {own:.2e} (of max |logit|)")
    assert err < max(2 * own, LOGIT_TOL)


@pytest.mark.parametrize("name", ["random", "small"])
@pytest.mark.parametrize("run", list(RUNS))
def test_tokens_match_one_process(world, single, name, run):
    """Every rank commits the same tokens, and they equal one process's; a difference is allowed only where the
    single-process run met a near-tie (top-2 logit gap or two confidences within the fp32 difference)."""
    ref, rec = single[name]["tokens"][run]
    got = [w[name]["tokens"][run] for w in world]
    print(f"{name} {run}: 1 process {ref}\n  ranks {got[0]}\n  smallest top-2 logit gap {rec.logit_gap:.3e} "
          f"(max |logit| {rec.scale:.2f}), smallest confidence gap {rec.prob_gap:.3e}")
    assert all(g == got[0] for g in got), "ranks out of lockstep"
    if got[0] != ref:
        near_tie = rec.logit_gap <= 10 * LOGIT_TOL * rec.scale or rec.prob_gap <= 1e-5
        assert near_tie and "temperature" not in run, "tokens differ without a near-tie"


def test_log_likelihood(world, single):
    """log_likelihood under tensor parallelism (a distributed log-softmax over the vocabulary shards, CFG per shard)
    equals one process's estimate: the same masks, fp32 logits."""
    ref = single["small"]["likelihood"]
    for w in world:
        err = max(abs(a - b) for a, b in zip(w["small"]["likelihood"], ref))
        print(f"rank {w['small']['rank']}: {w['small']['likelihood']} vs 1 process {ref}: max error {err:.2e}")
        assert err < 1e-4 * max(1.0, max(abs(x) for x in ref))


@pytest.mark.parametrize("name", ["random", "small"])
def test_rank_holds_half_the_weights(world, single, name):
    full = single[name]["weight_bytes"]
    per = [w[name]["weight_bytes"] for w in world]
    print(f"{name}: weight bytes 1 process {full}, per rank {per} ({[round(p / full, 4) for p in per]}); "
          f"max RSS per rank {[w['maxrss_kib'] for w in world]} KiB (torch itself included)")
    # everything but the norms (replicated, d per layer twice) is split
    assert all(0.5 <= p / full < 0.51 for p in per)


def test_load_peak_memory_per_rank(world, checkpoints, tmp_path):
    """Each rank's resident-set peak while loading is about 1/N of one process's: the slices are read straight from
    the file (safetensors get_slice), never a whole tensor; one process is the same worker in a world of one."""
    one = run_world({"load_peak": str(checkpoints["random"])}, tmp_path, size=1)[0]["load_peak"]
    per = [w["load_peak"] for w in world]
    print(f"load peak RSS: 1 process {one['peak_bytes'] / 2**20:.1f} MiB ({one['weight_bytes'] / 2**20:.1f} MiB of "
          f"weights); per rank {[round(p['peak_bytes'] / 2**20, 1) for p in per]} MiB "
          f"({[round(p['weight_bytes'] / 2**20, 1) for p in per]} MiB of weights)")
    # half, plus a fixed per-process cost (file handles, allocator arenas: ~10 MiB measured); reading a whole tensor
    # and slicing it would add the 31 MiB LM head on top
    assert all(p["peak_bytes"] < 0.5 * one["peak_bytes"] + 12 * 2**20 for p in per)


def test_collectives_are_counted(world):
    """Bytes all-reduced per forward: the embedding and 2 per layer, of (rows, d) each in the activations' dtype
    (the last layer's two over the logit rows only, ForwardBatch.last_window)."""
    cfg = load_config(SHIPPED)
    reduced, gathered, nfe = world[0]["small"]["collective_bytes"]["dual"]
    print(f"small dual: {reduced} bytes all-reduced, {gathered} bytes all-gathered over {nfe} forwards")
    rows = reduced / 4 / cfg.d_model   # rows of all all-reduces of all forwards
    assert nfe > 0 and reduced > 0 and rows == int(rows) and rows >= nfe * (2 * cfg.n_layers + 1) and gathered > 0


def test_sizes_that_do_not_divide(monkeypatch, tmp_path):
    """check_divisible names each dimension that does not split and the rank counts that would; a Runtime inside a
    torchrun world of that size fails with it before any rendezvous."""
    cfg = tiny_config(SMALL_VOCAB, mlp_hidden_size=97)
    with pytest.raises(TPError) as e:
        check_divisible(cfg, 2)
    print(e.value)
    assert "mlp_hidden_size=97" in str(e.value) and "does not split at all" in str(e.value)
    cfg = tiny_config(SMALL_VOCAB, n_heads=4, n_kv_heads=2)
    with pytest.raises(TPError) as e:
        check_divisible(cfg, 4)
    print(e.value)
    assert "n_kv_heads=2" in str(e.value) and "splits over 2 ranks" in str(e.value)
    check_divisible(cfg, 2)
    odd = write_checkpoint(tmp_path / "odd", vocab=SMALL_VOCAB, n_heads=2, n_kv_heads=2, d_model=64,
                           mlp_hidden_size=97)
    for k, v in world_env(0, 2, _free_port()).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(TPError, match="mlp_hidden_size=97"):
        Runtime(odd, device="cpu")


def _cli(args: list[str], launcher: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, "-m", "llada_rt.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=tempfile.gettempdir(), env=env)


def test_cli_through_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m llada_rt.cli generate ...`: rank 0 alone prints, the text equal to one
    process's; sizes that do not divide end every rank with the clear error (printed once)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["generate", "--device", "cpu", "--gen-length", "16", "--block-length", "8", "--steps", "8",
            "--mode", "dual", PROMPT]
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(RANKS), "--master-port", str(_free_port())]
    one = _cli(args, [], env)
    tp = _cli(args, launcher, env)
    print(f"1 process: {one.stdout!r}\ntorchrun: {tp.stdout!r}\ntorchrun stderr: {tp.stderr[-500:]!r}")
    assert one.returncode == 0 and tp.returncode == 0, tp.stderr
    assert tp.stdout == one.stdout and tp.stdout.strip()          # one copy of the answer: rank 1 printed nothing
    odd = write_checkpoint(tmp_path / "odd", vocab=SMALL_VOCAB, n_heads=2, n_kv_heads=2, d_model=64,
                           mlp_hidden_size=97)
    launcher[-1] = str(_free_port())
    bad = _cli(["generate", "--model", str(odd), *args[1:]], launcher, env)
    print(bad.stderr[-800:])
    # one error line (rank 0's), and no traceback through llada_rt (torchrun prints its own ChildFailedError)
    assert bad.returncode != 0 and bad.stderr.count("llada-rt generate: error:") == 1
    assert not any(line.strip().startswith("File") and "llada_rt" in line for line in bad.stderr.splitlines())
    assert "mlp_hidden_size=97 is not" in bad.stderr
