"""``baton.bench``: statistics from hand-built records, then a trace replayed against a live
server with its outputs written and read back."""

from __future__ import annotations

import csv
import io
import math
import random
import statistics
from collections.abc import Callable

import msgspec
import pytest

from baton.bench import (
    BenchConfig,
    Goodput,
    ProgressBar,
    RequestRecord,
    format_table,
    parse_goodput,
    percentile,
    replay,
    run_bench,
    summarize,
)
from baton.bench.metrics import pstdev
from baton.preprocess import ModelCard, Tokenizer, resolve_model
from baton.trace import PromptBuilder, TraceRequest, save_trace

approx = pytest.approx


def hand_records() -> list[RequestRecord]:
    return [
        # TTFT 100, gaps 20/40, E2E 160, TPOT (160-100)/2 = 30, 50 of 100 prompt tokens cached
        RequestRecord(index=0, scheduled_at_s=0.0, sent_at_s=0.0, first_token_at_s=0.1,
                      itl_s=[0.02, 0.04], end_at_s=0.16, prompt_tokens=100,
                      completion_tokens=3, cached_tokens=50, ok=True),
        # TTFT 300, gap 50, E2E 350, TPOT 50, nothing cached
        RequestRecord(index=1, scheduled_at_s=0.5, sent_at_s=0.5, first_token_at_s=0.8,
                      itl_s=[0.05], end_at_s=0.85, prompt_tokens=200,
                      completion_tokens=2, cached_tokens=0, ok=True),
        RequestRecord(index=2, scheduled_at_s=1.0, sent_at_s=1.0, end_at_s=1.0,
                      ok=False, error="HTTP 500: boom\ntraceback"),
        # one token: TTFT = E2E = 200, no TPOT, cache not reported
        RequestRecord(index=3, scheduled_at_s=1.0, sent_at_s=1.0, first_token_at_s=1.2,
                      end_at_s=1.2, prompt_tokens=60, completion_tokens=1, ok=True),
    ]


def test_percentiles_interpolate_linearly() -> None:
    assert percentile([100.0, 300.0, 200.0], 50) == 200.0
    assert percentile([100.0, 300.0, 200.0], 90) == approx(280.0)
    assert percentile([100.0, 300.0, 200.0], 99) == approx(298.0)
    assert percentile([7.0], 99) == 7.0


def _random_samples(rng: random.Random, kind: int) -> list[float]:
    n = rng.randint(1, 50)
    draws = {
        0: lambda: rng.random(),
        1: lambda: rng.uniform(-1e6, 1e6),
        2: lambda: rng.choice([1.5, 2.25, 3.0, 1e-3]),  # few distinct values, as in a sim
        3: lambda: math.ldexp(rng.random(), rng.randint(-200, 200)),
        4: lambda: 1.0 + rng.randint(0, 3) * 2**-52,  # differences in the last bit
        5: lambda: float(rng.randint(0, 10**6)),
        6: lambda: rng.choice([1e300, -1e300, 1e-300, 0.0]),
    }
    return [draws[kind]() for _ in range(n)]


def test_pstdev_is_exactly_statistics_pstdev() -> None:
    rng = random.Random(7)
    for i in range(1400):
        values = _random_samples(rng, i % 7)
        assert pstdev(values) == statistics.pstdev(values), values
    assert pstdev([3, 1, 2]) == statistics.pstdev([3, 1, 2])
    for odd in ([], [1.0, math.inf], [math.nan]):  # left to statistics, errors included
        assert _outcome(pstdev, odd) == _outcome(statistics.pstdev, odd)


def _outcome(f: Callable[[list[float]], float], values: list[float]) -> object:
    try:
        return repr(f(values))
    except Exception as exc:  # noqa: BLE001 - comparing which error
        return type(exc)


