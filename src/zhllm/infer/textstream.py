"""Turning generated token ids into text pieces as they arrive, and cutting the text at stop strings.

A byte-level BPE token can end in the middle of a UTF-8 character (most Chinese characters are three bytes
and the tokenizer may split them), so decoding one token at a time would print replacement characters.
`TextStream` decodes a small window of recent tokens and releases text only once it no longer ends in an
incomplete character (the offset scheme of transformers' TextStreamer and TGI). Bytes that can no longer
become a character (an incomplete sequence followed by something else, or left over at the end) are dropped
rather than shown as U+FFFD. It also holds back any tail that could be the start of a stop string, so a
streamed answer never shows half of a stop string.
"""
from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    """Feed token ids one at a time with `push`; read released text pieces; `stopped` after a stop string."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens whose text is already in self._text
        self._text = ""  # everything decoded so far (released or held back)
        self._released = 0  # characters of self._text handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly releasable text (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        window_text = self._decode(self.ids[self._prefix:])
        if window_text.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete UTF-8 character: wait for the next token
        done = self._decode(self.ids[self._prefix:self._read])
        # A replacement character before the window's end is an incomplete sequence that the next bytes
        # did not complete: it will never be a character.
        self._text += window_text[len(done):].replace(REPLACEMENT_CHAR, "")
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Release whatever is held back (end of generation); an incomplete character at the end is dropped."""
        if not self.stopped and self._read < len(self.ids):
            done = self._decode(self.ids[self._prefix:self._read])
            self._text += self._decode(self.ids[self._prefix:])[len(done):].replace(REPLACEMENT_CHAR, "")
            self._read = len(self.ids)
        return self._release(final=True)

    @property
    def text(self) -> str:
        """The text released so far."""
        return self._text[:self._released]

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if self.stop_strings:
            # Search from a little before the released point: a stop string may straddle it.
            start = max(0, self._released - max(map(len, self.stop_strings)) + 1)
            hits = [i for i in (self._text.find(s, start) for s in self.stop_strings) if i >= 0]
            if hits:
                end, self.stopped = min(hits), True
                self._text = self._text[:end]
            elif not final:
                end -= self._partial_stop_suffix()
        end = max(end, self._released)
        piece = self._text[self._released:end]
        self._released = end
        return piece

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:n]):
                    best = n
                    break
        return best
