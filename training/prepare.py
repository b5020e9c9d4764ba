"""`ragtune prepare`: documents -> PII-masked, de-duplicated, split chat examples.

Order matters: PII is masked before anything is derived from the text; duplicates are
removed per unit (paragraph, function) across the whole corpus before the split, so a
near-copy in another document cannot leak into a different split.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from training.dataset import write_split_dataset
from training.dedupe import dedupe, remove_exact
from training.documents import Document, load_documents
from training.keywords import KeywordIndex
from training.pii import mask_pii
from training.recipes import Generator, RecipeContext, get_recipe
from training.records import Example

logger = logging.getLogger(__name__)


@dataclass
class PrepareOptions:
    sources: list[Path]
    recipe: str
    out: Path
    qa_generator: Literal["template", "model"] = "template"
    generator_model: str = "bundled"
    home: Path | None = None
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    seed: int = 0
    near_duplicate_threshold: float | None = 0.8
    mask_pii: bool = True
    questions_per_unit: int = 3
    source_labels: bool = False  # raft: as the server's retrieval.source_labels
    extra_stats: dict[str, Any] = field(default_factory=dict)


def _load_generator(options: PrepareOptions) -> Generator | None:
    if options.qa_generator != "model" or options.recipe not in ("qa", "code"):
        return None
    from ragtune.config import default_home
    from training.generation import LocalGenerator

    return LocalGenerator(options.generator_model, options.home or default_home())


def prepare(options: PrepareOptions, generator: Generator | None = None) -> dict[str, Any]:
    """Write train/val/test JSONL and stats.json to `options.out` (atomically); return stats."""
    recipe = get_recipe(options.recipe)
    documents = load_documents(options.sources, recipe.suffixes)
    if not documents:
        raise ValueError(
            f"no {'/'.join(sorted(recipe.suffixes))} files found under "
            f"{', '.join(map(str, options.sources))}"
        )
    stats: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    if options.mask_pii:
        masked = []
        for document in documents:
            result = mask_pii(document.text)
            pii.update(result.counts)
            masked.append(Document(document.id, document.path, result.text))
        documents = masked

    units = [unit for document in documents for unit in recipe.units(document)]
    kept_units, unit_dupes = dedupe(
        units, key=lambda unit: unit.text, near_threshold=options.near_duplicate_threshold
    )
    context = RecipeContext(
        keywords=KeywordIndex([unit.text for unit in kept_units]),
        generator=generator if generator is not None else _load_generator(options),
        stats=stats,
        questions_per_unit=options.questions_per_unit,
        source_labels=options.source_labels,
    )
    examples: list[Example] = []
    for unit in kept_units:
        examples.extend(recipe.examples(unit, context))
    if options.mask_pii:  # generated text can invent PII too
        for example in examples:
            for message in example.messages:
                result = mask_pii(message["content"])
                message["content"] = result.text
                pii.update({f"generated_{kind}": n for kind, n in result.counts.items()})
    examples, example_dupes = remove_exact(examples, key=lambda example: example.text)

    def summarize(by_split: dict[str, list[Example]], assignment: dict[str, str]) -> dict:
        return {
            "recipe": options.recipe,
            "qa_generator": options.qa_generator if options.recipe in ("qa", "code") else None,
            "sources": [str(source) for source in options.sources],
            "documents": len(documents),
            "documents_per_split": dict(sorted(Counter(assignment.values()).items())),
            "units": len(units),
            "units_removed_exact_duplicates": unit_dupes.exact,
            "units_removed_near_duplicates": unit_dupes.near,
            "examples_removed_exact_duplicates": example_dupes,
            "pii_masked": dict(sorted(pii.items())),
            "recipe_stats": dict(sorted(stats.items())),
            "mean_prompt_chars": _mean(ex.messages[-2]["content"] for ex in examples),
            "mean_answer_chars": _mean(ex.messages[-1]["content"] for ex in examples),
            **options.extra_stats,
        }

    summary = write_split_dataset(
        options.out,
        examples,
        val_ratio=options.val_ratio,
        test_ratio=options.test_ratio,
        seed=options.seed,
        summarize=summarize,
        doc_ids=[document.id for document in documents],
    )
    logger.info(
        "prepared %d examples from %d documents in %s", len(examples), len(documents), options.out
    )
    return summary


def _mean(values: Any) -> float:
    lengths = [len(value) for value in values]
    return round(sum(lengths) / len(lengths), 1) if lengths else 0.0
