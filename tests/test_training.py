"""`deita-hub train` / `merge` / `chat` for real, on CPU: a tiny random Mistral with the offline Llama-2 tokenizer.

Each method runs TRL's SFTTrainer for a few steps on a repeated batch (the loss must go down), writes checkpoints
with deita-hub's run record and card, and can be resumed, merged, chatted with and pushed to the local Hub
server (client code in subprocesses, see deita_hub/testing/pytest_plugin.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from deita_hub.chat_template import VICUNA_CHAT_TEMPLATE
from deita_hub.errors import DeitaHubError
from deita_hub.training.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
HELLO = [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi!"}]


def write_pool(path: Path, conversations: list[list[dict]]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i, turns in enumerate(conversations):
            handle.write(json.dumps({"id": f"row-{i}", "conversations": turns}) + "\n")
    return path


def varied_conversations(n: int) -> list[list[dict]]:
    return [
        [
            {"from": "human", "value": f"What is {i} plus {i}?"},
            {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."},
        ]
        for i in range(n)
    ]


def tiny_config(tmp_path: Path, dataset: Path, **changes) -> TrainConfig:
    """tiny-cpu settings: batches of one repeated conversation, constant lr, no warmup (step 1 learns too)."""
    values = dict(
        method="full",
        model="tiny:mistral",
        dataset=str(dataset),
        output_dir=str(tmp_path / "run"),
        bf16=False,
        gradient_checkpointing=False,
        max_length=256,
        per_device_train_batch_size=1,
        total_train_batch_size=1,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        save_steps=2,
        logging_steps=1,
    )
    values.update(changes)
    return TrainConfig(**values)


def losses(folder: Path) -> list[float]:
    record = json.loads((folder / "deita_run.json").read_text())
    return [entry["loss"] for entry in record["results"]["log_history"] if "loss" in entry]


def assert_decreasing(values: list[float]) -> None:
    assert all(b < a for a, b in zip(values, values[1:], strict=False)), values


def assert_model_folder(folder: Path, *, kind: str, method: str) -> dict:
    record = json.loads((folder / "deita_run.json").read_text())
    assert (record["schema"], record["kind"], record["method"]) == (1, kind, method)
    assert record["base_model"] == "tiny-mistral" and record["template"] == "vicuna_v1.1"
    assert record["dataset"]["fingerprint"].startswith("sha256:")
    hp = record["hyperparameters"]
    assert (hp["distributed_type"], hp["num_devices"], hp["assistant_only_loss"]) == ("cpu", 1, True)
    assert "/" not in json.dumps({k: record[k] for k in ("base_model", "model_name")})  # no local paths
    weights = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
    assert (folder / weights).is_file()
    assert (folder / "chat_template.jinja").read_text() == VICUNA_CHAT_TEMPLATE
    card = (folder / "README.md").read_text()
    assert "deita-hub" in card and "vicuna_v1.1" in card  # deita-hub's card, written after TRL/PEFT's
    return record


# --- the three methods -------------------------------------------------------------------------------------------


def test_full_fine_tune_learns_the_reply_and_chat_stops_at_eos(tmp_path):
    from deita_hub.training.chat import GenerationSettings, chat_loop, chat_once, load_chat_model
    from deita_hub.training.trainer import train

    pool = write_pool(tmp_path / "hello.jsonl", [HELLO])
    result = train(tiny_config(tmp_path, pool, max_steps=8, save_steps=4))
    assert (result.global_step, result.resumed_from, result.pushes) == (8, None, [])
    history = losses(result.final_dir)
    assert len(history) == 8 and history[-1] < history[0] - 3
    assert_decreasing(history[:3])
    record = assert_model_folder(result.final_dir, kind="full", method="full")
    assert record["results"]["global_step"] == 8 and record["results"]["train_loss"] == pytest.approx(
        result.train_loss
    )
    assert not (result.output_dir / "README.md").exists()  # no TRL card (without base_model) beside the run
    for step in (4, 8):  # every checkpoint carries the record and the card
        assert_model_folder(result.output_dir / f"checkpoint-{step}", kind="full", method="full")

    model, tokenizer = load_chat_model(str(result.final_dir))
    # the reply is the trained one and ends at </s>: with 8 new tokens allowed, nothing follows "Hi!"
    assert chat_once(model, tokenizer, "Hello!", GenerationSettings(max_new_tokens=8)) == "Hi!"
    out = []
    history = chat_loop(
        model,
        tokenizer,
        GenerationSettings(max_new_tokens=8),
        lines=["Hello!", "/reset", "Hello!", "/exit", "x"],
        out=_Lines(out),
    )
    assert history == [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi!"}]
    assert "".join(out).count("ASSISTANT: Hi!") == 2 and "(conversation reset)" in "".join(out)


class _Lines:
    def __init__(self, sink: list[str]):
        self.sink = sink

    def write(self, text: str) -> None:
        self.sink.append(text)

    def flush(self) -> None:
        pass


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from deita_hub.training.trainer import train

    tmp_path = tmp_path_factory.mktemp("lora")
    pool = write_pool(tmp_path / "hello.jsonl", [HELLO])
    return train(tiny_config(tmp_path, pool, method="lora"))


def test_lora_trains_an_adapter(lora_run):
    assert lora_run.global_step == 3
    assert_decreasing(losses(lora_run.final_dir))
    record = assert_model_folder(lora_run.final_dir, kind="adapter", method="lora")
    assert record["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
    assert record["quantization"] is None
    adapter = json.loads((lora_run.final_dir / "adapter_config.json").read_text())
    assert {name.split(".")[-1] for name in adapter["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert_model_folder(lora_run.output_dir / "checkpoint-2", kind="adapter", method="lora")


def test_qlora_trains_on_cpu_with_a_4bit_base(tmp_path):
    from transformers import TrainerCallback

    from deita_hub.training.trainer import train

    seen = {}

    class Inspect(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["4bit"] = sorted({type(m).__name__ for m in model.modules() if "4bit" in type(m).__name__})

    pool = write_pool(tmp_path / "hello.jsonl", [HELLO])
    result = train(tiny_config(tmp_path, pool, method="qlora"), extra_callbacks=[Inspect()])
    assert seen["4bit"] == ["Linear4bit"]
    assert_decreasing(losses(result.final_dir))
    record = assert_model_folder(result.final_dir, kind="adapter", method="qlora")
    assert record["quantization"] == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_trains_on_cpu_with_autocast(tmp_path, method):
    """bf16 runs on CPU too (torch's CPU autocast): full keeps fp32 master weights and computes in bf16; lora
    freezes a bf16 base and trains fp32 adapters."""
    from transformers import TrainerCallback

    from deita_hub.training.trainer import train

    seen = {}

    class Inspect(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            trainable = {p.dtype for p in model.parameters() if p.requires_grad}
            frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
            seen["weights"] = (sorted(map(str, trainable)), sorted(map(str, frozen)))
            # (TRL may project the final hidden states itself, so the hook sits on a decoder layer's projection)
            down_proj = next(
                m for name, m in model.named_modules() if name.endswith("layers.0.mlp.down_proj")
            )
            down_proj.register_forward_hook(record_output_dtype)

    def record_output_dtype(module, inputs, output) -> None:
        seen.setdefault("output", str(output.dtype))

    pool = write_pool(tmp_path / "hello.jsonl", [HELLO])
    result = train(tiny_config(tmp_path, pool, method=method, bf16=True), extra_callbacks=[Inspect()])
    assert seen["weights"] == (
        (["torch.float32"], []) if method == "full" else (["torch.float32"], ["torch.bfloat16"])
    )
    assert seen["output"] == "torch.bfloat16"  # with fp32 weights (full) too: autocast is on
    assert_decreasing(losses(result.final_dir))
    record = assert_model_folder(
        result.final_dir, kind="full" if method == "full" else "adapter", method=method
    )
    assert record["hyperparameters"]["bf16"] is True


def test_pushed_files_are_the_model_not_the_resume_state(lora_run, tmp_path):
    from deita_hub.training.push import stage

    staged = stage(lora_run.output_dir / "checkpoint-2", tmp_path / "staged", base_model="tiny-mistral")
    names = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "adapter_config.json", "deita_run.json", "README.md"} <= names
    assert not names & {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "training_args.bin",
        "trainer_state.json",
    }
    # the local base path in adapter_config.json becomes the record's base model
    local = json.loads((lora_run.output_dir / "checkpoint-2" / "adapter_config.json").read_text())
    assert Path(local["base_model_name_or_path"]).is_dir()
    assert (
        json.loads((staged / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-mistral"
    )


# --- batching ----------------------------------------------------------------------------------------------------


def test_packed_padding_free_and_padded_losses_are_equal(tmp_path):
    """One batch of the same conversations, three ways: padded, padding-free, packed into one row."""
    import torch

    from deita_hub.training.trainer import build_trainer

    conversations = varied_conversations(5)
    conversations[2] = conversations[2] + [
        {"from": "human", "value": "And twice that?"},
        {"from": "gpt", "value": "Twice that is eight, which is a longer answer than the others."},
    ]
    pool = write_pool(tmp_path / "pool.jsonl", conversations)
    base = tiny_config(
        tmp_path, pool, per_device_train_batch_size=5, total_train_batch_size=5, max_length=1024
    )
    batch_losses, shapes = {}, {}
    for name, changes in {
        "padded": dict(padding_free=False, packing=False),
        "padding_free": dict(padding_free=True, packing=False),
        "packed": dict(padding_free=True, packing=True),
    }.items():
        trainer, *_ = build_trainer(replace(base, output_dir=str(tmp_path / name), **changes))
        batch = next(iter(trainer.get_train_dataloader()))
        shapes[name] = tuple(batch["input_ids"].shape)
        trainer.model.eval()
        with torch.no_grad():
            batch_losses[name] = trainer.compute_loss(trainer.model, batch).item()
    assert shapes["padded"][0] == 5 and shapes["padding_free"][0] == shapes["packed"][0] == 1
    assert shapes["padding_free"][1] < 5 * shapes["padded"][1]  # no pad tokens
    assert batch_losses["padding_free"] == pytest.approx(batch_losses["padded"], abs=1e-5)
    assert batch_losses["packed"] == pytest.approx(batch_losses["padded"], abs=1e-5)


# --- resume ------------------------------------------------------------------------------------------------------


def test_resume_continues_from_the_last_complete_checkpoint(tmp_path, caplog, capsys):
    import logging
    import shutil

    from transformers import TrainerCallback

    from deita_hub.training.trainer import train

    pool = write_pool(tmp_path / "pool.jsonl", varied_conversations(8))
    settings = dict(max_steps=4, learning_rate=1e-3, eval_ratio=0.25)  # 6 rows train, 2 held out
    caplog.set_level(logging.INFO, logger="deita_hub")
    straight = train(tiny_config(tmp_path, pool, output_dir=str(tmp_path / "straight"), **settings))
    # each Trainer log is one line on deita-hub's logger (which -q silences), none a dict printed on stdout
    logged = [message for message in caplog.messages if message.startswith("step ")]
    assert [m.split(" (")[0] for m in logged if ": loss " in m] == [f"step {i}/4" for i in range(1, 5)]
    assert any(m.startswith("step 4/4 (epoch") and "eval_loss " in m for m in logged)
    assert "{" not in capsys.readouterr().out
    reference = losses(straight.final_dir)
    results = json.loads((straight.final_dir / "deita_run.json").read_text())["results"]
    assert [e["step"] for e in results["log_history"] if "eval_loss" in e] == [2, 4]  # eval at every save
    assert results["eval_loss"] == [e["eval_loss"] for e in results["log_history"] if "eval_loss" in e][-1]

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt("killed during step 4")

    config = tiny_config(tmp_path, pool, output_dir=str(tmp_path / "crashed"), **settings)
    with pytest.raises(KeyboardInterrupt):
        train(config, extra_callbacks=[Crash()])
    run = Path(config.output_dir)
    assert not (run / "final").exists()
    # a save interrupted half-way: files there, but no run record yet
    half = run / "checkpoint-4"
    shutil.copytree(run / "checkpoint-2", half)
    (half / "deita_run.json").unlink()
    with pytest.raises(DeitaHubError, match="already holds a run"):
        train(config)  # without --resume nothing is overwritten
    with pytest.raises(DeitaHubError, match="differs from the run .* in learning_rate"):
        train(replace(config, learning_rate=5e-4), resume=True)

    resumed = train(config, resume=True)
    assert (resumed.resumed_from, resumed.global_step) == (2, 4)
    # same data order, same optimizer state: steps 3 and 4 repeat the uninterrupted run's losses
    assert losses(resumed.final_dir) == pytest.approx(reference, abs=1e-4)
    assert is_complete_checkpoint(run / "checkpoint-4")
    # resuming a finished run trains no further step (the Trainer alone would run one more): final = last checkpoint
    weights = (run / "final" / "model.safetensors").read_bytes()
    again = train(config, resume=True)
    assert (again.resumed_from, again.global_step) == (4, 4)
    assert (run / "final" / "model.safetensors").read_bytes() == weights
    assert json.loads((run / "final" / "deita_run.json").read_text())["results"]["global_step"] == 4


def test_old_checkpoints_go_only_once_the_new_one_is_complete(tmp_path, monkeypatch):
    """save_total_limit 1: a save whose record cannot be written still leaves the previous checkpoint."""
    import errno

    from deita_hub.training import trainer as trainer_module
    from deita_hub.training.trainer import checkpoints, train

    pool = write_pool(tmp_path / "pool.jsonl", varied_conversations(4))
    config = tiny_config(tmp_path, pool, max_steps=3, save_steps=1, save_total_limit=1)
    write = trainer_module._RunRecorder.write

    def fails_at_step_3(self, folder, state, **results):
        if state.global_step == 3:
            raise OSError(errno.EIO, "the record of checkpoint-3 could not be written")
        return write(self, folder, state, **results)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module._RunRecorder, "write", fails_at_step_3)
        with pytest.raises(OSError, match="checkpoint-3"):
            train(config)
    run = Path(config.output_dir)
    assert [(p.name, is_complete_checkpoint(p)) for _, p in checkpoints(run)] == [
        ("checkpoint-2", True),  # checkpoint-1 went once checkpoint-2 was complete, not before
        ("checkpoint-3", False),
    ]
    resumed = train(config, resume=True)
    assert (resumed.resumed_from, resumed.global_step) == (2, 3)
    assert [p.name for _, p in checkpoints(run)] == ["checkpoint-3"]


def is_complete_checkpoint(folder: Path) -> bool:
    from deita_hub.training.trainer import is_complete

    return is_complete(folder)


# --- merge -------------------------------------------------------------------------------------------------------


def test_merge_folds_the_adapter_into_its_base(lora_run, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deita_hub.training.merge import merge_adapter

    result = merge_adapter(lora_run.final_dir, tmp_path / "merged", dtype="float32")
    merged_dir = result.out_dir
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    record = json.loads((merged_dir / "deita_run.json").read_text())
    assert (record["kind"], record["method"], record["base_model"], record["model_name"]) == (
        "merged",
        "lora",
        "tiny-mistral",
        "merged",
    )
    assert "deita-hub" in (merged_dir / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template == VICUNA_CHAT_TEMPLATE
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
        adapter = AutoPeftModelForCausalLM.from_pretrained(str(lora_run.final_dir)).eval()(ids).logits
    assert torch.allclose(merged, adapter, atol=1e-4)

    with pytest.raises(DeitaHubError, match="not empty"):
        merge_adapter(lora_run.final_dir, merged_dir)
    with pytest.raises(DeitaHubError, match="not a LoRA adapter"):
        merge_adapter(merged_dir, tmp_path / "again")


# --- push, token safety, kill -9 (subprocesses) ------------------------------------------------------------------


def deita_hub(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deita_hub", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.slow
def test_push_every_checkpoint_survives_a_failed_upload_and_leaks_no_token(
    tmp_path, hub_server, hub_env, hub_token
):
    repo = "deita-tester/tiny-sft"
    pool = write_pool(tmp_path / "hello.jsonl", [HELLO])
    out = tmp_path / "run"
    env = {**hub_env, "DEITA_HUB_RETRY_ATTEMPTS": "2"}
    # the first checkpoint's commit fails on both tries: training must go on and the next save push
    hub_server.add_fault("commit", status=500, times=2)
    result = deita_hub(
        env, "train", "tiny-cpu.yaml", "--dataset", str(pool), "--output-dir", str(out), "--method", "full",
        "--max-steps", "3", "--push", repo,
        "--set", "save_steps=1", "--set", "per_device_train_batch_size=1", "--set", "total_train_batch_size=1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "push checkpoint-" in result.stdout and "FAILED" in result.stdout
    assert "push final model: ok" in result.stdout
    titles = [commit["title"] for commit in hub_server.history(repo, "model")]
    assert titles[0] == "deita-hub: final model"
    assert any(title.startswith("Training in progress: checkpoint-") for title in titles[1:])

    remote = hub_server.files(repo, "model")
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "deita_run.json",
        "README.md",
    } <= set(remote)
    assert not {"optimizer.pt", "training_args.bin", "trainer_state.json", "rng_state.pth"} & set(remote)
    record = json.loads(remote["deita_run.json"])
    assert (record["hub_repo"], record["model_name"], record["results"]["global_step"]) == (
        repo,
        "tiny-sft",
        3,
    )

    client = subprocess.run(
        [sys.executable, "-c", (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({repo!r})\n"
            f"model = AutoModelForCausalLM.from_pretrained({repo!r})\n"
            "msgs = [{'role': 'user', 'content': 'Hello!'}]\n"
            "print(repr(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)))\n"
            "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
            "print(model(**ids).logits.shape[-1])\n"
        )],
        env=hub_env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert client.returncode == 0, client.stderr[-3000:]
    expected = "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. USER: Hello! ASSISTANT:"
    assert client.stdout.splitlines() == [repr(expected), "32001"]

    # the token reached no file (training_args.bin included), no pushed file, no output
    token = hub_token.encode()
    assert (out / "checkpoint-3" / "training_args.bin").is_file()
    assert files_containing(out, token) == []
    assert [path for path, data in remote.items() if token in data] == []
    assert hub_token not in result.stdout + result.stderr + client.stdout + client.stderr


@pytest.mark.slow
def test_kill_9_mid_run_then_resume(tmp_path):
    pool = write_pool(tmp_path / "pool.jsonl", varied_conversations(12))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [
        sys.executable, "-m", "deita_hub", "train", "tiny-cpu.yaml", "--dataset", str(pool), "--output-dir", str(out),
        "--method", "full", "--max-steps", "6",
        "--set", "save_steps=2", "--set", "per_device_train_batch_size=1", "--set", "total_train_batch_size=1",
    ]  # fmt: skip
    process = subprocess.Popen(
        args, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    try:
        while not (out / "checkpoint-2" / "deita_run.json").exists():
            assert process.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL and not (out / "final").exists()
    resumed = subprocess.run(
        [*args, "--resume", "-q"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint-" in resumed.stdout and "trained 6 steps" in resumed.stdout
    assert resumed.stderr == "" and "{" not in resumed.stdout  # -q: results only, no progress
    record = json.loads((out / "final" / "deita_run.json").read_text())
    steps = [entry["step"] for entry in record["results"]["log_history"] if "loss" in entry]
    assert steps == list(range(1, 7))  # the restored log continues the interrupted one without a gap
