"""Deployment files (``--deployment FILE``): a command's settings from YAML, checked by the
command's own parser, the command line winning; the seed-002 files as the simulator reads
them."""

from __future__ import annotations

from pathlib import Path

import pytest

from baton.cli import build_parser, main
from baton.cli.sim import config_from, sweep_config_from
from baton.trace import TraceRequest, save_trace

ROOT = Path(__file__).resolve().parent.parent
SEED_002 = ROOT / "examples" / "seed-002"


def _sim(*argv: str):
    return config_from(build_parser().parse_args(["sim", "--trace", "t.jsonl", *argv]))


def test_a_file_sets_the_flags_it_names_and_the_command_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("workers: 3\nengine: {block_size: 32, prefix_caching: false}\n"
                    "router: kv\nstep_time_scale: [1, 1, 2]\n"
                    "model: {roofline_model: models/m.json, hardware: h200}\n")
    config = _sim("--deployment", str(path))
    assert config.pools.num_workers == 3 and config.router.mode == "kv"
    assert config.scheduler.block_size == 32 and not config.scheduler.enable_prefix_caching
    assert config.step_time_scale == (1.0, 1.0, 2.0)
    assert config.timing.roofline_model == str(tmp_path / "models/m.json")  # beside the file
    assert config.timing.hardware == "h200"
    # a flag given wins, before or after --deployment
    assert _sim("--deployment", str(path), "--block-size", "64").scheduler.block_size == 64
    assert _sim("--block-size", "16", "--deployment", str(path)).scheduler.block_size == 16


@pytest.mark.parametrize(("text", "message"), [
    ("bogus: 1\n", "'bogus' is not a setting of this command"),
    ("workers: many\n", "invalid int value: 'many'"),
    ("engine: {prefix_caching: maybe}\n", "prefix_caching: must be true or false"),
    ("- workers\n", "a deployment file is a mapping"),
])
def test_a_bad_file_is_a_clear_error(tmp_path: Path, capsys, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["sim", "--trace", "t", "--deployment", str(path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_seed_002_files_describe_the_exemplars_deployments() -> None:
    agg = _sim("--deployment", str(SEED_002 / "agg.yaml"))
    assert (agg.pools.num_workers, agg.attention_dp, agg.timing.ep, agg.timing.tp) == (4, 8, 8, 1)
    assert agg.router.mode == "round-robin" and agg.timing.hardware == "gb200"
    s = agg.scheduler
    assert (s.block_size, s.max_num_seqs, s.max_num_batched_tokens) == (64, 8, 8192)
    assert not s.enable_prefix_caching and s.enable_chunked_prefill
    assert agg.kv_bytes_per_token == 61 * (576 + 132)  # FP8 latent + DSA indexer key
    dis = _sim("--deployment", str(SEED_002 / "disagg.yaml"))
    pools = dis.pools
    assert pools.disaggregated and (pools.num_prefill_workers, pools.num_decode_workers) == (2, 2)
    assert dis.router.mode == "kv" and dis.disagg.policy == "always"
    prefill, decode = dis.scheduler_for("prefill"), dis.scheduler_for("decode")
    assert (prefill.max_num_seqs, prefill.enable_prefix_caching) == (32, True)
    assert (decode.max_num_seqs, decode.enable_prefix_caching) == (8, False)


def test_the_sweep_reads_a_sim_deployment_file_but_its_pools(caplog) -> None:
    args = build_parser().parse_args(
        ["sim", "sweep", "--deployment", str(SEED_002 / "disagg.yaml")])
    config = sweep_config_from(args)
    assert (config.attention_dp, config.timing.ep, config.router) == (8, 8, "kv")
    assert config.scheduler.max_num_seqs == 8 and config.num_workers == 4  # its own default
    assert "prefill_workers" in caplog.text and "not used here" in caplog.text


def test_baton_sim_runs_a_deployment_file(tmp_path: Path, capsys) -> None:
    trace = tmp_path / "trace.jsonl"
    save_trace(trace, [TraceRequest(timestamp=100 * i, input_length=3000 + 500 * i,
                                    output_length=40, hash_ids=list(range(10 * i, 10 * i + 7)))
                       for i in range(24)])
    assert main(["sim", "--deployment", str(SEED_002 / "agg.yaml"), "--trace", str(trace)]) == 0
    err = capsys.readouterr().err
    assert "simulated 24 requests" in err and "busy: agg" in err
