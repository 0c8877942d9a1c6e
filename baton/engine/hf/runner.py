"""A transformers causal LM whose KV cache lives in paged blocks of a ``BlockStore``.

The store's buffer is viewed as one tensor ``[num_blocks, layers, 2, kv_heads, block_size,
head_dim]`` (2 = keys, values); block ``b`` holds the KV of tokens ``i*block_size ...`` of a
request whose ``i``-th block is ``b``. The blocks are the only KV state: for each
``ForwardItem`` the runner gathers positions ``[0, start)`` from the item's blocks into a
transformers ``DynamicCache``, runs the model on the new tokens, and scatters their K/V back
into the blocks at positions ``[start, start + len)``. A request whose leading blocks were
computed by another request (a prefix-cache hit) or copied in from another process (a KV
transfer) therefore continues exactly as if it had computed them itself; the runner only
ever writes the positions it computes, so shared leading blocks are read-only to it.

Sampling is greedy at temperature 0, else temperature plus top-p. The draw for the token at
position ``p`` comes from the request's generator reseeded with ``(seed, p)``, where the seed is
``SamplingParams.seed`` or, without one, derived from the request id: a seeded request samples
the same tokens whether its steps ran here, on another worker, or were recomputed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from baton.engine.hf.models import offline_transformers
from baton.kv.store import BlockStore
from baton.protocol import SamplingParams

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily (argmax, first index on ties)."""

_SEED_MASK = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class ForwardItem:
    """One request's share of a step: compute ``token_ids`` at positions ``start...``."""

    request_id: str
    token_ids: list[int]
    """The new tokens to compute this step."""
    start: int
    """Position of ``token_ids[0]``: tokens already computed, whose KV is in the blocks."""
    block_ids: list[int]
    """The request's blocks in order, covering at least ``start + len(token_ids)`` tokens."""
    sample: SamplingParams | None
    """How to pick the next token; None when none is needed (a middle prefill chunk)."""
    banned: tuple[int, ...] = ()
    """Tokens the next token must not be (stop tokens before ``min_tokens`` outputs)."""


@dataclass(frozen=True, slots=True)
class KvShape:
    """The per-token KV layout of a model, read from its config."""

    model_type: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KvShape:
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        dtype_name = config.get("dtype") or config.get("torch_dtype") or "float32"
        dtype = getattr(torch, str(dtype_name))
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {dtype_name!r} in the model config")
        return cls(
            model_type=str(config.get("model_type", "?")),
            layers=config["num_hidden_layers"],
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            dtype=dtype,
        )

    def block_bytes(self, block_size: int) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.layers * 2 * self.kv_heads * block_size * self.head_dim * itemsize

    def layout(self, block_size: int) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"{self.model_type} L{self.layers} H{self.kv_heads} D{self.head_dim} "
            f"{dtype} bs{block_size}"
        )


