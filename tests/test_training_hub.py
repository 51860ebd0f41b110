"""The adapter Hub round trip: a base model on the (local) Hub, `deita-hub train --method lora|qlora --push`, then
fresh clients load the pushed adapter with PEFT, which resolves the base from adapter_config.json.

Everything that talks to the Hub runs in a subprocess with `hub_env` (huggingface_hub, transformers and PEFT read
HF_ENDPOINT / HF_TOKEN / HF_HOME at import; see deita_hub/testing/pytest_plugin.py). The reference for every
comparison is local: the base model's folder, as built before it was pushed, with the adapter folder the run
saved, loaded by plain `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_REPO = "deita-tester/tiny-base"
HELLO = [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi!"}]
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
# Vicuna v1.1, written out by hand (not produced by the project's renderer): BOS, system, turns, `</s>` after
# each reply, and the generation prompt `ASSISTANT:` without a trailing space.
MESSAGES = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "How are you?"},
]
VICUNA_TEXT = f"<s>{SYSTEM} USER: Hello! ASSISTANT: Hi!</s>USER: How are you? ASSISTANT:"


def run(env: dict, args: list[str], *, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def deita_hub(env: dict, *args: str) -> subprocess.CompletedProcess:
    return run(env, ["-m", "deita_hub", *args])


def push_base(env: dict, tmp_path: Path, *, move_main: bool) -> Path:
    """Build the tiny base (+ tokenizer) and push it to BASE_REPO through deita_hub.hub, tagged v1; returns its
    local folder. With `move_main`, a different base (other seed) is pushed on top, so `main` is not v1."""
    folder = tmp_path / "base-v1"
    script = textwrap.dedent(
        f"""
        from deita_hub.hub import push_folder
        from deita_hub.testing.tiny import save_tiny_model

        save_tiny_model({str(folder)!r}, "mistral", seed=0)
        push_folder({str(folder)!r}, {BASE_REPO!r}, repo_type="model", tag="v1")
        if {move_main!r}:
            save_tiny_model({str(tmp_path / "base-main")!r}, "mistral", seed=1)
            push_folder({str(tmp_path / "base-main")!r}, {BASE_REPO!r}, repo_type="model")
        """
    )
    run(env, ["-c", script])
    return folder


def train_and_push(env: dict, tmp_path: Path, method: str, repo: str, *extra: str) -> Path:
    """Two optimizer steps on the Hub base, a checkpoint (and its push) after each; returns OUTPUT_DIR."""
    pool = tmp_path / "hello.jsonl"
    pool.write_text(json.dumps({"id": "r0", "conversations": HELLO}) + "\n")
    out = tmp_path / f"run-{method}"
    result = deita_hub(
        env, "train", "tiny-cpu.yaml", "--dataset", str(pool), "--model", BASE_REPO, "--method", method,
        "--output-dir", str(out), "--max-steps", "2", "--push", repo,
        "--set", "save_steps=1", "--set", "per_device_train_batch_size=1", "--set", "total_train_batch_size=1",
        "--set", "warmup_ratio=0.0", "--set", "lr_scheduler_type=constant", "--set", "learning_rate=0.01",
        *extra,
    )  # fmt: skip
    assert "push checkpoint-1: ok" in result.stdout and "push checkpoint-2: ok" in result.stdout
    assert "push final model: ok" in result.stdout
    return out


def assert_adapter_config_names_the_hub_base(adapter_config: dict, revision: str | None) -> None:
    # the Hub id itself: never the local cache snapshot folder TRL loaded it from, never a local path
    assert adapter_config["base_model_name_or_path"] == BASE_REPO
    assert adapter_config["revision"] == revision


def assert_pushed_adapter(hub_server, repo: str, out: Path, tmp_path: Path, revision: str | None) -> dict:
    """Checks on the pushed files (main and each checkpoint commit); returns {checkpoint step: commit id}."""
    history = hub_server.history(repo, "model")[:-1]  # newest first; the last is the repo's initial commit
    titles = [commit["title"] for commit in history]
    assert titles == [
        "deita-hub: final model",
        "Training in progress: checkpoint-2",
        "Training in progress: checkpoint-1",
    ]
    for commit in history:
        files = hub_server.files(repo, "model", revision=commit["id"])
        assert {
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer.json",
            "deita_run.json",
        } <= set(files)
        assert_adapter_config_names_the_hub_base(json.loads(files["adapter_config.json"]), revision)
        pushed_record = json.loads(files["deita_run.json"])
        assert (pushed_record["base_model"], pushed_record["base_model_revision"]) == (BASE_REPO, revision)
        if revision:  # the card links the base at the revision trained on
            assert f"(revision [`{revision}`](" in files["README.md"].decode()
        leaked = [name for name, data in files.items() if str(tmp_path).encode() in data]
        assert leaked == [], f"pushed files name a local path: {leaked}"
    local = json.loads((out / "final" / "adapter_config.json").read_text())
    assert_adapter_config_names_the_hub_base(local, revision)
    return {
        int(title.rsplit("-", 1)[1]): commit["id"]
        for title, commit in zip(titles, history, strict=True)
        if "checkpoint" in title
    }


# A fresh client process: loads everything from the Hub and the local references, prints one JSON line.
CLIENT = """
import json, sys
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

