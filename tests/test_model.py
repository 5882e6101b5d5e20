"""The LLaDA forward against an independent plain implementation of modeling_llada's math."""
import pytest
import torch

from llada_oracle import PlainLLaDA
from llada_rt.config import load_config
from llada_rt.model import forward
from llada_rt.weights import load_weights


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    cfg = load_config(tiny_ckpt)
    return cfg, load_weights(tiny_ckpt, cfg, "cpu", torch.float32), PlainLLaDA(tiny_ckpt)


@pytest.mark.parametrize("backend", ["torch", "ops"])
@pytest.mark.parametrize("B,L", [(1, 1), (1, 37), (3, 19)])
def test_forward_matches_plain_math(loaded, backend, B, L):
    cfg, w, plain = loaded
    ids = torch.randint(0, 100, (B, L))
    ids[:, -L // 3:] = cfg.mask_token_id
    got = forward(cfg, w, ids, backend=backend)
    ref = plain(ids).float()
    err = (got - ref).abs().max().item()
    print(f"B={B} L={L} {backend}: max |logit err| {err:.3g} (logit scale {ref.abs().max():.3g})")
    assert got.shape == (B, L, cfg.embedding_size)
    assert err < 1e-4


@pytest.mark.parametrize("backend", ["torch", "ops"])
def test_forward_rows_only(loaded, backend):
    cfg, w, _ = loaded
    ids = torch.randint(0, 100, (2, 40))
    full = forward(cfg, w, ids, backend=backend)
    part = forward(cfg, w, ids, rows=slice(25, 33), backend=backend)
    print("rows err", (full[:, 25:33] - part).abs().max().item())
    assert part.shape == (2, 8, cfg.embedding_size)
    torch.testing.assert_close(part, full[:, 25:33], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "ops"])
def test_left_padding_with_key_mask_and_row_positions(loaded, backend):
    """A left-padded row with key_start and shifted positions gives the logits of the prompt alone."""
    cfg, w, plain = loaded
    alone = torch.randint(0, 100, (1, 21))
    pad = 6
    padded = torch.cat([torch.full((1, pad), cfg.pad_token_id), alone], 1)
    positions = (torch.arange(27) - pad).clamp(min=0)[None]
    got = forward(cfg, w, padded, positions, torch.tensor([pad], dtype=torch.int32), backend=backend)[:, pad:]
    ref = forward(cfg, w, alone, backend=backend)
    err = (got - ref).abs().max().item()
    print("padded vs alone", err)
    assert err < 1e-4
    # and the key-padding semantics match the updated HF file (mask given, absolute positions)
    am = torch.ones(1, 27, dtype=torch.long)
    am[:, :pad] = 0
    hf = plain(padded, am).float()[:, pad:]
    abs_pos = forward(cfg, w, padded, None, torch.tensor([pad], dtype=torch.int32), backend=backend)[:, pad:]
    print("absolute positions vs plain", (abs_pos - hf).abs().max().item())
    assert (abs_pos - hf).abs().max().item() < 1e-4


def test_forward_bf16_close_to_fp32(tiny_ckpt, loaded):
    cfg, w32, _ = loaded
    w16 = load_weights(tiny_ckpt, cfg, "cpu", torch.bfloat16)
    ids = torch.randint(0, 100, (2, 30))
    a = forward(cfg, w32, ids, backend="torch")
    b = forward(cfg, w16, ids, backend="torch").float()
    err = (a - b).abs().max().item()
    print("bf16 vs fp32", err, "scale", a.abs().max().item())
    assert b.dtype == torch.float32 and err < 0.05 * a.abs().max().item()


def _ragged(cfg, lens, seed, masked_from, packed=True):
    """Rows of lengths lens right-padded to S = max(lens), masked from column masked_from on: tokens (B, S),
    positions (B, S), key_end (B,) int32 = lens, and pack (Q,) (the real columns' flat indices; None: not packed)."""
    B, S = len(lens), max(lens)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (B, S), generator=g)
    tokens[:, masked_from:] = cfg.mask_token_id
    pos = torch.arange(S).expand(B, S).contiguous()
    key_end = torch.tensor(lens, dtype=torch.int32)
    pack = torch.cat([b * S + torch.arange(n) for b, n in enumerate(lens)]) if packed else None    # (Q,)
    return tokens, pos, key_end, pack


