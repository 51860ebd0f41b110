"""`deita-hub`: one click group. Each command parses its options, calls one library function, prints a result.

The options of a stage's command are generated from that stage's config dataclass (`deita_hub.config`): the
dataclass is the one declaration of name, type, default, choices and help. Commands that read a YAML file (`build`,
`train`) take the same options as overrides of the file, plus `--set KEY=VALUE` for any key.

Domain errors (DeitaHubError) become one line on stderr and exit code 1; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import click

from deita_hub import __version__
from deita_hub.config import cli_options, cli_values, describe, from_cli, parse_pairs, take
from deita_hub.conversations import FormatSpec
from deita_hub.embedding import EmbedConfig
from deita_hub.errors import DeitaHubError
from deita_hub.evaluation.config import EvalConfig
from deita_hub.progress import QUIET_ENV
from deita_hub.recipes import PoolSpec, ScoresSpec
from deita_hub.scoring.config import ScoreConfig
from deita_hub.selection import SelectionConfig
from deita_hub.training.config import TrainConfig

# Pipeline order, the order `deita-hub --help` lists the commands in.
ORDER = (
    "demo-pool",
    "recipe",
    "score",
    "embed",
    "select",
    "build",
    "push",
    "train",
    "merge",
    "chat",
    "eval",
    "ablate",
    "card",
)

log = logging.getLogger("deita_hub")


def _set_verbosity(verbose: int, quiet: bool) -> None:
    """By default a command prints its own progress and results only: other libraries' INFO lines, weight-loading
    bars and warnings that do not concern the command are silenced. -v shows them; -q hides progress too."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    logging.basicConfig(handlers=[handler], force=True)
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)
    log.setLevel(level)
    logging.getLogger("huggingface_hub").propagate = bool(verbose)
    # deita-hub's own bars (`progress_bar`), in this process and its children
    os.environ[QUIET_ENV] = "1" if quiet else "0"
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        import warnings

        warnings.filterwarnings("ignore", module="bitsandbytes")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")


class _Formatter(logging.Formatter):
    """deita-hub's own lines as plain text (warnings prefixed `warning:`); other libraries' with their names."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name.split(".")[0] == "deita_hub" and record.levelno >= logging.INFO:
            return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"
        return f"{record.levelname} {record.name}: {message}"


def _verbosity_callback(ctx, param, value):
    store = ctx.ensure_object(dict)
    store[param.name] = store.get(param.name) or value
    _set_verbosity(store.get("verbose") or 0, bool(store.get("quiet")))
    return value


def _verbosity_options(command):
    """-v/--verbose and -q/--quiet: accepted before and after the command's name."""
    command = click.option(
        "-q",
        "--quiet",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_verbosity_callback,
        help="Print results and errors only (no progress).",
    )(command)
    return click.option(
        "-v",
        "--verbose",
        count=True,
        expose_value=False,
        is_eager=True,
        callback=_verbosity_callback,
        help="Also show other libraries' logs and progress bars.",
    )(command)


class _Command(click.Command):
    def get_short_help_str(self, limit: int = 45) -> str:
        # the whole first sentence of the docstring: click's default cuts it at 45 characters
        return (self.help or "").strip().split("\n")[0].rstrip(".")


class _Group(click.Group):
    command_class = _Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DeitaHubError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)

    def list_commands(self, ctx):
        return sorted(self.commands, key=lambda name: ORDER.index(name) if name in ORDER else len(ORDER))

    def get_short_help_str(self, limit: int = 45) -> str:
        return (self.help or "").strip().split("\n")[0].rstrip(".")

    def add_command(self, cmd, name=None):
        _verbosity_options(cmd)
        super().add_command(cmd, name)


_Group.group_class = _Group


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="deita-hub")
@_verbosity_options
def cli() -> None:
    """Deita data selection and Hugging Face Hub releases: score, embed, select, build, push, train, eval."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's stop), raised where Ctrl-C raises KeyboardInterrupt: the same cleanup and
    progress saving run, and the exit code says which signal it was (143 = 128 + SIGTERM)."""


