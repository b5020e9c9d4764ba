"""kill -9 of a process building a new generation of an existing index.

A real subprocess runs `IndexStore.build` (what `ragtune index build` calls) and stops at one
point of the write (the pause is injected so the kill lands there, not by timing); the test
then SIGKILLs it. Afterwards the previous generation must still be current, intact and give
the same search results, and the next build must succeed and remove what the killed writer
left behind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from retrieval.config import RetrievalConfig
from retrieval.store import IndexStore
from tests.faults.killing import kill_when_paused

OLD_DOCS = {
    "vpn.md": "# VPN\n\nError ERR-4471 means the device certificate expired; renew it.\n",
    "parking.txt": "Parking permits are issued by the facilities team on floor 2.\n",
}
NEW_DOC = {"cafeteria.md": "# Cafeteria\n\nLunch is served from noon until 2pm on weekdays.\n"}

CHILD = """
import os, sys, time
from pathlib import Path
from retrieval.config import RetrievalConfig
from retrieval.store import IndexStore

root, docs, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def pause(*args, **kwargs):
    print("paused", flush=True)
    time.sleep(3600)

if point == "scratch":
    from retrieval import lexical
    lexical.LexicalIndex.save = pause
elif point == "generation-renamed":
    import retrieval.store as store
    write = store.atomic_write_text
    store.atomic_write_text = lambda p, t: pause() if p.name == "CURRENT" else write(p, t)
elif point == "current-temp":
    replace = os.replace
    os.replace = lambda s, d: pause() if Path(d).name == "CURRENT" else replace(s, d)
IndexStore(root, config=RetrievalConfig(root=root)).build("kb", [docs], progress=False)
print("finished", flush=True)
"""

# What the killed writer must have left on disk, so the kill really landed mid-write.
EVIDENCE: dict[str, Callable[[Path], bool]] = {
    # chunks and embeddings written to scratch, the BM25 files not yet
    "scratch": lambda kb: any((p / "chunks.jsonl").is_file() for p in kb.glob(".gen-*.tmp")),
    # the new generation renamed into place, CURRENT still naming the old one
    "generation-renamed": lambda kb: (kb / "gen-000002" / "manifest.json").is_file(),
    # CURRENT's replacement written and synced, not yet renamed over it
    "current-temp": lambda kb: any(kb.glob(".CURRENT.*.tmp")),
}


@pytest.fixture(scope="module")
def embedder():
    from retrieval.embedder import Embedder

    return Embedder("bundled")


def write_docs(directory: Path, docs: dict[str, str]) -> Path:
    directory.mkdir(parents=True)
    for name, text in docs.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def results(store: IndexStore, query: str) -> list[list[tuple[str, float]]]:
    return [
        [(hit.chunk_id, hit.score) for hit in store.search("kb", query, mode=mode)]
        for mode in ("bm25", "hybrid")
    ]


# make test kills at the last point (~7 s each); make test-all at all three
@pytest.mark.parametrize(
    "point",
    [
        p if i == len(EVIDENCE) - 1 else pytest.param(p, marks=pytest.mark.slow)
        for i, p in enumerate(EVIDENCE)
    ],
)
def test_kill_9_mid_build_keeps_the_previous_index(point: str, tmp_path: Path, embedder) -> None:
    root = tmp_path / "indexes"
    config = RetrievalConfig(root=root)
    old_docs = write_docs(tmp_path / "old", OLD_DOCS)
    new_docs = write_docs(tmp_path / "new", {**OLD_DOCS, **NEW_DOC})
    IndexStore(root, config=config, embedder=embedder).build("kb", [old_docs], progress=False)
    before = results(IndexStore(root, config=config, embedder=embedder), "certificate expired")

    paused_where_expected = kill_when_paused(
        ["-c", CHILD, str(root), str(new_docs), point],
        tmp_path / "child.log",
        lambda: EVIDENCE[point](root / "kb"),
    )
    assert paused_where_expected

    after = IndexStore(root, config=config, embedder=embedder)  # a fresh reader
    info = after.info("kb")
    assert (info.generation, info.documents) == ("gen-000001", len(OLD_DOCS))
    assert results(after, "certificate expired") == before
    assert after.search("kb", "lunch noon", mode="bm25") == []

    report = after.build("kb", [new_docs], progress=False)
    assert report.documents == len(OLD_DOCS) + len(NEW_DOC)
    assert after.search("kb", "lunch noon", mode="bm25")[0].source.endswith("cafeteria.md")
    assert sorted(p.name for p in (root / "kb").iterdir()) == sorted(
        ["CURRENT", "gen-000001", report.generation]
    )
