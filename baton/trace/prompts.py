"""Prompts for replaying a trace against a real server, with the trace's prefix sharing intact.

Owns ``PromptBuilder``. Block ``i`` of a request is ``block_size`` token ids drawn by an RNG
seeded only with ``(seed, hash_ids[i])`` from a set of "safe" token ids, so equal hash ids give
identical token blocks and the last block is the first ``input_length mod block_size`` tokens of
its full block. ``text`` decodes those ids; the safe set is chosen so that encoding that text
with the same tokenizer (``add_special_tokens=False``) gives back exactly the same ids.

Safe tokens: ordinary (not added/special) vocabulary entries that encode back to themselves
alone and, tried in this order, either decode to a space followed by ASCII letters (byte-level
BPE and SentencePiece words) or decode to ASCII letters and digits (word-level vocabularies whose
decoder inserts the spaces). The constructor checks the chosen set by encoding every safe token
inside random sequences; tokens found in a sequence that does not round-trip are dropped and the
check repeats. Limits: the check is by sampling, so a rare pair of safe tokens could still merge
differently in some other order (not observed on byte-level BPE with space-led words, where the
pre-tokenizer splits at every space); the guarantee is about the bare prompt text - a chat
template or a BOS added by the server shifts every block by the same tokens, so shared prefixes
stay shared but block boundaries move.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from baton.preprocess import Tokenizer
from baton.trace.mooncake import DEFAULT_TRACE_BLOCK_SIZE, TraceRequest

MIN_SAFE_TOKENS = 16
_CHECK_SEQUENCE = 256
_CHECK_ROUNDS = 4


class PromptBuilder:
    """Token ids and text for trace requests, deterministic per ``(seed, hash_id)``."""

    def __init__(
        self, tokenizer: Tokenizer, block_size: int = DEFAULT_TRACE_BLOCK_SIZE, seed: int = 0
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.seed = seed
        self.safe_ids = select_safe_tokens(tokenizer, seed)

    def block(self, hash_id: int) -> list[int]:
        """The full ``block_size``-token block that ``hash_id`` names."""
        rng = random.Random(f"baton-trace:{self.seed}:{hash_id}")
        return rng.choices(self.safe_ids, k=self.block_size)

    def token_ids(self, request: TraceRequest) -> list[int]:
        """Exactly ``input_length`` ids; raises ValueError if ``hash_ids`` are too few."""
        return assemble_token_ids(request, self.block_size, self.block)

    def text(self, request: TraceRequest) -> str:
        """A prompt whose encoding by the same tokenizer is ``token_ids(request)``."""
        return self.tokenizer.decode(self.token_ids(request), skip_special_tokens=False)


def select_safe_tokens(tokenizer: Tokenizer, seed: int = 0) -> list[int]:
    """Sorted safe token ids (see the module docstring); raises ValueError if too few."""
    for candidates in _candidate_tiers(tokenizer):
        safe = _drop_unstable(tokenizer, candidates, random.Random(seed))
        if len(safe) >= MIN_SAFE_TOKENS:
            return sorted(safe)
    raise ValueError(
        f"tokenizer: fewer than {MIN_SAFE_TOKENS} tokens round-trip through decode/encode"
    )


def _candidate_tiers(tokenizer: Tokenizer) -> list[list[int]]:
    raw = tokenizer.raw
    added = set(raw.get_added_tokens_decoder())
    ids = [i for i in range(raw.get_vocab_size(with_added_tokens=True)) if i not in added]
    texts = raw.decode_batch([[i] for i in ids], skip_special_tokens=False)
    encoded = raw.encode_batch(texts, add_special_tokens=False)
    alone = [(i, t) for i, t, e in zip(ids, texts, encoded, strict=True) if e.ids == [i]]
    space_words = [i for i, t in alone if t[:1] == " " and t[1:].isascii() and t[1:].isalpha()]
    bare_words = [i for i, t in alone if t.isascii() and t.isalnum()]
    return [space_words, bare_words]


def _drop_unstable(tokenizer: Tokenizer, candidates: list[int], rng: random.Random) -> list[int]:
    """Drop tokens seen in sequences that do not round-trip, until every sequence does."""
    safe = list(candidates)
    for _ in range(_CHECK_ROUNDS):
        bad = _unstable_tokens(tokenizer, safe, rng)
        if not bad:
            return safe
        safe = [i for i in safe if i not in bad]
    return safe if not _unstable_tokens(tokenizer, safe, rng) else []


def _unstable_tokens(tokenizer: Tokenizer, safe: list[int], rng: random.Random) -> set[int]:
    if not safe:
        return set()
    order = rng.sample(safe, len(safe))
    order += rng.choices(safe, k=(-len(order)) % _CHECK_SEQUENCE or _CHECK_SEQUENCE)
    sequences = [order[i : i + _CHECK_SEQUENCE] for i in range(0, len(order), _CHECK_SEQUENCE)]
    texts = tokenizer.raw.decode_batch(sequences, skip_special_tokens=False)
    encoded = tokenizer.raw.encode_batch(texts, add_special_tokens=False)
    bad: set[int] = set()
    for seq, enc in zip(sequences, encoded, strict=True):
        if enc.ids != seq:
            bad.update(seq)
    return bad


def assemble_token_ids(
    request: TraceRequest, block_size: int, block: Callable[[int], list[int]]
) -> list[int]:
    """A request's ``input_length`` prompt ids: ``block(hash_id)`` for each of its blocks
    (so equal hash ids give equal blocks), the last one cut to length. Raises ValueError
    if ``hash_ids`` are too few for ``input_length``."""
    needed = num_blocks_needed(request, block_size)
    ids: list[int] = []
    for hash_id in request.hash_ids[:needed]:
        ids.extend(block(hash_id))
    del ids[request.input_length :]
    return ids


def num_blocks_needed(request: TraceRequest, block_size: int) -> int:
    """How many of ``hash_ids`` a request's ``input_length`` covers; raises ValueError if it
    has fewer."""
    needed = -(-request.input_length // block_size)
    if len(request.hash_ids) < needed:
        raise ValueError(
            f"hash_ids has {len(request.hash_ids)} ids, input_length {request.input_length} "
            f"needs {needed} blocks of {block_size}"
        )
    return needed
