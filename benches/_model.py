"""A tiny offline model folder shared by every stack under test.

WordLevel tokenizer over ``w0 .. w8191`` plus six specials, split on whitespace, so one
word is exactly one token and prompt lengths are exact. The decoder is a WordPiece
decoder whose continuation prefix never occurs, so decoded words are joined by spaces.
``config.json`` is llama-shaped (4 layers, 8 KV heads, head_dim 64, fp16): only the KV
geometry matters to a simulated engine.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
N_WORDS = 8192
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _tokenizer_json() -> dict:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for i in range(N_WORDS):
        vocab[f"w{i}"] = len(SPECIALS) + i
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, tok in enumerate(SPECIALS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "\u2407\u2407never\u2407\u2407", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }


def _config(vocab_size: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "torch_dtype": "float16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }


def build_model(folder: Path) -> Path:
    """Write the model files into ``folder`` (created if missing) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = len(SPECIALS) + N_WORDS
    files = {
        "tokenizer.json": _tokenizer_json(),
        "tokenizer_config.json": _tokenizer_config(),
        "config.json": _config(vocab_size),
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2},
    }
    for name, body in files.items():
        (folder / name).write_text(json.dumps(body, indent=1))
    return folder


def prompt_words(n: int, seed: int) -> str:
    """``n`` words of the vocabulary, varied by ``seed`` so prompts are not all identical."""
    return " ".join(f"w{(seed * 7919 + i * 31) % N_WORDS}" for i in range(n))
