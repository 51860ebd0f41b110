"""A judge served on this machine for the duration of an eval: `transformers serve MODEL` on 127.0.0.1.

`deita-hub eval --judge-serve FOLDER` starts transformers' own OpenAI-compatible server (the `[eval]` extra
installs `transformers[serving]`) on a free loopback port and points the judge client at it, so MT-Bench and
AlpacaEval run without a remote judge. `tiny:rating-judge` serves a tiny model that always answers "[[d]]": a
demo and test judge, not a meaningful one. A judge worth its ratings is large: serve it with `vllm serve` and
pass `--judge-url` instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from deita_hub.errors import DeitaHubError

TINY_JUDGE = "tiny:rating-judge"


def resolve_judge_model(name: str, workdir: Path) -> str:
    """A local folder to serve; `tiny:rating-judge` is built into `workdir` first (once)."""
    if name == TINY_JUDGE:
        from deita_hub.io import atomic_folder
        from deita_hub.tiny import save_rating_judge_model

        folder = workdir / "tiny-rating-judge"
        if not (folder / "config.json").is_file():
            with atomic_folder(folder, overwrite=True) as tmp:
                save_rating_judge_model(tmp)
        return str(folder)
    if not Path(name).is_dir():
        raise DeitaHubError(f"--judge-serve: {name} is not a model folder (or {TINY_JUDGE})")
    return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class JudgeServer:
    """`transformers serve MODEL` on 127.0.0.1 in a subprocess; `url` is its OpenAI base URL (…/v1).

    The served model name is the folder path (the server refuses any other name)."""

    def __init__(self, model_dir: str | Path, *, startup_timeout: float = 120.0):
        self.model_dir = str(model_dir)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> JudgeServer:
        executable = shutil.which("transformers", path=os.path.dirname(sys.executable)) or shutil.which(
            "transformers"
        )
        if executable is None:
            raise DeitaHubError("--judge-serve needs transformers' server: pip install 'deita-hub[eval]'")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(
            [executable, "serve", self.model_dir, "--host", "127.0.0.1", "--port", str(self.port)]
            + ["--device", "cpu", "--log-level", "warning", "--default-seed", "0"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DeitaHubError(
                    "--judge-serve: transformers serve exited: "
                    + " ".join(self.process.stderr.read()[-500:].split())
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise DeitaHubError(
            f"--judge-serve: transformers serve did not answer on port {self.port} in {self.startup_timeout:g} s"
        )

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
