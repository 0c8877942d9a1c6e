"""Baton: distributed LLM inference serving.

The packages follow the layers of ``docs/architecture.md``: foundations (``config``,
``settings``, ``errors``), pure cores (``kv``, ``protocol``, ``preprocess``, ``trace``), the
``runtime`` (discovery, event and request planes), components (``transfer``, ``engine``,
``router``), shells (``worker``, ``frontend``, ``graph``, ``bench``, ``sim``) and the ``cli``.
See ``docs/structure.md`` for the module map.
"""

__version__ = "0.1.0"
