"""Seed 002: NVIDIA's Dynamo Consolidated Exemplar (agg + round-robin vs disagg + KV routing)
reproduced in ``baton sim``. Results and discussion: ``docs/seed-002.md``.

Steps (each a subcommand; every file goes under ``--work``, default /tmp/seed002):

    .venv/bin/python benches/seed002.py traces      # synthesize + analyze the traces
    .venv/bin/python benches/seed002.py run         # run the simulations (CLI commands printed)
    .venv/bin/python benches/seed002.py report      # tables vs NVIDIA + overlaid CDF plot

Traces (all from Mooncake's conversation_trace.jsonl, seed 0, x16 prefixes, x10 prompts,
ISL <= 110,000, 10,000 requests):

- ``dynamo.jsonl``: ``baton trace synth --max-isl 110000``. Like Dynamo's synthesizer it drops a
  request over the limit and leaves its arrival slot empty; ``traces`` checks that the trace
  equals the unfiltered synthesis of 20,000 requests minus the requests over 110,000 tokens
  (timestamps and lengths). This is the trace the simulations replay.
- ``dynamo-nocache.jsonl``: ``dynamo.jsonl`` with every request's hash ids made unique, so no
  request can reuse another's KV: the exemplar's aggregated workers run with
  ``enable_block_reuse: false`` (the same simulation as ``baton sim --no-prefix-caching``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from baton.trace import TraceRequest, analyze, load_trace, save_trace, synthesize

MAX_ISL = 110_000
NUM_REQUESTS = 10_000

# Dynamo's published statistics of conversation_trace_synth_16.00x1+10.00_speedup1_maxisl110000
SEED_STATS = {
    "requests": 10_000, "unique_blocks": 430_838, "total_blocks": 770_934,
    "isl_mean": 39_186, "isl_max": 109_459, "isl_min": 12_801,
    "osl_mean": 344, "osl_max": 2_000, "osl_min": 1,
    "block_hit_rate": 44.1, "token_hit_rate": 44.0,
    "shared_context_tokens_mean": 22_400, "unique_prompt_tokens_mean": 16_786,
    "shared_prefix_ratio": 57.2, "duration_s": 85 * 60,
}

# NVIDIA's results (AWS GB200 K8s), ms unless noted.
NVIDIA = {
    "agg": {"req_s": 1.67, "out_tok_s": 556.82, "tot_tok_s": 65845.03,
            "ttft": (347687.94, 349052.40, 781814.19), "tpot": (413.45, 420.85, 745.78),
            "e2e": (483964.31, 487084.88, 945071.80)},
    "disagg": {"req_s": 1.96, "out_tok_s": 674.81, "tot_tok_s": 77648.90,
               "ttft": (3861.69, 2342.79, 11993.38), "tpot": (18.73, 18.54, 27.56),
               "e2e": (10165.80, 9697.64, 26077.58)},
}

# Engine settings shared by every run (see docs/seed-002.md, "Engine settings").
ENGINE = [
    "--block-size", "64",  # tokens_per_block 64 in the exemplar
    "--num-blocks", "262144",  # 16.8M tokens per worker (~2.1M per GPU x 8)
    "--max-num-seqs", "64",  # max_batch_size 8 per attention-DP rank x 8 ranks
    "--max-num-batched-tokens", "8192",  # max_num_tokens 8192
    # DeepSeek-V3.2, fp8: 61 layers x (MLA latent 576 B + DSA indexer key 132 B)
    "--kv-bytes-per-token", "43188",
    "--kv-transfer-gbps", "100",
    "--seed", "0",
]
AGG = ["--workers", "4", "--router", "round-robin"]
ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = ROOT / "examples" / "seed-002"
ONE_BIG_ENGINE = ["--attention-dp", "1", "--tp", "8", "--max-num-seqs", "64",
                  "--num-blocks", str(8 * 44348)]
"""A DEP8 worker as one engine of 8 GPUs: attention TP8 (one batch of 8 ranks' requests, one
8192-token budget, one pool of the 8 ranks' blocks); not a deployment of the exemplar."""
DISAGG = ["--disagg", "--prefill-workers", "2", "--decode-workers", "2", "--router", "kv",
          "--disagg-policy", "always"]


def _baton() -> str:
    return str(Path(sys.executable).with_name("baton"))


# ------------------------------------------------------------------ traces
def check_dynamo_filter(filtered: list[TraceRequest], unfiltered: list[TraceRequest]) -> None:
    """``filtered`` must be ``unfiltered`` minus the requests over ``MAX_ISL`` (Dynamo's
    filter: a rejected request's slot stays empty), compared on timestamps and lengths."""
    def key(r: TraceRequest) -> tuple[int, int, int]:
        return r.timestamp, r.input_length, r.output_length

    kept = [key(r) for r in unfiltered if r.input_length <= MAX_ISL][: len(filtered)]
    if kept != [key(r) for r in filtered]:
        raise SystemExit("the --max-isl trace is not the filtered unfiltered draw")


def without_sharing(requests: list[TraceRequest]) -> list[TraceRequest]:
    """Every block of every request gets a fresh id: no prefix is ever reused."""
    out, next_id = [], 0
    for r in requests:
        ids = list(range(next_id, next_id + len(r.hash_ids)))
        next_id += len(ids)
        out.append(TraceRequest(timestamp=r.timestamp, input_length=r.input_length,
                                output_length=r.output_length, hash_ids=ids))
    return out


def cmd_traces(a: argparse.Namespace) -> None:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    source = load_trace(a.source)
    knobs = {"prefix_len_multiplier": 16, "prompt_len_multiplier": 10, "seed": a.seed}
    dyn = synthesize(source, num_requests=NUM_REQUESTS, max_isl=MAX_ISL, **knobs)
    check_dynamo_filter(dyn, synthesize(source, num_requests=2 * NUM_REQUESTS, **knobs))
    save_trace(work / "dynamo.jsonl", dyn)
    save_trace(work / "dynamo-nocache.jsonl", without_sharing(dyn))
    rows = _stats_rows({"dynamo.jsonl": dyn})
    text = "\n".join(rows)
    (work / "trace-stats.md").write_text(text + "\n")
    print(text)


def _stats_rows(traces: dict[str, list[TraceRequest]]) -> list[str]:
    stats = {name: analyze(reqs) for name, reqs in traces.items()}
    names = list(traces)
    rows = ["| statistic | NVIDIA (Dynamo datagen) | " + " | ".join(f"`{n}`" for n in names) + " |",
            "|---|---:|" + "---:|" * len(names)]
    fields = [("requests", "requests", "{:,}"), ("unique hash blocks", "unique_blocks", "{:,}"),
              ("total hash blocks", "total_blocks", "{:,}"), ("ISL mean", "isl_mean", "{:,.0f}"),
              ("ISL max", "isl_max", "{:,}"), ("ISL min", "isl_min", "{:,}"),
              ("OSL mean", "osl_mean", "{:,.0f}"), ("OSL max", "osl_max", "{:,}"),
              ("OSL min", "osl_min", "{:,}")]
    for label, key, fmt in fields:
        vals = [fmt.format(getattr(stats[n], key)) for n in names]
        rows.append(f"| {label} | {fmt.format(SEED_STATS[key])} | " + " | ".join(vals) + " |")
    for label, key in (("block-level hit rate %", "block_hit_rate"),
                       ("token-level hit rate %", "token_hit_rate")):
        vals = [f"{100 * getattr(stats[n], key):.1f}" for n in names]
        rows.append(f"| {label} | {SEED_STATS[key]} | " + " | ".join(vals) + " |")
    rows += _split_rows(stats, names)
    vals = [f"{stats[n].duration_s / 60:.1f} ({stats[n].arrival_rate:.2f} req/s)" for n in names]
    rows.append("| span, min (arrival rate) | ~85 (~1.96) | " + " | ".join(vals) + " |")
    return rows


def _split_rows(stats: dict, names: list[str]) -> list[str]:
    rows = []
    for label, key in (
        ("shared context tok/req, baton (ids seen twice)", "shared_context_tokens_mean"),
        ("unique prompt tok/req, baton", "unique_prompt_tokens_mean"),
    ):
        vals = [f"{getattr(stats[n], key):,.0f}" for n in names]
        rows.append(f"| {label} | {SEED_STATS[key]:,} | " + " | ".join(vals) + " |")
    vals = [f"{100 * stats[n].shared_prefix_ratio:.1f}" for n in names]
    rows.append(f"| shared prefix ratio %, baton | {SEED_STATS['shared_prefix_ratio']} | "
                + " | ".join(vals) + " |")
    vals = [f"{ctx:,.0f} / {uniq:,.0f} ({100 * ctx / stats[n].isl_mean:.1f} %)"
            for n in names for ctx, uniq in [(stats[n].synth_context_tokens_mean,
                                               stats[n].synth_unique_prompt_tokens_mean)]]
    rows.append("| context / unique prompt tok/req (ratio), core-tree split "
                "| 22,400 / 16,786 (57.2 %) | " + " | ".join(vals) + " |")
    return rows


# ------------------------------------------------------------------ simulations
def runs(work: Path, speedups: list[float]) -> dict[str, list[str]]:
    """Run name -> ``baton sim`` arguments."""
    out = {}
    for s in speedups:
        # the roofline model with the exemplar's deployments as files (none of this calibrated)
        trace = ["--trace", str(work / "dynamo.jsonl"), "--arrival-speedup", f"{s:g}"]
        for kind in ("agg", "disagg"):
            files = ["--deployment", str(DEPLOYMENTS / f"{kind}.yaml")]
            out[f"rf-{kind}-x{s:g}"] = [*files, *trace]
            out[f"rf-{kind}-x{s:g}-onebig"] = [*files, *trace, *ONE_BIG_ENGINE]
        tag = f"x{s:g}"
        common = [*ENGINE, "--arrival-speedup", f"{s:g}"]
        out[f"agg-rr-{tag}"] = ["--trace", str(work / "dynamo-nocache.jsonl"), *AGG, *common]
        out[f"agg-rr-cache-{tag}"] = ["--trace", str(work / "dynamo.jsonl"), *AGG, *common]
        out[f"disagg-kv-{tag}"] = ["--trace", str(work / "dynamo.jsonl"), *DISAGG, *common]
        # what-ifs: prefill workers twice as fast; 8x larger KV pools (argparse: last flag wins)
        dis = out[f"disagg-kv-{tag}"]
        out[f"disagg-kv-{tag}-fastprefill"] = [*dis, "--step-time-scale", "0.5,0.5,1,1"]
        out[f"disagg-kv-{tag}-bigcache"] = [*dis, "--num-blocks", "2097152"]
    return out


def cmd_run(a: argparse.Namespace) -> None:
    work = Path(a.work)
    for name, args in runs(work, a.speedup).items():
        if a.only:
            if not any(name.endswith(o) for o in a.only):
                continue
        elif name.endswith(("-fastprefill", "-bigcache", "-onebig")) or (
                name.startswith("rf-") != a.roofline):
            continue
        out = work / "runs" / name
        cmd = [_baton(), "sim", *args, "--out", str(out)]
        print("$", shlex.join(cmd), flush=True)
        started = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - started
        (out / "stdout.txt").write_text(res.stdout)
        (out / "stderr.txt").write_text(res.stderr + f"\nwall_s {wall:.1f}\n")
        print(res.stderr.strip(), f"\n[{name}: {wall:.0f} s wall]", flush=True)


# ------------------------------------------------------------------ report
def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["summary"]


def result_rows(agg: dict, dis: dict) -> list[str]:
    """NVIDIA and simulated results side by side, with disagg/agg ratios."""
    rows = ["| metric | NVIDIA agg+RR | NVIDIA disagg+KV | NVIDIA ratio "
            "| sim agg+RR | sim disagg+KV | sim ratio |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    na, nd = NVIDIA["agg"], NVIDIA["disagg"]
    for label, key, skey in (
        ("request throughput (req/s)", "req_s", "request_throughput"),
        ("output token throughput (tok/s)", "out_tok_s", "output_token_throughput"),
        ("total token throughput (tok/s)", "tot_tok_s", "total_token_throughput"),
    ):
        rows.append(_row(label, na[key], nd[key], agg[skey], dis[skey]))
    quantiles = (("avg", "mean"), ("p50", "median"), ("p99", "p99"))
    for label, key, skey in (
        ("TTFT", "ttft", "ttft_ms"), ("TPOT = per-request ITL", "tpot", "tpot_ms"),
        ("E2E", "e2e", "e2e_ms"),
    ):
        for i, (q, name) in enumerate(quantiles):
            rows.append(_row(f"{label} {name} (ms)", na[key][i], nd[key][i],
                             agg[skey][q], dis[skey][q]))
    for q, name in quantiles:
        rows.append(_row(f"ITL pooled over gaps {name} (ms)", None, None,
                         agg["itl_ms"][q], dis["itl_ms"][q]))
    return rows


def error_rows(agg: dict, dis: dict, scale: float) -> list[str]:
    """Each deployment's simulated result in the trace's time (latencies x ``scale``, rates /
    ``scale``: a run at arrival speedup ``scale`` read as hardware ``scale`` times slower)
    against NVIDIA's, with the simulator's error (simulated / published - 1)."""
    rows = ["| metric | NVIDIA agg | sim agg | error | NVIDIA disagg | sim disagg | error "
            "| NVIDIA ratio | sim ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    na, nd = NVIDIA["agg"], NVIDIA["disagg"]

    def f(x: float) -> str:
        return f"{x:,.2f}" if abs(x) < 100 else f"{x:,.0f}"

    def add(label: str, a: float, d: float, sa: float, sd: float) -> None:
        rows.append(f"| {label} | {f(a)} | {f(sa)} | {sa / a - 1:+.0%} | {f(d)} | {f(sd)} | "
                    f"{sd / d - 1:+.0%} | {d / a:.3g} | {sd / sa:.3g} |")

    for label, key, skey in (("request throughput (req/s)", "req_s", "request_throughput"),
                             ("total token throughput (tok/s)", "tot_tok_s",
                              "total_token_throughput")):
        add(label, na[key], nd[key], agg[skey] / scale, dis[skey] / scale)
    for label, key, skey in (("TTFT", "ttft", "ttft_ms"), ("TPOT", "tpot", "tpot_ms"),
                             ("E2E", "e2e", "e2e_ms")):
        for i, (q, name) in enumerate((("avg", "mean"), ("p50", "median"), ("p99", "p99"))):
            add(f"{label} {name} (ms)", na[key][i], nd[key][i], agg[skey][q] * scale,
                dis[skey][q] * scale)
    return rows


def _row(label: str, na: float | None, nd: float | None, sa: float, sd: float) -> str:
    def f(x: float | None) -> str:
        if x is None:
            return "–"
        return f"{x:,.2f}" if abs(x) < 100 else f"{x:,.0f}"

    nr = f"{nd / na:.3g}" if na else "–"
    return f"| {label} | {f(na)} | {f(nd)} | {nr} | {f(sa)} | {f(sd)} | {sd / sa:.3g} |"


def cmd_report(a: argparse.Namespace) -> None:
    work = Path(a.work)
    text = []
    for s in a.speedup:
        agg_name = f"{a.agg}-x{s:g}"
        dis_name = f"disagg-kv-x{s:g}" + (f"-{a.what_if}" if a.what_if else "")
        if a.roofline:
            agg_name, dis_name = f"rf-agg-x{s:g}", f"rf-disagg-x{s:g}"
        agg, dis = _summary(work / "runs" / agg_name), _summary(work / "runs" / dis_name)
        text += [f"### arrival speedup {s:g} ({agg_name} vs {dis_name})", "",
                 *result_rows(agg, dis), ""]
        if a.errors:
            text += [f"In the trace's time (x {s:g}), against NVIDIA:", "",
                     *error_rows(agg, dis, s), ""]
    out = "\n".join(text)
    (work / "results.md").write_text(out)
    print(out)
    if a.plot:
        subprocess.run([_baton(), "bench", "compare", *_labelled(work, a.plot_runs),
                        "--plot", a.plot], check=True)


def _labelled(work: Path, specs: list[str]) -> list[str]:
    """``RUN=LABEL`` -> a link ``work/plot/LABEL`` to the run (compare names runs by folder)."""
    out = []
    for spec in specs:
        run, _, label = spec.partition("=")
        link = work / "plot" / (label or run)
        link.parent.mkdir(exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(work / "runs" / run)
        out.append(str(link))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/seed002")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("traces")
    t.add_argument("--source", required=True,
                   help="the Mooncake conversation_trace.jsonl to synthesize from")
    t.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--speedup", type=float, nargs="+", default=[1.0])
    r.add_argument("--only", nargs="*",
                   help="run names ending so (agg-rr-x2.5, x2.5-fastprefill, ...); default: "
                        "agg-rr, agg-rr-cache and disagg-kv, no what-ifs")
    r.add_argument("--roofline", action="store_true",
                   help="run the deployment files of examples/seed-002 instead (rf-agg, "
                        "rf-disagg; the -onebig variants with --only)")
    rep = sub.add_parser("report")
    rep.add_argument("--speedup", type=float, nargs="+", default=[1.0])
    rep.add_argument("--agg", default="agg-rr", help="agg-rr (no prefix reuse) or agg-rr-cache")
    rep.add_argument("--roofline", action="store_true",
                     help="compare rf-agg with rf-disagg (the deployment files)")
    rep.add_argument("--errors", action="store_true",
                     help="also each deployment against NVIDIA's, in the trace's time, with "
                          "the simulator's error")
    rep.add_argument("--what-if", default=None, choices=["fastprefill", "bigcache"],
                     help="compare with this what-if disagg run")
    rep.add_argument("--plot", default=None, help="PNG for the overlaid CDFs")
    rep.add_argument("--plot-runs", nargs="*", default=[], metavar="RUN[=LABEL]")
    a = p.parse_args()
    {"traces": cmd_traces, "run": cmd_run, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