def _raise_terminated(signum, frame):
    raise Terminated


def _install_stop_signals() -> dict:
    """Ctrl-C and SIGTERM raise in the main thread; returns the previous handlers for `_restore_signals`."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}  # handlers can only be set from the main thread
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # SIGINT's handler is set explicitly: a process started in the background by a non-interactive shell
    # inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminated)
    return previous


def _restore_signals(previous: dict) -> None:
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _quiet_unrelated_loggers() -> None:
    # sentence-transformers imports transformers.trainer_utils, which imports peft, which imports bitsandbytes
    # when installed ([qlora]); on import bitsandbytes logs a warning about its optional `kernels` package for
    # CPU 4-bit matmuls, which only 4-bit weights use, or, with `kernels` installed (transformers >= 5.25 requires
    # it), `kernels` warns that offline it skips the check of the kernel's publisher. A command prints only what
    # concerns its own work.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """The console script; tests call it in-process: `main(["select", ...])` returns the exit code.

    Exit codes: 0 done, 1 a DeitaHubError (one line), 2 a usage error, 130 Ctrl-C, 143 SIGTERM."""
    from deita_hub.io import disk_full_error, is_disk_full

    _quiet_unrelated_loggers()
    previous = _install_stop_signals()
    try:
        # without standalone mode click returns the code of `ctx.exit(code)` instead of raising
        code = cli.main(args=argv, prog_name="deita-hub", standalone_mode=False)
        if isinstance(code, int) and code:
            return code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort as exc:
        # click turns KeyboardInterrupt (and so Terminated) into Abort, keeping it as the cause
        return _interrupted(exc.__cause__)
    except DeitaHubError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except (OSError, RuntimeError) as exc:
        if not is_disk_full(exc):
            raise
        # A write outside deita-hub's own writers (a library saving a checkpoint) ran out of space.
        filename = getattr(exc, "filename", None)
        if filename:
            click.echo(f"error: {disk_full_error(filename, kept=False)}", err=True)
        else:
            # pyarrow and torch do not always say which file; the current folder's free space would mislead
            reason = str(exc).splitlines()[0] if str(exc) else "no space left on device"
            click.echo(
                f"error: a write ran out of space ({reason}); free some space or write elsewhere, then run the "
                "command again",
                err=True,
            )
        return 1
    finally:
        _restore_signals(previous)
        _forget_unhandled_interrupt()  # the code returned is the process's, however an interrupt was handled
    return 0


def _interrupted(exc: BaseException | None) -> int:
    """One line and the exit code of the signal; a stage that kept its progress has said so, with the command
    that resumes it, and that line is the one."""
    terminated = isinstance(exc, Terminated)
    if not getattr(exc, "progress_reported", False):
        click.echo("terminated" if terminated else "interrupted", err=True)
    return 143 if terminated else 130


def _forget_unhandled_interrupt() -> None:
    """CPython notes a KeyboardInterrupt that ends code `exec` runs from a string (a dataclass's generated
    methods, while a lazily imported module loads) as unhandled, even once caught; a `python -m deita_hub`
    process then exits by killing itself with SIGINT, whatever code `main` returns (exit status -2 instead of
    130: about one Ctrl-C in 20 at the start of a `select` walk). Each string `exec` clears that note first,
    and one that completes leaves it clear."""
    exec("pass")  # a constant string: the exec that clears the note


# --- options shared by several commands -------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """Where a command publishes its output on the Hub (build, push, merge, eval)."""

    push: str | None = field(
        default=None, metadata={"help": "Hub repo id (org/name) to push to", "metavar": "REPO_ID"}
    )
    tag: str | None = field(
        default=None, metadata={"help": "tag the pushed commit (an existing tag never moves)"}
    )
    private: bool = field(
        default=False, metadata={"help": "create the repo private (an existing repo keeps its visibility)"}
    )
    branch: str | None = field(
        default=None,
        metadata={"help": "branch to push to (created from main if missing; default main)"},
    )


def pool_options(command):
    """The options of every command that reads a pool: PoolSpec's and FormatSpec's fields, plus `--field`."""
    command = click.option(
        "--field",
        "fields",
        multiple=True,
        metavar="NAME=COLUMN",
        help="shorthand for the --*-field options, e.g. --field output=response (repeatable)",
    )(command)
    command = cli_options(FormatSpec)(command)
    return cli_options(PoolSpec)(command)


def _read_pool(pool: str, values: dict):
    """Read POOL with the pool options in `values` (popped from it)."""
    from deita_hub.pool import read_pool

    fields = values.pop("fields", ())
    spec_values = take(values, FormatSpec)
    names = {
        name.removesuffix("_field") for name in FormatSpec.__dataclass_fields__ if name.endswith("_field")
    }
    for name, column in parse_pairs(fields, "--field").items():
        short = name.removesuffix("_field")
        if short not in names:
            raise DeitaHubError(f"--field: unknown field '{name}'; one of {', '.join(sorted(names))}")
        spec_values[f"{short}_field"] = column
    spec = from_cli(FormatSpec, spec_values)
    source = from_cli(PoolSpec, take(values, PoolSpec), extra={"format": spec})
    return read_pool(
        pool,
        source.format,
        on_invalid=source.on_invalid,
        config=source.config,
        split=source.split,
        revision=source.revision,
    )


def _write_invalid(pool, out) -> None:
    if pool.invalid:
        from deita_hub.io import write_rows

        path = Path(str(out) + ".invalid.jsonl")
        write_rows(pool.invalid, path)
        click.echo(f"skipped {len(pool.invalid)} invalid row(s); reasons in {path}", err=True)


def _help_config(lines_of):
    """An eager `--help-config` option printing the config keys `lines_of()` lists."""

    def callback(ctx, _param, value):
        if not value or ctx.resilient_parsing:
            return
        title, lines = lines_of()
        click.echo(title + "\n")
        for line in lines:
            click.echo(line)
        ctx.exit()

    return click.option(
        "--help-config",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=callback,
        help="List every key of the YAML file with its default and meaning, then exit.",
    )


_SET = click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any key of the file (dotted for nested keys; the value is YAML). Repeatable.",
)


def _report_push(result) -> None:
    if result.created_commit:
        click.echo(f"pushed {result.repo_type} {result.repo_id}@{result.revision}: {result.commit_url}")
    else:
        click.echo(
            f"unchanged: {result.repo_type} {result.repo_id}@{result.revision} already holds this content "
            f"({result.head_oid[:12]}); no commit made"
        )
    if result.tag:
        click.echo(f"tag {result.tag} -> {result.head_oid[:12]} ({result.url}/tree/{result.tag})")


# --- pool / score / embed / select / build ----------------------------------------------------------------------


@cli.command("demo-pool")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .jsonl.")
@click.option("--rows", default=2400, show_default=True, type=int, help="Conversations to write.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the generator.")
def demo_pool(out, rows, seed):
    """Write the demo recipe's synthetic ShareGPT pool (synthetic scores included) to try the commands on."""
    from deita_hub.demo import generate_pool
    from deita_hub.io import write_rows

    write_rows(generate_pool(rows, seed), out)
    click.echo(f"wrote {out}: {rows} synthetic conversations")


