"""vLLM's KV event batches, as its ZMQ publisher encodes them, in Baton's terms.

Payloads are built as vLLM's wire format (msgpack; a batch is an array, each event a map
tagged ``type``); where vLLM is installed, also by vLLM's own event classes, so a change of
its format fails here rather than silently in the router.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from baton.engine.vllm.events import KvEventTranslator, decode_batch, external_hash
from baton.kv.events import KvCleared, KvEvent, KvRemoved, KvStored
from baton.kv.hashing import compute_local_hashes, compute_sequence_hashes
from baton.router.indexer import KvIndex

BLOCK = 4


def stored(hashes: list[int | bytes], parent: int | bytes | None, tokens: list[int],
           **extra: object) -> dict[str, object]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": BLOCK, "lora_id": None, "medium": "GPU",
            "lora_name": None, **extra}


def batch(*events: dict[str, object]) -> bytes:
    return msgspec.msgpack.encode([1.5, list(events), None])


def test_stored_blocks_get_batons_local_hashes_and_keep_vllms_names() -> None:
    tr = KvEventTranslator(BLOCK)
    tokens = list(range(100, 112))
    out = tr.translate(0, decode_batch(batch(stored([11, 12, 13], None, tokens))))
    assert [e.event_id for e in out] == [0]
    data = out[0].data
    assert isinstance(data, KvStored)
    assert data.block_hashes == [11, 12, 13] and data.parent_hash is None
    assert data.tokens_hashes == compute_local_hashes(tokens, BLOCK)

    more = tr.translate(1, decode_batch(batch(stored([14], 13, [1, 2, 3, 4]),
                                              {"type": "BlockRemoved", "block_hashes": [11],
                                               "medium": "GPU"})))
    assert [e.event_id for e in more] == [1, 2]
    assert more[0].data == KvStored(13, [14], compute_local_hashes([1, 2, 3, 4], BLOCK))
    assert more[1].data == KvRemoved([11])
    last, snapshot = tr.snapshot()
    assert last == 2
    # block 11 left: 12 (its child) and those after it can no longer be matched from a root
    assert snapshot == []


def test_the_router_matches_vllm_blocks_by_the_tokens_of_a_request() -> None:
    tokens = list(range(7, 7 + 4 * BLOCK))
    tr = KvEventTranslator(BLOCK)
    index = KvIndex()
    for event in tr.translate(0, decode_batch(batch(stored([901, 902], None, tokens[:8]),
                                                    stored([903, 904], 902, tokens[8:])))):
        event.worker_id = 5
        index.apply_event(event)
    request = compute_sequence_hashes(compute_local_hashes(tokens, BLOCK))
    assert index.find_matches(request).scores == {5: 4}
    _, snapshot = tr.snapshot()
    assert [s.block_hashes for s in snapshot] == [[901, 902, 903, 904]]


def test_byte_hashes_duplicates_gaps_and_clears() -> None:
    tr = KvEventTranslator(BLOCK)
    digest = bytes(range(32))
    out = tr.translate(3, decode_batch(batch(stored([digest], None, [1, 2, 3, 4]))))
    assert out[0].data.block_hashes == [external_hash(digest)]  # type: ignore[union-attr]
    assert external_hash(digest) == int.from_bytes(digest[-8:], "big")
    assert tr.translate(3, decode_batch(batch(stored([5], None, [1, 2, 3, 4])))) == []
    assert not tr.gap(4) and tr.gap(6)
    wrong_size = stored([7], None, [5, 6, 7, 8], block_size=BLOCK * 2)
    assert tr.translate(5, decode_batch(batch(wrong_size))) == []
    cleared = tr.translate(6, decode_batch(batch({"type": "AllBlocksCleared"})))
    assert cleared[0].data == KvCleared() and tr.snapshot()[1] == []
    assert tr.resync()[0].data == KvCleared()


def test_blocks_vllm_offloads_to_cpu_stay_announced_in_the_host_tier() -> None:
    """vLLM's native CPU offloading reports blocks in the "CPU" medium: a block evicted from
    the GPU medium but kept on CPU moves to the host tier; gone from both, it is removed."""
    tr = KvEventTranslator(BLOCK)
    tokens = list(range(20, 32))
    local = compute_local_hashes(tokens, BLOCK)
    gpu = tr.translate(0, decode_batch(batch(stored([1, 2, 3], None, tokens))))
    assert [e.data for e in gpu] == [KvStored(None, [1, 2, 3], local)]
    offload = stored([2, 3], 1, tokens[BLOCK:], medium="CPU")
    assert tr.translate(1, decode_batch(batch(offload))) == []  # still on the GPU: no news
    evict = {"type": "BlockRemoved", "block_hashes": [3, 2], "medium": "GPU"}
    moved = tr.translate(2, decode_batch(batch(evict)))
    assert [e.data for e in moved] == [KvStored(1, [2, 3], local[1:], tier=1)]
    index = KvIndex()
    for event in gpu + moved:
        index.apply_event(event)
    request = compute_sequence_hashes(local)
    assert index.find_matches(request).lower == {0: (2, 0)}
    gone = {"type": "BlockRemoved", "block_hashes": [3], "medium": "CPU"}
    assert [e.data for e in tr.translate(3, decode_batch(batch(gone)))] == [KvRemoved([3])]
    disk = stored([3], 2, tokens[2 * BLOCK:], medium="DISK")
    assert [e.data for e in tr.translate(4, decode_batch(batch(disk)))] == [
        KvStored(2, [3], local[2:], tier=2)]
    assert tr.snapshot()[1] == [KvStored(None, [1], local[:1]), KvStored(1, [2], local[1:2], 1),
                                KvStored(2, [3], local[2:], 2)]


def test_vllms_own_encoder_decodes_here() -> None:
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    ev = kv_events.BlockStored(block_hashes=[21, 22], parent_block_hash=None,
                               token_ids=list(range(8)), block_size=BLOCK, lora_id=None,
                               medium="GPU", lora_name=None)
    gone = kv_events.BlockRemoved(block_hashes=[22], medium="GPU")
    payload = msgspec.msgpack.Encoder().encode(
        kv_events.KVEventBatch(ts=0.0, events=[ev, gone, kv_events.AllBlocksCleared()]))
    out = KvEventTranslator(BLOCK).translate(0, decode_batch(payload))
    assert [type(e.data) for e in out] == [KvStored, KvRemoved, KvCleared]
    assert out[0].data == KvStored(None, [21, 22], compute_local_hashes(list(range(8)), BLOCK))


async def test_missed_batches_come_back_from_vllms_replay_socket() -> None:
    """vLLM's own publisher, with a replay buffer of 3 batches: batches 1-2 missed are fetched
    back in order; when the buffer no longer holds them (0-1 of 0-5), the router is told to
    forget the worker's blocks, then gets what is left."""
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    import asyncio

    import zmq.asyncio

    from baton.config import EngineConfig, SchedulerConfig
    from baton.engine.vllm.engine import VllmEngine

    engine = VllmEngine(EngineConfig(kind="vllm", scheduler=SchedulerConfig(block_size=BLOCK)),
                        Path("unused"))
    got: list[KvEvent] = []
    engine.set_kv_event_sink(got.extend)
    publisher = kv_events.ZmqEventPublisher(
        data_parallel_rank=0, endpoint=engine._events_endpoint,
        replay_endpoint=engine._replay_endpoint, buffer_steps=3)
    ctx = zmq.asyncio.Context.instance()
    try:
        for i in range(4):
            publisher.publish(kv_events.KVEventBatch(ts=0.0, events=[kv_events.BlockStored(
                block_hashes=[100 + i], parent_block_hash=None, token_ids=[i] * BLOCK,
                block_size=BLOCK, lora_id=None, medium="GPU", lora_name=None)]))
        await asyncio.sleep(0.5)  # the publisher thread has sent and buffered them
        engine._translator.next_seq = 1
        await engine._replay(ctx, 3)
        assert [e.data.block_hashes for e in got] == [[101], [102]]  # type: ignore[union-attr]
        assert engine._translator.next_seq == 3

        got.clear()
        engine._translator.next_seq = 0  # as if 0..3 were missed: the buffer holds 1..3 only
        await engine._replay(ctx, 4)
        assert isinstance(got[0].data, KvCleared)
        assert [e.data.block_hashes for e in got[1:]] == [[101], [102], [103]]  # type: ignore[union-attr]
    finally:
        publisher.shutdown()
        await engine.close()
