"""The server calls likelihood scoring makes, in vLLM's shapes: `POST /tokenize`,
`POST /detokenize` (both at the server root, as lm-evaluation-harness's remote tokenizer
calls them) and `POST /v1/completions` with `echo`, `logprobs` and `max_tokens: 0`.

Plain httpx rather than the `openai` client: the tokenizer routes are not OpenAI's, and a
scoring request's body (token-id prompts, `max_tokens: 0`) is vLLM's extension.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import httpx


class ScoringError(RuntimeError):
    """The server refused or failed a tokenize or scoring request."""


@dataclass
class EchoChoice:
    """One prompt's `choices[i].logprobs`: per prompt token its text, logprob (None for the
    first) and top alternatives (text -> logprob, the chosen token first)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]


@dataclass
class ScoringClient:
    v1: str
    api_key: str
    timeout: float = 600.0
    _http: httpx.Client | None = field(default=None, repr=False)
    _texts: dict[int, str] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # prompts prefilled to score choices (not the token-text lookups): what a run's
    # likelihood pass cost the server
    scored_prompts: int = 0

    @property
    def root(self) -> str:
        v1 = self.v1.rstrip("/")
        return v1[: -len("/v1")] if v1.endswith("/v1") else v1

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._http is None:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            self._http = httpx.Client(timeout=self.timeout, limits=limits)
        headers = {"Authorization": f"Bearer {self.api_key}"}
        try:
            response = self._http.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ScoringError(f"{url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise ScoringError(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    # --------------------------------------------------------------------------- tokenizer
    def tokenize_messages(self, model: str, messages: list[dict[str, str]]) -> list[int]:
        """The ids a chat request with these messages is given (template + generation
        prompt), so their count is that request's `usage.prompt_tokens`."""
        body = {"model": model, "messages": messages, "add_generation_prompt": True}
        return list(self._post(f"{self.root}/tokenize", body)["tokens"])

    def tokenize(self, model: str, text: str) -> list[int]:
        """Text as lm-eval's `tok_encode` encodes it: no special tokens added (a rendered
        chat prompt carries its own)."""
        body = {"model": model, "prompt": text, "add_special_tokens": False}
        return list(self._post(f"{self.root}/tokenize", body)["tokens"])

    def detokenize(self, model: str, tokens: list[int]) -> str:
        body = {"model": model, "tokens": tokens}
        return str(self._post(f"{self.root}/detokenize", body)["prompt"])

    # ----------------------------------------------------------------------------- scoring
    def echo(self, model: str, prompts: list[list[int]], top: int) -> list[EchoChoice]:
        """Score token-id prompts without generating: one choice per prompt, in order."""
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompts if len(prompts) > 1 else prompts[0],
            "max_tokens": 0,
            "echo": True,
            "logprobs": top,
            "temperature": 0.0,
        }
        data = self._post(f"{self.v1.rstrip('/')}/completions", body)
        if top:
            with self._lock:
                self.scored_prompts += len(prompts)
        choices = sorted(data["choices"], key=lambda choice: choice["index"])
        if len(choices) != len(prompts):
            raise ScoringError(f"asked to score {len(prompts)} prompts, got {len(choices)}")
        out = []
        for choice, prompt in zip(choices, prompts, strict=True):
            logprobs = choice.get("logprobs") or {}
            entry = EchoChoice(
                list(logprobs.get("tokens") or []),
                list(logprobs.get("token_logprobs") or []),
                list(logprobs.get("top_logprobs") or []),
            )
            if len(entry.token_logprobs) < len(prompt):
                raise ScoringError(
                    f"echo returned {len(entry.token_logprobs)} logprobs for a "
                    f"{len(prompt)}-token prompt"
                )
            out.append(entry)
        return out

    def token_texts(self, model: str, ids: list[int]) -> list[str]:
        """Each id's text as the server writes it in `top_logprobs` keys (its own bytes, not
        a decode of the id in context); cached, one echo request for the new ones."""
        with self._lock:
            missing = sorted({i for i in ids if i not in self._texts})
        if missing:
            choice = self.echo(model, [missing], 0)[0]
            with self._lock:
                self._texts.update(zip(missing, choice.tokens, strict=True))
        return [self._texts[i] for i in ids]
