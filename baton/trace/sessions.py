"""Multi-turn sessions of a trace: which turn follows which, when it is sent, and its prompt.

A trace's lines with the same ``session_id`` are the turns of one conversation, in file order
(``mooncake.py`` describes the format). ``SessionPlan`` says which requests are sent on the
clock (every request without a session, and each session's first turn) and which wait for a
previous turn to end; ``History`` builds a turn's prompt from the conversation so far: the
previous turn's prompt, its response, then the turn's own tokens. The simulator and ``baton
bench`` drive their clocks and ask these.

Pure and synchronous.
"""

from __future__ import annotations

from collections.abc import Sequence

from baton.trace.mooncake import TraceRequest

__all__ = ["History", "SessionPlan"]


class SessionPlan:
    """Turn order over ``requests`` (indices into the sequence given)."""

    def __init__(self, requests: Sequence[TraceRequest]) -> None:
        self.requests = requests
        self.next_turn: list[int | None] = [None] * len(requests)
        self.previous_turn: list[int | None] = [None] * len(requests)
        last: dict[str, int] = {}
        for index, request in enumerate(requests):
            sid = request.session_id
            if sid is None:
                continue
            before = last.get(sid)
            if before is not None:
                self.next_turn[before] = index
                self.previous_turn[index] = before
            last[sid] = index
        self.num_sessions = len(last)

    @property
    def clocked(self) -> list[int]:
        """Requests sent at their own timestamp: no session, or a session's first turn."""
        return [i for i, before in enumerate(self.previous_turn) if before is None]

    def follow_up(self, index: int, ended_ms: float) -> tuple[int, float] | None:
        """The turn after ``index`` and when to send it, given that ``index`` ended at
        ``ended_ms`` (both on the trace's clock, ms); None after the last turn."""
        nxt = self.next_turn[index]
        if nxt is None:
            return None
        turn = self.requests[nxt]
        if turn.delay is not None:
            return nxt, ended_ms + turn.delay
        if turn.timestamp > 0:
            return nxt, max(ended_ms, turn.timestamp)
        return nxt, ended_ms


class History:
    """Each session's conversation so far, as token ids."""

    def __init__(self, plan: SessionPlan) -> None:
        self.plan = plan
        self._so_far: dict[str, list[int]] = {}

    def prompt(self, index: int, own: list[int]) -> list[int]:
        """The prompt of turn ``index``: the session's conversation so far, then ``own``."""
        sid = self.plan.requests[index].session_id
        if sid is None or self.plan.previous_turn[index] is None:
            return own
        return self._so_far.get(sid, []) + own

    def answered(self, index: int, prompt: list[int], response: list[int]) -> None:
        """Turn ``index`` (sent with ``prompt``) got ``response``: the next turn builds on
        both. A turn that failed is answered with an empty response."""
        sid = self.plan.requests[index].session_id
        if sid is not None and self.plan.next_turn[index] is not None:
            self._so_far[sid] = prompt + response
        elif sid is not None:
            self._so_far.pop(sid, None)
