"""How far the team may shrink (team_exactness.py): the probe runs the runner's own forward at
each team size, leaves the runner as it found it, and stops the team at the first size whose
bits differ from the full team's. On a tiny random Llama in fp32; a head whose output depends
on the thread count stands in for a library GEMM that splits its sums by it (only the probe's
verdict is under test there: the real kernels are probed over HTTP in
tests/server/test_busy_neighbour.py and tests/engine/test_cpu_kinds.py)."""

from __future__ import annotations

import pytest
import torch

from ragtune.config import EngineConfig
from server.engine.hf_runner import HFModelRunner
from server.engine.runner import CompactRunner
from server.engine.team_exactness import fewest_exact_threads, probe_outputs
from tests.engine.test_runner import generate, runner_for, sequence, tiny  # noqa: F401  (tiny)

PROMPTS = [list(range(3, 40)), [5, 9, 2, 77]]


@pytest.fixture()
def runner(tiny) -> CompactRunner:  # noqa: F811  (a fixture)
    return runner_for(tiny, prefix_cache_mb=4)


@pytest.fixture()
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class ThreadDependentHead:
    """The model's head, plus a term where the team has one of `sizes` threads."""

    def __init__(self, head, sizes: set[int]) -> None:
        self.head, self.sizes = head, sizes

    def __call__(self, x: torch.Tensor, *args) -> torch.Tensor:
        out = self.head(x, *args)
        return out + 1e-3 if torch.get_num_threads() in self.sizes else out

    def __getattr__(self, name: str):
        return getattr(self.head, name)


def test_the_probe_leaves_the_runner_as_it_found_it(runner, threads) -> None:
    torch.set_num_threads(2)
    before = generate(runner, [sequence(p) for p in PROMPTS], steps=4)
    for seq in list(runner.slots):
        runner.release(seq)
    cache = runner.prefix_cache  # on where this device's rows are independent of their batch
    looked_up, held = (cache.prompt_tokens, cache.nbytes) if cache is not None else (0, 0)
    fewest, reason = fewest_exact_threads(runner, None, 2)
    assert runner.slots == [] and runner.prefix_cache is cache
    if cache is not None:  # the probe neither looked up nor stored prompts
        assert (cache.prompt_tokens, cache.nbytes) == (looked_up, held)
    assert torch.get_num_threads() == 2
    after = generate(runner, [sequence(p) for p in PROMPTS], steps=4)
    assert after == before
    # its verdict is what the outputs say
    for seq in list(runner.slots):
        runner.release(seq)
    full = probe_outputs(runner, None)
    torch.set_num_threads(fewest)
    assert all(torch.equal(a, b) for a, b in zip(probe_outputs(runner, None), full, strict=True))
    assert (reason is None) == (fewest == 1)


def test_the_first_size_with_other_bits_is_the_floor(runner, threads, monkeypatch) -> None:
    model = runner.model
    monkeypatch.setattr(model, "lm_head", ThreadDependentHead(model.lm_head, {1}))
    fewest, reason = fewest_exact_threads(runner, None, 3)
    assert fewest == 2 and "1 threads give other bits than 3" in reason
    assert torch.get_num_threads() == 3
    monkeypatch.setattr(model, "lm_head", ThreadDependentHead(model.lm_head.head, {1, 2}))
    assert fewest_exact_threads(runner, None, 3)[0] == 3  # the team never shrinks


def test_the_probe_stops_going_down_when_its_time_is_spent(runner, threads) -> None:
    ticks = iter(range(100))
    fewest, reason = fewest_exact_threads(runner, None, 4, budget_s=1.5, clock=lambda: next(ticks))
    # started at 0; size 3 always; size 2 at 1 s; at 2 s the budget is spent
    assert fewest == 2 and "sizes below 2 threads are unchecked" in reason
    assert torch.get_num_threads() == 4
    assert fewest_exact_threads(runner, None, 2, budget_s=0)[0] in (1, 2)  # one size: probed


def test_the_serial_fallback_allows_every_size(tiny) -> None:  # noqa: F811  (a fixture)
    fallback = HFModelRunner(tiny, EngineConfig(max_batch_size=4), max_seq_len=128)
    assert fewest_exact_threads(fallback, None, 2) == (1, None)


def test_a_runner_of_one_slot_probes_one_prompt_at_a_time(tiny, threads) -> None:  # noqa: F811
    runner = runner_for(tiny, max_batch_size=1)
    torch.set_num_threads(2)
    assert fewest_exact_threads(runner, None, 2)[0] in (1, 2)
    assert runner.slots == [] and len(probe_outputs(runner, None)) > 2
