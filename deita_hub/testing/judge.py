"""A real, offline LLM judge for tests: a tiny model that answers "[[d]]", served by `transformers serve`.

`save_rating_judge_model(folder)` writes a tiny random LLaMA (+ the offline Llama-2 tokenizer with the Vicuna
template) whose greedy reply to any chat prompt is " [[d]]</s>" with d a digit "1".."6": FastChat's
`[[rating]]` format. `JudgeServer(folder)` serves it through transformers' own OpenAI-compatible server
(`transformers serve`, the `transformers[serving]` extra) on 127.0.0.1, so deita-hub's judge client talks to a
real `/v1/chat/completions` endpoint that runs a real model. `save_digit_answering_model` (a reply of a bare
digit, no brackets) is the judge whose ratings cannot be parsed.

How the model answers in a format: every layer's output projections are zeroed, so the residual stream at a
position is the token's own embedding; the embeddings of four tokens (":" that ends the Vicuna generation
prompt, "▁[[", the digits, "]]") carry one large component each on their own axis, and the LM head maps each
axis to the next token of the chain  ":" -> "▁[[" -> digit -> "]]" -> "</s>". The digit rows also keep their
random weights, so which digit wins is the model's own (fixed) choice.
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

from deita_hub.testing.tiny import llama2_tokenizer, tiny_causal_lm

_AXIS_SCALE = 20.0  # against random embedding rows of std 0.02: the chain axis decides the next token


def save_rating_judge_model(out_dir: str | Path, *, seed: int = 5) -> Path:
    """A tiny LLaMA whose greedy reply to any Vicuna-templated prompt is "[[d]]" (d in 1..6)."""
    import torch

    from deita_hub.scoring.prompts import digit_token_ids

    out_dir = Path(out_dir)
    tokenizer = llama2_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=seed)
    colon, open_brackets, close_brackets = tokenizer.convert_tokens_to_ids([":", "▁[[", "]]"])
    digits = digit_token_ids(tokenizer)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        # (token(s) whose embedding carries the axis, the token that must follow them)
        chain = [
            ([colon], open_brackets),
            ([open_brackets], None),
            (digits, close_brackets),
            ([close_brackets], eos),
        ]
        for axis, (tokens, following) in enumerate(chain):
            embed[tokens, axis] = _AXIS_SCALE
            if following is not None:
                head[following, axis] = _AXIS_SCALE
        head[digits, 1] = _AXIS_SCALE  # after "▁[[": a digit, the random part of the rows picks which
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


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
        executable = shutil.which("transformers", path=os.path.dirname(sys.executable)) or "transformers"
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
                raise RuntimeError(f"transformers serve exited: {self.process.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(
            f"transformers serve did not answer on port {self.port} in {self.startup_timeout} s"
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
