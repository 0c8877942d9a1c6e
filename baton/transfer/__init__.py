"""KV transfer: moving a prefilled prompt's KV blocks from a prefill worker to a decode worker.

The source (``KvTransferServer``, one per worker) *holds* the blocks a prefill computed and
hands out ``KvTransferParams``. The destination (``KvTransferClient``) copies the blocks it
lacks into its own ``BlockStore`` and acknowledges; the source then releases the hold (its
``on_release`` callback frees the blocks). A hold nobody acknowledges is released after
``hold_timeout_s``. Every hold is released exactly once, on the source's event loop thread.

Backends, chosen by the client from the params:

``inproc://NAME``
    Source and destination live in one process: the client finds the server in a module
    registry and copies block to block, no I/O. When the server's loop runs in another
    thread, the blocks are copied out on that loop and written on the client's.
``tcp://HOST:PORT``
    A bulk protocol of its own (not the request plane). Control frames are a 4-byte
    big-endian length and a msgpack struct. The client sends ``Pull``; the server answers a
    ``Reply`` header and then ``nbytes`` raw bytes (the blocks back to back) in chunks,
    honouring the transport's backpressure; the client receives them with a
    ``BufferedProtocol`` straight into the destination's blocks and sends ``Ack`` (no
    reply). A connection that drops between ``Pull`` and ``Ack`` releases that transfer (the
    receiver gave up), and a hold that ends otherwise (timeout, release, close) while its
    pull is unacknowledged drops that connection, since payload still queued may be views of
    blocks about to be reused. One transfer at a time per connection; the client pools idle
    connections per address and retries once on a fresh one when a pooled one has died.
shm
    When the params name a shared-memory segment, the client asks ``Pull(mode="shm")`` over
    the same control connection: the server answers with the segment's name and size and no
    payload, the client copies straight out of the segment and acknowledges with
    ``Ack(confirm=True)``, whose reply says whether the hold was still there (a hold that
    expired mid-copy may have torn the data). If the segment cannot be attached (another
    host), the client falls back to the byte mode on the same connection.

Modules: ``wire.py`` (control messages and framing), ``server.py`` (the source),
``client.py`` (the destination), ``inproc.py`` (the in-process backend). This package moves
bytes; which blocks hold what is the block pool's business (``baton.kv``).
"""

from baton.transfer.client import KvTransferClient
from baton.transfer.server import KvTransferServer
from baton.transfer.wire import KvTransferError

__all__ = ["KvTransferClient", "KvTransferError", "KvTransferServer"]
