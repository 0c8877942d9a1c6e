"""How processes find and talk to each other: discovery and the streaming request plane.

Owns no engine or HTTP logic. ``Runtime`` ties a discovery backend to the request plane
(in-process calls and TCP); components are built on top of it.
"""

from baton.runtime.discovery import Discovery, DiscoveryEvent, InstanceRecord, MemoryDiscovery
from baton.runtime.endpoint import EndpointServer
from baton.runtime.events import EventPlane, MemoryEventPlane, Subscription
from baton.runtime.nats_discovery import NatsDiscovery
from baton.runtime.nats_events import NatsEventPlane, NatsSubscription, connect_nats
from baton.runtime.runtime import RequestClient, Runtime
from baton.runtime.tcp import TcpClientPool, TcpServer

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
    "Subscription",
    "TcpClientPool",
    "TcpServer",
    "connect_nats",
]
