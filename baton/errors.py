"""Baton's error taxonomy.

Every error a client can see is a ``BatonError`` carrying what the HTTP layer needs to answer
in OpenAI's format: a status code, an error ``type``, an optional ``param`` (the offending
field) and ``code``. Per-request errors are raised and answered; nothing here is fatal to a
process. Internal invariants use ``assert``; user input never does.
"""

from __future__ import annotations


class BatonError(Exception):
    """Root of all errors Baton reports to clients."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_body(self) -> dict[str, dict[str, object]]:
        """The OpenAI-style error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code if self.code is not None else self.status,
            }
        }


class InvalidRequestError(BatonError):
    """The request is malformed or has an invalid parameter (400)."""

    status = 400
    type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested output does not fit the model's context (400)."""

    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class AuthenticationError(BatonError):
    """No valid API key (401)."""

    status = 401
    type = "invalid_request_error"

    def __init__(self, message: str):
        super().__init__(message, code="invalid_api_key")


class PermissionDeniedError(BatonError):
    """The caller may not do this (403)."""

    status = 403
    type = "permission_error"


class NotFoundError(BatonError):
    """Unknown model or route (404)."""

    status = 404
    type = "not_found_error"


class MethodNotAllowedError(BatonError):
    status = 405
    type = "invalid_request_error"


class PayloadTooLargeError(BatonError):
    """Request body over the configured limit (413)."""

    status = 413
    type = "invalid_request_error"

    def __init__(self, size: int, limit: int):
        super().__init__(f"request body of {size} bytes (at least) exceeds the limit of "
                         f"{limit} bytes")
        self.size = size
        self.limit = limit


class ServiceUnavailableError(BatonError):
    """No healthy worker can take the request right now (503); clients should retry."""

    status = 503
    type = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class OverloadedError(ServiceUnavailableError):
    """Every eligible worker is busy (529 by default, configurable)."""

    status = 529
    type = "overloaded_error"


class EngineError(BatonError):
    """The engine failed while serving one request (500)."""

    status = 500
    type = "internal_error"


class TransportError(BatonError):
    """A request-plane peer could not be reached or went away mid-stream."""

    status = 503
    type = "service_unavailable"

    def __init__(self, message: str, *, address: str = ""):
        super().__init__(message)
        self.address = address


class PeerGoneError(TransportError):
    """The peer closed the connection while a stream was open."""


class WorkerFaultError(TransportError):
    """The worker's engine failed (or is being restarted): the request may continue on
    another worker, as when the worker's process dies."""

    def __init__(self, message: str, *, address: str = ""):
        super().__init__(message, address=address)
        self.code = "worker_fault"


class StreamTimeoutError(TransportError):
    """A stream missed its deadline (no first token, or no next token, in time): handled as
    a worker that went away."""


class RemoteError(BatonError):
    """A handler on the other side of the request plane raised; carries its kind."""

    status = 500
    type = "internal_error"

    def __init__(self, kind: str, message: str, status: int = 500):
        super().__init__(message)
        self.kind = kind
        self.status = status


_REMOTE_KINDS: dict[str, type[BatonError]] = {
    cls.__name__: cls
    for cls in (InvalidRequestError, NotFoundError, ServiceUnavailableError, OverloadedError,
                EngineError, WorkerFaultError)
}
"""Per-request errors a handler on the other side of the request plane may raise, rebuilt
as themselves so callers handle an in-process and a remote failure alike."""


def from_remote(kind: str, message: str, status: int, code: str | None = None) -> BatonError:
    """The error a remote handler raised: its own class when it is a known per-request
    error, otherwise a ``RemoteError`` carrying its kind."""
    cls = _REMOTE_KINDS.get(kind)
    if cls is None:
        return RemoteError(kind, message, status)
    err = cls(message)
    err.status = status
    err.code = code
    return err
