"""`code`: Python function/class source -> a summary of what it does.

The summary is the docstring's first paragraph (removed from the code shown, so the model
cannot copy it); undocumented code gets a generated summary (local model) or, with the
template generator, a deterministic one built from the signature and the calls it makes.
"""

from __future__ import annotations

import ast
import logging
import textwrap

from training.documents import CODE_SUFFIXES, Document
from training.recipes import RecipeContext
from training.records import Example, Unit, chat

logger = logging.getLogger(__name__)

SUMMARY_INSTRUCTION = (
    "Summarize in one or two sentences what this Python {kind} does.\n\n```python\n{code}\n```"
)
MAX_CODE_CHARS = 4000


def _strip_docstring(node: ast.stmt, lines: list[str]) -> str:
    """The node's source lines (decorators excluded) without its docstring statement."""
    assert node.end_lineno is not None
    skip: set[int] = set()
    body = getattr(node, "body", [])
    first = body[0] if body else None
    if first is not None and _is_docstring(first) and first.end_lineno is not None:
        skip = set(range(first.lineno, first.end_lineno + 1))
    kept = [lines[n - 1] for n in range(node.lineno, node.end_lineno + 1) if n not in skip]
    return textwrap.dedent("\n".join(kept)).strip("\n")


def code_units(document: Document) -> list[Unit]:
    try:
        tree = ast.parse(document.text)
    except SyntaxError as exc:
        logger.warning("skipping %s: %s", document.id, exc)
        return []
    units: list[Unit] = []
    lines = document.text.splitlines()

    def visit(nodes: list[ast.stmt], prefix: str) -> None:
        for node in nodes:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            name = f"{prefix}{node.name}"
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            docstring = ast.get_docstring(node) or ""
            code = _class_outline(node) if kind == "class" else _strip_docstring(node, lines)
            if len(code) <= MAX_CODE_CHARS:
                units.append(
                    Unit(
                        doc_id=document.id,
                        title=document.title,
                        text=code,
                        heading=name,
                        kind=kind,
                        extra={
                            "docstring": docstring,
                            "signature": _signature(node, name),
                            "calls": _calls(node),
                        },
                    )
                )
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{name}.")

    visit(tree.body, "")
    return units


def _class_outline(node: ast.ClassDef) -> str:
    """The class with method bodies elided: its methods are units of their own, and a full
    class body would make it a near-duplicate of them."""
    import copy

    outline = copy.deepcopy(node)
    outline.decorator_list = []
    body = [stmt for stmt in outline.body if not _is_docstring(stmt)]
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            stmt.body = [ast.Expr(ast.Constant(...))]
    outline.body = body or [ast.Expr(ast.Constant(...))]
    return ast.unparse(outline)


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _signature(node: ast.AST, qualname: str) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(base) for base in node.bases)
        return f"class {qualname}({bases})" if bases else f"class {qualname}"
    assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{qualname}({ast.unparse(node.args)}){returns}"


def _calls(node: ast.AST) -> list[str]:
    names: list[str] = []
    for child in ast.walk(node):
        if isinstance(child, ast.Call):
            name = ast.unparse(child.func)
            if name not in names and len(name) < 40:
                names.append(name)
    return names[:5]


def template_summary(unit: Unit) -> str:
    signature = unit.extra["signature"]
    module = unit.doc_id
    if unit.kind == "class":
        methods = [
            line.strip()[4:].split("(")[0]
            for line in unit.text.splitlines()
            if line.strip().startswith("def ")
        ]
        listed = f" with methods {', '.join(methods[:6])}" if methods else ""
        return f"`{signature}` is a class in `{module}`{listed}."
    calls = unit.extra["calls"]
    uses = f"; it calls {', '.join(f'`{c}`' for c in calls)}" if calls else ""
    return f"`{signature}` is a function in `{module}`{uses}."


class CodeRecipe:
    name = "code"
    suffixes = CODE_SUFFIXES

    def units(self, document: Document) -> list[Unit]:
        return code_units(document)

    def examples(self, unit: Unit, context: RecipeContext) -> list[Example]:
        docstring: str = unit.extra["docstring"]
        if docstring:
            summary = docstring.strip().split("\n\n")[0].strip()
            context.stats["code_docstring_summaries"] += 1
        elif context.generator is not None:
            summary = context.generator(
                [
                    {
                        "role": "user",
                        "content": SUMMARY_INSTRUCTION.format(kind=unit.kind, code=unit.text),
                    }
                ]
            ).strip()
            context.stats["code_generated_summaries"] += 1
            if not summary:
                summary = template_summary(unit)
        else:
            summary = template_summary(unit)
            context.stats["code_template_summaries"] += 1
        prompt = (
            f"What does this {unit.kind} from `{unit.doc_id}` do?\n\n```python\n{unit.text}\n```"
        )
        return [Example(unit.doc_id, self.name, chat(prompt, summary))]
