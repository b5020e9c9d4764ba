"""Configuration: YAML < env < flags, fixed env names, validation, and docs that keep up."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from ragtune.config import DEFAULT_CONFIG_PATH, Settings, load_settings

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("RAGTUNE_"):
            monkeypatch.delenv(name)


def test_default_yaml_matches_the_model_defaults():
    assert load_settings().model_dump() == Settings().model_dump()
    assert load_settings().model.served_model_name == "smollm2-135m-instruct"


def test_env_beats_yaml_and_flags_beat_env(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  quantization: int8\nserver:\n  port: 9001\n")
    assert load_settings(config).model.quantization == "int8"
    monkeypatch.setenv("RAGTUNE_MODEL__QUANTIZATION", "none")
    monkeypatch.setenv("RAGTUNE_SERVER__PORT", "9002")
    settings = load_settings(config)
    assert settings.model.quantization == "none" and settings.server.port == 9002
    assert load_settings(config, {"server": {"port": 9003}}).server.port == 9003


def test_fixed_environment_names(monkeypatch, tmp_path):
    monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path))
    monkeypatch.setenv("RAGTUNE_API_KEYS", "a, b,,c")
    monkeypatch.setenv("RAGTUNE_ADMIN_KEYS", "root")
    settings = load_settings()
    assert settings.home == tmp_path
    assert settings.api_keys == ["a", "b", "c"]
    assert settings.admin_keys == ["root"]


@pytest.mark.parametrize(
    "yaml_text",
    [
        "model:\n  quantization: fp8\n",
        "limits:\n  max_new_tokens: 0\n",
        "typo_section: 1\n",
        "model:\n  sorce: bundled\n",
        "serve:\n  min_replicas: 1\n",  # autoscaling needs both bounds, not one ignored
        "serve:\n  max_replicas: 2\n",
        "serve:\n  min_replicas: 3\n  max_replicas: 2\n",
        "serve:\n  min_replicas: 0\n  max_replicas: 2\n",
        "serve:\n  min_replicas: 1\n  max_replicas: 2\n  look_back_period_s: 0\n",
    ],
)
def test_invalid_config_is_rejected(tmp_path, yaml_text):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ValidationError):
        load_settings(config)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "nope.yaml")


def _option_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += _option_names(annotation, f"{prefix}{name}.")
        else:
            names.append(f"{prefix}{name}")
    return names


def test_every_option_is_documented_in_readme_and_default_yaml():
    readme = README.read_text(encoding="utf-8")
    default_yaml = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")
    for option in _option_names(Settings):
        assert f"`{option}`" in readme, f"README.md does not document {option}"
        leaf = option.rsplit(".", 1)[-1]
        if "." in option:
            assert f"{leaf}:" in default_yaml, f"configs/default.yaml lacks {option}"
