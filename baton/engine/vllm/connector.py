"""Baton's KV connector for vLLM: a prefill vLLM worker's KV blocks to a decode vLLM worker,
over Baton's KV transfer plane (``baton.transfer``), on any hardware vLLM runs on.

vLLM loads it by name (``KVTransferConfig(kv_connector="BatonConnector",
kv_connector_module_path="baton.engine.vllm.connector")``) in two places: its scheduler
(the engine core process) and each model worker process. ``VllmEngine`` configures it for
workers with ``--role prefill`` or ``--role decode``.

The prefill side. A request marked ``do_remote_decode`` (Baton's ``hold_kv``) is tracked by
the scheduler side; in the step that completes its prompt, the step's metadata asks the
worker side to *save* its full prompt blocks: after the forward pass (``wait_for_save``) the
worker copies them from vLLM's paged cache into a mirror ``BlockStore`` (same block ids, all
layers of a block back to back) and holds them in its ``KvTransferServer``. The scheduler
side answers ``request_finished`` with the transfer's params (returned to Baton in the
request's output) and keeps vLLM from freeing the blocks until the hold is released, i.e.
the decode worker acknowledged or the hold timed out (``get_finished`` reports it).

The decode side. A request marked ``do_remote_prefill`` (Baton's ``remote_kv``) reports the
prompt's full blocks beyond its local prefix hit as external tokens, loaded synchronously:
before the next forward pass (``start_load_kv``), the worker pulls them with a
``KvTransferClient`` into its mirror and copies them into vLLM's blocks. A failed pull
reports those blocks as failed, and vLLM recomputes them (``kv_load_failure_policy=
recompute``): the request is served either way.

The worker side writes its server's address, block bytes and layout to a file in a folder
the engine gives (``dir``), which the scheduler side reads: the two run in different
processes. Cost: the mirror doubles the KV memory of a worker that uses the connector.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from baton.kv.store import BlockStore
from baton.protocol import KvTransferParams
from baton.runtime.peer_auth import PeerAuth
from baton.transfer import KvTransferClient, KvTransferError, KvTransferServer

log = logging.getLogger(__name__)

SERVER_FILE = "kv_server.json"
STATS_FILE = "kv_stats.json"
"""The decode side's counts (loads, failed loads, bytes), for the worker's metrics."""
_WAIT_S = 30.0


@dataclass
class Load:
    req_id: str
    local_block_ids: list[int]
    remote_block_ids: list[int]
    params: dict[str, Any]


@dataclass
class BatonConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]  # vLLM is untyped
    loads: list[Load] = field(default_factory=list)
    saves: dict[str, list[int]] = field(default_factory=dict)
    """Request id -> its full prompt blocks, to hold after this step's forward pass."""


