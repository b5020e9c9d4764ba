"""`ragtune train` under torchrun: two CPU processes (DDP over gloo) train one adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ragtune.manifest import AdapterManifest
from training.peft_model import state_digest

pytestmark = pytest.mark.slow  # ~19 s: two training processes (torchrun)

ROWS = [
    ("How many vacation days do Orvane employees get?", "27 vacation days per year."),
    ("Where do I book a business trip?", "At the Compass travel desk."),
    ("Which app is used for MFA?", "The Keystone authenticator app."),
    ("Where is the fire assembly point?", "Assembly point Gate C."),
]


def test_two_process_ddp_trains_one_consistent_adapter(tmp_path: Path) -> None:
    from ragtune.config import default_home
    from ragtune.models import resolve_model_dir

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            )
            + "\n"
            for q, a in ROWS
        ),
        encoding="utf-8",
    )
    config = tmp_path / "ddp.yaml"
    config.write_text(
        "name: ddp\nmax_steps: 2\nbatch_size: 1\nmax_seq_len: 48\nwarmup_steps: 0\n"
        "learning_rate: 1.0e-3\nthreads: 1\nlogging_steps: 1\n"
        "adapter: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}\n",
        encoding="utf-8",
    )
    output = tmp_path / "adapter"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ragtune.cli",
        "train",
        "--config",
        str(config),
        "--data",
        str(data),
        "--output",
        str(output),
        "--base-model",
        str(resolve_model_dir("bundled", default_home())),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAGTUNE_HOME": str(tmp_path / "home")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    manifest = AdapterManifest.read(output)
    assert manifest is not None and manifest.name == "ddp"
    metrics = manifest.metrics
    assert metrics["world_size"] == 2 and metrics["global_step"] == 2
    digests = metrics["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # every rank holds the same weights
    # ... and they are exactly what rank 0 wrote
    assert state_digest(load_file(output / "adapter_model.safetensors")) == digests[0]
    assert not any(path.suffix == ".bin" for path in output.iterdir())
    # only rank 0 printed the summary
    assert done.stdout.count('"adapter":') == 1
