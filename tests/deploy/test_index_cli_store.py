"""`ragtune index build/delete` with `store.url` on S3 (moto): the index is built in the local
cache and published; another server's mirror picks it up, and the deletion too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.cli import main
from ragtune.store import Store
from retrieval.mirror import IndexMirror


def test_cli_publishes_indexes_to_the_store(tmp_path: Path, s3_url, monkeypatch, capsys) -> None:
    url, options = s3_url
    monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path / "cli-home"))
    monkeypatch.setenv("RAGTUNE_STORE__URL", url)
    monkeypatch.setenv("RAGTUNE_STORE__OPTIONS", json.dumps(options))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "dock.md").write_text("# Dock\n\nPallets are weighed at dock 7.\n")

    assert main(["index", "build", "--name", "kb", "--source", str(docs), "--quiet"]) == 0
    assert "1 documents" in capsys.readouterr().out

    server = IndexMirror(Store(url, tmp_path / "server-home", options=options))
    server.pull()
    generation = (server.root / "kb" / "CURRENT").read_text().strip()
    assert (server.root / "kb" / generation / "manifest.json").is_file()

    assert main(["index", "delete", "kb"]) == 0
    server.pull()
    assert not (server.root / "kb").exists()


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch) -> None:
    monkeypatch.setenv("TQDM_DISABLE", "1")