def test_summarize_hand_built_records() -> None:
    s = summarize(hand_records(), duration_s=2.0, goodput=Goodput(ttft_ms=250, itl_ms=35))
    assert (s.num_requests, s.num_errors) == (4, 1)
    assert s.errors == {"HTTP 500: boom": 1}
    assert s.ttft_ms is not None
    assert (s.ttft_ms.avg, s.ttft_ms.min, s.ttft_ms.max) == approx((200.0, 100.0, 300.0))
    assert (s.ttft_ms.p50, s.ttft_ms.p90, s.ttft_ms.p99) == approx((200.0, 280.0, 298.0))
    assert s.ttft_ms.std == approx(math.sqrt(20000 / 3))
    assert s.ttst_ms is not None and (s.ttst_ms.min, s.ttst_ms.max) == approx((20.0, 50.0))
    assert s.itl_ms is not None
    assert (s.itl_ms.avg, s.itl_ms.p50, s.itl_ms.p90) == approx((110 / 3, 40.0, 48.0))
    assert s.tpot_ms is not None
    assert (s.tpot_ms.avg, s.tpot_ms.p90, s.tpot_ms.std) == approx((40.0, 48.0, 10.0))
    assert s.e2e_ms is not None
    assert (s.e2e_ms.min, s.e2e_ms.p50, s.e2e_ms.max) == approx((160.0, 200.0, 350.0))
    assert s.output_tps_per_user is not None
    assert (s.output_tps_per_user.min, s.output_tps_per_user.max) == approx((20.0, 1000 / 30))
    assert s.osl is not None and s.osl.avg == approx(2.0)
    assert s.isl is not None and s.isl.avg == approx(120.0)
    assert s.request_throughput == approx(1.5)  # 3 ok / 2 s
    assert s.output_token_throughput == approx(3.0)  # 6 tokens / 2 s
    assert s.total_token_throughput == approx(183.0)  # (6 + 360) / 2 s
    # request 0 meets both bounds, 1 misses TTFT, 3 has no gaps and meets ITL trivially
    assert s.goodput == approx(1.0)
    assert s.cache_hit_rate == approx(50 / 300)  # only requests 0 and 1 reported


def test_summary_without_goodput_or_cache_reports() -> None:
    records = [r for r in hand_records() if r.index == 3]
    s = summarize(records, duration_s=1.0)
    assert s.goodput is None and s.cache_hit_rate is None
    assert s.tpot_ms is None and s.itl_ms is None
    assert s.ttft_ms is not None and s.ttft_ms.std == 0.0
    table = format_table(s)
    assert "Time to First Token (ms)" in table and "n/a (not reported)" in table


def test_parse_goodput() -> None:
    assert parse_goodput("ttft_ms=2000, itl_ms=50") == Goodput(ttft_ms=2000, itl_ms=50)
    assert parse_goodput("e2e_ms=1e4").e2e_ms == 10000.0
    for bad in ("", "ttft=5", "ttft_ms", "itl_ms=fast"):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_progress_bar_redraws_one_line() -> None:
    out = io.StringIO()
    bar = ProgressBar(2, stream=out, width=4)
    records = hand_records()
    bar(records[0])
    bar(records[2])
    bar.close()
    assert out.getvalue().count("\r") == 2
    assert "[####] 2/2 done, 1 errors" in out.getvalue()


# ---- live server ----------------------------------------------------------------------------

BLOCK = 16
TRACE = [  # (timestamp ms, input_length, output_length, hash_ids); r2 r4 r5 r7 repeat prefixes
    (0, 64, 8, [1, 2, 3, 4]),
    (5, 40, 5, [10, 11, 12]),
    (50, 80, 12, [1, 2, 3, 4, 5]),
    (60, 100, 20, [20, 21, 22, 23, 24, 25, 26]),
    (80, 48, 3, [10, 11, 12]),
    (100, 200, 10, [1, 2, 3, 4, 5, 6, 7, 8, 9, 30, 31, 32, 33]),
    (110, 40, 1, [40, 41, 42]),
    (120, 64, 6, [20, 21, 22, 23]),
]
REPEATS = {2, 4, 5, 7}


def trace_requests() -> list[TraceRequest]:
    return [TraceRequest(timestamp=ts, input_length=isl, output_length=osl, hash_ids=ids)
            for ts, isl, osl, ids in TRACE]


