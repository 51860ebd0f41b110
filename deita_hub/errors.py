"""One exception family for everything a user can get wrong: the CLI maps it to exit code 1 and one line.

Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class DeitaHubError(Exception):
    """A problem the user can fix: bad input, bad config, missing extra, unreachable Hub."""


class InvalidRecordError(DeitaHubError):
    """A pool row that cannot be read into a conversation. Names the file, the row and the field."""

    def __init__(
        self, reason: str, *, field: str | None = None, row: int | None = None, source: str | None = None
    ):
        self.reason = reason
        self.field = field
        self.row = row
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.source is not None:
            where.append(str(self.source))
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return ": ".join([", ".join(where), self.reason]) if where else self.reason

    def located(self, *, row: int, source: str) -> InvalidRecordError:
        return InvalidRecordError(self.reason, field=self.field, row=row, source=source)


class MissingExtraError(DeitaHubError):
    """An optional dependency is not installed; the message names the extra that brings it."""

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(f"{purpose} needs the '{module}' package: pip install 'deita-hub[{extra}]'")


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or fail with the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module, extra, purpose) from exc
