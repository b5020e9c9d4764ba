"""The engine's thread team shrinks while other work holds its cores (team_size.py): the
policy on a scripted clock and scripted waits, and the real team's thread ids and waits."""

from __future__ import annotations

import os
import threading

import pytest

from server.engine import native
from server.engine.team_size import (
    FixedTeam,
    TeamPolicy,
    TeamSizer,
    native_team_ids,
    schedstat_waits,
    team_for,
)

POLICY = TeamPolicy(
    window_s=0.5,
    try_window_s=0.1,
    wait_share=0.35,
    contended_windows=2,
    first_retry_s=1.0,
    longest_retry_s=4.0,
)


class Machine:
    """A scripted clock and team: while a step runs, each thread of the team waits `share`
    of the time passing; between steps (idle) nobody waits."""

    def __init__(self) -> None:
        self.now = 0.0
        self.share = 0.0
        self.waited = [0, 0, 0, 0]  # ns per thread slot
        self.resized: list[int] = []
        self.ids_read = 0
        self.gone = False  # a thread of the team has ended: its schedstat cannot be read
        self.free = 0.0  # idle cores of the process's CPUs while time passes
        self.idle_total = 0.0  # seconds those CPUs have been idle so far

    def advance(self, seconds: float, sizer: TeamSizer) -> None:
        """Steps of 0.05 s for `seconds`, the sizer called around each."""
        for _ in range(round(seconds / 0.05)):
            sizer.before_step()
            self.now += 0.05
            self.idle_total += self.free * 0.05
            self.waited = [w + int(self.share * 0.05e9) for w in self.waited]
            sizer.after_step()

    def sizer(self, most: int = 2, idle_known: bool = False, fewest: int = 1) -> TeamSizer:
        def team_ids(threads: int) -> list[int]:
            self.ids_read += 1
            return list(range(threads))

        return TeamSizer(
            most,
            POLICY,
            team_ids=team_ids,
            waits=lambda tids: None if self.gone else [self.waited[t] for t in tids],
            resize=self.resized.append,
            clock=lambda: self.now,
            idle=(lambda: self.idle_total) if idle_known else (lambda: None),
            fewest=fewest,
        )


def test_a_quiet_machine_and_rays_path_keep_the_whole_team() -> None:
    machine = Machine()
    sizer = machine.sizer()
    machine.share = 0.11  # the most a thread waited serving c=16 alone (docs/performance.md)
    machine.advance(10, sizer)
    machine.share = 0.28  # ... and behind Ray Serve's path at c=16
    machine.advance(10, sizer)
    assert sizer.threads == 2 and machine.resized == []


def test_one_contended_window_alone_takes_no_thread() -> None:
    machine = Machine()
    sizer = machine.sizer()
    for _ in range(5):
        machine.share = 0.45  # a burst (a load generator's start, a log rotation)
        machine.advance(0.5, sizer)
        machine.share = 0.1
        machine.advance(0.5, sizer)
    assert machine.resized == []


def test_contention_shrinks_the_team_and_failed_tries_back_off() -> None:
    machine = Machine()
    sizer = machine.sizer()
    machine.share = 0.5  # a busy process on one of the two cores
    machine.advance(1.1, sizer)  # two windows of 0.5 s
    assert sizer.threads == 1 and machine.resized == [1]
    first_shrink = 1.05
    # tries about 1, 2, 4, 4 s (the longest) after each shrink, at a window's end: each grows
    # the team, and the try's short window shrinks it again
    sizes = []
    for _ in range(320):  # 16 s
        machine.advance(0.05, sizer)
        sizes.append((machine.now, sizer.threads))
    tries = [t for (t, n), (_, before) in zip(sizes[1:], sizes, strict=False) if n > before]
    ends = [t for (t, n), (_, before) in zip(sizes[1:], sizes, strict=False) if n < before]
    tries = tries[: len(ends)]  # the last try may still be under way
    assert len(ends) >= 4
    slack = POLICY.window_s + 0.06
    delays = [grew - shrank for shrank, grew in zip([first_shrink, *ends], tries, strict=False)]
    for delay, wanted in zip(delays, [1, 2, 4, 4, 4], strict=False):
        assert wanted <= delay + 0.01 <= wanted + slack
    # each failed try lasted one short window: a step or two at two threads
    lasted = [end - grew for grew, end in zip(tries, ends, strict=True)]
    assert all(seconds <= POLICY.try_window_s + 0.06 for seconds in lasted)
    assert set(machine.resized) == {1, 2}  # never below one thread


def test_a_clean_try_keeps_the_thread() -> None:
    machine = Machine()
    sizer = machine.sizer()
    machine.share = 0.5
    machine.advance(1.1, sizer)
    assert sizer.threads == 1
    machine.share = 0.03  # the busy process ended
    machine.advance(1.5, sizer)
    assert sizer.threads == 2 and machine.resized == [1, 2]
    machine.advance(5, sizer)
    assert sizer.threads == 2


