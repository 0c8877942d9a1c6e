"""Discovery from a list of addresses (``baton frontend --worker tcp://HOST:PORT``).

One owned task asks each address for its ``info`` every ``probe_interval_s`` and keeps the
runtime's discovery in step: a worker that answers is registered (under the address that
was dialled), one that stops answering is deregistered, and comes back when it answers again.
``set_addresses`` changes the list (Kubernetes discovery does, from the API): an address
dropped from it is deregistered at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Self

import msgspec

from baton.errors import BatonError
from baton.protocol import Empty
from baton.runtime.discovery import InstanceRecord
from baton.runtime.net import parse_tcp_address
from baton.runtime.runtime import Runtime
from baton.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class StaticWorkers:
    def __init__(self, runtime: Runtime, addresses: Sequence[str], interval_s: float) -> None:
        for address in addresses:
            parse_tcp_address(address)  # fail fast on a typo
        self._runtime = runtime
        self._addresses = list(addresses)
        self._interval = interval_s
        self._known: dict[str, InstanceRecord] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        if not self._addresses:
            return self
        await self.probe_all()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="static-workers")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.probe_all()

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(a) for a in self._addresses))

    async def set_addresses(self, addresses: Sequence[str]) -> None:
        """Probes ``addresses`` from now on; workers at addresses no longer listed leave."""
        self._addresses = list(addresses)
        for address in [a for a in self._known if a not in self._addresses]:
            gone = self._known.pop(address)
            log.info("worker %d at %s is no longer listed", gone.instance_id, address)
            await self._runtime.discovery.deregister(gone.instance_id)

    async def _probe(self, address: str) -> None:
        try:
            record = await asyncio.wait_for(
                self._runtime.client.unary(address, "info", Empty(), InstanceRecord), 3.0
            )
        except (TimeoutError, BatonError, OSError) as exc:
            gone = self._known.pop(address, None)
            if gone is not None:
                log.warning("worker at %s stopped answering: %s", address, exc)
                await self._runtime.discovery.deregister(gone.instance_id)
            return
        record = msgspec.structs.replace(record, address=address)
        if self._known.get(address) != record:
            old = self._known.get(address)
            if old is not None and old.instance_id != record.instance_id:
                await self._runtime.discovery.deregister(old.instance_id)
            self._known[address] = record
            await self._runtime.discovery.register(record)

