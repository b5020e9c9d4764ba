"""Every shipped configs/train/*.yaml loads through the real `ragtune train` entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.cli import build_parser, main
from training.cli import config_from_args

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "train").glob("*.yaml"))


def test_shipped_configs_exist() -> None:
    assert {path.stem for path in CONFIGS} >= {"lora", "qlora", "sparse", "demo"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_shipped_config_loads(path: Path) -> None:
    args = build_parser().parse_args(["train", "--config", str(path)])
    assert args.handler.__name__ == "run_train"
    config = config_from_args(args)
    assert config.method in ("lora", "qlora", "sparse")
    if path.stem in ("lora", "qlora", "sparse"):
        assert config.method == path.stem


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = CONFIGS[0]
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(path),
            "--data",
            str(tmp_path),
            "--method",
            "sparse",
            "--max-steps",
            "7",
            "--output",
            str(tmp_path / "out"),
            "--seed",
            "3",
        ]
    )
    config = config_from_args(args)
    assert (config.data, config.method, config.max_steps, config.output, config.seed) == (
        tmp_path,
        "sparse",
        7,
        tmp_path / "out",
        3,
    )


def test_invalid_config_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\nlearning_rat: 0.1\n", encoding="utf-8")
    assert main(["train", "--config", str(bad)]) == 2
    assert "learning_rat" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
