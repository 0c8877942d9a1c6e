"""Dynamo side of ``benches/router.py``: runs under a python with ai-dynamo-runtime installed.

Reads the workload pickle written by ``router.py`` (pre-encoded JSON events, removal events,
queries as local hashes, query token lists), measures Dynamo's Rust ``RadixTree`` through its
Python binding exactly as ``router.py`` measures Baton's ``KvIndex``, and writes JSON results.

    python _dynamo_indexer.py WORKLOAD.pickle OUT.json
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import sys
import time

os.environ.setdefault("DYN_LOG", "error")  # no per-event WARN lines from the Rust side

from _procs import rss_mb  # noqa: E402  (benches/ is this script's directory)
from dynamo.llm import RadixTree, compute_block_hash_for_seq  # noqa: E402


def insert(events: list, barrier: list[int]) -> tuple[RadixTree, float]:
    tree = RadixTree()
    apply = tree.apply_event
    start = time.perf_counter()
    for worker, payload in events:
        apply(worker, payload)
    tree.find_matches(barrier)  # ops are serialized on the tree's own thread
    return tree, time.perf_counter() - start


def timed_queries(tree: RadixTree, queries: list[list[int]]) -> tuple[list[float], list[dict]]:
    samples, scores = [], []
    find = tree.find_matches
    for q in queries:
        start = time.perf_counter()
        s = find(q, early_exit=False).scores
        samples.append(time.perf_counter() - start)
        scores.append({w: n for (w, _dp), n in s.items()})
    return samples, scores


def timed_end_to_end(tree: RadixTree, docs: list[list[int]], queries: list, bs: int) -> list[float]:
    samples = []
    for doc, num_tokens in queries:
        tokens = docs[doc][:num_tokens]
        start = time.perf_counter()
        _ = tree.find_matches(compute_block_hash_for_seq(tokens, bs), early_exit=False).scores
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    with open(sys.argv[1], "rb") as f:
        w = pickle.load(f)
    barrier = w["barrier"]
    out: dict = {"insert_s": [], "rss_mb": None}
    tree = None
    for rep in range(w["insert_repeats"]):
        tree = None
        gc.collect()
        if rep:
            time.sleep(1.0)  # the previous tree is dropped on its own thread
        rss0 = rss_mb()
        tree, seconds = insert(w["events"], barrier)
        out["insert_s"].append(seconds)
        if out["rss_mb"] is None:
            out["rss_mb"] = rss_mb() - rss0
    assert tree is not None
    out["find_matches"], out["check_scores"] = {}, {}
    for key, queries in w["queries"].items():
        samples, scores = timed_queries(tree, queries)
        out["find_matches"][key] = samples
        out["check_scores"][key] = scores[: w["num_checked"]]
    empty = RadixTree()
    out["empty_tree"] = {
        k: timed_queries(empty, q)[0] for k, q in w["queries"].items() if "/hit" in k
    }
    out["end_to_end"] = {
        k: timed_end_to_end(tree, w["docs"], q, w["block_size"]) for k, q in w["e2e"].items()
    }
    start = time.perf_counter()
    for worker, payload in w["removals"]:
        tree.apply_event(worker, payload)
    tree.find_matches(barrier)
    out["remove_s"] = time.perf_counter() - start
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
