"""`keywords`: the paragraph's top TF-IDF keywords -> the paragraph, teaching the adapter to
recall a passage from the terms a user is likely to type."""

from __future__ import annotations

from training.chunks import is_japanese
from training.documents import TEXT_SUFFIXES, Document
from training.recipes import RecipeContext
from training.recipes.paragraphs import document_units
from training.records import Example, Unit, chat


class KeywordsRecipe:
    name = "keywords"
    suffixes = TEXT_SUFFIXES

    def units(self, document: Document) -> list[Unit]:
        return document_units(document)

    def examples(self, unit: Unit, context: RecipeContext) -> list[Example]:
        keywords = context.keywords.keywords(unit.text, k=5)
        if not keywords:
            context.stats["keywords_no_terms"] += 1
            return []
        if is_japanese(unit.text):
            joined = "、".join(keywords)
            prompt = f"キーワード：{joined}。これらに関する社内文書の内容を教えてください。"
        else:
            prompt = f"Keywords: {', '.join(keywords)}. What do our documents say about these?"
        return [Example(unit.doc_id, self.name, chat(prompt, unit.text))]
