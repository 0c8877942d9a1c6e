"""Block hashing: Dynamo 1.6.1 test vectors, partial blocks, incremental extension."""

from __future__ import annotations

import random
import time

from baton.kv.hashing import (
    compute_local_hashes,
    compute_sequence_hashes,
    extend_block_hashes,
)


def test_tokens_0_to_63_with_block_size_32_match_dynamo() -> None:
    local = compute_local_hashes(list(range(64)), 32)
    assert local == [5756925433886871916, 13958166640625465031]
    seq = compute_sequence_hashes(local)
    assert seq == [5756925433886871916, 16658382216643214443]


def test_tokens_1_to_32_with_block_size_16_match_dynamo() -> None:
    local = compute_local_hashes(list(range(1, 33)), 16)
    assert local == [16863443419780771464, 2287610619914608821]
    assert compute_sequence_hashes(local)[1] == 12466389667045779788


def test_trailing_partial_block_is_ignored() -> None:
    assert compute_local_hashes(list(range(1, 40)), 16) == compute_local_hashes(
        list(range(1, 33)), 16
    )
    assert compute_local_hashes(list(range(15)), 16) == []


def test_local_hash_is_position_independent_but_sequence_hash_is_not() -> None:
    block = [7] * 16
    local = compute_local_hashes(block + block, 16)
    assert local[0] == local[1]
    seq = compute_sequence_hashes(local)
    assert seq[0] != seq[1]


def test_sequence_hashes_continue_from_a_parent() -> None:
    local = compute_local_hashes(list(range(128)), 32)
    full = compute_sequence_hashes(local)
    assert compute_sequence_hashes(local[2:], parent=full[1]) == full[2:]


def test_incremental_extension_equals_hashing_everything_at_once() -> None:
    rng = random.Random(0)
    tokens = [rng.randrange(200_000) for _ in range(1000)]
    local_all, seq_all = [], []
    for n in range(0, len(tokens) + 1, 7):
        last = seq_all[-1] if seq_all else None
        local, seq = extend_block_hashes(tokens[:n], 16, len(seq_all), last)
        local_all += local
        seq_all += seq
    assert local_all == compute_local_hashes(tokens[:994], 16)
    assert seq_all == compute_sequence_hashes(local_all)
    assert len(seq_all) == 994 // 16


def test_extension_with_no_new_full_block_returns_nothing() -> None:
    assert extend_block_hashes(list(range(20)), 16, 1, 123) == ([], [])


def test_hashing_100k_tokens_takes_milliseconds() -> None:
    tokens = list(range(100_000))
    start = time.perf_counter()
    local = compute_local_hashes(tokens, 64)
    compute_sequence_hashes(local)
    assert time.perf_counter() - start < 0.1
    assert len(local) == 100_000 // 64
