"""KV index benchmark: Baton's ``KvIndex`` vs Dynamo's Rust ``RadixTree``, same events, same run.

What is measured (for each worker count, default 8 and 64, x ``--blocks-per-worker``)
    * insert: one deterministic stream of stored events (``--event-blocks`` blocks each) ->
      blocks/s, events/s and RSS growth. Baton is fed pre-built ``KvEvent`` objects (the index
      alone) and, separately, msgpack bytes decoded with msgspec then applied (the realistic
      path). Dynamo is fed pre-encoded JSON bytes, its only input format.
    * find_matches p50/p99 for 1k..100k-token queries (block size 16), hits (a prefix of a
      cached document) and misses (first block unknown). Dynamo's input is local hashes,
      Baton's is sequence hashes; both are computed before timing.
    * hash + find_matches from token ids (the like-for-like end to end): Baton
      ``compute_local_hashes`` + ``compute_sequence_hashes`` + ``find_matches``; Dynamo
      ``compute_block_hash_for_seq`` + ``find_matches``.
    * remove: evicting the leaf-most blocks of some cached prefixes (~10 % of the blocks).
    * The first queries' scores are compared between the two (they must agree).

Workload (after Dynamo's anchor harness ``indexer_bench.py``): ``--docs`` documents of
``--doc-blocks`` blocks sharing a ``--shared-prefix-blocks`` prefix; each worker caches
prefixes of random length of distinct documents until it holds ``--blocks-per-worker``.
Block hashes in events are the sequence hashes (as Baton engines and Dynamo's harness send).

The Dynamo side runs in a subprocess (``_dynamo_indexer.py``) under ``--dynamo-python`` /
``BATON_DYNAMO_PYTHON`` (a python with ai-dynamo-runtime); without it, it is skipped with a note.

    .venv/bin/python benches/router.py --dynamo-python $DYNAMO_VENV/bin/python
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import os
import pickle
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from baton.kv.events import KvEvent, KvRemoved, KvStored
from baton.kv.hashing import compute_local_hashes, compute_sequence_hashes
from baton.router.indexer import KvIndex

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _procs import rss_mb  # noqa: E402

NUM_CHECKED = 20  # queries per (length, kind) whose scores are compared across the two


@dataclass
class Docs:
    tokens: list[list[int]]
    local: list[list[int]]
    seq: list[list[int]]


@dataclass
class Workload:
    """One worker count's event stream, removals and queries, for both sides."""

    worker_ids: list[int]
    segments: list[tuple[int, int, int, int]]  # (worker id, doc, first block, end block)
    removals: list[tuple[int, int, int, int]]
    queries: dict[str, list[tuple[int, int | None]]] = field(default_factory=dict)  # (doc, miss)
    num_blocks: int = 0


# ---------------------------------------------------------------- workload


def make_docs(args: argparse.Namespace, rng: random.Random) -> Docs:
    bs = args.block_size
    shared = rng.choices(range(1, 50_000), k=args.shared_prefix_blocks * bs)
    tail = (args.doc_blocks - args.shared_prefix_blocks) * bs
    tokens = [shared + rng.choices(range(1, 50_000), k=tail) for _ in range(args.docs)]
    local = [compute_local_hashes(t, bs) for t in tokens]
    return Docs(tokens, local, [compute_sequence_hashes(h) for h in local])


def make_workload(args: argparse.Namespace, rng: random.Random, num_workers: int) -> Workload:
    worker_ids = [rng.getrandbits(62) for _ in range(num_workers)]
    wl = Workload(worker_ids, [], [])
    for worker in worker_ids:
        held = cache_documents(args, rng, worker, wl)
        wl.removals += evict_tails(args, worker, held, wl.num_blocks)
    wl.queries = make_queries(args, rng, sorted({s[1] for s in wl.segments}))
    return wl


def cache_documents(
    args: argparse.Namespace, rng: random.Random, worker: int, wl: Workload
) -> list:
    """Prefixes of distinct random documents, random lengths, until the worker is full."""
    held, total = [], 0
    free_docs = list(range(args.docs))
    rng.shuffle(free_docs)
    while total < args.blocks_per_worker and free_docs:
        doc = free_docs.pop()
        length = rng.randrange(args.shared_prefix_blocks, args.doc_blocks + 1)
        length = min(length, args.blocks_per_worker - total)
        for start in range(0, length, args.event_blocks):
            wl.segments.append((worker, doc, start, min(start + args.event_blocks, length)))
        held.append((doc, length))
        total += length
    wl.num_blocks += total
    return held


