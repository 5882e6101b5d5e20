"""Exact mode against an independent reimplementation of the official generate.py loop (tests/llada_oracle.py)."""
import pytest
import torch

from llada_rt.testing import write_checkpoint
from llada_oracle import PlainLLaDA, official_generate
from llada_rt import Runtime
from llada_rt import reference
from llada_rt.generation_config import GenerationConfigError
from conftest import requires_cuda


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return {seed: write_checkpoint(tmp_path_factory.mktemp(f"gen{seed}"), seed=seed) for seed in (0, 3)}


@pytest.fixture(scope="module")
def runtimes(ckpts):
    return {seed: (Runtime(p, device="cpu", dtype=torch.float32), PlainLLaDA(p, dtype=torch.float32))
            for seed, p in ckpts.items()}


def philox_draws(seed, prompt_len):
    """The runtime's random stream, laid out as the official loop consumes it (block rows only matter): keyed by the
    request's seed, the answer position and the request's own step count (nfe - 1), the same for every batch row."""
    def uniform(nfe, kind, bs, be, shape):
        pos = torch.arange(bs - prompt_len, be - prompt_len)                                # (N,) answer positions
        out = torch.full(tuple(shape), 0.5, dtype=torch.float32)
        if kind == "gumbel":
            out[:, bs:be] = reference.philox_uniform(seed, nfe - 1, pos[:, None], torch.arange(shape[2]))
        else:
            out[:, bs:be] = reference.philox_uniform(seed, nfe - 1, pos, reference.RANDOM_CONFIDENCE_COLUMN)
        return out
    return uniform


# (ckpt seed, batch, prompt len, gen_length, block_length, steps, options)
CASES = [
    (0, 1, 9, 16, 16, 16, {}),
    (0, 1, 9, 16, 8, 16, {}),
    (0, 1, 9, 16, 4, 8, {}),
    (0, 1, 5, 24, 8, 12, {}),
    (0, 1, 12, 32, 32, 32, {}),
    (0, 1, 12, 32, 8, 16, {"logits_eos_inf": True}),
    (0, 1, 12, 32, 8, 32, {"confidence_eos_eot_inf": True}),
    (0, 1, 7, 16, 4, 16, {"logits_eos_inf": True, "confidence_eos_eot_inf": True}),
    (0, 2, 9, 16, 8, 16, {}),
    (0, 3, 6, 24, 8, 24, {"confidence_eos_eot_inf": True}),
    (0, 2, 10, 16, 16, 8, {"logits_eos_inf": True}),
    (0, 1, 9, 16, 8, 16, {"remasking": "random"}),
    (0, 2, 9, 16, 4, 8, {"remasking": "random", "seed": 7}),
    (0, 1, 9, 16, 8, 16, {"temperature": 0.7, "seed": 3}),
    (0, 2, 8, 16, 8, 16, {"temperature": 1.0, "seed": 11, "confidence_eos_eot_inf": True}),
    (0, 1, 9, 16, 8, 16, {"cfg_scale": 1.0}),
    (0, 2, 9, 16, 16, 16, {"cfg_scale": 0.5, "logits_eos_inf": True}),
    (3, 1, 9, 16, 16, 16, {}),
    (3, 1, 11, 32, 8, 32, {}),
    (3, 1, 11, 32, 16, 8, {"confidence_eos_eot_inf": True}),
    (3, 2, 4, 16, 8, 16, {"logits_eos_inf": True}),
    (3, 1, 9, 24, 24, 12, {"remasking": "random", "seed": 2}),
    (3, 3, 13, 16, 4, 16, {}),
    (3, 1, 9, 16, 8, 16, {"temperature": 0.5, "seed": 5, "logits_eos_inf": True}),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_exact_mode_matches_official_loop(runtimes, case):
    seed, B, P, G, N, S, opts = case
    rt, plain = runtimes[seed]
    g = torch.Generator().manual_seed(1000 + P * 7 + G + N + S)
    prompts = torch.randint(0, 100, (B, P), generator=g)
    got = rt.generate(prompts, gen_length=G, block_length=N, steps=S, **opts)
    eos_id, eot_id = rt.tokenizer.eos_id, rt.tokenizer.eot_id
    want, nfe = official_generate(
        lambda x, am: plain(x, am), prompts, steps=S, gen_length=G, block_length=N,
        temperature=opts.get("temperature", 0.0), cfg_scale=opts.get("cfg_scale", 0.0),
        remasking=opts.get("remasking", "low_confidence"), mask_id=rt.config.mask_token_id, eos_id=eos_id,
        eot_id=eot_id, logits_eos_inf=opts.get("logits_eos_inf", False),
        confidence_eos_eot_inf=opts.get("confidence_eos_eot_inf", False),
        uniform=philox_draws(opts.get("seed", 0), P))
    diff = (got.canvas != want).sum().item()
    print(f"case {case}: {diff} of {want.numel()} canvas tokens differ; nfe {got.nfe} vs {nfe}; "
          f"EOS/EOT in answer: {int(((want == eos_id) | (want == eot_id))[:, P:].sum())}")
    assert got.nfe == nfe == S
    assert torch.equal(got.canvas, want)
    assert (got.canvas[:, P:] != rt.config.mask_token_id).all()


def test_padded_row_behaves_like_prompt_alone(runtimes):
    rt, _ = runtimes[0]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (5, 17, 11)]
    opts = dict(gen_length=16, block_length=8, steps=16, confidence_eos_eot_inf=True)
    batch = rt.generate(prompts, **opts)
    for b, p in enumerate(prompts):
        alone = rt.generate(p, **opts)
        print(b, alone.token_ids[0], batch.token_ids[b])
        assert torch.equal(alone.canvas[0, len(p):], batch.canvas[b, batch.prompt_len:])