def test_the_team_shrinks_one_thread_at_a_time_and_grows_back_to_its_share() -> None:
    machine = Machine()
    sizer = machine.sizer(most=4)
    machine.share = 0.5
    machine.advance(2.3, sizer)  # two windows a thread
    assert machine.resized == [3, 2]
    machine.share = 0.0
    machine.advance(8, sizer)
    assert sizer.threads == 4 and machine.resized == [3, 2, 3, 4]


def test_the_team_shrinks_no_further_than_its_exact_sizes() -> None:
    machine = Machine()
    sizer = machine.sizer(most=4, fewest=3)  # 2 threads gave other bits at start-up
    machine.share = 0.5
    machine.advance(6, sizer)  # failed tries of 4 come and go; 2 is never taken
    assert sizer.threads == 3 and min(machine.resized) == 3
    machine.share = 0.0
    machine.advance(8, sizer)
    assert sizer.threads == 4 and min(machine.resized) == 3


def test_where_idle_time_is_known_tries_wait_for_a_free_core() -> None:
    """/proc/stat's idle time of the process's CPUs: while the busy process holds its core
    there is no free core and the team tries only every `longest_retry_s` (4 s here) instead
    of after 1, 2, 4 s; once it ends the idle core shows and the team is whole at the next
    verdict."""
    machine = Machine()
    sizer = machine.sizer(idle_known=True)
    machine.share, machine.free = 0.5, 0.0
    machine.advance(1.1, sizer)
    assert machine.resized == [1]
    machine.advance(10, sizer)
    tries = machine.resized.count(2)
    assert tries == 2  # at ~5 s and ~9 s (the blind delays would have tried 4 times)
    machine.share, machine.free = 0.03, 0.9  # the busy process ended: a core sits idle
    ended = machine.now
    while sizer.threads < 2 and machine.now < ended + 5:
        machine.advance(0.05, sizer)
    assert sizer.threads == 2 and machine.now - ended <= POLICY.window_s + 0.11
    machine.advance(5, sizer)
    assert sizer.threads == 2


def test_short_requests_with_idle_gaps_add_up_to_windows() -> None:
    """c=1 with 32-token answers: 0.2 s of steps, then a gap while the client sends the
    next request. Windows count step time only, so the contention is seen all the same, and
    idle time does not dilute it."""
    machine = Machine()
    sizer = machine.sizer()
    machine.share = 0.5
    for _ in range(6):  # 1.2 s of steps over 4.2 s
        machine.advance(0.2, sizer)
        machine.now += 0.5  # idle: the engine waits for work, its threads for nothing
    assert sizer.threads == 1


def test_a_thread_that_ended_makes_the_team_be_read_again() -> None:
    machine = Machine()
    sizer = machine.sizer()
    machine.advance(0.1, sizer)
    assert machine.ids_read == 1
    machine.gone = True
    machine.advance(0.6, sizer)
    machine.gone = False
    machine.advance(0.1, sizer)
    assert machine.ids_read >= 2 and sizer.threads == 2


def _native_or_skip() -> None:
    reason = native.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def test_the_team_ids_are_this_threads_team() -> None:
    """Thread 0 is the caller; the others are threads of this process, distinct, and the
    same ones region after region (libgomp keeps a pool per calling thread)."""
    _native_or_skip()
    own = threading.get_native_id()
    one = native_team_ids(1)
    assert one == [own]
    three = native_team_ids(3)
    assert three[0] == own and len(set(three)) == 3
    assert all(os.path.exists(f"/proc/self/task/{tid}") for tid in three)
    assert native_team_ids(3) == three
    waits = schedstat_waits(three)
    assert waits is not None and len(waits) == 3 and all(w >= 0 for w in waits)
    assert schedstat_waits([2**31 - 1]) is None  # no such thread


def test_which_engines_size_their_team(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    _native_or_skip()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert isinstance(team_for("cpu", "auto"), TeamSizer)
    fixed = team_for("cpu", 2)  # an operator's number is kept
    assert isinstance(fixed, FixedTeam) and fixed.threads == 2
    assert isinstance(team_for("cuda", "auto"), FixedTeam)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert isinstance(team_for("cpu", "auto"), FixedTeam)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    sizer = team_for("cpu", "auto", lambda most: (2, "1 thread gives other bits than 4"))
    assert isinstance(sizer, TeamSizer) and (sizer.most, sizer.fewest) == (4, 2)
    fixed = team_for("cpu", "auto", lambda most: (most, "3 threads give other bits than 4"))
    assert isinstance(fixed, FixedTeam) and fixed.threads == fixed.fewest == 4
