"""Incremental detokenization: token ids in, text deltas out, never half a character. The server streams with it;
the engine searches stop strings in its text (only the new end of it at each token, not the whole output again).

Byte-level BPE splits multi-byte UTF-8 characters across tokens, so decoding a token alone can end in U+FFFD.
The detokenizer keeps two offsets into the ids (prefix_offset <= read_offset): the text of ids[prefix:read] was
already emitted; decoding ids[prefix:] and dropping that prefix gives the new text, which is held back while it
ends in U+FFFD (an incomplete sequence). Each push decodes O(window) tokens, not the whole output.
The concatenation of all deltas equals tokenizer.decode(all ids) whenever that decode ends in a complete character.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything emitted so far
        self.held = ""  # text decoded but held back (it ends in U+FFFD: a character not complete yet)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def push(self, token_ids: list[int]) -> str:
        """Append tokens; return the text they complete (possibly "")."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            self.held = full[len(prefix):]
            return ""
        self.held = ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
