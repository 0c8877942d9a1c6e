"""vLLM's KV cache events, read off its ZMQ publisher and put in Baton's terms. No I/O.

vLLM publishes each batch as a ZMQ multipart message ``(topic, seq, payload)``: ``seq`` is a
big-endian u64 that grows by one per batch, ``payload`` a msgpack ``KVEventBatch`` (an array
``[ts, events, data_parallel_rank]``; each event a map tagged ``type``: ``BlockStored``,
``BlockRemoved`` or ``AllBlocksCleared``). The structs below decode that wire format and
nothing else, so this module needs no vLLM import.

``KvEventTranslator`` turns the batches into Baton's ``KvEvent``s. A stored block keeps
vLLM's block hash as its ``block_hash`` (the router's per-worker external name, used for
parents and removals) and gets Baton's ``tokens_hash`` from its token ids, so the router
matches vLLM's blocks with the hashes it computes from a request's tokens. An event's
``medium`` names its tier: "GPU" (or none) the device, "CPU" host memory (vLLM's native CPU
offloading), any other a slower one (disk); what vLLM holds in any medium is one stream, as
Baton's own tiers tell it (``HeldBlocks``: stored when first held, stored again when its
fastest tier changes, removed when no medium holds it). The translator keeps that state to
answer a feed's snapshot, and tells its owner when a sequence number was skipped (the owner
asks vLLM's replay socket for the missing batches).
"""

from __future__ import annotations

import msgspec

from baton.kv.events import KvCleared, KvEvent, KvEventData, KvRemoved, KvStored
from baton.kv.hashing import compute_local_hashes
from baton.kv.tiers import HeldBlocks, Tier

MEDIA = {None: Tier.DEVICE, "GPU": Tier.DEVICE, "CPU": Tier.HOST}
"""vLLM's media and Baton's tiers: "GPU" is the tier vLLM computes in (a CPU build uses it as
well), "CPU" where its offloading connector keeps blocks; any other medium counts as disk."""

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
        self._held = HeldBlocks()
        """What vLLM holds in any medium, by vLLM block hash."""

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
            for data in self._apply(event):
                self.last_event_id += 1
                out.append(KvEvent(event_id=self.last_event_id, data=data))
        return out

    def resync(self) -> list[KvEvent]:
        """Batches were lost for good (beyond vLLM's replay buffer): what the router knows of
        this worker is dropped, as after a clear; blocks stored later are reported again."""
        self._held = HeldBlocks()
        self.last_event_id += 1
        return [KvEvent(event_id=self.last_event_id, data=KvCleared())]

    def snapshot(self) -> tuple[int, list[KvStored]]:
        """The blocks vLLM holds, as stored chains in their tiers, parents first; a block
        whose parent was evicted cannot be matched by any prefix and is left out."""
        return self.last_event_id, self._held.snapshot()

    @property
    def num_held(self) -> int:
        return len(self._held)

    def _apply(self, event: VllmEvent) -> list[KvEventData]:
        if isinstance(event, VllmAllBlocksCleared):
            self._held = HeldBlocks()
            return [KvCleared()]
        tier = MEDIA.get(event.medium, Tier.DISK)
        data: KvEventData | None
        if isinstance(event, VllmBlockRemoved):
            data = KvRemoved([external_hash(h) for h in event.block_hashes])
        else:
            data = self._stored(event)
        if data is None:
            return []
        if tier is Tier.DEVICE:
            return self._held.take([data], [])
        return self._held.take([], [(tier, data)])

    def _stored(self, event: VllmBlockStored) -> KvStored | None:
        if event.block_size != self.block_size or event.lora_id:
            return None  # not a base-model block this router can match
        blocks = [external_hash(h) for h in event.block_hashes]
        locals_ = compute_local_hashes(event.token_ids, self.block_size)
        if len(locals_) != len(blocks):
            return None  # a malformed event: its tokens do not fill its blocks
        parent = None if event.parent_block_hash is None else external_hash(event.parent_block_hash)
        return KvStored(parent, blocks, list(locals_))
