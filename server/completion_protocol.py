"""/v1/completions request model: prompts as text or token ids, echo and prompt logprobs."""

from __future__ import annotations

from dataclasses import replace

from pydantic import Field

from server.engine.types import SamplingParams
from server.protocol import MAX_LOGPROBS, MAX_PROMPTS, ProtocolError, _GenerationRequest


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's default for /v1/completions; 0 (with echo) scores the prompt, generating nothing
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="logprobs of the generated tokens (and with echo the prompt's) and the top k",
    )
    echo: bool = Field(False, description="the prompt before the completion (and its logprobs)")
    suffix: str | None = Field(None, description="not supported (400)")
    best_of: int | None = Field(None, ge=1, description="only equal to n (or unset)")

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> None:
        super().unsupported()
        if self.suffix:
            raise ProtocolError("suffix is not supported", "suffix")
        if self.best_of not in (None, self.n):
            raise ProtocolError("best_of other than n is not supported", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise ProtocolError("max_tokens 0 generates nothing: use it with echo", "max_tokens")

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        params = super().to_sampling_params(max_tokens)
        if self.echo and self.logprobs is not None:
            return replace(params, prompt_logprobs=self.logprobs)
        return params

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids (several give several choices)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ProtocolError("prompt must not be empty", "prompt")
        if all(isinstance(item, int) for item in prompt):
            return [prompt]  # type: ignore[list-item]
        if not all(isinstance(item, str | list) for item in prompt):
            raise ProtocolError("prompt mixes text and token ids", "prompt")
        if len(prompt) > MAX_PROMPTS:
            raise ProtocolError(f"at most {MAX_PROMPTS} prompts per request", "prompt")
        return list(prompt)  # type: ignore[arg-type]
