"""A busy process beside the server (server/engine/team_size.py): under load the engine's
team gives it a core, every request still completes with the same bits, and the team grows
back to its share once the process ends. The real bundled model over HTTP;
`ragtune_engine_threads` on /metrics is what an operator sees."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import API_KEY, BASE_MODEL

HOG = "while True: pass"


def engine_threads(http: httpx.Client, gauge: str = "ragtune_engine_threads") -> int:
    text = http.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    line = next(ln for ln in text.splitlines() if ln.startswith(f"{gauge} "))
    return int(float(line.split()[1]))


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


# longer than the wide prompt path's threshold (exactness.WIDE_ROWS), ~100 tokens, a row count
# where MKL's fp32 GEMMs split their sums by the thread count unless in strict mode; echo +
# logprobs recomputes every prompt row (no prefix cache) and returns each row's top five
PROMPT = (
    "Maintenance procedure 7 for the cooling pump: before opening the pump housing, close "
    "valves A and B, drain the line into the grey tank, check that the pressure gauge reads "
    "zero, and record the time in the log. Wear gloves and eye protection. Remove the six "
    "bolts of the housing cover in a star pattern, lift the cover, and inspect the impeller "
    "for cracks or wear. Replace the gasket whenever the cover has been opened. The next "
    "step is"
)


def scored_completion(client) -> tuple:
    reply = client.completions.create(
        model=BASE_MODEL, prompt=PROMPT, max_tokens=24, temperature=0, echo=True, logprobs=5
    )
    logprobs = reply.choices[0].logprobs
    return reply.choices[0].text, tuple(logprobs.token_logprobs), str(logprobs.top_logprobs)


def assert_team_changes_keep_every_bit(server, client) -> None:
    """Under one request after another, a busy process takes a thread from the team and gives
    it back; every answer, prompt log-probabilities included, has the bits of the first."""
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        share = engine_threads(http)
        fewest = engine_threads(http, "ragtune_engine_threads_fewest")
        if fewest >= share:
            pytest.skip(f"the engine keeps {share} threads here: there is nothing to give up")
        stop = threading.Event()
        answers: list[tuple] = []
        errors: list[BaseException] = []

        def load() -> None:  # one request after another, as long as the test runs
            while not stop.is_set():
                try:
                    answers.append(scored_completion(client))
                except Exception as error:  # reported below, after the hog is gone
                    errors.append(error)

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        hog = subprocess.Popen([sys.executable, "-c", HOG])
        try:
            shrank = wait_for(lambda: engine_threads(http) < share, 30)
            if shrank:  # answers computed by the smaller team
                count = len(answers)
                wait_for(lambda: len(answers) >= count + 2, 30)
        finally:
            hog.kill()
            hog.wait()
        grew = wait_for(lambda: engine_threads(http) == share, 40)
        count = len(answers)
        wait_for(lambda: len(answers) >= count + 1, 30)  # ... and by the whole team again
        stop.set()
        worker.join(timeout=60)
    assert not errors, errors
    assert shrank, "the team kept every thread beside a busy-looping process"
    assert grew, "the team did not grow back to its share after the process ended"
    assert len(answers) >= 3 and answers[0][0], answers[:1]
    assert all(answer == answers[0] for answer in answers), "a team change changed an answer"


def test_the_team_gives_a_busy_process_a_core_and_takes_it_back(server, client) -> None:
    assert_team_changes_keep_every_bit(server, client)
