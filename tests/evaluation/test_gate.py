"""`ragtune adapters promote NAME@VERSION --gate QA.jsonl` end to end: the real command
against the session server (bundled model, official `openai` client inside the bench),
accepting a better version and refusing a worse one, with the decision and its numbers in
the audit log and the version's manifest.

"Better" and "worse" cheaply, without training: a random LoRA with a large scale (B x 2.5
over every projection) ruins the model's answers, a zero LoRA (B = 0) answers exactly as the
base model. Active garbage vs candidate zero: accepted; then active zero vs another garbage
candidate: refused, and the active version stays. (The issue's full e2e with an adapter
trained on shuffled answers is later work.) The judged metric is `auto`: these free-text
questions yield the reference answer's log-likelihood per byte.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from evaluation.gate import choose_metric, decide
from ragtune.manifest import MANIFEST_NAME
from ragtune.random_adapter import ALL_PROJECTIONS, make_adapter
from tests.conftest import ADMIN_KEY

NAME = "tgate"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What colour is the sky on a clear day?", "The sky is blue."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What do bees make?", "Bees make honey."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which planet is the largest in the solar system?", "Jupiter is the largest planet."),
    ("What is two plus two?", "Two plus two is four."),
    ("Which animal barks?", "A dog barks."),
]


# ------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize(
    ("low", "min_delta", "accepted"),
    [
        (0.01, 0.0, True),
        (0.0, 0.0, True),
        (-0.01, 0.0, False),
        (-0.01, 0.02, True),
        (None, 1, False),
    ],
)
def test_accepted_when_the_interval_rules_out_worse_than_min_delta(low, min_delta, accepted):
    paired = None if low is None else {"diff": 0.0, "low": low, "high": 0.5}
    assert decide(paired, min_delta) is accepted


def test_metric_auto_prefers_knowledge_measures_and_names_the_missing_one():
    assert choose_metric("auto", ["token_f1", "reference_loglik_per_byte"]) == (
        "reference_loglik_per_byte"
    )
    assert choose_metric("token_f1", ["token_f1"]) == "token_f1"
    with pytest.raises(ValueError, match="token_f1"):
        choose_metric("exact_match", ["token_f1"])


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def gate_versions(adapter_root: Path, server) -> dict[str, Path]:
    """Loaded on the session server: v1 garbage (active), v2 zero, v3 other garbage."""
    made = {
        "v1": make_adapter(adapter_root / f"{NAME}-v1", 8, ALL_PROJECTIONS, 21, 2.5, "v1"),
        "v2": make_adapter(adapter_root / f"{NAME}-v2", 8, ALL_PROJECTIONS, 22, 0.0, "v2"),
        "v3": make_adapter(adapter_root / f"{NAME}-v3", 8, ALL_PROJECTIONS, 23, 2.5, "v3"),
    }
    for version, path in made.items():
        body = {"lora_name": NAME, "lora_path": str(path), "activate": version == "v1"}
        response = httpx.post(
            f"{server.v1}/load_lora_adapter", json=body, headers=ADMIN, timeout=120
        )
        assert response.status_code == 200, response.text
    return made


def promote(server, target: str, qa: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ragtune.cli", "adapters", "promote", target]
    command += ["--gate", str(qa), "--url", server.v1, "--admin-key", ADMIN_KEY]
    command += ["--out", str(out), "--max-tokens", "8", "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def active(server) -> str:
    listed = httpx.get(f"{server.v1}/adapters", headers=ADMIN, timeout=60).json()["data"]
    return next(a for a in listed if a["name"] == NAME)["active_version"]


def promotions(path: Path) -> list[dict]:
    return json.loads((path / MANIFEST_NAME).read_text())["promotions"]


def test_promote_accepts_a_better_version_and_refuses_a_worse_one(
    server, gate_versions, audit_log: Path, tmp_path: Path
):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": q, "answers": [a]}) + "\n"
            for i, (q, a) in enumerate(QA)
        )
    )
    better = promote(server, f"{NAME}@v2", qa, tmp_path / "v2")
    assert better.returncode == 0, better.stdout + better.stderr
    assert better.stdout.startswith("accepted"), better.stdout
    assert active(server) == "v2"
    (note,) = promotions(gate_versions["v2"])
    assert note["decision"] == "accepted" and note["metric"] == "reference_loglik_per_byte"
    assert note["active_version"] == "v1" and note["questions"] == len(QA)
    assert note["paired"]["low"] > 0 and note["requested_by"].startswith("cli:")
    assert (tmp_path / "v2" / "candidate" / "report.md").is_file()  # the bench's own report

    worse = promote(server, f"{NAME}@v3", qa, tmp_path / "v3")
    assert worse.returncode == 3, worse.stdout + worse.stderr
    assert worse.stdout.startswith("refused"), worse.stdout
    assert active(server) == "v2"  # untouched
    (note,) = promotions(gate_versions["v3"])
    assert note["decision"] == "refused" and note["paired"]["high"] < 0

    entries = [json.loads(line) for line in audit_log.read_text().splitlines()]
    gates = [e for e in entries if e["action"] == "promote_adapter" and e["adapter"] == NAME]
    assert [(e["version"], e["decision"], e["result"]) for e in gates] == [
        ("v2", "accepted", "ok"),
        ("v3", "refused", "ok"),
    ]
    assert gates[0]["gate"]["candidate"]["mean"] > gates[0]["gate"]["active"]["mean"]
    assert gates[0]["key_id"] and gates[0]["requested_by"].startswith("cli:")
    # the version still reloads after its manifest was annotated (its signature followed)
    chat = httpx.post(
        f"{server.v1}/chat/completions",
        json={
            "model": f"{NAME}@v2",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
        },
        headers=ADMIN,
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
