"""Synthetic agentic coding sessions as a multi-turn Mooncake trace (``baton trace agentic``).

A coding agent's conversation: every session starts from one of a few shared system prompts
(tool definitions and instructions, the same for every agent of that kind), then a task of its
own; each later turn appends a tool result (a file read, a test run) after the tool ran for a
while, and the model answers with a short tool call. The prompt therefore grows turn by turn
while most of it is the conversation so far: the shape where keeping a session on the worker
that holds its history pays most.

Draws (all from one seeded RNG): sessions start as a Poisson process at ``session_rate`` per
second; turns per session are geometric with mean ``mean_turns``; task and tool-result lengths
are log-normal around their medians (clipped to [16, 32768]); outputs are log-normal around
``median_output``; the delay before a turn (the tool running) is log-normal around
``median_tool_s``. Hash ids: each system prompt's blocks are shared by its sessions; every
other block is new.

Pure: ``agentic_sessions`` returns the trace; the CLI writes it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from baton.checks import require_value
from baton.settings import setting
from baton.trace.mooncake import DEFAULT_TRACE_BLOCK_SIZE, TraceRequest

__all__ = ["AgenticConfig", "agentic_sessions"]


@dataclass(frozen=True)
class AgenticConfig:
    """What ``baton trace agentic`` draws."""

    num_sessions: int = setting(200, "agent sessions")
    session_rate: float = setting(0.5, "sessions started per second (Poisson)")
    mean_turns: float = setting(8.0, "turns per session, mean (geometric)")
    system_prompts: int = setting(3, "distinct shared system prompts (agent kinds)")
    system_tokens: int = setting(6144, "tokens of each system prompt")
    median_task: int = setting(1024, "tokens of a session's first user message, median")
    median_tool_result: int = setting(768, "tokens a later turn adds, median")
    median_output: int = setting(160, "tokens of each answer, median")
    median_tool_s: float = setting(2.0, "seconds before a later turn (the tool runs), median")
    trace_block_size: int = setting(DEFAULT_TRACE_BLOCK_SIZE, "tokens per hash id")
    seed: int = setting(0, "seeds every draw")

    def __post_init__(self) -> None:
        for name in ("num_sessions", "system_prompts", "system_tokens", "trace_block_size"):
            require_value(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        for name in ("session_rate", "median_tool_s", "median_task", "median_tool_result",
                     "median_output"):
            require_value(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        require_value(self.mean_turns >= 1, "mean_turns", self.mean_turns, "must be >= 1")


_SIGMA = 0.8
"""Log-normal spread of every length and delay (a factor of ~2.2 per standard deviation)."""


class _Ids:
    def __init__(self, start: int) -> None:
        self.next = start

    def take(self, tokens: int, block_size: int) -> list[int]:
        n = -(-tokens // block_size)
        ids = list(range(self.next, self.next + n))
        self.next += n
        return ids


def agentic_sessions(config: AgenticConfig) -> list[TraceRequest]:
    """The sessions' turns, in order of their first turn's arrival (turns in order)."""
    rng = random.Random(config.seed)
    bs = config.trace_block_size
    system_blocks = config.system_tokens // bs  # full blocks: the prompt is block-aligned
    system_ids = [list(range(k * system_blocks, (k + 1) * system_blocks))
                  for k in range(config.system_prompts)]
    ids = _Ids(config.system_prompts * system_blocks)
    out: list[TraceRequest] = []
    t_ms = 0.0
    for s in range(config.num_sessions):
        t_ms += rng.expovariate(config.session_rate) * 1000.0
        kind = rng.randrange(config.system_prompts)
        task = _lognormal(rng, config.median_task)
        out.append(TraceRequest(
            timestamp=round(t_ms, 3), input_length=system_blocks * bs + task,
            output_length=_lognormal(rng, config.median_output),
            hash_ids=system_ids[kind] + ids.take(task, bs), session_id=f"agent-{s}"))
        for _ in range(_geometric(rng, config.mean_turns) - 1):
            added = _lognormal(rng, config.median_tool_result)
            delay = config.median_tool_s * 1000.0 * math.exp(rng.gauss(0.0, _SIGMA))
            out.append(TraceRequest(
                input_length=added, output_length=_lognormal(rng, config.median_output),
                hash_ids=ids.take(added, bs), session_id=f"agent-{s}", delay=round(delay, 3)))
    return out


def _lognormal(rng: random.Random, median: float) -> int:
    return max(16, min(32768, round(median * math.exp(rng.gauss(0.0, _SIGMA)))))


def _geometric(rng: random.Random, mean: float) -> int:
    """Turns >= 1 with the given mean."""
    p = 1.0 / mean
    return 1 if p >= 1 else 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - p))
