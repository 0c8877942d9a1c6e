"""The vLLM backend (``--engine vllm``): ``engine.py`` runs vLLM's ``AsyncLLM`` in a worker;
``events.py`` reads vLLM's KV events (pure, no vLLM import); ``connector.py`` is the KV
connector vLLM loads for disaggregated workers; ``reaper.py`` ends vLLM's processes with
their worker."""
