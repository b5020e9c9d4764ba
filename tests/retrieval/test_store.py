from __future__ import annotations

import itertools
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import IndexNotFoundError, IndexUnavailableError, InvalidIndexNameError
from retrieval.loaders import Document
from retrieval.store import IndexStore, validate_index_name


def _gen(store: IndexStore, name: str) -> Path:
    return store.root / name / (store.root / name / "CURRENT").read_text().strip()


def test_build_report(store, kb_dir: Path) -> None:
    report = store.build("kb", [kb_dir], progress=False)
    assert report.documents == 5 and report.chunks >= 6
    assert report.embedded_chunks == report.chunks
    assert sorted(Path(p).name for p in report.added) == sorted(p.name for p in kb_dir.iterdir())
    info = store.info("kb")
    assert (info.documents, info.chunks, info.dense) == (5, report.chunks, "flat")


def test_search_every_mode(kb_index) -> None:
    _, index = kb_index
    cases = [
        ("dense", "when can I have lunch", "cafeteria.html"),
        ("bm25", "ERR-4471", "vpn.md"),
        ("hybrid", "有給休暇の申請", "leave.txt"),
        ("hybrid", "who issues parking permits", "parking.pdf"),
        ("hybrid", "area of a circle", "mathutil.py"),
    ]
    for mode, query, expected in cases:
        hits = index.search(query, top_k=3, mode=mode)
        assert hits, (mode, query)
        assert Path(hits[0].source).name == expected, (mode, query, hits[0])
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
        assert all(a.score >= b.score for a, b in itertools.pairwise(hits))


def test_hit_metadata_points_into_the_document(kb_index) -> None:
    kb_dir, index = kb_index
    hit = index.search("printer driver pack", top_k=1, mode="hybrid")[0]
    assert hit.index == "kb"
    assert hit.source == str((kb_dir / "vpn.md").resolve())
    assert hit.title == "IT handbook"
    assert hit.heading == ("IT handbook", "Printers")
    text = (kb_dir / "vpn.md").read_text(encoding="utf-8")
    assert text[hit.start : hit.end] == hit.text
    code_hit = index.search("push item onto stack", top_k=1, mode="dense")[0]
    assert code_hit.heading == ("class Stack",)
    assert code_hit.text.startswith("class Stack:")