class BatonConnector(KVConnectorBase_V1):  # type: ignore[misc]  # vLLM is untyped
    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self._dir = Path(extra["dir"])
        self._block_size = int(vllm_config.cache_config.block_size)
        if role == KVConnectorRole.SCHEDULER:
            self._sched = _SchedulerSide(self._dir, self._block_size)
        else:
            self._worker = _WorkerSide(self._dir, extra, vllm_config)

    # ------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        return self._sched.matched(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._sched.allocated(request, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self._sched.metadata(scheduler_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._sched.finished(request, block_ids)

    # ------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register(list(kv_caches.values()))

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if meta.loads:
            self._worker.load(meta.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if meta.saves:
            self._worker.save(meta.saves)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.finished_sending() or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed()

    def shutdown(self) -> None:
        if getattr(self, "_worker", None) is not None:
            self._worker.close()


# ---------------------------------------------------------------- the scheduler's half
@dataclass
class _Held:
    """A ``do_remote_decode`` request on the prefill side."""

    prompt_len: int
    block_ids: list[int] = field(default_factory=list)
    """Its blocks so far."""
    saved: bool = False
    """Its full prompt blocks were held for a decode worker."""


class _SchedulerSide:
    def __init__(self, folder: Path, block_size: int) -> None:
        self.dir = folder
        self.block_size = block_size
        self.server: dict[str, Any] | None = None
        self.holding: dict[str, _Held] = {}
        self.local_hit: dict[str, int] = {}
        """``do_remote_prefill`` requests -> prompt tokens found in the local prefix cache."""
        self.loads: list[Load] = []

    def matched(self, request: Any, num_computed: int) -> int:
        p = request.kv_transfer_params or {}
        if p.get("do_remote_decode"):
            self.holding.setdefault(request.request_id, _Held(int(request.num_prompt_tokens)))
            return 0
        if not p.get("do_remote_prefill") or p.get("baton_loaded"):
            return 0
        self.local_hit[request.request_id] = num_computed
        usable = min(int(p["num_tokens"]), int(request.num_prompt_tokens) - 1)
        return max(0, usable // self.block_size * self.block_size - num_computed)

    def allocated(self, request: Any, block_ids: list[int], num_external: int) -> None:
        p = request.kv_transfer_params or {}
        if not p.get("do_remote_prefill") or p.get("baton_loaded"):
            return
        p["baton_loaded"] = True  # one load (or release) per request
        # the blocks after the local prefix hit (request.num_computed_tokens is not yet set)
        first = self.local_hit.pop(request.request_id, 0) // self.block_size
        n = num_external // self.block_size
        remote = list(p["block_ids"])[first : first + n]
        self.loads.append(Load(request.request_id, list(block_ids[first : first + len(remote)]),
                               remote, p))

    def metadata(self, out: Any) -> BatonConnectorMetadata:
        meta = BatonConnectorMetadata(loads=self.loads)
        self.loads = []
        for new in out.scheduled_new_reqs:
            if (held := self.holding.get(new.req_id)) is not None:
                held.block_ids = list(new.block_ids[0])
                self._maybe_save(meta, new.req_id, held, new.num_computed_tokens, out)
        cached = out.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            if (held := self.holding.get(rid)) is not None and not held.saved:
                if cached.new_block_ids[i] is not None:
                    held.block_ids.extend(cached.new_block_ids[i][0])
                self._maybe_save(meta, rid, held, cached.num_computed_tokens[i], out)
        return meta

    def _maybe_save(self, meta: BatonConnectorMetadata, rid: str, held: _Held, computed: int,
                    out: Any) -> None:
        """Asks for the prompt's full blocks to be held once this step completes it."""
        if held.saved or computed + out.num_scheduled_tokens.get(rid, 0) < held.prompt_len:
            return
        full = held.prompt_len // self.block_size
        if full:
            meta.saves[rid] = held.block_ids[:full]
            held.saved = True

    def finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self.local_hit.pop(rid, None)
        held = self.holding.pop(rid, None)
        if held is None:
            return False, None
        server = self._server()
        full = held.prompt_len // self.block_size if held.saved else 0
        params = {"transfer_id": rid, "worker_id": 0, "address": server["address"],
                  "block_ids": list(block_ids[:full]), "num_tokens": full * self.block_size,
                  "block_size": self.block_size, "block_bytes": server["block_bytes"],
                  "layout": server["layout"]}
        return held.saved, params

    def _server(self) -> dict[str, Any]:
        if self.server is None:
            self.server = json.loads((self.dir / SERVER_FILE).read_text())
        return self.server


# ---------------------------------------------------------------- the model worker's half
class _WorkerSide:
    def __init__(self, folder: Path, extra: dict[str, Any], vllm_config: Any) -> None:
        self.dir = folder
        self.extra = extra
        self.num_blocks = int(vllm_config.cache_config.num_gpu_blocks or 0)
        self.layout_prefix = f"vllm/{vllm_config.model_config.model}/{vllm_config.model_config.dtype}"
        self.views: list[torch.Tensor] = []
        self.layer_bytes: list[int] = []
        self.mirror: BlockStore | None = None
        self.mirror_t: torch.Tensor | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="baton-kv", daemon=True)
        self.server: KvTransferServer | None = None
        self.client: KvTransferClient | None = None
        self.lock = threading.Lock()
        self.sent: set[str] = set()
        self.failed: set[int] = set()
        self.counts = {"kv_loads": 0, "kv_loads_failed": 0, "kv_load_bytes": 0}

    def register(self, caches: list[torch.Tensor]) -> None:
        if not self.num_blocks:
            raise RuntimeError("vLLM did not say how many KV blocks it has")
        self.views = [_block_first(t, self.num_blocks) for t in caches]
        self.layer_bytes = [v[0].numel() * v.element_size() for v in self.views]
        self.mirror = BlockStore(self.num_blocks, sum(self.layer_bytes))
        blocks = np.frombuffer(self.mirror.buffer, dtype=np.uint8)
        self.mirror_t = torch.from_numpy(blocks).view(self.num_blocks, self.mirror.block_bytes)
        self.thread.start()
        self._run(self._start())
        assert self.server is not None
        info = {"address": self.server.address, "block_bytes": self.mirror.block_bytes,
                "layout": f"{self.layout_prefix}/{self.mirror.block_bytes}"}
        self._write(SERVER_FILE, info)

    async def _start(self) -> None:
        assert self.mirror is not None
        e = self.extra
        token_file = e.get("token_file")  # not in the config itself: vLLM logs its config
        auth = PeerAuth(Path(token_file).read_bytes()) if token_file else None
        self.server = KvTransferServer(
            self.mirror, name=f"vllm-{os.getpid()}", host=e.get("host", "127.0.0.1"),
            port=int(e.get("port") or 0), advertise_host=e.get("advertise_host"), auth=auth,
            hold_timeout_s=float(e.get("hold_timeout_s", 30.0)))
        await self.server.start()
        self.client = KvTransferClient(timeout_s=float(e.get("transfer_timeout_s", 10.0)),
                                       use_shm=False, auth=auth)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(_WAIT_S)

    # -- prefill
    def save(self, saves: dict[str, list[int]]) -> None:
        for rid, block_ids in saves.items():
            self._copy_out(block_ids)
            self._run(self._hold(rid, block_ids))

    async def _hold(self, rid: str, block_ids: list[int]) -> None:
        assert self.server is not None

        def released() -> None:
            with self.lock:
                self.sent.add(rid)

        self.server.hold(rid, block_ids, released)

    def finished_sending(self) -> set[str]:
        with self.lock:
            done, self.sent = self.sent, set()
        return done

    # -- decode
    def load(self, loads: list[Load]) -> None:
        for load in loads:
            try:
                self._run(self._pull(load))
            except (KvTransferError, TimeoutError, OSError) as exc:
                log.warning("KV pull of %s failed (%s): vLLM recomputes its %d blocks",
                            load.req_id, exc, len(load.local_block_ids))
                with self.lock:
                    self.failed.update(load.local_block_ids)
                self.counts["kv_loads_failed"] += 1
                continue
            if load.local_block_ids:
                self._copy_in(load.local_block_ids)
                self.counts["kv_loads"] += 1
                assert self.mirror is not None
                self.counts["kv_load_bytes"] += len(load.local_block_ids) * self.mirror.block_bytes
        self._write(STATS_FILE, self.counts)

    def _write(self, name: str, info: dict[str, Any]) -> None:
        """Replaces ``name`` in the engine's folder at once (readers never see half)."""
        tmp = self.dir / f".{name}.{os.getpid()}"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.dir / name)

    async def _pull(self, load: Load) -> None:
        assert self.client is not None and self.mirror is not None
        params = msgspec.convert(load.params, KvTransferParams)  # Baton's, plus vLLM's keys
        await self.client.pull(params, load.remote_block_ids, self.mirror, load.local_block_ids)

    def take_failed(self) -> set[int]:
        with self.lock:
            failed, self.failed = self.failed, set()
        return failed

    # -- copies between vLLM's cache and the mirror
    def _copy_out(self, block_ids: list[int]) -> None:
        assert self.mirror_t is not None
        idx = torch.tensor(block_ids, dtype=torch.long)
        offset = 0
        for view, nbytes in zip(self.views, self.layer_bytes, strict=True):
            rows = view[idx].reshape(len(block_ids), -1).contiguous().view(torch.uint8)
            self.mirror_t[idx, offset : offset + nbytes] = rows
            offset += nbytes

    def _copy_in(self, block_ids: list[int]) -> None:
        assert self.mirror_t is not None
        idx = torch.tensor(block_ids, dtype=torch.long)
        offset = 0
        for view, nbytes in zip(self.views, self.layer_bytes, strict=True):
            rows = self.mirror_t[idx, offset : offset + nbytes].contiguous()
            view[idx] = rows.view(view.dtype).reshape(len(block_ids), *view.shape[1:])
            offset += nbytes

    def close(self) -> None:
        async def stop() -> None:
            if self.client is not None:
                await self.client.close()
            if self.server is not None:
                await self.server.close()

        if self.thread.is_alive():
            try:
                self._run(stop())
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)


def _block_first(t: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The cache tensor of one layer as a view with the block dimension first (vLLM's layouts
    put it first, or second after a K/V dimension of 2)."""
    for dim in (0, 1):
        if t.shape[dim] == num_blocks:
            return t.movedim(dim, 0)
    raise RuntimeError(f"no block dimension of size {num_blocks} in a KV cache of {tuple(t.shape)}")
