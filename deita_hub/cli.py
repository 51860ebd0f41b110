"""`deita-hub`: one click group. Each command parses its options, calls one library function, prints a result.

Domain errors (DeitaHubError) become one line on stderr and exit code 1; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from deita_hub import __version__
from deita_hub.errors import DeitaHubError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DeitaHubError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deita-hub")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """Deita data selection and Hugging Face Hub releases: score, embed, select, build, push, train."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not verbose:  # one line per HTTP request is noise unless asked for
        for name in ("httpx", "httpx2", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("huggingface_hub").propagate = False  # it has its own handler: no doubled lines


def main() -> None:
    cli(prog_name="deita-hub")


# Commands are grouped by pipeline stage below; each section imports its library module lazily so that
# `deita-hub --help` stays fast and works on the core install.

# --- pool / embed / select / build ---

_POOL_HELP = (
    "JSON, JSONL or parquet file, saved HF dataset folder, built deita-hub folder, or Hub dataset id."
)


def _key_values(values: tuple[str, ...], option: str) -> dict[str, str]:
    pairs = {}
    for item in values:
        if "=" not in item:
            raise DeitaHubError(f"{option} takes KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value.strip()
    return pairs


# The vLLM backends' engine settings, shared by `embed` and `score`.
vllm_options = click.option(
    "--vllm-option",
    "vllm_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="vllm backend: an extra vllm.EngineArgs setting, e.g. tensor_parallel_size=4 (repeatable).",
)


def pool_options(command):
    """Options every command that reads a pool shares (mirrors FormatSpec and read_pool)."""
    options = [
        click.option(
            "--format",
            "pool_format",
            default="auto",
            show_default=True,
            type=click.Choice(["auto", "sharegpt", "openai", "alpaca"]),
            help="Pool format.",
        ),
        click.option(
            "--field",
            "fields",
            multiple=True,
            metavar="NAME=COLUMN",
            help="Field mapping, e.g. output_field=response, conversations_field=turns (FormatSpec names).",
        ),
        click.option(
            "--role-map",
            "role_map",
            multiple=True,
            metavar="ROLE=CANONICAL",
            help="Map extra roles, e.g. function_call=assistant, observation=user.",
        ),
        click.option(
            "--skip-invalid",
            is_flag=True,
            help="Skip invalid rows (written with reasons next to the output) instead of failing.",
        ),
        click.option("--config", "hf_config", default=None, help="HF dataset sources: config name."),
        click.option("--split", default="train", show_default=True, help="HF dataset sources: split."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _read_pool_from_options(pool, pool_format, fields, role_map, skip_invalid, hf_config, split):
    from deita_hub.conversations import FormatSpec
    from deita_hub.pool import read_pool

    try:
        spec = FormatSpec(
            format=pool_format, role_map=_key_values(role_map, "--role-map"), **_key_values(fields, "--field")
        )
    except TypeError as exc:
        raise DeitaHubError(f"--field: {exc}") from None
    return read_pool(
        pool, spec, on_invalid="skip" if skip_invalid else "error", config=hf_config, split=split
    )


def _write_invalid(pool, out) -> None:
    from pathlib import Path

    if pool.invalid:
        from deita_hub.io import write_rows

        path = Path(str(out) + ".invalid.jsonl")
        write_rows(pool.invalid, path)
        click.echo(f"skipped {len(pool.invalid)} invalid row(s); reasons in {path}", err=True)


@cli.command()
@click.argument("pool")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Output .npy (+ .npy.json metadata)."
)
@click.option(
    "--method",
    default="sentence",
    show_default=True,
    type=click.Choice(["sentence", "last-token"]),
    help="sentence-transformers, or Deita's causal-LM last-token embedder.",
)
@click.option(
    "--model", default=None, help="Hub id or folder; default (sentence): packaged all-MiniLM-L6-v2."
)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--max-length", default=None, type=int, help="Tokens kept per row (beginning kept).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--dtype", default="auto", show_default=True, help="last-token weights dtype.")
@click.option(
    "--backend", default="transformers", show_default=True, type=click.Choice(["transformers", "vllm"])
)
@click.option("--ray", "use_ray", is_flag=True, help="Map over a Ray cluster (extra [ray]).")
@vllm_options
@pool_options
def embed(
    pool,
    out,
    method,
    model,
    batch_size,
    max_length,
    device,
    dtype,
    backend,
    use_ray,
    vllm_option,
    **pool_kwargs,
):
    """Embed every conversation of POOL into a memory-mappable .npy matrix."""
    from deita_hub.embedding import EmbedConfig, embed_pool
    from deita_hub.vllm_engine import parse_options

    data = _read_pool_from_options(pool, **pool_kwargs)
    config = EmbedConfig(
        method=method,
        model=model,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        dtype=dtype,
        backend=backend,
        use_ray=use_ray,
        vllm_options=parse_options(vllm_option),
    )
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
    "--method", default="deita", show_default=True, type=click.Choice(["deita", "random", "score", "longest"])
)
@click.option("--budget", default=6000, show_default=True, type=int)
@click.option(
    "--max-similarity",
    default=0.9,
    show_default=True,
    type=float,
    help="Reject a candidate whose cosine similarity to a selected row is > this.",
)
@click.option("--seed", default=42, show_default=True, type=int, help="random: seed.")
@click.option(
    "--precision",
    default="fp32",
    show_default=True,
    type=click.Choice(["fp32", "bf16", "fp16"]),
    help="Matrix products' precision; results are exact either way.",
)
@click.option("--block-size", default=1024, show_default=True, type=int)
@click.option(
    "--baselines",
    is_flag=True,
    help="Also write random, score and longest selections of the same budget as OUT.<method>.<ext>.",
)
@click.option("--complexity-field", default="complexity_scores", show_default=True)
@click.option("--quality-field", default="quality_scores", show_default=True)
@pool_options
def select_command(
    pool,
    out,
    embeddings,
    method,
    budget,
    max_similarity,
    seed,
    precision,
    block_size,
    baselines,
    complexity_field,
    quality_field,
    **pool_kwargs,
):
    """Select BUDGET rows of POOL: Deita's exact score-first, diversity-aware filter, or a baseline."""
    from pathlib import Path

    from deita_hub.dataset import run_select
    from deita_hub.selection import SelectionConfig

    data = _read_pool_from_options(pool, **pool_kwargs)
    config = SelectionConfig(
        method=method,
        budget=budget,
        max_similarity=max_similarity,
        seed=seed,
        precision=precision,
        block_size=block_size,
    )
    written = run_select(
        data,
        config,
        Path(out),
        embeddings=embeddings,
        baselines=baselines,
        complexity_field=complexity_field,
        quality_field=quality_field,
    )
    _write_invalid(data, out)
    for path, selection in written:
        stats = selection.stats
        click.echo(
            f"wrote {path}: {len(selection)} rows ({stats.get('method', method)}; scanned "
            f"{stats['scanned']}, rejected {stats['rejected']})"
        )


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
@click.option(
    "--push", "push_repo", default=None, metavar="REPO_ID", help="Push the built folder to this Hub repo."
)
@click.option("--tag", default=None, help="With --push: tag the release commit.")
@click.option("--private", is_flag=True, help="With --push: create the repo private.")
@click.option("--revision", default=None, help="With --push: branch to push to.")
def build(recipe, out, overwrite, cache_dir, push_repo, tag, private, revision):
    """Build RECIPE (dataset_scripts/*.yaml) into a Hub-layout dataset folder; optionally push it."""
    from deita_hub.dataset import build as build_dataset
    from deita_hub.resources import resolve_resource

    if push_repo:  # fail on a missing or invalid token before the build, not after it
        from deita_hub.hub import check_token

        check_token()
    result = build_dataset(
        resolve_resource(recipe, "dataset_scripts"), out, overwrite=overwrite, cache_dir=cache_dir
    )
    for subset in result.record["subsets"]:
        click.echo(f"{subset['name']}: {subset['rows']} rows ({subset['selection']['method']})")
    click.echo(f"built {result.out}")
    if push_repo:
        from deita_hub.hub import push_folder

        _report_push(
            push_folder(
                result.out, push_repo, repo_type="dataset", tag=tag, private=private, revision=revision
            )
        )


@cli.command("demo-pool")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .jsonl.")
@click.option("--rows", default=2400, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
def demo_pool(out, rows, seed):
    """Write the demo recipe's synthetic ShareGPT pool (synthetic scores included) to try the commands on."""
    from deita_hub.demo import generate_pool
    from deita_hub.io import write_rows

    write_rows(generate_pool(rows, seed), out)
    click.echo(f"wrote {out}: {rows} synthetic conversations")


# --- cards ---


@cli.command("card")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--eval-results",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="JSON with mt_bench / alpaca_eval / open_llm_avg (format: deita_hub.cards docstring).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the card (default: RUN_DIR/README.md); the loss plot goes to assets/ beside it.",
)
def card(run_dir, eval_results, out):
    """(Re)generate the model card of RUN_DIR from its deita_run.json."""
    from pathlib import Path

    from deita_hub.cards import write_model_card

    path = write_model_card(
        Path(run_dir),
        eval_results=Path(eval_results) if eval_results else None,
        out=Path(out) if out else None,
    )
    click.echo(f"wrote {path}")


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
@click.option("--tag", default=None, help="Tag the pushed commit (an existing tag is never moved).")
@click.option(
    "--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility)."
)
@click.option(
    "--revision", default=None, help="Branch to push to (created from main if missing; default main)."
)
@click.option("--message", default=None, help="Commit message (default: 'Release TAG' or 'Upload ...').")
@click.option(
    "--delete-missing",
    is_flag=True,
    help="Delete remote files that are not in FOLDER (default: keep unrelated remote files).",
)
def push(folder, repo_id, repo_type, tag, private, revision, message, delete_missing):
    """Push FOLDER to the Hub repo REPO_ID as one commit, then tag it.

    The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub (e.g. the test server
    `python -m deita_hub.testing.hub`).
    """
    from deita_hub.hub import push_folder

    result = push_folder(
        folder,
        repo_id,
        repo_type=repo_type,
        revision=revision,
        tag=tag,
        private=private,
        commit_message=message,
        delete_missing=delete_missing,
    )
    _report_push(result)


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


# --- training ---


def _print_config_help(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    from deita_hub.training.config import config_fields

    click.echo("Training config keys (YAML keys; override any with --set KEY=VALUE):\n")
    for name, spec in config_fields().items():
        default = spec.default_factory() if callable(spec.default_factory) else spec.default
        click.echo(f"  {name} (default: {default!r})\n      {spec.metadata.get('help', '')}")
    ctx.exit()


@cli.command("train")
@click.argument("config", required=False)
@click.option(
    "--dataset", default=None, help="Built dataset folder, Hub dataset id, or JSON/JSONL/parquet pool."
)
@click.option("--dataset-config", default=None, help="Dataset subset (e.g. 6k).")
@click.option("--dataset-split", default=None, help="Dataset split (default: train).")
@click.option("--dataset-revision", default=None, help="Branch, tag or commit of a Hub dataset.")
@click.option("--model", default=None, help="Base model: Hub id, folder, or tiny:mistral / tiny:llama.")
@click.option(
    "--method", type=click.Choice(["qlora", "lora", "full"]), default=None, help="Fine-tuning method."
)
@click.option("--output-dir", default=None, help="Where checkpoints and OUTPUT_DIR/final go.")
@click.option(
    "--push",
    "push_repo",
    default=None,
    help="Hub repo (org/name): push every checkpoint and the final model.",
)
@click.option("--private", is_flag=True, default=None, help="Create the pushed repo private.")
@click.option("--resume", is_flag=True, help="Continue from the last complete checkpoint in OUTPUT_DIR.")
@click.option("--max-steps", type=int, default=None, help="Stop after N optimizer steps (overrides epochs).")
@click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key (YAML value)."
)
@click.option(
    "--help-config",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_config_help,
    help="List every config key with its default and meaning, then exit.",
)
def train(
    config,
    dataset,
    dataset_config,
    dataset_split,
    dataset_revision,
    model,
    method,
    output_dir,
    push_repo,
    private,
    resume,
    max_steps,
    sets,
):
    """Supervised fine-tuning with the Vicuna v1.1 template (TRL SFTTrainer; qlora, lora or full).

    CONFIG is a YAML file (configs/mistral-7b-qlora.yaml, mistral-7b-lora.yaml, mistral-7b-full.yaml,
    tiny-cpu.yaml; packaged names work anywhere). Flags override its keys. Multi-GPU: `accelerate launch
    --config_file configs/accelerate/fsdp.yaml -m deita_hub train CONFIG`.
    """
    import yaml

    from deita_hub.training.config import load_config
    from deita_hub.training.trainer import train as run_training

    overrides = {}
    for key, raw in _key_values(sets, "--set").items():
        overrides[key] = yaml.safe_load(raw)
    flags = {
        "dataset": dataset,
        "dataset_config": dataset_config,
        "dataset_split": dataset_split,
        "dataset_revision": dataset_revision,
        "model": model,
        "method": method,
        "output_dir": output_dir,
        "push": push_repo,
        "push_private": private,
        "max_steps": max_steps,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})
    result = run_training(load_config(config, overrides), resume=resume)
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
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default="bfloat16",
    help="dtype of the base and of the merged weights.",
)
@click.option(
    "--base", "base_model", default=None, help="Base model (default: the adapter's base_model_name_or_path)."
)
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub ADAPTER repo.")
@click.option("--push", "push_repo", default=None, help="Hub repo (org/name) to push the merged model to.")
@click.option("--private", is_flag=True, help="Create the pushed repo private.")
def merge(adapter, out_dir, dtype, base_model, revision, push_repo, private):
    """Merge a LoRA/QLoRA ADAPTER (OUTPUT_DIR/final, a checkpoint, or a pushed Hub repo) into its base model."""
    from deita_hub.training.merge import merge_adapter

    result = merge_adapter(
        adapter,
        out_dir,
        dtype=dtype,
        base_model=base_model,
        revision=revision,
        push=push_repo,
        private=private,
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
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    default="auto",
    help="auto: bfloat16 on GPU, float32 on CPU.",
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


# --- scoring ---


@cli.command()
@click.argument("pool")
@click.option(
    "--scorer",
    required=True,
    type=click.Choice(["complexity", "quality"]),
    help="complexity reads each instruction; quality reads each (instruction, response) pair.",
)
@click.option(
    "--model", required=True, help="Scorer model: Hub id or folder (e.g. hkust-nlp/deita-complexity-scorer)."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output .jsonl: every input field plus complexity_scores / quality_scores.",
)
@click.option(
    "--backend", default="transformers", show_default=True, type=click.Choice(["transformers", "vllm"])
)
@click.option("--batch-size", default=16, show_default=True, type=int, help="Prompts per forward pass.")
@click.option(
    "--max-length", default=2048, show_default=True, type=int, help="Max prompt tokens (incl. BOS)."
)
@click.option(
    "--truncation-side",
    default="right",
    show_default=True,
    type=click.Choice(["right", "left", "none"]),
    help="Cut longer prompts inside the text (right keeps its beginning), or fail them (none).",
)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    help="auto: bf16 on GPU, fp32 on CPU.",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--ray", "use_ray", is_flag=True, help="Map over a Ray cluster (extra [ray]).")
@click.option("--ray-actors", default=None, type=int, help="Ray actors (default: one per GPU, else 1).")
@vllm_options
@pool_options
def score(
    pool,
    scorer,
    model,
    out,
    backend,
    batch_size,
    max_length,
    truncation_side,
    dtype,
    device,
    use_ray,
    ray_actors,
    vllm_option,
    **pool_kwargs,
):
    """Score POOL with a Deita scorer, per (user, assistant) pair; resumes an interrupted run of the same OUT."""
    from pathlib import Path

    from deita_hub.scoring import ScoreConfig, failures_path, score_pool
    from deita_hub.vllm_engine import parse_options

    config = ScoreConfig(
        scorer=scorer,
        model=model,
        backend=backend,
        batch_size=batch_size,
        max_length=max_length,
        truncation_side=truncation_side,
        dtype=dtype,
        device=device,
        use_ray=use_ray,
        ray_actors=ray_actors,
        vllm_options=parse_options(vllm_option),
    )
    data = _read_pool_from_options(pool, **pool_kwargs)
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
