"""The LLM judge: any OpenAI-compatible chat endpoint (OpenAI, `vllm serve`, TGI, `transformers serve`).

Requests go through the `openai` client with its own retries off: deita-hub retries connection errors,
timeouts, 408/429/5xx with exponential backoff (`judge_retries` tries), then fails with one line naming the
endpoint. The API token is read from an environment variable whose *name* is configured; the token itself is
never logged, recorded or put into an error message (error texts are scrubbed of it).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from deita_hub.errors import DeitaHubError, require

log = logging.getLogger(__name__)

_NO_TOKEN = "EMPTY"  # what vLLM's and TGI's servers accept when they were started without --api-key
_RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class JudgeClient:
    url: str | None  # None: OpenAI's own endpoint
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    retries: int = 5
    timeout: float = 120.0
    base_delay: float = 1.0  # seconds; doubled per try, at most max_delay
    max_delay: float = 30.0

    def __post_init__(self):
        openai = require("openai", "eval", "The LLM judge")
        self._openai = openai
        self._token = os.environ.get(self.api_key_env) or None
        if self.url is None and self._token is None:
            raise DeitaHubError(
                f"--judge-url is not set (OpenAI's endpoint) and ${self.api_key_env} holds no API token"
            )
        self._client = openai.OpenAI(
            base_url=self.url, api_key=self._token or _NO_TOKEN, max_retries=0, timeout=self.timeout
        )

    @property
    def endpoint(self) -> str:
        return self.url or "https://api.openai.com/v1"

    def complete(
        self, messages: list[dict[str, str]], *, temperature: float = 0.0, max_tokens: int = 2048
    ) -> str:
        """The judge's reply text; retried with backoff, then a one-line DeitaHubError."""
        openai = self._openai
        last = ""
        for attempt in range(1, self.retries + 1):
            try:
                response = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=temperature, max_tokens=max_tokens
                )
                return response.choices[0].message.content or ""
            except (openai.APIConnectionError, openai.APITimeoutError) as exc:
                last = f"cannot reach it ({type(exc).__name__})"
            except openai.APIStatusError as exc:
                last = f"HTTP {exc.status_code}: {self._scrub(str(exc))[:200]}"
                if exc.status_code not in _RETRIED_STATUS:
                    break
            if attempt < self.retries:
                delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
                log.warning(
                    "judge %s: %s; retrying in %.1f s (%d/%d)",
                    self.endpoint,
                    last,
                    delay,
                    attempt,
                    self.retries,
                )
                time.sleep(delay)
        raise DeitaHubError(f"judge {self.model} at {self.endpoint}: {last} (after {attempt} tries)")

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text
