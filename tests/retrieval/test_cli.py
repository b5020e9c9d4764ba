from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.cli import main


@pytest.fixture(autouse=True)
def shared_model(embedder, monkeypatch, tmp_path):
    """The CLI builds its own store; hand it the session's already-loaded real model."""
    monkeypatch.setattr("retrieval.embedder.Embedder", lambda *args, **kwargs: embedder)
    monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path / "home"))


def test_index_lifecycle(kb_dir: Path, tmp_path: Path, capsys) -> None:
    root = ["--root", str(tmp_path / "idx")]
    assert main(["index", "build", "--name", "kb", "--source", str(kb_dir), "--quiet", *root]) == 0
    assert "5 documents" in capsys.readouterr().out

    assert main(["index", "add", "--name", "kb", "--source", str(kb_dir), *root]) == 0
    assert "embedded 0 chunks" in capsys.readouterr().out

    assert main(["index", "list", *root]) == 0
    assert "kb " in capsys.readouterr().out

    assert main(["index", "info", "kb", *root]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] == 5 and info["dense"] == "flat"

    argv = ["index", "search", "kb", "有給休暇の申請", "--top-k", "2", "--json", *root]
    assert main(argv) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) <= 2 and Path(hits[0]["source"]).name == "leave.txt"

    assert main(["index", "search", "kb", "ERR-4471", "--mode", "bm25", *root]) == 0
    assert "vpn.md § IT handbook > VPN" in capsys.readouterr().out

    assert main(["index", "delete", "kb", *root]) == 0
    assert main(["index", "list", *root]) == 0
    assert "no indexes" in capsys.readouterr().out


def test_default_root_is_ragtune_home(kb_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["index", "build", "--name", "kb", "--source", str(kb_dir / "leave.txt")]) == 0
    assert (tmp_path / "home" / "indexes" / "kb" / "CURRENT").is_file()


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["index", "search", "nope", "q"], 1, "not found"),
        (["index", "info", "nope"], 1, "not found"),
        (["index", "delete", "nope"], 1, "not found"),
        (["index", "search", "../up", "q"], 2, "invalid index name"),
        (["index", "build", "--name", "a/b", "--source", "."], 2, "invalid index name"),
        (["index", "build", "--name", "kb", "--source", "/nonexistent/x"], 2, "not found"),
        (["index", "add", "--name", "kb", "--source", "."], 1, "not found"),
    ],
)
def test_cli_errors(tmp_path: Path, capsys, argv, code, message) -> None:
    assert main([*argv, "--root", str(tmp_path / "idx")]) == code
    assert message in capsys.readouterr().err


def test_corrupt_index_reported(kb_dir: Path, tmp_path: Path, capsys) -> None:
    root = ["--root", str(tmp_path / "idx")]
    main(["index", "build", "--name", "kb", "--source", str(kb_dir / "leave.txt"), *root])
    current = tmp_path / "idx" / "kb" / (tmp_path / "idx" / "kb" / "CURRENT").read_text().strip()
    (current / "chunks.jsonl").write_text("garbage")
    capsys.readouterr()
    assert main(["index", "search", "kb", "q", *root]) == 1
    assert "unavailable" in capsys.readouterr().err
    assert main(["index", "list", *root]) == 0
    assert "kb" in capsys.readouterr().out
