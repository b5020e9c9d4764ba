"""`paragraphs`: a question naming the section's topic -> the paragraph itself, so the
adapter learns the documents' wording and where each statement belongs."""

from __future__ import annotations

from training.chunks import is_japanese, paragraph_chunks
from training.documents import TEXT_SUFFIXES, Document
from training.recipes import RecipeContext
from training.records import Example, Unit, chat


def document_units(document: Document) -> list[Unit]:
    """Paragraph units shared by the text recipes (paragraphs, qa, keywords)."""
    return [
        Unit(doc_id=document.id, title=document.title, text=chunk.text, heading=chunk.heading)
        for chunk in paragraph_chunks(document.text)
    ]


def topic_question(unit: Unit) -> str:
    topic = unit.heading or unit.title
    if is_japanese(unit.text):
        if unit.heading and unit.heading != unit.title:
            return f"{unit.title}の「{unit.heading}」について、社内文書には何と書かれていますか？"
        return f"「{topic}」について、社内文書には何と書かれていますか？"
    if unit.heading and unit.heading != unit.title:
        return f"What does the {unit.title} say about {unit.heading}?"
    return f"What does our documentation say about {topic}?"


class ParagraphsRecipe:
    name = "paragraphs"
    suffixes = TEXT_SUFFIXES

    def units(self, document: Document) -> list[Unit]:
        return document_units(document)

    def examples(self, unit: Unit, context: RecipeContext) -> list[Example]:
        return [Example(unit.doc_id, self.name, chat(topic_question(unit), unit.text))]
