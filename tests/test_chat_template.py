"""The Vicuna v1.1 template: byte-exact text, and the assistant-only loss mask TRL actually trains with.

The mask reference is independent of Jinja and of transformers' mask code: the plain-Python renderer gives the
text and the character spans of each assistant reply + `</s>`; a token is supervised iff its character offsets
overlap such a span.
"""

from __future__ import annotations

import json

import pytest

from deita_hub.chat_template import VICUNA_SYSTEM, assistant_spans, render_vicuna
from deita_hub.testing.tiny import llama2_tokenizer

SEED_CARD_EXAMPLE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: Hello! ASSISTANT: Hi!</s>USER: How are you? "
    "ASSISTANT:"
)

MULTI_TURN = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "2 + 3 = 5."},
]
WITH_SYSTEM = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]
LONG = [
    {"role": "user", "content": "Tell me a story."},
    {"role": "assistant", "content": "Once upon a time there was a tiny model. " * 3},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "It learned to stop at the end of its reply. " * 6},
]


@pytest.fixture(scope="module")
def tokenizer():
    return llama2_tokenizer()


def reference_mask(tokenizer, turns, max_length=None):
    """Token ids and supervised-token mask from the Python renderer's text and character spans."""
    bos = tokenizer.bos_token
    text = bos + render_vicuna(turns, eos_token=tokenizer.eos_token)
    spans = [
        (start + len(bos), end + len(bos))
        for start, end in assistant_spans(turns, eos_token=tokenizer.eos_token)
    ]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < end and e > start for start, end in spans)) for s, e in encoded["offset_mapping"]]
    ids = encoded["input_ids"]
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


def test_generation_prompt_is_byte_exact_seed_card_example(tokenizer):
    messages = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "How are you?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s>" + SEED_CARD_EXAMPLE
    assert render_vicuna(messages, add_generation_prompt=True) == SEED_CARD_EXAMPLE
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert (
        ids["input_ids"][0] == tokenizer.bos_token_id and ids["input_ids"].count(tokenizer.bos_token_id) == 1
    )


def test_system_turn_replaces_default_system_prompt(tokenizer):
    text = tokenizer.apply_chat_template(WITH_SYSTEM, tokenize=False)
    assert text == "<s>You are terse. USER: Name a colour. ASSISTANT: Blue.</s>"
    assert VICUNA_SYSTEM not in text


@pytest.mark.parametrize("turns", [MULTI_TURN, WITH_SYSTEM, LONG], ids=["multi-turn", "system", "long"])
def test_training_mask_equals_reference_spans(tokenizer, turns):
    from deita_hub.training.data import tokenize_conversation

    ids, mask = tokenize_conversation(tokenizer, turns, None)
    ref_ids, ref_mask = reference_mask(tokenizer, turns)
    assert ids == ref_ids
    assert mask == ref_mask
    # every reply ends with a supervised </s>, and nothing of the user turns is supervised
    eos_positions = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id]
    assert len(eos_positions) == sum(t["role"] == "assistant" for t in turns)
    assert all(mask[i] == 1 for i in eos_positions)
    supervised = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert "USER" not in supervised and "ASSISTANT" not in supervised


def test_truncated_mask_is_prefix_of_reference(tokenizer):
    from deita_hub.training.data import tokenize_conversation

    full_ids, _ = reference_mask(tokenizer, LONG)
    cut = len(full_ids) - 25  # inside the last reply: its </s> is cut off
    ids, mask = tokenize_conversation(tokenizer, LONG, cut)
    assert (ids, mask) == reference_mask(tokenizer, LONG, cut)
    assert mask[-1] == 1 and tokenizer.eos_token_id not in ids[ids.index(tokenizer.eos_token_id) + 1 :]


def _write_pool(path, conversations):
    """ShareGPT rows (human/gpt/system roles, as Deita's pools) for the given canonical conversations."""
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    with open(path, "w", encoding="utf-8") as handle:
        for i, turns in enumerate(conversations):
            row = {
                "id": str(i),
                "conversations": [{"from": names[t["role"]], "value": t["content"]} for t in turns],
            }
            handle.write(json.dumps(row) + "\n")
    return path


