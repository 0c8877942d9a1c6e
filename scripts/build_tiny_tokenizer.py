"""Regenerate the packaged ``baton-tiny`` model folder (tokenizer plus tiny Llama config).

Trains a byte-level BPE tokenizer on ``scripts/tiny_corpus.txt`` plus deterministic synthetic
text, and writes ``tokenizer.json``, ``tokenizer_config.json``, ``config.json`` and
``generation_config.json`` into ``baton/preprocess/models/baton-tiny/``. The output is
byte-identical across runs: training is single-threaded, the synthetic text comes from a seeded
RNG, and JSON is written with a fixed key order.

Usage: ``python scripts/build_tiny_tokenizer.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

# Single-threaded training keeps merge order deterministic; set before tokenizers loads rayon.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "tiny_corpus.txt"
OUT = ROOT / "baton" / "preprocess" / "models" / "baton-tiny"

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
EOS_TOKEN = "<|im_end|>"
CONTEXT_LENGTH = 32768
SEED = 20240601

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SYLLABLE_TEXT = (
    "ba be bi bo bu ca ce ci co cu da de di do du fa fe fi fo ga ge gi go ha he hi ho ka ke "
    "ki ko la le li lo lu ma me mi mo mu na ne ni no nu pa pe pi po ra re ri ro ru sa se si "
    "so su ta te ti to tu va ve vi vo wa we za zo str tion ing ed er ly ment ness able ous "
    "ive al ist th sh ch qu pre con pro ex in un dis re over under inter trans"
)
_SYLLABLES = tuple(_SYLLABLE_TEXT.split())


def synthetic_lines(words: list[str], rng: random.Random) -> list[str]:
    """Deterministic filler: reshuffled corpus words, pseudo-words and numbers."""
    lines = []
    for _ in range(3000):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(6, 16))))
    for _ in range(3000):
        pseudo = (
            "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(8)
        )
        lines.append(" ".join(pseudo).capitalize() + ".")
    for _ in range(1500):
        a, b = rng.randint(0, 99999), rng.randint(0, 999)
        lines.append(f"{a} + {b} = {a + b}; {a}.{b:03d} x {rng.randint(1, 64)}")
    return lines


def training_text() -> list[str]:
    corpus = CORPUS.read_text(encoding="utf-8")
    rng = random.Random(SEED)
    words = corpus.split()
    return corpus.splitlines() + synthetic_lines(words, rng)


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    return tok


def tokenizer_config() -> dict:
    added = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": CONTEXT_LENGTH,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": SPECIAL_TOKENS[0],
    }


def model_config(vocab_size: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "max_position_embeddings": CONTEXT_LENGTH,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "pad_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "use_cache": True,
    }


def generation_config() -> dict:
    return {"eos_token_id": [SPECIAL_TOKENS.index(EOS_TOKEN), 0], "pad_token_id": 2}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    (out / "tokenizer.json").write_text(tok.to_str(pretty=False) + "\n", encoding="utf-8")
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    write_json(out / "tokenizer_config.json", tokenizer_config())
    write_json(out / "config.json", model_config(vocab_size))
    write_json(out / "generation_config.json", generation_config())
    return vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    args = parser.parse_args()
    vocab_size = build(args.out)
    print(f"wrote {args.out} (vocab_size={vocab_size})")


if __name__ == "__main__":
    main()