args = json.loads(sys.argv[1])
messages = args["messages"]
out = {}


def prompt(tokenizer):
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def local_base():
    return AutoModelForCausalLM.from_pretrained(args["base_dir"], **args.get("load", {}))


def quantization():
    if not args.get("4bit"):
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )}


def logits(model, tokenizer):
    with torch.no_grad():
        return model.eval()(**prompt(tokenizer)).logits.float()


def diff(a, b):
    return (a - b).abs().max().item()


tokenizer = AutoTokenizer.from_pretrained(args["adapter_repo"])
out["rendered"] = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
base = logits(local_base(), tokenizer)
reference = logits(PeftModel.from_pretrained(local_base(), args["final_dir"]), tokenizer)
hub = logits(AutoPeftModelForCausalLM.from_pretrained(args["adapter_repo"]), tokenizer)
out["hub_vs_local"] = diff(hub, reference)
out["adapter_vs_base"] = diff(reference, base)
if args.get("4bit"):
    args["load"] = quantization()
    base4 = logits(local_base(), tokenizer)
    reference4 = logits(PeftModel.from_pretrained(local_base(), args["final_dir"]), tokenizer)
    hub4 = logits(AutoPeftModelForCausalLM.from_pretrained(args["adapter_repo"], **quantization()), tokenizer)
    out["hub_vs_local_4bit"] = diff(hub4, reference4)
    out["4bit_vs_fp32_base"] = diff(base4, base)
    args["load"] = {}
for step, commit in args["checkpoints"].items():
    local = logits(PeftModel.from_pretrained(local_base(), f"{args['out_dir']}/checkpoint-{step}"), tokenizer)
    pushed = logits(AutoPeftModelForCausalLM.from_pretrained(args["adapter_repo"], revision=commit), tokenizer)
    out[f"checkpoint-{step}_hub_vs_local"] = diff(pushed, local)
    out[f"checkpoint-{step}_vs_final"] = diff(local, reference)
if args.get("chat"):
    from deita_hub.training.chat import load_chat_model

    model, chat_tokenizer = load_chat_model(args["adapter_repo"], dtype="float32")
    out["chat_vs_local"] = diff(logits(model, chat_tokenizer), reference)
if args.get("merged_repo"):
    merged_tokenizer = AutoTokenizer.from_pretrained(args["merged_repo"])
    out["merged_rendered"] = merged_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    merged = AutoModelForCausalLM.from_pretrained(args["merged_repo"])
    out["merged_vs_local"] = diff(logits(merged, merged_tokenizer), reference)
