"""Incremental detokenization: streamed token ids in, only the newly completed text out.

Runs once per generated token, so the work stays in Rust: ``tokenizers.decoders.DecodeStream``
keeps a small window of ids, decodes it, and releases text only when the window no longer ends
in an incomplete UTF-8 sequence (U+FFFD). A character split across tokens is therefore emitted
once, whole, when its last byte arrives.

Invariant (checked by the property tests): the concatenation of every ``step`` result plus
``flush`` equals ``tokenizer.decode(prompt + generated)`` minus ``tokenizer.decode(prompt)``,
which is ``tokenizer.decode(generated)`` when there is no prompt. ``flush`` only ever returns
something when the stream stopped inside a character; it then yields U+FFFD, as decode does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from baton.preprocess.tokenizer import Tokenizer

# Prompt ids kept as decoding context: enough for a decoder to know whether the first new token
# starts a word (Metaspace and WordPiece decoders drop the leading space of a sequence's first
# token). Decoding the whole prompt would make the first step O(prompt length).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Per-request streaming decoder; not thread-safe, one instance per sequence."""

    # ---- collaborators
    _tokenizer: Tokenizer
    _skip_special_tokens: bool
    # ---- state
    _stream: DecodeStream
    _pending: list[int]  # ids fed since the last emitted text (an unfinished character)

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(
            ids=self._prompt_context(prompt_token_ids), skip_special_tokens=skip_special_tokens
        )
        self._pending = []

    def step(self, token_ids: list[int]) -> str:
        """Feed newly generated ids; return the text they complete (possibly "")."""
        if not token_ids:
            return ""
        text = self._stream.step(self._tokenizer.raw, token_ids)
        if text is None:
            self._pending.extend(token_ids)
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        """At end of stream, the text of ids still held back (an incomplete character)."""
        if not self._pending:
            return ""
        text = self._tokenizer.decode(self._pending, skip_special_tokens=self._skip_special_tokens)
        self._pending.clear()
        return text

    def _prompt_context(self, prompt_token_ids: list[int] | None) -> list[int] | None:
        """The prompt's last few ids, unless they end inside a character.

        A prompt that ends mid-character has no well-defined split between prompt text and
        generated text; the generated text is then decoded on its own.
        """
        if not prompt_token_ids:
            return None
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        text = self._tokenizer.decode(context, skip_special_tokens=self._skip_special_tokens)
        return None if text.endswith("\ufffd") else context
