"""Recipes turn documents into chat examples: `paragraphs`, `qa`, `code`, `keywords`,
`raft` (questions with the answering document among distractors) and `claims` (yes / no /
maybe questions in the instructed answer format).

Each recipe first cuts documents into units (so duplicates can be removed at the unit level,
before one unit fans out into several examples), then makes examples from the kept units.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from training.documents import Document
from training.keywords import KeywordIndex
from training.records import Example, Unit

# messages -> generated assistant text (a local model, or a stand-in in tests)
Generator = Callable[[list[dict[str, str]]], str]


@dataclass
class RecipeContext:
    keywords: KeywordIndex
    generator: Generator | None = None
    stats: Counter[str] = field(default_factory=Counter)
    questions_per_unit: int = 3
    # raft: the RAG prompt's `title > heading` line above each source, as the server's
    # retrieval.source_labels (the adapter then learns the prompt it will be served)
    source_labels: bool = False


class Recipe(Protocol):
    name: str
    suffixes: frozenset[str]

    def units(self, document: Document) -> list[Unit]: ...

    def examples(self, unit: Unit, context: RecipeContext) -> list[Example]: ...


def get_recipe(name: str) -> Recipe:
    from training.recipes.claims import ClaimsRecipe
    from training.recipes.code import CodeRecipe
    from training.recipes.keywords import KeywordsRecipe
    from training.recipes.paragraphs import ParagraphsRecipe
    from training.recipes.qa import QARecipe
    from training.recipes.raft import RaftRecipe

    recipes: dict[str, Recipe] = {
        "paragraphs": ParagraphsRecipe(),
        "qa": QARecipe(),
        "code": CodeRecipe(),
        "keywords": KeywordsRecipe(),
        "raft": RaftRecipe(),
        "claims": ClaimsRecipe(),
    }
    if name not in recipes:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(recipes)}")
    return recipes[name]


RECIPES = ("paragraphs", "qa", "code", "keywords", "raft", "claims")
