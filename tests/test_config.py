"""One declaration per option: every config field is settable from its command and from a recipe, with help, and
errors name the flag on the command line and the file and key in a file."""

import dataclasses
import json

import pytest
import yaml

from deita_hub.cli import cli, main
from deita_hub.config import apply_overrides, flag_name, load
from deita_hub.conversations import FormatSpec
from deita_hub.embedding import EmbedConfig
from deita_hub.errors import DeitaHubError
from deita_hub.evaluation.config import EvalConfig
from deita_hub.recipes import PoolSpec, load_recipe
from deita_hub.scoring import ScoreConfig
from deita_hub.selection import SelectionConfig
from deita_hub.training.config import TrainConfig

COMMANDS = {
    "select": (SelectionConfig, FormatSpec, PoolSpec),
    "embed": (EmbedConfig, FormatSpec, PoolSpec),
    "score": (ScoreConfig, FormatSpec, PoolSpec),
    "train": (TrainConfig,),
    "eval": (EvalConfig,),
}
# Fields a recipe sets through its own structure instead of the command's flag.
RECIPE_ONLY = {"sources", "generate", "rows", "seed"}
# A value of the right type for each field, different from its default.
SAMPLE = {
    str: "x",
    int: 32,
    float: 0.5,
    bool: True,
}


def _options(command_name: str) -> dict[str, object]:
    command = cli.commands[command_name]
    return {param.name: param for param in command.params}


@pytest.mark.parametrize("command_name", sorted(COMMANDS))
def test_every_field_is_an_option_with_help(command_name):
    options = _options(command_name)
    for cls in COMMANDS[command_name]:
        for f in dataclasses.fields(cls):
            if f.name in RECIPE_ONLY or (cls is PoolSpec and f.name == "format"):
                continue
            assert f.name in options, f"{cls.__name__}.{f.name} has no option on `deita-hub {command_name}`"
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            if f.metadata.get("argument"):
                continue
            assert flag_name(f) in options[f.name].opts or any(
                flag_name(f) in opt for opt in options[f.name].opts
            )


def test_every_command_option_has_help():
    for name, command in cli.commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"deita-hub {name} {param.opts[0]} has no help"


