"""Timing models: Dynamo's polynomial, profile interpolation, profile validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from baton.engine.timing import (
    PolynomialTiming,
    ProfileTiming,
    TimingModel,
    _PhaseTiming,
    sleep_seconds,
)

PROFILE: dict[str, Any] = {
    "prefill": {"tokens": [100, 1000], "ms": [10, 50]},
    "decode": {"kv_usage": [0.2, 0.5, 0.8], "ms": [6, 10, 16]},
}


def test_polynomial_prefill_is_zero_without_new_tokens() -> None:
    assert PolynomialTiming().step_ms(0, 0, 0, 1000) == 0.0


def test_polynomial_prefill_at_1000_tokens() -> None:
    expected = 4.209989e-07 * 1e6 + 1.518344e-02 * 1000 + 16.50142
    assert PolynomialTiming().step_ms(1000, 0, 0, 1000) == pytest.approx(expected)
    assert expected == pytest.approx(32.1058589)


@pytest.mark.parametrize(
    ("in_use", "total", "expected"),
    [(0, 1000, 5.74), (500, 1000, 26.31), (1000, 1000, 34.01), (0, 0, 34.01)],
)
def test_polynomial_decode_follows_kv_usage(in_use: int, total: int, expected: float) -> None:
    assert PolynomialTiming().step_ms(0, 3, in_use, total) == pytest.approx(expected)


def test_polynomial_decode_is_clamped_to_one_millisecond() -> None:
    assert PolynomialTiming(decode_b0=-10.0).step_ms(0, 1, 0, 1000) == 1.0


def test_polynomial_step_is_prefill_plus_decode() -> None:
    model: TimingModel = PolynomialTiming()
    assert model.step_ms(1000, 2, 500, 1000) == pytest.approx(32.1058589 + 26.31)


@pytest.mark.parametrize(
    "model", [PolynomialTiming(), PolynomialTiming(prefill_a2=1e-3, prefill_a0=-5.0,
                                                   decode_b0=-3.0, min_decode_ms=0.0)])
def test_polynomial_step_ms_is_exactly_prefill_ms_plus_decode_ms(model: PolynomialTiming) -> None:
    for tokens in (0, 1, 17, 4096, 100_000):
        for decoding in (0, 1, 8):
            for in_use, total in ((0, 100), (37, 100), (100, 100), (5, 0)):
                inlined = model.step_ms(tokens, decoding, in_use, total)
                phases = _PhaseTiming.step_ms(model, tokens, decoding, in_use, total)
                assert repr(inlined) == repr(phases)


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [(0, 0.0), (100, 10.0), (550, 30.0), (1000, 50.0), (2000, 50 + 40 / 900 * 1000), (10, 6.0)],
)
def test_profile_prefill_interpolates_and_extrapolates(tokens: int, expected: float) -> None:
    assert ProfileTiming.from_dict(PROFILE).step_ms(tokens, 0, 0, 100) == pytest.approx(expected)


def test_profile_prefill_extrapolation_never_goes_below_zero() -> None:
    steep = {**PROFILE, "prefill": {"tokens": [100, 200], "ms": [1, 100]}}
    assert ProfileTiming.from_dict(steep).prefill_ms(50) == 0.0


@pytest.mark.parametrize(
    ("in_use", "expected"), [(0, 6.0), (20, 6.0), (35, 8.0), (65, 13.0), (80, 16.0), (100, 16.0)]
)
def test_profile_decode_interpolates_and_clamps(in_use: int, expected: float) -> None:
    assert ProfileTiming.from_dict(PROFILE).step_ms(0, 1, in_use, 100) == pytest.approx(expected)


def test_profile_loads_from_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(PROFILE))
    assert ProfileTiming.from_file(path) == ProfileTiming.from_dict(PROFILE)


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ({"decode": PROFILE["decode"]}, "'prefill'"),
        ({**PROFILE, "decode": [1, 2]}, "'decode'"),
        ({**PROFILE, "prefill": {"tokens": [1, 2]}}, "prefill.ms"),
        ({**PROFILE, "prefill": {"tokens": [1, "x"], "ms": [1, 2]}}, "prefill.tokens"),
        ({**PROFILE, "prefill": {"tokens": [1, True], "ms": [1, 2]}}, "prefill.tokens"),
        ({**PROFILE, "prefill": {"tokens": [1, 2, 3], "ms": [1, 2]}}, "differ in length"),
        ({**PROFILE, "prefill": {"tokens": [5], "ms": [1]}}, "at least 2 points"),
        ({**PROFILE, "prefill": {"tokens": [5, 5], "ms": [1, 2]}}, "strictly increasing"),
        ({**PROFILE, "prefill": {"tokens": [1, 2], "ms": [1, -2]}}, ">= 0"),
        ({**PROFILE, "decode": {"kv_usage": [0.5, 1.5], "ms": [1, 2]}}, r"\[0, 1\]"),
    ],
)
def test_bad_profiles_are_rejected_with_a_clear_error(profile: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProfileTiming.from_dict(profile)


def test_a_profile_file_that_is_not_json_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ProfileTiming.from_file(path)


def test_sleep_seconds_divides_by_the_speedup_ratio() -> None:
    assert sleep_seconds(100.0, 2.0) == pytest.approx(0.05)
    assert sleep_seconds(100.0, 1.0) == pytest.approx(0.1)


def test_a_speedup_ratio_of_zero_means_no_delay() -> None:
    assert sleep_seconds(100.0, 0) == 0.0
    with pytest.raises(ValueError, match="speedup_ratio"):
        sleep_seconds(100.0, -1.0)
