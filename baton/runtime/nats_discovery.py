"""Discovery over a NATS JetStream key-value bucket, with leases made of per-key TTLs.

Owns: the bucket ``baton_discovery_<namespace>``, this process's records in it (kept alive by
one heartbeat task), and a local cache of every record (kept current by one watcher task).
Must not: delete other processes' records; their leases expire on their own.

Keys are ``<component>.<endpoint>.<instance_id hex>``; values are msgpack ``InstanceRecord``s.
Every put carries a ``Nats-TTL`` of ``lease_ttl_s`` rounded up to whole seconds (the server's
TTL granularity; nats-server >= 2.11), and the bucket places a purge marker when one expires,
so watchers see a dead process's records deleted within the lease. On a server that refuses per-key TTL markers the bucket falls back to a
bucket-wide max age of ``lease_ttl_s`` (every message expires after the lease; heartbeats keep
live records fresh) and, since such servers tell watchers nothing on expiry, the cache
expires a record itself ``lease_ttl_s`` after its last put.

How the cache stays consistent: only the watcher task writes it. Starting a watch delivers the
last value of every key, then an end-of-initial-state marker, then every change in stream
order; the initial state replaces the cache as a whole (``_resync``). After a reconnect the
maintenance task re-creates the bucket (a restarted server may have lost it), re-puts this
process's records and starts a fresh watch. Records missing from a fresh watch's initial
state are not dropped at once: they get ``lease_ttl_s`` to be re-put by their owner (who may
reconnect later than we did). While NATS is unreachable nothing is swept, so ``snapshot()``
keeps answering with the last known records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncGenerator
from typing import Self

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from baton.runtime.discovery import DiscoveryEvent, InstanceRecord, Watchers
from baton.runtime.nats_events import NatsConnection
from baton.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_INVALID = re.compile(r"[^-_=/a-zA-Z0-9]")
_STREAM_CONFIG_CONFLICT = 10058  # "stream name already in use with a different configuration"


def bucket_name(namespace: str) -> str:
    return "baton_discovery_" + _INVALID.sub("_", namespace).replace("/", "_").replace("=", "_")


def record_key(record: InstanceRecord) -> str:
    component, endpoint = (_INVALID.sub("_", s) for s in (record.component, record.endpoint))
    return f"{component}.{endpoint}.{record.instance_id:x}"


class NatsDiscovery:
    """``Discovery`` over JetStream KV (see the module docstring). Call ``start()`` (or any
    async method) before relying on ``snapshot()``."""

    def __init__(
        self,
        nc_or_url: Client | str,
        *,
        namespace: str,
        lease_ttl_s: float,
        heartbeat_s: float | None = None,
    ) -> None:
        if lease_ttl_s < 1.0:
            raise ValueError(f"lease_ttl_s must be at least 1 s (NATS TTL), got {lease_ttl_s}")
        self.connection = NatsConnection(nc_or_url, name=f"baton-discovery-{namespace}")
        self.bucket = bucket_name(namespace)
        self.lease_ttl_s = lease_ttl_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else lease_ttl_s / 3
        self.per_key_ttl = True
        """False after falling back to a bucket-wide TTL (a server without TTL markers)."""
        # -- the store
        self._kv: KeyValue | None = None
        self._own: dict[int, tuple[str, bytes]] = {}  # instance id -> (key, payload)
        # -- the cache (written by the watcher only) and its watchers
        self._cache: dict[str, InstanceRecord] = {}
        self._deadlines: dict[str, float] = {}  # key -> monotonic time it is dropped unless put
        self._watchers = Watchers()
        # -- tasks
        self._start_lock = asyncio.Lock()
        self._started = False
        self._reconnects_seen = 0
        self._kv_watcher: KeyValue.KeyWatcher | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._maintain_task: asyncio.Task[None] | None = None

    # -- Discovery API

    async def start(self) -> None:
        """Connects, creates the bucket if missing, and loads the cache (idempotent)."""
        async with self._start_lock:
            if self._started:
                return
            nc = await self.connection.get()
            self._reconnects_seen = nc.stats["reconnects"]
            await self._setup()
            self._maintain_task = asyncio.get_running_loop().create_task(self._maintain())
            self._started = True

    async def register(self, record: InstanceRecord) -> None:
        await self.start()
        key = record_key(record)
        self._own[record.instance_id] = (key, msgspec.msgpack.encode(record))
        await self._put(key, self._own[record.instance_id][1])

    async def deregister(self, instance_id: int) -> None:
        entry = self._own.pop(instance_id, None)
        if entry is not None:
            await self._purge(entry[0])

    def snapshot(self) -> list[InstanceRecord]:
        return list(self._cache.values())

    async def watch(self) -> AsyncGenerator[DiscoveryEvent, None]:
        await self.start()
        async for event in self._watchers.watch(self.snapshot()):
            yield event

    async def close(self) -> None:
        """Stops the tasks, deletes this process's own records (graceful shutdown), ends the
        watchers and closes the connection if this object opened it."""
        await cancel_and_wait(self._maintain_task)
        for instance_id in list(self._own):
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.deregister(instance_id)
        await self._stop_watch()
        self._watchers.close()
        await self.connection.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the store

    async def _setup(self) -> None:
        """Bucket, own records, then a fresh watch: after start and after every reconnect."""
        self._kv = await self._ensure_bucket()
        for key, payload in list(self._own.values()):
            await self._put(key, payload)
        await self._restart_watch()

    async def _ensure_bucket(self) -> KeyValue:
        js = (await self.connection.get()).jetstream()
        ttl = math.ceil(self.lease_ttl_s)
        try:
            return await js.create_key_value(bucket=self.bucket, history=1, limit_marker_ttl=ttl)
        except nats.js.errors.KeyValueLimitMarkerTTLNotSupportedError:
            log.warning("NATS server lacks per-key TTL markers: bucket-wide TTL %.1f s", ttl)
            self.per_key_ttl = False
            return await js.create_key_value(bucket=self.bucket, history=1, ttl=self.lease_ttl_s)
        except nats.js.errors.APIError as exc:
            if exc.err_code != _STREAM_CONFIG_CONFLICT:
                raise
            kv = await js.key_value(self.bucket)  # made by a peer with another lease: use it
            info = await js.stream_info(f"KV_{self.bucket}")
            self.per_key_ttl = bool(info.config.subject_delete_marker_ttl)
            return kv

    def _headers(self) -> dict[str, str]:
        # The server keeps TTLs in whole seconds (it truncates "1500ms" to 1 s): round up.
        return {"Nats-TTL": f"{math.ceil(self.lease_ttl_s)}s"} if self.per_key_ttl else {}

    async def _put(self, key: str, payload: bytes) -> None:
        js = (await self.connection.get()).jetstream()
        await js.publish(f"$KV.{self.bucket}.{key}", payload, headers=self._headers() or None)

    async def _purge(self, key: str) -> None:
        js = (await self.connection.get()).jetstream()
        headers = {"KV-Operation": KV_PURGE, "Nats-Rollup": "sub", **self._headers()}
        await js.publish(f"$KV.{self.bucket}.{key}", b"", headers=headers)

    # -- the cache

    async def _restart_watch(self) -> None:
        """Starts a watch, applies its initial state as a whole, then follows it in a task."""
        await self._stop_watch()
        assert self._kv is not None
        watcher = await self._kv.watch(">")
        try:
            fresh = await _initial_state(watcher)
        except BaseException:
            with contextlib.suppress(nats.errors.Error):
                await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
            raise
        self._resync(fresh)
        self._kv_watcher = watcher
        self._watch_task = asyncio.get_running_loop().create_task(self._follow(watcher))

    async def _stop_watch(self) -> None:
        await cancel_and_wait(self._watch_task)
        self._watch_task = None
        if self._kv_watcher is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._kv_watcher.stop()  # type: ignore[no-untyped-call]  # as above
            self._kv_watcher = None

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:
                continue
            if entry.operation in (KV_DEL, KV_PURGE):
                self._remove(entry.key)
            elif (record := _decode(entry.value)) is not None:
                self._store(entry.key, record)

    def _resync(self, fresh: dict[str, InstanceRecord]) -> None:
        grace = time.monotonic() + self.lease_ttl_s
        for key in self._cache.keys() - fresh.keys():
            self._deadlines.setdefault(key, grace)
        for key, record in fresh.items():
            self._store(key, record)

    def _store(self, key: str, record: InstanceRecord) -> None:
        if self.per_key_ttl:
            self._deadlines.pop(key, None)
        else:
            self._deadlines[key] = time.monotonic() + self.lease_ttl_s
        if self._cache.get(key) != record:
            self._cache[key] = record
            self._emit(DiscoveryEvent("put", record))

    def _remove(self, key: str) -> None:
        self._deadlines.pop(key, None)
        record = self._cache.pop(key, None)
        if record is not None:
            self._emit(DiscoveryEvent("delete", record))

    def _sweep(self) -> None:
        now = time.monotonic()
        for key in [k for k, deadline in self._deadlines.items() if deadline <= now]:
            self._remove(key)

    def _emit(self, event: DiscoveryEvent) -> None:
        self._watchers.publish(event)

    # -- heartbeat and reconnection

    async def _maintain(self) -> None:
        """Every ``heartbeat_s``: re-put own records (or, after a reconnect, set everything up
        again) and expire overdue cache entries. Does nothing while disconnected."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            nc = await self.connection.get()
            if nc.is_closed:
                return  # closed under us (its owner shut it): our leases run out on their own
            if not nc.is_connected:
                continue
            try:
                await self._tick(nc)
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("discovery heartbeat failed (retrying): %s", exc)
                self._reconnects_seen = -1  # set up again on the next tick

    async def _tick(self, nc: Client) -> None:
        if nc.stats["reconnects"] != self._reconnects_seen:
            self._reconnects_seen = nc.stats["reconnects"]
            await self._setup()
        else:
            for key, payload in list(self._own.values()):
                await self._put(key, payload)
        self._sweep()


async def _initial_state(watcher: KeyValue.KeyWatcher) -> dict[str, InstanceRecord]:
    """The records a fresh watch delivers before its end-of-initial-state marker."""
    fresh: dict[str, InstanceRecord] = {}
    while (entry := await watcher.updates(timeout=5.0)) is not None:  # type: ignore[no-untyped-call]  # nats-py
        if entry.operation not in (KV_DEL, KV_PURGE) and (record := _decode(entry.value)):
            fresh[entry.key] = record
        else:
            fresh.pop(entry.key, None)
    return fresh


def _decode(value: bytes | None) -> InstanceRecord | None:
    try:
        return msgspec.msgpack.decode(value or b"", type=InstanceRecord)
    except msgspec.DecodeError as exc:
        log.warning("ignoring undecodable discovery record: %s", exc)
        return None


