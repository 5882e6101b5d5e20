"""The task suite: fixed held-out set, train/held-out disjointness, checkers, and the tokenizer covering the suite."""
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import build_tokenizer  # noqa: E402
import tasks  # noqa: E402

SYNTHETIC = ("reverse", "sort", "add")


@pytest.fixture(scope="module")
def heldout():
    return tasks.heldout_set()


@pytest.fixture(scope="module")
def train():
    return tasks.train_examples(20000, seed=1)


@pytest.fixture(scope="module")
def train2():
    """Task set 2: the extra fact phrasings and the lead-ins."""
    return tasks.train_examples(20000, seed=1, task_set=2)


# sha256 of the first 2000 examples of main's tasks.train_stream(1) (uniform) and of
# train_stream(1, {"add": 2, "capital": 1, "reverse": 1}), at main ff76f5e (the shipped model's stream)
MAIN_STREAM_SHA256 = {None: "966dbba0aed401f02de724e8f2ab2b1b4d56390789bee27c0c45e5f4dc0ad006",
                      "add=2,capital=1,reverse=1": "d4a8f24cdaf3a0ca4c59d69cac2b9b0a0609bc6090b78fe473e880b596fdb2ca"}


def _digest(examples) -> str:
    import hashlib
    import json

    blob = json.dumps([[e.task, e.prompt, e.answer, list(e.key)] for e in examples], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


@pytest.mark.parametrize("weights", list(MAIN_STREAM_SHA256))
def test_default_stream_is_mains(weights):
    """Task set 1 (the default) is the stream main's train_stream drew, example for example: the shipped model's
    recipe is unchanged by task set 2."""
    w = {k: float(v) for k, v in (kv.split("=") for kv in weights.split(","))} if weights else None
    stream = tasks.TrainStream(1, w)
    digest = _digest([next(stream) for _ in range(2000)])
    print(weights, digest)
    assert digest == MAIN_STREAM_SHA256[weights]
    stream2 = tasks.TrainStream(1, w, task_set=2)
    assert _digest([next(stream2) for _ in range(2000)]) != digest


def test_task_set_is_checked():
    with pytest.raises(ValueError, match="task set 3"):
        tasks.TrainStream(1, task_set=3)


def test_heldout_is_fixed_and_sized(heldout):
    assert heldout == tasks.heldout_set()
    counts = Counter(e.task for e in heldout)
    n_facts = len(tasks.load_capitals())
    assert counts == {"reverse": 100, "sort": 100, "add": 100, "capital": n_facts, "country": n_facts}
    assert len({e.key for e in heldout}) == len(heldout)


HELDOUT_SHA256 = "30957a09562280ca130d0a6a2dd549d8c308f8bf5c66c6a5f9f72a771eff0dd2"  # of main at 5b60699


def test_heldout_set_is_exactly_the_original_one(heldout):
    """Training-data changes must leave the held-out set as it was (the numbers in RESULTS.md are on this set)."""
    import hashlib
    import json

    blob = json.dumps([[e.task, e.prompt, e.answer, list(e.key)] for e in heldout], ensure_ascii=False)
    digest = hashlib.sha256(blob.encode()).hexdigest()
    print(digest)
    assert digest == HELDOUT_SHA256


def test_no_heldout_phrasing_or_heldout_only_word_in_training(heldout, train, train2):
    """Fact questions of training (both task sets) never use a held-out phrasing (with or without a lead-in) nor a
    word that only the held-out phrasings have; those words are really in every held-out fact question's phrasing
    set."""
    import re

    patterns = [re.compile(".*" + re.escape(t).replace(re.escape("{x}"), ".+")) for task in ("capital", "country")
                for t in tasks._FACT_TEMPLATES[task]["heldout"]]
    held_words = {w.casefold() for t in ("capital", "country") for tpl in tasks._FACT_TEMPLATES[t]["heldout"]
                  for w in re.findall(r"[A-Za-z]+", tpl)}
    assert set(tasks.HELDOUT_ONLY_WORDS) <= held_words
    facts = [e for e in train + train2 if e.task in ("capital", "country")]
    assert len(facts) > 10000
    for e in facts:
        assert not any(p.fullmatch(e.prompt) for p in patterns), e
        words = {w.casefold() for w in re.findall(r"[A-Za-z]+", e.prompt.replace(e.key[1], " "))}
        assert not words & set(tasks.HELDOUT_ONLY_WORDS), e
    for e in heldout:
        if e.task in ("capital", "country"):
            assert any(p.fullmatch(e.prompt) for p in patterns)
    train_words = {w.casefold() for t in ("capital", "country") for which in ("train", "train_extra")
                   for tpl in tasks._FACT_TEMPLATES[t][which] for w in re.findall(r"[A-Za-z]+", tpl)}
    lead_words = {w.casefold() for lead in tasks._LEAD_INS for w in re.findall(r"[A-Za-z]+", lead)}
    print("held-out-only words:", sorted(held_words - train_words - lead_words))
    assert held_words - train_words - lead_words == set(tasks.HELDOUT_ONLY_WORDS)


def test_lead_ins_only_on_fact_questions_of_task_set_2(train, train2):
    assert not [e for e in train if e.prompt.startswith(tasks._LEAD_INS)]
    with_lead = [e for e in train2 if e.prompt.startswith(tasks._LEAD_INS)]
    facts = [e for e in train2 if e.task in ("capital", "country")]
    print(f"{len(with_lead)} of {len(facts)} fact questions have a lead-in")
    assert all(e.task in ("capital", "country") for e in with_lead)
    assert abs(len(with_lead) / len(facts) - tasks.LEAD_IN_P) < 0.03


@pytest.mark.parametrize("task_set", tasks.TASK_SETS)
def test_stream_state_restores_the_position(task_set):
    a = tasks.TrainStream(7, {"add": 2, "capital": 1}, task_set=task_set)
    for _ in range(123):
        next(a)
    state = a.getstate()
    want = [next(a) for _ in range(50)]
    b = tasks.TrainStream(7, {"add": 2, "capital": 1}, task_set=task_set)
    b.setstate(state)
    assert [next(b) for _ in range(50)] == want


def test_smaller_heldout_is_a_prefix(heldout):
    small = tasks.heldout_set(per_task=7)
    assert Counter(e.task for e in small) == {t: 7 for t in tasks.TASKS}
    assert all(e in heldout for e in small)


def test_train_and_heldout_are_disjoint(heldout, train):
    held_keys = {e.key for e in heldout}
    assert not [e for e in train if e.key in held_keys]
    assert not {e.prompt for e in train} & {e.prompt for e in heldout}
    for task in ("capital", "country"):  # facts: every fact trained, but never with a held-out phrasing
        train_templates = {e.key[2] for e in train if e.task == task}
        held_templates = {e.key[2] for e in heldout if e.task == task}
        assert train_templates and held_templates and not train_templates & held_templates
        assert {e.answer for e in train if e.task == task} == {e.answer for e in heldout if e.task == task}


def test_addition_pairs_are_held_out_in_both_orders(heldout):
    pairs = {e.key for e in heldout if e.task == "add"}
    stream = tasks.TrainStream(seed=3)
    for _ in range(5000):
        e = next(stream)
        if e.task == "add":
            assert e.key not in pairs and e.key[1] <= e.key[2]


def test_every_fact_asked_in_both_directions(heldout):
    rows = tasks.load_capitals()
    assert len(rows) >= 50 and len({c for c, _ in rows}) == len(rows) and len({k for _, k in rows}) == len(rows)
    assert {(e.answer) for e in heldout if e.task == "capital"} == {k for _, k in rows}
    assert {(e.answer) for e in heldout if e.task == "country"} == {c for c, _ in rows}


def test_training_stream_is_seeded(train):
    assert tasks.train_examples(50, seed=1) == train[:50]
    assert tasks.train_examples(50, seed=2) != train[:50]
    with pytest.raises(ValueError):
        next(tasks.TrainStream(tasks.HELDOUT_SEED))


def test_answers_vary_and_fit(heldout, train):
    for task in tasks.TASKS:
        lengths = {len(e.answer) for e in heldout + train if e.task == task}
        assert len(lengths) >= 2, task
    assert len({len(e.answer) for e in heldout}) >= 10
    assert max(len(e.answer) for e in heldout + train) <= tasks.MAX_ANSWER_CHARS


def test_answers_are_right(heldout):
    for e in heldout:
        if e.task == "reverse":
            assert e.prompt.endswith(e.answer[::-1]) or f" {e.answer[::-1]} " in e.prompt
        elif e.task == "sort":
            digits = [int(c) for c in e.prompt if c.isdigit()]
            assert e.answer == " ".join(map(str, sorted(digits)))
        elif e.task == "add":
            a, b = tasks._numbers(e.prompt)
            assert int(e.answer) == a + b
        assert tasks.check(e, e.answer)


def test_checkers():
    ex = {e.task: e for e in tasks.heldout_set(per_task=1)}
    rev, srt, add, cap, cty = (ex[t] for t in tasks.TASKS)
    assert tasks.check(rev, " " + rev.answer + " ") and not tasks.check(rev, rev.answer[:-1])
    assert not tasks.check(rev, rev.answer + "x")
    assert tasks.check(srt, srt.answer.replace(" ", ", ")) and tasks.check(srt, srt.answer + "\n")
    assert not tasks.check(srt, srt.answer[::-1] + " 0") and not tasks.check(srt, "")
    assert tasks.check(add, add.answer + ".") and not tasks.check(add, str(int(add.answer) + 1))
    assert not tasks.check(add, add.answer + " or " + add.answer)
    assert tasks.check(cap, cap.answer.upper() + ".") and not tasks.check(cap, cap.answer + " City")
    assert tasks.check(cty, cty.answer) and not tasks.check(cty, "")
    with pytest.raises(ValueError):
        tasks.check(tasks.Example("nope", "", "", ()), "")


def test_tokenizer_covers_the_suite(tmp_path, heldout, train):
    from tokenizers import Tokenizer

    build_tokenizer.write(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    unk = tok.token_to_id(build_tokenizer.UNK)
    for e in heldout + train[:2000]:
        for text in (e.prompt, e.answer):
            ids = tok.encode(text, add_special_tokens=False).ids
            assert unk not in ids and tok.decode(ids) == text


def test_shipped_tokenizer_is_the_character_one(tmp_path):
    from tokenizers import Tokenizer

    build_tokenizer.write(tmp_path)
    shipped = Tokenizer.from_file(str(Path(__file__).resolve().parent.parent / "llada_rt" / "models" / "small" /
                                      "tokenizer.json"))
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab() == shipped.get_vocab()
    assert build_tokenizer.special_ids(tmp_path)["vocab_size"] == 128


def test_word_tokenizer_whole_words_are_tokens_and_other_text_characters(tmp_path, heldout, train):
    """--words: training-phrasing words and table names are one token each; words only the held-out phrasings use,
    parts of longer words, the strings to reverse and all digits are spelled out one character per token."""
    from tokenizers import Tokenizer

    build_tokenizer.write(tmp_path, words=True)
    assert build_tokenizer.special_ids(tmp_path)["vocab_size"] == -(-len(build_tokenizer.vocabulary(True)) // 128) * 128 > 128
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    words = tasks.vocabulary_words()
    assert {"Buenos Aires", "Argentina", "capital", "Reverse"} <= set(words)
    for w in words:
        assert tok.encode(w, add_special_tokens=False).tokens == [w], w
    pieces = tok.encode("Tell me the country whose capital is Kuala Lumpur.", add_special_tokens=False).tokens
    print(pieces)
    assert pieces == [*"Tell", " ", *"me", " ", "the", " ", "country", " ", *"whose", " ", "capital", " ", "is", " ",
                      "Kuala Lumpur", "."]
    assert tok.encode("thecapitals", add_special_tokens=False).tokens == list("thecapitals")
    for e in heldout + train[:3000]:
        if e.task in SYNTHETIC:
            assert e.answer not in words
            assert tok.encode(e.answer, add_special_tokens=False).tokens == list(e.answer), e


def test_task_weights(train):
    ex = tasks.train_examples(6000, seed=5, weights={"add": 3, "reverse": 1})
    counts = Counter(e.task for e in ex)
    print(counts)
    assert set(counts) == {"add", "reverse"} and 2.6 < counts["add"] / counts["reverse"] < 3.4
    uniform = Counter(e.task for e in train)
    assert min(uniform.values()) > 0.9 * max(uniform.values())
    assert tasks.train_examples(100, seed=1, weights={t: 1 for t in tasks.TASKS})[0].task in tasks.TASKS
    for bad in ({"nope": 1}, {"add": 0}, {"add": -1, "sort": 2}, {}):
        with pytest.raises(ValueError, match="weights"):
            next(tasks.TrainStream(1, bad))


def test_rejected_words_are_never_strings_to_reverse():
    import itertools

    three = frozenset("".join(p) for p in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=3))
    stream = tasks.TrainStream(4, {"reverse": 1}, reject_words=three)
    lengths = Counter(len(next(stream).key[1]) for _ in range(3000))
    print(lengths)
    assert 3 not in lengths and set(lengths) == set(range(4, tasks.REVERSE_LEN[1] + 1))


def test_tokenizer_files_match_llada(tmp_path):
    """Special tokens by content, ids consistent across files, LLaDA's chat template rendered by the runtime."""
    import json

    from llada_rt.tokenizer import Tokenizer

    build_tokenizer.write(tmp_path)
    ids = build_tokenizer.special_ids(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|startoftext|>" and cfg["eos_token"] == cfg["pad_token"] == "<|endoftext|>"
    tok = Tokenizer(tmp_path)
    assert (tok.mask_id, tok.eos_id, tok.bos_id) == (ids["mask_token_id"], ids["eos_token_id"], ids["bos_token_id"])
    assert tok.eot_id == ids["eot_token_id"] and len({tok.mask_id, tok.eos_id, tok.bos_id, tok.eot_id}) == 4
    text = tok.render_chat([{"role": "system", "content": "dropped"}, {"role": "user", "content": "  Hi! "}])
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.render_chat([{"role": "user", "content": "a"}], add_generation_prompt=False).endswith(
        "<|eot_id|><|endoftext|>")
    ids_ = tok.encode_chat("Hi!")
    assert ids_[0] == tok.bos_id and ids_[1] == tok.start_header_id and tok.decode(ids_) == "user\n\nHi!assistant\n\n"


def test_eval_rows_cover_modes_curve_and_early_stop():
    import eval_tasks
    from llada_rt.generation_config import MODES, GenerationConfig

    labels = [label for label, _ in eval_tasks.mode_rows()]
    print(labels)
    assert labels[:len(MODES)] == list(MODES)
    assert {f"{m} threshold=0.9" for m in MODES} <= set(labels)
    curve = eval_tasks.mode_rows(thresholds=(0.5, 0.75, 1.0), early_stop="both")
    by_label = dict(curve)
    assert len(by_label) == len(curve)  # labels are unique
    for m in MODES:
        for t in (0.5, 0.75, 1.0):
            assert by_label[f"{m} threshold={t:g}"] == {"mode": m, "threshold": t}
            assert by_label[f"{m} threshold={t:g} early_stop"] == {"mode": m, "threshold": t, "early_stop": True}
        assert f"{m} threshold=0.9" not in by_label  # the curve replaces the default value
    assert len(curve) == 2 * len(eval_tasks.mode_rows(thresholds=(0.5, 0.75, 1.0)))
    assert all(opts.get("early_stop") for _, opts in eval_tasks.mode_rows(early_stop="on"))
    for _, opts in curve:  # every row is a valid generation setting
        GenerationConfig(gen_length=16, block_length=16, **opts).validate()
