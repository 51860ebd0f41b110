"""Training configs: YAML <-> dataclass, the checks made before anything heavy loads, and the shipped files."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from deita_hub.errors import DeitaHubError, MissingExtraError
from deita_hub.training import config as training_config
from deita_hub.training.config import TrainConfig, check_environment, check_extras, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name",
    [
        "mistral-7b-qlora.yaml",
        "mistral-7b-lora.yaml",
        "mistral-7b-full.yaml",
        "tiny-cpu.yaml",
        "mistral-7b-dpo.yaml",
        "tiny-dpo-cpu.yaml",
    ],
)
def test_shipped_configs_mirror_the_dataclass_key_for_key(name):
    data = yaml.safe_load((CONFIGS / name).read_text())
    names = [f.name for f in fields(TrainConfig)]
    assert list(data) == [key for key in names if key in data]  # dataclass names, in declaration order
    if name == "mistral-7b-qlora.yaml":
        assert list(data) == names  # the complete reference: every key
    config = load_config(CONFIGS / name)
    assert load_config(name) == config  # packaged names resolve without a path


@pytest.mark.parametrize("name", ["mistral-7b-qlora.yaml", "mistral-7b-lora.yaml", "mistral-7b-full.yaml"])
def test_mistral_configs_carry_the_seed_hyperparameters(name):
    config = load_config(CONFIGS / name)
    assert config.model == "mistralai/Mistral-7B-v0.1"
    assert (config.learning_rate, config.lr_scheduler_type, config.warmup_ratio) == (2e-5, "cosine", 0.1)
    assert (config.num_train_epochs, config.seed, config.max_length, config.bf16) == (6.0, 42, 2048, True)
    assert (config.per_device_train_batch_size, config.total_train_batch_size) == (1, 512)
    assert config.gradient_accumulation_steps(4) == 128  # the seed run: 4 GPUs
    assert config.method == name.split("-")[2].split(".")[0]


def test_qlora_config_is_nf4_double_quant_bf16_all_linear():
    config = load_config(CONFIGS / "mistral-7b-qlora.yaml")
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant, config.bnb_4bit_compute_dtype) == (
        "nf4",
        True,
        "bfloat16",
    )
    assert config.lora_target_modules == "all-linear"


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: lora\nlearning_rat: 1.0e-4\n")
    with pytest.raises(
        DeitaHubError, match=r"unknown key\(s\) 'learning_rat' \(did you mean 'learning_rate'\?\)"
    ):
        load_config(path)
    with pytest.raises(DeitaHubError, match=r"unknown key\(s\) 'lora_rank'"):
        load_config(None, {"lora_rank": 8})


def test_values_are_type_checked_and_coerced(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 2e-5\nmax_length: '2048'\n")  # PyYAML reads 2e-5 as a string
    with pytest.raises(DeitaHubError, match="'max_length' must be int"):
        load_config(path)
    path.write_text("learning_rate: 2e-5\nlora_target_modules: [q_proj, v_proj]\n")
    config = load_config(path)
    assert config.learning_rate == 2e-5 and config.lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(DeitaHubError, match="'method' must be one of qlora, lora, full"):
        load_config(None, {"method": "dora"})
    with pytest.raises(DeitaHubError, match="'push' must be a Hub repo id"):
        load_config(None, {"push": "not-a-repo"})
    with pytest.raises(DeitaHubError, match="'model' must be one of tiny:mistral, tiny:llama"):
        load_config(None, {"model": "tiny:gpt2"})


def test_batch_arithmetic_must_be_whole():
    config = TrainConfig(per_device_train_batch_size=3, total_train_batch_size=512)
    with pytest.raises(
        DeitaHubError, match=r"not a multiple of devices \(2\) x per_device_train_batch_size \(3\)"
    ):
        config.gradient_accumulation_steps(2)
    assert TrainConfig(per_device_train_batch_size=4).gradient_accumulation_steps(2) == 64


def test_gpu_only_options_fail_on_cpu_with_what_to_change():
    with pytest.raises(DeitaHubError, match="flash_attention_2 needs a CUDA GPU"):
        check_environment(
            TrainConfig(bf16=False, attn_implementation="flash_attention_2"), cuda_available=False
        )
    # QLoRA itself runs on CPU (bitsandbytes CPU kernels), and so does bf16 (CPU autocast): both are allowed
    check_environment(TrainConfig(method="qlora", bf16=False), cuda_available=False)
    check_environment(TrainConfig(bf16=True), cuda_available=False)
    check_environment(TrainConfig(bf16=True), cuda_available=True)


def test_missing_extra_names_the_extra(monkeypatch):
    real = training_config._has_module
    monkeypatch.setattr(training_config, "_has_module", lambda name: name != "bitsandbytes" and real(name))
    with pytest.raises(MissingExtraError, match=r"deita-hub\[qlora\]"):
        check_extras(TrainConfig(method="qlora"))
    check_extras(TrainConfig(method="lora"))
    monkeypatch.setattr(training_config, "_has_module", lambda name: name != "peft" and real(name))
    with pytest.raises(MissingExtraError, match=r"'peft' package: pip install 'deita-hub\[train\]'"):
        check_extras(TrainConfig(method="lora"))


def test_cli_reports_bad_configs_before_loading_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\nper_device_batch: 2\n")
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "deita_hub", "train", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    result = run(str(bad))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: ") and "'per_device_batch'" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("tiny-cpu.yaml", "--dataset", "x.jsonl", "--set", "total_train_batch_size=7")
    assert result.returncode == 1 and "total_train_batch_size 7 is not a multiple" in result.stderr
    result = run("tiny-cpu.yaml", "--dataset", "x.jsonl", "--set", "attn_implementation=flash_attention_3")
    assert result.returncode == 1 and "flash_attention_3 needs a CUDA GPU" in result.stderr
    result = run("--help-config")
    assert result.returncode == 0 and "total_train_batch_size" in result.stdout and "lora_r" in result.stdout


def test_accelerate_configs_load_and_point_at_existing_deepspeed_files():
    from accelerate.commands.config.config_args import ClusterConfig

    fsdp = ClusterConfig.from_yaml_file(str(CONFIGS / "accelerate" / "fsdp.yaml"))
    assert str(fsdp.distributed_type).endswith("FSDP")
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "MistralDecoderLayer"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    for stage in (2, 3):
        cluster = ClusterConfig.from_yaml_file(str(CONFIGS / "accelerate" / f"deepspeed-zero{stage}.yaml"))
        assert str(cluster.distributed_type).endswith("DEEPSPEED")
        ds_file = REPO_ROOT / cluster.deepspeed_config["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] == stage
        # batch sizes come from the deita-hub config, never from a second copy here
        assert ds["gradient_accumulation_steps"] == ds["train_micro_batch_size_per_gpu"] == "auto"
