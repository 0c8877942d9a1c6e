"""IncrementalDetokenizer: streamed chunks add up to the full decode, characters never split."""

from __future__ import annotations

import random
import time

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers

from baton.preprocess import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox.",
    "café naïve résumé jalapeño Straße",
    "日本語のテキストと中文和한국어",
    "emoji 👋🏽 family 👨‍👩‍👧 flags 🇯🇵🇫🇷 🤖✨",
    "def f(x):\n    return x ** 2  # ∑ ≈ π\n",
]


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_model("baton-tiny")


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A WordLevel vocabulary with a WordPiece decoder whose prefix never matches."""
    folder = tmp_path_factory.mktemp("word-model")
    vocab = {f"w{i}": i for i in range(100)}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="\u0000\u0000", cleanup=False)
    raw.add_special_tokens(["</s>"])
    raw.save(str(folder / "tokenizer.json"))
    return Tokenizer.from_model(str(folder))


def byte_token_ids(tok: Tokenizer, data: bytes) -> list[int]:
    """One token per byte, using the GPT-2 byte-to-unicode alphabet of ByteLevel."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(sorted(set(range(256)) - set(printable)))})
    return [tok.raw.token_to_id(table[b]) for b in data]


def stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Feed ids in random-sized groups (engines may emit several tokens per step)."""
    chunks, at = [], 0
    while at < len(ids):
        size = 1 if rng.random() < 0.7 else rng.randint(2, 4)
        chunks.append(detok.step(ids[at : at + size]))
        at += size
    chunks.append(detok.flush())
    return chunks


def test_character_split_across_byte_tokens_is_emitted_once_complete(tiny: Tokenizer) -> None:
    ids = byte_token_ids(tiny, "a日b".encode())
    assert len(ids) == 5
    detok = IncrementalDetokenizer(tiny)
    assert [detok.step([i]) for i in ids] == ["a", "", "", "日", "b"]


def test_emoji_split_across_tokens_never_yields_a_replacement_char(tiny: Tokenizer) -> None:
    ids = byte_token_ids(tiny, "👋🏽".encode())
    detok = IncrementalDetokenizer(tiny)
    chunks = [detok.step([i]) for i in ids]
    assert "".join(chunks) == "👋🏽" and all("\ufffd" not in c for c in chunks)


def test_stream_ending_inside_a_character_flushes_a_replacement_char(tiny: Tokenizer) -> None:
    ids = byte_token_ids(tiny, "ok日".encode())[:-1]
    detok = IncrementalDetokenizer(tiny)
    assert "".join(detok.step([i]) for i in ids) == "ok"
    assert detok.flush() == tiny.decode(ids)[2:] == "\ufffd"
    assert detok.flush() == ""


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_matches_full_decode_for_real_text(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text) + byte_token_ids(tiny, text.encode())
    chunks = stream(IncrementalDetokenizer(tiny), ids, random.Random(0))
    assert "".join(chunks) == tiny.decode(ids)
    assert all("\ufffd" not in c for c in chunks)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_sequences_stream_to_their_full_decode(
    tiny: Tokenizer, skip_special_tokens: bool
) -> None:
    rng = random.Random(1234)
    for _ in range(1500):
        ids = [rng.randrange(tiny.vocab_size) for _ in range(rng.randint(1, 30))]
        detok = IncrementalDetokenizer(tiny, skip_special_tokens=skip_special_tokens)
        chunks = stream(detok, ids, rng)
        full = tiny.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(chunks) == full, ids
        if "\ufffd" not in full:
            assert all("\ufffd" not in c for c in chunks), ids


def test_random_generations_after_a_real_prompt_stream_only_the_new_text(tiny: Tokenizer) -> None:
    rng = random.Random(99)
    for n in range(500):
        prompt = tiny.encode_chat([{"role": "user", "content": TEXTS[n % len(TEXTS)]}])
        ids = [rng.randrange(tiny.vocab_size) for _ in range(rng.randint(1, 20))]
        chunks = stream(IncrementalDetokenizer(tiny, prompt_token_ids=prompt), ids, rng)
        base, full = tiny.decode(prompt), tiny.decode(prompt + ids)
        assert "".join(chunks) == full[len(base) :], (prompt, ids)


def test_prompt_ending_inside_a_character_does_not_leak_prompt_text(tiny: Tokenizer) -> None:
    head = byte_token_ids(tiny, "日".encode())
    prompt = tiny.encode("prompt ") + head[:1]
    detok = IncrementalDetokenizer(tiny, prompt_token_ids=prompt)
    assert detok.step(tiny.encode(" answer")) == " answer"


def test_word_level_tokens_stream_space_separated(words: Tokenizer) -> None:
    detok = IncrementalDetokenizer(words)
    assert [detok.step([i]) for i in words.encode("w1 w2 w3")] == ["w1", " w2", " w3"]


def test_word_level_continuation_after_a_prompt_starts_with_a_space(words: Tokenizer) -> None:
    detok = IncrementalDetokenizer(words, prompt_token_ids=words.encode("w7 w8"))
    assert detok.step([3]) + detok.step([4, 5]) == " w3 w4 w5"


def test_word_level_special_tokens_are_skipped_by_default(words: Tokenizer) -> None:
    eos = words.raw.token_to_id("</s>")
    detok = IncrementalDetokenizer(words)
    assert [detok.step([1]), detok.step([eos]), detok.flush()] == ["w1", "", ""]


def test_per_token_cost_is_a_few_microseconds(tiny: Tokenizer) -> None:
    ids = tiny.encode(" ".join(TEXTS) * 200)
    detok = IncrementalDetokenizer(tiny)
    start = time.perf_counter()
    for i in ids:
        detok.step([i])
    per_token_us = (time.perf_counter() - start) / len(ids) * 1e6
    print(f"IncrementalDetokenizer.step: {per_token_us:.2f} us/token over {len(ids)} tokens")
    # Measured ~1.5 us/token on a dev box; the bound leaves room for slow CI machines.
    assert per_token_us < 50
