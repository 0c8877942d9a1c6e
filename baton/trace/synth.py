"""Synthesize new Mooncake traces that keep a source trace's prefix structure.

Owns ``SynthConfig`` and ``synthesize``, a re-implementation of Dynamo's prefix data generator
(``datagen synthesize``); pure and seeded (``random.Random(seed)``), no I/O.

Algorithm:

1. Build a prefix tree from every request's ``hash_ids`` path. Each node counts the requests
   that pass through it (``visited``) and that end on it (``end``).
2. Nodes visited once are the requests' unique "user prompts": they are cut off and the length
   (in blocks) of each cut chain is recorded. What is left is the core tree of shared blocks.
3. Unary chains of the core tree (a node whose only child is visited as often) are contracted
   into radix nodes holding several ids.
4. At each core node the walk moves to a core child (weight = its visits), stops and appends a
   unique prompt (weight = number of cut children), or ends (weight = ``end``).
5. A request walks the core tree from the root, taking each radix node's ids; when it stops to
   append a prompt, it takes a sampled prompt length of fresh ids (counting up from the source's
   largest id + 1) and its input length is ``(blocks - 1) * block_size + r`` with ``r`` sampled
   from the source's last-block fill; otherwise its input length is ``blocks * block_size``.
   Output length is sampled from the source x ``osl_multiplier``.
6. Arrivals: at each timestamp a number of requests drawn from the source's
   requests-per-timestamp distribution arrive, then time advances by a sampled positive source
   inter-arrival delta divided by ``arrival_speedup`` (rounded, in ms). With
   ``arrival_shape`` other than ``source``, the arrivals are then re-timed so the rate follows
   a step, bursts or a diurnal curve at the same mean (``shape.py``).

Knobs: ``prefix_len_multiplier`` > 1 turns each core id ``x`` into ``ceil(m)`` ids
``x*ceil(m) .. x*ceil(m)+ceil(m)-1`` (shared prefixes get ``ceil(m)`` times longer); < 1 keeps the
first ``max(1, round(len * m))`` ids of each radix node. ``prompt_len_multiplier`` scales the
sampled unique-prompt lengths (rounded, at least 1 block). ``prefix_root_multiplier`` = k offsets
each request's ids by ``randint(0, k-1) * (largest id + 1)``, making k disjoint copies of the tree.

Differences from Dynamo, on purpose: the tree is keyed by path (an id reused under two parents
makes two nodes, where Dynamo rejects the trace); fresh ids are allocated only for kept
requests, so they stay consecutive; ``min_osl``/``max_osl`` clip and every output length is at
least 1. As in Dynamo, a request outside ``min_isl``/``max_isl`` is dropped and its arrival slot
stays empty, so the filter thins the arrivals rather than compressing them (the trace spans the
time an unfiltered trace of the same draws would). Like Dynamo's, output requests carry
``context_len`` (core-tree blocks x block_size, capped at the input length) and
``unique_user_prompt_len`` (the rest) beside the four Mooncake fields.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec

from baton.checks import require_value
from baton.settings import check_choices, setting
from baton.trace.mooncake import DEFAULT_TRACE_BLOCK_SIZE, TraceRequest
from baton.trace.shape import ArrivalShape, ShapeKind, reshape

_MAX_REJECTIONS = 10_000
_CACHE_END = -1  # transition: stop and append a unique prompt
_END = -2  # transition: the request ends here


@dataclass(frozen=True)
class SynthConfig:
    """What to synthesize (``baton trace synth``); the knobs are Dynamo's, see above."""

    num_requests: int
    """Not a setting (no default): the CLI's required ``--num-requests``."""
    prefix_len_multiplier: float = setting(1.0, "scale the shared prefixes' lengths")
    prefix_root_multiplier: int = setting(1, "k disjoint copies of the prefix tree")
    prompt_len_multiplier: float = setting(1.0, "scale the unique prompts' lengths")
    osl_multiplier: float = setting(1.0, "scale the output lengths")
    arrival_speedup: float = setting(1.0, "divide the inter-arrival times by this")
    min_isl: int | None = setting(None, "drop requests with fewer input tokens",
                                  default_help="no limit")
    max_isl: int | None = setting(None, "drop requests with more input tokens",
                                  default_help="no limit")
    min_osl: int | None = setting(None, "clip output lengths below", default_help="no limit")
    max_osl: int | None = setting(None, "clip output lengths above", default_help="no limit")
    trace_block_size: int = setting(DEFAULT_TRACE_BLOCK_SIZE, "tokens per hash id")
    seed: int = setting(0, "seeds every draw")
    arrival_shape: ShapeKind = setting(
        "source", "re-time the arrivals so the request rate follows a curve, at the same "
        "mean rate: source (as drawn), step, burst or diurnal (docs/traces.md)")
    shape_ratio: float = setting(4.0, "the shape's high rate over its low rate")
    shape_period_s: float = setting(3600.0, "diurnal: one cycle; burst: one burst every")
    shape_at_s: float = setting(0.0, "step: when the rate steps up; burst: the first burst")
    shape_duration_s: float = setting(60.0, "burst: how long each burst lasts")

    def __post_init__(self) -> None:
        require_value(self.num_requests >= 0, "num_requests", self.num_requests, "must be >= 0")
        for name in (
            "prefix_len_multiplier",
            "prompt_len_multiplier",
            "osl_multiplier",
            "arrival_speedup",
        ):
            require_value(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        root = self.prefix_root_multiplier
        require_value(
            isinstance(root, int) and root >= 1,
            "prefix_root_multiplier",
            root,
            "must be an int >= 1",
        )
        require_value(self.trace_block_size >= 1, "trace_block_size", self.trace_block_size,
                      "must be >= 1")
        _check_range("isl", self.min_isl, self.max_isl)
        _check_range("osl", self.min_osl, self.max_osl)
        check_choices(self)
        self.shape()  # checks the shape's numbers

    def shape(self) -> ArrivalShape:
        return ArrivalShape(self.arrival_shape, self.shape_ratio, self.shape_period_s,
                            self.shape_at_s, self.shape_duration_s)


def _check_range(what: str, low: int | None, high: int | None) -> None:
    if low is not None:
        require_value(low >= 0, f"min_{what}", low, "must be >= 0")
    if high is not None:
        require_value(high >= 1, f"max_{what}", high, "must be >= 1")
    if low is not None and high is not None:
        require_value(low <= high, f"min_{what}", low, f"must be <= max_{what} ({high})")


@dataclass(eq=False)
class _Node:
    ids: list[int]
    visited: int = 0
    end: int = 0
    children: dict[int, _Node] = field(default_factory=dict)
    to_leaf: int = 0  # children cut off as unique prompts
    targets: list[_Node | int] = field(default_factory=list)
    cum_weights: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Model:
    """What the source trace teaches: the core tree and the empirical distributions."""

    root: _Node
    max_id: int
    prompt_lengths: list[int]
    last_block_fill: list[int]
    output_lengths: list[int]
    per_timestamp: list[int]
    deltas: list[float]


def synthesize(requests: list[TraceRequest], **settings: Any) -> list[TraceRequest]:
    """``num_requests`` new requests shaped like ``requests`` (``settings`` are
    ``SynthConfig``'s); the same inputs give the same output."""
    return synthesize_with(requests, SynthConfig(**settings))


def synthesize_with(requests: list[TraceRequest], config: SynthConfig) -> list[TraceRequest]:
    """``synthesize`` driven by a ready ``SynthConfig``."""
    model = _learn(requests, config)
    return reshape(_Sampler(model, config).run(), config.shape())


# ------------------------------------------------------------------ learning the source


def _learn(requests: list[TraceRequest], config: SynthConfig) -> _Model:
    """Build the core radix tree and the empirical distributions from ``requests``."""
    if not requests:
        raise ValueError("requests: the source trace is empty")
    root = _build_tree(requests)
    prompt_lengths: list[int] = []
    _cut_unique_prompts(root, prompt_lengths)
    _contract_chains(root)
    _scale_prefixes(root, config.prefix_len_multiplier)
    _precompute_transitions(root)
    largest = max((h for r in requests for h in r.hash_ids), default=-1)
    stamps = [r.timestamp for r in requests]
    return _Model(
        root=root,
        max_id=_scaled_max_id(largest, config.prefix_len_multiplier),
        prompt_lengths=_scale_prompts(prompt_lengths, config.prompt_len_multiplier),
        last_block_fill=_last_block_fill(requests, config.trace_block_size),
        output_lengths=[r.output_length for r in requests],
        per_timestamp=list(Counter(stamps).values()),
        deltas=[b - a for a, b in itertools.pairwise(stamps) if b > a] or [0],
    )


def _build_tree(requests: list[TraceRequest]) -> _Node:
    root = _Node(ids=[])
    for r in requests:
        node = root
        node.visited += 1
        for h in r.hash_ids:
            node = node.children.setdefault(h, _Node(ids=[h]))
            node.visited += 1
        node.end += 1
    return root


def _cut_unique_prompts(root: _Node, lengths: list[int]) -> None:
    """Remove every subtree visited once, recording its depth (a single chain) in blocks."""
    stack = [root]
    while stack:
        node = stack.pop()
        for key, child in list(node.children.items()):
            if child.visited == 1:
                lengths.append(_chain_length(child))
                node.to_leaf += 1
                del node.children[key]
            else:
                stack.append(child)


def _chain_length(node: _Node) -> int:
    length = 1
    while node.children:
        (node,) = node.children.values()
        length += 1
    return length


def _contract_chains(root: _Node) -> None:
    """Merge a node's only child into it when every visit continues there (radix form)."""
    stack = list(root.children.values())
    while stack:
        node = stack.pop()
        while len(node.children) == 1 and node.end == 0 and node.to_leaf == 0:
            (child,) = node.children.values()
            node.ids.extend(child.ids)
            node.children, node.end, node.to_leaf = child.children, child.end, child.to_leaf
        stack.extend(node.children.values())


def _scale_prefixes(root: _Node, multiplier: float) -> None:
    if multiplier == 1:
        return
    factor = math.ceil(multiplier)
    for node in _walk(root):
        if multiplier > 1:
            node.ids = [x * factor + j for x in node.ids for j in range(factor)]
        elif node.ids:
            node.ids = node.ids[: max(1, round(len(node.ids) * multiplier))]


def _walk(root: _Node) -> list[_Node]:
    nodes, stack = [], list(root.children.values())
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children.values())
    return nodes


