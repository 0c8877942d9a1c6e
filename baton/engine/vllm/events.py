"""vLLM's KV cache events, read off its ZMQ publisher and put in Baton's terms. No I/O.

vLLM publishes each batch as a ZMQ multipart message ``(topic, seq, payload)``: ``seq`` is a
big-endian u64 that grows by one per batch, ``payload`` a msgpack ``KVEventBatch`` (an array
``[ts, events, data_parallel_rank]``; each event a map tagged ``type``: ``BlockStored``,
``BlockRemoved`` or ``AllBlocksCleared``). The structs below decode that wire format and
nothing else, so this module needs no vLLM import.

``KvEventTranslator`` turns the batches into Baton's ``KvEvent``s. A stored block keeps
vLLM's block hash as its ``block_hash`` (the router's per-worker external name, used for
parents and removals) and gets Baton's ``tokens_hash`` from its token ids, so the router
matches vLLM's blocks with the hashes it computes from a request's tokens. The translator
also keeps what vLLM holds, to answer a feed's snapshot, and tells its owner when a sequence
number was skipped (the owner asks vLLM's replay socket for the missing batches).
"""

from __future__ import annotations

import msgspec

from baton.kv.events import KvCleared, KvEvent, KvEventData, KvRemoved, KvStored
from baton.kv.hashing import compute_local_hashes

PRIMARY_MEDIA = frozenset({None, "GPU"})
"""The tier vLLM computes in (its "GPU" medium, which a CPU build uses as well). Blocks an
offloading connector reports in other media are not in the cache a request can hit."""

_U64 = (1 << 64) - 1


class VllmBlockStored(msgspec.Struct, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class VllmBlockRemoved(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None = None


class VllmAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


VllmEvent = VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared


class VllmEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[VllmEvent]
    data_parallel_rank: int | None = None


_decoder = msgspec.msgpack.Decoder(VllmEventBatch)


def decode_batch(payload: bytes) -> VllmEventBatch:
    """One published payload; raises ``msgspec.DecodeError`` or ``ValidationError``."""
    return _decoder.decode(payload)


def external_hash(value: int | bytes) -> int:
    """vLLM's block hash as a u64: ints as they are, bytes (its sha256 hashes, when int
    hashes are switched off) by their last eight bytes, as vLLM converts them itself."""
    if isinstance(value, bytes):
        return int.from_bytes(value, "big") & _U64
    return value & _U64


class KvEventTranslator:
    """vLLM batches in order -> Baton events with ids from 0; what vLLM holds, as a snapshot."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.next_seq: int | None = None
        """The sequence number expected next (None before the first batch)."""
        self.last_event_id = -1
        self._held: dict[int, tuple[int | None, int]] = {}
        """vLLM block hash -> (its parent's, its Baton local hash), in the order stored."""

    def gap(self, seq: int) -> bool:
        """True when batch ``seq`` comes after missed ones (ask for a replay from
        ``next_seq``); a batch at or below ``next_seq`` is a duplicate and is skipped."""
        return self.next_seq is not None and seq > self.next_seq

    def translate(self, seq: int, batch: VllmEventBatch) -> list[KvEvent]:
        """Baton's events for batch ``seq`` (none for a duplicate)."""
        if self.next_seq is not None and seq < self.next_seq:
            return []
        self.next_seq = seq + 1
        out: list[KvEvent] = []
        for event in batch.events:
            data = self._apply(event)
            if data is not None:
                self.last_event_id += 1
                out.append(KvEvent(event_id=self.last_event_id, data=data))
        return out

    def resync(self) -> list[KvEvent]:
        """Batches were lost for good (beyond vLLM's replay buffer): what the router knows of
        this worker is dropped, as after a clear; blocks stored later are reported again."""
        self._held.clear()
        self.last_event_id += 1
        return [KvEvent(event_id=self.last_event_id, data=KvCleared())]

    def snapshot(self) -> tuple[int, list[KvStored]]:
        """The blocks vLLM holds, one stored event per block, parents first; a block whose
        parent was evicted cannot be matched by any prefix and is left out."""
        stored: list[KvStored] = []
        known: set[int] = set()
        for block, (parent, local) in self._held.items():
            if parent is None or parent in known:
                stored.append(KvStored(parent, [block], [local]))
                known.add(block)
        return self.last_event_id, stored

    @property
    def num_held(self) -> int:
        return len(self._held)

    def _apply(self, event: VllmEvent) -> KvEventData | None:
        if isinstance(event, VllmAllBlocksCleared):
            self._held.clear()
            return KvCleared()
        if event.medium not in PRIMARY_MEDIA:
            return None
        if isinstance(event, VllmBlockRemoved):
            removed = [external_hash(h) for h in event.block_hashes]
            for block in removed:
                self._held.pop(block, None)
            return KvRemoved(removed)
        return self._stored(event)

    def _stored(self, event: VllmBlockStored) -> KvStored | None:
        if event.block_size != self.block_size or event.lora_id:
            return None  # not a base-model block this router can match
        blocks = [external_hash(h) for h in event.block_hashes]
        locals_ = compute_local_hashes(event.token_ids, self.block_size)
        if len(locals_) != len(blocks):
            return None  # a malformed event: its tokens do not fill its blocks
        parent = None if event.parent_block_hash is None else external_hash(event.parent_block_hash)
        prev = parent
        for block, local in zip(blocks, locals_, strict=True):
            self._held[block] = (prev, local)
            prev = block
        return KvStored(parent, blocks, list(locals_))
