"""The KV cache shared by engines and routers: block hashing (Dynamo compatible), the block
pool with its prefix cache, the KV events that describe the cache to routers, and where
block bytes live (``store.py``, with the block copy helpers). Pure and synchronous: no
asyncio, no sockets, no clock, no runtime (a test enforces it). Moving blocks between
workers is ``baton.transfer``'s job. ``tiers.py`` keeps the books of the KV tiers below the
device pool (host memory, disk) and plans their copies; engines do not use it yet.
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
