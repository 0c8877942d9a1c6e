"""The vLLM engine (``--engine vllm``): vLLM's ``AsyncLLM`` inside a Baton worker.

Baton's frontend has already applied the chat template and tokenized the prompt, and it
detokenizes and applies stop strings to what comes back; vLLM gets token ids and returns
token ids (``detokenize=False``). Each request streams deltas (``RequestOutputKind.DELTA``);
closing its stream aborts it in vLLM.

Beside the generate path the engine runs three things it owns:

* a ZMQ subscriber to vLLM's KV event publisher (an ``ipc://`` socket in a private folder),
  whose batches ``KvEventTranslator`` turns into Baton events for the worker's feeds; a
  skipped sequence number asks vLLM's replay socket for the missed batches, and batches lost
  for good become a ``cleared`` event (routers then forget this worker's blocks rather than
  believe wrong ones);
* a stat logger vLLM calls after each step with its scheduler's numbers (running, waiting,
  KV usage), which make this engine's ``load()``;
* a reaper process (``reaper.py``) that kills vLLM's processes if this worker is killed
  outright, so no engine core outlives its worker;
* a health task: when vLLM's engine core dies (``EngineDeadError``; a killed or crashed
  core process), every open stream fails with ``WorkerFaultError`` (frontends continue them
  elsewhere) and the owner's fault handler replaces the engine, as for Baton's own engines.

vLLM is imported only here, and only when this engine is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import subprocess
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from baton.config import EngineConfig
from baton.engine.base import EngineLoad, EngineStats, FaultHandler, KvEventSink
from baton.engine.vllm import reaper
from baton.engine.vllm.connector import STATS_FILE
from baton.engine.vllm.events import KvEventTranslator, decode_batch
from baton.errors import InvalidRequestError, WorkerFaultError
from baton.kv.events import KvStored
from baton.protocol import (
    FEATURE_LOGPROBS,
    FEATURE_STRUCTURED,
    EngineOutput,
    FinishReason,
    GenerateRequest,
    KvTransferParams,
    SamplingParams,
    StepSample,
    TokenLogprob,
)
from baton.runtime.net import Listener
from baton.runtime.peer_auth import PeerAuth
from baton.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

FEATURES = (FEATURE_LOGPROBS, FEATURE_STRUCTURED)
_HEALTH_INTERVAL_S = 1.0
_REPLAY_TIMEOUT_S = 2.0
_FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}


class VllmEngine:
    """One vLLM ``AsyncLLM`` and the tasks that feed Baton from it."""

    features: tuple[str, ...] = FEATURES

    @property
    def kv_tier_credits(self) -> dict[str, float]:
        return {}  # vLLM's offloading times are its own: routers use their fixed credits

    def __init__(self, config: EngineConfig, model_dir: Path, *, role: str = "agg",
                 kv_listener: Listener | None = None, auth: PeerAuth | None = None) -> None:
        self.config = config
        self.model_dir = model_dir
        self.role = role
        self.kv_listener = kv_listener or Listener()
        self.auth = auth
        self.block_size = config.block_size
        self.fault: BaseException | None = None
        self._stats = EngineStats()
        self._llm: Any = None
        self._sink: KvEventSink | None = None
        self._on_fault: FaultHandler | None = None
        self._ipc = tempfile.TemporaryDirectory(prefix="baton-vllm-")
        self._events_endpoint = f"ipc://{self._ipc.name}/events"
        self._replay_endpoint = f"ipc://{self._ipc.name}/replay"
        self._translator = KvEventTranslator(self.block_size)
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count()
        self._prefilling: dict[str, int] = {}
        """Request id -> prompt tokens, until its first output."""
        self._scheduler_stats: Any = None
        self._last_iteration_at: float | None = None
        self.total_blocks = 0
        self._engine_pids: list[int] = []
        self._reaper: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        before = reaper.descendants()
        self._llm = await asyncio.to_thread(self._build)
        self._engine_pids = sorted(reaper.descendants() - before)
        self._reaper = reaper.start(self._engine_pids)
        self.total_blocks = int(self._llm.vllm_config.cache_config.num_gpu_blocks or 0)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow_events(), name="vllm-kv-events"),
            loop.create_task(self._watch_health(), name="vllm-health"),
        ]

    def _build(self) -> Any:
        from vllm.config import KVEventsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        v, s = self.config.vllm, self.config.scheduler
        extra = json.loads(v.engine_args) if v.engine_args else {}
        args = AsyncEngineArgs(
            model=str(self.model_dir),
            dtype=v.dtype,
            max_model_len=v.max_model_len,
            enforce_eager=v.enforce_eager,
            block_size=self.block_size,
            enable_prefix_caching=s.enable_prefix_caching,
            enable_chunked_prefill=s.enable_chunked_prefill,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            kv_cache_memory_bytes=self.config.kv_cache_bytes,
            kv_events_config=KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq",
                endpoint=self._events_endpoint, replay_endpoint=self._replay_endpoint),
            disable_log_stats=False,
            kv_transfer_config=self._kv_transfer_config(),
            **extra,
        )
        try:
            return AsyncLLM.from_engine_args(args, stat_loggers=[self._stat_logger()])
        except Exception as exc:
            if self.block_size % 32 and "block" in str(exc).lower():
                raise ValueError(
                    f"vLLM refused block size {self.block_size}: its CPU attention needs a "
                    "multiple of 32 (pass --block-size 32)") from exc
            raise

    def _kv_transfer_config(self) -> Any:
        """Prefill and decode workers move KV with Baton's connector (``connector.py``)."""
        if self.role == "agg":
            return None
        from vllm.config import KVTransferConfig

        listener = self.kv_listener
        token_file = None
        if self.auth is not None:  # the cluster token, for the connector's KV transfer
            path = Path(self._ipc.name) / "cluster_token"
            path.touch(mode=0o600)
            path.write_bytes(self.auth.token)
            token_file = str(path)
        return KVTransferConfig(
            kv_connector="BatonConnector", kv_connector_module_path="baton.engine.vllm.connector",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config={
                "dir": self._ipc.name, "host": listener.host, "port": listener.port,
                "advertise_host": listener.advertise_host,
                "hold_timeout_s": self.config.kv_hold_timeout_s,
                "transfer_timeout_s": self.config.kv_transfer_timeout_s,
                "token_file": token_file,
            })

    def _stat_logger(self) -> type:
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class BatonStats(StatLoggerBase):  # type: ignore[misc]  # vLLM is untyped here
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any,
                       mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
                if iteration_stats is not None:
                    engine._stats.steps += 1
                    engine._observe_iteration(iteration_stats)
                if scheduler_stats is not None:
                    engine._scheduler_stats = scheduler_stats

            def log_engine_initialized(self) -> None:
                pass

        return BatonStats

    def _observe_iteration(self, it: Any) -> None:
        """A step sample from one of vLLM's iterations. Its time is the gap since the
        previous iteration, counted only when the engine stayed busy in between (it had
        requests running after that iteration); prefill tokens are the prompts' computed
        tokens whose prefill ended in this iteration."""
        previous, before = self._last_iteration_at, self._scheduler_stats
        self._last_iteration_at = it.iteration_timestamp
        if previous is None or before is None or before.num_running_reqs == 0:
            return
        seconds = it.iteration_timestamp - previous
        total = self.total_blocks * self.block_size
        self._stats.add_sample(StepSample(
            it.prompt_token_stats.computed, it.num_generation_tokens,
            round(before.kv_cache_usage * total), total, seconds))

    async def close(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks = []
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)
        if self._reaper is not None:  # whatever vLLM's shutdown left running goes too
            reaper.kill_tree(self._engine_pids)
            self._reaper.terminate()
            await asyncio.to_thread(self._reaper.wait)
            self._reaper = None
        self._ipc.cleanup()

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    def set_fault_handler(self, handler: FaultHandler | None) -> None:
        self._on_fault = handler

    # ------------------------------------------------------------------ generate
    def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]:
        if (request.hold_kv or request.remote_kv is not None) and self.role == "agg":
            raise InvalidRequestError("this vLLM worker is not a prefill or decode worker")
        if self.fault is not None or self._llm is None:
            raise WorkerFaultError("the vLLM engine has failed")
        return self._generate(request)

    async def _generate(self, request: GenerateRequest) -> AsyncGenerator[EngineOutput, None]:
        from vllm.v1.engine.exceptions import EngineDeadError

        rid = f"{request.request_id}-{next(self._ids)}"
        prompt = {"prompt_token_ids": request.token_ids}
        self._prefilling[rid] = len(request.token_ids)
        first = True
        try:
            params = vllm_sampling(request.sampling, _kv_transfer_params(request))
            async with contextlib.aclosing(self._llm.generate(prompt, params, rid)) as outputs:
                async for out in outputs:
                    self._prefilling.pop(rid, None)
                    yield _engine_output(out, request.sampling.logprobs, cached=first)
                    first = False
        except EngineDeadError as exc:
            self._fail(exc)
            raise WorkerFaultError(f"the vLLM engine died: {exc}") from exc
        except ValueError as exc:  # vLLM's validation of a request (e.g. too long)
            raise InvalidRequestError(str(exc)) from exc
        finally:
            self._prefilling.pop(rid, None)

    # ------------------------------------------------------------------ state
    def load(self) -> EngineLoad:
        stats = self._scheduler_stats
        usage = stats.kv_cache_usage if stats is not None else 0.0
        return EngineLoad(
            active_blocks=round(usage * self.total_blocks),
            total_blocks=self.total_blocks,
            num_running=stats.num_running_reqs if stats is not None else 0,
            num_waiting=stats.num_waiting_reqs if stats is not None else len(self._prefilling),
            active_prefill_tokens=sum(self._prefilling.values()),
            step_token_budget=self.config.scheduler.max_num_batched_tokens,
        )

    @property
    def stats(self) -> EngineStats:
        """Steps counted here; KV load counts as the connector last wrote them (it runs in
        vLLM's model worker process), read when the stats are (a metrics scrape)."""
        path = Path(self._ipc.name) / STATS_FILE
        with contextlib.suppress(OSError, ValueError):
            counts = json.loads(path.read_text())
            self._stats.kv_loads = int(counts.get("kv_loads", 0))
            self._stats.kv_loads_failed = int(counts.get("kv_loads_failed", 0))
            self._stats.kv_load_bytes = int(counts.get("kv_load_bytes", 0))
        return self._stats

    def kv_snapshot(self) -> tuple[int, list[KvStored]]:
        return self._translator.snapshot()

    @property
    def num_held(self) -> int:
        return 0

    # ------------------------------------------------------------------ faults
    async def _watch_health(self) -> None:
        while self.fault is None:
            await asyncio.sleep(_HEALTH_INTERVAL_S)
            llm = self._llm
            if llm is not None and llm.errored:
                self._fail(llm.dead_error)

    def _fail(self, exc: BaseException) -> None:
        if self.fault is not None:
            return
        self.fault = exc
        log.error("the vLLM engine failed: %s: %s", type(exc).__name__, exc)
        if self._on_fault is not None:
            self._on_fault(exc)

    # ------------------------------------------------------------------ KV events
    async def _follow_events(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self._events_endpoint)
        try:
            while True:
                _topic, seq_bytes, payload = await sub.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big")
                if self._translator.gap(seq):
                    await self._replay(ctx, seq)
                self._publish(seq, payload)
        finally:
            sub.close(linger=0)

    async def _replay(self, ctx: zmq.asyncio.Context, upto: int) -> None:
        """Fetches the batches from ``next_seq`` to before ``upto`` that the subscriber
        missed. Those vLLM no longer buffers are lost: routers are told to forget this
        worker's blocks (a ``cleared`` event) before the rest is applied."""
        start = self._translator.next_seq
        assert start is not None
        log.warning("vLLM KV events %d..%d were missed; asking for a replay", start, upto - 1)
        replayed = await self._fetch_replay(ctx, start, upto)
        if not replayed or replayed[0][0] != start:
            log.error("vLLM KV events from %d are lost: routers forget this worker's blocks",
                      start)
            self._emit(self._translator.resync())
            self._translator.next_seq = replayed[0][0] if replayed else upto
        for seq, payload in replayed:
            self._publish(seq, payload)
        self._translator.next_seq = max(upto, self._translator.next_seq or upto)

    async def _fetch_replay(self, ctx: zmq.asyncio.Context, start: int,
                            upto: int) -> list[tuple[int, bytes]]:
        """vLLM's replay socket: a request with the first sequence number wanted, then the
        buffered batches from there and an empty end marker."""
        out: list[tuple[int, bytes]] = []
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(self._replay_endpoint)
        try:
            await dealer.send_multipart((b"", start.to_bytes(8, "big")))
            async with asyncio.timeout(_REPLAY_TIMEOUT_S):
                while True:
                    _, _topic, seq_bytes, payload = await dealer.recv_multipart()
                    seq = int.from_bytes(seq_bytes, "big")
                    if not payload or seq >= upto:
                        break
                    out.append((seq, payload))
        except TimeoutError:
            log.error("vLLM's KV event replay did not answer in %gs", _REPLAY_TIMEOUT_S)
        finally:
            dealer.close(linger=0)
        return out

    def _publish(self, seq: int, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("undecodable vLLM KV event batch %d: %s", seq, exc)
            self._translator.next_seq = seq + 1
            self._emit(self._translator.resync())
            return
        self._emit(self._translator.translate(seq, batch))

    def _emit(self, events: list[Any]) -> None:
        if events and self._sink is not None:
            self._sink(events)


def _kv_transfer_params(request: GenerateRequest) -> dict[str, Any] | None:
    """What Baton's connector reads from a request: hold the prompt's KV for a decode
    worker, or pull it from a prefill worker."""
    if request.hold_kv:
        return {"do_remote_decode": True}
    if request.remote_kv is not None:
        return {"do_remote_prefill": True, **msgspec.structs.asdict(request.remote_kv)}
    return None


def vllm_sampling(s: SamplingParams, kv_transfer_params: dict[str, Any] | None = None) -> Any:
    """Baton's sampling parameters as vLLM's (deltas of token ids, no detokenizing). Baton's
    stop tokens are EOS and friends, which ``ignore_eos`` ignores; vLLM's ``ignore_eos``
    covers only its own EOS, so they are left out then."""
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.sampling_params import SamplingParams as VllmSamplingParams

    structured = None
    if s.structured is not None:
        structured = StructuredOutputsParams(
            json=s.structured.json_schema, json_object=s.structured.json_object or None)
    return VllmSamplingParams(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        min_p=s.min_p, seed=s.seed, ignore_eos=s.ignore_eos, min_tokens=s.min_tokens,
        stop_token_ids=[] if s.ignore_eos else list(s.stop_token_ids),
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty, repetition_penalty=s.repetition_penalty,
        logprobs=s.logprobs, structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA, detokenize=False,
        extra_args={"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None,
    )


def _engine_output(out: Any, num_top: int | None, *, cached: bool) -> EngineOutput:
    completion = out.outputs[0]
    finish = _FINISH.get(completion.finish_reason, "stop") if completion.finished() else None
    return EngineOutput(
        token_ids=list(completion.token_ids),
        finish_reason=finish,
        cached_tokens=(out.num_cached_tokens or 0) if cached else None,
        logprobs=_logprobs(completion.token_ids, completion.logprobs, num_top or 0),
        kv_transfer=_held_kv(out.kv_transfer_params) if finish is not None else None,
    )


def _held_kv(p: dict[str, Any] | None) -> KvTransferParams | None:
    """The connector's params of a finished ``hold_kv`` request (None when it held no
    blocks: a prompt shorter than one block; the decode worker then prefills)."""
    if not p or not p.get("block_ids"):
        return None
    return msgspec.convert(p, KvTransferParams)


def _logprobs(token_ids: Any, logprobs: Any, num_top: int) -> list[TokenLogprob] | None:
    """vLLM gives, per token, the sampled token and the ``num_top`` most likely ones (ranks
    from 1), in one map."""
    if logprobs is None:
        return None
    out = []
    for token_id, alternatives in zip(token_ids, logprobs, strict=True):
        ranked = sorted((lp.rank, t, lp.logprob) for t, lp in alternatives.items())
        top = [(t, logprob) for rank, t, logprob in ranked if 1 <= rank <= num_top]
        out.append(TokenLogprob(token_id, alternatives[token_id].logprob, top))
    return out
