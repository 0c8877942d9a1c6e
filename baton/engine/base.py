"""The ``Engine`` protocol every backend implements (simulated, transformers, vLLM, SGLang).

An engine turns a tokenized ``GenerateRequest`` into a stream of ``EngineOutput`` deltas.
Closing the stream early aborts the request and frees its KV blocks. KV events and load go
out through the callbacks the owner passes in; the engine does no networking of its own. An
engine that fails sets ``fault``, ends its streams with ``WorkerFaultError``, refuses new
requests and calls its fault handler once: its owner replaces it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import msgspec

from baton.kv.events import KvEvent, KvStored
from baton.protocol import EngineOutput, GenerateRequest

KvEventSink = Callable[[Sequence[KvEvent]], None]
FaultHandler = Callable[[BaseException], None]


class EngineLoad(msgspec.Struct, kw_only=True):
    active_blocks: int
    total_blocks: int
    num_running: int
    num_waiting: int
    active_prefill_tokens: int = 0


class Engine(Protocol):
    block_size: int
    fault: BaseException | None

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]: ...

    def load(self) -> EngineLoad: ...

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None: ...

    def set_fault_handler(self, handler: FaultHandler | None) -> None: ...

    def kv_snapshot(self) -> tuple[int, list[KvStored]]:
        """The prefix cache as stored events and the id of the last event it includes."""
        ...
