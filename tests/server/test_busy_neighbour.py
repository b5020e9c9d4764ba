"""A busy process beside the server (server/engine/team_size.py): under load the engine's
team gives it a core, every request still completes, and the team grows back to its share
once the process ends. The real bundled model over HTTP; `ragtune_engine_threads` on
/metrics is what an operator sees."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import API_KEY, BASE_MODEL

HOG = "while True: pass"


def engine_threads(http: httpx.Client) -> int:
    text = http.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    line = next(ln for ln in text.splitlines() if ln.startswith("ragtune_engine_threads "))
    return int(float(line.split()[1]))


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_the_team_gives_a_busy_process_a_core_and_takes_it_back(server, client) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        share = engine_threads(http)
        if share < 2:
            pytest.skip("the engine has one thread here: there is nothing to give up")
        stop = threading.Event()
        answers: list[str] = []
        errors: list[BaseException] = []

        def load() -> None:  # one request after another, as long as the test runs
            while not stop.is_set():
                try:
                    reply = client.chat.completions.create(
                        model=BASE_MODEL,
                        messages=[{"role": "user", "content": "Count from one to fifty."}],
                        max_tokens=96,
                        temperature=0,
                    )
                    answers.append(reply.choices[0].message.content or "")
                except Exception as error:  # reported below, after the hog is gone
                    errors.append(error)

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        hog = subprocess.Popen([sys.executable, "-c", HOG])
        try:
            shrank = wait_for(lambda: engine_threads(http) < share, 30)
        finally:
            hog.kill()
            hog.wait()
        grew = wait_for(lambda: engine_threads(http) == share, 40)
        stop.set()
        worker.join(timeout=60)
    assert not errors, errors
    assert shrank, "the team kept every thread beside a busy-looping process"
    assert grew, "the team did not grow back to its share after the process ended"
    assert answers and all(answers), "every request under the change of team answered"