@cli.command()
@click.argument("pool")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output .jsonl: every input field plus complexity_scores / quality_scores.",
)
@cli_options(ScoreConfig)
@pool_options
def score(pool, out, **values):
    """Score POOL with a Deita scorer, per (user, assistant) pair; resumes an interrupted run of the same OUT."""
    from deita_hub.scoring import failures_path, score_pool
    from deita_hub.scoring.run import check_output

    config = from_cli(ScoreConfig, take(values, ScoreConfig))
    check_output(out)  # a bad --out is said before a large pool is read
    data = _read_pool(pool, values)
    meta = score_pool(data, config, out)
    _write_invalid(data, out)
    rate = f", {meta['rows_per_second']} rows/s" if meta.get("rows_per_second") else ""
    click.echo(
        f"wrote {out}: {meta['num_rows']} rows, {meta['num_pairs']} pairs scored ({meta['output_field']}"
        f"{rate}; {meta['resumed_rows']} resumed, {meta['truncated_pairs']} truncated)"
    )
    if meta["num_failed_rows"]:
        click.echo(
            f"{meta['num_failed_rows']} row(s) could not be scored (null scores); reasons in "
            f"{failures_path(Path(out))}",
            err=True,
        )


@cli.command()
@click.argument("pool")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Output .npy (+ .npy.json metadata)."
)
@cli_options(EmbedConfig)
@pool_options
def embed(pool, out, **values):
    """Embed every conversation of POOL into a memory-mappable .npy matrix (resumable)."""
    from deita_hub.embedding import check_output, embed_pool

    config = from_cli(EmbedConfig, take(values, EmbedConfig))
    check_output(out)  # a bad --out is said before a large pool is read
    data = _read_pool(pool, values)
    path, meta = embed_pool(data.conversations, out, config, pool_provenance=data.provenance())
    _write_invalid(data, out)
    click.echo(f"wrote {path}: {meta['num_rows']} x {meta['dim']} ({meta['model']})")


