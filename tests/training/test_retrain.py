"""`ragtune retrain` without training (seconds): the lock between two runs, which documents
and feedback a run takes up, how it merges them into the previous data, and that a run
interrupted at a step continues there. The whole cycle with real training, the gate and a
server is tests/training/test_lifecycle.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ragtune.feedback_store import FeedbackStore
from ragtune.launcher import free_port
from training import retrain, retrain_context, retrain_steps
from training.dataset import SPLIT_FILES, read_split
from training.retrain_config import load_retrain_config

REPO = Path(__file__).resolve().parents[2]


def write_docs(root: Path, docs: dict[str, str]) -> None:
    for name, body in docs.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")


def doc(topic: str, fact: str) -> str:
    return (
        f"# {topic}\n\n## Rule\n\n{fact} This applies to every team at the site and is "
        f"checked by the shift lead each morning.\n\n## Contact\n\nQuestions about {topic.lower()} "
        "go to the operations desk during office hours.\n"
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("RAGTUNE_HOME", str(home))
    monkeypatch.delenv("RAGTUNE_AUDIT_LOG", raising=False)
    monkeypatch.setenv("RETRAIN_TEST_ADMIN_KEY", "unused-admin-key")
    return home


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    write_docs(
        docs,
        {
            "forklifts.md": doc("Forklifts", "Forklifts are charged only in bay 4."),
            "badges.md": doc("Badges", "Visitors collect a blue badge at the gatehouse."),
            "sub/freezer.md": doc("Freezer", "Wear insulated gloves in the freezer hall."),
        },
    )
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Where are forklifts charged?", "answer": "Bay 4"}))
    config = {
        "adapter": "tiny",
        "documents": {"sources": [str(docs)], "recipe": "paragraphs"},
        "feedback": {"enabled": True},
        "split": {"val_ratio": 0.0, "test_ratio": 0.0},
        "train": {"overrides": {"max_steps": 1}},
        "gate": {"questions": str(qa)},
        # nothing listens here: load and gate fail, as against a server that is down
        "server": {"url": f"http://127.0.0.1:{free_port()}/v1", "timeout_s": 2},
    }
    config["server"]["admin_key_env"] = "RETRAIN_TEST_ADMIN_KEY"
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rows(data: str | Path) -> list[dict]:
    return [row for split in SPLIT_FILES for row in read_split(Path(data), split)]


def audit(home: Path) -> list[dict]:
    path = home / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def prepare_and_finish(config, home: Path) -> dict:
    """The prepare step, then finish (nothing trained): what a successful run leaves."""
    from ragtune.audit import AuditLog

    root = retrain_context.adapter_root(home, config.adapter)
    state = retrain_context.read_json(root / "state.json")
    run = retrain._new_run(root, config)
    ctx = retrain_context.Context(
        config=config,
        home=home,
        run=run,
        state=state,
        audit=AuditLog(home / "audit.log"),
        who="test",
        progress=False,
        train_fn=None,
        retention_days=30,
    )
    run.step("prepare").update(status="done", outputs=retrain_steps.step_prepare(ctx))
    retrain_steps.step_finish(ctx)
    return run.outputs("prepare")


def keep_feedback(home: Path, response_id: str, question: str, correction: str) -> None:
    store = FeedbackStore(home / "feedback", 30)
    messages = [{"role": "user", "content": question}]
    store.append("conversations", {"id": response_id, "messages": messages, "answers": ["?"]})
    store.append("ratings", {"id": response_id, "rating": "down", "correction": correction})


# ------------------------------------------------------------------------------- the lock
HOLD = """
import sys, time
from pathlib import Path
from training.retrain_context import retrain_lock
with retrain_lock(Path(sys.argv[1]), "holder"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_exits_at_once_with_the_lock_message(home, config_file):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(home)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "ragtune.cli", "retrain", "--config", str(config_file)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert second.returncode == retrain_context.EXIT_LOCKED, second.stdout + second.stderr
        assert "another ragtune retrain run holds" in second.stderr
        assert f'"pid": {holder.pid}' in second.stderr and "Traceback" not in second.stderr
        assert time.monotonic() - started < 60  # did not wait for the lock
        assert not (home / "retrain" / "tiny").exists()  # and did nothing
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed): the kernel released its lock
    with retrain_context.retrain_lock(home, "tiny"):
        pass


