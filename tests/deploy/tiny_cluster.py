"""The environment a local test cluster's replicas share: a tiny Llama saved at
`root/model` (tests.engine.families.save_model_dir), fp32 and dense (exact, quick to load),
one CPU a replica, keys from the test."""

from __future__ import annotations

from pathlib import Path


def tiny_replica_env(root: Path, api_key: str, admin_key: str, served_name: str) -> dict[str, str]:
    return {
        "RAGTUNE_HOME": str(root / "home"),
        "RAGTUNE_API_KEYS": api_key,
        "RAGTUNE_ADMIN_KEYS": admin_key,
        "RAGTUNE_MODEL__SOURCE": str(root / "model"),
        "RAGTUNE_MODEL__SERVED_MODEL_NAME": served_name,
        "RAGTUNE_MODEL__QUANTIZATION": "none",
        "RAGTUNE_MODEL__DTYPE": "fp32",
        "RAGTUNE_ENGINE__WEIGHTS": "dense",
        "RAGTUNE_LIMITS__MAX_NEW_TOKENS": "32",
        "RAGTUNE_SERVE__REPLICA_CPUS": "1",
        "RAGTUNE_SERVER__LOG_LEVEL": "warning",
    }