@cli.command("select")
@click.argument("pool")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Output .jsonl, .json or .parquet."
)
@click.option(
    "--embeddings",
    default=None,
    type=click.Path(dir_okay=False),
    help="float32/float16 .npy whose rows align with the pool's valid rows (method deita).",
)
@click.option(
    "--baselines",
    is_flag=True,
    help="Also write the random, score and longest selections of the same budget the pool supports, as "
    "OUT.<method>.<ext> (score needs the pool's scores).",
)
@cli_options(SelectionConfig)
@cli_options(ScoresSpec, only=("complexity_field", "quality_field"))
@pool_options
def select_command(pool, out, embeddings, baselines, **values):
    """Select BUDGET rows of POOL: Deita's exact score-first, diversity-aware filter, or a baseline."""
    from deita_hub.subsets import run_select

    config = from_cli(SelectionConfig, take(values, SelectionConfig))
    columns = from_cli(ScoresSpec, take(values, ScoresSpec, only=("complexity_field", "quality_field")))
    data = _read_pool(pool, values)
    written = run_select(
        data,
        config,
        Path(out),
        embeddings=embeddings,
        baselines=baselines,
        complexity_field=columns.complexity_field,
        quality_field=columns.quality_field,
    )
    _write_invalid(data, out)
    for path, selection in written:
        stats = selection.stats
        click.echo(
            f"wrote {path}: {len(selection)} rows ({stats.get('method', config.method)}; scanned "
            f"{stats['scanned']}, rejected {stats['rejected']})"
        )


@cli.group("recipe")
def recipe_group():
    """Write a recipe for your own pool (then `deita-hub build` it)."""


@recipe_group.command("init")
@click.argument("pool")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="The recipe file to write (.yaml)."
)
@click.option("--name", default=None, help="The dataset's name (default: from the pool's file name).")
@click.option(
    "--embeddings",
    default=None,
    type=click.Path(dir_okay=False),
    help="A .npy from `deita-hub embed POOL` to use instead of embedding in `build`.",
)
@click.option(
    "--complexity-model", default=None, help="Complexity scorer for a pool without scores (default: Deita's)."
)
@click.option(
    "--quality-model", default=None, help="Quality scorer for a pool without scores (default: Deita's)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing recipe file.")
