"""Text <-> token ids for one model, and chat-template rendering.

``Tokenizer`` wraps a Rust ``tokenizers.Tokenizer`` (loaded from the card's tokenizer.json) and
the card's Jinja chat template, compiled once in a sandboxed environment configured like
transformers' (trim_blocks, lstrip_blocks, ``raise_exception``, ``strftime_now``, a ``tojson``
that does not HTML-escape). It owns no request state and performs no I/O after construction.

Special tokens: ``encode`` follows the tokenizer's own post-processor when
``add_special_tokens=True``. A rendered chat prompt already contains every special token the
template wants (BOS included), so ``encode_chat`` encodes it with ``add_special_tokens=False``;
adding them again would double the BOS on models whose post-processor prepends one.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RawTokenizer

from baton.preprocess.model_card import ModelCard

Message = dict[str, Any]


class ChatTemplateError(ValueError):
    """The chat template failed to compile or render; ``message`` is safe to show the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Tokenizer:
    """Encoding, decoding and chat-prompt rendering for one ``ModelCard``."""

    card: ModelCard
    raw: RawTokenizer  # the Rust tokenizer; the detokenizer drives it directly
    _template: jinja2.Template | None

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.raw = RawTokenizer.from_file(str(card.tokenizer_path))
        self._template = compile_chat_template(card.chat_template) if card.chat_template else None

    @classmethod
    def from_model(cls, spec: str) -> Tokenizer:
        """Build from a built-in model name or a model folder path."""
        return cls(ModelCard.load(spec))

    @property
    def vocab_size(self) -> int:
        return self.card.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.card.eos_token_ids

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.raw.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.raw.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` to a prompt string; raises ``ChatTemplateError``.

        Without a chat template the prompt is one ``role: content`` line per message, plus an
        ``assistant:`` line when ``add_generation_prompt`` is set.
        """
        flat = [_flatten_message(m) for m in messages]
        if self._template is None:
            return _plain_prompt(flat, add_generation_prompt)
        context = {
            "messages": flat,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.card.bos_token or "",
            "eos_token": self.card.eos_token or "",
            **kwargs,
        }
        if tools is not None:
            context["tools"] = tools
        try:
            return self._template.render(context)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode_chat(self, messages: list[Message], **kwargs: Any) -> list[int]:
        """Render and encode a chat prompt; the template supplies the special tokens."""
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template the way transformers does; raises ``ChatTemplateError``."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's built-in tojson HTML-escapes; templates expect plain JSON, as in transformers.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _flatten_message(message: Message) -> Message:
    """Join OpenAI content parts ``[{"type": "text", "text": ...}]`` with newlines."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":
            raise ChatTemplateError(f"unsupported content part type {kind!r}; only 'text'")
        texts.append(str(part.get("text", "")))
    return {**message, "content": "\n".join(texts)}


def _plain_prompt(messages: list[Message], add_generation_prompt: bool) -> str:
    lines = [f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)
