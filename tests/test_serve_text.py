"""ChoiceText (the server's stable text per choice) against the definition, with a byte-level tokenizer (multi-byte
characters split over tokens, as LLaDA's byte-level BPE does): in any commit order the streamed deltas join to the
answer cut at max_tokens tokens and at its earliest stop string, no delta is ever taken back, and finish_reason
follows the rule (stop string or stop id: 'stop'; max_tokens reached or no stop id: 'length')."""
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from llada_rt.serve.text import ChoiceText

EOS, MASK = 256, 257


class ByteTokenizer:
    """Token i < 256 is the byte i; decoding shows an incomplete UTF-8 sequence as U+FFFD (as `tokenizers` does)."""
    stop_ids = [EOS]

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def expected(answer, max_tokens, stop):
    ids = answer[:answer.index(EOS)] if EOS in answer else answer
    cut = len(ids) >= max_tokens
    text = ByteTokenizer().decode(ids[:max_tokens])
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    if hits:
        return text[:min(hits)], "stop"
    return text, "length" if cut or EOS not in answer else "stop"


def stream(answer, order, per_step, max_tokens, stop):
    """Feeds the canvas after each step (per_step positions committed in `order`); returns the deltas and the
    tracker."""
    t = ChoiceText(ByteTokenizer(), MASK, max_tokens, stop)
    canvas = [MASK] * len(answer)
    deltas = []
    for k in range(0, len(order), per_step):
        for j in order[k:k + per_step]:
            canvas[j] = answer[j]
        deltas.append(t.update(canvas))
        assert t.sent == "".join(deltas)
        if t.finished:
            break
    return deltas, t


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab \u00e9\u20ac\U0001f600\n", max_size=14), eos=st.booleans(),
       tail=st.integers(0, 4), stop=st.lists(st.text(alphabet="ab \u00e9", min_size=1, max_size=3), max_size=3),
       max_tokens=st.integers(1, 40), seed=st.integers(0, 2 ** 31), per_step=st.integers(1, 4))
def test_deltas_join_to_the_cut_answer_in_any_commit_order(text, eos, tail, stop, max_tokens, seed, per_step):
    answer = list(text.encode()) + ([EOS] if eos else []) + [ord("b")] * tail   # what follows a stop id is not text
    if not answer:
        return
    order = list(range(len(answer)))
    random.Random(seed).shuffle(order)
    deltas, t = stream(answer, order, per_step, max_tokens, stop)
    want = expected(answer, max_tokens, stop)
    print(repr(text), eos, stop, max_tokens, deltas, t.finish_reason, want)
    assert t.finished and ("".join(deltas), t.finish_reason) == want
    final = want[0]
    for k in range(1, len(deltas)):   # nothing sent ahead of the final text, no incomplete character sent
        assert final.startswith("".join(deltas[:k]))


def test_a_stop_string_waits_for_an_earlier_one_still_completing():
    # "b" is complete at index 2 while "abc" may still start at 1: the cut waits and lands at 1
    answer = list(b"xabc")
    deltas, t = stream(answer, [0, 1, 2, 3], 1, 16, ["abc", "b"])
    print(deltas, t.finish_reason)
    assert deltas == ["x", "", "", ""] and t.finish_reason == "stop" and t.tokens == 4
    deltas, t = stream(list(b"xabd"), [0, 1, 2, 3], 1, 16, ["abc", "b"])
    print(deltas, t.finish_reason)
    assert "".join(deltas) == "xa" and t.finish_reason == "stop" and t.tokens == 3


def test_incomplete_characters_are_held_back():
    answer = list("\u20ac!".encode()) + [EOS]   # 3 bytes + '!'
    deltas, t = stream(answer, [0, 1, 2, 3, 4], 1, 16, [])
    print(deltas)
    assert deltas == ["", "", "\u20ac", "!", ""] and t.finish_reason == "stop" and t.tokens == 4


def test_max_tokens_cut_finishes_before_the_canvas_is_done():
    answer = list(b"abcdef")
    deltas, t = stream(answer, [0, 1, 2, 5, 4, 3], 1, 3, [])
    print(deltas, t.finish_reason)
    assert "".join(deltas) == "abc" and len(deltas) == 3 and t.finish_reason == "length" and t.tokens == 3