class PagedModelRunner:
    """Runs forward passes of one model over a paged KV block store. See the module docstring."""

    store: BlockStore
    block_bytes: int
    layout: str
    """The KV layout (model shape, dtype, block size): equal strings mean blocks can be copied
    byte for byte between two runners."""
    vocab_size: int

    def __init__(
        self,
        model_dir: Path,
        *,
        num_blocks: int,
        block_size: int,
        shared: bool = False,
        num_threads: int | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)  # process-wide
        self.block_size = block_size
        self.model = _load_model(model_dir)
        self._cache_class = offline_transformers().DynamicCache
        config = self.model.config.to_dict()
        self.shape = replace(KvShape.from_config(config), dtype=self.model.dtype)
        self.vocab_size = int(self.model.config.vocab_size)
        self.layout = self.shape.layout(block_size)
        self.block_bytes = self.shape.block_bytes(block_size)
        self.store = BlockStore(num_blocks, self.block_bytes, shared=shared)
        self.kv: torch.Tensor | None = self._view_store()
        self._generators: dict[str, torch.Generator] = {}
        self._scratch_buffer = torch.empty(0, dtype=self.shape.dtype)

    @staticmethod
    def kv_bytes_per_block(model_dir: Path, block_size: int) -> int:
        """Bytes of one KV block, read from config.json alone (no weights are loaded)."""
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        return KvShape.from_config(config).block_bytes(block_size)

    def execute(self, items: list[ForwardItem]) -> dict[str, int]:
        """Run the items' forward passes: single-token decodes batched into one forward,
        every other item (prefill chunks) alone. The sampled token of each item that asked
        for one."""
        decodes = [it for it in items if len(it.token_ids) == 1 and it.start > 0]
        if len(decodes) < 2:
            decodes = []
        batched = {id(it) for it in decodes}
        sampled: dict[str, int] = {}
        with torch.inference_mode():
            if decodes:
                for item, logits in zip(decodes, self._forward_decodes(decodes), strict=True):
                    if item.sample is not None:
                        sampled[item.request_id] = self._sample(item, logits)
            for item in items:
                if id(item) in batched:
                    continue
                logits = self._forward(item)
                if item.sample is not None:
                    sampled[item.request_id] = self._sample(item, logits)
        return sampled

    def forget(self, request_id: str) -> None:
        """Drop the request's sampling state (call when it finishes or is aborted)."""
        self._generators.pop(request_id, None)

    def close(self) -> None:
        """Drop the model and the KV view, and close the store."""
        self.kv = None
        self.model = None
        self._scratch_buffer = torch.empty(0)
        self._generators.clear()
        self.store.close()

    def _view_store(self) -> torch.Tensor:
        shape = self.shape
        flat = torch.frombuffer(self.store.buffer, dtype=shape.dtype)
        return flat.view(
            self.store.num_blocks, shape.layers, 2, shape.kv_heads, self.block_size, shape.head_dim
        )

    def _forward(self, item: ForwardItem) -> torch.Tensor:
        """Logits of the item's last token; its new K/V are written to its blocks."""
        end = self._check(item)
        cache = self._gather(item.block_ids, item.start)
        out = self.model(
            input_ids=torch.tensor([item.token_ids]),
            position_ids=torch.arange(item.start, end).unsqueeze(0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._scatter(cache, item.block_ids, item.start, end)
        logits: torch.Tensor = out.logits
        return logits[0, -1]

    def _forward_decodes(self, items: list[ForwardItem]) -> torch.Tensor:
        """One forward for several one-token items of different context lengths: their KV is
        right-padded to the longest, padding masked out, each at its own position. Logits
        ``[len(items), vocab]``; each item's new K/V is written to its blocks."""
        for item in items:
            self._check(item)
        shape, longest = self.shape, max(item.start for item in items)
        size = (shape.layers, 2, len(items), shape.kv_heads, longest, shape.head_dim)
        kv = self._scratch(math.prod(size)).view(size)
        mask = torch.zeros(len(items), longest + 1, dtype=torch.long)
        mask[:, longest] = 1
        for row, item in enumerate(items):
            self._read_into(kv[:, :, row], item.block_ids, item.start)
            mask[row, : item.start] = 1
        cache = self._cache_over(kv)
        out = self.model(
            input_ids=torch.tensor([item.token_ids for item in items]),
            position_ids=torch.tensor([[item.start] for item in items]),
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        assert self.kv is not None, "the runner is closed"
        for row, item in enumerate(items):
            new = torch.stack([torch.stack((layer.keys[row, :, longest], layer.values[row, :, longest]))
                               for layer in cache.layers])  # [L, 2, H, D]
            block = item.block_ids[item.start // self.block_size]
            self.kv[block, :, :, :, item.start % self.block_size] = new
        logits: torch.Tensor = out.logits
        return logits[:, -1]

    def _check(self, item: ForwardItem) -> int:
        end = item.start + len(item.token_ids)
        if not item.token_ids or item.start < 0:
            raise ValueError(f"{item.request_id}: no tokens to compute (start {item.start})")
        if len(item.block_ids) * self.block_size < end:
            raise ValueError(
                f"{item.request_id}: {len(item.block_ids)} blocks of {self.block_size} "
                f"cannot hold {end} tokens"
            )
        if not all(0 <= block < self.store.num_blocks for block in item.block_ids):
            raise ValueError(f"{item.request_id}: block ids out of range: {item.block_ids}")
        return end

    def _gather(self, block_ids: list[int], start: int) -> Any:
        """A DynamicCache holding the KV of positions ``[0, start)`` read from the blocks."""
        if start == 0:
            return self._cache_class(config=self.model.config)
        shape = self.shape
        size = (shape.layers, 2, 1, shape.kv_heads, start, shape.head_dim)
        tokens = self._scratch(math.prod(size)).view(size)
        self._read_into(tokens[:, :, 0], block_ids, start)
        return self._cache_over(tokens)

    def _cache_over(self, kv: torch.Tensor) -> Any:
        """A DynamicCache whose layer ``i`` holds ``kv[i, 0]`` / ``kv[i, 1]`` (``[layers, 2,
        batch, kv_heads, tokens, head_dim]``) without a copy, as ``update()`` would leave it."""
        cache = self._cache_class(config=self.model.config)
        for layer, entry in enumerate(cache.layers):
            entry.lazy_initialization(kv[layer, 0], kv[layer, 1])
            entry.keys, entry.values = kv[layer, 0], kv[layer, 1]
        return cache

    def _scratch(self, numel: int) -> torch.Tensor:
        """A reused buffer for batched KV: a fresh one per step would page-fault on every
        first touch (that cost more than the copies themselves)."""
        if self._scratch_buffer.numel() < numel:
            self._scratch_buffer = torch.empty(numel, dtype=self.shape.dtype)
        return self._scratch_buffer[:numel]

    def _read_into(self, out: torch.Tensor, block_ids: list[int], start: int) -> None:
        """Copies the KV of positions ``[0, start)`` into ``out`` (``[layers, 2, kv_heads,
        T, head_dim]``, T >= start) straight from the blocks; positions past the blocks read
        are zeroed (masked out, but they must be finite), the rest of the last block is
        stale but finite KV."""
        assert self.kv is not None, "the runner is closed"
        size, length = self.block_size, out.shape[3]
        num_blocks = math.ceil(start / size)
        for i, block in enumerate(block_ids[:num_blocks]):
            lo = i * size
            hi = min(lo + size, length)
            out[:, :, :, lo:hi].copy_(self.kv[block][:, :, :, : hi - lo])
        if num_blocks * size < length:
            out[:, :, :, num_blocks * size :].zero_()

    def _scatter(self, cache: Any, block_ids: list[int], start: int, end: int) -> None:
        """Write the cache's K/V of positions ``[start, end)`` into the blocks."""
        assert self.kv is not None, "the runner is closed"
        new = torch.stack(
            [
                torch.stack((layer.keys[0, :, start:], layer.values[0, :, start:]))
                for layer in cache.layers
            ]
        )  # [L, 2, H, n, D]
        size, pos = self.block_size, start
        while pos < end:  # one slice copy per block touched (index_put is far slower)
            offset = pos % size
            take = min(size - offset, end - pos)
            self.kv[block_ids[pos // size], :, :, :, offset : offset + take] = (
                new[:, :, :, pos - start : pos - start + take]
            )
            pos += take

    def _sample(self, item: ForwardItem, logits: torch.Tensor) -> int:
        params = item.sample
        assert params is not None
        if item.banned:
            logits = logits.clone()
            logits[list(item.banned)] = -math.inf
        if params.temperature < GREEDY_TEMPERATURE:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.double() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            probs = _top_p(probs, params.top_p)
        position = item.start + len(item.token_ids)
        generator = self._generator(item.request_id)
        generator.manual_seed(_mix(_base_seed(item.request_id, params.seed), position))
        return int(torch.multinomial(probs, 1, generator=generator))

    def _generator(self, request_id: str) -> torch.Generator:
        generator = self._generators.get(request_id)
        if generator is None:
            generator = self._generators[request_id] = torch.Generator()
        return generator


def _load_model(model_dir: Path) -> Any:
    transformers = offline_transformers()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(Path(model_dir), dtype="auto")
    model.eval()
    model.requires_grad_(False)
    return model


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the most likely tokens whose mass reaches ``top_p`` (at least one)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely ones
    sorted_probs[1:][before[1:] >= top_p] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _base_seed(request_id: str, seed: int | None) -> int:
    if seed is not None:
        return seed & _SEED_MASK
    digest = hashlib.sha256(request_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK


def _mix(seed: int, position: int) -> int:
    digest = hashlib.sha256(f"{seed}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK
