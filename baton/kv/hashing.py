"""Block hashing, bit-compatible with Dynamo's KV router (``lib/kv-router/src/protocols.rs``).

Owns the two block identifiers every KV component agrees on:

* a **local block hash** (``LocalBlockHash``, Dynamo's ``tokens_hash``): ``xxh3_64`` of one full
  block's tokens written as little-endian u32, seed 1337. Position independent.
* a **sequence hash** (``SequenceHash``): the local hash chained with everything before it,
  ``seq[0] = local[0]`` and ``seq[i] = xxh3_64(le_u64(seq[i-1]) || le_u64(local[i]), seed 1337)``.
  Two blocks share a sequence hash only when they share the whole prefix.

Only full blocks are hashed; a trailing partial block is ignored until it fills. Verified against
Dynamo 1.6.1 vectors (see ``tests/test_hashing.py``); byte order is little-endian throughout, as
documented by Dynamo, with no swapping needed. Pure functions, no I/O.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import NewType, cast

import xxhash

BlockSize = NewType("BlockSize", int)
LocalBlockHash = NewType("LocalBlockHash", int)
SequenceHash = NewType("SequenceHash", int)

XXH3_SEED = 1337
"""Dynamo's seed for both the local and the chained hash (no LoRA, no cache salt)."""

_PAIR = struct.Struct("<QQ")
_xxh3 = xxhash.xxh3_64_intdigest


def _token_bytes(tokens: Sequence[int]) -> bytes:
    """The tokens as packed little-endian u32."""
    packed = array("I")
    if packed.itemsize != 4:  # pragma: no cover - exotic platforms only
        raise RuntimeError("array('I') is not 32-bit on this platform")
    if type(tokens) is list:
        packed.fromlist(tokens)  # about 5x faster than array("I", tokens) for a list
    else:
        packed.extend(tokens)
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def compute_local_hashes(
    tokens: Sequence[int], block_size: int, seed: int = XXH3_SEED
) -> list[LocalBlockHash]:
    """``xxh3_64`` of each full block of ``tokens``; the trailing partial block is dropped."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_full = len(tokens) // block_size
    if num_full == 0:
        return []
    data = _token_bytes(tokens)  # a trailing partial block is packed but never hashed
    stride = block_size * 4
    xxh3 = _xxh3
    # slicing bytes (a 64-byte copy per block) is cheaper than slicing a memoryview here
    hashes = [xxh3(data[i : i + stride], seed) for i in range(0, num_full * stride, stride)]
    return cast("list[LocalBlockHash]", hashes)


def compute_sequence_hashes(
    local_hashes: Sequence[int],
    seed: int = XXH3_SEED,
    parent: SequenceHash | None = None,
) -> list[SequenceHash]:
    """Chain ``local_hashes`` into sequence hashes, continuing from ``parent`` when given."""
    out: list[int] = []
    if not local_hashes:
        return []
    xxh3, pack, append = _xxh3, _PAIR.pack, out.append
    prev = local_hashes[0] if parent is None else xxh3(pack(parent, local_hashes[0]), seed)
    append(prev)
    for local in local_hashes[1:]:
        prev = xxh3(pack(prev, local), seed)
        append(prev)
    return cast("list[SequenceHash]", out)


def extend_block_hashes(
    tokens: Sequence[int],
    block_size: int,
    num_hashed: int,
    last_seq_hash: SequenceHash | None,
    seed: int = XXH3_SEED,
) -> tuple[list[LocalBlockHash], list[SequenceHash]]:
    """Hashes of the full blocks of ``tokens`` after the first ``num_hashed`` blocks.

    ``tokens`` is the whole sequence so far; ``last_seq_hash`` is the sequence hash of block
    ``num_hashed - 1`` (None when nothing is hashed yet). Returns only the new hashes, so a
    growing sequence pays for each block once.
    """
    start = num_hashed * block_size
    if len(tokens) - start < block_size:
        return [], []
    # no copy of a whole prompt (start 0): those run to many thousands of tokens
    local = compute_local_hashes(tokens[start:] if start else tokens, block_size, seed)
    return local, compute_sequence_hashes(local, seed, parent=last_seq_hash)
