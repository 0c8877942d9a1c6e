"""Wire types between the frontend and workers (the request plane's payloads).

These are the only objects that cross a process boundary on the generate path; they are
msgspec structs so the TCP request plane encodes them as msgpack without a schema layer of its
own. Everything here is plain data: no behaviour beyond small derived properties.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from baton.kv.events import KvEvent, KvStored

FinishReason = Literal["stop", "length", "cancelled", "error"]
"""Why a sequence ended: EOS or a stop token (``stop``), ``max_tokens`` reached (``length``),
aborted by its client (``cancelled``) or failed inside the engine (``error``)."""


WORKER_COMPONENT = "backend"
"""The discovery component every worker registers under ..."""
GENERATE_ENDPOINT = "generate"
"""... with its ``generate`` endpoint (``GenerateRequest`` → ``EngineOutput`` stream)."""


class Empty(msgspec.Struct):
    """The request of endpoints that take no arguments."""


class StructuredOutput(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Constrained decoding: the output is JSON matching ``json_schema`` (a JSON text), or
    any JSON object when ``json_object``."""

    json_schema: str | None = None
    json_object: bool = False


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick output tokens and when to stop (token level; stop *strings* are the
    frontend's job because they need detokenized text)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: all tokens."""
    min_p: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end the sequence (EOS and friends) unless ``ignore_eos``; never before
    ``min_tokens`` outputs."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    """Return each output token's log-probability and this many alternatives (0: none);
    None: no log-probabilities."""
    structured: StructuredOutput | None = None


class TokenLogprob(msgspec.Struct, array_like=True):
    """One output token's log-probability and the most likely alternatives at its step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


FEATURE_LOGPROBS = "logprobs"
FEATURE_STRUCTURED = "structured_outputs"
ENGINE_FEATURES_KEY = "features"
"""A worker's discovery metadata key: what beyond plain sampling its engine does (comma
separated ``FEATURE_*`` names)."""
KV_EVENTS_KEY = "kv_events"
"""A worker's discovery metadata key: ``off`` when its engine keeps no prefix cache, so it
announces no KV blocks by design (a KV router does not take its silence for a broken feed)."""
KV_TIER_CREDITS_KEY = "kv_tier_credits"
"""A worker's discovery metadata key: what a block it holds only in host memory or on disk is
worth against one on its device, from its own read and compute times (``host=0.75,disk=0``;
``kv.onboard_choice.format_tier_credits``)."""

MAX_STEP_SAMPLES = 64
"""Step samples an engine keeps and a feed batch carries at most (the latest)."""


class KvTransferParams(msgspec.Struct, frozen=True, kw_only=True):
    """Where a prefilled prompt's KV cache waits for its decode worker, and how to fetch it.

    A prefill worker returns this with its (only) output; the frontend passes it on to the
    decode worker, which pulls the blocks it lacks and acknowledges, so that the prefill
    worker frees them (it also frees them after a timeout).
    """

    transfer_id: str
    worker_id: int
    """The prefill worker holding the blocks."""
    address: str
    """Its KV transfer server: ``inproc://NAME`` in this process, else ``tcp://HOST:PORT``."""
    block_ids: list[int]
    """The source blocks, in sequence order: block ``i`` holds tokens ``i*block_size...``."""
    num_tokens: int
    """Leading prompt tokens whose KV the blocks hold."""
    block_size: int
    block_bytes: int
    layout: str = ""
    """The KV layout (model shape and dtype); a receiver with another layout refuses."""
    shm_name: str | None = None
    """The source's shared-memory segment, when it has one (same-host zero-copy reads)."""


class GenerateRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One tokenized request for an engine.

    Disaggregated serving adds one of two fields: ``hold_kv`` on the prefill leg (keep the
    prompt's KV blocks after the output and return ``KvTransferParams``), ``remote_kv`` on
    the decode leg (fetch the prompt's KV from there instead of computing it).
    """

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    hold_kv: bool = False
    remote_kv: KvTransferParams | None = None
    trace_parent: str | None = None
    """The W3C ``traceparent`` of the span this request's work belongs to, when tracing is
    on (``baton/tracing.py``)."""


class EngineOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A delta of one request's output: the tokens produced since the previous delta.

    ``cached_tokens`` is set on the first delta only: the number of prompt tokens the engine
    served from its prefix cache. ``worker_id`` is stamped by the worker on the first delta.
    """

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    cached_tokens: int | None = None
    worker_id: int | None = None
    error: str | None = None
    kv_transfer: KvTransferParams | None = None
    """On the last output of a ``hold_kv`` request: where its KV blocks wait."""
    logprobs: list[TokenLogprob] | None = None
    """One per token of ``token_ids``, when the request asked for them."""


class LoadMetrics(msgspec.Struct, kw_only=True):
    """A worker's load, as its engine sees it after a step."""

    worker_id: int
    active_blocks: int
    total_blocks: int
    num_running: int
    num_waiting: int
    active_prefill_tokens: int = 0
    step_token_budget: int = 0
    """Tokens one step computes at most (0: unknown)."""

    @property
    def kv_usage(self) -> float:
        return self.active_blocks / self.total_blocks if self.total_blocks else 1.0


def load_subject(namespace: str) -> str:
    """Where workers publish their ``LoadMetrics`` (when it changes, and as a heartbeat)."""
    return f"{namespace}.load"


def traffic_subject(namespace: str) -> str:
    """Where frontends publish their ``TrafficReport``s."""
    return f"{namespace}.traffic"


class TrafficReport(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What one frontend served over its last window: the planner's traffic signal (it sums
    the frontends' reports). Latencies are sums, so reports add up."""

    source: str
    """The frontend that sent it."""
    window_s: float
    requests: int = 0
    """Requests that arrived (and were accepted) in the window ..."""
    prompt_tokens: int = 0
    """... and their prompt tokens ..."""
    prompt_tokens_sq: int = 0
    """... and the sum of their prompt lengths squared (the lengths' spread)."""
    finished: int = 0
    """Requests that finished successfully in the window ..."""
    output_tokens: int = 0
    """... and the tokens they generated."""
    ttft_s: float = 0.0
    """Sum of the times to first token seen in the window, over ``ttfts`` of them."""
    ttfts: int = 0
    itl_s: float = 0.0
    """Sum of the gaps between streamed tokens seen in the window, over ``itls`` of them."""
    itls: int = 0


class FeedRequest(msgspec.Struct, kw_only=True):
    """Opens a worker's ``events`` feed; without ``kv_events`` it carries only load."""

    kv_events: bool = True


class StepSample(msgspec.Struct, array_like=True, frozen=True):
    """One engine step's shape and how long it took (routers learn step times from these)."""

    prefill_tokens: int
    decode_requests: int
    kv_tokens_in_use: int
    kv_tokens_total: int
    seconds: float


class WorkerEvents(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One batch of a worker's ``events`` feed.

    The first batch of a feed carries ``snapshot``: the worker's whole prefix cache as stored
    events, replacing anything known before; ``last_event_id`` is then the id of the last
    event the snapshot includes. Later batches carry the KV events that followed, in order.
    Every batch carries the worker's current load and the latest of the steps it made since
    the previous batch (at most ``MAX_STEP_SAMPLES``).
    """

    worker_id: int
    last_event_id: int
    load: LoadMetrics
    snapshot: list[KvStored] | None = None
    events: list[KvEvent] = []
    steps: list[StepSample] = []


class ModelFiles(msgspec.Struct, kw_only=True):
    """A model folder's small files (tokenizer, configs, chat template; never weights), so
    a frontend on another host can load the model card a worker serves."""

    name: str
    files: dict[str, bytes]
