"""The OpenAI-compatible frontend: HTTP/SSE, preprocessing, routing to workers, metrics.

Owns the HTTP surface and the per-request pipeline; owns no engine state. ``Frontend`` is the
component; ``FrontendApp`` the raw ASGI app behind it.
"""

from baton.frontend.app import FrontendApp
from baton.frontend.frontend import Frontend
from baton.frontend.metrics import FrontendMetrics

__all__ = ["Frontend", "FrontendApp", "FrontendMetrics"]
