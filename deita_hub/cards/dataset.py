"""Dataset cards rendered from a build's record (`deita_build.json`), beside the model card.

The card's YAML (`configs:` with a default, `dataset_info` with exact row counts) lets
`datasets.load_dataset(DIR_or_repo, "6k")` read each subset with no remote code; the body is
`model_cards/dataset_card.md.j2` rendered from the build record, and `assets/scores.png` shows the pool's score
distribution (or, built without scores, its response lengths) against every subset's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deita_hub.cards.templates import render_template

if TYPE_CHECKING:
    import pyarrow as pa

    from deita_hub.pool import Pool
    from deita_hub.recipes import Recipe
    from deita_hub.selection import Selection

CARD_TEMPLATE = "dataset_card.md.j2"


def size_category(rows: int) -> str:
    """The Hub's `size_categories` bucket for a row count."""
    for limit, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if rows < limit:
            return label
    return "1M<n<10M"


def describe(values: np.ndarray) -> dict[str, float]:
    """Mean, median, min and max (4 decimals) as the card shows them; empty for no values."""
    if len(values) == 0:
        return {}
    return {
        "mean": round(float(np.mean(values)), 4),
        "median": round(float(np.median(values)), 4),
        "min": round(float(np.min(values)), 4),
        "max": round(float(np.max(values)), 4),
    }


def plot_scores(path: Path, scores: np.ndarray | None, pool: Pool, selections: dict[str, Selection]) -> bool:
    """The pool's evol scores (or response lengths, without scores) against every subset's, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    if scores is not None:
        values, label = scores, "evol score (Σ complexity × quality)"
        title = "Evol score: pool vs selected subsets"
    else:
        values = pool.response_lengths.astype(np.float64)
        label = "assistant characters per conversation"
        title = "Response length: pool vs selected subsets"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    bins = np.histogram_bin_edges(values, bins=40)
    ax.hist(values, bins=bins, density=True, alpha=0.45, label=f"pool ({len(values):,})", color="grey")
    for name, selection in selections.items():
        ax.hist(
            values[selection.positions],
            bins=bins,
            density=True,
            histtype="step",
            lw=1.6,
            label=f"{name} ({len(selection):,})",
        )
    ax.set_xlabel(label)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(
        path, metadata={"Software": None}
    )  # no timestamps/versions: identical builds give identical bytes
    plt.close(fig)
    return True


def dataset_card(
    recipe: Recipe, record: dict[str, Any], tables: dict[str, pa.Table], *, repo_id: str | None = None
) -> str:
    """README.md of a built dataset: YAML (configs, dataset_info) + the body rendered from the build record.

    `repo_id`: the Hub repo the dataset is pushed to, shown in the card's load snippet."""
    import datasets
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from huggingface_hub import DatasetCardData

    infos = {}
    for name, table in tables.items():
        size = int(table.nbytes)
        infos[name] = DatasetInfo(
            features=datasets.Features.from_arrow_schema(table.schema),
            splits=SplitDict({"train": SplitInfo(name="train", num_bytes=size, num_examples=table.num_rows)}),
            config_name=name,
            dataset_size=size,
        )
    card_data = DatasetCardData(
        pretty_name=recipe.card.pretty_name or recipe.name,
        license=recipe.card.license,
        language=list(recipe.card.language),
        task_categories=["text-generation"],
        size_categories=[size_category(max(t.num_rows for t in tables.values()))],
        tags=sorted({"deita", "instruction-tuning", "data-selection", *recipe.card.tags}),
        configs=[
            {
                "config_name": subset.name,
                **({"default": True} if subset.default else {}),
                "data_files": [{"split": "train", "path": f"{subset.name}/train-*"}],
            }
            for subset in recipe.subsets
        ],
    )
    DatasetInfosDict(infos).to_dataset_card_data(card_data)
    # a preference set (prompt/chosen/rejected) gets no ShareGPT `conversations` column: its card says so
    preferences = any({"chosen", "rejected"} <= set(table.column_names) for table in tables.values())
    body = render_template(
        CARD_TEMPLATE,
        {
            "recipe": recipe,
            "record": record,
            "card": recipe.card,
            "repo_id": repo_id,
            "preferences": preferences,
        },
    )
    return f"---\n{card_data.to_yaml()}\n---\n\n{body}"