def _scaled_max_id(largest: int, multiplier: float) -> int:
    if multiplier > 1:
        factor = math.ceil(multiplier)
        return largest * factor + factor - 1
    return largest


def _precompute_transitions(root: _Node) -> None:
    for node in [root, *_walk(root)]:
        children = list(node.children.values())
        node.targets = [*children, _CACHE_END, _END]
        weights = [c.visited for c in children] + [node.to_leaf, node.end]
        node.cum_weights = list(itertools.accumulate(weights))


def _scale_prompts(lengths: list[int], multiplier: float) -> list[int]:
    if multiplier == 1:
        return lengths
    return [max(1, round(n * multiplier)) for n in lengths]


def _last_block_fill(requests: list[TraceRequest], block_size: int) -> list[int]:
    fills = []
    for i, r in enumerate(requests):
        if not r.hash_ids:
            continue
        fill = r.input_length - (len(r.hash_ids) - 1) * block_size
        if not 0 < fill <= block_size:
            raise ValueError(
                f"requests[{i}].input_length {r.input_length} does not fit "
                f"{len(r.hash_ids)} hash_ids of block_size {block_size}"
            )
        fills.append(fill)
    return fills or [block_size]


# ------------------------------------------------------------------ sampling


class _Sampler:
    """Walks the core tree and the arrival process; holds the only mutable state (rng, next id)."""

    def __init__(self, model: _Model, config: SynthConfig) -> None:
        self.model = model
        self.config = config
        self.rng = random.Random(config.seed)
        self.next_id = model.max_id + 1

    def run(self) -> list[TraceRequest]:
        out: list[TraceRequest] = []
        timestamp, misses = 0, 0
        while len(out) < self.config.num_requests:
            burst = self.rng.choice(self.model.per_timestamp)
            for _ in range(burst):
                if len(out) == self.config.num_requests:
                    break
                request = self._request(timestamp)
                if request is not None:
                    out.append(request)
                    misses = 0
                elif (misses := misses + 1) >= _MAX_REJECTIONS:
                    raise ValueError(
                        f"min_isl {self.config.min_isl} / max_isl {self.config.max_isl}: no "
                        f"acceptable request in {_MAX_REJECTIONS} draws"
                    )
            timestamp += round(self.rng.choice(self.model.deltas) / self.config.arrival_speedup)
        return self._spread_over_roots(out)

    def _request(self, timestamp: int) -> TraceRequest | None:
        """The request drawn for one arrival slot, or None when its ISL is filtered out."""
        core, prompt_blocks = self._walk()
        blocks = len(core) + prompt_blocks
        isl = self._input_length(blocks, prompt_blocks > 0)
        osl = self._output_length()  # drawn either way: filtering thins an unfiltered draw
        if not self._isl_allowed(isl):
            return None
        ids = core + list(range(self.next_id, self.next_id + prompt_blocks))
        self.next_id += prompt_blocks
        context = min(isl, len(core) * self.config.trace_block_size)
        return TraceRequest(timestamp=timestamp, input_length=isl, output_length=osl,
                            hash_ids=ids, context_len=context,
                            unique_user_prompt_len=isl - context)

    def _walk(self) -> tuple[list[int], int]:
        """Core ids along a sampled path, and the unique-prompt length (0 if none)."""
        node, core = self.model.root, list[int]()
        while True:
            (step,) = self.rng.choices(node.targets, cum_weights=node.cum_weights)
            if step == _END:
                return core, 0
            if step == _CACHE_END:
                return core, self.rng.choice(self.model.prompt_lengths)
            node = cast(_Node, step)  # the other targets are the two int markers
            core.extend(node.ids)

    def _input_length(self, blocks: int, has_prompt: bool) -> int:
        if not has_prompt:
            return blocks * self.config.trace_block_size
        return (blocks - 1) * self.config.trace_block_size + self.rng.choice(self.model.last_block_fill)

    def _isl_allowed(self, isl: int) -> bool:
        low, high = self.config.min_isl, self.config.max_isl
        return (low is None or isl >= low) and (high is None or isl <= high)

    def _output_length(self) -> int:
        osl = max(1, round(self.rng.choice(self.model.output_lengths) * self.config.osl_multiplier))
        if self.config.min_osl is not None:
            osl = max(osl, self.config.min_osl)
        if self.config.max_osl is not None:
            osl = min(osl, self.config.max_osl)
        return osl

    def _spread_over_roots(self, requests: list[TraceRequest]) -> list[TraceRequest]:
        copies = self.config.prefix_root_multiplier
        if copies == 1:
            return requests
        stride = self.next_id
        return [self._offset(r, self.rng.randrange(copies) * stride) for r in requests]

    @staticmethod
    def _offset(request: TraceRequest, offset: int) -> TraceRequest:
        return msgspec.structs.replace(request, hash_ids=[h + offset for h in request.hash_ids])