def evict_tails(args: argparse.Namespace, worker: int, held: list, _total: int) -> list:
    """Leaf-most ``--event-blocks`` blocks of cached prefixes, ~``--remove-fraction`` of them."""
    out, removed = [], 0
    target = int(args.blocks_per_worker * args.remove_fraction)
    for doc, length in held:
        k = min(length - args.shared_prefix_blocks, args.event_blocks)
        if removed >= target:
            break
        if k > 0:
            out.append((worker, doc, length - k, length))
            removed += k
    return out


def make_queries(args: argparse.Namespace, rng: random.Random, docs: list[int]) -> dict:
    queries = {}
    for num_tokens in args.query_tokens:
        for kind in ("hit", "miss"):
            queries[f"{num_tokens}/{kind}"] = [
                (rng.choice(docs), rng.getrandbits(64) if kind == "miss" else None)
                for _ in range(args.queries)
            ]
    return queries


def query_hashes(docs: Docs, doc: int, miss: int | None, num_blocks: int) -> tuple[list, list]:
    """(Dynamo's local hashes, Baton's sequence hashes) of one query."""
    local = docs.local[doc][:num_blocks]
    if miss is None:
        return local, docs.seq[doc][:num_blocks]
    local = [miss, *local[1:]]
    return local, compute_sequence_hashes(local)


# ---------------------------------------------------------------- encodings


def baton_events(wl: Workload, docs: Docs) -> list[KvEvent]:
    events, next_id = [], dict.fromkeys(wl.worker_ids, 0)
    for worker, doc, start, end in wl.segments:
        seq, local = docs.seq[doc], docs.local[doc]
        parent = seq[start - 1] if start else None
        stored = KvStored(parent, seq[start:end], local[start:end])
        events.append(KvEvent(next_id[worker], stored, worker))
        next_id[worker] += 1
    return events


def baton_removals(wl: Workload, docs: Docs) -> list[KvEvent]:
    return [KvEvent(0, KvRemoved(docs.seq[d][a:b]), w) for w, d, a, b in wl.removals]


def dynamo_json(events: list[KvEvent]) -> list[tuple[int, bytes]]:
    """The same events in Dynamo's ``KvCacheEvent`` JSON."""
    out = []
    encode = msgspec.json.encode
    for e in events:
        if isinstance(e.data, KvStored):
            blocks = [
                {"block_hash": b, "tokens_hash": t}
                for b, t in zip(e.data.block_hashes, e.data.tokens_hashes, strict=True)
            ]
            data: dict = {"stored": {"parent_hash": e.data.parent_hash, "blocks": blocks}}
        else:
            data = {"removed": {"block_hashes": e.data.block_hashes}}
        out.append((e.worker_id, encode({"event_id": e.event_id, "data": data})))
    return out


# ---------------------------------------------------------------- Baton side


def baton_insert(events: list, decode=None) -> tuple[KvIndex, float]:  # noqa: ANN001
    index = KvIndex()
    apply = index.apply_event
    start = time.perf_counter()
    if decode is None:
        for event in events:
            apply(event)
    else:
        for payload in events:
            apply(decode(payload))
    return index, time.perf_counter() - start


def measure_baton(args: argparse.Namespace, wl: Workload, docs: Docs, events: list) -> dict:
    out: dict = {"insert_s": [], "insert_msgpack_s": []}
    packed = [msgspec.msgpack.encode(e) for e in events]
    decode = msgspec.msgpack.Decoder(KvEvent).decode
    index = None
    gc.collect()
    gc.freeze()  # the pre-built stream is the harness's, not the index's: keep it out of GC scans
    for _ in range(args.insert_repeats):
        index = None
        gc.collect()
        rss0 = rss_mb()
        index, seconds = baton_insert(events)
        out["insert_s"].append(seconds)
        out.setdefault("rss_mb", rss_mb() - rss0)
        out["insert_msgpack_s"].append(baton_insert(packed, decode)[1])
    del packed
    gc.unfreeze()
    assert index is not None and index.counters.events_skipped == 0
    out["num_unique_blocks"] = index.num_blocks
    out["index_mb"] = index_bytes(index) / 2**20
    out.update(baton_queries(args, wl, docs, index))
    removals = baton_removals(wl, docs)
    start = time.perf_counter()
    index.apply_events(removals)
    out["remove_s"] = time.perf_counter() - start
    index.check_invariants() if args.check else None
    return out


def index_bytes(index: KvIndex) -> int:
    """Deep size of the index's containers and the ints they hold (each object counted once).

    Reads private fields: a bench-only measurement, since in-process RSS deltas are blurred by
    memory the harness freed before (pymalloc reuses it).
    """
    seen: set[int] = set()
    total = 0
    maps: list = [index._workers_of, index._link_of, index._children]
    for worker in index._workers.values():
        maps += [worker.ext_to_seq, worker.seq_to_ext]
    for m in maps:
        total += sys.getsizeof(m)
        for obj in itertools.chain(m.keys(), m.values()):
            items = obj if isinstance(obj, list) else (obj,)
            total += sys.getsizeof(obj) if isinstance(obj, list) else 0
            for x in items:
                if id(x) not in seen:
                    seen.add(id(x))
                    total += sys.getsizeof(x)
    return total


