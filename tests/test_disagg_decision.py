"""Conditional disaggregation decisions for a table of prompt lengths, caches and pool loads."""

from __future__ import annotations

import pytest

from baton.config import DisaggConfig
from baton.protocol import LoadMetrics
from baton.router.disagg import decide


def load(tokens: int, waiting: int = 0) -> LoadMetrics:
    return LoadMetrics(worker_id=0, active_blocks=0, total_blocks=100, num_running=0,
                       num_waiting=waiting, active_prefill_tokens=tokens)


IDLE = [load(0)]
BUSY = [load(9000), load(100, waiting=5)]


@pytest.mark.parametrize(
    ("policy", "prompt", "cached", "loads", "remote", "reason"),
    [
        ("always", 10, 0, BUSY, True, "remote"),
        ("always", 100_000, 99_999, IDLE, True, "remote"),
        # isl: eff_isl < 2048 and eff_isl / prompt < 0.7
        ("isl", 1000, 0, IDLE, True, "remote"),            # short but nothing cached: ratio 1.0
        ("isl", 1000, 400, IDLE, False, "short_prompt"),   # eff 600, ratio 0.6
        ("isl", 1000, 300, IDLE, True, "remote"),          # ratio exactly 0.7 is not below
        ("isl", 10_000, 8_000, IDLE, False, "short_prompt"),  # eff 2000, ratio 0.2
        ("isl", 10_000, 7_952, IDLE, True, "remote"),      # eff 2048 is not below 2048
        ("isl", 100_000, 99_000, BUSY, False, "short_prompt"),
        ("isl", 3000, 0, BUSY, True, "remote"),            # isl ignores load
        # load: every prefill worker over 8192 active tokens or 4 waiting
        ("load", 3000, 0, BUSY, False, "prefill_busy"),
        ("load", 3000, 0, [*BUSY, load(0)], True, "remote"),  # one idle worker: not busy
        ("load", 3000, 0, [None], True, "remote"),            # no signal yet: not busy
        ("load", 3000, 0, [], True, "remote"),
        ("load", 1000, 600, IDLE, True, "remote"),            # load ignores the cache
        # isl_or_load
        ("isl_or_load", 1000, 600, IDLE, False, "short_prompt"),
        ("isl_or_load", 3000, 0, BUSY, False, "prefill_busy"),
        ("isl_or_load", 3000, 0, IDLE, True, "remote"),
    ],
)
def test_decisions(
    policy: str, prompt: int, cached: int, loads: list, remote: bool, reason: str
) -> None:
    d = decide(DisaggConfig(policy=policy), prompt_tokens=prompt, cached_tokens=cached,  # type: ignore[arg-type]
               prefill_loads=loads)
    assert (d.remote, d.reason, d.eff_isl) == (remote, reason, max(0, prompt - cached))


def test_thresholds_are_configurable() -> None:
    config = DisaggConfig(policy="isl", max_local_prefill_tokens=100, max_local_prefill_ratio=1.0)
    assert not decide(config, prompt_tokens=100, cached_tokens=1, prefill_loads=IDLE).remote
    assert decide(config, prompt_tokens=101, cached_tokens=1, prefill_loads=IDLE).remote


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_local_prefill_ratio"):
        DisaggConfig(max_local_prefill_ratio=1.5)
    with pytest.raises(ValueError, match="disagg_policy"):
        DisaggConfig(policy="sometimes")  # type: ignore[arg-type]