@pool_options
def recipe_init(pool, out, name, embeddings, complexity_model, quality_model, overwrite, **values):
    """Write a commented recipe for POOL: its detected format, score and embedding sources, the usual configs."""
    from deita_hub.io import write_text
    from deita_hub.recipes import init_recipe

    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise DeitaHubError(f"{out} exists; pass --overwrite to replace it")
    if out_path.suffix not in (".yaml", ".yml"):
        raise DeitaHubError(f"--out must end in .yaml or .yml, got {out}")
    if embeddings and not Path(embeddings).is_file():
        raise DeitaHubError(f"--embeddings: file not found: {embeddings}")
    spec = from_cli(
        PoolSpec,
        {
            key: values[key]
            for key in ("on_invalid", "config", "split", "revision")
            if values.get(key) is not None
        },
    )
    data = _read_pool(pool, values)
    text = init_recipe(
        data,
        pool,
        out_path,
        name=name,
        embeddings=embeddings,
        complexity_model=complexity_model,
        quality_model=quality_model,
        pool_spec=spec,
    )
    write_text(out_path, text)
    click.echo(
        f"wrote {out}: {len(data)} rows, format {data.spec.format}; build it with `deita-hub build {out} --out build/NAME`"
    )


def _recipe_help():
    from deita_hub.recipes import recipe_help

    return "Recipe keys (dataset_scripts/*.yaml; override any with --set KEY=VALUE):", recipe_help()


@cli.command()
@click.argument("recipe")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (Hub layout).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option(
    "--cache-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Embedding/pool cache (default $DEITA_HUB_CACHE or ~/.cache/deita-hub).",
)
@_SET
@cli_options(Publish)
@_help_config(_recipe_help)
def build(recipe, out, overwrite, cache_dir, sets, **values):
    """Build RECIPE (dataset_scripts/*.yaml) into a Hub-layout dataset folder; optionally push it."""
    from deita_hub.dataset import build as build_dataset
    from deita_hub.resources import resolve_resource

    publish = from_cli(Publish, take(values, Publish))
    if publish.push:  # fail on a missing or invalid token before the build, not after it
        from deita_hub.hub import check_token

        check_token()
    result = build_dataset(
        resolve_resource(recipe, "dataset_scripts"),
        out,
        overwrite=overwrite,
        cache_dir=cache_dir,
        overrides=sets,
        repo_id=publish.push,  # the card's load snippet names the repo it is pushed to
    )
    for subset in result.record["subsets"]:
        click.echo(f"{subset['name']}: {subset['rows']} rows ({subset['selection']['method']})")
    click.echo(f"built {result.out}")
    if publish.push:
        from deita_hub.hub import push_folder

        _report_push(
            push_folder(
                result.out,
                publish.push,
                repo_type="dataset",
                tag=publish.tag,
                private=publish.private,
                revision=publish.branch,
            )
        )


# --- hub ---


@cli.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option(
    "--type",
    "repo_type",
    type=click.Choice(["dataset", "model"]),
    default=None,
    help="Repo type (default: detected: deita_build.json or README `configs:` -> dataset, config.json -> model).",
)
@cli_options(Publish, exclude=("push",))
@click.option("--message", default=None, help="Commit message (default: 'Release TAG' or 'Upload ...').")
@click.option(
    "--delete-missing",
    is_flag=True,
    help="Delete remote files that are not in FOLDER (default: keep unrelated remote files).",
)
def push(folder, repo_id, repo_type, message, delete_missing, **values):
    """Push FOLDER to the Hub repo REPO_ID as one commit, then tag it.

    The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub (e.g. the test server
    `python -m deita_hub.testing.hub`).
    """
    from deita_hub.hub import push_folder

    publish = from_cli(Publish, take(values, Publish, exclude=("push",)))
    result = push_folder(
        folder,
        repo_id,
        repo_type=repo_type,
        revision=publish.branch,
        tag=publish.tag,
        private=publish.private,
        commit_message=message,
        delete_missing=delete_missing,
    )
    _report_push(result)


