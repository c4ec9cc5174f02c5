"""Stream the elements of a top-level JSON array (multi-GB `.json` files in constant memory).

The standard library decodes whole documents only; `JSONDecoder.raw_decode` can decode one value at an
offset, so we keep a buffer holding the unread tail and refill it when a value runs past its end.
"""
from __future__ import annotations

import json
from typing import Any, Iterator

CHUNK_CHARS = 1 << 20


class JsonArrayReader:
    """Decode the elements of a top-level JSON array one at a time from a text stream (constant memory
    per element: the buffer only ever holds the unread tail of the current element)."""

    def __init__(self, fh):
        self.fh = fh
        self.buf, self.pos, self.eof = "", 0, False
        self.decoder = json.JSONDecoder()

    def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.fh.read(CHUNK_CHARS)
        if not chunk:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def _next_char(self) -> str:
        """Skip whitespace and return the next character without consuming it ('' at EOF)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def _expect(self, chars: str, what: str) -> str:
        c = self._next_char()
        if c == "" or c not in chars:
            raise json.JSONDecodeError(f"expected {what}", self.buf, self.pos)
        self.pos += 1
        return c

    def __iter__(self) -> Iterator[Any]:
        if self._next_char() == "\ufeff":
            self.pos += 1
        self._expect("[", "a JSON array")
        if self._next_char() == "]":
            return
        while True:
            yield self._decode_value()
            if self._expect(",]", "',' or ']'") == "]":
                return

    def _decode_value(self) -> Any:
        self._next_char()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # If the element just continues past the buffer, read more (doubling keeps it linear);
                # a real syntax error stops here instead of pulling the rest of a huge file into memory.
                if not self._truncated(e) or not self._grow():
                    raise
                continue
            if end == len(self.buf) and not self.eof and self._grow():
                continue  # a number at the buffer's end may have more digits coming
            self.pos = end
            return value

    def _truncated(self, e: json.JSONDecodeError) -> bool:
        return e.msg.startswith("Unterminated string") or not self.buf[e.pos:].strip()

    def _grow(self) -> bool:
        want = max(len(self.buf) - self.pos, CHUNK_CHARS)
        grown = False
        while want > 0 and not self.eof:
            chunk = self.fh.read(min(want, CHUNK_CHARS * 16))
            if not chunk:
                self.eof = True
                break
            self.buf = self.buf[self.pos:] + chunk
            self.pos = 0
            want -= len(chunk)
            grown = True
        return grown
