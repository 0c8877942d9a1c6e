"""The roofline timing model with worked numbers: parameter accounting against the models'
published sizes, the memory-bound decode and compute-bound prefill limits, tensor and expert
parallelism, latent attention, and the engine and simulator reading it from a config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from baton.config import TimingConfig
from baton.engine.roofline import (
    HARDWARE,
    Efficiency,
    ModelShape,
    Parallelism,
    RooflineTiming,
)
from baton.engine.timing import timing_model

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"
H100 = HARDWARE["h100"]


def shape(name: str) -> ModelShape:
    return ModelShape.from_hf_config(json.loads((MODELS / f"{name}.json").read_text()))


def params(m: ModelShape) -> tuple[float, float]:
    """(total, active) parameters with both embeddings, in billions."""
    total, active = m.parameters()
    return total / 1e9, active / 1e9


@pytest.mark.parametrize(("name", "total", "active"), [
    ("llama-3.1-8b", 8.03, 8.03), ("llama-3.1-70b", 70.6, 70.6),
    ("deepseek-v3", 671, 37),  # the model card: 671B total, 37B activated per token
])
def test_parameters_add_up_to_the_published_sizes(name, total, active):
    got_total, got_active = params(shape(name))
    assert got_total == pytest.approx(total, rel=0.01)
    assert got_active == pytest.approx(active, rel=0.03)


def test_kv_bytes_per_token_for_grouped_and_latent_attention():
    # Llama-3.1-8B: 32 layers x 2 (K, V) x 8 KV heads x 128 dims x 2 bytes
    assert shape("llama-3.1-8b").kv_bytes_per_token() == 32 * 2 * 8 * 128 * 2 == 131072
    # DeepSeek-V3: 61 layers x (512 latent + 64 rope) x 2 bytes (bf16 cache)
    assert shape("deepseek-v3").kv_bytes_per_token() == 61 * 576 * 2
    assert ModelShape.from_hf_config(json.loads((MODELS / "deepseek-v3.json").read_text()),
                                     kv_cache="fp8").kv_bytes_per_token() == 61 * 576


def test_the_config_says_the_weights_dtype():
    assert shape("llama-3.1-8b").weights == "bf16"
    assert shape("deepseek-v3").weights == "fp8"
    nvfp4 = {**json.loads((MODELS / "deepseek-v3.json").read_text()),
             "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4"}}
    assert ModelShape.from_hf_config(nvfp4).weights == "fp4"
    assert ModelShape.from_hf_config(nvfp4).kv_cache == "bf16"
    fp8_cache = {**nvfp4, "quantization_config": {"quant_algo": "FP8",
                                                  "kv_cache_quant_algo": "FP8"}}
    assert (ModelShape.from_hf_config(fp8_cache).weights,
            ModelShape.from_hf_config(fp8_cache).kv_cache) == ("fp8", "fp8")


EFF = Efficiency(compute=0.5, memory=0.8, step_overhead_ms=0.0)


def test_decode_of_one_request_reads_every_weight_once():
    m = shape("llama-3.1-8b")
    t = RooflineTiming(m, H100, efficiency=EFF)
    parts = t.parts_ms(0, 1, 1000)
    # the weights a token passes: 8.03B less the input embedding (0.525B), in bf16
    weights = (8.03e9 - 4096 * 128256) * 2
    assert parts["linear"] == pytest.approx(weights / (3.35e12 * 0.8) * 1e3, rel=0.01)
    # ~5.6 ms: memory-bound, so 32 requests cost hardly more than one
    assert t.parts_ms(0, 32, 32000)["linear"] == pytest.approx(parts["linear"], rel=0.01)
    # attention reads the KV in use: 1000 tokens x 128 KiB
    assert parts["attention"] == pytest.approx(1000 * 131072 / (3.35e12 * 0.8) * 1e3)


def test_a_long_prefill_is_bound_by_arithmetic():
    m = shape("llama-3.1-8b")
    t = RooflineTiming(m, H100, efficiency=EFF)
    tokens = 8192
    dense = params(m)[0] * 1e9 - 2 * m.hidden * m.vocab  # no embeddings
    linear_flops = 2 * tokens * dense + 2 * m.hidden * m.vocab  # one sampled token
    assert t.parts_ms(tokens, 0, 0)["linear"] == pytest.approx(
        linear_flops / (989e12 * 0.5) * 1e3, rel=1e-6)
    # causal attention within the chunk: T(T+1)/2 pairs x 2 x (qk + v) x heads x layers
    pairs = tokens * (tokens + 1) / 2
    attention_flops = 2 * pairs * (2 * 32 * 128) * 32
    assert t.parts_ms(tokens, 0, 0)["attention"] == pytest.approx(
        attention_flops / (989e12 * 0.5) * 1e3, rel=1e-6)


def test_tensor_parallelism_splits_the_work_and_adds_two_all_reduces_per_layer():
    m = shape("llama-3.1-70b")
    one = RooflineTiming(m, H100, efficiency=EFF)
    four = RooflineTiming(m, H100, Parallelism(tp=4), EFF)
    assert four.parts_ms(0, 8, 8000)["linear"] == pytest.approx(
        one.parts_ms(0, 8, 8000)["linear"] / 4)
    # 8 KV heads over 4 GPUs: each reads a quarter of the cache
    assert four.parts_ms(0, 8, 8000)["attention"] == pytest.approx(
        one.parts_ms(0, 8, 8000)["attention"] / 4)
    # ring all-reduce of 8 tokens x 8192 x 2 bytes: 2 x 3/4 of it over 450 GB/s x 0.7, + 10 us
    per = 2 * 3 / 4 * (8 * 8192 * 2) / (450e9 * 0.7) + 10e-6
    assert four.parts_ms(0, 8, 8000)["communication"] == pytest.approx(2 * 80 * per * 1e3)
    assert one.parts_ms(0, 8, 8000)["communication"] == 0


def test_experts_are_read_as_the_tokens_reach_them():
    m = shape("deepseek-v3")
    t = RooflineTiming(m, H100, Parallelism(dp=8, ep=8), EFF)
    expert_bytes = m.mlp_params(m.expert_intermediate) * m.moe_layers * 1.0  # fp8

    def experts_ms(tokens: int) -> float:
        """The linear part of a step of ``tokens`` decodes, less what every token passes."""
        head = m.hidden * m.vocab
        everyone = max(2 * tokens * (_dense(m) + head) / (1979e12 * 0.5),
                       (_dense(m) + head) * 1.0 / (3.35e12 * 0.8))
        return t.parts_ms(0, tokens, 0)["linear"] - everyone * 1e3

    # one token reaches 8 of 256 experts; a thousand reach nearly all of them
    assert experts_ms(1) == pytest.approx(8 / 8 * expert_bytes / (3.35e12 * 0.8) * 1e3, rel=0.01)
    assert experts_ms(1000) == pytest.approx(
        max(256 / 8 * expert_bytes / (3.35e12 * 0.8),
            2 * 1000 * 8 * m.mlp_params(m.expert_intermediate) * m.moe_layers / 8
            / (1979e12 * 0.5)) * 1e3, rel=0.01)


def _dense(m: ModelShape) -> float:
    return (m.layers * m.attention_params() + m.dense_layers * m.mlp_params(m.intermediate)
            + m.moe_layers * m.mlp_params(m.shared_intermediate))


def test_latent_attention_decodes_absorbed_and_prefills_as_heads():
    m = shape("deepseek-v3")
    assert m.attention_width(decode=True) == 128 * (2 * 512 + 64)
    assert m.attention_width(decode=False) == 128 * (128 + 64 + 128)
    # one request at 100k tokens: absorbed attention over 128 heads is bound by arithmetic
    # on one GPU (2 x 61 x 100k x 139,264 FLOPs at 989 TFLOP/s x 0.5: 3.44 ms) ...
    one = RooflineTiming(m, H100, efficiency=EFF).parts_ms(0, 1, 100_000)["attention"]
    assert one == pytest.approx(2 * 61 * 100_000 * 139_264 / (989e12 * 0.5) * 1e3)
    # ... and over 8 by reading the latent cache, whole on every GPU (7.03 GB: 2.62 ms)
    eight = RooflineTiming(m, H100, Parallelism(tp=8), EFF).parts_ms(0, 1, 100_000)
    assert eight["attention"] == pytest.approx(100_000 * 61 * 576 * 2 / (3.35e12 * 0.8) * 1e3)


def test_a_dtype_the_gpu_lacks_runs_at_the_next_wider_one():
    assert H100.peak("fp4") == H100.peak("fp8") == 1979e12
    assert HARDWARE["b200"].peak("fp4") == 9000e12


def test_an_empty_step_takes_no_time():
    assert RooflineTiming(shape("llama-3.1-8b"), H100).step_ms(0, 0, 5000, 10000) == 0


def test_the_engine_and_the_simulator_read_the_roofline_from_a_config_json(tmp_path):
    timing = timing_model(TimingConfig(roofline_model=str(MODELS / "llama-3.1-70b.json"),
                                       hardware="h200", tp=4))
    assert isinstance(timing, RooflineTiming)
    assert timing.hardware.name == "H200 SXM" and timing.parallel.tp == 4
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="needs 'num_attention_heads'"):
        timing_model(TimingConfig(roofline_model=str(bad)))
    with pytest.raises(ValueError, match="not both"):
        TimingConfig(roofline_model="a.json", profile="b.json")
    with pytest.raises(ValueError, match="hardware"):
        TimingConfig(hardware="a100")  # type: ignore[arg-type]


def test_the_simulator_moves_the_models_own_kv_bytes():
    from baton.sim.config import SimConfig

    deepseek = SimConfig(timing=TimingConfig(roofline_model=str(MODELS / "deepseek-v3.json")))
    assert deepseek.kv_bytes_per_token == 61 * 576 * 2
    assert SimConfig().kv_bytes_per_token == 131072  # the polynomial's stand-in: Llama-3-8B
    given = SimConfig(timing=TimingConfig(roofline_model=str(MODELS / "deepseek-v3.json"),
                                          kv_bytes_per_token=1000))
    assert given.kv_bytes_per_token == 1000


def test_the_scheduler_counts_the_attention_work_of_each_step():
    from baton.config import SchedulerConfig
    from baton.engine.request import Request
    from baton.engine.scheduler import Scheduler
    from baton.protocol import SamplingParams

    sched = Scheduler(SchedulerConfig(block_size=16, num_blocks=64, max_num_batched_tokens=64,
                                      enable_prefix_caching=False, enable_chunked_prefill=True))
    for rid, n in (("a", 100), ("b", 20)):
        sched.add_request(Request(rid, list(range(n)), SamplingParams(max_tokens=4)))
    first = sched.schedule()  # a: 64 of its 100 tokens; b waits for the budget
    assert first.num_scheduled_tokens == {"a": 64}
    assert first.prefill_attention_pairs == 64 * 65 // 2
    sched.update_from_output(first, {})
    second = sched.schedule()  # a: its last 36 after 64 computed; b: 20 of 20 (28 left)
    assert second.num_scheduled_tokens == {"a": 36, "b": 20}
    assert second.prefill_attention_pairs == 36 * 64 + 36 * 37 // 2 + 20 * 21 // 2
    sched.update_from_output(second, {"a": 7, "b": 7})
    third = sched.schedule()  # both decode: a attends 101 tokens, b 21
    assert third.num_decode_requests == 2 and third.decode_context_tokens == 101 + 21


def test_prefills_of_many_short_prompts_cost_less_attention_than_one_long_chunk():
    t = RooflineTiming(shape("llama-3.1-8b"), H100, efficiency=EFF)
    one_chunk = t.parts_ms(8192, 0, 8192)["attention"]
    many = t.parts_ms(8192, 0, 8192, prefill_pairs=64 * 128 * 129 // 2)["attention"]
    assert many == pytest.approx(one_chunk / 64, rel=0.02)


def test_attention_data_parallel_ranks_step_at_the_pace_of_the_busiest():
    m = shape("deepseek-v3")
    dep8 = RooflineTiming(m, H100, Parallelism(dp=8, ep=8), EFF)
    decode = (0, 4, 40_000, 0, 0, 40_000)  # four requests at 10k tokens of context each
    prefill = (8192, 0, 8192, 0, 8192 * 8193 // 2, 0)
    # one rank alone: the same step as the single-rank model's (the experts on all 8 GPUs)
    assert dep8.lockstep_ms([decode]) == pytest.approx(dep8.step_ms(*decode))
    # eight ranks decoding: each its own attention at the same time, the experts over all 32
    # tokens (which reach five times as many experts as 4 do): far cheaper than 8 steps
    eight = dep8.lockstep_ms([decode] * 8)
    assert 2 * dep8.step_ms(*decode) < eight < 3 * dep8.step_ms(*decode)
    expected = (sum(dep8._rank_parts(0, 4, 40_000, 0, 40_000)) + dep8._experts_s(32)
                + dep8._alltoall_s(4)) * 1e3 + EFF.step_overhead_ms
    assert eight == pytest.approx(expected)
    # one rank's 8192-token prefill chunk holds up the seven ranks that only decode
    mixed = dep8.lockstep_ms([prefill] + [decode] * 7)
    assert mixed > dep8.step_ms(*prefill) > 5 * eight
    with pytest.raises(ValueError, match="must divide"):
        Parallelism(tp=1, ep=8)