def test_bm25_returns_only_matching_chunks_and_min_score(kb_index) -> None:
    _, index = kb_index
    assert index.search("qwertyuiop", mode="bm25") == []
    hits = index.search("cafeteria lunch", top_k=5, mode="dense")
    cut = hits[0].score - 1e-6
    assert [h.chunk_id for h in index.search("cafeteria lunch", mode="dense", min_score=cut)] == [
        hits[0].chunk_id
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query": "  "}, "non-empty"),
        ({"query": "x", "top_k": 0}, "top_k"),
        ({"query": "x", "top_k": True}, "top_k"),
        ({"query": "x", "mode": "sparse"}, "mode"),
    ],
)
def test_search_rejects_bad_arguments(kb_index, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        kb_index[1].search(**kwargs)


def test_incremental_add_embeds_only_new_and_changed(store, kb_dir: Path, embed_spy) -> None:
    store.build("kb", [kb_dir], progress=False)
    first = len(embed_spy.texts)
    assert first > 0

    report = store.add("kb", [kb_dir], progress=False)
    assert len(embed_spy.texts) == first  # nothing re-embedded
    assert report.embedded_chunks == 0 and len(report.unchanged) == 5

    (kb_dir / "leave.txt").write_text("育児休業は子が一歳になるまで取得できます。\n", "utf-8")
    (kb_dir / "new.txt").write_text("The gym on floor 2 opens at 6am.", "utf-8")
    report = store.add("kb", [kb_dir / "leave.txt", kb_dir / "new.txt"], progress=False)
    assert sorted(embed_spy.texts[first:]) == sorted(
        ["育児休業は子が一歳になるまで取得できます。", "The gym on floor 2 opens at 6am."]
    )
    assert [Path(p).name for p in report.updated] == ["leave.txt"]
    assert [Path(p).name for p in report.added] == ["new.txt"]
    index = store.get("kb")
    assert index.info.documents == 6
    texts = [chunk.text for chunk in index.chunks]
    assert not any("有給休暇" in text for text in texts)  # the old chunks are gone
    assert Path(index.search("育児休業", mode="bm25")[0].source).name == "leave.txt"


def test_build_replaces_document_set_and_reuses_embeddings(store, kb_dir, embed_spy) -> None:
    store.build("kb", [kb_dir], progress=False)
    before = len(embed_spy.texts)
    (kb_dir / "vpn.md").rename(kb_dir / "vpn-renamed.md")
    report = store.build("kb", [kb_dir / "vpn-renamed.md", kb_dir / "leave.txt"], progress=False)
    assert len(embed_spy.texts) == before  # a renamed file reuses its embeddings
    assert report.documents == 2
    assert sorted(Path(p).name for p in report.removed) == [
        "cafeteria.html",
        "mathutil.py",
        "parking.pdf",
        "vpn.md",
    ]
    sources = {Path(c.source).name for c in store.get("kb").chunks}
    assert sources == {"vpn-renamed.md", "leave.txt"}


def test_add_to_unknown_index_fails(store, kb_dir: Path) -> None:
    with pytest.raises(IndexNotFoundError):
        store.add("missing", [kb_dir], progress=False)


def test_crash_mid_build_keeps_previous_index(store, kb_dir, monkeypatch) -> None:
    store.build("kb", [kb_dir / "leave.txt"], progress=False)
    old_generation = _gen(store, "kb").name

    from retrieval import lexical

    def crash(self, directory):
        raise RuntimeError("simulated crash while writing the BM25 files")

    monkeypatch.setattr(lexical.LexicalIndex, "save", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.build("kb", [kb_dir], progress=False)
    monkeypatch.undo()

    fresh = IndexStore(store.root, config=store.config, embedder=store.embedder)
    assert _gen(fresh, "kb").name == old_generation
    index = fresh.get("kb")
    assert index.info.documents == 1
    assert Path(index.search("有給休暇", mode="hybrid")[0].source).name == "leave.txt"
    leftovers = [p.name for p in (store.root / "kb").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    # the next build succeeds and switches generations
    assert fresh.build("kb", [kb_dir], progress=False).documents == 5
    assert fresh.get("kb").info.documents == 5


def test_scratch_left_by_a_killed_writer_is_ignored_and_cleaned(store, kb_dir) -> None:
    store.build("kb", [kb_dir / "leave.txt"], progress=False)
    stale = store.root / "kb" / ".gen-000002.abcd.tmp"
    stale.mkdir()
    (stale / "chunks.jsonl").write_text("{half", encoding="utf-8")
    assert store.get("kb").info.documents == 1
    store.build("kb", [kb_dir / "leave.txt", kb_dir / "vpn.md"], progress=False)
    assert not stale.exists()


CORRUPTIONS = {
    "manifest_garbage": lambda d: (d / "manifest.json").write_text("{not json"),
    "chunks_truncated": lambda d: (d / "chunks.jsonl").write_text('{"id": "x"'),
    "embeddings_wrong_shape": lambda d: np.save(d / "embeddings.npy", np.zeros((1, 3))),
    "embeddings_deleted": lambda d: (d / "embeddings.npy").unlink(),
    "lexical_deleted": lambda d: [p.unlink() for p in (d / "lexical").iterdir()],
    "byte_flipped": lambda d: (d / "documents.json").write_bytes(
        (d / "documents.json").read_bytes().replace(b"leave", b"LEAVE")
    ),
}


@pytest.fixture(scope="module")
def two_indexes(tmp_path_factory, embedder) -> tuple[Path, Path]:
    """A root with indexes 'good' and 'bad', built once and copied per test."""
    from tests.retrieval.conftest import write_kb

    base = tmp_path_factory.mktemp("two")
    kb = write_kb(base / "kb")
    store = IndexStore(base / "indexes", embedder=embedder)
    store.build("good", [kb / "vpn.md"], progress=False)
    store.build("bad", [kb / "leave.txt"], progress=False)
    return base / "indexes", kb


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_corrupt_index_is_unavailable_and_others_keep_serving(
    make_store, two_indexes, tmp_path, corrupt
) -> None:
    template, kb_dir = two_indexes
    shutil.copytree(template, tmp_path / "copy")
    store = make_store(root=tmp_path / "copy")
    CORRUPTIONS[corrupt](_gen(store, "bad"))
    with pytest.raises(IndexUnavailableError):
        store.get("bad")
    with pytest.raises(IndexUnavailableError):  # cached failure, same answer
        store.get("bad")
    assert store.get("good").search("VPN", mode="bm25")
    listed = store.list_indexes()
    assert len(listed) == 2
    # a rebuild repairs it
    store.build("bad", [kb_dir / "leave.txt"], progress=False)
    assert store.get("bad").search("有給休暇", mode="bm25")


def test_add_to_corrupt_index_is_refused(store, kb_dir) -> None:
    store.build("bad", [kb_dir / "leave.txt"], progress=False)
    (_gen(store, "bad") / "embeddings.npy").write_bytes(b"garbage")
    with pytest.raises(IndexUnavailableError):
        store.add("bad", [kb_dir / "vpn.md"], progress=False)


def test_pickled_embeddings_are_refused(store, kb_dir) -> None:
    store.build("kb", [kb_dir / "leave.txt"], progress=False)
    gen = _gen(store, "kb")
    np.save(gen / "embeddings.npy", np.array([object()], dtype=object), allow_pickle=True)
    manifest = json.loads((gen / "manifest.json").read_text())
    from ragtune.fileio import sha256_file

    manifest["files"]["embeddings.npy"] = sha256_file(gen / "embeddings.npy")
    (gen / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexUnavailableError, match="pickle"):
        store.get("kb")


@pytest.mark.parametrize(
    "name", ["", "../etc", "a/b", ".hidden", "-x", "x" * 65, "名前", "a b", None]
)
def test_bad_names_are_rejected(store, name) -> None:
    with pytest.raises(InvalidIndexNameError):
        validate_index_name(name)
    with pytest.raises(InvalidIndexNameError):
        store.get(name)


@pytest.mark.parametrize("name", ["kb", "KB-2024.v1", "a_b", "9" * 64])
def test_good_names_are_accepted(name) -> None:
    assert validate_index_name(name) == name


def test_unknown_index(store) -> None:
    with pytest.raises(IndexNotFoundError):
        store.get("nope")
    with pytest.raises(IndexNotFoundError):
        store.info("nope")
    with pytest.raises(IndexNotFoundError):
        store.delete("nope")
    assert store.names() == []


def test_current_pointing_outside_is_refused(store, kb_dir) -> None:
    store.build("kb", [kb_dir / "leave.txt"], progress=False)
    (store.root / "kb" / "CURRENT").write_text("../../../etc")
    with pytest.raises(IndexUnavailableError, match="CURRENT"):
        store.get("kb")


def test_symlinked_index_escaping_root_is_refused(store, kb_dir, tmp_path) -> None:
    other = IndexStore(tmp_path / "elsewhere", config=store.config, embedder=store.embedder)
    other.build("kb", [kb_dir / "leave.txt"], progress=False)
    store.root.mkdir(parents=True, exist_ok=True)
    (store.root / "evil").symlink_to(other.root / "kb", target_is_directory=True)
    with pytest.raises(IndexUnavailableError, match="outside"):
        store.get("evil")


def test_manifest_file_list_cannot_escape(store, kb_dir) -> None:
    store.build("kb", [kb_dir / "leave.txt"], progress=False)
    gen = _gen(store, "kb")
    manifest = json.loads((gen / "manifest.json").read_text())
    manifest["files"]["../../../../etc/passwd"] = "0" * 64
    (gen / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexUnavailableError, match="outside"):
        store.get("kb")


def test_delete_and_list(store, kb_dir) -> None:
    store.build("a", [kb_dir / "leave.txt"], progress=False)
    store.build("b", [kb_dir / "vpn.md"], progress=False)
    assert store.get("a")
    assert [info.name for info in store.list_indexes()] == ["a", "b"]
    store.delete("a")
    assert store.names() == ["b"]
    with pytest.raises(IndexNotFoundError):
        store.get("a")


def test_get_notices_rebuilds(store, kb_dir) -> None:
    store.build("kb", [kb_dir / "leave.txt"], progress=False)
    first = store.get("kb")
    assert store.get("kb") is first
    store.build("kb", [kb_dir / "leave.txt", kb_dir / "vpn.md"], progress=False)
    assert store.get("kb") is not first
    assert store.get("kb").info.documents == 2


def test_embedder_mismatch_is_unavailable_for_dense(store, kb_dir) -> None:
    store.build("kb", [kb_dir / "leave.txt"], progress=False)
    gen = _gen(store, "kb")
    manifest = json.loads((gen / "manifest.json").read_text())
    manifest["embedder"]["fingerprint"] = "someothermodel00"
    (gen / "manifest.json").write_text(json.dumps(manifest))
    index = IndexStore(store.root, config=store.config, embedder=store.embedder).get("kb")
    assert index.search("有給休暇", mode="bm25")  # lexical search still works
    with pytest.raises(IndexUnavailableError, match="embedder"):
        index.search("有給休暇", mode="hybrid")


def test_hnsw_above_threshold(make_store, tmp_path) -> None:
    store = make_store(root=tmp_path / "hnsw", hnsw_threshold=10)
    docs = [
        Document.from_text(f"doc{i}", f"Topic number {i} is about item{i} and nothing else.")
        for i in range(12)
    ]
    store.build_documents("big", docs, progress=False)
    index = store.get("big")
    assert index.info.dense == "hnsw"
    assert index.search("item7", top_k=1, mode="hybrid")[0].source == "doc7"


def test_concurrent_searches(kb_index) -> None:
    _, index = kb_index
    expected = {
        q: index.search(q, top_k=2, mode=m)[0].chunk_id
        for q, m in [("有給休暇", "hybrid"), ("ERR-4471", "bm25"), ("lunch time", "dense")]
    }
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                for (q, m), want in zip(
                    [("有給休暇", "hybrid"), ("ERR-4471", "bm25"), ("lunch time", "dense")],
                    expected.values(),
                    strict=True,
                ):
                    assert index.search(q, top_k=2, mode=m)[0].chunk_id == want
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_empty_sources_are_an_error(store, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        store.build("kb", [tmp_path / "empty"], progress=False)
    assert not store.exists("kb")
