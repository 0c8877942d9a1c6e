"""Disaggregated serving end to end on the simulated engine: prefill pool, decode pool, the
KV handoff between them, conditional disaggregation and falling back to local prefill."""

from __future__ import annotations

import msgspec
import openai
import pytest

from tests.test_kv_routing import client_for


def chat(client: openai.OpenAI, text: str, **kwargs: object):
    return client.chat.completions.create(
        model="baton-tiny", messages=[{"role": "user", "content": text}], **kwargs  # type: ignore[arg-type]
    )


def ext(resp) -> dict:
    return resp.model_extra["baton"]


def pools_idle(srv) -> bool:
    """Every worker's blocks are free: nothing running, nothing held for a transfer."""
    return all(
        w.engine.scheduler.pool.num_used_blocks == 0 and not w.engine.scheduler.held
        for w in srv.workers
    )


def metric(srv, name: str) -> float:
    text = srv.call(lambda: srv.frontend.metrics.render()).decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_request_is_prefilled_on_the_prefill_worker_and_decoded_on_the_decode_worker(
    make_server,
) -> None:
    srv = make_server(disagg=(1, 1), block_size=4)
    client = client_for(srv)
    resp = chat(client, "relay race " * 20, max_tokens=12, seed=3)
    assert resp.usage.completion_tokens == 12
    assert ext(resp) == {"worker_id": 1, "prefill_worker_id": 0, "decode_worker_id": 1}
    assert metric(srv, "baton_frontend_prefill_remote_total") == 1
    assert srv.wait_until(lambda: pools_idle(srv))
    decode = srv.workers[1].engine.scheduler.pool
    assert decode.num_cached_blocks > 0  # the handed-over prompt is in the decode cache now
    for w in srv.workers:
        srv.call(w.engine.scheduler.check_invariants)


def test_disaggregated_and_aggregated_serving_give_the_same_text(make_server) -> None:
    agg = client_for(make_server(workers=1, block_size=4))
    disagg = client_for(make_server(disagg=(2, 2), block_size=4))
    for i in range(8):
        prompt = f"prompt {i} " * (i * 7 + 1)
        a = chat(agg, prompt, max_tokens=10, seed=i)
        d = chat(disagg, prompt, max_tokens=10, seed=i)
        assert a.choices[0].message.content == d.choices[0].message.content
        assert ext(d)["prefill_worker_id"] in (0, 1) and ext(d)["decode_worker_id"] in (2, 3)


