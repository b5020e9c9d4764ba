"""Arm parsing, adapter resolution and the shipped preset config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.dataset import QAItem
from evaluation.runner import (
    FREE_PROMPT,
    FREE_PROMPT_JA,
    LABEL_PROMPT,
    Arm,
    default_system_prompt,
    parse_arms,
)
from evaluation.target import resolve_adapter

REPO = Path(__file__).resolve().parents[2]


def test_parse_arms() -> None:
    arms = parse_arms("base, rag,ft,ft+rag", "smol", "alpha")
    assert arms == [
        Arm("base", "smol", False),
        Arm("rag", "smol", True),
        Arm("ft", "alpha", False),
        Arm("ft+rag", "alpha", True),
    ]
    assert parse_arms("rag", "smol", None) == [Arm("rag", "smol", True)]


@pytest.mark.parametrize(
    ("spec", "adapter", "message"),
    [
        ("base,rlhf", "a", "unknown arm"),
        ("", "a", "unknown arm"),
        ("base,base", "a", "twice"),
        ("base,ft", None, "--adapter"),
    ],
)
def test_bad_arms(spec: str, adapter: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_arms(spec, "smol", adapter)


def test_default_system_prompt_follows_the_labels() -> None:
    labelled = [QAItem("a", "q", label="yes"), QAItem("b", "q", label="no")]
    free = [QAItem("a", "q", answers=("x",)), QAItem("b", "q", label="no")]
    assert default_system_prompt(labelled) == LABEL_PROMPT
    assert default_system_prompt(free) == FREE_PROMPT
    japanese = [
        QAItem("a", "休暇は何日ですか？", answers=("十日",)),
        QAItem("b", "q", answers=("x",)),
    ]
    assert default_system_prompt(japanese[:1]) == FREE_PROMPT_JA


def _adapter(path: Path, name: str | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    if name:
        (path / "ragtune_adapter.json").write_text(json.dumps({"name": name}))
    return path


def test_resolve_adapter(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _adapter(home / "adapters" / "kb" / "v2")
    newest = _adapter(home / "adapters" / "kb" / "v10")
    _adapter(home / "adapters" / "kb" / ".v11.checkpoints")  # unfinished runs are hidden
    assert resolve_adapter("kb", home, must_exist=True).path == newest.resolve()
    elsewhere = _adapter(tmp_path / "out" / "v1", name="pubmed")
    assert resolve_adapter(str(elsewhere), home, True).name == "pubmed"
    spec = resolve_adapter(f"mine={elsewhere}", home, True)
    assert (spec.name, spec.path) == ("mine", elsewhere.resolve())
    assert resolve_adapter("remote", home, must_exist=False).path is None
    with pytest.raises(FileNotFoundError, match="ragtune train"):
        resolve_adapter("remote", home, must_exist=True)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        resolve_adapter(f"x={tmp_path}", home, True)


def test_preset_train_config_loads_through_the_training_entry_point() -> None:
    from training.config import load_train_config

    config = load_train_config(REPO / "configs" / "bench" / "pubmedqa-train.yaml")
    assert config.name == "pubmedqa-knowledge"
    assert config.method == "lora" and config.early_stopping_patience is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "o"], "--dataset"),
        (["--out", "o", "--preset", "pubmedqa", "--dataset", "d.jsonl"], "not both"),
        (["--out", "o", "--preset", "pubmedqa", "--url", "http://x/v1"], "own server"),
        (["--out", "o", "--dataset", "d.jsonl", "--limit", "0"], "--limit"),
    ],
)
def test_cli_rejects_bad_combinations(argv: list[str], message: str) -> None:
    import argparse

    from evaluation.cli import register

    parser = argparse.ArgumentParser(prog="ragtune")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    with pytest.raises(ValueError, match=message):
        args.handler(args)
