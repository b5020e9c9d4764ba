"""Structured output: `response_format` JSON (any object, or one JSON schema) and forced tool
calls as grammars that mask a row's logits before its token is chosen.

xgrammar does the work: it compiles a schema once against the tokenizer's vocabulary (cached
here by schema text, so 64 requests with one pydantic model compile it once), and a
per-sequence matcher fills a vocabulary bitmask in ~0.1 ms a step on a CPU. Only rows that
ask pay for it; the others never see this module.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (an LRU by schema text)


class GrammarError(ValueError):
    """The schema cannot be compiled into a grammar: a client error, with the reason."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a row's output must match: `json` (any JSON object) or `json_schema` (`schema` is
    the schema as JSON text, `strict` forbids properties the schema does not name)."""

    kind: str  # "json" | "json_schema"
    schema: str = ""
    strict: bool = True


class GrammarCompiler:
    """One per tokenizer: the vocabulary table xgrammar needs (built once) and the cache of
    compiled grammars. Thread-safe: requests compile on their own threads."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]):
        import xgrammar as xgr

        self._xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids)
        )
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar for `spec` (from the cache when it was compiled before)."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        try:
            if spec.kind == "json":
                compiled = self._compiler.compile_builtin_json_grammar()
            else:
                json.loads(spec.schema)
                compiled = self._compiler.compile_json_schema(
                    spec.schema, any_whitespace=False, strict_mode=spec.strict
                )
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(_reason(exc)) from None
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


class RowGrammar:
    """One sequence's position in its grammar."""

    def __init__(self, compiled: Any):
        import xgrammar as xgr

        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)

    def mask(self, row: torch.Tensor) -> None:
        """Set the logits of tokens the grammar forbids next to -inf, in place ([vocab] fp32)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        self._xgr.apply_token_bitmask_inplace(row.view(1, -1), self._bitmask)

    def try_accept(self, token: int) -> bool:
        """Advance over `token` if the grammar allows it (else nothing changes): ~2 µs."""
        return self._matcher.is_terminated() or self._matcher.accept_token(token)

    def accept(self, token: int) -> None:
        if not self.try_accept(token):
            raise RuntimeError(f"token {token} does not continue the grammar")


def _reason(exc: Exception) -> str:
    """xgrammar's message without its source location prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
