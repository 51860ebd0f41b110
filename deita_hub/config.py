"""One declaration per option: a config dataclass field is the option, everywhere it appears.

A stage's frozen dataclass (`SelectionConfig`, `EmbedConfig`, `ScoreConfig`, `TrainConfig`, `EvalConfig`, ...) is
the single place an option is declared: its type, its default, its choices and its help. From it:

- `load(cls, mapping, source=...)` builds the dataclass from YAML/JSON data (recipes, training configs, eval
  results): type coercion, nested dataclasses, unknown keys with a did-you-mean, errors naming the file and key;
- `cli_options(cls)` generates the click options of the command that runs the stage (`max_similarity` is
  `--max-similarity`), and `from_cli(cls, values)` builds the dataclass from them, naming the flag the user typed
  when a value is refused;
- `describe(cls)` lists the keys for `--help-config`.

Field metadata keys: `help` (required), `choices` (a closed set), `flag` (the CLI name when it differs from the
field's, e.g. `--out` for `output_dir`), `aliases` (older flag names still accepted), `metavar`, `argument`
(a positional argument instead of an option), `cli` (False: settable from files only), `required` (the command
needs it even though the dataclass has a default).

Validation stays in each dataclass's `__post_init__`: it raises `ConfigError(field, message)`, which a file loader
reports as `FILE: section.key: message` and the CLI as `--flag: message`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from deita_hub.errors import DeitaHubError

_MISSING = dataclasses.MISSING

# The words every command uses for the same idea (one vocabulary): model weights' dtype, the device, and the
# vLLM engine settings.
DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HELP = "dtype of the model weights; auto: bfloat16 on a GPU, float32 on a CPU"
DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda if available)"
VLLM_OPTIONS_METADATA = {
    "help": "vllm backend: an extra vllm.EngineArgs setting, e.g. tensor_parallel_size=4",
    "flag": "--vllm-option",
    "metavar": "KEY=VALUE",
}


class ConfigError(DeitaHubError):
    """A value a config dataclass refuses; `problems` holds (field, message) pairs."""

    def __init__(self, field_name: str | None = None, message: str = "", problems=None):
        self.problems: list[tuple[str | None, str]] = list(problems or [(field_name, message)])
        super().__init__("; ".join(_join(name, text) for name, text in self.problems))

    def render(self, name_of: Callable[[str], str]) -> str:
        return "; ".join(_join(name_of(name) if name else None, text) for name, text in self.problems)


def _join(name: str | None, text: str) -> str:
    if not name:
        return text
    return f"{name} {text}" if name.startswith("-") else f"'{name}' {text}"


class Problems:
    """Collects every problem of a config before raising, so one run names them all."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def add(self, field_name: str, message: str) -> None:
        self.items.append((field_name, message))

    def choice(self, field_name: str, value: Any, allowed: Iterable) -> None:
        allowed = tuple(allowed)
        if value not in allowed:
            self.add(field_name, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")

    def positive(self, field_name: str, value: Any) -> None:
        if not value > 0:
            self.add(field_name, f"must be positive, got {value}")

    def fraction(self, field_name: str, value: float) -> None:
        if not 0 <= value < 1:
            self.add(field_name, f"must be in [0, 1), got {value}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(problems=self.items)


def check_choices(config: Any) -> Problems:
    """The `choices` of every field, checked: the start of each `__post_init__`."""
    problems = Problems()
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value is not None:
            problems.choice(f.name, value, choices)
    return problems


# --- reading mappings (YAML / JSON) ----------------------------------------------------------------------------


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _args(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _type_name(hint: Any) -> str:
    names = []
    for arg in _args(hint):
        if arg is type(None):
            continue
        origin = typing.get_origin(arg)
        if origin in (list, tuple):
            names.append("a list")
        elif origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
            names.append("a mapping")
        elif dataclasses.is_dataclass(arg):
            names.append("a mapping")
        else:
            names.append(getattr(arg, "__name__", str(arg)))
    return " or ".join(dict.fromkeys(names))


def coerce(value: Any, hint: Any, where: str) -> Any:
    """A YAML/JSON/CLI value as the field's type, or an error naming `where`. (PyYAML reads `2e-5` as a string.)"""
    args = _args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise DeitaHubError(f"{where} may not be null")
    for arg in args:
        if arg is type(None):
            continue
        origin = typing.get_origin(arg)
        if arg is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
        elif arg is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif arg is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif arg is str:
            if isinstance(value, str):
                return value
            if isinstance(value, int | float) and not isinstance(value, bool) and len(args) == 1:
                return str(value)  # a config name like `10k` may be typed as a number in YAML
        elif arg is Any:
            return value
        elif origin in (list, tuple):
            items = [value] if isinstance(value, str) and len(args) == 1 else value
            if isinstance(items, list | tuple):
                inner = typing.get_args(arg)[0] if typing.get_args(arg) else Any
                coerced = [coerce(item, inner, f"{where}[{i}]") for i, item in enumerate(items)]
                return tuple(coerced) if origin is tuple else coerced
        elif origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
            if isinstance(value, Mapping):
                key_hint, value_hint = typing.get_args(arg) or (str, Any)
                return {
                    coerce(k, key_hint, where): coerce(v, value_hint, f"{where}.{k}")
                    for k, v in value.items()
                }
        elif dataclasses.is_dataclass(arg):
            if isinstance(value, arg):
                return value
    raise DeitaHubError(f"{where} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")


def unknown_keys(keys: Iterable[Any], known: Iterable[str], where: str, hint: str = "") -> None:
    """One error for the keys that are not known, each with the closest known key when there is one."""
    known = list(known)
    unknown = [key for key in keys if key not in known]
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1)
        # repr() for a key with a newline or other control character: the message stays one line
        shown = f"'{key}'" if isinstance(key, str) and key.isprintable() else repr(key)
        parts.append(shown + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise DeitaHubError(f"{where}unknown key(s) {', '.join(parts)}{hint}")


def load(cls, data: Any, *, source: str, section: str = "", extra: Mapping[str, Any] | None = None):
    """Build `cls` from a mapping read from `source` (a file name); `section` names where it sits (`pool.format`).

    Errors read `SOURCE: SECTION: 'key' message`, so the user finds the line to change.
    """
    where = f"{source}: {section}: " if section else f"{source}: "
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise DeitaHubError(f"{where}expected a mapping of keys, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown_keys(data, known, where)
    hints = _hints(cls)
    values = {}
    for key, value in data.items():
        nested = next((arg for arg in _args(hints[key]) if dataclasses.is_dataclass(arg)), None)
        if nested is not None and isinstance(value, Mapping):
            values[key] = load(nested, value, source=source, section=f"{section}.{key}" if section else key)
        else:
            values[key] = coerce(value, hints[key], f"{where}'{key}'")
    values.update(extra or {})
    missing = [
        name
        for name, f in known.items()
        if name not in values and f.default is _MISSING and f.default_factory is _MISSING
    ]
    if missing:
        raise DeitaHubError(f"{where}'{missing[0]}' is required")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise DeitaHubError(where + exc.render(lambda name: name)) from None


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML (or JSON) file holding a mapping, with one-line errors naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DeitaHubError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DeitaHubError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DeitaHubError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise DeitaHubError(f"{path}: nested too deeply to read") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise DeitaHubError(f"{path}: expected a mapping of {what} keys, got {type(data).__name__}")
    return dict(data)


def apply_overrides(data: dict[str, Any], pairs: Iterable[str], option: str = "--set") -> dict[str, Any]:
    """`KEY=VALUE` pairs (dotted keys reach nested sections, values are YAML) applied to a copy of `data`."""
    import copy

    import yaml

    data = copy.deepcopy(data)
    for key, raw in parse_pairs(pairs, option).items():
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            index = int(part) if part.isdigit() and isinstance(target, list) else part
            try:
                target = target[index]
            except (KeyError, IndexError, TypeError):
                if isinstance(target, dict):
                    target = target.setdefault(part, {})
                else:
                    raise DeitaHubError(f"{option} {key}: no section '{part}' to set") from None
            if not isinstance(target, dict | list):
                raise DeitaHubError(f"{option} {key}: '{part}' is not a section")
        last = parts[-1]
        if isinstance(target, list):
            if not last.isdigit() or int(last) >= len(target):
                raise DeitaHubError(f"{option} {key}: no item {last}")
            target[int(last)] = value
        else:
            target[last] = value
    return data


def parse_pairs(values: Iterable[str], option: str) -> dict[str, str]:
    pairs = {}
    for item in values:
        if "=" not in item:
            raise DeitaHubError(f"{option} takes KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value.strip()
    return pairs


# --- the CLI ---------------------------------------------------------------------------------------------------


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _is_mapping(hint: Any) -> bool:
    return any(
        (origin := typing.get_origin(arg)) is not None
        and isinstance(origin, type)
        and issubclass(origin, Mapping)
        for arg in _args(hint)
    )


def _is_sequence(hint: Any) -> bool:
    return any(typing.get_origin(arg) in (list, tuple) for arg in _args(hint))


def _scalar(hint: Any) -> Any:
    for arg in _args(hint):
        if arg in (int, float, bool):
            return arg
    return str


def _default_text(f: dataclasses.Field) -> str | None:
    if f.default is not _MISSING:
        value = f.default
    elif f.default_factory is not _MISSING:
        value = f.default_factory()
    else:
        return None
    if value is None or value in ({}, (), [], ""):
        return None
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def cli_fields(
    cls, *, only: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> list[dataclasses.Field]:
    exclude = set(exclude)
    chosen = [
        f
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli", True)
        and f.name not in exclude
        and not dataclasses.is_dataclass(_hints(cls)[f.name])
    ]
    if only is not None:
        order = list(only)
        by_name = {f.name: f for f in chosen}
        chosen = [by_name[name] for name in order]
    return chosen


def cli_options(
    cls, *, only: Iterable[str] | None = None, exclude: Iterable[str] = (), overrides: bool = False
):
    """Click options (and a positional argument where a field says so) generated from `cls`'s fields.

    With `overrides=True` (commands that also read a YAML file) every option defaults to None, meaning "keep the
    file's value", and the help shows the dataclass default instead.
    """
    import click

    hints = _hints(cls)
    decorators = []
    for f in cli_fields(cls, only=only, exclude=exclude):
        hint = hints[f.name]
        meta = f.metadata
        if meta.get("argument"):
            decorators.append(click.argument(f.name, required=meta.get("required", True)))
            continue
        help_text = meta.get("help", "")
        default = _default_text(f)
        names = [flag_name(f), *meta.get("aliases", ())]
        kwargs: dict[str, Any] = {"help": help_text, "metavar": meta.get("metavar")}
        required = meta.get("required", False) or (f.default is _MISSING and f.default_factory is _MISSING)
        if _is_mapping(hint):
            kwargs.update(multiple=True, metavar=meta.get("metavar", "KEY=VALUE"))
            kwargs["help"] = f"{help_text} (repeatable)"
        elif _is_sequence(hint):
            kwargs.update(multiple=True)
            kwargs["help"] = f"{help_text} (repeatable, or comma-separated)"
            if default:
                kwargs["help"] += f"  [default: {default}]"
        elif "flag_value" in meta:  # a str field set by a plain flag: `--skip-invalid` means on_invalid=skip
            kwargs.update(flag_value=meta["flag_value"], default=None)
            kwargs.pop("metavar")
        elif _scalar(hint) is bool:
            on, off = names[0], "--no-" + names[0][2:]
            names = [f"{on}/{off}", *meta.get("aliases", ())]
            kwargs.update(default=None)
            kwargs.pop("metavar")
            if default:
                kwargs["help"] += f"  [default: {'on' if default == 'True' else 'off'}]"
        else:
            choices = meta.get("choices")
            kwargs["type"] = click.Choice([str(c) for c in choices]) if choices else _scalar(hint)
            if default is not None:
                kwargs["help"] += f"  [default: {default}]"
        if required and not overrides:
            kwargs["required"] = True
        decorators.append(click.option(*names, f.name, **kwargs))

    def decorate(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


def take(
    values: dict[str, Any], cls, *, only: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> dict:
    """Pop the values of `cls`'s generated options out of a command's keyword arguments (None and empty = unset)."""
    taken = {}
    for f in cli_fields(cls, only=only, exclude=exclude):
        if f.name not in values:
            continue
        value = values.pop(f.name)
        if value is None or value == ():
            continue
        taken[f.name] = value
    return taken


def cli_values(cls, values: Mapping[str, Any]) -> dict[str, Any]:
    """Parsed option values in the shape a YAML file gives them: KEY=VALUE options as mappings (values read as
    YAML), repeatable or comma-separated options as lists."""
    hints = _hints(cls)
    out = {}
    for name, value in values.items():
        hint = hints[name]
        if _is_mapping(hint):
            value = _yaml_values(parse_pairs(value, flag_name(cls.__dataclass_fields__[name])))
        elif _is_sequence(hint) and isinstance(value, tuple):
            value = [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        out[name] = value
    return out


def from_cli(cls, values: Mapping[str, Any], *, base: Any = None, extra: Mapping[str, Any] | None = None):
    """Build `cls` from parsed option values (over `base` when given); errors name the flag the user typed."""
    hints = _hints(cls)
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    changes = {
        name: coerce(value, hints[name], flag_name(fields_by_name[name]))
        for name, value in cli_values(cls, values).items()
    }
    changes.update(extra or {})

    def name_of(field_name: str) -> str:
        return flag_name(fields_by_name[field_name]) if field_name in fields_by_name else field_name

    try:
        return dataclasses.replace(base, **changes) if base is not None else cls(**changes)
    except ConfigError as exc:
        raise DeitaHubError(exc.render(name_of)) from None


def _yaml_values(pairs: dict[str, str]) -> dict[str, Any]:
    import yaml

    out = {}
    for key, raw in pairs.items():
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key] = raw
    return out


# --- documentation ---------------------------------------------------------------------------------------------


def describe(cls, *, prefix: str = "", indent: str = "  ") -> list[str]:
    """`--help-config` lines: every key (nested sections too) with its default and help."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        nested = next((arg for arg in _args(hint) if dataclasses.is_dataclass(arg)), None)
        if nested is not None:
            lines.append(f"{indent}{prefix}{f.name}:  {f.metadata.get('help', '')}")
            lines.extend(describe(nested, prefix=f"{prefix}{f.name}.", indent=indent))
            continue
        default = _default_text(f)
        choices = f.metadata.get("choices")
        head = f"{indent}{prefix}{f.name}"
        if f.default is _MISSING and f.default_factory is _MISSING:
            head += " (required)"
        elif default is not None:
            head += f" (default: {default})"
        else:
            head += " (default: none)"
        text = f.metadata.get("help", "")
        if choices:
            text += f" [{' | '.join(map(str, choices))}]"
        lines.append(f"{head}\n{indent}    {text}")
    return lines


@functools.cache
def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))
