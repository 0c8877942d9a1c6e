"""A roofline timing model: one step's time from the model's architecture and the hardware.

Every part of a forward pass is bounded by arithmetic or by memory traffic, whichever takes
longer on the hardware; a step costs the sum of its parts plus the communication its
parallelism needs and a fixed overhead:

- **linear layers** (attention projections, the MLP or the active experts, the LM head):
  ``2 x active parameters`` FLOPs per token against reading their weights once per step (for
  a mixture of experts, only the experts the step's tokens are routed to, uniformly);
- **attention**: ``2 x (qk + v width)`` FLOPs per (query, context token) pair against the
  KV cache the decoding requests read (the scheduler counts both per step:
  ``SchedulerOutput.prefill_attention_pairs`` and ``decode_context_tokens``);
- **tensor parallelism** splits weights, heads and FLOPs over ``tp`` GPUs and adds two
  all-reduces of the activations per layer; **expert parallelism** splits the experts over
  ``ep`` GPUs and adds the all-to-all that sends each token to the GPUs holding its experts
  (once per GPU, in the weights' precision) and back (in bf16).

Multi-head latent attention (DeepSeek) caches one latent vector per token and layer
(``kv_lora_rank + qk_rope_head_dim``) and attends in the latent space (weights absorbed);
its latent cache is not split by tensor parallelism. DeepSeek sparse attention (V3.2) lets
each query attend to ``index_topk`` tokens that a lightning indexer (``index_n_heads`` x
``index_head_dim``, FP8) picks after scoring every context token.

``ModelShape.from_hf_config`` reads an HF ``config.json``; ``HARDWARE`` holds public GPU specs
(``docs/timing-model.md`` cites each). The efficiencies say what share of the peak a real
kernel reaches; they are inputs, not fitted. Pure: no I/O, no clock.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from baton.engine.step import StepShape

Dtype = Literal["bf16", "fp8", "fp4"]
DTYPE_BYTES: dict[str, float] = {"bf16": 2.0, "fp8": 1.0, "fp4": 0.5}
ACTIVATION_BYTES = 2.0
"""Activations travel in bf16 between GPUs."""


@dataclass(frozen=True)
class Hardware:
    """One GPU: dense (no sparsity) peak FLOP/s per dtype, memory and link bandwidths."""

    name: str
    flops: Mapping[str, float]
    memory_bandwidth: float
    """HBM, bytes/s."""
    memory_bytes: float
    link_bandwidth: float
    """NVLink, bytes/s in each direction per GPU."""
    source: str

    def peak(self, dtype: str) -> float:
        """FLOP/s at ``dtype``; a dtype the GPU lacks runs at the next wider one."""
        for candidate in ("fp4", "fp8", "bf16")[("fp4", "fp8", "bf16").index(dtype):]:
            if candidate in self.flops:
                return self.flops[candidate]
        raise ValueError(f"{self.name} has no tensor-core peak for {dtype} or wider")


T, G = 1e12, 1e9
HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("H100 SXM", {"bf16": 989 * T, "fp8": 1979 * T}, 3350 * G, 80 * G, 450 * G,
                     "NVIDIA H100 Tensor Core GPU datasheet (SXM; sparse figures halved)"),
    "h200": Hardware("H200 SXM", {"bf16": 989 * T, "fp8": 1979 * T}, 4800 * G, 141 * G, 450 * G,
                     "NVIDIA H200 Tensor Core GPU datasheet (SXM; sparse figures halved)"),
    "b200": Hardware("B200 (HGX, 1000 W)", {"bf16": 2250 * T, "fp8": 4500 * T, "fp4": 9000 * T},
                     8000 * G, 180 * G, 900 * G,
                     "NVIDIA DGX B200 datasheet, per GPU (eight per system; sparse halved)"),
    "gb200": Hardware("GB200 NVL72 GPU (1200 W)",
                      {"bf16": 2500 * T, "fp8": 5000 * T, "fp4": 10000 * T},
                      8000 * G, 186 * G, 900 * G,
                      "NVIDIA GB200 NVL72 datasheet, rack figures per GPU (72; sparse halved)"),
}


@dataclass(frozen=True)
class ModelShape:
    """What a step's cost depends on; ``from_hf_config`` reads it from a ``config.json``."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    experts: int = 0
    """Routed experts per MoE layer (0: a dense model)."""
    active_experts: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    """Width of the shared experts together (0: none)."""
    dense_layers: int = 0
    """Leading layers with a dense MLP in a MoE model (DeepSeek's ``first_k_dense_replace``)."""
    kv_lora_rank: int = 0
    """Multi-head latent attention's latent width (0: grouped-query attention)."""
    q_lora_rank: int = 0
    qk_rope_dim: int = 0
    qk_nope_dim: int = 0
    v_head_dim: int = 0
    index_topk: int = 0
    """DeepSeek sparse attention (V3.2): each query attends to this many context tokens, as
    a lightning indexer picks them (0: dense attention)."""
    index_heads: int = 0
    index_head_dim: int = 0
    weights: Dtype = "bf16"
    kv_cache: Dtype = "bf16"

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], weights: Dtype | None = None,
                       kv_cache: Dtype | None = None) -> ModelShape:
        """From an HF ``config.json``; the dtypes from its ``torch_dtype`` and
        ``quantization_config`` unless given."""
        c = dict(config.get("text_config") or config)
        heads = int(c["num_attention_heads"])
        experts = int(c.get("n_routed_experts") or c.get("num_local_experts")
                      or c.get("num_experts") or 0)
        expert_width = int(c.get("moe_intermediate_size") or c["intermediate_size"])
        shared = int(c.get("shared_expert_intermediate_size")
                     or int(c.get("n_shared_experts") or 0) * expert_width)
        found, found_kv = _quantized(config)
        return cls(
            layers=int(c["num_hidden_layers"]), hidden=int(c["hidden_size"]), heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            intermediate=int(c["intermediate_size"]), vocab=int(c["vocab_size"]),
            experts=experts, active_experts=int(c.get("num_experts_per_tok") or 0),
            expert_intermediate=expert_width if experts else 0,
            shared_intermediate=shared if experts else 0,
            dense_layers=int(c.get("first_k_dense_replace") or 0) if experts else 0,
            kv_lora_rank=int(c.get("kv_lora_rank") or 0),
            q_lora_rank=int(c.get("q_lora_rank") or 0),
            qk_rope_dim=int(c.get("qk_rope_head_dim") or 0),
            qk_nope_dim=int(c.get("qk_nope_head_dim") or 0),
            v_head_dim=int(c.get("v_head_dim") or 0),
            index_topk=int(c.get("index_topk") or 0),
            index_heads=int(c.get("index_n_heads") or 0),
            index_head_dim=int(c.get("index_head_dim") or 0),
            weights=weights or found, kv_cache=kv_cache or found_kv,
        )

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.experts else 0

    def attention_params(self) -> int:
        """Projection weights of one layer's attention."""
        h, n = self.hidden, self.heads
        if not self.mla:
            return h * n * self.head_dim * 2 + h * self.kv_heads * self.head_dim * 2
        qk = self.qk_nope_dim + self.qk_rope_dim
        q = (h * self.q_lora_rank + self.q_lora_rank * n * qk) if self.q_lora_rank else h * n * qk
        kv = h * (self.kv_lora_rank + self.qk_rope_dim) + self.kv_lora_rank * n * (
            self.qk_nope_dim + self.v_head_dim)
        indexer = 0
        if self.sparse:  # its query (from the query latent), key and head-weight projections
            d, k = self.index_head_dim, self.index_heads
            indexer = (self.q_lora_rank or h) * k * d + h * d + h * k
        return q + kv + n * self.v_head_dim * h + indexer

    def mlp_params(self, width: int) -> int:
        """A gated MLP (gate, up, down) of ``width``."""
        return 3 * self.hidden * width

    def parameters(self) -> tuple[int, int]:
        """(total, activated per token), embeddings and LM head included."""
        dense = (self.layers * self.attention_params()
                 + (self.layers - self.moe_layers) * self.mlp_params(self.intermediate)
                 + self.moe_layers * self.mlp_params(self.shared_intermediate))
        expert = self.mlp_params(self.expert_intermediate) * self.moe_layers
        embeddings = 2 * self.hidden * self.vocab
        return (dense + self.experts * expert + embeddings,
                dense + self.active_experts * expert + embeddings)

    @property
    def sparse(self) -> bool:
        return self.index_topk > 0

    def kv_bytes_per_token(self) -> float:
        """KV cache bytes one token holds over all layers (with sparse attention, its
        indexer key too)."""
        per_layer = (self.kv_lora_rank + self.qk_rope_dim if self.mla
                     else 2 * self.kv_heads * self.head_dim)
        return (per_layer * DTYPE_BYTES[self.kv_cache] + self.index_key_bytes()) * self.layers

    def index_key_bytes(self) -> int:
        """One token's indexer key in one layer: FP8 with an fp32 scale, as DeepSeek's
        kernels keep it (0 without sparse attention)."""
        return self.index_head_dim + 4 if self.sparse else 0

    def attention_width(self, decode: bool) -> int:
        """``qk + v`` width summed over heads: FLOPs per (query, context token) pair / 2.
        Latent attention decodes absorbed (scores over the latent and rope dims, values in
        the latent) and prefills as ordinary heads, as engines run it."""
        if self.mla and decode:
            return self.heads * (2 * self.kv_lora_rank + self.qk_rope_dim)
        if self.mla:
            return self.heads * (self.qk_nope_dim + self.qk_rope_dim + self.v_head_dim)
        return 2 * self.heads * self.head_dim


