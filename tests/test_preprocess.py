"""Model cards, the tokenizer and chat templates, on baton-tiny and a word-level model folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers

from baton.preprocess import (
    ChatTemplateError,
    ModelCard,
    ModelNotFoundError,
    Tokenizer,
    resolve_model,
)
from baton.preprocess import tokenizer as tokenizer_module

WORD_SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
WORD_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def write_word_level_model(folder: Path, **overrides: Any) -> Path:
    """The layout another tool produces: WordLevel vocab w0..w8191 plus six specials.

    ``overrides`` replace whole files: ``config=``, ``tokenizer_config=``,
    ``generation_config=`` (``None`` means "do not write it").
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {f"w{i}": i for i in range(8192)}
    vocab.update({tok: 8192 + i for i, tok in enumerate(WORD_SPECIALS)})
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="\u0000\u0000", cleanup=False)  # never a prefix
    raw.add_special_tokens(WORD_SPECIALS)
    raw.save(str(folder / "tokenizer.json"))
    files = {
        "tokenizer_config": {
            "chat_template": WORD_TEMPLATE,
            "eos_token": "</s>",
            "bos_token": "<s>",
            "model_max_length": 131072,
        },
        "config": {
            "max_position_embeddings": 131072,
            "num_hidden_layers": 4,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "hidden_size": 1024,
            "head_dim": 64,
            "torch_dtype": "float16",
        },
        "generation_config": None,
    }
    files.update(overrides)
    for stem, data in files.items():
        if data is not None:
            (folder / f"{stem}.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_model("baton-tiny")


@pytest.fixture
def word_folder(tmp_path: Path) -> Path:
    return write_word_level_model(tmp_path / "word-model")


# ---------------------------------------------------------------- model cards


def test_builtin_name_resolves_to_the_packaged_folder() -> None:
    folder = resolve_model("baton-tiny")
    assert folder.name == "baton-tiny"
    assert (folder / "tokenizer.json").stat().st_size < 1_000_000


def test_baton_tiny_card_has_chatml_eos_and_tiny_llama_kv_size() -> None:
    card = ModelCard.load("baton-tiny")
    assert card.name == "baton-tiny"
    assert card.context_length == 32768
    assert card.eos_token_ids == (2, 0)
    assert card.eos_token == "<|im_end|>" and card.bos_token is None
    assert card.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers, K+V, kv heads, dim, fp32
    assert card.vocab_size == 4096
    config = json.loads((card.path / "config.json").read_text())
    assert config["vocab_size"] == card.vocab_size


def test_unknown_model_raises_model_not_found_with_the_spec() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no-such-model")
    assert info.value.spec == "no-such-model"
    assert "baton-tiny" in info.value.reason


def test_folder_without_tokenizer_json_raises_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no tokenizer.json"):
        ModelCard.load(tmp_path)


def test_word_level_folder_loads_its_lengths_tokens_and_kv_size(word_folder: Path) -> None:
    card = ModelCard.load(word_folder)
    assert card.name == "word-model"
    assert card.context_length == 131072
    assert card.eos_token_ids == (8194,)
    assert card.bos_token == "<s>"
    assert card.chat_template == WORD_TEMPLATE
    assert card.kv_bytes_per_token == 4 * 2 * 8 * 64 * 2
    assert card.vocab_size == 8192 + len(WORD_SPECIALS)


def test_card_name_can_be_overridden(word_folder: Path) -> None:
    assert ModelCard.load(word_folder, name="served-name").name == "served-name"


@pytest.mark.parametrize(
    ("max_positions", "model_max_length", "expected"),
    [
        (8192, 131072, 8192),
        (131072, 2048, 2048),
        (None, 1000000000000000019884624838656, 4096),  # HF's int(1e30) placeholder
        (None, 16384, 16384),
        (None, None, 4096),
    ],
)
def test_context_length_is_the_smaller_sane_declared_length(
    tmp_path: Path, max_positions: int | None, model_max_length: int | None, expected: int
) -> None:
    folder = write_word_level_model(
        tmp_path / "m",
        config={"max_position_embeddings": max_positions} if max_positions else None,
        tokenizer_config={"model_max_length": model_max_length} if model_max_length else None,
    )
    assert ModelCard.load(folder).context_length == expected


def test_eos_ids_are_the_union_of_all_declarations(tmp_path: Path) -> None:
    folder = write_word_level_model(
        tmp_path / "m",
        generation_config={"eos_token_id": [8194, 7]},
        config={"eos_token_id": 9},
    )
    assert ModelCard.load(folder).eos_token_ids == (8194, 7, 9)


def test_eos_token_may_be_an_added_token_dict(tmp_path: Path) -> None:
    folder = write_word_level_model(
        tmp_path / "m", tokenizer_config={"eos_token": {"content": "</s>", "special": True}}
    )
    assert ModelCard.load(folder).eos_token_ids == (8194,)


def test_chat_template_jinja_file_wins_over_tokenizer_config(word_folder: Path) -> None:
    (word_folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert ModelCard.load(word_folder).chat_template == "{{ messages[0]['content'] }}"


def test_named_chat_templates_pick_the_default_one(tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    folder = write_word_level_model(tmp_path / "m", tokenizer_config={"chat_template": named})
    assert ModelCard.load(folder).chat_template == "D"


def test_kv_size_defaults_head_dim_and_dtype_bytes(tmp_path: Path) -> None:
    config = {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512}
    folder = write_word_level_model(tmp_path / "m", config=config)
    assert ModelCard.load(folder).kv_bytes_per_token == 2 * 2 * 8 * 64 * 2


# ---------------------------------------------------------------- tokenizer


def test_special_tokens_have_fixed_ids(tiny: Tokenizer) -> None:
    ids = [tiny.raw.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert ids == [0, 1, 2]


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "café naïve résumé",
        "日本語のテキスト",
        "emoji 👋🏽 🇯🇵 🤖",
        "x = f(1) + 2\n",
    ],
)
def test_encode_then_decode_round_trips_text(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tiny.decode(ids) == text


def test_decode_skips_special_tokens_unless_asked(tiny: Tokenizer) -> None:
    ids = [1, *tiny.encode("hi"), 2]
    assert tiny.decode(ids) == "hi"
    assert tiny.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def test_chat_template_renders_chatml_with_a_generation_prompt(tiny: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tiny.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not tiny.apply_chat_template(messages, add_generation_prompt=False).endswith(
        "assistant\n"
    )


def test_chat_prompt_encodes_each_special_token_once(tiny: Tokenizer) -> None:
    ids = tiny.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1


def test_text_content_parts_are_flattened_before_rendering(tiny: Tokenizer) -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    prompt = tiny.apply_chat_template([{"role": "user", "content": parts}])
    assert prompt.startswith("<|im_start|>user\none\ntwo<|im_end|>\n")


def test_non_text_content_part_raises_chat_template_error(tiny: Tokenizer) -> None:
    parts = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(ChatTemplateError, match="image_url"):
        tiny.apply_chat_template([{"role": "user", "content": parts}])


def test_missing_content_raises_chat_template_error(tiny: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError):
        tiny.apply_chat_template([{"role": "user", "content": None}])


def make_templated(tmp_path: Path, template: str) -> Tokenizer:
    folder = write_word_level_model(tmp_path / "m", tokenizer_config={"chat_template": template})
    return Tokenizer.from_model(str(folder))


def test_raise_exception_in_a_template_becomes_chat_template_error(tmp_path: Path) -> None:
    tok = make_templated(tmp_path, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "w1"}])


def test_template_syntax_error_is_reported_when_the_tokenizer_is_built(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        make_templated(tmp_path, "{% for m in messages %}")


def test_template_sees_tools_kwargs_tojson_strftime_and_trimmed_blocks(tmp_path: Path) -> None:
    template = (
        "{% if tools %}{{ tools | tojson }}{% endif %}\n"
        "{% if enable_thinking %}think{% endif %}\n"
        "{{ strftime_now('%Y') | length }}"
    )
    tok = make_templated(tmp_path, template)
    tools = [{"name": "café"}]
    assert tok.apply_chat_template([], tools=tools, enable_thinking=True) == (
        '[{"name": "café"}]think4'
    )


def test_template_is_compiled_once_per_tokenizer(
    tiny: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(source: str) -> None:
        raise AssertionError("template recompiled on the request path")

    monkeypatch.setattr(tokenizer_module, "compile_chat_template", refuse)
    for _ in range(3):
        tiny.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_sandbox_blocks_unsafe_attribute_access(tmp_path: Path) -> None:
    tok = make_templated(tmp_path, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([])


def test_card_without_template_joins_role_and_content_lines(tmp_path: Path) -> None:
    folder = write_word_level_model(tmp_path / "m", tokenizer_config={})
    tok = Tokenizer.from_model(str(folder))
    assert not tok.has_chat_template
    messages = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2"}]
    assert tok.apply_chat_template(messages) == "system: w1\nuser: w2\nassistant:"


def test_word_level_tokenizer_encodes_three_words(word_folder: Path) -> None:
    tok = Tokenizer.from_model(str(word_folder))
    assert tok.encode("w1 w2 w3") == [1, 2, 3]
    assert tok.decode([1, 2, 3]) == "w1 w2 w3"


def test_word_level_chat_prompt_uses_its_own_special_tokens(word_folder: Path) -> None:
    tok = Tokenizer.from_model(str(word_folder))
    prompt = tok.apply_chat_template([{"role": "user", "content": "w5 w6"}])
    assert prompt == "<|user|> w5 w6 <|assistant|>"
    assert tok.encode_chat([{"role": "user", "content": "w5 w6"}]) == [8196, 5, 6, 8197]


def test_build_script_reproduces_the_packaged_model_byte_for_byte(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "build_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("build_tiny_tokenizer", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(tmp_path)
    packaged = resolve_model("baton-tiny")
    built = sorted(p.name for p in tmp_path.glob("*.json"))
    assert built == sorted(p.name for p in packaged.glob("*.json"))
    for name in built:
        assert (tmp_path / name).read_bytes() == (packaged / name).read_bytes(), name