def test_text_results(runtimes):
    rt, _ = runtimes[0]
    r = rt.generate(["Hello", "Hi there"], gen_length=16, block_length=8)
    assert len(r.texts) == 2 and r.nfe == 16 and r.steps == 16
    stops = set(rt.tokenizer.stop_ids)
    for ids, row in zip(r.token_ids, r.canvas[:, r.prompt_len:].tolist()):
        assert not stops & set(ids) and row[: len(ids)] == ids
    assert r.timings["total_s"] >= r.timings["refresh_s"] > 0 and r.timings["step_s"] == 0
    assert r.tokens_per_forward == pytest.approx(1.0)


@pytest.mark.parametrize("opts,match", [
    ({"gen_length": 30, "block_length": 8}, "not a multiple of block_length"),
    ({"gen_length": 32, "block_length": 8, "steps": 6}, "not divisible by the number of blocks"),
    ({"gen_length": 608}, "beyond the model's max_sequence_length of 512"),
    ({"remasking": "lowest"}, "remasking='lowest' is unknown"),
    ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
    ({"gen_length": 0}, "gen_length must be a positive integer"),
    ({"block_len": 8}, "unknown generation option"),
    ({"mode": "turbo"}, "mode='turbo' is unknown"),
])
def test_impossible_settings(runtimes, opts, match):
    rt, _ = runtimes[0]
    with pytest.raises(GenerationConfigError, match=match):
        rt.generate("Hello", **opts)


def test_bad_prompts(runtimes, tmp_path):
    rt, _ = runtimes[0]
    with pytest.raises(ValueError, match="mask token"):
        rt.generate([1, 2, rt.config.mask_token_id])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rt.generate([1, 2, 10**7])
    with pytest.raises(ValueError, match="prompt must be"):
        rt.generate([])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Runtime(tmp_path / "nope")


@pytest.mark.cuda
@requires_cuda
def test_cuda_matches_cpu(ckpts):
    """fp32 on the GPU (confidence and remask kernels in the loop) gives the CPU's tokens; bf16 with the attention
    kernel agrees with bf16 on the CPU on most positions."""
    prompts = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(9))
    opts = dict(gen_length=32, block_length=8, steps=32)
    for dtype, min_agree in ((torch.float32, 1.0), (torch.bfloat16, 0.8)):
        cpu = Runtime(ckpts[0], device="cpu", dtype=dtype)
        gpu = Runtime(ckpts[0], device="cuda", dtype=dtype)
        for mode in ("exact", "dual"):
            a = cpu.generate(prompts, mode=mode, **opts).canvas
            b = gpu.generate(prompts, mode=mode, **opts).canvas.cpu()
            agree = (a == b).float().mean().item()
            print(dtype, mode, f"{agree:.1%} of canvas tokens agree")
            assert agree >= min_agree
