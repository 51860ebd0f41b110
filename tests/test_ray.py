"""The Ray Data path (local cluster) gives the same scores and embeddings as the local path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deita_hub.embedding import EmbedConfig, embed_pool
from deita_hub.embedding.last_token import LastTokenEmbedder
from deita_hub.scoring import ScoreConfig, score_conversations
from deita_hub.testing.tiny import save_tiny_model

ray = pytest.importorskip("ray", reason="the Ray path needs the [ray] extra")


def conv(question, answer, *more):
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    for q, a in zip(more[::2], more[1::2], strict=True):
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return turns


ROWS = [
    conv("What is 2 + 2?", "4."),
    conv("Write a haiku about the sea " + "and the waves " * 10, "Blue water rolls in."),
    conv("Explain recursion.", "A function calling itself.", "Example?", "factorial(n)."),
    conv("Hi", "Hello!"),
    conv("Summarise: " + "the river runs to the sea " * 20, "Rivers flow to the sea."),
    conv("long " * 400, "too long when truncation is off"),
]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_scores_and_embeddings_equal_the_local_path(local_ray, tmp_path):
    model_dir = str(save_tiny_model(tmp_path / "model", "llama"))
    config = ScoreConfig(
        scorer="quality", model=model_dir, max_length=300, truncation_side="none", chunk_rows=2
    )
    local = score_conversations(ROWS, config, progress=False)
    # Results stream back from the actors into the checkpoint, so an interrupted Ray run resumes too.
    on_ray = score_conversations(
        ROWS,
        ScoreConfig(**{**config.__dict__, "use_ray": True}),
        progress=False,
        resume_dir=tmp_path / "ckpt",
    )
    assert on_ray.failures == local.failures and [f["row"] for f in local.failures] == [5]
    for a, b in zip(on_ray.scores, local.scores, strict=True):
        assert a == b or a == pytest.approx(b, abs=1e-5)
    assert on_ray.metadata["digit_token_ids"]["1"] == 29896 and on_ray.metadata["ray"]["actors"] == 1
    saved = (tmp_path / "ckpt" / "rows.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["row"] for line in saved) == list(range(len(ROWS)))

    embed_config = EmbedConfig(method="last-token", model=model_dir, batch_size=2, chunk_rows=2, use_ray=True)
    path, meta = embed_pool(ROWS, tmp_path / "emb.npy", embed_config, progress=False)
    expected = LastTokenEmbedder(EmbedConfig(method="last-token", model=model_dir, batch_size=1)).encode(ROWS)
    np.testing.assert_allclose(np.load(path), expected, atol=1e-5)
    assert meta["pooling"] == "last non-pad token" and meta["ray"]["actors"] == 1
