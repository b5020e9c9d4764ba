"""Servers sharing a store keep one adapter registry and one set of indexes: an admin change
on one is applied by the others when they poll (and by one started later), versions arrive
with their weights left on disk until a request needs them; on S3 (moto) and locally."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ragtune.config import EngineConfig
from ragtune.models import LoadedModel
from ragtune.store import Store
from retrieval.mirror import IndexMirror
from server.adapters.errors import AdapterNotFoundError
from server.adapters.loader import BaseSpec
from server.adapters.registry import AdapterRegistry
from server.adapters.shared import SharedRegistry
from server.engine.runner import build_runner
from tests.engine.families import peft_adapter, tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[BaseSpec, Path]:
    """The tiny Llama's adapter spec and a directory of three adapters for it."""
    model = tiny_model("llama")
    loaded = LoadedModel(model, None, None, "f" * 64, "cpu", torch.float32, "none")
    config = EngineConfig(max_batch_size=2, max_loras=2, max_lora_rank=8, weights="dense")
    runner = build_runner(loaded, config, max_seq_len=64)
    spec = BaseSpec("f" * 64, 2, runner.module_shapes, 8, torch.float32)
    source = tmp_path_factory.mktemp("admin-adapters")
    for seed in (1, 2, 3):
        peft_adapter(model, "llama", source / f"a{seed}", rank=4, seed=seed)
    return spec, source


def _server(spec: BaseSpec, store: Store, *extra_roots: Path) -> AdapterRegistry:
    roots = [store.local("adapters"), *extra_roots]
    roots[0].mkdir(parents=True, exist_ok=True)
    registry = AdapterRegistry(spec, roots, max_resident=8, base_model_id="base")
    SharedRegistry(registry, store)
    return registry


@pytest.fixture(params=["local", "s3"])
def stores(request, tmp_path: Path):
    """A factory of Store objects on one shared location, one per simulated server."""
    if request.param == "local":
        shared = tmp_path / "shared"
        return lambda i: Store(str(shared), tmp_path / f"home{i}")
    url, options = request.getfixturevalue("s3_url")
    return lambda i: Store(url, tmp_path / f"home{i}", options=options)


def test_admin_changes_reach_every_server(tiny, stores) -> None:
    spec, source = tiny
    a = _server(spec, stores(0), source)
    b = _server(spec, stores(1))
    a.load("x", str(source / "a1"), "v1")
    b.before_change()  # what b's poller does (SharedRegistry.pull)
    assert b.model_ids() == ["x", "x@v1"]
    assert b.resident_ids() == []  # registered, weights still on disk
    assert b.resolve("x") is not None and b.resident_ids() == ["x@v1", "x"]

    a.load("x", str(source / "a2"), "v2")
    a.activate("x", "v2")
    b.before_change()
    assert b.snapshot()["x"]["active"] == "v2" and b.snapshot()["x"]["history"] == ["v1"]
    a.rollback("x")
    b.before_change()
    assert b.snapshot()["x"]["active"] == "v1"

    late = _server(spec, stores(2))  # a replica started after the changes
    late.before_change()
    assert late.snapshot() == {
        "x": {"active": "v1", "history": [], "versions": late.snapshot()["x"]["versions"]}
    }
    assert sorted(late.snapshot()["x"]["versions"]) == ["v1", "v2"]

    a.unload("x", "v2")
    b.before_change()
    with pytest.raises(AdapterNotFoundError):
        b.resolve("x@v2")
    a.unload("x")
    b.before_change()
    late.before_change()
    assert b.model_ids() == [] and late.model_ids() == []


def test_a_replaced_version_is_reloaded_elsewhere(tiny, stores) -> None:
    spec, source = tiny
    a = _server(spec, stores(0), source)
    b = _server(spec, stores(1))
    a.load("y", str(source / "a1"), "v1")
    b.before_change()
    first = b.resolve("y")
    a.load("y", str(source / "a3"), "v1", replace=True)
    b.before_change()
    second = b.resolve("y")
    assert not torch.equal(_first_tensor(first), _first_tensor(second))


def test_a_version_replaced_by_equal_files_still_loads_elsewhere(tiny, stores) -> None:
    """A replace with the same content leaves the store's files as they are, so the other
    server, even before its next poll, reloads the version from disk instead of refusing it
    as changed (seen in bench/replicas.py on a reused home: 503 `adapter_unavailable`)."""
    spec, source = tiny
    a = _server(spec, stores(0), source)
    b = _server(spec, stores(1))
    a.load("z", str(source / "a2"), "v1")
    b.before_change()  # registered on b, weights left on disk
    a.load("z", str(source / "a2"), "v1", replace=True)
    assert torch.equal(_first_tensor(b.resolve("z")), _first_tensor(a.resolve("z")))
    b.before_change()
    assert torch.equal(_first_tensor(b.resolve("z")), _first_tensor(a.resolve("z")))


def test_changes_made_on_the_second_server_come_back(tiny, stores) -> None:
    spec, source = tiny
    a = _server(spec, stores(0), source)
    b = _server(spec, stores(1))
    a.load("z", str(source / "a1"), "v1")
    b.before_change()
    b.unload("z")  # an admin call that HAProxy happened to send to b
    a.before_change()
    assert a.model_ids() == []


def _first_tensor(weights) -> torch.Tensor:
    for value in vars(weights).values():
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, dict):
            for item in value.values():
                if isinstance(item, torch.Tensor):
                    return item
                if isinstance(item, tuple | list):
                    return item[0]
    raise AssertionError("no tensor in the adapter weights")


def _generation(root: Path, name: str, gen: str, text: str) -> None:
    (root / name / gen).mkdir(parents=True, exist_ok=True)
    (root / name / gen / "chunks.jsonl").write_text(text)
    (root / name / "CURRENT").write_text(gen + "\n")


def test_index_mirror_on_s3(tmp_path: Path, s3_url) -> None:
    url, options = s3_url
    one, two = (Store(url, tmp_path / f"h{i}", options=options) for i in (1, 2))
    a, b = IndexMirror(one), IndexMirror(two)
    _generation(a.root, "docs", "gen-000001", "first")
    a.push("docs")
    b.pull()
    assert (b.root / "docs/CURRENT").read_text().strip() == "gen-000001"
    assert (b.root / "docs/gen-000001/chunks.jsonl").read_text() == "first"
    _generation(b.root, "docs", "gen-000002", "second")  # rebuilt on the other server
    b.push("docs")
    a.pull()
    assert (a.root / "docs/gen-000002/chunks.jsonl").read_text() == "second"
    (a.root / "docs/CURRENT").unlink()  # deleted on a (IndexStore.delete removes it all)
    a.push("docs")
    b.pull()
    assert not (b.root / "docs").exists()
    assert one.list_dir("indexes") == []
