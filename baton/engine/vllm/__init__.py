"""The vLLM backend (``--engine vllm``): ``engine.py`` runs vLLM's ``AsyncLLM`` in a worker;
``events.py`` reads vLLM's KV events (pure, no vLLM import)."""
