"""Issue #19's whole adapter lifecycle in one test, on the demo documents and the real
bundled model, over real HTTP (the official `openai` client for every chat request):

1. `ragtune retrain` trains the first version of the adapter on the documents and loads it
   on the server (active: there is nothing to gate against); a second `ragtune retrain`
   started meanwhile exits at once (the lock).
2. Users ask the gate's questions and post corrections for half of them (POST /v1/feedback;
   the server keeps conversations: `feedback.store_conversations` on).
3. `ragtune retrain` again: no document changed, the new feedback is prepared
   (`prepare --from-feedback` against the previous data) and merged, v2 is trained on it,
   loaded, and `ragtune adapters promote --gate` accepts it: v2 active. A third run finds
   nothing to do.
4. v3, trained on the same data with the answers shuffled between the questions, is
   refused by `ragtune adapters promote --gate` (v2 stays active).
5. v3 as a 30 % canary anyway: down-ratings of its answers roll it back by themselves.

Zero failed requests throughout (a client keeps asking in the background from step 2 on,
and every request's status is counted), and every step is in the audit log.

The gate judges the reference answer's log-likelihood per byte (`auto` on these free-text
questions): deterministic for given weights (likelihood scoring, no sampling), and training
is seeded, so the verdicts do not depend on the run.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from ragtune.launcher import RunningServer, start_server
from tests.conftest import ADMIN_KEY, API_KEY, SERVER_ENV
from tests.server.test_feedback import bundled_model_env

pytestmark = pytest.mark.slow  # trains three adapter versions on the bundled model: minutes

REPO = Path(__file__).resolve().parents[2]
NAME = "orvane"
QUESTIONS = REPO / "data" / "demo" / "eval_questions.jsonl"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"Authorization": f"Bearer {API_KEY}"}
MAX_STEPS = 40
# Non-inferiority margin of the gate, in log-likelihood per byte. Measured here (2-core CPU):
# v2 - v1 = +0.056 [+0.018, +0.095], v3 - v2 = -0.060 [-0.104, -0.017]; at 0.02 both verdicts
# keep a margin of 0.04 or more on the interval's lower end.
MIN_DELTA = 0.02
CANARY_ENV = {
    "RAGTUNE_CANARY__MIN_RATINGS": "4",
    "RAGTUNE_CANARY__MAX_DOWN_RATE": "0.5",
    "RAGTUNE_CANARY__MIN_REQUESTS": "1000",  # judged on ratings only here
}


class Traffic:
    """Every chat request of the test, with its outcome: (model asked, version that
    answered or None, status)."""

    def __init__(self, v1: str) -> None:
        self.client = openai.OpenAI(base_url=v1, api_key=API_KEY, max_retries=0, timeout=300)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str | None, int | str]] = []

    def ask(self, question: str, model: str = NAME, max_tokens: int = 24) -> tuple[str, str]:
        """(the version that answered, the response id); failures are recorded, not raised."""
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                max_tokens=max_tokens,
                temperature=0,
            )
            response = raw.parse()
            version = raw.headers.get("X-Ragtune-Adapter-Version")
            status: int | str = raw.status_code
            ok = response.choices[0].message.content is not None
            if not ok:
                status = "empty"
        except Exception as exc:  # counted as a failed request
            version, response, status = None, None, f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.requests.append((model, version, status))
        return version, response.id if response is not None else ""

    def failures(self) -> list:
        with self.lock:
            return [entry for entry in self.requests if entry[2] != 200]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lifecycle") / "home"


@pytest.fixture(scope="module")
def lifecycle_server(tmp_path_factory, home: Path) -> RunningServer:
    env = {
        **SERVER_ENV,
        **bundled_model_env(),
        **CANARY_ENV,
        "RAGTUNE_HOME": str(home),
        "RAGTUNE_FEEDBACK__STORE_CONVERSATIONS": "true",
    }
    log = tmp_path_factory.mktemp("lifecycle-log") / "server.log"
    running = start_server(env, log)
    yield running
    running.stop()


def command_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "RAGTUNE_HOME": str(home), "RAGTUNE_ADMIN_KEYS": ADMIN_KEY}
    env.pop("RAGTUNE_AUDIT_LOG", None)
    return env


def ragtune(home: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ragtune.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=command_env(home),
    )


def write_configs(tmp: Path, server: RunningServer) -> tuple[Path, Path]:
    """The training config every version uses (the demo's, shortened) and the retrain
    config over it."""
    base_model = bundled_model_env()["RAGTUNE_MODEL__SOURCE"]
    train = yaml.safe_load((REPO / "configs" / "train" / "demo.yaml").read_text())
    train.update(
        {
            "base_model": base_model,
            "max_steps": MAX_STEPS,
            "eval_steps": MAX_STEPS,
            "progress": False,
        }
    )
    train.pop("data")
    train_path = tmp / "train.yaml"
    train_path.write_text(yaml.safe_dump(train))
    retrain = {
        "adapter": NAME,
        "documents": {"sources": [str(REPO / "data" / "demo" / "docs")], "recipe": "qa"},
        "feedback": {"enabled": True},
        "split": {"val_ratio": 0.0, "test_ratio": 0.0},
        "train": {"config": str(train_path)},
        "gate": {
            "questions": str(QUESTIONS),
            "metric": "reference_loglik_per_byte",
            "min_delta": MIN_DELTA,
            "max_tokens": 4,
        },
        "server": {"url": server.v1, "admin_key_env": "RAGTUNE_ADMIN_KEYS", "timeout_s": 300},
    }
    retrain_path = tmp / "retrain.yaml"
    retrain_path.write_text(yaml.safe_dump(retrain))
    return train_path, retrain_path


def adapters(server: RunningServer) -> dict:
    listed = httpx.get(f"{server.v1}/adapters", headers=ADMIN, timeout=60).json()["data"]
    return next(a for a in listed if a["name"] == NAME)


def audit(home: Path) -> list[dict]:
    return [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]


def shuffled_copy(data: Path, out: Path, seed: int = 7) -> None:
    """The same examples with the assistant answers shuffled between them (a derangement:
    no example keeps its own answer)."""
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    answers = [row["messages"][-1]["content"] for row in rows]
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while any(i == j for i, j in enumerate(order)):
        rng.shuffle(order)
    out.mkdir(parents=True)
    with open(out / "train.jsonl", "w", encoding="utf-8") as handle:
        for row, j in zip(rows, order, strict=True):
            row["messages"][-1]["content"] = answers[j]
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def test_feedback_retrain_gate_canary_rollback(lifecycle_server, home, tmp_path):
    server = lifecycle_server
    timings: dict[str, float] = {}
    train_config, retrain_config = write_configs(tmp_path, server)
    retrain = ["retrain", "--config", str(retrain_config), "--no-progress"]
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines()]

    # 1. the first version, and a second run that finds the lock taken
    started = time.monotonic()
    first = subprocess.Popen(
        [sys.executable, "-m", "ragtune.cli", *retrain],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=command_env(home),
    )
    lock = home / "retrain" / ".lock"
    deadline = time.monotonic() + 120
    while str(first.pid) not in (lock.read_text() if lock.exists() else ""):
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.2)
    second = ragtune(home, *retrain, timeout=120)
    assert second.returncode == 75, second.stdout + second.stderr
    assert "another ragtune retrain run holds" in second.stderr
    out, err = first.communicate(timeout=1800)
    assert first.returncode == 0, out + err
    report = json.loads(out)
    timings["retrain v1"] = time.monotonic() - started
    assert report["steps"]["gate"]["decision"] == "first_version"
    assert report["steps"]["prepare"]["documents"]["new"]  # every document, the first time
    assert adapters(server)["active_version"] == "v1"

    # 2. users ask, and correct half of the answers; a client asks all along
    traffic = Traffic(server.v1)
    stop = threading.Event()

    def background() -> None:
        while not stop.is_set():
            traffic.ask("Where is the fire assembly point?", max_tokens=4)
            stop.wait(2)

    asker = threading.Thread(target=background, daemon=True)
    asker.start()
    try:
        corrected = questions[::2]
        with httpx.Client(base_url=server.base_url, timeout=120, headers=CLIENT) as http:
            for item in questions:
                version, response_id = traffic.ask(item["question"])
                assert version == f"{NAME}@v1"
                body = {"id": response_id, "rating": "down"}
                if item in corrected:
                    body["correction"] = item["answer"]
                rated = http.post("/v1/feedback", json=body)
                assert rated.status_code == 200, rated.text
                assert rated.json()["correction_kept"] is ("correction" in body)

        # 3. retrain: only the feedback is new; v2 is gated against v1 and promoted
        started = time.monotonic()
        run = ragtune(home, *retrain)
        timings["retrain v2 (incl. gate)"] = time.monotonic() - started
        assert run.returncode == 0, run.stdout + run.stderr
        report = json.loads(run.stdout)
        prepared = report["steps"]["prepare"]
        assert prepared["documents"]["new"] == prepared["documents"]["changed"] == []
        assert prepared["documents"]["examples_prepared"] == 0
        assert prepared["feedback"]["new_responses"] == len(corrected)
        assert prepared["feedback"]["examples_added"] == len(corrected)
        better = report["steps"]["gate"]
        print("gate v2 vs v1:", json.dumps(better))
        assert better["decision"] == "accepted" and better["version"] == "v2"
        assert better["paired"]["diff"] > 0 and better["paired"]["low"] >= -MIN_DELTA
        assert adapters(server)["active_version"] == "v2"
        nothing = ragtune(home, *retrain)
        assert nothing.returncode == 0, nothing.stdout + nothing.stderr
        assert json.loads(nothing.stdout)["status"] == "nothing_to_do"

        # 4. the same data with shuffled answers: refused, v2 stays
        state = json.loads((home / "retrain" / NAME / "state.json").read_text())
        shuffled_copy(Path(state["data"]), tmp_path / "shuffled")
        started = time.monotonic()
        trained = ragtune(
            home,
            "train",
            "--config",
            str(train_config),
            "--data",
            str(tmp_path / "shuffled"),
            "--name",
            NAME,
            "--version",
            "v3",
            "--no-progress",
        )
        assert trained.returncode == 0, trained.stdout + trained.stderr
        body = {"lora_name": NAME, "lora_path": f"{NAME}/v3", "version": "v3", "activate": False}
        loaded = httpx.post(f"{server.v1}/load_lora_adapter", json=body, headers=ADMIN, timeout=120)
        assert loaded.status_code == 200, loaded.text
        promote = ragtune(
            home,
            "adapters",
            "promote",
            f"{NAME}@v3",
            "--gate",
            str(QUESTIONS),
            "--url",
            server.v1,
            "--metric",
            "reference_loglik_per_byte",
            "--min-delta",
            str(MIN_DELTA),
            "--max-tokens",
            "4",
            "--no-progress",
        )
        timings["train + gate v3"] = time.monotonic() - started
        assert promote.returncode == 3, promote.stdout + promote.stderr
        print("gate v3 vs v2:", promote.stdout.strip())
        assert promote.stdout.startswith("refused") and adapters(server)["active_version"] == "v2"
        refused = next(
            e for e in audit(home) if e["action"] == "promote_adapter" and e["version"] == "v3"
        )
        assert (
            refused["gate"]["paired"]["diff"] < 0 and refused["gate"]["paired"]["low"] < -MIN_DELTA
        )

        # 5. v3 on 30 % of the traffic anyway; its answers are rated down: rolled back
        body = {"version": "v3", "fraction": 0.3}
        started_canary = httpx.post(
            f"{server.v1}/adapters/{NAME}/canary", json=body, headers=ADMIN, timeout=60
        )
        assert started_canary.status_code == 200, started_canary.text
        served = []
        with httpx.Client(base_url=server.base_url, timeout=120, headers=CLIENT) as http:
            for item in questions * 2:
                version, response_id = traffic.ask(item["question"], max_tokens=8)
                served.append(version)
                if version == f"{NAME}@v3":
                    rated = http.post("/v1/feedback", json={"id": response_id, "rating": "down"})
                    assert rated.status_code == 200, rated.text
                canary = httpx.get(f"{server.v1}/adapters/{NAME}/canary", headers=ADMIN).json()
                if canary["canary"]["state"] != "running":
                    break
        assert canary["canary"]["state"] == "rolled_back", canary
        assert canary["canary"]["reason"] == "down_rate"
        assert served.count(f"{NAME}@v3") >= 4  # min_ratings of them, all rated down
        after = [traffic.ask(item["question"], max_tokens=4)[0] for item in questions[:5]]
        assert set(after) == {f"{NAME}@v2"} and adapters(server)["active_version"] == "v2"
    finally:
        stop.set()
        asker.join(timeout=300)

    # zero failed requests throughout
    assert traffic.requests and traffic.failures() == [], traffic.failures()
    background_versions = {v for m, v, _ in traffic.requests}
    assert {f"{NAME}@v1", f"{NAME}@v2"} <= background_versions

    # every step in the audit log
    entries = audit(home)
    actions = [entry["action"] for entry in entries]
    for action in (
        "feedback",
        "retrain_prepare",
        "retrain_train",
        "load_adapter",
        "retrain_load",
        "retrain_gate",
        "promote_adapter",
        "start_canary",
        "canary_rollback",
        "retrain_finish",
    ):
        assert action in actions, action
    gates = [(e["version"], e["decision"]) for e in entries if e["action"] == "promote_adapter"]
    assert gates == [("v2", "accepted"), ("v3", "refused")]
    rollback = next(e for e in entries if e["action"] == "canary_rollback")
    assert rollback["version"] == "v3" and rollback["trigger"] == "automatic"
    assert rollback["reason"] == "down_rate"
    feedback = [e for e in entries if e["action"] == "feedback"]
    assert len(feedback) == len(questions) + served.count(f"{NAME}@v3")
    assert all(e["result"] == "ok" for e in entries), [e for e in entries if e["result"] != "ok"]
    print("requests:", len(traffic.requests), "timings:", json.dumps(timings))
