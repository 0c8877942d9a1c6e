"""Request traces: the Mooncake format, their statistics, synthesis of new traces, and prompts.

Owns reading and writing Mooncake JSONL traces (``TraceRequest``, ``load_trace``,
``save_trace``), the numbers ``datagen analyze`` reports (``analyze``, ``format_stats``), a
seeded re-implementation of Dynamo's prefix data generator (``synthesize``), and prompt synthesis
that turns hash-id blocks into real token ids and text for one tokenizer (``PromptBuilder``).
Everything here is pure and synchronous; the only I/O is ``load_trace``/``save_trace``.
"""

from __future__ import annotations

from baton.trace.mooncake import DEFAULT_TRACE_BLOCK_SIZE, TraceRequest, load_trace, save_trace
from baton.trace.prompts import PromptBuilder, select_safe_tokens
from baton.trace.stats import TraceStats, analyze, format_stats
from baton.trace.synth import SynthConfig, synthesize, synthesize_with

__all__ = [
    "DEFAULT_TRACE_BLOCK_SIZE",
    "PromptBuilder",
    "SynthConfig",
    "TraceRequest",
    "TraceStats",
    "analyze",
    "format_stats",
    "load_trace",
    "save_trace",
    "select_safe_tokens",
    "synthesize",
    "synthesize_with",
]