def baton_queries(args: argparse.Namespace, wl: Workload, docs: Docs, index: KvIndex) -> dict:
    out: dict = {"find_matches": {}, "check_scores": {}, "end_to_end": {}}
    find = index.find_matches
    for key, specs in wl.queries.items():
        num_blocks = int(key.split("/")[0]) // args.block_size
        inputs = [query_hashes(docs, d, m, num_blocks)[1] for d, m in specs]
        samples, scores = [], []
        for q in inputs:
            start = time.perf_counter()
            s = find(q).scores
            samples.append(time.perf_counter() - start)
            scores.append(s)
        out["find_matches"][key] = samples
        out["check_scores"][key] = scores[:NUM_CHECKED]
    for key, specs in e2e_queries(args, wl).items():
        out["end_to_end"][key] = baton_end_to_end(index, docs, specs, args.block_size)
    return out


def baton_end_to_end(index: KvIndex, docs: Docs, specs: list, bs: int) -> list[float]:
    samples = []
    for doc, num_tokens in specs:
        tokens = docs.tokens[doc][:num_tokens]
        start = time.perf_counter()
        _ = index.find_matches(compute_sequence_hashes(compute_local_hashes(tokens, bs))).scores
        samples.append(time.perf_counter() - start)
    return samples


def e2e_queries(args: argparse.Namespace, wl: Workload) -> dict[str, list[tuple[int, int]]]:
    return {
        str(n): [(d, n) for d, _ in wl.queries[f"{n}/hit"][: args.e2e_queries]]
        for n in args.query_tokens
    }


# ---------------------------------------------------------------- Dynamo side


def dynamo_available(python: str | None) -> str | None:
    if not python:
        print("note: no --dynamo-python / BATON_DYNAMO_PYTHON given: Dynamo side skipped")
        return None
    code = "import importlib.metadata as m, dynamo.llm; print(m.version('ai-dynamo-runtime'))"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    if proc.returncode:
        print(f"note: dynamo.llm not importable by {python}; Dynamo side skipped")
        return None
    return proc.stdout.strip()


def measure_dynamo(args: argparse.Namespace, wl: Workload, docs: Docs, events: list) -> dict:
    removals = dynamo_json(baton_removals(wl, docs))
    queries = {}
    for key, specs in wl.queries.items():
        num_blocks = int(key.split("/")[0]) // args.block_size
        queries[key] = [query_hashes(docs, d, m, num_blocks)[0] for d, m in specs]
    payload = {
        "events": dynamo_json(events),
        "removals": removals,
        "queries": queries,
        "e2e": e2e_queries(args, wl),
        "docs": docs.tokens,
        "block_size": args.block_size,
        "barrier": docs.local[0][:1],
        "insert_repeats": args.insert_repeats,
        "num_checked": NUM_CHECKED,
    }
    with tempfile.TemporaryDirectory(prefix="baton-router-bench-") as tmp:
        work, out = Path(tmp) / "workload.pickle", Path(tmp) / "out.json"
        with open(work, "wb") as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
        del payload
        script = str(HERE / "_dynamo_indexer.py")
        subprocess.run([args.dynamo_python, script, str(work), str(out)], check=True, timeout=1200)
        return json.loads(out.read_text())


# ---------------------------------------------------------------- report


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.1f} µs" if us < 1000 else f"{us / 1000:,.2f} ms"


def ratio(baton: float | None, dynamo: float | None, higher_is_better: bool) -> str:
    """How many times better Baton is (>1 = Baton better)."""
    if not baton or not dynamo:
        return "-"
    return f"{baton / dynamo if higher_is_better else dynamo / baton:.2f}x"


