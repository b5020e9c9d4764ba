"""`ragtune estimate-memory`: published 7B figures, and the peak measured on the bundled model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragtune.cli import main
from training.memory import GiB, estimate, parse_params, shape_for

GB = 1e9


@pytest.mark.parametrize(
    ("method", "low_gb", "high_gb"),
    [("qlora", 6, 14), ("lora", 16, 21), ("full", 105, 135)],  # full: "about 120 GB"
)
def test_7b_estimates_match_published_figures(
    method: str, low_gb: float, high_gb: float, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "estimate-memory",
            "--params",
            "7B",
            "--method",
            method,
            "--seq-len",
            "512",
            "--batch",
            "1",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert low_gb * GB <= result["total_bytes"] <= high_gb * GB
    assert result["total_bytes"] == sum(
        result[key]
        for key in (
            "weights_bytes",
            "gradients_bytes",
            "optimizer_bytes",
            "activations_bytes",
            "logits_bytes",
            "overhead_bytes",
        )
    )


def test_shapes_and_parameter_counts() -> None:
    assert abs(shape_for("7B").params - 6.74e9) < 0.01e9  # Llama-2-7B
    assert abs(shape_for(model="bundled").params - 134.5e6) < 0.5e6  # SmolLM2-135M
    assert shape_for("6.5B").layers < shape_for("7B").layers  # depth scaled to the count
    assert parse_params("1.5b") == 1.5e9 and parse_params("135M") == 135e6
    with pytest.raises(ValueError):
        parse_params("seven")


def test_memory_ordering_and_components() -> None:
    shape = shape_for("7B")
    qlora, lora, full = (estimate(shape, method=m) for m in ("qlora", "lora", "full"))
    assert qlora.total_bytes < lora.total_bytes < full.total_bytes
    assert lora.trainable_params == 32 * 16 * (
        4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096)
    )
    assert full.optimizer_bytes == 8 * full.params
    checkpointed = estimate(shape, method="lora", seq_len=4096, gradient_checkpointing=True)
    assert (
        checkpointed.activations_bytes
        < estimate(shape, method="lora", seq_len=4096).activations_bytes / 4
    )
    assert estimate(shape, batch=4).activations_bytes == 4 * lora.activations_bytes


def test_estimate_within_30_percent_of_measured_peak_on_the_bundled_model(tmp_path: Path) -> None:
    """A fresh `ragtune train` process (its peak RSS is not inflated by earlier tests) on
    examples long enough to fill every sequence, against the estimator's figure."""
    from ragtune.config import default_home
    from ragtune.models import resolve_model_dir

    text = " ".join(
        f"Rule {n}: pallets in aisle {n} are stacked at most three high." for n in range(60)
    )
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Recite the rules, part {i}."},
                        {"role": "assistant", "content": text},
                    ]
                }
            )
            + "\n"
            for i in range(4)
        ),
        encoding="utf-8",
    )
    output = tmp_path / "adapter"
    command = [
        sys.executable,
        "-m",
        "ragtune.cli",
        "train",
        "--data",
        str(data),
        "--output",
        str(output),
        "--max-steps",
        "1",
        "--no-progress",
        "--base-model",
        str(resolve_model_dir("bundled", default_home())),
    ]
    config = tmp_path / "c.yaml"
    config.write_text("max_seq_len: 128\nbatch_size: 2\nwarmup_steps: 0\n", encoding="utf-8")
    command += ["--config", str(config)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAGTUNE_HOME": str(tmp_path / "home")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((output / "ragtune_adapter.json").read_text())["metrics"]
    measured, estimated = metrics["peak_rss_bytes"], metrics["estimated_memory_bytes"]
    assert (
        estimated
        == estimate(
            shape_for(model="bundled"),
            method="lora",
            seq_len=128,
            batch=2,
            dtype="fp32",
            device="cpu",
        ).total_bytes
    )
    assert 0.7 * measured <= estimated <= 1.3 * measured, (measured / GiB, estimated / GiB)


def test_peak_rss_is_the_process_own_not_its_parents() -> None:
    """Linux keeps ru_maxrss across execve, so a child spawned by a big parent (pytest after
    many tests) would report the parent's size as its own peak."""
    ballast = bytearray(768 * 2**20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # make it resident
    child = subprocess.run(
        [sys.executable, "-c", "from training.trainer import peak_rss_bytes as p; print(p())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(child.stdout) < 512 * 2**20, int(child.stdout) / 2**20
    del ballast