# ----------------------------------------------------------------------- change detection
def test_only_changed_documents_and_new_feedback_are_taken_up(home, config_file, tmp_path):
    config = load_retrain_config(config_file)
    docs = tmp_path / "docs"
    first = prepare_and_finish(config, home)
    assert first["documents"]["new"] == ["badges.md", "forklifts.md", "sub/freezer.md"]
    before = rows(first["data"])
    assert {row["doc_id"] for row in before} == set(first["document_hashes"])
    nothing, report = retrain.run_retrain(config, home)
    assert (nothing, report["status"]) == (0, "nothing_to_do")  # cron: a no-op, exit 0

    # one document edited, one added, one removed; one correction kept by the server
    write_docs(docs, {"badges.md": doc("Badges", "Visitors collect a green badge at gate B.")})
    write_docs(docs, {"returns.md": doc("Returns", "Returned goods wait in cage 7.")})
    (docs / "sub" / "freezer.md").unlink()
    keep_feedback(home, "chatcmpl-1", "Where are forklifts charged?", "Only in bay 4.")
    state = retrain_context.read_json(retrain_context.adapter_root(home, "tiny") / "state.json")
    found = retrain_context.changes(config, home, state, 30)
    assert (found["new"], found["changed"], found["removed"]) == (
        ["returns.md"],
        ["badges.md"],
        ["sub/freezer.md"],
    )
    assert found["unchanged"] == 1 and found["new_feedback"] == ["feedback:chatcmpl-1"]

    second = prepare_and_finish(config, home)
    assert second["documents"]["examples_prepared"] == len(
        [r for r in rows(second["data"]) if r["doc_id"] in ("badges.md", "returns.md")]
    )
    after = rows(second["data"])
    # the unchanged document's examples are carried over as they were
    assert [r for r in after if r["doc_id"] == "forklifts.md"] == [
        r for r in before if r["doc_id"] == "forklifts.md"
    ]
    text = json.dumps(after)
    assert "green badge" in text and "blue badge" not in text and "freezer" not in text
    assert "cage 7" in text and "Only in bay 4." in text
    assert second["feedback"]["examples_added"] == 1

    # the same correction again (another response) adds nothing: deduplicated
    keep_feedback(home, "chatcmpl-2", "Where are forklifts charged?", "Only in bay 4.")
    third = prepare_and_finish(config, home)
    assert third["feedback"]["new_responses"] == 1 and third["feedback"]["examples_added"] == 0
    assert third["unchanged_data"] and third["data_hash"] == second["data_hash"]
    assert retrain.run_retrain(config, home)[1]["status"] == "nothing_to_do"

    actions = [entry["action"] for entry in audit(home)]
    assert actions.count("retrain_prepare") == 3 and actions.count("retrain_finish") == 3
    assert "Only in bay 4" not in (home / "audit.log").read_text()  # counts, never text


# ---------------------------------------------------------------------------------- resume
def test_an_interrupted_run_continues_at_its_first_unfinished_step(home, config_file):
    config = load_retrain_config(config_file)
    calls = []

    def crashing_train(train_config, resume=None, home=None):
        calls.append(("crash", train_config.version, resume))
        raise RuntimeError("killed mid-training")

    code, report = retrain.run_retrain(config, home, train_fn=crashing_train)
    assert code == 1 and report["steps"]["prepare"]["status"] == "done"
    assert report["steps"]["train"]["status"] == "failed", report
    run_dir = Path(report["directory"])
    data_stamp = (run_dir / "data" / "train.jsonl").stat().st_mtime_ns

    def fake_train(train_config, resume=None, home=None):
        calls.append(("train", train_config.version, resume))
        # an interrupted version's checkpoints are where the trainer would look for them
        out = home / "adapters" / train_config.name / train_config.version
        out.mkdir(parents=True)
        (out / "ragtune_adapter.json").write_text(json.dumps({"metrics": {"train_loss": 1.0}}))
        return SimpleNamespace(adapter_dir=out, metrics={"train_loss": 1.0, "global_step": 1})

    checkpoints = home / "adapters" / "tiny" / ".v1.checkpoints" / "checkpoint-1"
    checkpoints.mkdir(parents=True)  # what a killed trainer leaves
    code, report = retrain.run_retrain(config, home, train_fn=fake_train)
    assert code == 1 and report["run"] == run_dir.name  # the same run, continued
    assert report["steps"]["train"]["status"] == "done"
    assert report["steps"]["load"]["status"] == "failed"  # no server there
    assert (run_dir / "data" / "train.jsonl").stat().st_mtime_ns == data_stamp  # not redone
    assert calls == [("crash", "v1", None), ("train", "v1", "latest")]

    code, report = retrain.run_retrain(config, home, train_fn=fake_train)
    assert code == 1 and report["run"] == run_dir.name
    assert len(calls) == 2  # the trained version is kept, only load is tried again
    described = retrain.status(config, home)
    assert described["unfinished_run"] == run_dir.name
    assert described["unfinished_steps"] == {
        "prepare": "done",
        "train": "done",
        "load": "failed",
    }
    entries = [e for e in audit(home) if e["action"].startswith("retrain_")]
    assert [(e["action"], e["result"]) for e in entries] == [
        ("retrain_prepare", "ok"),
        ("retrain_train", "error"),
        ("retrain_train", "ok"),
        ("retrain_load", "error"),
        ("retrain_load", "error"),
    ]
    assert all(e["run"] == run_dir.name and e["adapter"] == "tiny" for e in entries)

    # --restart abandons it: a fresh run prepares again (and fails at load again)
    code, report = retrain.run_retrain(config, home, restart=True, train_fn=fake_train)
    assert report["run"] != run_dir.name and report["steps"]["train"]["version"] == "v2"


def test_bad_config_is_refused_with_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"adapter": "x", "gate": {"questions": "q"}, "trian": {}}))
    with pytest.raises(ValueError, match="trian"):
        load_retrain_config(path)
    path.write_text(
        yaml.safe_dump(
            {"adapter": "x", "gate": {"questions": "q"}, "train": {"overrides": {"data": "d"}}}
        )
    )
    with pytest.raises(ValueError, match="data"):
        load_retrain_config(path)
    assert load_retrain_config(REPO / "configs" / "retrain" / "demo.yaml").adapter == "demo"


def test_the_retrain_command_is_registered():
    out = subprocess.run(
        [sys.executable, "-m", "ragtune.cli", "retrain", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ},
        timeout=60,
    )
    assert out.returncode == 0 and "--restart" in out.stdout