@pytest.mark.parametrize("backend", ["torch", "ops"])
@pytest.mark.parametrize("workspace", [False, True])
def test_packed_rows_of_different_lengths(loaded, backend, workspace):
    """ForwardBatch.pack: rows of lengths 1, 13, 29 and 30 (right-padded to 30, key_end = length) computed on their
    real columns only give each row's logits alone (the independent plain forward), and the K/V each real column
    writes into a cache equal the padded forward's."""
    from llada_rt.cache import KVCache
    from llada_rt.model import ForwardBatch, forward_batch
    from llada_rt.workspace import Workspace
    cfg, w, plain = loaded
    lens = [13, 1, 30, 29]
    B, S = len(lens), max(lens)
    tokens, pos, key_end, pack = _ragged(cfg, lens, seed=5, masked_from=S // 2)
    offs = [sum(lens[:b]) for b in range(B)]
    T = S + 3                                                                                  # cache columns
    caches = [KVCache(cfg, B, T, torch.float32, torch.device("cpu")) for _ in range(2)]
    write_pad = (torch.arange(B)[:, None] * T + torch.arange(S)[None, :]).reshape(-1)
    ws = Workspace(torch.device("cpu")) if workspace else None
    packed = forward_batch(cfg, w, ForwardBatch(tokens, pos, key_end=key_end, write_index=write_pad[pack],
                                                pack=pack), cache=caches[0], ws=ws, backend=backend).clone()
    padded = forward_batch(cfg, w, ForwardBatch(tokens, pos, key_end=key_end, write_index=write_pad),
                           cache=caches[1], backend=backend)
    assert packed.shape == (sum(lens), cfg.embedding_size)
    for b, n in enumerate(lens):
        ref = plain(tokens[b:b + 1, :n]).float()[0]
        err = (packed[offs[b]:offs[b] + n] - ref).abs().max().item()
        err_pad = (packed[offs[b]:offs[b] + n] - padded[b * S:b * S + n]).abs().max().item()
        kv_err = max((c0[:, b, :n] - c1[:, b, :n]).abs().max().item()
                     for c0, c1 in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)))
        print(f"row {b} (length {n}): packed vs plain {err:.3g}, vs padded {err_pad:.3g}, cache K/V {kv_err:.3g}")
        assert err < 1e-4 and err_pad < 1e-5 and kv_err < 1e-5


@pytest.mark.parametrize("backend", ["torch", "ops"])
@pytest.mark.parametrize("workspace", [False, True])
def test_attention_segments(loaded, backend, workspace):
    """ForwardBatch.attn_segments: packed rows of lengths 30, 29 | 13, 1 attending in two rectangles (2 x 30, 2 x 13)
    give each row's logits alone, and the same as the one (4, 30) rectangle."""
    from llada_rt.model import ForwardBatch, forward_batch
    from llada_rt.workspace import Workspace
    cfg, w, plain = loaded
    lens, segments = [30, 29, 13, 1], ((2, 30), (2, 13))
    B, S = len(lens), max(lens)
    tokens, pos, key_end, pack = _ragged(cfg, lens, seed=6, masked_from=S // 3)
    starts = [0, 30, 60, 73]                                                                   # rows in the segments
    attn_pack = torch.cat([s + torch.arange(n) for s, n in zip(starts, lens)])
    ws = Workspace(torch.device("cpu")) if workspace else None
    seg = forward_batch(cfg, w, ForwardBatch(tokens, pos, key_end=key_end, pack=pack, attn_segments=segments,
                                             attn_pack=attn_pack), ws=ws, backend=backend).clone()
    one = forward_batch(cfg, w, ForwardBatch(tokens, pos, key_end=key_end, pack=pack), backend=backend)
    offs = [sum(lens[:b]) for b in range(B)]
    for b, n in enumerate(lens):
        ref = plain(tokens[b:b + 1, :n]).float()[0]
        err = (seg[offs[b]:offs[b] + n] - ref).abs().max().item()
        err_one = (seg[offs[b]:offs[b] + n] - one[offs[b]:offs[b] + n]).abs().max().item()
        print(f"row {b} (length {n}): segments vs plain {err:.3g}, vs one rectangle {err_one:.3g}")
        assert err < 1e-4 and err_one < 1e-5
    with pytest.raises(ValueError, match="must cover the B = 4 rows"):
        forward_batch(cfg, w, ForwardBatch(tokens, pos, key_end=key_end, pack=pack, attn_segments=((2, 30),),
                                           attn_pack=attn_pack), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "ops"])
@pytest.mark.parametrize("packed", [False, True])
def test_last_layer_on_the_window_only(loaded, backend, packed):
    """ForwardBatch.last_window: the last layer's attention for a window of 4 query rows per row and its MLP for the
    logit rows only give the logits of the whole last layer (rows of lengths 13, 5, 30, 29; two logit rows per
    window). (A logit_window off by one row gives errors of 1e-2: the test can fail.)"""
    from llada_rt.model import ForwardBatch, forward_batch
    from llada_rt.workspace import Workspace
    cfg, w, _ = loaded
    lens = [13, 5, 30, 29] if packed else [30] * 4
    B, S, L = len(lens), max(lens), 4
    tokens, pos, key_end, pack = _ragged(cfg, lens, seed=7, masked_from=S // 2, packed=packed)
    row0 = [sum(lens[:b]) if packed else b * S for b in range(B)]                  # query row of each row's column 0
    window = torch.tensor([[row0[b] + n - L + j for j in range(L)] for b, n in enumerate(lens)])   # (B, L)
    logit_window = torch.tensor([b * L + j for b in range(B) for j in (0, 2)])
    logit_rows = window.view(-1)[logit_window]
    common = dict(key_end=key_end, pack=pack, logit_rows=logit_rows)
    for ws in (None, Workspace(torch.device("cpu"))):
        cut = forward_batch(cfg, w, ForwardBatch(tokens, pos, last_window=window, logit_window=logit_window, **common),
                            ws=ws, backend=backend).clone()
        whole = forward_batch(cfg, w, ForwardBatch(tokens, pos, **common), backend=backend)
        err = (cut - whole).abs().max().item()
        print(f"packed={packed} workspace={ws is not None}: last layer on the window vs whole {err:.3g}")
        assert cut.shape == whole.shape and err < 1e-5
