"""POST /v1/feedback: ratings (and corrections) of chat completions, tied to the adapter
version that answered.

Every chat completion is remembered in the response ledger (server/ledger.py: ids and
versions, no text). With `feedback.store_conversations` on, the client's messages and the
answer of each finished response are also written, PII masked, to $RAGTUNE_HOME/feedback
(ragtune/feedback_store.py) so `ragtune prepare --from-feedback` can train on them; with it
off, nothing of a prompt, an answer, a correction or a comment is written anywhere: a rating
record is id, rating, model, adapter, version and time (the response says
`correction_kept: false`).

A response can be rated once, and only with the key that received it (another key gets the
same 404 as an unknown id). Each rating goes to the ratings file, `ragtune_feedback_total`,
the audit log (as counts: rating, version, whether a correction came and its length; never
its text) and then to the rating listeners.

Hook for per-version metrics and canaries (server/canary.py): append a callable to
`ServerState.rating_listeners` (the same list as `FeedbackService.listeners`); it is called
as `listener(adapter, version, rating)` on the event loop after the rating is stored, once
per rated response whose answer came from an adapter (base-model answers count only in
`ragtune_feedback_total`). Keep it quick and non-blocking; an exception is logged and does
not fail the request. `FeedbackService.ledger.get(id)` says which adapter version served
any recent response.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from fastapi import APIRouter, Depends

from ragtune.audit import AuditLog
from ragtune.config import FeedbackConfig
from ragtune.feedback_store import FeedbackStore, feedback_dir
from server.chat_protocol import ChatCompletionRequest
from server.engine import RequestStream, StepOutput
from server.errors import APIError, BadRequestError, NotFoundError
from server.feedback_protocol import FeedbackRequest, FeedbackResponse
from server.ledger import ResponseLedger, ServedResponse
from server.metrics import Metrics
from server.protocol import ErrorResponse
from server.threads import run_blocking

logger = logging.getLogger(__name__)


# (adapter, version, rating): the adapter version that gave the rated answer, "up" | "down"
RatingListener = Callable[[str, str, str], None]


class AlreadyRatedError(APIError):
    status_code = 409
    code = "already_rated"


class FeedbackService:
    def __init__(
        self,
        config: FeedbackConfig,
        home: Path,
        metrics: Metrics,
        audit: AuditLog,
        base_model_id: str,
        listeners: list[RatingListener] | None = None,
    ) -> None:
        self.keep_text = config.store_conversations
        self.ledger = ResponseLedger(config.max_responses)
        self.store = FeedbackStore(feedback_dir(home), config.retention_days)
        self.metrics = metrics
        self.audit = audit
        self.base_model_id = base_model_id
        self.listeners = listeners if listeners is not None else []
        self._writes: dict[str, asyncio.Task] = {}  # response id -> its conversation's write

    # ------------------------------------------------------------------------- responses
    def track(
        self,
        response_id: str,
        request: ChatCompletionRequest,
        adapter: Any,  # the AdapterWeights served (None: the base model)
        key_id: str | None,
        streams: list[RequestStream],
    ) -> list[RequestStream]:
        """Remember who served `response_id`; with conversations kept, return streams that
        also gather the answer (written once every choice finished, not if one failed)."""
        entry = ServedResponse.of(
            response_id, request.model, getattr(adapter, "key", None), key_id, len(streams)
        )
        self.ledger.remember(entry)
        if not self.keep_text:
            return streams
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        capture = _Capture(self, entry, messages, len(streams))
        return cast("list[RequestStream]", [_Watched(s, capture, i) for i, s in enumerate(streams)])

    def _write_conversation(
        self, entry: ServedResponse, messages: list[dict[str, str]], answers: list[str]
    ) -> None:
        def write() -> None:
            self.store.append(
                "conversations",
                {
                    **_identity(entry),
                    "messages": [{**m, "content": _masked(m["content"])} for m in messages],
                    "answers": [_masked(answer) for answer in answers],
                },
            )

        task = asyncio.get_running_loop().create_task(run_blocking(write))
        self._writes[entry.id] = task
        task.add_done_callback(lambda done: self._written(entry.id, done))

    def _written(self, response_id: str, task: asyncio.Task) -> None:
        if self._writes.get(response_id) is task:
            del self._writes[response_id]
        if not task.cancelled() and task.exception() is not None:
            logger.error("could not store conversation %s: %s", response_id, task.exception())

    # -------------------------------------------------------------------------- feedback
    async def rate(self, body: FeedbackRequest, key_id: str | None) -> FeedbackResponse:
        entry = self.ledger.get(body.id)
        if entry is None or entry.key_id != key_id:
            raise NotFoundError(
                f"no recent chat completion has id {body.id!r}: the server remembers the last "
                f"{self.ledger.capacity} (feedback.max_responses) since it started, and takes "
                "feedback only from the API key that received the response",
                "id",
                code="response_not_found",
            )
        if body.choice >= entry.choices:
            raise BadRequestError(
                f"response {body.id} has {entry.choices} choice(s); choice must be below that",
                "choice",
            )
        if self.ledger.rate(body.id, body.rating) is not None:
            raise AlreadyRatedError(f"response {body.id} was already rated", "id")
        correction_kept = self.keep_text and body.correction is not None
        comment_kept = self.keep_text and body.comment is not None
        record: dict[str, Any] = {**_identity(entry), "rating": body.rating, "choice": body.choice}
        if correction_kept:
            record["correction"] = body.correction
        if comment_kept:
            record["comment"] = body.comment
        counts = {
            "adapter": entry.adapter,
            "version": entry.version,
            "rating": body.rating,
            "correction_chars": len(body.correction or ""),
            "correction_kept": correction_kept,
            "comment_kept": comment_kept,
        }
        if (pending := self._writes.get(body.id)) is not None:
            await asyncio.wait([pending])  # the conversation's record lands before its rating
        try:
            await run_blocking(self._store_rating, record, key_id, counts)
        except Exception:
            entry.rating = None  # not stored: the client may send it again
            raise
        self.metrics.feedback.labels(
            entry.adapter or self.base_model_id, entry.version or "", body.rating
        ).inc()
        if entry.adapter is not None and entry.version is not None:
            self._notify(entry.adapter, entry.version, body.rating)
        return FeedbackResponse(
            id=entry.id,
            rating=body.rating,
            model=entry.model,
            adapter=entry.adapter,
            version=entry.version,
            correction_kept=correction_kept,
            comment_kept=comment_kept,
        )

    def _store_rating(self, record: dict[str, Any], key_id: str | None, counts: dict) -> None:
        for field in ("correction", "comment"):
            if field in record:
                record[field] = _masked(record[field])
        self.store.append("ratings", record)
        self.audit.record(key_id, "feedback", "ok", **counts)
        logger.info("feedback %s: %s", record["id"], counts)

    def _notify(self, adapter: str, version: str, rating: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(adapter, version, rating)
            except Exception:
                logger.exception("rating listener %r failed", listener)


def feedback_router(
    service: FeedbackService, require_client: Callable[..., str | None]
) -> APIRouter:
    router = APIRouter(
        prefix="/v1",
        responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 503)},
    )

    @router.post("/feedback", response_model=FeedbackResponse)
    async def feedback(
        body: FeedbackRequest, key_id: str | None = Depends(require_client)
    ) -> FeedbackResponse:
        """Rate a chat completion by its response id (client scope)."""
        return await service.rate(body, key_id)

    return router


# --------------------------------------------------------------------------------- helpers
def _identity(entry: ServedResponse) -> dict[str, Any]:
    """What a record says about the response: never its text, never the key."""
    return {
        "id": entry.id,
        "model": entry.model,
        "adapter": entry.adapter,
        "version": entry.version,
    }


def _masked(text: str) -> str:
    from training.pii import mask_pii

    return mask_pii(text).text


class _Capture:
    """One response's answers, gathered as its choices stream."""

    def __init__(
        self,
        service: FeedbackService,
        entry: ServedResponse,
        messages: list[dict[str, str]],
        choices: int,
    ) -> None:
        self.service = service
        self.entry = entry
        self.messages = messages
        self.parts: list[list[str]] = [[] for _ in range(choices)]
        self.open = choices
        self.failed = False

    def observe(self, index: int, output: StepOutput) -> None:
        self.parts[index].append(output.text)
        if not output.finished:
            return
        self.open -= 1
        self.failed |= output.finish_reason in ("abort", "error")
        if self.open == 0 and not self.failed:
            answers = ["".join(parts) for parts in self.parts]
            self.service._write_conversation(self.entry, self.messages, answers)


class _Watched:
    """A RequestStream whose outputs a _Capture also sees; everything else is the stream's."""

    def __init__(self, stream: RequestStream, capture: _Capture, index: int) -> None:
        self._stream = stream
        self._capture = capture
        self._index = index

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __aiter__(self) -> _Watched:
        return self

    async def __anext__(self) -> StepOutput:
        output = await self._stream.__anext__()
        self._capture.observe(self._index, output)
        return output
