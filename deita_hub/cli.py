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


def main() -> None:
    cli(prog_name="deita-hub")


# Commands are grouped by pipeline stage below; each section imports its library module lazily so that
# `deita-hub --help` stays fast and works on the core install.

# --- pool / embed / select / build ---

_POOL_HELP = "JSON, JSONL or parquet file, saved HF dataset folder, built deita-hub folder, or Hub dataset id."


def _key_values(values: tuple[str, ...], option: str) -> dict[str, str]:
    pairs = {}
    for item in values:
        if "=" not in item:
            raise DeitaHubError(f"{option} takes KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value.strip()
    return pairs


def pool_options(command):
    """Options every command that reads a pool shares (mirrors FormatSpec and read_pool)."""
    options = [
        click.option("--format", "pool_format", default="auto", show_default=True,
                     type=click.Choice(["auto", "sharegpt", "openai", "alpaca"]), help="Pool format."),
        click.option("--field", "fields", multiple=True, metavar="NAME=COLUMN",
                     help="Field mapping, e.g. output_field=response, conversations_field=turns (FormatSpec names)."),
        click.option("--role-map", "role_map", multiple=True, metavar="ROLE=CANONICAL",
                     help="Map extra roles, e.g. function_call=assistant, observation=user."),
        click.option("--skip-invalid", is_flag=True,
                     help="Skip invalid rows (written with reasons next to the output) instead of failing."),
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
        spec = FormatSpec(format=pool_format, role_map=_key_values(role_map, "--role-map"),
                          **_key_values(fields, "--field"))
    except TypeError as exc:
        raise DeitaHubError(f"--field: {exc}") from None
    return read_pool(pool, spec, on_invalid="skip" if skip_invalid else "error", config=hf_config, split=split)


def _write_invalid(pool, out) -> None:
    from pathlib import Path

    if pool.invalid:
        from deita_hub.io import write_rows

        path = Path(str(out) + ".invalid.jsonl")
        write_rows(pool.invalid, path)
        click.echo(f"skipped {len(pool.invalid)} invalid row(s); reasons in {path}", err=True)


@cli.command()
@click.argument("pool")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npy (+ .npy.json metadata).")
@click.option("--method", default="sentence", show_default=True, type=click.Choice(["sentence", "last-token"]),
              help="sentence-transformers, or Deita's causal-LM last-token embedder.")
@click.option("--model", default=None, help="Hub id or folder; default (sentence): packaged all-MiniLM-L6-v2.")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--max-length", default=None, type=int, help="Tokens kept per row (beginning kept).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--dtype", default="auto", show_default=True, help="last-token weights dtype.")
@click.option("--backend", default="transformers", show_default=True, type=click.Choice(["transformers", "vllm"]))
@click.option("--ray", "use_ray", is_flag=True, help="Map over a Ray cluster (extra [ray]).")
@pool_options
def embed(pool, out, method, model, batch_size, max_length, device, dtype, backend, use_ray, **pool_kwargs):
    """Embed every conversation of POOL into a memory-mappable .npy matrix."""
    from deita_hub.embedding import EmbedConfig, embed_pool

    data = _read_pool_from_options(pool, **pool_kwargs)
    config = EmbedConfig(method=method, model=model, batch_size=batch_size, max_length=max_length, device=device,
                         dtype=dtype, backend=backend, use_ray=use_ray)
    path, meta = embed_pool(data.conversations, out, config, pool_provenance=data.provenance())
    _write_invalid(data, out)
    click.echo(f"wrote {path}: {meta['num_rows']} x {meta['dim']} ({meta['model']})")


@cli.command("select")
@click.argument("pool")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .jsonl, .json or .parquet.")
@click.option("--embeddings", default=None, type=click.Path(dir_okay=False),
              help="float32/float16 .npy whose rows align with the pool's valid rows (method deita).")
@click.option("--method", default="deita", show_default=True, type=click.Choice(["deita", "random", "score", "longest"]))
@click.option("--budget", default=6000, show_default=True, type=int)
@click.option("--max-similarity", default=0.9, show_default=True, type=float,
              help="Reject a candidate whose cosine similarity to a selected row is > this.")
@click.option("--seed", default=42, show_default=True, type=int, help="random: seed.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Matrix products' precision; results are exact either way.")
@click.option("--block-size", default=2048, show_default=True, type=int)
@click.option("--baselines", is_flag=True,
              help="Also write random, score and longest selections of the same budget as OUT.<method>.<ext>.")
@click.option("--complexity-field", default="complexity_scores", show_default=True)
@click.option("--quality-field", default="quality_scores", show_default=True)
@pool_options
def select_command(pool, out, embeddings, method, budget, max_similarity, seed, precision, block_size, baselines,
                   complexity_field, quality_field, **pool_kwargs):
    """Select BUDGET rows of POOL: Deita's exact score-first, diversity-aware filter, or a baseline."""
    from pathlib import Path

    from deita_hub.selection import SelectionConfig
    from deita_hub.dataset import run_select

    data = _read_pool_from_options(pool, **pool_kwargs)
    config = SelectionConfig(method=method, budget=budget, max_similarity=max_similarity, seed=seed,
                             precision=precision, block_size=block_size)
    written = run_select(data, config, Path(out), embeddings=embeddings, baselines=baselines,
                         complexity_field=complexity_field, quality_field=quality_field)
    _write_invalid(data, out)
    for path, selection in written:
        stats = selection.stats
        click.echo(f"wrote {path}: {len(selection)} rows ({stats.get('method', method)}; scanned "
                   f"{stats['scanned']}, rejected {stats['rejected']})")


@cli.command()
@click.argument("recipe")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (Hub layout).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Embedding/pool cache (default $DEITA_HUB_CACHE or ~/.cache/deita-hub).")
@click.option("--push", "push_repo", default=None, metavar="REPO_ID", help="Push the built folder to this Hub repo.")
@click.option("--tag", default=None, help="With --push: tag the release commit.")
@click.option("--private", is_flag=True, help="With --push: create the repo private.")
@click.option("--revision", default=None, help="With --push: branch to push to.")
def build(recipe, out, overwrite, cache_dir, push_repo, tag, private, revision):
    """Build RECIPE (dataset_scripts/*.yaml) into a Hub-layout dataset folder; optionally push it."""
    from deita_hub.dataset import build as build_dataset
    from deita_hub.resources import resolve_resource

    result = build_dataset(resolve_resource(recipe, "dataset_scripts"), out, overwrite=overwrite, cache_dir=cache_dir)
    for subset in result.record["subsets"]:
        click.echo(f"{subset['name']}: {subset['rows']} rows ({subset['selection']['method']})")
    click.echo(f"built {result.out}")
    if push_repo:
        from deita_hub.hub import push_folder

        pushed = push_folder(result.out, push_repo, repo_type="dataset", tag=tag, private=private, revision=revision)
        click.echo(pushed.commit_oid and f"pushed {pushed.url} @ {pushed.commit_oid}" or f"unchanged: {pushed.url}")
        if pushed.tag:
            click.echo(f"tagged {pushed.tag}")


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
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to push to (created from main if missing; default main).")
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
    import logging

    from deita_hub.hub import push_folder

    if logging.getLogger().level > logging.DEBUG:  # one line per HTTP request is noise unless --verbose
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
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
    if result.created_commit:
        click.echo(f"pushed {result.repo_type} {result.repo_id}@{result.revision}: {result.commit_url}")
    else:
        click.echo(
            f"unchanged: {result.repo_type} {result.repo_id}@{result.revision} already holds this content "
            f"({result.head_oid[:12]}); no commit made"
        )
    if result.tag:
        click.echo(f"tag {result.tag} -> {result.head_oid[:12]} ({result.url}/tree/{result.tag})")
