"""The engine's thread team, one thread smaller while other work holds its cores.

Why: a decode step is hundreds of parallel regions, and each ends at a barrier that every
thread of the team must reach. When a busy process shares a core with one of the team's
threads, that thread gets the core only part of the time, in slices of milliseconds, and
every region waits for it. Beside one busy-looping process the bundled SmolLM2 on 2 cores
served c=16 at 36 tok/s against 773-874 alone (21x less); with one thread fewer the
process has a core of its own and the engine runs at about half speed instead (495 tok/s,
97 % of a one-thread server's). `model.threads: auto` sizes the team from the CPU share an
operator set (ragtune/cpu_share.py); this handles the work nobody accounted for (a build
beside the server, a second server on the same cores).

How: every thread of the team counts the time it was runnable but waited for a core (the
kernel's /proc/self/task/<tid>/schedstat). Over each `window_s` of engine steps, the thread
that waited longest decides: alone the team's threads wait 3-11 % (the server's event loop,
a client on the same machine), behind Ray Serve's path at c=16 up to ~28 % (HAProxy, Ray's
workers waking), beside a busy process 43-48 %. Above `wait_share` in `contended_windows`
verdicts in a row the team loses a thread, down to one (or to the fewest threads that give
the full team's bits: team_exactness.py); it tries one more after
`first_retry_s`, doubling the delay while tries fail, up to `longest_retry_s`. Where
/proc/stat shows the process's CPUs idle `free_cores` of a window (the other work has gone),
a try comes at that verdict (`first_retry_s` after the last change at the soonest); while
they show no free core, only every `longest_retry_s` (in case the idle time misleads). A
try is judged over `try_window_s`: a failed one costs a step or two at the contended speed.
ragtune's kernels give the same bits at any thread count (csrc/); the library routes beside
them are checked at start-up at every size the team may take (team_exactness.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeamPolicy:
    window_s: float = 0.5  # seconds of engine steps each verdict sums the waits over
    try_window_s: float = 0.1  # ... and a try's (a step or two where the try slows steps)
    wait_share: float = 0.35  # a thread waiting more of a window than this: cores contended
    contended_windows: int = 2  # verdicts in a row that take a thread away
    first_retry_s: float = 1.0  # after a shrink, when the team first tries one more thread
    longest_retry_s: float = 15.0  # the longest delay between tries while they fail
    free_cores: float = 0.5  # idle cores (of this process's CPUs) a try needs, where known


def schedstat_waits(tids: Sequence[int]) -> list[int] | None:
    """ns each thread has waited for a core so far (schedstat's second field); None where a
    thread has ended or the kernel keeps no schedstat."""
    try:
        return [int(Path(f"/proc/self/task/{t}/schedstat").read_text().split()[1]) for t in tids]
    except (OSError, IndexError, ValueError):
        return None


def idle_reader(cpus: set[int]) -> Callable[[], float | None]:
    """Seconds `cpus` have been idle so far (/proc/stat: idle + iowait), or None where
    /proc/stat is not there to read."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    names = {f"cpu{cpu}" for cpu in cpus}

    def idle() -> float | None:
        try:
            lines = Path("/proc/stat").read_text().splitlines()
            fields = [line.split() for line in lines if line.split(" ", 1)[0] in names]
            return sum(int(f[4]) + int(f[5]) for f in fields) / tick if fields else None
        except (OSError, IndexError, ValueError):
            return None

    return idle


def native_team_ids(threads: int) -> list[int]:
    """The OS ids of the calling thread's OpenMP team of `threads` (csrc/team.cpp)."""
    from server.engine import native

    ids = (ctypes.c_int64 * threads)()
    size = native.library().team_thread_ids(threads, ids)
    return list(ids[:size])


class FixedTeam:
    """The team as started: `model.threads` set to a number, a GPU, or no way to see waits."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.fewest = threads

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass


class TeamSizer:
    """Called by the engine's thread only, around each step. Windows count the time steps
    take, not idle time (an idle team waits for nothing), so short requests with gaps
    between them add up to windows too."""

    def __init__(
        self,
        most: int,
        policy: TeamPolicy = TeamPolicy(),
        *,
        team_ids: Callable[[int], list[int]] = native_team_ids,
        waits: Callable[[Sequence[int]], list[int] | None] = schedstat_waits,
        resize: Callable[[int], None] = torch.set_num_threads,
        clock: Callable[[], float] = time.monotonic,
        idle: Callable[[], float | None] = lambda: None,
        fewest: int = 1,
    ) -> None:
        self.most = most
        self.fewest = fewest  # the smallest team with the full team's bits (team_exactness.py)
        self.threads = most
        self.policy = policy
        self._team_ids, self._waits, self._resize, self._clock = team_ids, waits, resize, clock
        self._idle = idle
        self._tids: list[int] | None = None  # read on the engine's thread, at its first step
        self._busy = 0.0  # seconds of steps so far
        self._step_began: float | None = None
        # busy time, the team's waits, wall time and the CPUs' idle time when it began
        self._window: tuple[float, list[int], float, float | None] | None = None
        self._contended = 0  # contended verdicts in a row
        self._retry_at = 0.0
        self._retry_delay = policy.first_retry_s
        self._changed_at = 0.0  # when the team last changed size
        self._trying = False  # the team just grew: its next window is the try's verdict

    def before_step(self) -> None:
        self._step_began = self._clock()

    def after_step(self) -> None:
        now = self._clock()
        if self._step_began is not None:
            self._busy += now - self._step_began
        if self._window is None:
            self._start()
            return
        busy_then, before, wall_then, idle_then = self._window
        seconds = self._busy - busy_then
        if seconds < (self.policy.try_window_s if self._trying else self.policy.window_s):
            return
        after = self._waits(self._tids or [])
        if after is None:  # a thread of the team ended: read the team again
            self._start(fresh_ids=True)
            return
        waited = max(b - a for a, b in zip(before, after, strict=True)) / 1e9
        share = waited / seconds
        logger.debug("engine threads %d: one waited %.0f%% of %.2f s of steps for a core",
                     self.threads, 100 * share, seconds)  # fmt: skip
        self._contended = self._contended + 1 if share > self.policy.wait_share else 0
        if self._contended and self._trying and self.threads > self.fewest:
            self._shrink(now, share, seconds)  # the try failed
        elif self._contended >= self.policy.contended_windows and self.threads > self.fewest:
            self._shrink(now, share, seconds)
        elif self._trying:
            self._trying = False
            self._retry_delay = self.policy.first_retry_s
            self._retry_at = now + self._retry_delay
            logger.info("engine threads stay %d: the team waited %.0f%% for a core",
                        self.threads, 100 * share)  # fmt: skip
        elif self.threads < self.most and self._try_due(now, wall_then, idle_then):
            self._set(self.threads + 1)
            self._trying = True
            logger.info("engine threads %d -> %d: trying one more", self.threads - 1, self.threads)
        self._start(fresh_ids=self._tids is None or len(self._tids) != self.threads)

    def _try_due(self, now: float, wall_then: float, idle_then: float | None) -> bool:
        """Where the CPUs' idle time is known, a try waits for a free core (the other work
        has gone), and for `longest_retry_s` at most; elsewhere it follows the delays."""
        idle_now = self._idle()
        if idle_then is None or idle_now is None or now <= wall_then:
            return now >= self._retry_at
        free = (idle_now - idle_then) / (now - wall_then)
        since = now - self._changed_at
        room = free >= self.policy.free_cores and since >= self.policy.first_retry_s
        return room or since >= self.policy.longest_retry_s

    def _shrink(self, now: float, share: float, seconds: float) -> None:
        if self._trying:  # the try failed: wait longer before the next
            self._retry_delay = min(2 * self._retry_delay, self.policy.longest_retry_s)
        else:
            self._retry_delay = self.policy.first_retry_s
        self._trying = False
        self._contended = 0
        self._retry_at = now + self._retry_delay
        self._set(self.threads - 1)
        logger.info(
            "engine threads %d -> %d: a thread of the team waited %.0f%% of the last %.1f s "
            "of steps for a core (other work on these cores); trying %d again in %.0f s",
            self.threads + 1, self.threads, 100 * share, seconds,
            self.threads + 1, self._retry_delay,
        )  # fmt: skip

    def _set(self, threads: int) -> None:
        self.threads = threads
        self._changed_at = self._clock()
        self._resize(threads)

    def _start(self, fresh_ids: bool = False) -> None:
        if self._tids is None or fresh_ids:
            self._tids = self._team_ids(self.threads)
        waits = self._waits(self._tids)
        idle = self._idle() if self.threads < self.most else None  # only tries read it
        self._window = None if waits is None else (self._busy, waits, self._clock(), idle)
        if waits is None:  # a thread of the team ended meanwhile: read the team again
            self._tids = None


def team_for(
    device: str,
    threads_setting: int | str | None,
    fewest_exact: Callable[[int], tuple[int, str | None]] = lambda most: (1, None),
) -> TeamSizer | FixedTeam:
    """A sizer where the team may be shrunk: `model.threads: auto` on a CPU of more than one
    thread, with the kernels built (they name the team's threads) and schedstat to read, down
    to the smallest size `fewest_exact` finds giving the full team's bits (team_exactness.py)."""
    threads = torch.get_num_threads()
    if device != "cpu" or threads_setting != "auto" or threads < 2:
        return FixedTeam(threads)
    from server.engine import native

    reason = native.unavailable_reason()
    if reason is None and schedstat_waits([threading.get_native_id()]) is None:
        reason = "this kernel keeps no /proc/self/task/<tid>/schedstat"
    fewest = 1
    if reason is None:
        fewest, why = fewest_exact(threads)
        if why is not None:
            logger.warning("engine threads shrink to %d at the fewest: %s", fewest, why)
        if fewest >= threads:
            reason = why
    if reason is not None:
        logger.info("engine threads stay %d whatever else runs here: %s", threads, reason)
        return FixedTeam(threads)
    return TeamSizer(threads, idle=idle_reader(os.sched_getaffinity(0)), fewest=fewest)