def report(
    args: argparse.Namespace, wl: Workload, events: list, b: dict, d: dict | None
) -> list[str]:
    rows = ["| metric | Baton | Dynamo 1.6.1 | Baton advantage |", "| --- | --- | --- | --- |"]

    def row(name: str, bv: float, dv: float | None, fmt, higher: bool) -> None:  # noqa: ANN001
        rows.append(
            f"| {name} | {fmt(bv)} | {fmt(dv) if dv is not None else '-'} | {ratio(bv, dv, higher)} |"
        )

    rate = lambda v: f"{v / 1e6:.2f} M/s" if v >= 1e6 else f"{v / 1e3:,.1f} k/s"  # noqa: E731
    n_ev, n_bl = len(events), wl.num_blocks
    for label, key in (
        ("insert, pre-built KvEvent", "insert_s"),
        ("insert, msgpack decode + apply", "insert_msgpack_s"),
    ):
        bt = median(b[key])
        dt_ = median(d["insert_s"]) if d else None
        row(f"{label}: blocks/s", n_bl / bt, n_bl / dt_ if dt_ else None, rate, True)
        row(f"{label}: events/s", n_ev / bt, n_ev / dt_ if dt_ else None, rate, True)
    row(
        "RSS growth (first insert)",
        b["rss_mb"],
        d["rss_mb"] if d else None,
        lambda v: f"{v:,.0f} MB",
        False,
    )
    rows.append(f"| Baton index deep size (getsizeof) | {b['index_mb']:,.0f} MB | - | - |")
    n_rm = sum(e - s for _, _, s, e in wl.removals)
    row("remove: blocks/s", n_rm / b["remove_s"], n_rm / d["remove_s"] if d else None, rate, True)
    for key in b["find_matches"]:
        for q in (50, 99):
            bv = pct(b["find_matches"][key], q)
            dv = pct(d["find_matches"][key], q) if d else None
            row(f"find_matches {key} p{q}", bv, dv, fmt_us, False)
    for key in b["end_to_end"]:
        for q in (50, 99):
            bv = pct(b["end_to_end"][key], q)
            dv = pct(d["end_to_end"][key], q) if d else None
            row(f"hash + find_matches {key} tok p{q}", bv, dv, fmt_us, False)
    if d:
        rows += [""] + [
            f"Dynamo empty-tree find_matches {k} p50 (binding cost only): {fmt_us(pct(v, 50))}"
            for k, v in d["empty_tree"].items()
        ]
    return rows


def scores_agree(b: dict, d: dict) -> bool:
    for key, mine in b["check_scores"].items():
        theirs = [{int(w): n for w, n in s.items()} for s in d["check_scores"][key]]
        if mine != theirs:
            print(f"MISMATCH {key}: baton {mine[:3]} dynamo {theirs[:3]}")
            return False
    return True


# ---------------------------------------------------------------- main


def run_one(
    args: argparse.Namespace, docs: Docs, num_workers: int, dynamo_version: str | None
) -> dict:
    rng = random.Random(args.seed + num_workers)
    wl = make_workload(args, rng, num_workers)
    events = baton_events(wl, docs)
    print(
        f"\n## {num_workers} workers: {len(events):,} stored events, {wl.num_blocks:,} blocks",
        flush=True,
    )
    b = measure_baton(args, wl, docs, events)  # first, so its RSS growth is fresh memory
    gc.collect()
    d = measure_dynamo(args, wl, docs, events) if dynamo_version else None
    print(f"unique blocks in the index: {b['num_unique_blocks']:,}")
    if d:
        print("scores agree with Dynamo:", scores_agree(b, d))
    print("\n".join(report(args, wl, events, b, d)), flush=True)
    return {
        "workers": num_workers,
        "events": len(events),
        "blocks": wl.num_blocks,
        "baton": b,
        "dynamo": d,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workers", default="8,64", help="comma-separated worker counts")
    p.add_argument("--blocks-per-worker", type=int, default=100_000)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--doc-blocks", type=int, default=6400, help="6400 x 16 = 102,400 tokens")
    p.add_argument("--shared-prefix-blocks", type=int, default=64)
    p.add_argument("--event-blocks", type=int, default=32)
    p.add_argument("--query-tokens", default="1024,4096,16384,65536,102400")
    p.add_argument("--queries", type=int, default=200, help="per (length, hit/miss)")
    p.add_argument("--e2e-queries", type=int, default=100, help="per length")
    p.add_argument("--insert-repeats", type=int, default=3)
    p.add_argument("--remove-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="run check_invariants at the end (slow)")
    p.add_argument(
        "--dynamo-python",
        default=os.environ.get("BATON_DYNAMO_PYTHON"),
        help="python with ai-dynamo-runtime (env BATON_DYNAMO_PYTHON)",
    )
    p.add_argument("--out", default="bench-results/router.json")
    args = p.parse_args()
    args.query_tokens = [int(x) for x in args.query_tokens.split(",")]
    return args


def main() -> None:
    args = parse_args()
    version = dynamo_available(args.dynamo_python)
    print(
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.platform()}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, ai-dynamo-runtime {version}"
    )
    docs = make_docs(args, random.Random(args.seed))
    results = [run_one(args, docs, int(n), version) for n in args.workers.split(",")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items()} for r in results]
    Path(args.out).write_text(json.dumps({"args": vars(args), "dynamo": version, "runs": slim}))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
