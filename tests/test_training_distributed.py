"""`accelerate launch` with the shipped configs/accelerate files runs `deita-hub train` in 2 CPU processes (gloo).

Each launch trains the same tiny full fine-tune as a single process in this pytest process, with the same
`total_train_batch_size`: the gradient accumulation must follow from the world size (4 = 1 x 4 alone, 2 = 2 x 2 in
two processes) and the two runs must agree step for step (losses, tokens seen, final weights).

What runs on CPU, with accelerate 1.15 / torch 2.13 / DeepSpeed 0.19:
- configs/accelerate/fsdp.yaml: accelerate promotes a launch to FSDP only on accelerators; on CPU it runs plain DDP
  (multi-CPU, gloo), which deita-hub records ("multi-CPU") and warns about. Its `mixed_precision: bf16` gives way
  to the training config's `bf16: false` (also warned about).
- configs/accelerate/deepspeed-zero{2,3}.yaml: real DeepSpeed ZeRO on DeepSpeed's CPU accelerator. DeepSpeed
  compiles a small C++ op (shm comm) at its first use on a machine (~1.5 min on 2 cores, then cached in
  ~/.cache/torch_extensions); these tests skip without the `deepspeed` package.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deita_hub.training.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TOTAL_BATCH = 4
STEPS = 2
# The tiny CPU recipe with one conversation per device per micro-step and a constant, large learning rate, so the
# second step's loss depends on the first step's update.
OVERRIDES = {
    "method": "full",
    "max_steps": STEPS,
    "per_device_train_batch_size": 1,
    "total_train_batch_size": TOTAL_BATCH,
    "warmup_ratio": 0.0,
    "lr_scheduler_type": "constant",
    "learning_rate": 0.01,
    "save_steps": 1,
}


def write_pool(path: Path, n: int = 8) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            turns = [
                {"from": "human", "value": f"What is {i} plus {i}?"},
                {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."},
            ]
            handle.write(json.dumps({"id": f"row-{i}", "conversations": turns}) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_history(run: Path, step: int) -> list[dict]:
    return json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    return write_pool(tmp_path_factory.mktemp("pool") / "pool.jsonl")


@pytest.fixture(scope="module")
def single_process(pool, tmp_path_factory) -> Path:
    """The reference: the same config trained in this process (world size 1)."""
    from deita_hub.training.trainer import train

    out = tmp_path_factory.mktemp("single") / "run"
    config = load_config("tiny-cpu.yaml", {**OVERRIDES, "dataset": str(pool), "output_dir": str(out)})
    train(config)
    return out


def launch(accelerate_config: str, pool: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "HF_"))}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",  # DeepSpeed's own device choice; accelerate and torch find no CUDA anyway
    )
    sets = [arg for key, value in OVERRIDES.items() for arg in ("--set", f"{key}={value}")]
    result = subprocess.run(
        [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", f"configs/accelerate/{accelerate_config}", "--num_processes", "2",
            "--main_process_port", str(free_port()),
            "-m", "deita_hub", "train", "tiny-cpu.yaml", "--dataset", str(pool), "--output-dir", str(out), *sets, *extra,
        ],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-5000:])
    return result


def assert_same_run_as_one_process(
    out: Path, single: Path, *, distributed_type: str, resumed: bool = False
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    record = json.loads((out / "final" / "deita_run.json").read_text())
    hp = record["hyperparameters"]
    assert (hp["distributed_type"], hp["num_devices"], hp["gradient_accumulation_steps"]) == (
        distributed_type,
        2,
        TOTAL_BATCH // 2,
    )
    assert (hp["total_train_batch_size"], hp["train_batch_size"], hp["bf16"]) == (TOTAL_BATCH, 1, False)
    reference = json.loads((single / "final" / "deita_run.json").read_text())
    assert reference["hyperparameters"]["gradient_accumulation_steps"] == TOTAL_BATCH

    # step for step the same run: the same conversations per step (tokens seen, summed over both processes),
    # the same losses, finite
    history = log_history(out, STEPS)
    single_history = log_history(single, STEPS)
    assert [e["step"] for e in history] == [1, 2]
    if not resumed:  # (TRL's num_tokens counter restarts from 0 on resume: it is not in the checkpoint)
        assert [e["num_tokens"] for e in history] == [e["num_tokens"] for e in single_history]
    losses = [e["loss"] for e in history]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses == pytest.approx([e["loss"] for e in single_history], abs=1e-5)
    assert losses[1] < losses[0]

    # every checkpoint is complete and loads; the final weights are the one-process weights
    for step in range(1, STEPS + 1):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / "deita_run.json").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    final, single_final = weights(out / "final"), weights(single / "final")
    assert final.keys() == single_final.keys()
    for name, tensor in single_final.items():
        assert final[name].shape == tensor.shape  # whole tensors, not shards
        assert torch.allclose(final[name], tensor, atol=5e-5), name
    assert weights(out / f"checkpoint-{STEPS}").keys() == final.keys()
    model = AutoModelForCausalLM.from_pretrained(out / f"checkpoint-{STEPS}")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 3148, 1001, 29901]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_fsdp_config_launches_two_cpu_processes(pool, single_process, tmp_path):
    out = tmp_path / "run"
    result = launch("fsdp.yaml", pool, out)
    # accelerate runs FSDP only on accelerators; on CPU the launch is DDP, and deita-hub says so
    assert "the launch asked for fsdp but accelerate runs multi-CPU" in result.stderr
    assert (
        "accelerate launch asked for mixed precision 'bf16'" in result.stderr
    )  # the config's bf16: false wins
    assert result.stdout.count(f"trained {STEPS} steps") == 2  # both processes finished
    assert_same_run_as_one_process(out, single_process, distributed_type="multi-CPU")

    # killed after checkpoint-1: both processes resume from it (each with its own RNG state) to the same model
    shutil.rmtree(out / "final")
    shutil.rmtree(out / f"checkpoint-{STEPS}")
    result = launch("fsdp.yaml", pool, out, "--resume")
    assert result.stdout.count("resumed from checkpoint-1") == 2
    assert_same_run_as_one_process(out, single_process, distributed_type="multi-CPU", resumed=True)


@pytest.mark.slow
def test_resuming_a_finished_run_in_two_processes(pool, single_process, tmp_path):
    """The last checkpoint already ends the run: one process makes it OUTPUT_DIR/final, the other waits (both
    used to write the same temp folder)."""
    out = tmp_path / "run"
    shutil.copytree(single_process, out)
    shutil.rmtree(out / "final")
    launch("fsdp.yaml", pool, out, "--resume")
    assert (out / "final" / "model.safetensors").read_bytes() == (
        single_process / "final" / "model.safetensors"
    ).read_bytes()
    record = json.loads((out / "final" / "deita_run.json").read_text())
    assert record["results"]["global_step"] == STEPS
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp folder left


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_configs_launch_two_cpu_processes(pool, single_process, tmp_path, stage):
    pytest.importorskip(
        "deepspeed",
        reason="DeepSpeed is not installed (pip install 'deita-hub[deepspeed]'; not in the [test] extra)",
    )
    out = tmp_path / "run"
    result = launch(f"deepspeed-zero{stage}.yaml", pool, out)
    assert "the launch asked for" not in result.stderr
    assert_same_run_as_one_process(out, single_process, distributed_type="deepspeed")
    # DeepSpeed's own checkpoint (sharded optimizer state) sits beside the gathered weights, for --resume
    assert (out / f"checkpoint-{STEPS}" / f"global_step{STEPS}").is_dir()
