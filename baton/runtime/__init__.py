"""How processes find and talk to each other: discovery, the event plane and the streaming
request plane.

Owns no engine or HTTP logic and no message types of its own. ``Runtime`` ties a discovery
backend (memory, NATS, static addresses) and an event plane (memory, NATS) to the request
plane (in-process calls and TCP); ``open_runtime`` builds a process's runtime from its
``RuntimeConfig``; components are built on top of it.
"""

from baton.runtime.discovery import Discovery, DiscoveryEvent, InstanceRecord, MemoryDiscovery
from baton.runtime.endpoint import EndpointServer
from baton.runtime.events import EventPlane, MemoryEventPlane, Subscription
from baton.runtime.nats_discovery import NatsDiscovery
from baton.runtime.nats_events import NatsEventPlane, NatsSubscription, connect_nats
from baton.runtime.process import open_runtime
from baton.runtime.runtime import RequestClient, Runtime
from baton.runtime.static import StaticWorkers
from baton.runtime.tcp import TcpServer
from baton.runtime.tcp_client import TcpClientPool

__all__ = [
    "Discovery",
    "DiscoveryEvent",
    "EndpointServer",
    "EventPlane",
    "InstanceRecord",
    "MemoryDiscovery",
    "MemoryEventPlane",
    "NatsDiscovery",
    "NatsEventPlane",
    "NatsSubscription",
    "RequestClient",
    "Runtime",
    "StaticWorkers",
    "Subscription",
    "TcpClientPool",
    "TcpServer",
    "connect_nats",
    "open_runtime",
]
