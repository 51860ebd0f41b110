"""What both cards share: the Jinja templates under `model_cards/`."""

from __future__ import annotations

from deita_hub.errors import DeitaHubError
from deita_hub.resources import resource_dir


def render_template(name: str, context: dict) -> str:
    """Render `model_cards/<name>` with StrictUndefined: a value the context lacks is an error, never blank."""
    import jinja2

    folder = resource_dir("model_cards")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML
    )
    try:
        template = env.get_template(name)
    except jinja2.TemplateNotFound as exc:
        raise DeitaHubError(
            f"card template '{name}' is missing from {folder.name}/ in this installation"
        ) from exc
    return template.render(**context)
