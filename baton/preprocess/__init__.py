"""Preprocessing: everything between HTTP text and engine token ids, in both directions.

Owns model cards (``ModelCard``, ``resolve_model``, the packaged ``baton-tiny`` model), the
tokenizer and chat-template rendering (``Tokenizer``), streaming detokenization
(``IncrementalDetokenizer``) and stop strings (``StopChecker``). It does no I/O after a model is
loaded, never touches the network, and knows nothing about HTTP, routing or engines.
"""

from __future__ import annotations

from baton.preprocess.detokenizer import IncrementalDetokenizer
from baton.preprocess.model_card import ModelCard, ModelNotFoundError, resolve_model
from baton.preprocess.stop import StopChecker
from baton.preprocess.tokenizer import ChatTemplateError, Tokenizer

__all__ = [
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "ModelCard",
    "ModelNotFoundError",
    "StopChecker",
    "Tokenizer",
    "resolve_model",
]
