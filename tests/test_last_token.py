"""Deita's last-token embedder: Vicuna text + BOS, beginning kept at max_length, final hidden state after the final
norm at the last real token; equal under left/right padding and any batch size; embed_pool integration."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from deita_hub.chat_template import render_vicuna
from deita_hub.embedding import EmbedConfig, embed_pool, load_embeddings
from deita_hub.embedding.last_token import LastTokenEmbedder
from deita_hub.testing.tiny import save_tiny_model


def conv(*pairs, system=None):
    turns = [{"role": "system", "content": system}] if system else []
    for question, answer in pairs:
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


ROWS = [
    conv(("What is 2 + 2?", "4.")),
    conv(("Write a haiku about the sea " + "and the waves " * 10, "Blue water rolls in.")),
    conv(
        ("Explain recursion.", "A function calling itself."),
        ("Example?", "factorial(n)."),
        system="Be brief.",
    ),
    conv(("Hi", "Hello!")),
    conv(("Summarise: " + "the river runs to the sea " * 20, "Rivers flow to the sea.")),
]


@pytest.fixture(scope="module", params=["llama", "mistral"])
def model_dir(request, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@functools.cache
def _reference_model(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(model_dir), model


def reference(model_dir, turns, max_length=2048):
    """The final hidden state (after the norm) at the last token, unpadded, from the causal LM's own outputs."""
    tokenizer, model = _reference_model(str(model_dir))
    ids = tokenizer(render_vicuna(turns), truncation=True, max_length=max_length).input_ids
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
    return hidden[0, -1].numpy(), ids


def test_matches_the_models_own_last_hidden_state(model_dir):
    embedder = LastTokenEmbedder(EmbedConfig(method="last-token", model=str(model_dir), batch_size=2))
    vectors = embedder.encode(ROWS)
    assert vectors.dtype == np.float32 and vectors.shape == (len(ROWS), 64)
    for turns, got in zip(ROWS, vectors, strict=True):
        want, ids = reference(model_dir, turns)
        assert ids[0] == embedder.tokenizer.bos_token_id and ids.count(embedder.tokenizer.bos_token_id) == 1
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)  # not normalised here


def test_padding_side_and_batch_size_do_not_change_vectors(model_dir):
    config = EmbedConfig(method="last-token", model=str(model_dir), batch_size=4)
    right = LastTokenEmbedder(config, padding_side="right").encode(ROWS)
    left = LastTokenEmbedder(config, padding_side="left").encode(ROWS)
    one = LastTokenEmbedder(EmbedConfig(method="last-token", model=str(model_dir), batch_size=1)).encode(ROWS)
    np.testing.assert_allclose(right, one, atol=1e-5)
    np.testing.assert_allclose(left, one, atol=1e-5)


def test_truncation_keeps_the_beginning(model_dir):
    embedder = LastTokenEmbedder(EmbedConfig(method="last-token", model=str(model_dir), max_length=24))
    long_row = ROWS[4]
    ids = embedder.tokenize([long_row])[0]
    full = embedder.tokenizer(render_vicuna(long_row)).input_ids
    assert len(full) > 24 and ids == full[:24]
    want, _ = reference(model_dir, long_row, max_length=24)
    np.testing.assert_allclose(embedder.encode([long_row])[0], want, atol=1e-5)


def test_metadata(model_dir):
    meta = LastTokenEmbedder(EmbedConfig(method="last-token", model=str(model_dir))).metadata()
    assert meta["method"] == "last-token" and meta["dim"] == 64 and meta["normalized"] is False
    assert meta["max_length"] == 2048 and meta["text"] == "vicuna_v1.1"
    assert meta["pooling"] == "last non-pad token" and meta["backend"] == "transformers"
    assert meta["dtype"] == "float32" and meta["truncation_side"].startswith("right")


def test_embed_pool_with_last_token(model_dir, tmp_path):
    config = EmbedConfig(method="last-token", model=str(model_dir), batch_size=3, chunk_rows=2)
    path, meta = embed_pool(
        ROWS, tmp_path / "emb.npy", config, pool_provenance={"fingerprint": "sha256:x"}, progress=False
    )
    from deita_hub.errors import DeitaHubError
    from deita_hub.pool import conversations_fingerprint

    matrix, loaded_meta = load_embeddings(
        path, num_rows=len(ROWS), conversations_fingerprint=conversations_fingerprint(ROWS)
    )
    with pytest.raises(DeitaHubError, match="other conversations"):
        load_embeddings(
            path, num_rows=len(ROWS), conversations_fingerprint=conversations_fingerprint(ROWS[::-1])
        )
    expected = LastTokenEmbedder(EmbedConfig(method="last-token", model=str(model_dir), batch_size=1)).encode(
        ROWS
    )
    np.testing.assert_allclose(np.asarray(matrix), expected, atol=1e-5)
    assert loaded_meta["pooling"] == "last non-pad token" and loaded_meta["num_rows"] == len(ROWS)
    assert json.loads((tmp_path / "emb.npy.json").read_text())["method"] == "last-token"
