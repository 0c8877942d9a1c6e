"""Token ids for simulated trace requests, without a tokenizer.

Block ``i`` of a request is ``block_size`` ids drawn by an RNG seeded only with
``(seed, hash_ids[i])``, so equal hash ids give identical token blocks (and so identical KV
block hashes in the engine and the router) and different ids give, with overwhelming
probability, different blocks. The last block is cut to ``input_length mod block_size``
tokens. Ids lie in ``[0, vocab_size)``; the simulator never decodes them.
"""

from __future__ import annotations

import random
from array import array

from baton.trace import DEFAULT_TRACE_BLOCK_SIZE, TraceRequest
from baton.trace.prompts import assemble_token_ids

DEFAULT_VOCAB_SIZE = 65536


class SimPromptBuilder:
    """Deterministic token ids per ``(seed, hash_id)``; no tokenizer, no cache."""

    def __init__(
        self,
        block_size: int = DEFAULT_TRACE_BLOCK_SIZE,
        seed: int = 0,
        vocab_size: int = DEFAULT_VOCAB_SIZE,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not 1 <= vocab_size <= 65536:
            raise ValueError(f"vocab_size must be within [1, 65536], got {vocab_size}")
        self.block_size = block_size
        self.seed = seed
        self.vocab_size = vocab_size

    def block(self, hash_id: int) -> list[int]:
        """The full ``block_size``-token block that ``hash_id`` names."""
        rng = random.Random(f"baton-sim:{self.seed}:{hash_id}")
        ids = array("H")
        ids.frombytes(rng.randbytes(2 * self.block_size))
        if self.vocab_size == 65536:
            return ids.tolist()
        v = self.vocab_size
        return [i % v for i in ids]

    def token_ids(self, request: TraceRequest) -> list[int]:
        """Exactly ``input_length`` ids; raises ValueError if ``hash_ids`` are too few."""
        return assemble_token_ids(request, self.block_size, self.block)
