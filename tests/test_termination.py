"""Issue 19: every decode terminates. A checkpoint doctored so that the mask id is often its most likely token: in
exact mode with the fixed schedule the official sampler's behaviour is kept (the "commit" leaves the position masked,
and the result reports it), every other mode never chooses the mask id, and no mode runs more than block_length
steps per block."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from llada_oracle import PlainLLaDA, official_generate
from llada_rt import Runtime
from llada_rt.testing import SMALL_VOCAB, write_checkpoint

MODES = [
    dict(mode="exact"), dict(mode="prefix"), dict(mode="dual"),
    dict(mode="exact", threshold=0.3), dict(mode="prefix", threshold=0.9), dict(mode="dual", threshold=0.9),
    dict(mode="dual", factor=1.0), dict(mode="exact", threshold=0.9, early_stop=True),
    dict(mode="dual", temperature=0.8, seed=3),
]


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (5 + 3 * i,), generator=g).tolist() for i in range(n)]


@pytest.fixture(scope="module")
def doctored(tmp_path_factory):
    """The LM head row of the mask id becomes 40x the row of the token the model predicts most: wherever that token
    would win, the mask id wins by far."""
    ckpt = write_checkpoint(tmp_path_factory.mktemp("mask_head"), seed=4, vocab=SMALL_VOCAB, eos_scale=0.13)
    rt = Runtime(ckpt, device="cpu")
    base = rt.generate(_prompts(4), gen_length=16, block_length=8, steps=16)
    answers = base.canvas[:, base.prompt_len:].reshape(-1)
    answers = answers[~torch.isin(answers, torch.tensor(rt.tokenizer.stop_ids))]
    common = answers.mode().values.item()
    sd = load_file(str(ckpt / "model.safetensors"))
    head = sd["model.transformer.ff_out.weight"]
    head[rt.config.mask_token_id] = 40 * head[common]
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return ckpt


@pytest.mark.parametrize("opts", MODES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_mode_terminates_on_a_model_that_predicts_the_mask_id(doctored, opts):
    rt = Runtime(doctored, device="cpu")
    G, N = 24, 8
    res = rt.generate(_prompts(3, seed=1), gen_length=G, block_length=N, steps=G, **opts)
    mask = rt.config.mask_token_id
    print(opts, "nfe per row", res.nfe_per_row, "masks left per row", res.masked_left)
    assert all(n <= G for n in res.nfe_per_row)             # never more than block_length steps per block
    if opts["mode"] == "exact" and "threshold" not in opts:
        assert sum(res.masked_left) > 0                      # the doctoring bites, and the result says so
    else:
        assert res.masked_left == [0, 0, 0] and all(mask not in ids for ids in res.token_ids)
        assert not (res.canvas[:, res.prompt_len:] == mask).any()


def test_exact_mode_keeps_the_official_behaviour_on_such_a_model(doctored):
    """One block (the official loop would revisit masks left by earlier blocks; within a block both agree)."""
    rt = Runtime(doctored, device="cpu")
    plain = PlainLLaDA(doctored, dtype=torch.float32)
    prompts = torch.tensor(_prompts(1, seed=2))
    got = rt.generate(prompts, gen_length=16, block_length=16, steps=16)
    want, nfe = official_generate(lambda x, am: plain(x, am), prompts, steps=16, gen_length=16, block_length=16,
                                  mask_id=rt.config.mask_token_id, eos_id=rt.tokenizer.eos_id,
                                  eot_id=rt.tokenizer.eot_id)
    print("masks left", got.masked_left, "canvas equal", torch.equal(got.canvas, want))
    assert got.masked_left[0] > 0 and torch.equal(got.canvas, want) and got.nfe == nfe
