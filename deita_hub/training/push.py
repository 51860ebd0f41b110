"""Checkpoint uploads that never stop training.

Each save is staged (hard links, so the Trainer may rotate the checkpoint away meanwhile) and pushed by one
background thread through `deita_hub.hub.push_folder` (one commit, retried there). Only the newest waiting
checkpoint is kept: when an upload fails or is slow, the next save supersedes it ("retry at the next save"). The
final model is pushed in the foreground. Every attempt is recorded and reported at the end of the run.

Only what a downloader needs is pushed: weights, config, tokenizer (with the Vicuna template), the run record
and the card. Resume state (optimizer, scheduler, RNG, `training_args.bin`, `trainer_state.json`) stays local.
A local base-model path in `adapter_config.json` is replaced by the record's base model (a Hub id or a folder
name), so the pushed files name no local path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCAL_ONLY = {"optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin", "trainer_state.json"}
LOCAL_ONLY_PREFIXES = ("rng_state", ".")


@dataclass(frozen=True)
class PushAttempt:
    step: int | None  # None: the final model
    ok: bool
    detail: str  # the commit URL, or the error


def _pushable(path: Path) -> bool:
    return path.name not in LOCAL_ONLY and not path.name.startswith(LOCAL_ONLY_PREFIXES)


def stage(folder: Path, staging: Path, *, base_model: str | None) -> Path:
    """Hard-link (or copy) the pushable files of `folder` into `staging`; with `base_model`, adapter_config.json's
    base model path becomes `base_model`."""
    if staging.exists():
        shutil.rmtree(staging)
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or not all(_pushable(Path(part)) for part in rel.parts):
            continue
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if base_model is not None and rel.as_posix() == "adapter_config.json":
            adapter = json.loads(path.read_text(encoding="utf-8"))
            adapter["base_model_name_or_path"] = base_model
            target.write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            continue
        try:
            os.link(path, target)
        except OSError:  # another filesystem, or links unsupported
            shutil.copy2(path, target)
    return staging


def push_staged(staging: Path, repo_id: str, *, private: bool, message: str) -> str:
    from deita_hub.hub import push_folder

    result = push_folder(staging, repo_id, repo_type="model", private=private, commit_message=message)
    return result.commit_url if result.created_commit else f"{result.url} (unchanged)"


class CheckpointUploader:
    """One background upload at a time; the newest waiting checkpoint replaces an older one."""

    def __init__(self, repo_id: str, *, private: bool, staging_root: Path, base_model: str):
        self.repo_id = repo_id
        self.private = private
        self.staging_root = staging_root
        self.base_model = base_model
        self.attempts: list[PushAttempt] = []
        self._lock = threading.Lock()
        self._waiting: tuple[int, Path] | None = None
        self._running = False
        self._thread: threading.Thread | None = None

    def submit(self, step: int, folder: Path) -> None:
        staging = stage(folder, self.staging_root / f"step-{step}", base_model=self.base_model)
        with self._lock:
            if self._waiting is not None:
                log.info("checkpoint %d superseded by %d before its upload started", self._waiting[0], step)
                shutil.rmtree(self._waiting[1], ignore_errors=True)
            self._waiting = (step, staging)
            if not self._running:
                self._running = True
                self._thread = threading.Thread(target=self._work, name="deita-hub-push", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._waiting is None:
                    self._running = False
                    return
                step, staging = self._waiting
                self._waiting = None
            self._push(step, staging, f"Training in progress: checkpoint-{step}")

    def _push(self, step: int | None, staging: Path, message: str) -> PushAttempt:
        try:
            detail = push_staged(staging, self.repo_id, private=self.private, message=message)
            attempt = PushAttempt(step, True, detail)
            log.info(
                "pushed %s to %s: %s",
                "final model" if step is None else f"checkpoint-{step}",
                self.repo_id,
                detail,
            )
        except Exception as exc:  # an upload failure must never stop training: record it, report at the end
            attempt = PushAttempt(step, False, f"{type(exc).__name__}: {exc}")
            what = "the final model" if step is None else f"checkpoint-{step}"
            log.warning(
                "pushing %s to %s failed (training goes on; the next save retries): %s",
                what,
                self.repo_id,
                exc,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.attempts.append(attempt)
        return attempt

    def wait(self) -> None:
        thread = self._thread
        if thread is not None:
            thread.join()

    def push_final(self, folder: Path) -> PushAttempt:
        """Wait for checkpoint uploads, then push the final model in the foreground."""
        self.wait()
        staging = stage(folder, self.staging_root / "final", base_model=self.base_model)
        attempt = self._push(None, staging, "deita-hub: final model")
        shutil.rmtree(self.staging_root, ignore_errors=True)
        return attempt


def push_model_folder(folder: Path, repo_id: str, *, private: bool, base_model: str, message: str) -> str:
    """Push a finished folder (final or merged) in the foreground; errors propagate as DeitaHubError."""
    staging_root = folder.parent / f".{folder.name}.push"
    staging = stage(folder, staging_root, base_model=base_model)
    try:
        return push_staged(staging, repo_id, private=private, message=message)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
