"""The base model as the server loads it for its engine, and the longest sequence it serves:
one place for `ragtune serve` (server/app.py) and the benches that build what it builds."""

from __future__ import annotations

from ragtune.config import Settings
from ragtune.models import LoadedModel, load_base_model
from server.engine.kernel_choice import packs_from_checkpoint


def load_for_engine(settings: Settings) -> tuple[LoadedModel, int]:
    """(the model, without the projections the engine packs from the checkpoint, and
    `engine.max_seq_len` or prompt + new tokens, capped at the model's context)."""
    packs = packs_from_checkpoint(settings.engine, settings.model, settings.home)
    loaded = load_base_model(settings.model, settings.home, packs_projections=packs)
    limits = settings.limits
    max_seq_len = min(
        settings.engine.max_seq_len or limits.max_prompt_tokens + limits.max_new_tokens,
        loaded.context_length,
    )
    return loaded, max_seq_len