def test_streaming_through_the_disaggregated_path(make_server) -> None:
    srv = make_server(disagg=(1, 2), block_size=4)
    stream = chat(client_for(srv), "stream me " * 30, max_tokens=20, stream=True,
                  stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 20
    assert {c.model_extra["baton"]["prefill_worker_id"] for c in chunks} >= {0}
    assert srv.wait_until(lambda: pools_idle(srv))


def test_conditional_disaggregation_prefills_mostly_cached_prompts_locally(make_server) -> None:
    srv = make_server(disagg=(1, 1), block_size=4, router="kv",
                      disagg_options={"policy": "isl", "max_local_prefill_tokens": 64})
    client = client_for(srv)
    shared = "a long shared system prompt " * 20
    first = chat(client, shared + "question one", max_tokens=4)
    assert ext(first)["prefill_worker_id"] == 0  # nothing cached: remote
    # The decode worker now caches the shared prefix, so only the new tail is uncached.
    assert srv.wait_until(lambda: pools_idle(srv))
    second = chat(client, shared + "question two", max_tokens=4)
    assert ext(second)["prefill_worker_id"] is None and ext(second)["decode_worker_id"] == 1
    assert second.usage.prompt_tokens_details.cached_tokens > 100
    assert metric(srv, 'baton_frontend_prefill_local_total{model="baton-tiny",reason="short_prompt"}') == 1


def test_a_busy_prefill_pool_sends_requests_to_local_prefill(make_server) -> None:
    # Loads arrive once a second here, so a load set by the test stays for the next request.
    srv = make_server(disagg=(1, 1), block_size=4, worker_options={"load_interval_s": 1.0},
                      disagg_options={"policy": "load", "prefill_busy_tokens": 100})
    client = client_for(srv)
    pool = srv.frontend.models.models["baton-tiny"].prefill
    assert srv.wait_until(lambda: bool(pool.loads))
    worker_id, load = srv.call(lambda: next(iter(pool.loads.items())))
    busy = msgspec.structs.replace(load, active_prefill_tokens=101)
    srv.call(lambda: pool.loads.__setitem__(worker_id, busy))
    resp = chat(client, "x " * 50, max_tokens=2)
    assert ext(resp)["prefill_worker_id"] is None and resp.usage.completion_tokens == 2
    assert metric(srv, 'baton_frontend_prefill_local_total{model="baton-tiny",reason="prefill_busy"}') == 1
    idle = msgspec.structs.replace(load, active_prefill_tokens=100)
    srv.call(lambda: pool.loads.__setitem__(worker_id, idle))
    assert ext(chat(client, "y " * 50, max_tokens=2))["prefill_worker_id"] == 0


def test_a_failed_prefill_falls_back_to_local_prefill(make_server) -> None:
    srv = make_server(disagg=(1, 1), block_size=4)
    client = client_for(srv)
    srv.call(lambda: setattr(srv.workers[0], "draining", True))  # refuses new requests
    resp = chat(client, "fallback " * 10, max_tokens=5)
    assert resp.usage.completion_tokens == 5
    assert ext(resp)["prefill_worker_id"] is None and ext(resp)["decode_worker_id"] == 1
    assert metric(srv, 'baton_frontend_prefill_local_total{model="baton-tiny",reason="fallback"}') == 1


def test_a_lost_kv_transfer_falls_back_to_local_prefill(make_server) -> None:
    srv = make_server(disagg=(1, 1), block_size=4,
                      engine_options={"kv_hold_timeout_s": 1e-9})
    # The prefill worker frees held KV at once, before the decode worker can fetch it.
    client = client_for(srv)
    resp = chat(client, "expired " * 10, max_tokens=5, seed=1)
    assert resp.usage.completion_tokens == 5
    assert ext(resp)["prefill_worker_id"] == 0
    assert srv.wait_until(lambda: srv.workers[1].engine.stats.kv_loads_failed == 1)
    assert srv.wait_until(lambda: pools_idle(srv))
    agg = client_for(make_server(workers=1, block_size=4))
    same = chat(agg, "expired " * 10, max_tokens=5, seed=1)
    assert resp.choices[0].message.content == same.choices[0].message.content


@pytest.mark.parametrize("role_count", [(0, 1)])
def test_serve_config_refuses_empty_pools(role_count) -> None:
    from baton.config import PoolsConfig

    with pytest.raises(ValueError, match="num_prefill_workers"):
        PoolsConfig(disaggregated=True, num_prefill_workers=role_count[0])


def test_serve_config_gives_prefill_workers_their_own_scheduler() -> None:
    from dataclasses import replace

    from baton.config import PoolsConfig, ServeConfig

    base = ServeConfig().worker.engine.scheduler
    prefill = replace(base, max_num_seqs=4, enable_prefix_caching=False)
    config = ServeConfig(pools=PoolsConfig(disaggregated=True, prefill_scheduler=prefill))
    assert config.worker_config("prefill").engine.scheduler == prefill
    assert config.worker_config("prefill").role == "prefill"
    assert config.worker_config("decode").engine.scheduler == base
    with pytest.raises(ValueError, match="prefill_scheduler"):
        ServeConfig(pools=PoolsConfig(disaggregated=True, prefill_scheduler=replace(
            base, block_size=base.block_size * 2)))