def _recipe(tmp_path, **sections):
    (tmp_path / "pool.jsonl").write_text(
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n"
    )
    data = {"name": "t", "pool": {"sources": ["pool.jsonl"]}, "configs": [{"name": "a", "budget": 1}]}
    data.update(sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _changed(f: dataclasses.Field):
    choices = f.metadata.get("choices")
    default = f.default if f.default is not dataclasses.MISSING else None
    if choices:
        return next(c for c in choices if c != default)
    if f.name == "vllm_options":
        return {"enforce_eager": True}
    if f.name == "role_map":
        return {"tool": "assistant"}
    if f.name in ("model", "device"):
        return "cpu" if f.name == "device" else "some/model"
    for kind, value in SAMPLE.items():
        if kind.__name__ in str(f.type):
            return value
    raise AssertionError(f"no sample value for {f.name}: {f.type}")


@pytest.mark.parametrize(
    ("cls", "section"),
    [(SelectionConfig, "selection"), (EmbedConfig, "embedding"), (ScoreConfig, "scores.complexity")],
)
def test_every_field_is_settable_from_a_recipe(tmp_path, cls, section):
    for f in dataclasses.fields(cls):
        if cls is ScoreConfig and f.name == "scorer":
            continue  # named by the section (scores.complexity / scores.quality)
        value = _changed(f)
        settings = {f.name: value}
        if cls is EmbedConfig and f.name != "model":
            settings["model"] = "some/model"  # the last-token method needs one
        if cls is EmbedConfig and f.name == "method":
            settings["model"] = "some/model"
        if cls is ScoreConfig and f.name != "model":
            settings["model"] = "some/model"
        if section == "scores.complexity":
            recipe = load_recipe(_recipe(tmp_path, scores={"complexity": settings}))
            got = recipe.scores.complexity
        elif section == "embedding":
            recipe = load_recipe(_recipe(tmp_path, embedding=settings))
            got = recipe.embedding.config
        else:
            recipe = load_recipe(_recipe(tmp_path, configs=[{"name": "a", **settings}]))
            got = recipe.subsets[0].selection
        assert getattr(got, f.name) == value, f.name


def test_every_field_is_settable_from_its_command(tmp_path, monkeypatch):
    """Parse each command with every field's flag set to a non-default value; the built config holds them."""
    from deita_hub.config import from_cli, take

    for command_name, classes in (
        ("select", (SelectionConfig,)),
        ("embed", (EmbedConfig,)),
        ("score", (ScoreConfig,)),
    ):
        command = cli.commands[command_name]
        for cls in classes:
            args = ["pool.jsonl", "--out", "o.jsonl"]
            expected = {}
            for f in dataclasses.fields(cls):
                value = _changed(f)
                if f.name == "scorer":
                    value = "quality"
                expected[f.name] = value
                if isinstance(value, bool):
                    args.append(flag_name(f))
                elif isinstance(value, dict):
                    for key, item in value.items():
                        args += [
                            flag_name(f),
                            f"{key}={str(item).lower() if isinstance(item, bool) else item}",
                        ]
                else:
                    args += [flag_name(f), str(value)]
            ctx = command.make_context(command_name, args)
            config = from_cli(cls, take(dict(ctx.params), cls))
            for name, value in expected.items():
                assert getattr(config, name) == value, (command_name, name)


def test_cli_errors_name_the_flag(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text("{}\n")
    code = main(
        ["select", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--max-similarity", "2"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "--max-similarity is a cosine similarity" in err and "max_similarity" not in err
    code = main(["select", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--budget", "0"])
    assert code == 1 and "--budget must be a positive integer" in capsys.readouterr().err
    code = main(["embed", str(tmp_path / "p.jsonl"), "--out", "e.npy", "--method", "last-token"])
    assert code == 1 and "--model is needed" in capsys.readouterr().err
    assert not list(tmp_path.glob("o.*"))


def test_file_errors_name_the_file_and_key(tmp_path):
    path = _recipe(tmp_path, selection={"max_similarity": 2})
    with pytest.raises(DeitaHubError, match=r"recipe.yaml: configs\[0\]: 'max_similarity' is a cosine"):
        load_recipe(path)
    path = _recipe(tmp_path, scores={"complexity": {"model": "m", "batch_sise": 2}})
    with pytest.raises(
        DeitaHubError, match=r"scores.complexity: unknown key\(s\) 'batch_sise' \(did you mean 'batch_size'"
    ):
        load_recipe(path)
    path = _recipe(tmp_path, scores={"complexity_model": "m"})
    with pytest.raises(DeitaHubError, match="one section per scorer"):
        load_recipe(path)
    path = _recipe(tmp_path, pool={"sources": ["pool.jsonl"], "format": {"output_feild": "x"}})
    with pytest.raises(
        DeitaHubError, match=r"pool.format: unknown key\(s\) 'output_feild' \(did you mean 'output_field'"
    ):
        load_recipe(path)


def test_one_loader_coerces_types():
    config = load(TrainConfig, {"learning_rate": "2e-5", "language": "de", "bf16": "false"}, source="c.yaml")
    assert config.learning_rate == 2e-5 and config.language == ["de"] and config.bf16 is False
    with pytest.raises(DeitaHubError, match="c.yaml: 'max_length' must be int, got str"):
        load(TrainConfig, {"max_length": "2048"}, source="c.yaml")
    with pytest.raises(DeitaHubError, match="c.yaml: 'method' may not be null"):
        load(TrainConfig, {"method": None}, source="c.yaml")
    with pytest.raises(DeitaHubError, match="c.yaml: expected a mapping"):
        load(TrainConfig, [1, 2], source="c.yaml")


def test_overrides_reach_nested_keys(tmp_path):
    data = {"selection": {"max_similarity": 0.9}, "configs": [{"name": "a", "budget": 5}]}
    out = apply_overrides(data, ["selection.max_similarity=0.8", "configs.0.budget=7", "card.license=mit"])
    assert out["selection"]["max_similarity"] == 0.8 and out["configs"][0]["budget"] == 7
    assert out["card"] == {"license": "mit"} and data["selection"]["max_similarity"] == 0.9
    with pytest.raises(DeitaHubError, match="--set takes KEY=VALUE"):
        apply_overrides(data, ["selection"])
    path = _recipe(tmp_path)
    assert load_recipe(path, ("configs.0.budget=9",)).subsets[0].selection.budget == 9


def test_version_in_process(capsys):
    assert main(["--version"]) == 0
    assert "deita-hub" in capsys.readouterr().out


def test_help_lists_commands_in_pipeline_order_without_cutting(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.startswith("  ")]
    assert listed.index("score") < listed.index("embed") < listed.index("select") < listed.index("build")
    assert listed.index("build") < listed.index("push") < listed.index("train")
    assert "..." not in out.split("Commands:")[1]


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_verbose_before_or_after_the_command(tmp_path, capsys, where):
    args = ["demo-pool", "--out", str(tmp_path / "p.jsonl"), "--rows", "3"]
    argv = ["-q", *args] if where == "before" else [*args, "-q"]
    assert main(argv) == 0  # an option the command does not know would exit 2
    assert main([*args, "-v"]) == 0 and main(["-v", *args]) == 0
    assert main([*args, "--loud"]) == 2
