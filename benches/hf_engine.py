"""The transformers engine's paged model runner vs plain transformers, on the same model.

Baton's ``PagedModelRunner`` keeps the KV cache in blocks of a ``BlockStore`` (so blocks can be
shared by prefix hits and moved between workers) and gathers a request's KV into a
``DynamicCache`` for every forward. Plain transformers keeps one contiguous ``DynamicCache``
per sequence. This bench measures what paging costs, step by step, in the same process:

- prefill of a P-token prompt;
- one decode step of one sequence at context P;
- one decode step of a batch of B sequences at contexts around P (Baton: one padded forward;
  transformers: one forward over a left-padded batch cache).

    .venv/bin/python benches/hf_engine.py                      # SmolLM2 if installed
    .venv/bin/python benches/hf_engine.py --model baton-tiny-llama --repeats 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from baton.engine.hf.models import offline_transformers, prepare_model
from baton.engine.hf.runner import ForwardItem, PagedModelRunner
from baton.protocol import SamplingParams

GREEDY = SamplingParams(max_tokens=1 << 20, temperature=0.0)
BLOCK_SIZE = 16


def timed(fn: Any, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (length - 3 * i,), generator=gen).tolist()
            for i in range(batch)]


class Plain:
    """Plain transformers: a contiguous DynamicCache per batch."""

    def __init__(self, model: Any, cache_class: Any) -> None:
        self.model, self.cache_class = model, cache_class

    def prefill(self, tokens: list[int]) -> Any:
        cache = self.cache_class(config=self.model.config)
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True,
                       logits_to_keep=1)
        return cache

    def batch_cache(self, seqs: list[list[int]]) -> tuple[Any, torch.Tensor]:
        """A left-padded batch cache of the sequences and its attention mask."""
        longest = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), longest, dtype=torch.long)
        mask = torch.zeros(len(seqs), longest, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, longest - len(s):] = torch.tensor(s)
            mask[row, longest - len(s):] = 1
        cache = self.cache_class(config=self.model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, mask

    def decode(self, cache: Any, tokens: list[int], mask: torch.Tensor, positions: list[int]) -> None:
        step_mask = torch.cat([mask, torch.ones(len(tokens), 1, dtype=torch.long)], dim=1)
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([[t] for t in tokens]), attention_mask=step_mask,
                       position_ids=torch.tensor([[p] for p in positions]),
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-1)  # undo the step so every repeat decodes at the same context


def bench(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    folder = prepare_model(args.model)
    blocks_per_seq = (args.prompt_len + BLOCK_SIZE) // BLOCK_SIZE + 1
    runner = PagedModelRunner(folder, num_blocks=blocks_per_seq * (args.batch + 1),
                              block_size=BLOCK_SIZE)
    plain = Plain(runner.model, offline_transformers().DynamicCache)
    seqs = prompts(args.batch, args.prompt_len, runner.vocab_size)
    blocks = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(len(seqs))]
    results: dict[str, tuple[float, float]] = {}

    # prefill of one prompt
    first = seqs[0]
    results["prefill"] = (
        timed(lambda: runner.execute([ForwardItem("p", first, 0, blocks[0], GREEDY)]), args.repeats),
        timed(lambda: plain.prefill(first), args.repeats),
    )
    # fill every sequence's blocks but its last token
    runner.execute([ForwardItem(f"s{i}", s[:-1], 0, blocks[i], None) for i, s in enumerate(seqs)])
    one = [ForwardItem("s0", first[-1:], len(first) - 1, blocks[0], GREEDY)]
    cache1, mask1 = plain.batch_cache([first[:-1]])
    results["decode x1"] = (
        timed(lambda: runner.execute(one), args.repeats),
        timed(lambda: plain.decode(cache1, first[-1:], mask1, [len(first) - 1]), args.repeats),
    )
    many = [ForwardItem(f"s{i}", s[-1:], len(s) - 1, blocks[i], GREEDY) for i, s in enumerate(seqs)]
    cache_b, mask_b = plain.batch_cache([s[:-1] for s in seqs])
    last = [s[-1] for s in seqs]
    results[f"decode x{len(seqs)}"] = (
        timed(lambda: runner.execute(many), args.repeats),
        timed(lambda: plain.decode(cache_b, last, mask_b, [len(s) - 1 for s in seqs]), args.repeats),
    )
    runner.close()
    return {"model": args.model, "layout": runner.layout, "threads": args.threads,
            "prompt_len": args.prompt_len, "batch": args.batch, "repeats": args.repeats,
            "machine": platform.processor() or platform.machine(),
            "results_ms": {k: [b * 1e3, p * 1e3] for k, (b, p) in results.items()}}


def table(report: dict[str, Any]) -> str:
    lines = [f"{report['model']} ({report['layout']}), {report['threads']} threads, prompt "
             f"{report['prompt_len']} tokens, median of {report['repeats']}",
             "| step | Baton paged (ms) | transformers (ms) | Baton / transformers |",
             "| --- | ---: | ---: | ---: |"]
    for name, (baton, plain) in report["results_ms"].items():
        lines.append(f"| {name} | {baton:.1f} | {plain:.1f} | {baton / plain:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    report = bench(args)
    print(table(report))
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    path = out / f"hf_engine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
