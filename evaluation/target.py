"""The server a benchmark talks to: one given by `--url`, or one the bench starts itself.

A started server gets exactly what the run needs: the adapter preloaded (its parent
directory added to the adapter roots, since the server only loads adapters from inside
them), the index root, and the usual config file. It is stopped when the run ends, even on
errors. With `--url` nothing is changed on the server; the adapter must already be loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_VERSION = re.compile(r"^v(\d+)$")


@dataclass
class Target:
    v1: str
    api_key: str
    base_model: str
    models: list[str] = field(default_factory=list)
    log_path: Path | None = None

    def client(self, timeout: float = 600.0) -> Any:
        import openai

        return openai.OpenAI(base_url=self.v1, api_key=self.api_key, timeout=timeout, max_retries=2)


@dataclass(frozen=True)
class AdapterSpec:
    """`--adapter`: the model name the ft arms send, and where to load it from (None: it is
    already loaded on the --url server)."""

    name: str
    path: Path | None = None


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def latest_version(root: Path) -> Path | None:
    """The highest vN (else newest) finished adapter directory under an adapter's root."""
    if _is_adapter_dir(root):
        return root
    if not root.is_dir():
        return None
    candidates = [p for p in root.iterdir() if not p.name.startswith(".") and _is_adapter_dir(p)]
    if not candidates:
        return None

    def order(path: Path) -> tuple[int, float]:
        match = _VERSION.match(path.name)
        return (int(match.group(1)) if match else -1, path.stat().st_mtime)

    return max(candidates, key=order)


def resolve_adapter(spec: str, home: Path, must_exist: bool) -> AdapterSpec:
    """NAME=PATH, an adapter directory, or a NAME under $RAGTUNE_HOME/adapters (its latest
    version). With `must_exist` False (a --url server) an unknown NAME is taken as loaded."""
    if "=" in spec:
        name, _, raw = spec.partition("=")
        path = Path(raw).expanduser()
        if not _is_adapter_dir(path):
            raise FileNotFoundError(f"--adapter {spec}: {path} holds no adapter_config.json")
        return AdapterSpec(name, path.resolve())
    as_path = Path(spec).expanduser()
    if _is_adapter_dir(as_path):
        manifest = as_path / "ragtune_adapter.json"
        name = as_path.name
        if manifest.is_file():
            name = json.loads(manifest.read_text(encoding="utf-8")).get("name") or name
        return AdapterSpec(name, as_path.resolve())
    found = latest_version(home / "adapters" / spec)
    if found is not None:
        return AdapterSpec(spec, found.resolve())
    if must_exist:
        raise FileNotFoundError(
            f"--adapter {spec}: no adapter directory named so, and none under "
            f"{home / 'adapters' / spec}; train one (`ragtune train --name {spec}`) or give "
            "NAME=PATH"
        )
    return AdapterSpec(spec, None)


def _client_key(api_key: str | None) -> str:
    if api_key:
        return api_key
    keys = [k.strip() for k in os.environ.get("RAGTUNE_API_KEYS", "").split(",") if k.strip()]
    return keys[0] if keys else "unused"


def _describe(v1: str, api_key: str, log_path: Path | None = None) -> Target:
    import openai

    client = openai.OpenAI(base_url=v1, api_key=api_key, timeout=30, max_retries=2)
    cards = client.models.list().data
    base = next((card.id for card in cards if not getattr(card, "parent", None)), None)
    if base is None:
        raise RuntimeError(f"{v1}/models lists no base model")
    return Target(v1, api_key, base, [card.id for card in cards], log_path)


@contextmanager
def open_target(
    url: str | None,
    *,
    api_key: str | None = None,
    adapter: AdapterSpec | None = None,
    index_root: Path | None = None,
    config: str | None = None,
    log_path: Path,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Target]:
    """Yield a described server; a started one is stopped on exit."""
    if url:
        target = _describe(url.rstrip("/"), _client_key(api_key))
        if adapter is not None and adapter.name not in target.models:
            raise ValueError(
                f"adapter {adapter.name!r} is not loaded on {url} (it serves "
                f"{', '.join(target.models)}); load it with POST /v1/load_lora_adapter or "
                "`ragtune serve --adapter NAME=PATH`, or leave out --url to start a server"
            )
        yield target
        return

    from ragtune.config import default_home, load_settings
    from ragtune.launcher import start_server

    env = dict(extra_env or {})
    args: list[str] = ["--config", config] if config else []
    if adapter is not None and adapter.path is not None:
        settings = load_settings(config)
        roots = [str(root) for root in settings.adapters.roots]
        inside = any(
            adapter.path.is_relative_to(root.resolve())
            for root in [default_home() / "adapters", *settings.adapters.roots]
            if root.exists()
        )
        if not inside:
            roots.append(str(adapter.path.parent))
        env["RAGTUNE_ADAPTERS__ROOTS"] = json.dumps(roots)
        args += ["--adapter", f"{adapter.name}={adapter.path}"]
    if index_root is not None:
        env["RAGTUNE_RETRIEVAL__ROOT"] = str(index_root)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("starting a server (log: %s)", log_path)
    server = start_server(env, log_path, args)
    try:
        yield _describe(server.v1, _client_key(api_key), log_path)
    finally:
        server.stop()