def test_trl_labels_equal_reference_spans(tmp_path, tokenizer):
    """What SFTTrainer trains on (its prepared `labels`) for a ShareGPT pool, truncation included."""
    from deita_hub.training.config import TrainConfig
    from deita_hub.training.trainer import build_trainer

    conversations = [MULTI_TURN, WITH_SYSTEM, LONG]
    max_length = len(reference_mask(tokenizer, LONG)[0]) - 25
    assert len(reference_mask(tokenizer, MULTI_TURN)[0]) < max_length  # only LONG is truncated
    config = TrainConfig(
        method="full",
        model="tiny:mistral",
        dataset=str(_write_pool(tmp_path / "pool.jsonl", conversations)),
        output_dir=str(tmp_path / "run"),
        max_length=max_length,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=1,
        total_train_batch_size=1,
    )
    trainer, _, _, data = build_trainer(config)
    assert data.num_truncated == 1 and data.num_dropped == 0
    prepared = trainer.train_dataset
    assert len(prepared) == 3
    for row, turns in zip(prepared, conversations, strict=True):
        ref_ids, ref_mask = reference_mask(tokenizer, turns, max_length)
        assert row["input_ids"] == ref_ids
        assert row["labels"] == [t if m else -100 for t, m in zip(ref_ids, ref_mask, strict=True)]
    # the template travels with the tokenizer the Trainer saves into every checkpoint
    assert trainer.processing_class.chat_template == tokenizer.chat_template


def test_conversation_cut_before_any_reply_is_dropped(tmp_path, tokenizer):
    from deita_hub.training.config import TrainConfig
    from deita_hub.training.data import load_train_data

    prompt_only = len(reference_mask(tokenizer, LONG[:1] + [{"role": "assistant", "content": ""}])[0]) - 2
    config = TrainConfig(
        dataset=str(_write_pool(tmp_path / "pool.jsonl", [LONG, WITH_SYSTEM])),
        max_length=prompt_only,
        bf16=False,
    )
    data = load_train_data(config, llama2_tokenizer())
    assert (data.num_truncated, data.num_dropped, len(data.train)) == (1, 1, 1)
    assert data.record["id"] == "pool.jsonl" and data.record["num_rows"] == 2


def test_built_dataset_folder_loads_its_subset_and_selection_summary(tmp_path, tokenizer):
    """A `deita-hub build` folder (Hub layout: README `configs:`, DIR/<config>/train-*.parquet, deita_build.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deita_hub.training.config import TrainConfig
    from deita_hub.training.data import load_train_data

    folder = tmp_path / "deita-tiny"
    subsets = {"6k": [MULTI_TURN, WITH_SYSTEM], "10k": [MULTI_TURN, WITH_SYSTEM, LONG]}
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    configs = ""
    for i, (name, conversations) in enumerate(subsets.items()):
        configs += f"- config_name: {name}\n" + ("  default: true\n" if i == 0 else "")
        configs += f"  data_files:\n  - split: train\n    path: {name}/train-*\n"
        rows = [
            {
                "id": str(j),
                "conversations": [{"from": names[t["role"]], "value": t["content"]} for t in turns],
            }
            for j, turns in enumerate(conversations)
        ]
        (folder / name).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / name / "train-00000-of-00001.parquet")
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# test\n")
    build = {
        "name": "deita-tiny",
        "pool": {"fingerprint": "sha256:abc"},
        "subsets": [
            {"name": "6k", "default": True, "selection": {"method": "deita", "budget": 2}, "rows": 2},
            {"name": "10k", "default": False, "selection": {"method": "deita", "budget": 3}, "rows": 3},
        ],
    }
    (folder / "deita_build.json").write_text(json.dumps(build))

    data = load_train_data(TrainConfig(dataset=str(folder), dataset_config="10k", bf16=False), tokenizer)
    assert len(data.train) == 3
    assert data.train[2]["input_ids"] == reference_mask(tokenizer, LONG)[0]
    record = data.record
    assert (record["id"], record["config"], record["num_rows"]) == ("deita-tiny", "10k", 3)
    assert record["build"]["subset"] == "10k" and record["build"]["selection"] == {
        "method": "deita",
        "budget": 3,
    }
    assert record["build"]["pool_fingerprint"] == "sha256:abc"
