"""Resumable scoring: the checkpoint folder `<out>.partial/` and the files named after a scoring output.

With `resume_dir`, every finished row is appended to `rows.jsonl` there as soon as its last pair is scored (so
progress is saved batch by batch, and a pool of any size can resume); a rerun with the same rows and scoring
settings (`run_key`) skips rows that have scores and retries failed ones. The folder is created with the first
finished rows, so a run that fails before scoring (a bad model, say) leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deita_hub.io import write_text
from deita_hub.pool import conversations_fingerprint
from deita_hub.records import FAILURES_SUFFIX, METADATA_SUFFIX, PARTIAL_SUFFIX

log = logging.getLogger(__name__)

# Settings that change the numbers: a checkpoint made with other values is not resumed.
RESULT_SETTINGS = ("scorer", "model", "backend", "max_length", "truncation_side", "dtype")


def run_key(conversations: Sequence[Any], config) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the rows (hashed) and the settings that change scores."""
    settings = {name: getattr(config, name) for name in RESULT_SETTINGS}
    return {
        "settings": settings,
        "num_rows": len(conversations),
        "conversations_fingerprint": conversations_fingerprint(conversations),
    }


class Checkpoint:
    """`run.json` (what is being scored) + `rows.jsonl` (one finished row per line) in a folder."""

    def __init__(self, folder: str | Path, key: dict[str, Any]):
        self.folder = Path(folder)
        self.key = json.loads(json.dumps(key))
        self.rows_file = self.folder / "rows.jsonl"
        self.run_file = self.folder / "run.json"
        self.started = False  # whether the folder holds this run's checkpoint (created at the first write)

    def load(self) -> dict[int, dict[str, Any]]:
        """Finished rows of a matching earlier run; a non-matching checkpoint is replaced at the first write."""
        done: dict[int, dict[str, Any]] = {}
        self.started = False
        if not self.run_file.exists():
            return done
        state = json.loads(self.run_file.read_text())
        if state.get("key") != self.key or not self.rows_file.exists():
            log.warning("%s holds a checkpoint of other rows or settings; starting over", self.folder)
            return done
        self.started = True
        lines = self.rows_file.read_text(encoding="utf-8").splitlines()
        good = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the interruption: that row is redone
                break
            done[int(record["row"])] = record
            good.append(line)
        if len(good) != len(lines):
            write_text(self.rows_file, "".join(line + "\n" for line in good))
        return done

    def _start(self, state: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text(self.rows_file, "")
        write_text(self.run_file, json.dumps(state, indent=1))
        self.started = True

    def append(self, records: list[dict[str, Any]]) -> None:
        if not self.started:
            self._start({"key": self.key})
        with open(self.rows_file, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(record) + "\n" for record in records))

    def save_backend(self, backend: dict[str, Any]) -> None:
        if not self.started:
            self._start({"key": self.key, "backend": backend})
            return
        state = json.loads(self.run_file.read_text())
        write_text(self.run_file, json.dumps({**state, "backend": backend}, indent=1))

    def backend(self) -> dict[str, Any] | None:
        if not self.started:
            return None
        return json.loads(self.run_file.read_text()).get("backend")


# Files next to the output are named by appending to its full name, as `deita-hub embed` does (`<out>.json`).
def failures_path(out: Path) -> Path:
    return out.with_name(out.name + FAILURES_SUFFIX)


def metadata_path(out: Path) -> Path:
    return out.with_name(out.name + METADATA_SUFFIX)


def checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + PARTIAL_SUFFIX)
