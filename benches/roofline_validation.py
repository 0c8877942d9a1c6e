"""The roofline timing model against TensorRT-LLM's published throughput (docs/timing-model.md).

The reference: NVIDIA/TensorRT-LLM, ``docs/source/performance/perf-overview.md`` (commit
00f37686aa854010d68bcbd0f4ab000221541ca6), "Total Output Throughput (tokens/sec)" of
``trtllm-bench throughput``: every request of a fixed ISL/OSL queued at once on one
tensor-parallel group, NVIDIA's ModelOpt FP8 (Hopper) or FP4 (Blackwell) checkpoints.

Each case replays the same scenario in ``baton sim``: ``num_requests`` requests (the count
that page lists for the ISL/OSL) arriving at t = 0 on one simulated worker whose step times
come from the roofline model (``--roofline-model``, ``--hardware``, ``--tp``). Nothing is
fitted to the table; the settings are the page's, or stated below where it is silent:

- KV capacity: 90% of the GPUs' memory left after the weights (trtllm-bench's default
  ``kv_cache_free_gpu_mem_fraction``), in FP8 (ModelOpt's checkpoints quantize the KV cache);
- at most 2048 requests and 8192 tokens per step (assumed: the page does not say what
  trtllm-bench chose), block size 32, no chunked prefill (the PyTorch backend's default), no
  prefix caching (the prompts are random).

    .venv/bin/python benches/roofline_validation.py            # every case (a few minutes)
    .venv/bin/python benches/roofline_validation.py --quick    # one ISL/OSL per GPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from baton.config import PoolsConfig, SchedulerConfig, TimingConfig
from baton.engine.roofline import DTYPE_BYTES, HARDWARE, ModelShape
from baton.sim.config import SimConfig
from baton.sim.report import run_sim
from baton.trace import TraceRequest, save_trace

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = {(128, 128): 30000, (128, 2048): 3000, (500, 2000): 3000, (1000, 1000): 3000,
            (1000, 2000): 1500, (2048, 128): 3000, (2048, 2048): 1500, (5000, 500): 1500}
"""The page's ``$num_requests`` per ISL/OSL (20000/2000 left out: its prompts exceed one
step's 8192 tokens, which chunked prefill would need)."""

# Total Output Throughput (tokens/s) from the page, per (model, gpu, tp, dtype).
PUBLISHED: dict[tuple[str, str, int, str], dict[tuple[int, int], float]] = {
    ("llama-3.1-8b", "h100", 1, "fp8"): {
        (128, 128): 28312, (128, 2048): 22714, (500, 2000): 17660, (1000, 1000): 15220,
        (1000, 2000): 13899, (2048, 128): 3450, (2048, 2048): 9305, (5000, 500): 3459},
    ("llama-3.1-8b", "h200", 1, "fp8"): {
        (128, 128): 27911, (128, 2048): 26221, (500, 2000): 20770, (1000, 1000): 17744,
        (1000, 2000): 16828, (2048, 128): 3538, (2048, 2048): 12194, (5000, 500): 3902},
    # Llama 3.3 70B: Llama 3.1 70B's architecture
    ("llama-3.1-70b", "h200", 1, "fp8"): {
        (128, 128): 3803, (128, 2048): 4336, (500, 2000): 3666, (1000, 1000): 2909,
        (1000, 2000): 2994, (2048, 128): 442, (2048, 2048): 2003, (5000, 500): 566},
    ("llama-3.1-70b", "h100", 2, "fp8"): {
        (128, 128): 6378, (128, 2048): 6651, (500, 2000): 5222, (1000, 1000): 4205,
        (1000, 2000): 4146, (2048, 128): 762, (2048, 2048): 3082, (5000, 500): 898},
    ("llama-3.1-70b", "b200", 1, "fp4"): {
        (128, 128): 11147, (128, 2048): 9922, (500, 2000): 7762, (1000, 1000): 7007,
        (1000, 2000): 6271, (2048, 128): 1339, (2048, 2048): 4783, (5000, 500): 1459},
    ("llama-3.1-70b", "gb200", 1, "fp4"): {
        (128, 128): 12189, (128, 2048): 11309, (500, 2000): 9028, (1000, 1000): 7326,
        (1000, 2000): 6513, (2048, 128): 1450, (2048, 2048): 5646, (5000, 500): 1602},
}

MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS, BLOCK_SIZE, KV_FRACTION = 2048, 8192, 32, 0.90


@dataclass(frozen=True)
class Case:
    model: str
    gpu: str
    tp: int
    dtype: str
    isl: int
    osl: int

    @property
    def label(self) -> str:
        return (f"{self.model} {self.gpu} tp{self.tp} {self.dtype} "
                f"{self.isl}/{self.osl}")


def quantized_config(model: str, dtype: str, work: Path) -> Path:
    """The model's config.json as its ModelOpt checkpoint declares it (weights in ``dtype``,
    KV cache in FP8)."""
    config = json.loads((ROOT / "examples/models" / f"{model}.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": dtype.upper(),
                                     "kv_cache_quant_algo": "FP8"}
    path = work / f"{model}-{dtype}.json"
    path.write_text(json.dumps(config))
    return path


def kv_blocks(shape: ModelShape, gpu: str, tp: int) -> int:
    """Blocks of the KV memory left after the weights, on all ``tp`` GPUs."""
    total, _ = shape.parameters()
    free = HARDWARE[gpu].memory_bytes * tp - total * DTYPE_BYTES[shape.weights]
    return int(free * KV_FRACTION / shape.kv_bytes_per_token() / BLOCK_SIZE)


def trace(isl: int, osl: int, work: Path) -> Path:
    path = work / f"trace-{isl}-{osl}.jsonl"
    if not path.exists():
        blocks = math.ceil(isl / 512)
        save_trace(path, [TraceRequest(timestamp=0, input_length=isl, output_length=osl,
                                       hash_ids=list(range(i * blocks, (i + 1) * blocks)))
                          for i in range(REQUESTS[isl, osl])])
    return path


def simulate(case: Case, work: Path) -> tuple[float, float]:
    """(output tokens/s, seconds the simulation took)."""
    config_path = quantized_config(case.model, case.dtype, work)
    shape = ModelShape.from_hf_config(json.loads(config_path.read_text()))
    config = SimConfig(
        pools=PoolsConfig(num_workers=1),
        scheduler=SchedulerConfig(num_blocks=kv_blocks(shape, case.gpu, case.tp),
                                  block_size=BLOCK_SIZE, max_num_seqs=MAX_NUM_SEQS,
                                  max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                                  enable_prefix_caching=False, enable_chunked_prefill=False),
        timing=TimingConfig(roofline_model=str(config_path), hardware=case.gpu,  # type: ignore[arg-type]
                            tp=case.tp),
    )
    started = time.perf_counter()
    summary, _ = run_sim(trace(case.isl, case.osl, work), config, quiet=True)
    return summary.output_token_throughput, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/roofline-validation")
    parser.add_argument("--quick", action="store_true",
                        help="128/2048 and 2048/128 only")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print("| model | GPU | TP | dtype | ISL/OSL | published tok/s | simulated tok/s | error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    errors = []
    for (model, gpu, tp, dtype), table in PUBLISHED.items():
        for (isl, osl), published in table.items():
            if args.quick and (isl, osl) not in ((128, 2048), (2048, 128)):
                continue
            case = Case(model, gpu, tp, dtype, isl, osl)
            simulated, seconds = simulate(case, work)
            error = simulated / published - 1
            errors.append(abs(error))
            print(f"| {model} | {gpu} | {tp} | {dtype} | {isl}/{osl} | {published:,.0f} | "
                  f"{simulated:,.0f} | {error:+.0%} |", flush=True)
            print(f"  ({seconds:.1f} s)", file=sys.stderr, flush=True)
    errors.sort()
    print(f"\n{len(errors)} cases: mean |error| {sum(errors) / len(errors):.0%}, median "
          f"{errors[len(errors) // 2]:.0%}, max {errors[-1]:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
