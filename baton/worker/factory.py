"""Builds engines and workers from their config sections."""

from __future__ import annotations

from pathlib import Path

from baton.checks import valid_model_name
from baton.config import WorkerConfig
from baton.engine.base import Engine
from baton.engine.mock import SimulatedEngine
from baton.preprocess import ModelCard, Tokenizer, resolve_model
from baton.protocol import ModelFiles
from baton.runtime import Runtime
from baton.runtime.net import Listener
from baton.runtime.peer_auth import PeerAuth
from baton.worker.worker import Worker


def build_engine(config: WorkerConfig, card: ModelCard, auth: PeerAuth | None = None) -> Engine:
    """The configured engine over the model in ``card.path``; its KV transfer asks for and
    proves ``auth``."""
    if config.engine.kind == "hf":
        from baton.engine.hf.engine import HfEngine  # imports torch: only when asked for

        return HfEngine(config.engine, card.path, kv_listener=kv_listener(config), auth=auth)
    if config.engine.kind == "vllm":
        from baton.engine.vllm.engine import VllmEngine  # imports vLLM: only when asked for

        return VllmEngine(config.engine, card.path, role=config.role,
                          kv_listener=kv_listener(config), auth=auth)
    return _simulated(config, card, auth)


def kv_listener(config: WorkerConfig) -> Listener:
    """The KV transfer server binds the worker's host and advertises its address."""
    return Listener(config.host, config.kv_port, config.advertise_host)


def _simulated(config: WorkerConfig, card: ModelCard, auth: PeerAuth | None) -> SimulatedEngine:
    """The simulated engine draws output tokens from the vocabulary minus special tokens and
    minus byte fragments that do not decode to text on their own (so its output is readable)."""
    raw = Tokenizer(card).raw
    special = set(raw.get_added_tokens_decoder())
    vocab = [
        t for t in range(card.vocab_size)
        if t not in special and "\ufffd" not in raw.decode([t], skip_special_tokens=False)
    ]
    return SimulatedEngine(config.engine, vocab=vocab, kv_bytes_per_token=card.kv_bytes_per_token,
                           kv_listener=kv_listener(config), auth=auth)


MODEL_FILE_SUFFIXES = (".json", ".jinja", ".txt", ".model")
MAX_MODEL_FILE_BYTES = 64 * 1024 * 1024


def read_model_files(folder: Path, name: str) -> ModelFiles:
    """The small files of a model folder (what a model card needs), read once."""
    files = {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES
        and p.stat().st_size <= MAX_MODEL_FILE_BYTES
    }
    return ModelFiles(name=name, files=files)


def model_folder(config: WorkerConfig) -> Path:
    """The model folder; the transformers and vLLM engines first build or convert their
    models (vLLM loads the folder Baton converts)."""
    if config.engine.kind in ("hf", "vllm"):
        from baton.engine.hf.models import prepare_model

        return prepare_model(config.model, config.cache_dir)
    return resolve_model(config.model, config.cache_dir)


def build_worker(config: WorkerConfig, runtime: Runtime, *, instance_id: int | None = None) -> Worker:
    folder = model_folder(config)
    card = ModelCard.load(folder, name=config.model_name)
    if not valid_model_name(card.name):
        raise ValueError(f"model_name: the model folder's name {card.name!r} is not a valid "
                         "model name; give one with --model-name")
    worker_id = instance_id if instance_id is not None else config.worker_id
    worker = Worker(config, runtime, lambda: build_engine(config, card, runtime.auth),
                    model_name=card.name,
                    instance_id=worker_id)
    worker.model_path = str(folder)
    worker.model_files = read_model_files(folder, card.name)
    return worker
