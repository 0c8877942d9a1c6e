"""The two commands: ``baton serve`` with no arguments serves; Ctrl-C stops it cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import baton_process


def chat(port: str, model: str = "baton-tiny", content: str = "hi") -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}],
                       "max_tokens": 3}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def test_baton_serve_answers_and_stops_cleanly_on_sigint():
    proc, match = baton_process("serve", "--port", "0", ready=r"http://127\.0\.0\.1:(\d+)")
    try:
        assert chat(match.group(1))["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("engine", [("--engine", "mock"), ("--engine", "hf", "--model",
                                                           "baton-tiny-llama")])
def test_baton_serve_disagg_answers_through_a_prefill_and_a_decode_worker(engine):
    proc, match = baton_process("serve", "--port", "0", "--disagg", "--prefill-workers", "1",
                                "--decode-workers", "2", "--speedup-ratio", "0", *engine,
                                ready=r"1 prefill \+ 2 decode .* http://127\.0\.0\.1:(\d+)")
    try:
        model = engine[-1] if engine[1] == "hf" else "baton-tiny"
        body = chat(match.group(1), model, "relay " * 40)
        assert body["usage"]["completion_tokens"] == 3
        assert body["baton"]["prefill_worker_id"] == 0
        assert body["baton"]["decode_worker_id"] in (1, 2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_while_starting_stops_a_worker_still_waiting_for_nats():
    from tests.nats_fixture import free_port

    proc, _ = baton_process("worker", "--nats", f"nats://127.0.0.1:{free_port()}",
                            ready=r"NATS baton-worker: ConnectionRefusedError")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM


def test_invalid_configuration_is_a_clear_error_not_a_traceback():
    out = subprocess.run([sys.executable, "-m", "baton", "serve", "--workers", "0"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "num_workers: must be a positive integer, got 0" in out.stderr
    assert "Traceback" not in out.stderr


def test_trace_analyze_and_synth_commands(tmp_path):
    src = tmp_path / "src.jsonl"
    lines = [
        {"timestamp": 0, "input_length": 1000, "output_length": 10, "hash_ids": [0, 1]},
        {"timestamp": 5, "input_length": 1100, "output_length": 20, "hash_ids": [0, 1, 2]},
        {"timestamp": 9, "input_length": 600, "output_length": 5, "hash_ids": [0, 3]},
    ]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = subprocess.run([sys.executable, "-m", "baton", "trace", "analyze", str(src)],
                         capture_output=True, text=True, timeout=60, check=True)
    assert "requests" in out.stdout and "3" in out.stdout
    synth = tmp_path / "synth.jsonl"
    subprocess.run([sys.executable, "-m", "baton", "trace", "synth", str(src), "-o", str(synth),
                    "--num-requests", "20", "--seed", "3"],
                   capture_output=True, text=True, timeout=60, check=True)
    assert len(synth.read_text().splitlines()) == 20


def test_sim_command_writes_a_report_bench_compare_can_read(tmp_path):
    trace = tmp_path / "t.jsonl"
    lines = [{"timestamp": 10 * i, "input_length": 600, "output_length": 4, "hash_ids": [0, i]}
             for i in range(6)]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "simrun"
    subprocess.run([sys.executable, "-m", "baton", "sim", "--trace", str(trace), "--workers", "2",
                    "--router", "kv", "--out", str(out)],
                   capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["num_requests"] == 6 and summary["num_errors"] == 0
    table = subprocess.run([sys.executable, "-m", "baton", "bench", "compare", str(out)],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "simrun" in table
