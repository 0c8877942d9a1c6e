"""Session affinity: the turns of one conversation go to the worker that holds its history.

A session id comes with a request (an ``X-Session-ID`` header, AIPerf's
``X-Session-Affinity`` or ``X-Correlation-ID``, or the OpenAI ``user`` field). The first turn
is routed like any request and binds the session to its worker; later turns go there while it
is a candidate (healthy, not busy, serving the model). When it is not, the turn is routed
normally and the session moves to the new worker, once. A session unused for ``ttl_s`` is
forgotten.

Pure and synchronous: the caller passes ``now``.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["SESSION_HEADERS", "SessionAffinity"]

SESSION_HEADERS = ("x-session-id", "x-session-affinity", "x-correlation-id")
"""Request headers naming a session, in order of preference (lower case)."""


class SessionAffinity:
    """Session id → (worker, last use), least recently used first."""

    def __init__(self, ttl_s: float, max_sessions: int = 1_000_000) -> None:
        if ttl_s <= 0 or max_sessions < 1:
            raise ValueError("ttl_s must be > 0 and max_sessions >= 1")
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self.moves = 0
        """Sessions that had to leave their worker (it was no longer a candidate)."""

    def __len__(self) -> int:
        return len(self._sessions)

    def worker(self, session_id: str, now: float) -> int | None:
        """The session's worker, unless it expired (then it is forgotten)."""
        self._expire(now)
        entry = self._sessions.get(session_id)
        return entry[0] if entry is not None else None

    def candidates(self, session_id: str | None, candidates: list[int],
                   now: float) -> list[int]:
        """Just the session's worker when it is among ``candidates``, else all of them."""
        if session_id is None:
            return candidates
        bound = self.worker(session_id, now)
        if bound is not None and bound in candidates:
            return [bound]
        if bound is not None:
            self.moves += 1
        return candidates

    def bind(self, session_id: str | None, worker_id: int, now: float) -> None:
        """The session's turn went to ``worker_id`` (its next turns go there too)."""
        if session_id is None:
            return
        self._sessions[session_id] = (worker_id, now)
        self._sessions.move_to_end(session_id)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    def _expire(self, now: float) -> None:
        sessions = self._sessions
        while sessions:
            _, (_, used) = next(iter(sessions.items()))
            if now - used <= self.ttl_s:
                return
            sessions.popitem(last=False)