def test_run_bench_replays_a_trace_and_writes_outputs(make_server, tmp_path, capsys) -> None:
    srv = make_server(workers=2, router="kv")
    save_trace(tmp_path / "trace.jsonl", trace_requests())
    config = BenchConfig(trace_block_size=BLOCK, max_concurrency=4, timeout_s=30)
    summary = _run(run_bench(
        srv.base_url, "baton-tiny", tmp_path / "trace.jsonl", config,
        goodput=parse_goodput("ttft_ms=60000"), out_dir=tmp_path / "out",
    ))
    assert "Time to First Token (ms)" in capsys.readouterr().out
    assert summary.num_errors == 0 and summary.num_requests == len(TRACE)
    assert summary.goodput == approx(summary.request_throughput)
    assert summary.cache_hit_rate is not None and summary.cache_hit_rate > 0

    body = msgspec.json.decode((tmp_path / "out" / "summary.json").read_bytes())
    records = msgspec.convert(body["records"], list[RequestRecord])
    assert body["summary"]["num_requests"] == len(TRACE)
    for record, (_, isl, osl, _) in zip(records, TRACE, strict=True):
        assert record.ok, record.error
        assert (record.prompt_tokens, record.completion_tokens) == (isl, osl)
        assert record.sent_at_s >= record.scheduled_at_s
        assert record.ttft_s is not None and 0 < record.ttft_s <= record.e2e_s
        assert record.cached_tokens is not None
        assert (record.cached_tokens > 0) == (record.index in REPEATS), record
    rows = list(csv.DictReader(open(tmp_path / "out" / "records.csv")))
    assert [int(r["index"]) for r in rows] == list(range(len(TRACE)))
    for row, record in zip(rows, records, strict=True):
        assert int(row["num_chunks"]) == len(record.itl_s) + 1
        assert int(row["completion_tokens"]) == record.completion_tokens


def test_replay_counts_chunks_serves_chat_and_records_http_errors(make_server) -> None:
    srv = make_server(workers=1)
    prompts = PromptBuilder(Tokenizer(ModelCard.load(resolve_model("baton-tiny"))), BLOCK)
    requests = trace_requests()[:3]
    config = BenchConfig(arrival_speedup=10.0, max_requests=2, max_concurrency=1)
    records = _run(replay(srv.base_url, "baton-tiny", requests, prompts=prompts, config=config))
    assert [r.index for r in records] == [0, 1]
    for record, request in zip(records, requests[:2], strict=True):
        assert record.ok and record.completion_tokens == request.output_length
        # the mock engine streams one token per content chunk
        assert len(record.itl_s) == record.completion_tokens - 1
    assert records[1].sent_at_s >= records[0].end_at_s  # max_concurrency=1 serializes

    chat = _run(replay(srv.base_url, "baton-tiny", requests[:1], prompts=prompts,
                       config=BenchConfig(chat=True)))
    assert chat[0].ok and chat[0].completion_tokens == requests[0].output_length
    assert chat[0].prompt_tokens >= requests[0].input_length  # plus the chat template

    short = TraceRequest(timestamp=0, input_length=100, output_length=4, hash_ids=[1])  # 100 tokens need 7 blocks of 16
    failed = _run(replay(srv.base_url, "no-such-model", [requests[0], short], prompts=prompts))
    assert not any(r.ok for r in failed)
    assert failed[0].error is not None and failed[0].error.startswith("HTTP 4"), failed[0].error
    assert failed[1].error is not None and failed[1].error.startswith("trace: hash_ids")


def _run(coro):
    import asyncio

    return asyncio.run(coro)


def test_bench_compare_prints_runs_side_by_side_and_plots_them(tmp_path):
    import subprocess
    import sys

    from baton.bench.metrics import RequestRecord, summarize
    from baton.bench.report import write_json

    for name, ttft in (("fast", 0.01), ("slow", 0.05)):
        records = [RequestRecord(index=i, scheduled_at_s=0.0, sent_at_s=0.0,
                                 first_token_at_s=ttft, itl_s=[0.002, 0.003], end_at_s=ttft + 0.005,
                                 prompt_tokens=100, completion_tokens=3, cached_tokens=50,
                                 ok=True, error=None) for i in range(4)]
        (tmp_path / name).mkdir()
        write_json(tmp_path / name / "summary.json", summarize(records, 1.0, None), records)
    png = tmp_path / "cmp.png"
    out = subprocess.run([sys.executable, "-m", "baton", "bench", "compare", str(tmp_path / "fast"),
                          str(tmp_path / "slow"), "--plot", str(png)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    ttft_row = next(line for line in out.splitlines() if line.strip().startswith("TTFT avg"))
    assert [cell.strip() for cell in ttft_row.split("|")[1:]] == ["10.00", "50.00"]
    assert "prompt cache hit rate (%)" in out and "50.00" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