def _quantized(config: Mapping[str, Any]) -> tuple[Dtype, Dtype]:
    """The weights' and the KV cache's dtypes a ``quantization_config`` names (ModelOpt's
    ``quant_algo`` and ``kv_cache_quant_algo``, or a ``quant_method``/``fmt``)."""
    quant = config.get("quantization_config") or {}

    def dtype(*keys: str) -> Dtype:
        text = " ".join(str(quant.get(k, "")) for k in keys).lower()
        return "fp4" if "fp4" in text else "fp8" if "fp8" in text or "e4m3" in text else "bf16"

    return dtype("quant_method", "quant_algo", "fmt"), dtype("kv_cache_quant_algo")


@dataclass(frozen=True)
class Parallelism:
    """A worker of ``tp x dp`` GPUs: ``dp`` attention data-parallel ranks of ``tp`` GPUs
    each. Routed experts are split over all of them, ``ep`` ways by expert (TRT-LLM's
    ``moe_expert_parallel_size``) and the rest by width."""

    tp: int = 1
    """Tensor parallel GPUs per rank (weights, heads and FLOPs split; two all-reduces per
    layer)."""
    ep: int = 1
    """Expert parallel GPUs (an all-to-all each way per MoE layer)."""
    dp: int = 1
    """Attention data-parallel ranks: each runs attention and the dense layers on its own
    batch; the ranks meet in the expert layers and step in lockstep."""

    def __post_init__(self) -> None:
        if self.tp < 1 or self.ep < 1 or self.dp < 1:
            raise ValueError("tp, ep and dp must be >= 1")
        if self.gpus % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide the worker's GPUs (tp x dp = "
                             f"{self.gpus})")

    @property
    def gpus(self) -> int:
        return self.tp * self.dp


