"""Model cards: what the serving stack needs to know about a model, read from its folder.

A model folder uses the Hugging Face layout: ``tokenizer.json`` (required),
``tokenizer_config.json``, ``config.json``, ``generation_config.json`` and optionally
``chat_template.jinja``. This module owns finding that folder (``resolve_model``) and reading
it into a frozen ``ModelCard``. It never downloads anything and never builds a tokenizer beyond
the one lookup needed to turn ``eos_token`` into an id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RawTokenizer

BUILTIN_MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_CONTEXT_LENGTH = 4096
# tokenizer_config's model_max_length is often a placeholder (HF writes int(1e30)); anything
# above this is treated as "unknown" rather than as a real context length.
_MAX_SANE_CONTEXT = 1 << 24
_DTYPE_BYTES = {
    "float64": 8,
    "double": 8,
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}
_DEFAULT_DTYPE_BYTES = 2


class ModelNotFoundError(LookupError):
    """No usable model folder for ``spec``; ``reason`` says what was missing."""

    def __init__(self, spec: str, reason: str) -> None:
        super().__init__(f"model {spec!r} not found: {reason}")
        self.spec = spec
        self.reason = reason


def builtin_models() -> list[str]:
    """Names of the model folders shipped inside the package (e.g. ``baton-tiny``)."""
    return sorted(p.name for p in BUILTIN_MODELS_DIR.iterdir() if p.is_dir())


def models_dir(cache_dir: str | Path | None = None) -> Path:
    """Where prepared models live: ``CACHE_DIR/models``, by default ``~/.cache/baton/models``
    (the CLI's ``--cache-dir``, from ``$BATON_CACHE_DIR``, moves it).

    The transformers engine builds or converts models into it (``baton.engine.hf.models``).
    """
    base = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "baton"
    return base / "models"


def resolve_model(spec: str, cache_dir: str | Path | None = None) -> Path:
    """Map a model name or a filesystem path to a model folder holding tokenizer.json.

    Names are looked up among the built-in models, then among the prepared models in
    ``models_dir(cache_dir)``; both win over a same-named relative path. Raises
    ``ModelNotFoundError``.
    """
    folder = _named_model(spec, models_dir(cache_dir)) or Path(spec).expanduser()
    if not folder.is_dir():
        known = ", ".join(builtin_models())
        raise ModelNotFoundError(
            spec, f"not a built-in model ({known}), a prepared model in "
            f"{models_dir(cache_dir)} nor a directory",
        )
    if not (folder / "tokenizer.json").is_file():
        raise ModelNotFoundError(spec, f"{folder} has no tokenizer.json")
    return folder


def _named_model(spec: str, prepared_dir: Path) -> Path | None:
    if spec in builtin_models():
        return BUILTIN_MODELS_DIR / spec
    if spec and "/" not in spec and spec not in (".", ".."):
        prepared = prepared_dir / spec
        if prepared.is_dir():
            return prepared
    return None


@dataclass(frozen=True)
class ModelCard:
    """Static facts about one model, read once at startup."""

    name: str
    path: Path
    context_length: int
    eos_token_ids: tuple[int, ...]
    eos_token: str | None
    bos_token: str | None
    chat_template: str | None
    kv_bytes_per_token: int  # 0 when config.json does not describe the attention layout
    vocab_size: int  # the tokenizer's, added tokens included

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @classmethod
    def load(
        cls, path: str | Path, name: str | None = None, *, cache_dir: str | Path | None = None
    ) -> ModelCard:
        """Read a model folder (or a built-in or prepared model's name) into a card."""
        folder = resolve_model(str(path), cache_dir)
        config = _read_json(folder / "config.json")
        tok_config = _read_json(folder / "tokenizer_config.json")
        gen_config = _read_json(folder / "generation_config.json")
        raw = RawTokenizer.from_file(str(folder / "tokenizer.json"))
        eos_token = _token_content(tok_config.get("eos_token"))
        return cls(
            name=name or folder.name,
            path=folder,
            context_length=_context_length(config, tok_config),
            eos_token_ids=_eos_token_ids(raw, eos_token, gen_config, config),
            eos_token=eos_token,
            bos_token=_token_content(tok_config.get("bos_token")),
            chat_template=_chat_template(folder, tok_config),
            kv_bytes_per_token=_kv_bytes_per_token(config),
            vocab_size=raw.get_vocab_size(with_added_tokens=True),
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _token_content(token: Any) -> str | None:
    """Special tokens are stored either as a string or as an AddedToken dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _sane_length(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_SANE_CONTEXT:
        return value
    return None


def _context_length(config: dict[str, Any], tok_config: dict[str, Any]) -> int:
    lengths = [
        n
        for n in (
            _sane_length(config.get("max_position_embeddings")),
            _sane_length(tok_config.get("model_max_length")),
        )
        if n is not None
    ]
    return min(lengths) if lengths else DEFAULT_CONTEXT_LENGTH


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _eos_token_ids(
    raw: RawTokenizer, eos_token: str | None, gen_config: dict[str, Any], config: dict[str, Any]
) -> tuple[int, ...]:
    """Union of every place a model declares end-of-sequence, in first-seen order."""
    ids = _as_id_list(gen_config.get("eos_token_id")) + _as_id_list(config.get("eos_token_id"))
    if eos_token is not None and (eos_id := raw.token_to_id(eos_token)) is not None:
        ids.append(eos_id)
    return tuple(dict.fromkeys(ids))


def _chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    """A ``chat_template.jinja`` file wins over the tokenizer_config entry, as in transformers."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _kv_bytes_per_token(config: dict[str, Any]) -> int:
    """layers x (K and V) x kv_heads x head_dim x dtype bytes; 0 if the layout is unknown."""
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    if not isinstance(layers, int) or not isinstance(heads, int) or heads <= 0:
        return 0
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (hidden // heads if isinstance(hidden, int) else 0)
    dtype = config.get("torch_dtype") or config.get("dtype")
    dtype_bytes = _DTYPE_BYTES.get(str(dtype), _DEFAULT_DTYPE_BYTES)
    return layers * 2 * kv_heads * head_dim * dtype_bytes
