"""`ragtune train --rank auto` / `--density auto` (training/rank_search.py): the rule, the
budget (a fake clock and a fake trainer, so the timing is exact), the sweep recorded in the
manifest of a real run on a tiny random Llama, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ragtune.manifest import AdapterManifest
from tests.training.test_sparse_selection import tiny_dir  # noqa: F401
from tests.training.test_train import ROWS, VAL, tiny_config, write_chat_data
from training import rank_search
from training.config import TrainConfig
from training.rank_search import choose, estimate_next


def _record(r: int, loss: float, start: float = 3.0) -> dict[str, Any]:
    return {
        "candidate": {"r": r},
        "trainable_params": 100 * r,
        "eval_loss": loss,
        "initial_eval_loss": start,
    }


def test_the_rule_keeps_the_fewest_parameters_near_the_best_reduction() -> None:
    # reductions 1.0, 1.92, 1.97, 2.0, 1.95 (96 %, 98.5 %, 100 %, 97.5 % of the best)
    results = [
        _record(2, 2.0),
        _record(4, 1.08),
        _record(8, 1.03),
        _record(16, 1.0),
        _record(32, 1.05),
    ]
    assert choose(results, 0.05)["candidate"] == {"r": 4}
    assert choose(results, 0.02)["candidate"] == {"r": 8}
    assert choose(results, 0.01)["candidate"] == {"r": 16}  # only the best is near enough
    assert choose(results, 0.5)["candidate"] == {"r": 2}
    # nothing reduced the loss: the lowest loss, the smaller of equals
    assert choose([_record(2, 3.2), _record(4, 3.1), _record(8, 3.1)], 0.05)["candidate"] == {
        "r": 4
    }
    with pytest.raises(ValueError, match="validation loss"):
        choose([{**_record(2, 1.0), "eval_loss": None}], 0.05)


def test_the_next_candidate_is_estimated_from_the_ones_done() -> None:
    assert estimate_next([]) == 0
    assert estimate_next([10.0]) == 10.0
    assert estimate_next([10.0, 15.0]) == pytest.approx(22.5)  # grows like the last step
    assert estimate_next([20.0, 10.0]) == 10.0  # never assumed to shrink
    assert estimate_next([10.0, 40.0]) == 80.0  # growth capped at 2x


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _fake_train(clock: FakeClock, seconds: dict[int, float], losses: dict[int, float], seen: list):
    """Stands in for training.trainer.train: advances the clock, writes a minimal version."""
    from training.trainer import TrainResult

    def train(config: TrainConfig, home: Path, callbacks: Any = None, **_: Any) -> TrainResult:
        r = config.adapter.r
        seen.append(r)
        clock.now += seconds[r]
        metrics = {
            "trainable_params": 10 * r,
            "eval_loss": losses[r],
            "initial_eval_loss": 3.0,
            "global_step": config.max_steps,
            "stopped_early": False,
            "duration_s": seconds[r],
        }
        config.output.mkdir(parents=True)
        (config.output / "adapter_config.json").write_text(json.dumps({"r": r}))
        (config.output / "adapter_model.safetensors").write_bytes(b"x")
        AdapterManifest(
            name=config.name,
            version=config.output.name,
            base_model_fingerprint="f",
            method=config.method,
            rank=r,
            metrics=metrics,
            config=config.model_dump(mode="json"),
        ).write(config.output)
        return TrainResult(adapter_dir=config.output, metrics=metrics)

    return train


def test_the_sweep_stops_before_a_candidate_that_would_pass_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.trainer

    clock, seen = FakeClock(), []
    monkeypatch.setattr(rank_search, "time", clock)
    # 40 s, 60 s (estimate for r=8: 60 * 1.5 = 90 s; 100 + 90 > 180): r=8, r=16 not started
    seconds = {2: 40.0, 4: 60.0, 8: 90.0, 16: 140.0}
    losses = {2: 2.0, 4: 1.0, 8: 0.9, 16: 0.9}
    monkeypatch.setattr(training.trainer, "train", _fake_train(clock, seconds, losses, seen))
    data = write_chat_data(tmp_path / "data", ROWS, VAL)
    config = TrainConfig.model_validate(
        {
            "name": "auto",
            "data": data,
            "adapter": {"r": "auto"},
            "search": {"ranks": [16, 2, 8, 4, 4], "budget_minutes": 3},
        }
    )
    result = rank_search.train_with_search(config, home=tmp_path / "home")
    assert seen == [2, 4]  # smallest first, once each
    record = result.metrics["rank_search"]
    assert record["budget_s"] == 180 and record["total_s"] == 100 <= record["budget_s"]
    assert [c["candidate"] for c in record["candidates"]] == [{"r": 2}, {"r": 4}]
    assert record["candidates"][1]["estimated_s"] == 40 and record["candidates"][1]["seconds"] == 60
    assert record["skipped"] == [{"r": 8}, {"r": 16}]
    assert record["chosen"] == {"r": 4} and record["candidates"][1]["chosen"]
    adapter_dir = tmp_path / "home" / "adapters" / "auto" / "v1"
    assert result.adapter_dir == adapter_dir
    manifest = AdapterManifest.read(adapter_dir)
    assert manifest is not None and manifest.rank == 4 and manifest.version == "v1"
    assert manifest.config["adapter"]["r"] == 4 and manifest.config["output"] is None
    assert json.loads((adapter_dir / "adapter_config.json").read_text()) == {"r": 4}
    assert [p.name for p in adapter_dir.parent.iterdir()] == ["v1"]  # the sweep is cleaned up

    # the first candidate always runs, however small the budget
    seen.clear()
    config.search.budget_minutes = 0.01
    result = rank_search.train_with_search(config, home=tmp_path / "home")
    assert seen == [2] and result.adapter_dir.name == "v2"
    assert result.metrics["rank_search"]["skipped"] == [{"r": 4}, {"r": 8}, {"r": 16}]


def test_rank_auto_needs_a_validation_split(tmp_path: Path, capsys: Any) -> None:
    from ragtune.cli import main

    data = write_chat_data(tmp_path / "data", ROWS, [])
    argv = ["train", "--data", str(data), "--rank", "auto", "--output", str(tmp_path / "a")]
    assert main(argv) == 2
    assert "val.jsonl has no examples" in capsys.readouterr().err
    assert main([*argv, "--method", "sparse", "--rank", "auto", "--density", "auto"]) == 2
    assert "same budget" in capsys.readouterr().err
    config = TrainConfig.model_validate({"data": data, "adapter": {"r": "auto"}})
    with pytest.raises(ValueError, match="--resume"):
        rank_search.train_with_search(config, home=tmp_path, resume="latest")
    assert not (tmp_path / "a").exists()


def test_rank_auto_on_a_tiny_model_records_its_sweep(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from training.trainer import train

    data = write_chat_data(tmp_path / "data", ROWS, VAL)
    config = tiny_config(
        tiny_dir,
        data,
        method="sparse",
        max_steps=2,
        learning_rate=0.05,
        adapter={
            "r": 16,
            "density": "auto",
            "selection": "gradient",
            "target_modules": ["q_proj", "v_proj"],
        },
        search={"densities": [0.05, 0.1, 0.2], "budget_minutes": 2},
    )
    result = train(config, home=tmp_path / "home")
    manifest = AdapterManifest.read(result.adapter_dir)
    assert manifest is not None
    record = manifest.metrics["rank_search"]
    assert record["swept"] == "density" and record["total_s"] <= record["budget_s"]
    candidates = record["candidates"]
    assert [c["candidate"] for c in candidates] == [{"density": d} for d in (0.05, 0.1, 0.2)]
    assert [c["r"] for c in candidates] == [1, 3, 5]  # q 64x64, v 64->32: 224 / 6144 per rank
    for candidate in candidates:
        assert candidate["trainable_params"] == 2 * candidate["r"] * (128 + 96)
        assert candidate["eval_loss"] > 0 and candidate["seconds"] > 0
    chosen = [c for c in candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["candidate"] == record["chosen"]
    assert chosen[0] is choose(candidates, config.search.tolerance)
    assert (
        manifest.rank == chosen[0]["r"] and manifest.metrics["eval_loss"] == chosen[0]["eval_loss"]
    )
    assert manifest.metrics["sparse_selection"]["selection"] == "gradient"
    assert manifest.config["adapter"]["density"] == record["chosen"]["density"]
    assert [p.name for p in result.adapter_dir.parent.iterdir()] == ["v1"]