@dataclass(frozen=True)
class Efficiency:
    """The share of a peak real kernels reach, and what every step and collective costs."""

    compute: float = 0.6
    memory: float = 0.8
    link: float = 0.7
    step_overhead_ms: float = 1.0
    """Scheduling, launches and sampling of one step, whatever its size."""
    collective_latency_us: float = 10.0
    """The fixed cost of one all-reduce or all-to-all."""


@dataclass(frozen=True, slots=True)
class _Rates:
    """A ``RooflineTiming``'s per-step coefficients, worked out once (the simulator calls
    ``step_ms`` millions of times): seconds per FLOP and per byte of each part, per GPU."""

    linear_flop_s: float
    """Seconds per token through the weights every token passes."""
    head_flop_s: float
    """Seconds per sampled token through the LM head."""
    weights_s: float
    """Seconds to read those weights once."""
    expert_flop_s: float
    expert_read_s: float
    """Seconds to read one routed expert (all MoE layers), per GPU."""
    experts: int
    active_share: float
    """``active experts / experts``: a token's chance of reaching a given expert."""
    decode_pair_s: float
    prefill_pair_s: float
    kv_token_s: float
    """Seconds to read or write one token's KV (all layers; without the indexer key)."""
    topk: int
    """Tokens a query attends to with sparse attention (0: all)."""
    index_pair_s: float
    """Sparse attention's indexer: seconds per (query, context token) pair it scores."""
    index_token_s: float
    """Seconds to read or write one token's indexer key (all layers)."""
    allreduce_s: float
    """Per token: the all-reduces' bandwidth share, all layers."""
    allreduce_fixed_s: float
    alltoall_s: float
    alltoall_fixed_s: float


