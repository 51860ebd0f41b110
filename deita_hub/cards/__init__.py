"""Cards rendered from recorded facts, never typed by hand: the model card (`cards.model`, from a run's
`deita_run.json`) and the dataset card (`cards.dataset`, from a build's `deita_build.json`), both from the Jinja
templates under `model_cards/` (`cards.templates`)."""

from deita_hub.cards.dataset import dataset_card, describe, plot_scores, size_category
from deita_hub.cards.model import (
    BENCHMARKS,
    CARD_TEMPLATE,
    DEITA_BIBTEX,
    DEITA_HUB_URL,
    DEITA_PAPER_URL,
    DEITA_URL,
    LOSS_PLOT,
    NOT_EVALUATED,
    RUN_RECORD,
    card_context,
    card_data,
    hyperparameter_list,
    model_card,
    plot_loss,
    read_eval_results,
    read_run_record,
    scan_for_secrets,
    validate_eval_results,
    write_model_card,
)
from deita_hub.cards.templates import render_template

__all__ = [
    "BENCHMARKS",
    "CARD_TEMPLATE",
    "DEITA_BIBTEX",
    "DEITA_HUB_URL",
    "DEITA_PAPER_URL",
    "DEITA_URL",
    "LOSS_PLOT",
    "NOT_EVALUATED",
    "RUN_RECORD",
    "card_context",
    "card_data",
    "dataset_card",
    "describe",
    "hyperparameter_list",
    "model_card",
    "plot_loss",
    "plot_scores",
    "read_eval_results",
    "read_run_record",
    "render_template",
    "scan_for_secrets",
    "size_category",
    "validate_eval_results",
    "write_model_card",
]