print(json.dumps(out))
"""


def client(env: dict, **args) -> dict:
    result = run(env, ["-c", CLIENT, json.dumps({"messages": MESSAGES, **args})], timeout=240)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_lora_adapter_round_trip_through_the_hub_with_a_pinned_base_revision(tmp_path, hub_server, hub_env):
    """Base on the Hub (tag v1, then main moved to another base); the adapter trained on v1 must name the Hub id
    and revision v1, so that PEFT, `deita-hub chat` and `deita-hub merge` rebuild the trained model exactly."""
    adapter_repo, merged_repo = "deita-tester/tiny-lora", "deita-tester/tiny-lora-merged"
    base_dir = push_base(hub_env, tmp_path, move_main=True)
    out = train_and_push(hub_env, tmp_path, "lora", adapter_repo, "--set", "model_revision=v1")
    checkpoints = assert_pushed_adapter(hub_server, adapter_repo, out, tmp_path, revision="v1")

    merge = deita_hub(
        hub_env, "merge", adapter_repo, "--out", str(tmp_path / "merged"), "--dtype", "float32",
        "--push", merged_repo,
    )  # fmt: skip
    assert f"merged into {BASE_REPO}" in merge.stdout and "pushed: " in merge.stdout
    for wrong, message in (
        (BASE_REPO, f"{BASE_REPO}: not a LoRA adapter"),
        ("deita-tester/no-such-adapter", "no Hub repo of that name"),
    ):
        failed = subprocess.run(
            [sys.executable, "-m", "deita_hub", "merge", wrong, "--out", str(tmp_path / "never")],
            env=hub_env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        )  # fmt: skip
        assert failed.returncode == 1 and message in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "never").exists()
    merged_files = hub_server.files(merged_repo, "model")
    assert "adapter_config.json" not in merged_files and "model.safetensors" in merged_files
    merged_record = json.loads(merged_files["deita_run.json"])
    assert (merged_record["kind"], merged_record["base_model"], merged_record["hub_repo"]) == (
        "merged",
        BASE_REPO,
        merged_repo,
    )

    seen = client(
        hub_env,
        base_dir=str(base_dir),
        adapter_repo=adapter_repo,
        final_dir=str(out / "final"),
        out_dir=str(out),
        checkpoints=checkpoints,
        merged_repo=merged_repo,
        chat=True,
    )
    assert seen["rendered"] == VICUNA_TEXT and seen["merged_rendered"] == VICUNA_TEXT
    assert seen["adapter_vs_base"] > 1e-3  # the adapter learned something: the comparisons below can fail
    assert seen["hub_vs_local"] <= 1e-5  # base v1 resolved from adapter_config.json, not main
    assert seen["chat_vs_local"] <= 1e-5
    assert seen["merged_vs_local"] <= 1e-4  # fp32 merge: W + BA rounds differently from W x + B(A x)
    assert seen["checkpoint-1_vs_final"] > 1e-3  # two different adapters, each found at its own commit
    assert seen["checkpoint-1_hub_vs_local"] <= 1e-5 and seen["checkpoint-2_hub_vs_local"] <= 1e-5


@pytest.mark.slow
def test_qlora_adapter_round_trip_through_the_hub(tmp_path, hub_server, hub_env):
    """A QLoRA adapter trained on a 4-bit NF4 base pulled from the Hub loads back from the Hub on a full-precision
    and on a 4-bit base, equal to the local adapter on the same base."""
    adapter_repo = "deita-tester/tiny-qlora"
    base_dir = push_base(hub_env, tmp_path, move_main=False)
    out = train_and_push(hub_env, tmp_path, "qlora", adapter_repo)
    checkpoints = assert_pushed_adapter(hub_server, adapter_repo, out, tmp_path, revision=None)
    record = json.loads((out / "final" / "deita_run.json").read_text())
    assert (record["method"], record["quantization"]["bnb_4bit_quant_type"]) == ("qlora", "nf4")

    seen = client(
        hub_env,
        base_dir=str(base_dir),
        adapter_repo=adapter_repo,
        final_dir=str(out / "final"),
        out_dir=str(out),
        checkpoints={2: checkpoints[2]},
        **{"4bit": True},
    )
    assert seen["rendered"] == VICUNA_TEXT
    assert seen["adapter_vs_base"] > 1e-3 and seen["4bit_vs_fp32_base"] > 1e-4  # really quantized
    assert seen["hub_vs_local"] <= 1e-5 and seen["hub_vs_local_4bit"] <= 1e-5
    assert seen["checkpoint-2_hub_vs_local"] <= 1e-5
