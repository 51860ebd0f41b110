"""Scoring and embedding over a Ray cluster (extra `[ray]`): Ray Data `map_batches` over an actor pool.

The stages hand in their actor classes (`scoring.run.ScoreActor`, `embedding.EmbedActor`), so this module
imports none of them. Each actor loads the model once and handles a batch of rows the way the local path does
(length-sorted batches for transformers, one `generate`/`embed` call for vLLM), so results equal the local
path's. Rows travel with their index and come back in any order; the driver puts them in place. Scoring results
stream back to the driver as batches finish, so the caller's checkpoint keeps every finished row.

`ray.init()` is called when Ray is not initialised yet: it joins the cluster named by RAY_ADDRESS, or starts
a local one on this machine. On a cluster with GPUs each actor takes one GPU; otherwise one CPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from deita_hub.errors import DeitaHubError, require

log = logging.getLogger(__name__)


def _ray():
    ray = require("ray", "ray", "Scoring and embedding on Ray")
    require("ray.data", "ray", "Scoring and embedding on Ray")
    if not ray.is_initialized():
        ray.init()
    return ray


def _actor_pool(ray, actors: int | None) -> tuple[Any, dict[str, float]]:
    """(compute strategy, resources per actor): one actor per GPU when the cluster has GPUs, else one CPU actor."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    size = actors or max(gpus, 1)
    resources = {"num_gpus": 1.0} if gpus else {"num_cpus": 1.0}
    if gpus and size > gpus:
        raise DeitaHubError(f"{size} Ray actors asked for, but the cluster has {gpus} GPU(s) (one per actor)")
    return ray.data.ActorPoolStrategy(size=size), resources


def _dataset(ray, conversations: Sequence[Any], rows: Sequence[int]):
    items = [{"row": int(i), "conversation": json.dumps(conversations[i], ensure_ascii=False)} for i in rows]
    return ray.data.from_items(items)


def with_metadata(rows: list[int], column: str, values: np.ndarray, metadata: dict) -> dict[str, np.ndarray]:
    """An actor's output batch: row ids, one value per row under `column`, and the backend's metadata."""
    # The backend's metadata rides on the first row of each batch (empty elsewhere), not on every row.
    meta = np.array([json.dumps(metadata)] + [""] * (len(rows) - 1), dtype=object)
    return {"row": np.asarray(rows, dtype=np.int64), column: values, "meta": meta}


def ray_score(
    conversations: Sequence[Any],
    rows: Sequence[int],
    config,
    *,
    actor: type,
    on_rows: Callable[[list[dict[str, Any]]], None],
    on_metadata: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Score `rows` of `conversations` on Ray; `on_rows(records)` receives results as batches finish.

    `actor(config)` loads a scorer once per actor; called with a batch it returns `with_metadata(rows, "record",
    JSON records, metadata)` (`deita_hub.scoring.run.ScoreActor`). Returns the backend metadata reported by the
    actors (also handed to `on_metadata` as soon as it arrives).
    """
    ray = _ray()
    compute, resources = _actor_pool(ray, config.ray_actors)
    dataset = _dataset(ray, conversations, rows).map_batches(
        actor,
        fn_constructor_kwargs={"config": config},
        batch_size=config.chunk_rows,
        batch_format="numpy",
        compute=compute,
        **resources,
    )
    metadata: dict[str, Any] | None = None
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        if metadata is None:
            metadata = next((json.loads(m) for m in batch["meta"] if m), None)
            if metadata is not None:
                metadata["ray"] = {"actors": compute.min_size, "resources_per_actor": resources}
                if on_metadata:
                    on_metadata(metadata)
        on_rows([json.loads(text) for text in batch["record"]])
    return metadata or {"ray": {"actors": compute.min_size, "resources_per_actor": resources}}


def ray_embed(conversations: Sequence[Any], config, *, actor: type) -> tuple[np.ndarray, dict[str, Any]]:
    """Embed every conversation on Ray: (float32 [n, dim] in input order, embedder metadata).

    `actor(config)` loads an embedder once per actor; called with a batch it returns `with_metadata(rows,
    "vector", float32 [rows, dim], metadata)` (`deita_hub.embedding.EmbedActor`).
    """
    ray = _ray()
    if not conversations:
        raise DeitaHubError("nothing to embed: the pool is empty")
    compute, resources = _actor_pool(ray, getattr(config, "ray_actors", None))
    dataset = _dataset(ray, conversations, range(len(conversations))).map_batches(
        actor,
        fn_constructor_kwargs={"config": config},
        batch_size=config.chunk_rows,
        batch_format="numpy",
        compute=compute,
        **resources,
    )
    matrix: np.ndarray | None = None
    filled = np.zeros(len(conversations), dtype=bool)
    metadata: dict[str, Any] | None = None
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        vectors = np.stack(batch["vector"]) if batch["vector"].dtype == object else batch["vector"]
        if matrix is None:
            matrix = np.empty((len(conversations), vectors.shape[1]), dtype=np.float32)
        matrix[batch["row"]] = vectors
        filled[batch["row"]] = True
        metadata = metadata or next((json.loads(m) for m in batch["meta"] if m), None)
    if matrix is None or not filled.all():
        raise DeitaHubError(f"Ray returned embeddings for {int(filled.sum())} of {len(conversations)} rows")
    return matrix, {**(metadata or {}), "ray": {"actors": compute.min_size, "resources_per_actor": resources}}