# --- training ---


def _train_help():
    return "Training config keys (YAML keys; override any with its flag or --set KEY=VALUE):", describe(
        TrainConfig
    )


@cli.command("train")
@click.argument("config_file", metavar="CONFIG", required=False)
@cli_options(TrainConfig, overrides=True)
@click.option("--resume", is_flag=True, help="Continue from the last complete checkpoint in OUT.")
@_SET
@_help_config(_train_help)
def train(config_file, resume, sets, **values):
    """Fine-tune with the Vicuna v1.1 template: SFT or DPO (TRL; qlora, lora or full).

    CONFIG is a YAML file (configs/mistral-7b-qlora.yaml, mistral-7b-lora.yaml, mistral-7b-full.yaml,
    mistral-7b-dpo.yaml, tiny-cpu.yaml, tiny-dpo-cpu.yaml; packaged names work anywhere). Flags override its keys. Multi-GPU: `accelerate launch
    --config_file configs/accelerate/fsdp.yaml -m deita_hub train CONFIG`.
    """
    import yaml

    from deita_hub.training.config import load_config
    from deita_hub.training.trainer import train as run_training

    overrides = {key: yaml.safe_load(raw) for key, raw in parse_pairs(sets, "--set").items()}
    flags = take(values, TrainConfig)
    if flags:
        overrides.update(cli_values(TrainConfig, flags))
    result = run_training(load_config(config_file, overrides), resume=resume)
    if result.resumed_from is not None:
        click.echo(f"resumed from checkpoint-{result.resumed_from}")
    loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
    click.echo(f"trained {result.global_step} steps (train loss {loss}); model in {result.final_dir}")
    for attempt in result.pushes:
        what = "final model" if attempt.step is None else f"checkpoint-{attempt.step}"
        click.echo(f"push {what}: {'ok ' if attempt.ok else 'FAILED '}{attempt.detail}")
    if result.pushes and not result.final_pushed:
        raise DeitaHubError(
            f"training finished ({result.final_dir}) but pushing the final model failed; run the same command "
            "with --resume to push it again"
        )


@cli.command("merge")
@click.argument("adapter")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the merged model."
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="dtype of the base and of the merged weights; auto: bfloat16.",
)
@click.option(
    "--base", "base_model", default=None, help="Base model (default: the adapter's base_model_name_or_path)."
)
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub ADAPTER repo.")
@cli_options(Publish, only=("push", "private"))
def merge(adapter, out_dir, dtype, base_model, revision, **values):
    """Merge a LoRA/QLoRA ADAPTER (OUT/final, a checkpoint, or a pushed Hub repo) into its base model."""
    from deita_hub.training.merge import merge_adapter

    publish = from_cli(Publish, take(values, Publish, only=("push", "private")))
    result = merge_adapter(
        adapter,
        out_dir,
        dtype="bfloat16" if dtype == "auto" else dtype,
        base_model=base_model,
        revision=revision,
        push=publish.push,
        private=publish.private,
    )
    click.echo(f"merged into {result.base_model}: {result.out_dir}")
    if result.pushed:
        click.echo(f"pushed: {result.pushed}")


