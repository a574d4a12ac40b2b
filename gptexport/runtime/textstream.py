"""A sequence's tokens as text: a delta per token, never half a UTF-8 character, and its stop words.

The session attaches one to each sequence of a model with a tokenizer (the scheduler never sees
text). A byte-level BPE token can end mid-character: its ids are held back until a later token
completes the character, and sent together with it.
"""

from __future__ import annotations


class TextStream:
    """Turns one sequence's tokens into text deltas and finds its stop words in them."""

    def __init__(self, tokenizer, stop_words: tuple[str, ...] = ()):
        self.tokenizer, self.stop_words = tokenizer, stop_words
        self.pending: list[int] = []  # ids not yet sent: the start of an unfinished character
        self._tail = ""  # the end of the text sent, as long as a stop word less one character
        self._keep = max((len(w) for w in stop_words), default=1) - 1

    def feed(self, ids: list[int]) -> tuple[list[int], str] | None:
        """The delta that `ids` complete: the ids held back with them, and their text; None while a
        character is incomplete. Text sent ends on a whole character, so decoding only what
        follows it gives the same text as decoding everything again."""
        pending = self.pending
        pending += ids
        text = self.tokenizer.decode(pending)
        if text.endswith("\ufffd"):
            return None  # wait for the rest of a multi-byte character
        self.pending = []
        return pending, text

    def stops(self, text: str) -> bool:
        """Whether a stop word ends in `text`, the delta just sent (a word may span deltas: look only
        where it could end in this one). Every delta must pass here, in order."""
        if not self.stop_words:
            return False
        window = self._tail + text
        found = any(w in window[max(0, len(self._tail) - len(w) + 1):] for w in self.stop_words)
        self._tail = window[max(0, len(window) - self._keep):] if self._keep else ""
        return found

    def flush(self) -> list[int]:
        """The ids held back (a character cut off when the sequence ended)."""
        ids, self.pending = self.pending, []
        return ids
