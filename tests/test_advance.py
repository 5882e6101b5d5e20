"""ops.advance (CPU kernel, and the CUDA kernel under the SIMT emulator) against reference.advance on random engine
states: fixed and dynamic rules, block ends, the N-step cap, early stop with and without a mask before the stop id."""
import pytest
import torch

from llada_rt import ops, reference

MASK, EOS, EOT = 90, 91, 92
STATE = ("status", "canvas", "slots", "block_start", "step", "nsteps", "k", "spb", "prompt_len", "length", "rule",
         "early_stop", "filled")


def random_state(R, T, N, seed):
    g = torch.Generator().manual_seed(seed)
    st = {}
    st["prompt_len"] = torch.randint(1, 6, (R,), generator=g)
    nblocks = torch.randint(1, 4, (R,), generator=g)
    st["length"] = (st["prompt_len"] + nblocks * N).clamp(max=T)
    st["length"] = st["prompt_len"] + (st["length"] - st["prompt_len"]) // N * N
    blk = (torch.rand(R, generator=g) * nblocks.float()).long().clamp(max=nblocks - 1)
    st["block_start"] = st["prompt_len"] + blk * N
    st["spb"] = torch.tensor([[1, 2, 4, N][i % 4] for i in range(R)])
    st["step"] = (torch.rand(R, generator=g) * st["spb"].float()).long()
    st["nsteps"] = torch.randint(0, 50, (R,), generator=g)
    st["k"] = torch.zeros(R, dtype=torch.int64)
    st["rule"] = torch.randint(0, 3, (R,), generator=g, dtype=torch.int32)
    st["early_stop"] = torch.rand(R, generator=g) < 0.6
    st["filled"] = torch.zeros(R, dtype=torch.int32)
    st["status"] = torch.full((R,), -1, dtype=torch.int32)
    canvas = torch.randint(0, 80, (R, T), generator=g)
    for r in range(R):   # masks after a random committed prefix, some stop ids in the answer
        P, L = int(st["prompt_len"][r]), int(st["length"][r])
        cut = int(torch.randint(P, L + 1, (1,), generator=g))
        canvas[r, cut:L] = MASK
        for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
            c = int(torch.randint(P, L, (1,), generator=g))
            canvas[r, c] = [EOS, EOT][c % 2]
        if r % 5 == 0:
            canvas[r, P:L] = MASK            # nothing committed yet
        if r % 7 == 1:
            st["step"][r] = N - 1            # at the N-step cap of the dynamic rules
    st["canvas"] = canvas
    st["slots"] = torch.randperm(R, generator=g)[: max(1, R - 2)]
    return st


def run(impl, st, N, skip=-1):
    st = {k: v.clone() for k, v in st.items()}
    impl(*[st[n] for n in STATE], block_length=N, mask_id=MASK, fill_id=EOS, stop_ids=[EOS, EOT], skip_slot=skip)
    return st


def emu_advance(*tensors, block_length, mask_id, fill_id, stop_ids, skip_slot):
    from llada_rt import _emu
    _emu.advance([t.data_ptr() for t in tensors], tensors[1].stride(0), tensors[2].shape[0], block_length, mask_id,
                 fill_id, list(stop_ids), skip_slot)


IMPLS = {"cpu": ops.advance, "emu": emu_advance}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("R,T,N,seed", [(1, 12, 4, 0), (9, 40, 8, 1), (17, 80, 16, 2), (33, 200, 32, 3),
                                        (5, 300, 1, 4), (6, 1200, 130, 5)])
def test_advance_matches_reference(impl, R, T, N, seed):
    if impl == "emu":
        pytest.importorskip("llada_rt._emu")
    st = random_state(R, T, N, seed)
    skip = int(st["slots"][0]) if seed % 2 else -1
    want = run(reference.advance, st, N, skip)
    got = run(IMPLS[impl], st, N, skip)
    bad = [n for n in STATE if not torch.equal(want[n], got[n])]
    print(impl, R, T, N, "status", want["status"].tolist(), "mismatches", bad)
    assert not bad
    stepped = [s for s in st["slots"].tolist() if s != skip]
    assert all(int(want["status"][s]) >= 0 for s in stepped)   # every stepped row got a status
    if skip >= 0:
        assert int(want["status"][skip]) == -1                   # the skipped slot was left alone


def test_status_bits_and_early_stop_fill():
    N, T = 4, 16
    st = random_state(3, T, N, 9)
    for n in ("prompt_len", "block_start"):
        st[n][:] = 2
    st["length"][:] = 10
    st["spb"][:] = 4
    st["step"][:] = 3
    st["rule"][:] = 0
    st["early_stop"][:] = True
    st["slots"] = torch.tensor([0, 1, 2])
    st["canvas"][:, 2:10] = torch.tensor([[5, 6, EOS, MASK, MASK, MASK, MASK, MASK],     # done early: fill after EOS
                                          [MASK, 6, EOS, 7, 7, 7, 7, 7],                  # a mask before the EOS
                                          [5, 6, 7, 8, 9, 9, 9, 9]])                      # no stop id at all
    got = run(ops.advance, st, N)
    print(got["status"].tolist(), got["filled"].tolist(), got["canvas"][:, 2:10].tolist())
    assert got["status"].tolist() == [1 | 2 | 4, 1, 1]       # all three finish their block (4th of 4 steps)
    assert got["canvas"][0, 5:10].tolist() == [EOS] * 5 and int(got["filled"][0]) == 5
    assert got["canvas"][1, 2:10].tolist() == st["canvas"][1, 2:10].tolist()
    assert got["block_start"].tolist() == [6, 6, 6] and got["step"].tolist() == [0, 0, 0]
    assert got["nsteps"].tolist() == (st["nsteps"] + 1).tolist()


def test_bad_state_is_a_clear_error():
    st = random_state(3, 20, 4, 0)
    st["rule"] = st["rule"].long()
    with pytest.raises(ops.OpInputError, match="rule must be torch.int32"):
        run(ops.advance, st, 4)
