"""ChoiceText: one choice's answer text as the denoising steps commit it: the stable prefix, the max_tokens cut, stop
strings checked on committed text, and the part of the text that can be sent (deltas that never need taking back)."""
from __future__ import annotations

from ..runtime import render_canvas, stable_prefix
from ..tokenizer import Tokenizer

REPLACEMENT = "\ufffd"   # what a byte-level decoder shows for an incomplete UTF-8 sequence at the end of a prefix


class ChoiceText:
    """Fed the answer canvas after every step (mask ids where nothing is committed yet); keeps the text sent so far.

    The stable text is the decoded prefix of committed positions before the first EOS/EOT, cut at max_tokens tokens
    (reaching them is finish_reason 'length', as in OpenAI's API: what follows is never generated) and at the
    earliest stop string in it. It only grows as steps commit more, so it is sent as deltas; the sent part
    holds back a trailing incomplete character and any suffix that could still become a stop string, so that the
    concatenated deltas equal the final text exactly, and the cut is where the whole answer's earliest stop string
    starts (a stop string found while an earlier one may still be completing waits for it).
    """

    def __init__(self, tok: Tokenizer, mask_id: int, max_tokens: int, stop: list[str]):
        self.tok, self.mask_id, self.max_tokens, self.stop = tok, mask_id, max_tokens, list(stop)
        self.sent = ""                        # text sent so far (a prefix of the final text)
        self.finish_reason: str | None = None  # 'stop' or 'length' once the text is final
        self.tokens = 0                        # completion tokens: answer ids behind the final text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, canvas: list[int]) -> str:
        """The newly sendable text after a step with this answer canvas; sets finish_reason once the text is final."""
        if self.finished:
            return ""
        ids, final = stable_prefix(canvas, self.tok, self.mask_id)
        stop_id_seen = final and len(ids) < len(canvas) and canvas[len(ids)] != self.mask_id
        cut = len(ids) >= self.max_tokens   # the limit is reached: nothing after it can enter the text
        if cut:
            ids, final = ids[:self.max_tokens], True
        text = self.tok.decode(ids)
        open_at = len(text) if final else self._open_at(text)
        hit = self._first_stop(text)
        if hit is not None and hit[0] <= open_at:   # no stop string can still start earlier: the text ends here
            text = text[:hit[0]]
            self.finish_reason = "stop"
            self.tokens = self._tokens_to(ids, hit[0] + len(hit[1]))
        elif final:
            self.finish_reason = "length" if cut or not stop_id_seen else "stop"
            self.tokens = len(ids)
        else:
            text = text[:open_at]
        if not text.startswith(self.sent):
            raise RuntimeError(f"the tokenizer decoded a longer committed prefix to {text!r}, which does not extend "
                               f"the text already streamed {self.sent!r}; its decoder is not prefix-stable")
        delta, self.sent = text[len(self.sent):], text
        return delta

    def canvas_text(self, canvas: list[int]) -> str:
        """The provisional answer (masks shown as a glyph) within max_tokens, for the canvas extension."""
        return render_canvas(canvas[:self.max_tokens], self.tok, self.mask_id)

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        found = [(i, s) for s in self.stop if (i := text.find(s)) >= 0]
        return min(found) if found else None

    def _open_at(self, text: str) -> int:
        """Where a text that is not final may still change: its trailing incomplete characters, or the start of the
        longest suffix that is a proper prefix of a stop string (more text may complete it). Text before this index
        is sent; a stop string found before it ends the text."""
        body = text.rstrip(REPLACEMENT)
        start = len(body)
        for s in self.stop:
            for k in range(min(len(s) - 1, len(body)), 0, -1):
                if body.endswith(s[:k]):
                    start = min(start, len(body) - k)
                    break
        return start

    def _tokens_to(self, ids: list[int], chars: int) -> int:
        """The fewest leading ids whose text reaches `chars` characters (the tokens up to the end of a stop string)."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tok.decode(ids[:mid])) >= chars:
                hi = mid
            else:
                lo = mid + 1
        return lo
