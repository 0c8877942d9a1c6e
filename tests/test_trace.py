"""Mooncake traces: load/save, analyze, synthesize, and prompts that keep prefixes shared."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers

from baton.preprocess import ModelCard, Tokenizer, resolve_model
from baton.trace import (
    PromptBuilder,
    TraceRequest,
    analyze,
    format_stats,
    load_trace,
    save_trace,
    synthesize,
)

BS = 512


def req(ts: int, isl: int, osl: int, ids: list[int]) -> TraceRequest:
    return TraceRequest(timestamp=ts, input_length=isl, output_length=osl, hash_ids=ids)


def shared_trace(n: int = 200) -> list[TraceRequest]:
    """Heavy sharing: every request starts with one of two 4-block system prompts."""
    out, next_id = [], 100
    for i in range(n):
        tail = list(range(next_id, next_id + 1 + i % 3))
        next_id += len(tail)
        ids = [0, 1, 2, 3] if i % 2 else [4, 5, 6, 7]
        out.append(
            req(i // 2 * 100, (len(ids) + len(tail) - 1) * BS + 1 + i % 500, 10 + i, ids + tail)
        )
    return out


def unique_trace(n: int = 200) -> list[TraceRequest]:
    out, next_id = [], 0
    for i in range(n):
        ids = list(range(next_id, next_id + 3))
        next_id += 3
        out.append(req(i * 100, 2 * BS + 7, 5, ids))
    return out


# ---------------------------------------------------------------- format


def test_save_then_load_returns_the_same_requests(tmp_path: Path) -> None:
    trace = shared_trace(10)
    save_trace(tmp_path / "t.jsonl", trace)
    assert load_trace(tmp_path / "t.jsonl") == trace


def test_load_skips_blank_lines_reads_synthesizer_fields_and_ignores_others(
    tmp_path: Path,
) -> None:
    line = {
        "timestamp": 5,
        "input_length": 3,
        "output_length": 2,
        "hash_ids": [9],
        "context_len": 0,
        "unique_user_prompt_len": 3,
        "priority": "x",
    }
    (tmp_path / "t.jsonl").write_text(json.dumps(line) + "\n\n")
    (got,) = load_trace(tmp_path / "t.jsonl")
    assert got == TraceRequest(timestamp=5, input_length=3, output_length=2, hash_ids=[9],
                               context_len=0, unique_user_prompt_len=3)


def test_a_bad_line_raises_value_error_naming_its_line_number(tmp_path: Path) -> None:
    good = json.dumps({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [0]})
    (tmp_path / "t.jsonl").write_text(f'{good}\n{good}\n{{"timestamp": -1}}\n')
    with pytest.raises(ValueError, match="line 3"):
        load_trace(tmp_path / "t.jsonl")


# ---------------------------------------------------------------- analyze


def test_analyze_matches_hand_computed_numbers() -> None:
    trace = [
        req(0, 1000, 10, [1, 2]),  # nothing cached
        req(1000, 1500, 20, [1, 2, 3]),  # 2 prefix hits
        req(2000, 600, 30, [1, 4]),  # 1 prefix hit
        req(4000, 100, 40, [5]),  # none
    ]
    s = analyze(trace)
    assert (s.requests, s.duration_s, s.arrival_rate) == (4, 4.0, 1.0)
    assert s.input_tokens_per_s == 3200 / 4
    assert (s.isl_mean, s.isl_p50, s.isl_max, s.isl_min, s.isl_p99) == (800, 1000, 1500, 100, 1500)
    assert (s.osl_mean, s.osl_p50, s.osl_max) == (25, 30, 40)
    assert (s.total_blocks, s.unique_blocks) == (8, 5)
    assert s.block_hit_rate == s.prefix_block_hit_rate == 3 / 8
    assert s.token_hit_rate == (1024 + 512) / 3200
    assert s.mean_request_hit_rate == pytest.approx((0 + 2 / 3 + 1 / 2 + 0) / 4)
    # ids 1 and 2 repeat: contexts 1000 (all repeated), 1024, 512, 0
    assert s.shared_prefix_ratio == (1000 + 1024 + 512) / 3200
    assert s.synth_context_tokens_mean is None  # not a synthesized trace
    assert s.timestamps_sorted and s.length_mismatches == 0


def test_format_stats_is_one_aligned_row_per_statistic() -> None:
    lines = format_stats(analyze(shared_trace(20))).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert any(line.startswith("block_hit_rate") and line.endswith("%") for line in lines)


# ---------------------------------------------------------------- synthesize


def test_synthesis_is_deterministic_per_seed_and_returns_the_requested_count() -> None:
    source = shared_trace()
    a = synthesize(source, num_requests=300, seed=1)
    assert a == synthesize(source, num_requests=300, seed=1)
    assert a != synthesize(source, num_requests=300, seed=2)
    assert len(a) == 300


def test_synthesized_hash_ids_fit_the_input_length() -> None:
    out = synthesize(shared_trace(), num_requests=300, prompt_len_multiplier=2.5)
    assert all(len(r.hash_ids) == math.ceil(r.input_length / BS) for r in out)
    assert analyze(out).length_mismatches == 0


def test_prefix_len_multiplier_lengthens_shared_prefixes() -> None:
    source = shared_trace()
    base = analyze(synthesize(source, num_requests=300))
    longer = analyze(synthesize(source, num_requests=300, prefix_len_multiplier=4))
    assert longer.shared_context_tokens_mean > 3 * base.shared_context_tokens_mean
    assert longer.block_hit_rate > base.block_hit_rate


def test_isl_filter_is_respected() -> None:
    out = synthesize(shared_trace(), num_requests=300, min_isl=5 * BS, max_isl=6 * BS)
    assert all(5 * BS <= r.input_length <= 6 * BS for r in out)


def test_synthesized_requests_carry_the_synthesizers_context_split(tmp_path: Path) -> None:
    """context_len = core-tree blocks x block size (the source's shared 4-block prompts, x4
    with prefix_len_multiplier 4); the trace's own repeated-id split differs (a core path
    drawn once is unique there)."""
    out = synthesize(shared_trace(), num_requests=300, prefix_len_multiplier=4)
    assert all(r.context_len + r.unique_user_prompt_len == r.input_length for r in out)
    assert {r.context_len for r in out} == {16 * BS}
    path = tmp_path / "t.jsonl"
    save_trace(path, out)
    assert load_trace(path) == out
    s = analyze(out)
    assert s.synth_context_tokens_mean == 16 * BS
    assert s.synth_unique_prompt_tokens_mean == pytest.approx(s.isl_mean - 16 * BS)
    save_trace(path, [req(0, 10, 1, [1])])
    assert json.loads(path.read_text()) == {"timestamp": 0, "input_length": 10,
                                             "output_length": 1, "hash_ids": [1]}


def test_isl_filter_thins_arrivals_instead_of_compressing_them() -> None:
    """As Dynamo's synthesizer: a filtered-out request leaves its arrival slot empty, so the
    filtered trace is the unfiltered draw minus the requests outside the range."""
    source = shared_trace()
    unfiltered = synthesize(source, num_requests=600)
    limit = sorted(r.input_length for r in unfiltered)[len(unfiltered) // 2]
    filtered = synthesize(source, num_requests=200, max_isl=limit)
    kept = [r for r in unfiltered if r.input_length <= limit][:200]
    assert len(kept) == 200 and len(kept) < len(unfiltered) // 2 + 50
    key = [(r.timestamp, r.input_length, r.output_length) for r in filtered]
    assert key == [(r.timestamp, r.input_length, r.output_length) for r in kept]


def test_speedup_compresses_timestamps() -> None:
    source = shared_trace()
    slow = synthesize(source, num_requests=300)
    fast = synthesize(source, num_requests=300, arrival_speedup=10)
    assert fast[-1].timestamp == pytest.approx(slow[-1].timestamp / 10, rel=0.05)
    assert [r.timestamp for r in fast] == sorted(r.timestamp for r in fast)


def test_synthesis_keeps_the_sharing_of_its_source() -> None:
    shared = analyze(synthesize(shared_trace(), num_requests=300)).block_hit_rate
    unique = analyze(synthesize(unique_trace(), num_requests=300)).block_hit_rate
    assert unique == 0 and shared > 0.5


def test_root_multiplier_makes_disjoint_copies_of_the_tree() -> None:
    out = synthesize(shared_trace(), num_requests=300, prefix_root_multiplier=2)
    assert len({r.hash_ids[0] for r in out}) == 4


def test_bad_knobs_raise_value_errors_naming_the_field() -> None:
    with pytest.raises(ValueError, match="arrival_speedup"):
        synthesize(shared_trace(), num_requests=1, arrival_speedup=0)
    with pytest.raises(ValueError, match="min_isl"):
        synthesize(shared_trace(), num_requests=1, min_isl=10, max_isl=5)


# ---------------------------------------------------------------- prompts

WORD_SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def word_level_tokenizer(folder: Path) -> Tokenizer:
    folder.mkdir(parents=True)
    vocab = {f"w{i}": i for i in range(8192)}
    vocab.update({tok: 8192 + i for i, tok in enumerate(WORD_SPECIALS)})
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="\u0000\u0000", cleanup=False)
    raw.add_special_tokens(WORD_SPECIALS)
    raw.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    config = {
        "max_position_embeddings": 4096,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "hidden_size": 256,
        "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return Tokenizer(ModelCard.load(folder))


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer(ModelCard.load(resolve_model("baton-tiny")))


@pytest.fixture(params=["baton-tiny", "word-level"])
def builder(request: pytest.FixtureRequest, tiny: Tokenizer, tmp_path: Path) -> PromptBuilder:
    tokenizer = tiny if request.param == "baton-tiny" else word_level_tokenizer(tmp_path / "w")
    return PromptBuilder(tokenizer, block_size=64, seed=3)


def test_equal_hash_ids_give_identical_blocks_and_different_ids_different_ones(
    builder: PromptBuilder,
) -> None:
    a = builder.token_ids(req(0, 150, 1, [7, 8, 9]))
    b = builder.token_ids(req(0, 150, 1, [7, 8, 10]))
    assert a[:128] == b[:128] and a[128:] != b[128:]
    assert a[:64] != a[64:128]


def test_token_ids_have_exactly_the_input_length_and_truncate_the_last_block(
    builder: PromptBuilder,
) -> None:
    ids = builder.token_ids(req(0, 100, 1, [1, 2]))
    assert len(ids) == 100 and ids[64:] == builder.block(2)[:36]
    with pytest.raises(ValueError, match="hash_ids"):
        builder.token_ids(req(0, 200, 1, [1, 2]))


def test_text_tokenizes_back_to_the_exact_ids_so_shared_prefixes_stay_shared(
    builder: PromptBuilder,
) -> None:
    first, second = req(0, 300, 1, [1, 2, 3, 4, 5]), req(0, 250, 1, [1, 2, 30, 40])
    encoded = [
        builder.tokenizer.encode(builder.text(r), add_special_tokens=False) for r in (first, second)
    ]
    assert encoded == [builder.token_ids(first), builder.token_ids(second)]
    assert encoded[0][:128] == encoded[1][:128] and encoded[0][128] != encoded[1][128]
