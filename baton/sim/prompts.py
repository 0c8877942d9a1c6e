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
from baton.trace.prompts import num_blocks_needed

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
        self._rng = random.Random()

    def block(self, hash_id: int) -> list[int]:
        """The full ``block_size``-token block that ``hash_id`` names."""
        return self._ids(self._block_bytes(hash_id))

    def token_ids(self, request: TraceRequest) -> list[int]:
        """Exactly ``input_length`` ids; raises ValueError if ``hash_ids`` are too few.

        The blocks as ``assemble_token_ids`` would join them (the last one cut to length),
        but joined as bytes and turned into ints once: prompts run to thousands of tokens."""
        needed = num_blocks_needed(request, self.block_size)
        data = b"".join(map(self._block_bytes, request.hash_ids[:needed]))
        return self._ids(data[: 2 * request.input_length])

    def _block_bytes(self, hash_id: int) -> bytes:
        """A block's ids as native-endian uint16 bytes; ``seed`` on a kept ``Random`` sets
        the state that ``Random(same seed)`` would start from."""
        rng = self._rng
        rng.seed(f"baton-sim:{self.seed}:{hash_id}")
        return rng.randbytes(2 * self.block_size)

    def _ids(self, data: bytes) -> list[int]:
        ids = array("H")
        ids.frombytes(data)
        if self.vocab_size == 65536:
            return ids.tolist()
        v = self.vocab_size
        return [i % v for i in ids]
