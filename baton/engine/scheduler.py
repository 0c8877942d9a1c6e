"""Continuous-batching scheduler with chunked prefill, prefix caching and preemption.

Owns the waiting and running queues and the ``BlockPool``; decides, step by step, which
requests compute how many tokens. After vLLM v1 and Dynamo's mocker: one token budget per step,
spent on running requests first, then on admitting waiting ones in FIFO order. When blocks run
out, a running request is preempted (``lifo``: the newest admitted, ``fifo``: the oldest) and
recomputed later from scratch, helped by the prefix cache.

It never sleeps, samples or does I/O: the engine shell alternates ``schedule()`` ->
(simulate or run the step) -> ``update_from_output(output, sampled)``, passing one sampled
token for each id in ``output.requests_needing_sample``.

Disaggregated serving adds two lifecycles. A ``hold_kv`` request (the prefill leg) keeps its
blocks when it finishes, in ``held``, until the shell calls ``release_held`` (its decode worker
has copied them). A ``remote_kv`` request (the decode leg) is admitted with blocks for the
part of its prompt that its own prefix cache lacks and waits in ``loading`` (status
``LOADING_KV``) while the shell copies that KV in (``output.kv_loads``); ``finish_kv_load``
then makes it a running request with everything but its last prompt token computed, or, when
the load failed, with only its local prefix hits computed (a local prefill, the fallback).

KV tiers (``host_kv_blocks`` > 0, ``kv/tiers.py``): cached blocks the pool hands out again go
down to host memory (and disk), as ``output.kv_copies`` to run before the step's forward
pass; a request whose cached prefix continues in a tier is admitted into ``LOADING_KV`` with
the copies up planned, and ``finish_kv_load`` counts those tokens as computed and cached.

Size: one state machine over one block pool. Its queues, its three ways in (prefix hits,
remote KV, tier onboarding) and its invariants share the requests' and the pool's state;
split, each part would reach into the others'.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping, Sequence

from baton.config import SchedulerConfig
from baton.engine.base import EngineLoad
from baton.engine.request import Request, RequestStatus
from baton.engine.step import DecodeRun, KvLoad, SchedulerOutput, StepBuilder, StepResult
from baton.kv.block_pool import BlockPool, KVBlock
from baton.kv.events import KvEvent, KvEventData, KvStored
from baton.kv.hashing import SequenceHash
from baton.kv.onboard_choice import OnboardCosts
from baton.kv.shared_tier import MemoryIndex, SharedIndex, SharedTier
from baton.kv.tiers import Copy, HeldBlocks, KvTiers, Tier, TierBlock
from baton.protocol import KvTransferParams

_RUNNING = RequestStatus.RUNNING
"""For the per-request loops: reading an enum member off its class is slow on Python 3.11."""


class Scheduler:
    """Waiting/running queues over one ``BlockPool``."""

    def __init__(self, config: SchedulerConfig, *, worker_id: int = 0,
                 shared_kv: SharedIndex | None = None,
                 onboard_costs: OnboardCosts | None = None) -> None:
        """``shared_kv``: what the KV store shared with other workers holds (with
        ``shared_kv_blocks`` > 0; a private in-memory one by default). ``onboard_costs``: the
        times to read a block from each tier and to compute it, so that a prefix a tier
        would read more slowly is recomputed (None: whatever the tiers hold is onboarded)."""
        self.config = config
        self.worker_id = worker_id
        self.onboard_costs = onboard_costs
        self.recomputed_tier_blocks: dict[str, int] = {}
        """Blocks found in a lower tier (by name) and recomputed, reading them being slower."""
        self.tiers: KvTiers | None = None
        """The host, disk and shared tiers below the pool, with ``host_kv_blocks`` > 0."""
        if config.kv_tiers:
            shared = None
            if config.shared_kv_blocks:
                shared = SharedTier(config.shared_kv_blocks,
                                    MemoryIndex() if shared_kv is None else shared_kv)
            self.tiers = KvTiers(config.host_kv_blocks, config.disk_kv_blocks,
                                 disk_admission=config.disk_kv_admission, shared=shared)
        self.pool = BlockPool(
            config.num_blocks, config.block_size, config.enable_prefix_caching, worker_id=worker_id,
            keep_evicted=self.tiers is not None,
            keep_committed=self.tiers is not None and config.host_kv_write_through,
        )
        self._copies: list[Copy] = []
        """Tier copies planned by this ``schedule()``, in order."""
        self.held_blocks = HeldBlocks()
        """With tiers: what this worker holds anywhere, the blocks its events announce."""
        self._held_events: list[KvEventData] = []
        self._next_event_id = 0
        # -- queues: every live request is in exactly one of waiting / running
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loading: dict[str, Request] = {}
        """Admitted, waiting for remote KV. An aborted one stays until its load ends."""
        self.held: dict[str, Request] = {}
        """Finished ``hold_kv`` requests whose blocks wait for ``release_held``."""
        # -- bookkeeping
        self._in_flight: SchedulerOutput | None = None
        self._decode_fast_path = True
        """Take ``_schedule_decodes`` when it applies (tests turn it off to compare)."""

    # ---- requests in and out ------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        """Queue a new request. Raises ValueError if it could never be scheduled."""
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request_id {req.request_id!r}")
        self.check_fits(req)
        req.status = RequestStatus.WAITING
        req.update_block_hashes(self.config.block_size)
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort_request(self, request_id: str) -> bool:
        """Finish a request as aborted and free its blocks at once, except while its KV is
        loading: those blocks are freed when the load ends (``finish_kv_load``)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return self.release_held(request_id)
        if req.status is RequestStatus.LOADING_KV:
            req.status = RequestStatus.FINISHED_ABORTED
        elif req in self.running:
            self.running.remove(req)
            self._release(req, RequestStatus.FINISHED_ABORTED)
        else:
            self.waiting.remove(req)
            self._release(req, RequestStatus.FINISHED_ABORTED)
        return True

    def release_held(self, request_id: str) -> bool:
        """Free the blocks a finished ``hold_kv`` request kept. False if none are held."""
        req = self.held.pop(request_id, None)
        if req is None:
            return False
        self.pool.free(req.blocks)
        req.blocks = []
        return True

    def finish_kv_load(self, request_id: str, ok: bool) -> None:
        """A ``LOADING_KV`` request's copy ended. With ``ok`` its prompt (but the last
        token) counts as computed; otherwise only its local prefix hits do, and the rest is
        prefilled here. A request aborted meanwhile just frees its blocks."""
        req = self.loading.pop(request_id)
        params, req.remote_kv = req.remote_kv, None
        onboarding, req.num_onboarding_tokens = req.num_onboarding_tokens, 0
        if req.status is not RequestStatus.LOADING_KV:  # aborted while loading
            self._release(req, req.status)
            return
        if ok and params is not None:
            req.num_computed_tokens = max(req.num_computed_tokens, self._remote_tokens(req, params))
            self._commit_full_blocks(req)
        elif ok and onboarding:
            req.num_computed_tokens = onboarding
            if not req.num_preemptions:  # cached at its first admission
                req.num_cached_tokens = onboarding
            self._commit_full_blocks(req)
        req.status = RequestStatus.RUNNING
        req.is_prefilling = True
        self.running.append(req)

    def check_fits(self, req: Request) -> None:
        """Raises ValueError if ``req`` could never be scheduled here (``add_request`` checks
        it; the simulator also checks a request a worker holds before a rank gets it)."""
        # The longest sequence ever computed is prompt + max_tokens - 1 (the final token is
        # sampled, never computed). Rejecting what cannot fit avoids preempt-forever loops.
        if not req.prompt_token_ids:
            raise ValueError(f"request {req.request_id!r} has an empty prompt")
        if req.sampling.max_tokens < 1:
            raise ValueError(f"request {req.request_id!r}: max_tokens must be >= 1")
        max_len = req.num_prompt_tokens + req.sampling.max_tokens - 1
        if _cdiv(max_len, self.config.block_size) > self.config.num_blocks:
            raise ValueError(
                f"request {req.request_id!r} may need {max_len} tokens of KV cache, more than "
                f"the {self.config.kv_tokens} the pool holds"
            )
        if not self.config.enable_chunked_prefill and max_len > self.config.max_num_batched_tokens:
            raise ValueError(
                f"request {req.request_id!r} may need {max_len} tokens in one step, more than "
                f"max_num_batched_tokens={self.config.max_num_batched_tokens} without chunked prefill"
            )

    # ---- scheduling ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts, allocating their blocks."""
        if self._in_flight is not None:
            raise RuntimeError("schedule() called twice without update_from_output()")
        if self.tiers is not None and self.config.host_kv_write_through:
            # blocks cached since the last step go down first, before any is handed out again
            self._copies.extend(self.tiers.offload(self.pool.take_committed()))
        output = self._schedule_decodes() if self._decode_fast_path else None
        if output is None:
            output = self._schedule_general()
        self._in_flight = output
        return output

    def flush_write_through(self) -> list[Copy]:
        """With write-through, between steps: the copies down of the blocks cached in the
        last step, planned now rather than at the next ``schedule()`` (a worker going idle
        would keep them from its tiers, and a shared store, until its next request)."""
        if (self.tiers is None or not self.config.host_kv_write_through
                or self._in_flight is not None):
            return []
        return self.tiers.offload(self.pool.take_committed())

    def _schedule_general(self) -> SchedulerOutput:
        step = StepBuilder(budget=self.config.max_num_batched_tokens)
        # 1. Running requests first, preempting others when blocks run out.
        self._schedule_running(step)
        # 2. Admit waiting requests, unless this step had to preempt (blocks are scarce).
        if not step.preempted:
            self._admit_waiting(step)
        # 3. Summarise for the engine shell and its timing model.
        return self._make_output(step)

    def _schedule_decodes(self) -> SchedulerOutput | None:
        """The common step in one pass, or None when it does not apply: nothing waits, and
        every running request has one token left to compute, in a block it already holds.

        ``_schedule_general`` would give the same output: the budget covers one token per
        running request, so the loop schedules each in order, allocating nothing and
        preempting no one; nothing is admitted; and each one's step reaches its last token.
        """
        running = self.running
        if self.waiting or len(running) > self.config.max_num_batched_tokens:
            return None
        block_size = self.config.block_size
        scheduled: dict[str, int] = {}
        num_prefill_tokens = prefill_pairs = context = 0
        for req in running:
            num_tokens = len(req.all_token_ids)
            if num_tokens - req.num_computed_tokens != 1 or num_tokens > len(req.blocks) * block_size:
                return None
            scheduled[req.request_id] = 1
            if req.is_prefilling:  # e.g. a decode leg's last prompt token
                num_prefill_tokens += 1
                prefill_pairs += num_tokens
            else:
                context += num_tokens
        return self._output(
            scheduled, list(scheduled), num_prefill_tokens, len(scheduled) - num_prefill_tokens,
            attention=(prefill_pairs, context),
        )

    # ---- stretches of decode-only steps (the simulator takes them in one go) ----------------

    def decode_run(self, limit: int, token_id: int) -> DecodeRun | None:
        """The decode-only steps that would follow from here if every sampled token were
        ``token_id`` and no request came in: at most ``limit``, none finishing a request (the
        step that does is an ordinary one), none needing a block the pool lacks (nor tiers,
        which copy between steps). None when the next step would not be decode-only."""
        running = self.running
        if (self._in_flight is not None or self.waiting or self.loading or self.held
                or self.tiers is not None or not running
                or len(running) > self.config.max_num_batched_tokens):
            return None
        block_size = self.config.block_size
        steps = limit
        for req in running:
            if req.is_prefilling or req.num_uncomputed_tokens != 1:
                return None
            sampling, sampled = req.sampling, len(req.output_token_ids)
            steps = min(steps, sampling.max_tokens - sampled - 1)
            if not sampling.ignore_eos and token_id in sampling.stop_token_ids:
                steps = min(steps, sampling.min_tokens - sampled - 1)
        if steps < 1:
            return None
        allocations = [0] * steps
        for req in running:
            for j in self._allocating_steps(req, steps):
                allocations[j] += 1
        free, used = self.pool.num_free_blocks, self.pool.num_used_blocks
        used_blocks: list[int] = []
        for added in itertools.accumulate(allocations):
            if added > free:
                break
            used_blocks.append(used + added)
        if not used_blocks:
            return None
        return DecodeRun(len(used_blocks), len(running),
                         sum(len(r.all_token_ids) for r in running), used_blocks,
                         self.config.kv_tokens, block_size)

    def advance_decodes(self, steps: int, token_id: int) -> None:
        """Take ``steps`` steps of the last ``decode_run`` (at most its ``steps``), each
        sampling ``token_id`` for every request: the state, blocks and KV events are those
        of as many ``schedule()`` / ``update_from_output()`` pairs, in the same order (each
        step's allocations in running order, then its full blocks cached)."""
        block_size = self.config.block_size
        allocate: dict[int, list[Request]] = {}
        commit: dict[int, list[tuple[Request, int]]] = {}
        for req in self.running:
            done = req.num_computed_tokens
            for j in self._allocating_steps(req, steps):
                allocate.setdefault(j, []).append(req)
            commit.setdefault(0, []).append((req, done + 1))
            for j in range(-(done + 1) % block_size or block_size, steps, block_size):
                commit.setdefault(j, []).append((req, done + j + 1))
            tokens = [token_id] * steps
            req.output_token_ids.extend(tokens)
            req.all_token_ids.extend(tokens)
            req.update_block_hashes(block_size)
        for j in sorted(allocate.keys() | commit.keys()):
            for req in allocate.get(j, ()):
                req.blocks.extend(self.pool.allocate(1))
            for req, computed in commit.get(j, ()):
                req.num_computed_tokens = computed
                if computed // block_size > req.num_committed_blocks:
                    self._commit_full_blocks(req)
        for req in self.running:
            req.num_computed_tokens = len(req.all_token_ids) - 1

    def _allocating_steps(self, req: Request, steps: int) -> range:
        """The decode steps (of the next ``steps``) in which ``req`` needs a new block: its
        token to compute lies past its blocks, then every ``block_size`` steps after."""
        block_size = self.config.block_size
        return range(len(req.blocks) * block_size - req.num_computed_tokens, steps, block_size)

    def _schedule_running(self, step: StepBuilder) -> None:
        block_size = self.config.block_size
        for req in list(self.running):
            if step.budget <= 0:
                break
            if req.status is not _RUNNING:
                continue  # preempted earlier in this loop
            num_new = req.num_uncomputed_tokens
            if num_new > step.budget:
                if not self.config.enable_chunked_prefill:
                    continue
                num_new = step.budget
            # Most decodes stay within their last block: nothing to allocate, no one to preempt.
            if (req.num_computed_tokens + num_new <= len(req.blocks) * block_size
                    or self._allocate_or_preempt(req, num_new, step)):
                step.add(req, num_new)

    def _allocate_or_preempt(self, req: Request, num_new: int, step: StepBuilder) -> bool:
        """Give ``req`` blocks for ``num_new`` more tokens, preempting as needed.
        False if ``req`` itself had to be preempted."""
        needed = self._num_new_blocks(req, req.num_computed_tokens + num_new)
        while not self.pool.can_allocate(needed):
            victim = self.running[-1] if self.config.preemption_mode == "lifo" else self.running[0]
            self._preempt(victim, step)
            if victim is req:
                return False
        req.blocks.extend(self.pool.allocate(needed))
        return True

    def _preempt(self, req: Request, step: StepBuilder) -> None:
        """Free ``req``'s blocks and send it to the front of waiting for a full recompute."""
        self.running.remove(req)
        step.unschedule(req)
        step.preempted.append(req.request_id)
        self.pool.free(req.blocks)
        req.blocks = []
        req.num_committed_blocks = 0
        req.num_computed_tokens = 0
        req.is_prefilling = False
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)

    def _admit_waiting(self, step: StepBuilder) -> None:
        while self.waiting and step.budget > 0 and self._num_admitted < self.config.max_num_seqs:
            req = self.waiting[0]
            admit = self._try_admit_remote if req.remote_kv is not None else self._try_admit
            if not admit(req, step):
                break
            self.waiting.popleft()

    @property
    def _num_admitted(self) -> int:
        return len(self.running) + len(self.loading)

    def _try_admit_remote(self, req: Request, step: StepBuilder) -> bool:
        """Admit a decode leg into ``LOADING_KV`` with blocks for the prompt KV it will copy
        in (past its prefix hits). Uses no token budget: nothing is computed yet."""
        assert req.remote_kv is not None
        hits = self._cached_prefix(req)
        num_remote = self._remote_tokens(req, req.remote_kv)
        needed = max(0, _cdiv(num_remote, self.config.block_size) - len(hits))
        if not self._claim_blocks(req, hits, needed):
            return False
        req.status = RequestStatus.LOADING_KV
        self.loading[req.request_id] = req
        src = req.remote_kv.block_ids[len(hits):len(req.blocks)]
        dst = [b.block_id for b in req.blocks[len(hits):len(hits) + len(src)]]
        step.kv_loads.append(KvLoad(req.request_id, src, dst, num_remote))
        return True

    @staticmethod
    def _remote_tokens(req: Request, params: KvTransferParams) -> int:
        """Prompt tokens a decode leg takes from the remote KV: never its last one, which it
        computes itself for the logits of its first output token."""
        return max(0, min(params.num_tokens, req.num_prompt_tokens - 1))

    def _try_admit(self, req: Request, step: StepBuilder) -> bool:
        """Admit ``req`` with its prefix-cache hits, if its first chunk fits budget and blocks."""
        hits = self._cached_prefix(req)
        recomputed: list[TierBlock] = []
        if self.tiers is not None:
            self._offload_evicted()  # blocks handed out earlier in this schedule count too
            below, recomputed = self._worth_onboarding(
                self.tiers.match(req.block_hashes[len(hits):self._max_hit_blocks(req)]))
            if below:
                admitted = self._try_admit_onboard(req, hits, below, step)
                if admitted:
                    self._count_recomputed(recomputed)
                return admitted
        num_cached = len(hits) * self.config.block_size
        num_new = req.num_tokens - num_cached
        if num_new > step.budget:
            if not self.config.enable_chunked_prefill:
                return False
            num_new = step.budget
        needed = _cdiv(num_cached + num_new, self.config.block_size) - len(hits)
        if not self._claim_blocks(req, hits, needed):
            return False
        req.is_prefilling = True
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        step.add(req, num_new)
        self._count_recomputed(recomputed)
        return True

    def _worth_onboarding(self, below: list[TierBlock]
                          ) -> tuple[list[TierBlock], list[TierBlock]]:
        """A run found in the tiers split into the leading part faster to read than to
        recompute (all of it without ``onboard_costs``) and the rest, to recompute."""
        if not below or self.onboard_costs is None:
            return below, []
        keep = self.onboard_costs.blocks_worth_onboarding(below)
        return below[:keep], below[keep:]

    def _count_recomputed(self, blocks: Sequence[TierBlock]) -> None:
        counts = self.recomputed_tier_blocks
        for block in blocks:
            name = block.tier.name.lower()
            counts[name] = counts.get(name, 0) + 1

    def _try_admit_onboard(self, req: Request, hits: list[KVBlock], below: list[TierBlock],
                           step: StepBuilder) -> bool:
        """Admit ``req`` into ``LOADING_KV`` with blocks for the continuation of its cached
        prefix that its tiers hold: their copies up come after this schedule's copies down
        (a block handed out here may be one whose contents go down first)."""
        if not self._claim_blocks(req, hits, len(below)):
            return False
        assert self.tiers is not None
        self._offload_evicted(keep=below)  # the blocks about to be read stay put
        dst = [b.block_id for b in req.blocks[len(hits):]]
        self._copies.extend(self.tiers.onboard(below, dst))
        num_disk = sum(1 for b in below if b.tier is Tier.DISK)
        num_shared = sum(1 for b in below if b.tier is Tier.SHARED)
        req.num_onboarding_tokens = (len(hits) + len(below)) * self.config.block_size
        req.status = RequestStatus.LOADING_KV
        self.loading[req.request_id] = req
        step.kv_loads.append(KvLoad(req.request_id, [b.slot for b in below], dst,
                                    req.num_onboarding_tokens,
                                    len(below) - num_disk - num_shared, num_disk, num_shared))
        return True

    def _offload_evicted(self, keep: Sequence[TierBlock] = ()) -> None:
        """Plans the copies down of the cached blocks the pool just handed out again."""
        if self.tiers is not None:
            evicted = self.pool.take_evicted()
            if evicted:
                self._copies.extend(self.tiers.offload(evicted, keep))

    def _claim_blocks(self, req: Request, hits: list[KVBlock], needed: int) -> bool:
        """Give ``req`` its prefix-cache hits plus ``needed`` new blocks, with the hits counted
        as computed; False (nothing changed) when the pool lacks room."""
        num_hits_in_free_queue = sum(1 for b in hits if b.ref_cnt == 0)
        if not self.pool.can_allocate(needed + num_hits_in_free_queue):
            return False
        self.pool.touch(hits)
        req.blocks = hits + self.pool.allocate(needed)
        req.num_committed_blocks = len(hits)
        req.num_computed_tokens = len(hits) * self.config.block_size
        if req.num_cached_tokens is None:
            req.num_cached_tokens = req.num_computed_tokens
        return True

    def _cached_prefix(self, req: Request) -> list[KVBlock]:
        return self.pool.get_cached_prefix(req.block_hashes[:self._max_hit_blocks(req)])

    def _max_hit_blocks(self, req: Request) -> int:
        # The last token is never served from cache: one token must be computed for a logit.
        return (req.num_tokens - 1) // self.config.block_size

    def _num_new_blocks(self, req: Request, num_tokens: int) -> int:
        return max(0, _cdiv(num_tokens, self.config.block_size) - len(req.blocks))

    def _make_output(self, step: StepBuilder) -> SchedulerOutput:
        needing_sample: list[str] = []
        num_prefill_tokens = num_decode_requests = prefill_pairs = context = 0
        for request_id, num_new in step.num_scheduled_tokens.items():
            req = self.requests[request_id]
            done = req.num_computed_tokens
            if done + num_new == req.num_tokens:
                needing_sample.append(request_id)
            if req.is_prefilling:
                num_prefill_tokens += num_new
                prefill_pairs += num_new * done + num_new * (num_new + 1) // 2
            else:
                num_decode_requests += 1
                context += done + num_new
        return self._output(
            step.num_scheduled_tokens, needing_sample, num_prefill_tokens, num_decode_requests,
            step.preempted, step.kv_loads, attention=(prefill_pairs, context),
        )

    def _output(
        self,
        scheduled: dict[str, int],
        needing_sample: list[str],
        num_prefill_tokens: int,
        num_decode_requests: int,
        preempted: list[str] | None = None,
        kv_loads: list[KvLoad] | None = None,
        attention: tuple[int, int] = (0, 0),
    ) -> SchedulerOutput:
        block_size = self.config.block_size
        self._offload_evicted()
        copies, self._copies = self._copies, []
        return SchedulerOutput(
            num_scheduled_tokens=scheduled,
            requests_needing_sample=needing_sample,
            num_prefill_tokens=num_prefill_tokens,
            num_decode_requests=num_decode_requests,
            num_kv_tokens_in_use=self.pool.num_used_blocks * block_size,
            num_kv_tokens_total=self.config.kv_tokens,
            preempted=[] if preempted is None else preempted,
            kv_loads=[] if kv_loads is None else kv_loads,
            kv_copies=copies,
            prefill_attention_pairs=attention[0],
            decode_context_tokens=attention[1],
        )

    # ---- results ------------------------------------------------------------------------

    def update_from_output(
        self, output: SchedulerOutput, sampled: Mapping[str, int]
    ) -> list[StepResult]:
        """Apply a finished step: advance progress, cache full blocks, append sampled tokens
        and finish requests. ``sampled`` must hold a token for each id in
        ``output.requests_needing_sample`` that is still running (aborted ones are skipped)."""
        if output is not self._in_flight:
            raise RuntimeError("update_from_output() expects the output of the last schedule()")
        self._in_flight = None
        results: list[StepResult] = []
        block_size = self.config.block_size
        get_request = self.requests.get
        for request_id, num_new in output.num_scheduled_tokens.items():
            req = get_request(request_id)
            if req is None or req.status is not _RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens += num_new
            if req.num_computed_tokens // block_size > req.num_committed_blocks:
                self._commit_full_blocks(req)  # otherwise no block became full
            if req.num_computed_tokens == len(req.all_token_ids):
                results.append(self._append_token(req, sampled[request_id]))
        return results

    def _commit_full_blocks(self, req: Request) -> None:
        num_full = req.num_computed_tokens // self.config.block_size
        start = req.num_committed_blocks
        if num_full > start:
            parent = req.block_hashes[start - 1] if start > 0 else None
            self.pool.cache_full_blocks(
                req.blocks[start:num_full], req.block_hashes[start:num_full],
                req.local_hashes[start:num_full], parent,
            )
            req.num_committed_blocks = num_full

    def _append_token(self, req: Request, token_id: int) -> StepResult:
        req.append_output(token_id, self.config.block_size)
        req.is_prefilling = False
        status = _finish_status(req, token_id)
        if status is not None:
            self.running.remove(req)
            del self.requests[req.request_id]
            if req.hold_kv:
                req.status = status
                self.held[req.request_id] = req
            else:
                self._release(req, status)
        first = len(req.output_token_ids) == 1
        return StepResult(
            request_id=req.request_id,
            new_token_ids=[token_id],
            finish_reason=status.finish_reason if status is not None else None,
            num_cached_tokens=req.num_cached_tokens if first else None,
        )

    def _release(self, req: Request, status: RequestStatus) -> None:
        """Free a finished request's blocks; full cached ones stay hittable in the free queue."""
        self.pool.free(req.blocks)
        req.blocks = []
        req.status = status

    # ---- observation --------------------------------------------------------------------

    def take_kv_events(self) -> list[KvEvent]:
        """The prefix cache's events since the last call; with KV tiers, of what this worker
        holds in any tier (``HeldBlocks``), numbered by the scheduler."""
        if self.tiers is None:
            return self.pool.take_events()
        self._merge_tier_events()
        first, self._next_event_id = self._next_event_id, self._next_event_id + len(self._held_events)
        out = [KvEvent(first + i, data, self.worker_id) for i, data in enumerate(self._held_events)]
        self._held_events = []
        return out

    def kv_snapshot(self) -> tuple[int, list[KvStored]]:
        """The cached blocks as stored chains and the id of the last event they include."""
        if self.tiers is None:
            return self.pool.snapshot()
        self._merge_tier_events()
        return self._next_event_id + len(self._held_events) - 1, self.held_blocks.snapshot()

    def _merge_tier_events(self) -> None:
        assert self.tiers is not None
        self._held_events += self.held_blocks.take(self.pool.take_event_data(), self.tiers.take_events())

    def restore_disk_blocks(self, blocks: Sequence[TierBlock]) -> None:
        """Takes back the blocks a disk tier kept from before a restart; they are announced
        like new ones (and in the snapshot)."""
        if self.tiers is not None and blocks:
            self.tiers.restore_disk(blocks)

    def discard_tier_block(self, seq_hash: SequenceHash, tier: Tier) -> None:
        """A copy out of a tier failed (a disk block missing or corrupt): forget it there."""
        if self.tiers is not None:
            self.tiers.discard(seq_hash, tier)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        """Whether a step would do something (loading requests wait for their copy)."""
        return bool(self.running or self.waiting)

    @property
    def num_active(self) -> int:
        """Requests here: running, waiting or loading their KV."""
        return len(self.running) + len(self.waiting) + len(self.loading)

    def load(self) -> EngineLoad:
        """Load as reported to routers (the engine shell adds its worker id). Active prefill
        tokens = uncomputed tokens of waiting requests and of running ones still prefilling."""
        prefilling = [r for r in self.running if r.is_prefilling]
        active_prefill = sum(r.num_uncomputed_tokens for r in [*self.waiting, *prefilling])
        return EngineLoad(
            active_blocks=self.pool.num_used_blocks,
            total_blocks=self.config.num_blocks,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            active_prefill_tokens=active_prefill,
            step_token_budget=self.config.max_num_batched_tokens,
        )

    def check_invariants(self) -> None:
        """Raise AssertionError if queues, requests and the pool disagree."""
        self.pool.check_invariants()
        running_ids = [r.request_id for r in self.running]
        waiting_ids = [r.request_id for r in self.waiting]
        loading_ids = [r for r, req in self.loading.items() if not req.status.is_finished]
        all_ids = running_ids + waiting_ids + loading_ids
        _check(len(set(all_ids)) == len(all_ids), "a request is queued twice")
        _check(set(all_ids) == set(self.requests), "queues and request table disagree")
        _check(self._num_admitted <= self.config.max_num_seqs, "more admitted than max_num_seqs")
        _check(not set(self.held) & set(self.requests), "a held request is still live")
        for req in self.waiting:
            _check(req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), "bad status")
            _check(not req.blocks and req.num_computed_tokens == 0, "waiting request holds KV")
        for req in self.running:
            self._check_running(req)
        self._check_ref_counts()
        if self.tiers is not None:
            self.tiers.check_invariants()

    def _check_running(self, req: Request) -> None:
        scheduled = self._in_flight.num_scheduled_tokens if self._in_flight else {}
        covered = req.num_computed_tokens + scheduled.get(req.request_id, 0)
        _check(req.status is RequestStatus.RUNNING, f"{req.request_id} running with bad status")
        # A decode leg may hold blocks past what it computed (KV it failed to load).
        _check(
            _cdiv(covered, self.config.block_size) <= len(req.blocks)
            <= max(1, _cdiv(req.num_tokens, self.config.block_size)),
            f"{req.request_id}: {len(req.blocks)} blocks for {covered} tokens",
        )
        _check(req.num_committed_blocks <= len(req.blocks), "committed more blocks than held")
        _check(covered <= req.num_tokens, f"{req.request_id} computes beyond its tokens")

    def _check_ref_counts(self) -> None:
        refs: dict[int, int] = {}
        for req in [*self.running, *self.loading.values(), *self.held.values()]:
            for block in req.blocks:
                refs[block.block_id] = refs.get(block.block_id, 0) + 1
        for block in self.pool.blocks:
            _check(block.ref_cnt == refs.get(block.block_id, 0), f"block {block.block_id} ref_cnt")


def _finish_status(req: Request, token_id: int) -> RequestStatus | None:
    """Stop (EOS / stop token, once min_tokens is reached) wins over length at the same token."""
    sampling = req.sampling
    num_out = len(req.output_token_ids)
    if (
        not sampling.ignore_eos
        and num_out >= sampling.min_tokens
        and token_id in sampling.stop_token_ids
    ):
        return RequestStatus.FINISHED_STOPPED
    if num_out >= sampling.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    return None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
