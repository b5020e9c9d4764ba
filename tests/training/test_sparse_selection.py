"""Importance-chosen sparsity (training/sparse_selection.py) on a tiny random-weight Llama:
each selection trains exactly r * (in + out) entries per matrix, gradient selection keeps the
largest accumulated |grad| (checked against a direct computation), density sets the rank, the
manifest records the choice, and the sparse-only options are refused elsewhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine.families import ALL_MODULES, save_model_dir, tiny_model
from tests.training.test_train import ROWS, VAL, tiny_config, write_chat_data
from training.config import AdapterSettings, TrainConfig
from training.sparse_selection import (
    budget_count,
    density_for,
    gradient_scores,
    max_rank,
    rank_for_density,
    select,
    target_linears,
)

SELECTIONS = ("random", "magnitude", "gradient")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer random Llama with the bundled tokenizer, saved as a model directory."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model_dir("llama", path)
    return path


def _batches(count: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, 512, (2, 12), generator=generator)
        labels = ids.clone()
        labels[:, :4] = -100
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return batches


def _sparse(selection: str, **adapter: Any) -> TrainConfig:
    settings = {"r": 2, "target_modules": ALL_MODULES, "selection": selection, **adapter}
    return TrainConfig.model_validate({"method": "sparse", "adapter": settings})


def _chosen_entries(peft_model: Any) -> dict[str, set[int]]:
    """Flat indices each SHiRA layer trains, by module path."""
    chosen = {}
    for path, module in peft_model.named_modules():
        if hasattr(module, "shira_indices") and "default" in module.shira_indices:
            rows, cols = module.shira_indices["default"].long()
            chosen[path] = set((rows * module.in_features + cols).tolist())
    return chosen


def _with_adapter(model: Any, config: TrainConfig, batches: list) -> tuple[Any, Any]:
    from peft import get_peft_model

    from training.peft_model import peft_config

    selection = select(model, config.adapter, lambda: batches)
    config.adapter.r = selection.r
    return get_peft_model(model, peft_config(config, selection.mask_fn)), selection


@pytest.mark.parametrize("selection", SELECTIONS)
def test_each_selection_trains_exactly_the_budget_per_matrix(selection: str) -> None:
    model = tiny_model("llama")
    shapes = {
        p: (m.in_features, m.out_features) for p, m in target_linears(model, ALL_MODULES).items()
    }
    assert len(shapes) == 2 * len(ALL_MODULES)
    peft_model, chosen = _with_adapter(model, _sparse(selection), _batches())
    entries = _chosen_entries(peft_model)
    assert len(entries) == len(shapes)
    for path, flat in entries.items():
        in_features, out_features = shapes[path.removeprefix("base_model.model.")]
        assert len(flat) == budget_count(in_features, out_features, 2)  # distinct entries
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == sum(budget_count(i, o, 2) for i, o in shapes.values())
    assert chosen.record["selection"] == selection and chosen.record["r"] == 2
    assert chosen.record["density"] == pytest.approx(
        trainable / sum(i * o for i, o in shapes.values()), abs=1e-6
    )


def test_gradient_selection_picks_the_largest_accumulated_gradients() -> None:
    batches = _batches(count=3)
    model = tiny_model("llama")
    linears = target_linears(model, ALL_MODULES)
    # directly: every parameter trainable, one backward per batch, sum of |grad| per weight
    direct = {path: torch.zeros_like(m.weight) for path, m in linears.items()}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for path, module in linears.items():
            direct[path] += module.weight.grad.abs()
    model.zero_grad()
    scores = gradient_scores(model, linears, batches)
    for path in linears:
        torch.testing.assert_close(scores[path], direct[path], rtol=1e-5, atol=1e-9)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # restored

    peft_model, chosen = _with_adapter(model, _sparse("gradient"), batches)
    assert chosen.record["calibration_batches"] == 3 and chosen.record["calibration_examples"] == 6
    for path, flat in _chosen_entries(peft_model).items():
        score = direct[path.removeprefix("base_model.model.")].flatten()
        expected = set(score.topk(len(flat)).indices.tolist())
        assert flat == expected
        # and not simply the largest weights: the two choices differ
        weight = linears[path.removeprefix("base_model.model.")].weight.detach().abs().flatten()
        assert flat != set(weight.topk(len(flat)).indices.tolist())


def test_magnitude_selection_picks_the_largest_weights() -> None:
    model = tiny_model("llama")
    weights = {
        p: m.weight.detach().abs().flatten().clone()
        for p, m in target_linears(model, ALL_MODULES).items()
    }
    peft_model, chosen = _with_adapter(model, _sparse("magnitude"), [])
    assert "calibration_batches" not in chosen.record
    for path, flat in _chosen_entries(peft_model).items():
        weight = weights[path.removeprefix("base_model.model.")]
        assert flat == set(weight.topk(len(flat)).indices.tolist())


def test_density_sets_the_rank() -> None:
    linears = target_linears(tiny_model("llama"), ALL_MODULES)
    # per layer: q, o 64x64; k, v 64->32; gate, up 64->128; down 128->64
    per_rank = density_for(linears, 1)
    assert per_rank == pytest.approx(
        2 * (128 + 96 + 96 + 128 + 192 * 3) / (2 * (4096 * 2 + 2048 * 2 + 8192 * 3))
    )
    assert rank_for_density(linears, 3 * per_rank) == 3
    assert rank_for_density(linears, 1e-6) == 1  # at least one
    assert max_rank(linears) == 21  # k/v: 64 * 32 // 96
    with pytest.raises(ValueError, match="at most r=21"):
        rank_for_density(linears, 1.0)
    model = tiny_model("llama")
    _, chosen = _with_adapter(model, _sparse("magnitude", density=3 * per_rank), [])
    assert chosen.r == 3 and chosen.record["requested_density"] == pytest.approx(3 * per_rank)


def test_sparse_options_are_validated() -> None:
    for bad, message in [
        ({"adapter": {"density": 0.1}}, "--method sparse only"),
        ({"adapter": {"selection": "gradient"}}, "--method sparse only"),
        ({"method": "qlora", "adapter": {"density": "auto"}}, "--method sparse only"),
        ({"method": "sparse", "adapter": {"density": 1.5}}, r"in \(0, 1\]"),
        ({"method": "sparse", "adapter": {"density": 0}}, r"in \(0, 1\]"),
        ({"method": "sparse", "adapter": {"r": "auto", "density": 0.1}}, "sweep one budget"),
        ({"adapter": {"r": 0}}, "at least 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig.model_validate(bad)
    assert AdapterSettings(density=1).density == 1.0  # a whole matrix is in range


def test_flags_override_the_file_and_bad_ones_exit_2(tmp_path: Path, capsys: Any) -> None:
    import argparse

    from ragtune.cli import main
    from training.cli import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    sparse_yaml = Path(__file__).resolve().parents[2] / "configs" / "train" / "sparse.yaml"
    args = parser.parse_args(
        [
            "train",
            "--config",
            str(sparse_yaml),
            "--density",
            "0.02",
            "--sparse-selection",
            "magnitude",
        ]
    )
    config = config_from_args(args)
    assert config.adapter.density == 0.02 and config.adapter.selection == "magnitude"
    args = parser.parse_args(
        ["train", "--config", str(sparse_yaml), "--rank", "auto", "--budget-minutes", "3"]
    )
    config = config_from_args(args)
    assert config.adapter.r == "auto" and config.search.budget_minutes == 3
    file = tmp_path / "dense.yaml"
    file.write_text("method: sparse\nadapter:\n  density: 0.05\n")
    config = config_from_args(parser.parse_args(["train", "--config", str(file), "--rank", "8"]))
    assert config.adapter.r == 8 and config.adapter.density is None  # the flag's budget wins

    for argv, message in [
        (["train", "--density", "0.1"], "--method sparse only"),
        (["train", "--method", "sparse", "--density", "2"], "in (0, 1]"),
        (["train", "--sparse-selection", "gradient"], "--method sparse only"),
        (["train", "--method", "sparse", "--rank", "4", "--density", "0.1"], "give one of them"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_manifest_records_the_selection_and_its_calibration(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ragtune.manifest import AdapterManifest
    from training.trainer import train

    data = write_chat_data(tmp_path / "data", ROWS, VAL)
    config = tiny_config(
        tiny_dir,
        data,
        method="sparse",
        output=tmp_path / "g",
        adapter={
            "r": 2,
            "target_modules": ALL_MODULES,
            "selection": "gradient",
            "calibration_batches": 3,
        },
    )
    result = train(config, home=tmp_path)
    manifest = AdapterManifest.read(result.adapter_dir)
    assert manifest is not None and manifest.rank == 2
    record = manifest.metrics["sparse_selection"]
    assert (
        record["selection"] == "gradient" and manifest.config["adapter"]["selection"] == "gradient"
    )
    assert record["calibration_batches"] == 3 and record["calibration_examples"] == 3  # batch 1
    assert 0 < record["calibration_s"] < manifest.metrics["duration_s"]
    assert record["density"] == pytest.approx(
        manifest.metrics["trainable_params"] / sum(i * o for i, o in _tiny_shapes(tiny_dir)),
        abs=1e-6,
    )
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["mask_type"] == "gradient" and adapter_config["random_seed"] is None
    tensors = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert sum(k.endswith(".shira_indices") for k in tensors) == 2 * len(ALL_MODULES)
    # PEFT loads it back from the saved entries (no seed could rebuild them)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 2]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, result.adapter_dir)(ids).logits
    assert not torch.allclose(before, after)

    # density sets the rank; random selection keeps PEFT's seeded mask and costs no calibration
    config = tiny_config(
        tiny_dir,
        data,
        method="sparse",
        output=tmp_path / "r",
        adapter={"r": 16, "target_modules": ALL_MODULES, "density": 0.1},
    )
    manifest = AdapterManifest.read(train(config, home=tmp_path).adapter_dir)
    assert manifest is not None and manifest.rank == 4  # 0.1 / (1024 / 36864) = 3.6 per rank
    assert manifest.metrics["sparse_selection"]["calibration_s"] == 0.0
    adapter_config = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert adapter_config["mask_type"] == "random" and adapter_config["random_seed"] == 42


def _tiny_shapes(model_dir: Path) -> list[tuple[int, int]]:
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    layer = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)]
    layer += [(hidden, inter), (hidden, inter), (inter, hidden)]
    return layer * config["num_hidden_layers"]
