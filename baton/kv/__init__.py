"""The KV cache shared by engines and routers: block hashing (Dynamo compatible), the block
pool with its prefix cache, and the KV events that describe the cache to routers (pure and
synchronous: no I/O, no clock, no asyncio); where block bytes live (``store.py``) and how they
move between workers (``transfer.py``, asyncio; import it from there).
"""

from __future__ import annotations

from baton.kv.block_pool import BlockPool, KVBlock, NoFreeBlocksError
from baton.kv.events import KvCleared, KvEvent, KvEventData, KvRemoved, KvStored
from baton.kv.hashing import (
    XXH3_SEED,
    BlockSize,
    LocalBlockHash,
    SequenceHash,
    compute_local_hashes,
    compute_sequence_hashes,
    extend_block_hashes,
)

__all__ = [
    "XXH3_SEED",
    "BlockPool",
    "BlockSize",
    "KVBlock",
    "KvCleared",
    "KvEvent",
    "KvEventData",
    "KvRemoved",
    "KvStored",
    "LocalBlockHash",
    "NoFreeBlocksError",
    "SequenceHash",
    "compute_local_hashes",
    "compute_sequence_hashes",
    "extend_block_hashes",
]
