"""The shared store: documents replaced whole, directories trusted only through their
manifest (written last), downloads checked file by file; locally and on S3 (moto)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.store import COMPLETE, Store, StoreError, directory_manifest


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_local_store_publishes_in_place_and_by_copy(tmp_path: Path) -> None:
    store = Store(None, tmp_path / "home")
    assert not store.remote and store.local_root == tmp_path / "home"
    store.write_json("registry/state.json", {"revision": 1})
    assert store.read_json("registry/state.json") == {"revision": 1}
    assert store.read_json("registry/missing.json") is None

    source = _tree(tmp_path / "elsewhere", {"a.txt": "1", "sub/b.txt": "2", ".scratch": "x"})
    digest = store.publish_dir("adapters/x/v1", source)
    copied = store.fetch_dir("adapters/x/v1")
    assert copied == tmp_path / "home/adapters/x/v1"
    assert (copied / "sub/b.txt").read_text() == "2" and not (copied / ".scratch").exists()
    assert store.manifest("adapters/x/v1")["digest"] == digest
    assert store.list_dir("adapters/x") == ["v1"]

    before = {p.name: p.stat().st_ino for p in copied.iterdir()}
    assert store.publish_dir("adapters/x/v1", source) == digest  # the same content again:
    assert {p.name: p.stat().st_ino for p in copied.iterdir()} == before  # the files stay
    _tree(source, {"a.txt": "changed"})
    assert store.publish_dir("adapters/x/v1", source) != digest
    assert (copied / "a.txt").read_text() == "changed"

    in_place = _tree(tmp_path / "home/adapters/y/v1", {"w": "3"})  # already in the store
    store.publish_dir("adapters/y/v1", in_place)
    assert sorted(p.name for p in in_place.iterdir()) == [COMPLETE, "w"]
    store.delete("adapters/y")
    assert not in_place.exists()


@pytest.mark.parametrize("bad", ["/abs", "a/../b", "", "."])
def test_store_paths_stay_inside(tmp_path: Path, bad: str) -> None:
    with pytest.raises(StoreError):
        Store(None, tmp_path).local(bad)


def test_manifest_refuses_links(tmp_path: Path) -> None:
    source = _tree(tmp_path / "src", {"a": "1"})
    (source / "link").symlink_to(tmp_path / "src" / "a")
    with pytest.raises(StoreError, match="symbolic link"):
        directory_manifest(source)


def test_s3_store_round_trip_and_half_writes(tmp_path: Path, s3_url) -> None:
    url, options = s3_url
    writer = Store(url, tmp_path / "w", options=options)
    reader = Store(url, tmp_path / "r", options=options)
    assert writer.remote and reader.local_root.is_relative_to(tmp_path / "r" / "store-cache")

    writer.write_json("registry/state.json", {"revision": 3})
    assert reader.read_json("registry/state.json") == {"revision": 3}

    source = _tree(tmp_path / "src", {"weights.bin": "A" * 1000, "config.json": "{}"})
    writer.publish_dir("adapters/x/v1", source)
    local = reader.fetch_dir("adapters/x/v1")
    assert (local / "weights.bin").read_text() == "A" * 1000
    assert reader.list_dir("adapters") == ["x"]

    # files without their manifest (an upload in progress) are never used
    half = _tree(tmp_path / "half", {"weights.bin": "B"})
    writer.fs.put_file(str(half / "weights.bin"), f"{writer.root}/adapters/x/v2/weights.bin")
    with pytest.raises(StoreError, match="has not finished"):
        reader.fetch_dir("adapters/x/v2")

    # a file that no longer matches its manifest (replaced under a reader) is refused ...
    writer.fs.pipe_file(f"{writer.root}/adapters/x/v1/weights.bin", b"C" * 1000)
    fresh = Store(url, tmp_path / "r2", options=options)
    with pytest.raises(StoreError, match="changed while it was downloaded"):
        fresh.fetch_dir("adapters/x/v1")
    assert not (fresh.local("adapters/x/v1")).exists()  # nothing half-written left behind
    # ... and a re-publish (new files, then the new manifest) is picked up by every reader
    _tree(source, {"weights.bin": "D" * 1000})
    writer.publish_dir("adapters/x/v1", source)
    assert (reader.fetch_dir("adapters/x/v1") / "weights.bin").read_text() == "D" * 1000
    assert (
        json.loads((local / COMPLETE).read_text())["digest"]
        == writer.manifest("adapters/x/v1")["digest"]
    )

    writer.delete("adapters/x")
    assert reader.list_dir("adapters") == []
