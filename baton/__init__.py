"""Baton: distributed LLM inference serving.

The package is split by concept: ``kv`` (block hashing, the block pool), ``engine`` (scheduler,
timing model, simulated engine), ``preprocess`` (tokenizer, chat template, detokenizer, stop
strings), ``runtime`` (discovery, request plane), ``worker``, ``router`` and ``frontend``.
See ``docs/structure.md`` for the module map.
"""

__version__ = "0.1.0"
