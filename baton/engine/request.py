"""One request as the scheduler sees it: tokens, progress, blocks and block hashes.

The scheduler reasons only in ``num_computed_tokens`` versus ``num_tokens`` (prompt plus
outputs): a request with uncomputed tokens is "catching up", whether that is its prompt, the
recompute after a preemption, or the single newest token of a decode. There is no separate
prefill/decode phase. This module holds data and small derived properties only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from baton.kv.block_pool import KVBlock
from baton.kv.hashing import LocalBlockHash, SequenceHash, extend_block_hashes
from baton.protocol import FinishReason, KvTransferParams, SamplingParams


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request. Members are ordered so that ``is_finished`` is one comparison."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    LOADING_KV = 3
    """Admitted with blocks, waiting for its prompt's KV from a prefill worker."""
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        """The OpenAI finish reason of a finished status, None otherwise."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "cancelled",
}


@dataclass(slots=True, eq=False)
class Request:
    """A request inside the scheduler. Build it with the first three fields; the scheduler
    owns every other field from ``add_request`` on."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    hold_kv: bool = False
    """Prefill leg of a disaggregated request: keep the KV blocks when it finishes."""
    remote_kv: KvTransferParams | None = None
    """Decode leg: load the prompt's KV from here at admission instead of computing it."""
    # -- progress
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None
    """Prompt tokens served from the prefix cache at the first admission (None before it),
    including those onboarded from the KV tiers."""
    num_onboarding_tokens: int = 0
    """While ``LOADING_KV`` from this worker's KV tiers: prompt tokens computed once done."""
    is_prefilling: bool = False
    """Admitted and not yet sampled since that admission (prompt or recompute tokens)."""
    num_preemptions: int = 0
    # -- KV cache
    blocks: list[KVBlock] = field(default_factory=list)
    num_committed_blocks: int = 0
    """Leading blocks already offered to the prefix cache (hits count as committed)."""
    local_hashes: list[LocalBlockHash] = field(default_factory=list)
    block_hashes: list[SequenceHash] = field(default_factory=list)
    """Sequence hashes of every full block of ``all_token_ids``."""

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def append_output(self, token_id: int, block_size: int) -> None:
        """Append one sampled token and hash the block it completes, if any."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if len(self.all_token_ids) >= (len(self.block_hashes) + 1) * block_size:
            self.update_block_hashes(block_size)  # otherwise no block is full and unhashed

    def update_block_hashes(self, block_size: int) -> None:
        """Extend ``block_hashes`` to cover every full block of the tokens so far."""
        last = self.block_hashes[-1] if self.block_hashes else None
        local, seq = extend_block_hashes(
            self.all_token_ids, block_size, len(self.block_hashes), last
        )
        self.local_hashes.extend(local)
        self.block_hashes.extend(seq)
