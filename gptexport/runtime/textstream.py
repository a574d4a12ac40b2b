"""Text as it is generated: a delta per token, never half a UTF-8 character.
"""

from __future__ import annotations

from typing import Callable


class TextStream:
    """Streams decoded text, holding back an incomplete UTF-8 sequence of a BPE token."""

    def __init__(self, tokenizer, sink: Callable[[str], None] | None):
        self.tokenizer, self.sink = tokenizer, sink
        self.tokens: list[int] = []
        self.printed = 0

    def write(self, ids: list[int]) -> None:
        if self.sink is None:
            return
        if self.tokenizer is None:
            self.sink("".join(f"{i} " for i in ids))
            return
        self.tokens += ids
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return  # wait for the rest of a multi-byte character
        self.sink(text[self.printed:])
        self.printed = len(text)
        if len(self.tokens) > 64:  # keep decoding cheap: restart from what has been printed
            self.tokens, self.printed = [], 0

    def end(self, separator: str) -> None:
        if self.sink is not None:
            self.sink(separator)