@cli.command("chat")
@click.argument("model")
@click.option(
    "--prompt", default=None, help="One message: print the reply and exit (default: read stdin lines)."
)
@click.option("--system", default=None, help="System prompt (default: Vicuna v1.1's).")
@click.option(
    "--max-new-tokens", type=int, default=256, show_default=True, help="Tokens generated per reply."
)
@click.option(
    "--temperature", type=float, default=0.0, show_default=True, help="Sampling temperature; 0 = greedy."
)
@click.option(
    "--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling probability mass."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="dtype of the model weights; auto: bfloat16 on a GPU, float32 on a CPU.",
)
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub model.")
def chat(model, prompt, system, max_new_tokens, temperature, top_p, seed, dtype, revision):
    """Chat with MODEL (merged/full folder, adapter folder, or Hub id) in the Vicuna v1.1 format."""
    from deita_hub.training.chat import GenerationSettings, chat_loop, chat_once, load_chat_model

    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise DeitaHubError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    loaded, tokenizer = load_chat_model(model, dtype=dtype, revision=revision)
    if prompt is not None:
        click.echo(chat_once(loaded, tokenizer, prompt, settings, system=system))
    else:
        chat_loop(loaded, tokenizer, settings, system=system)


# --- evaluation ---


@cli.command("eval")
@cli_options(EvalConfig)
def eval_command(**values):
    """Evaluate MODEL: MT-Bench, AlpacaEval, the Open LLM tasks or held-out loss; results into its card.

    MODEL is a training run's folder (its card's Performance section and model-index are regenerated), a model or
    adapter folder, or a Hub id (with --revision). --push REPO updates that repo's card in one commit.
    """
    from deita_hub.evaluation import run_eval

    config = from_cli(EvalConfig, take(values, EvalConfig))
    report = run_eval(config)
    for suite in report.suites:
        entry = report.results.get("suites", {}).get(suite, {})
        headline = entry.get("headline") if isinstance(entry, dict) else None
        click.echo(f"{suite}: {headline if headline is not None else 'done'}")
    click.echo(f"results in {report.out / 'results.json'}")
    if report.card:
        click.echo(f"card updated: {report.card}")
    if report.pushed_commit:
        click.echo(f"pushed card: {report.pushed_commit}")


@cli.command("ablate")
@click.argument("ablation_file", metavar="ABLATION")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder for the steps and the report."
)
@click.option("--dry-run", is_flag=True, help="Print the steps and which are cached; run nothing.")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Arm-and-seed chains run at once through Ray (one GPU each when the cluster has GPUs; extra [ray]).",
)
@cli_options(Publish, only=("push",))
def ablate(ablation_file, out, dry_run, workers, **values):
    """Train and evaluate every arm of ABLATION identically, then compare them (cached, resumable steps)."""
    from deita_hub.ablation import load_ablation, push_report, run

    publish = from_cli(Publish, take(values, Publish, only=("push",)))
    if publish.push:
        from deita_hub.hub import check_token

        check_token()
    from deita_hub.resources import resolve_resource

    ablation = load_ablation(resolve_resource(ablation_file, "ablations"))  # packaged names work anywhere
    results = run(ablation, out, dry_run=dry_run, workers=workers, echo=click.echo)
    if results is None:
        return
    for name, bench in results["benchmarks"].items():
        for arm, row in bench["arms"].items():
            diff = row.get("vs_baseline")
            versus = (
                f"; vs {results['baseline']} {diff['mean_difference']:+.3f} "
                f"[{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]"
                if diff
                else ""
            )
            click.echo(f"{name}: {arm} {row['mean']:.3f} ± {row['std']:.3f}{versus}")
    click.echo(f"report in {Path(out) / 'README.md'}")
    if publish.push:
        click.echo(f"pushed report: {push_report(Path(out), publish.push)}")


# --- cards ---


@cli.command("card")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--eval-results",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="results.json of `deita-hub eval` (or a JSON with mt_bench / alpaca_eval / open_llm_avg).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the card (default: RUN_DIR/README.md); the loss plot goes to assets/ beside it.",
)
def card(run_dir, eval_results, out):
    """(Re)generate the model card of RUN_DIR from its deita_run.json."""
    from deita_hub.cards import write_model_card

    path = write_model_card(
        Path(run_dir),
        eval_results=Path(eval_results) if eval_results else None,
        out=Path(out) if out else None,
    )
    click.echo(f"wrote {path}")