@dataclass(frozen=True)
class RooflineTiming:
    """``TimingModel``: a step's milliseconds on one GPU of ``parallel`` (``step_ms``), with
    ``parts_ms`` breaking it down."""

    model: ModelShape
    hardware: Hardware
    parallel: Parallelism = field(default_factory=Parallelism)
    efficiency: Efficiency = field(default_factory=Efficiency)

    def step_ms(self, num_prefill_tokens: int, num_decode_requests: int,
                kv_tokens_in_use: int, kv_tokens_total: int, prefill_pairs: int = 0,
                decode_context: int = 0) -> float:
        if num_prefill_tokens + num_decode_requests == 0:
            return 0.0
        linear, attention, communication = self._parts(
            num_prefill_tokens, num_decode_requests, kv_tokens_in_use, prefill_pairs,
            decode_context)
        return (linear + attention + communication) * 1e3 + self.efficiency.step_overhead_ms

    def parts_ms(self, prefill_tokens: int, decode_requests: int, kv_tokens: int,
                 prefill_pairs: int = 0, decode_context: int = 0) -> dict[str, float]:
        """The step's time by part: linear layers, attention, communication, overhead.
        Without ``prefill_pairs`` the prefill tokens are one chunk attending to itself;
        without ``decode_context`` the decoding requests attend to all the KV in use."""
        if prefill_tokens + decode_requests == 0:
            return {"linear": 0.0, "attention": 0.0, "communication": 0.0, "overhead": 0.0}
        parts = self._parts(prefill_tokens, decode_requests, kv_tokens, prefill_pairs,
                            decode_context)
        return {"linear": parts[0] * 1e3, "attention": parts[1] * 1e3,
                "communication": parts[2] * 1e3, "overhead": self.efficiency.step_overhead_ms}

    def lockstep_ms(self, ranks: Sequence[StepShape]) -> float:
        """A step of attention data-parallel ranks (``step_ms``'s arguments per rank that
        has work): each rank's attention and dense layers on its own batch, the slowest
        setting the pace; the routed experts on all the ranks' tokens; the all-to-all as
        long as the busiest rank's share. Idle ranks still step (they join the experts'
        collectives with an empty batch)."""
        rank_s = 0.0
        tokens = most = 0
        for prefill, decode, kv, _, pairs, context in ranks:
            if prefill + decode == 0:
                continue
            dense, attention, allreduce = self._rank_parts(prefill, decode, kv, pairs, context)
            rank_s = max(rank_s, dense + attention + allreduce)
            tokens += prefill + decode
            most = max(most, prefill + decode)
        if not tokens:
            return 0.0
        seconds = rank_s + self._experts_s(tokens) + self._alltoall_s(most)
        return seconds * 1e3 + self.efficiency.step_overhead_ms

    def _parts(self, prefill_tokens: int, decode_requests: int, kv_tokens: int,
               prefill_pairs: int, decode_context: int) -> tuple[float, float, float]:
        """Seconds of the linear layers, attention and communication (one rank)."""
        tokens = prefill_tokens + decode_requests
        dense, attention, allreduce = self._rank_parts(
            prefill_tokens, decode_requests, kv_tokens, prefill_pairs, decode_context)
        return (dense + self._experts_s(tokens), attention,
                allreduce + self._alltoall_s(tokens))

    def _experts_s(self, tokens: int) -> float:
        """The routed experts over ``tokens``: uniform routing, so the step reads the
        distinct experts its tokens reach."""
        r = self._rates
        if not r.experts:
            return 0.0
        touched = r.experts * (1 - (1 - r.active_share) ** tokens)
        return max(tokens * r.expert_flop_s, touched * r.expert_read_s)

    def _alltoall_s(self, tokens: int) -> float:
        r = self._rates
        return tokens * r.alltoall_s + r.alltoall_fixed_s if r.alltoall_fixed_s else 0.0

    def _rank_parts(self, prefill_tokens: int, decode_requests: int, kv_tokens: int,
                    prefill_pairs: int, decode_context: int) -> tuple[float, float, float]:
        """One rank's own work: the linear layers but the routed experts, attention and the
        all-reduces."""
        r = self._rates
        tokens = prefill_tokens + decode_requests
        sampled = decode_requests + (1 if prefill_tokens else 0)
        linear = max(tokens * r.linear_flop_s + sampled * r.head_flop_s, r.weights_s)
        decode_pairs = (decode_context or kv_tokens) if decode_requests else 0
        chunk_pairs = prefill_pairs or prefill_tokens * (prefill_tokens + 1) / 2
        attended, chunk_attended = decode_pairs, chunk_pairs
        if r.topk:  # sparse: each query attends to topk tokens, the indexer scores them all
            attended = min(decode_pairs, decode_requests * r.topk)
            chunk_attended = min(chunk_pairs, prefill_tokens * r.topk)
        # the decodes read their contexts, the prefills write theirs (a prefix they read is
        # left out: a prefill's attention is bound by its arithmetic)
        attention = max(attended * r.decode_pair_s + chunk_attended * r.prefill_pair_s
                        + (decode_pairs + chunk_pairs) * r.index_pair_s,
                        (attended + prefill_tokens) * r.kv_token_s
                        + (decode_pairs + prefill_tokens) * r.index_token_s)
        allreduce = tokens * r.allreduce_s + r.allreduce_fixed_s if r.allreduce_fixed_s else 0.0
        return linear, attention, allreduce

    @functools.cached_property
    def _rates(self) -> _Rates:
        m, p, e, hw = self.model, self.parallel, self.efficiency, self.hardware
        wbytes = DTYPE_BYTES[m.weights]
        flop = 1 / (hw.peak(m.weights) * e.compute)
        attention_flop = 1 / (hw.peak("bf16") * e.compute)
        byte = 1 / (hw.memory_bandwidth * e.memory)
        link = hw.link_bandwidth * e.link
        dense = (m.layers * m.attention_params()
                 + (m.layers - m.moe_layers) * m.mlp_params(m.intermediate)
                 + m.moe_layers * m.mlp_params(m.shared_intermediate))
        head = m.hidden * m.vocab
        expert = m.mlp_params(m.expert_intermediate) * m.moe_layers
        shards = p.gpus
        split = 1 if m.mla else min(p.tp, m.kv_heads)  # a latent cache is not split
        activations = m.hidden * ACTIVATION_BYTES  # per token
        fixed = e.collective_latency_us * 1e-6
        tp_share = 2 * (p.tp - 1) / p.tp
        # a token goes once to each other GPU holding one of its experts (dispatched in the
        # weights' low precision when they have one, combined back in bf16)
        reached = p.ep * (1 - (1 - 1 / p.ep) ** m.active_experts) if m.experts else 0.0
        dispatch = min(wbytes, 1.0) + (1 / 16 if m.weights == "fp4" else 0.0)  # + scales
        alltoall_bytes = reached * (p.ep - 1) / p.ep / p.tp * m.hidden * (
            dispatch + ACTIVATION_BYTES)
        collectives = p.ep > 1 and m.moe_layers > 0
        return _Rates(
            linear_flop_s=2 * dense / p.tp * flop, head_flop_s=2 * head / p.tp * flop,
            weights_s=(dense + head) * wbytes / p.tp * byte,
            expert_flop_s=2 * m.active_experts * expert / shards * flop,
            expert_read_s=expert * wbytes / shards * byte,
            experts=m.experts if m.moe_layers else 0,
            active_share=m.active_experts / m.experts if m.experts else 0.0,
            decode_pair_s=2 * m.layers * m.attention_width(decode=True) / p.tp * attention_flop,
            prefill_pair_s=2 * m.layers * m.attention_width(decode=False) / p.tp
            * attention_flop,
            kv_token_s=(m.kv_bytes_per_token() - m.index_key_bytes() * m.layers) / split * byte,
            topk=m.index_topk,
            index_pair_s=2 * m.layers * m.index_heads * m.index_head_dim
            / (hw.peak("fp8") * e.compute),
            index_token_s=m.index_key_bytes() * m.layers * byte,
            allreduce_s=2 * m.layers * tp_share * activations / link if p.tp > 1 else 0.0,
            allreduce_fixed_s=2 * m.layers * fixed if p.tp > 1 else 0.0,
            alltoall_s=m.moe_layers * alltoall_bytes / link if collectives else 0.0,
            alltoall_fixed_s=2 * m.moe_layers * fixed if collectives else 0.0,
        )


def tokens_per_s(timing: RooflineTiming, batch: int, context: int) -> float:
    """Decode throughput of one replica: ``batch`` requests at ``context`` tokens each."""
    ms = timing.step_ms(0, batch, batch * context, 0)
    return batch / ms * 1e3 if ms > 0 else math.inf
