"""StopChecker: hold-back, release and cut-off of streamed text around stop strings."""

from __future__ import annotations

import random

import pytest

from baton.preprocess import StopChecker


def feed_all(checker: StopChecker, chunks: list[str]) -> tuple[list[str], bool]:
    emitted, stopped = [], False
    for chunk in chunks:
        text, stopped = checker.feed(chunk)
        emitted.append(text)
    if not stopped:
        emitted.append(checker.flush())
    return emitted, stopped


def test_no_stop_strings_passes_text_through_unchanged() -> None:
    checker = StopChecker([])
    chunk = "anything STOP at all"
    text, stopped = checker.feed(chunk)
    assert text is chunk and not stopped
    assert checker.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    assert StopChecker(["", ""]).feed("abc") == ("abc", False)


def test_stop_inside_one_chunk_emits_only_the_text_before_it() -> None:
    checker = StopChecker(["STOP"])
    assert checker.feed("hello STOP world") == ("hello ", True)
    assert checker.matched == "STOP"


def test_stop_spanning_chunks_is_held_back_and_never_emitted() -> None:
    checker = StopChecker(["STOP"])
    assert checker.feed("ab ST") == ("ab ", False)
    assert checker.feed("O") == ("", False)
    assert checker.feed("P and more") == ("", True)
    assert checker.stopped


def test_held_text_is_released_once_it_cannot_start_a_stop() -> None:
    checker = StopChecker(["STOP"])
    assert checker.feed("ST") == ("", False)
    assert checker.feed("ART") == ("START", False)


def test_flush_returns_held_text_at_end_of_stream() -> None:
    checker = StopChecker(["STOP"])
    assert checker.feed("the end ST") == ("the end ", False)
    assert checker.flush() == "ST"
    assert checker.flush() == ""


def test_flush_after_stop_returns_nothing() -> None:
    checker = StopChecker(["STOP"])
    checker.feed("xSTOPy")
    assert checker.flush() == ""


def test_feed_after_stop_emits_nothing() -> None:
    checker = StopChecker(["STOP"])
    checker.feed("STOP")
    assert checker.feed("more text") == ("", True)


def test_hold_back_is_at_most_longest_stop_minus_one() -> None:
    checker = StopChecker(["abc"])
    assert checker.feed("xxab") == ("xx", False)
    assert checker.feed("x") == ("abx", False)


def test_earliest_match_wins_among_several_stop_strings() -> None:
    checker = StopChecker(["world", "lo w"])
    assert checker.feed("hello world") == ("hel", True)
    assert checker.matched == "lo w"


def test_shorter_stop_completing_first_cuts_before_a_longer_pending_one() -> None:
    checker = StopChecker(["abcdef", "cd"])
    assert checker.feed("xab") == ("x", False)
    assert checker.feed("cd") == ("ab", True)
    assert checker.matched == "cd"


def test_overlapping_prefix_of_a_self_similar_stop_is_found() -> None:
    checker = StopChecker(["aab"])
    emitted, stopped = feed_all(checker, ["a", "a", "a", "b", "zzz"])
    assert "".join(emitted) == "a" and stopped


def test_repeating_stop_string_matches_at_its_first_occurrence() -> None:
    checker = StopChecker(["abab"])
    assert checker.feed("aba") == ("", False)
    assert checker.feed("bab") == ("", True)


def reference(chunks: list[str], stops: list[str]) -> tuple[str, bool]:
    """Generation halts after the first chunk that completes a stop string."""
    text = ""
    for chunk in chunks:
        text += chunk
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[: min(hits)], True
    return text, False


def test_stop_completed_first_wins_over_an_earlier_starting_unfinished_one() -> None:
    checker = StopChecker(["cba", "b"])
    assert checker.feed("ac") == ("a", False)
    assert checker.feed("b") == ("c", True)
    assert checker.matched == "b"


@pytest.mark.parametrize("seed", range(20))
def test_random_chunkings_agree_with_a_whole_string_reference(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(2)]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        expected, expected_stop = reference(chunks, stops)

        checker = StopChecker(stops)
        emitted, stopped = feed_all(checker, chunks)

        assert "".join(emitted) == expected, (text, stops, chunks)
        assert stopped == expected_stop
