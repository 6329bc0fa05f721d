"""Which episodes a run consists of: a deterministic (task, init state) selection."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from suites import SuiteSpec
from suites.registry import INIT_STATES_PER_TASK


@dataclass(frozen=True)
class PlannedEpisode:
    suite: str
    task_index: int
    init_state_index: int

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.task_index}/{self.init_state_index}"

    def seed(self, run_seed: int) -> int:
        """A per-episode seed independent of the order episodes run in."""
        return zlib.crc32(f"{run_seed}/{self.key}".encode())


def parse_index_list(text: str | None, what: str) -> list[int] | None:
    """``"0,3,5-7"`` -> [0, 3, 5, 6, 7]; None stays None."""
    if text is None:
        return None
    indices: list[int] = []
    for part in text.split(","):
        try:
            lo, hi = (int(x) for x in part.split("-", 1)) if "-" in part.strip() else (int(part),) * 2
        except ValueError:
            raise ValueError(f"bad {what} list {text!r}: expected numbers like 0,3,5-7") from None
        if lo > hi:
            raise ValueError(f"{what} range {part.strip()!r} in {text!r} is empty: write it low-high")
        indices.extend(range(lo, hi + 1))
    if len(set(indices)) != len(indices):
        raise ValueError(f"{what} list {text!r} names an index twice")
    return indices


def plan_episodes(
    suite: SuiteSpec,
    tasks: list[int] | None = None,
    episodes_per_task: int | None = None,
    init_states: list[int] | None = None,
) -> list[PlannedEpisode]:
    """Episodes in task order; by default every task with all of its 50 init states.

    ``episodes_per_task=N`` takes the first N init states, ``init_states`` names them;
    episode i of a task always uses init state i, as in the standard evaluation.
    """
    if episodes_per_task is not None and init_states is not None:
        raise ValueError("give either --episodes-per-task or --init-states, not both")
    task_list = list(range(suite.num_tasks)) if tasks is None else tasks
    for t in task_list:
        if not 0 <= t < suite.num_tasks:
            raise ValueError(f"task {t} does not exist in {suite.name} (tasks 0..{suite.num_tasks - 1})")
    if init_states is None:
        count = INIT_STATES_PER_TASK if episodes_per_task is None else episodes_per_task
        if not 1 <= count <= INIT_STATES_PER_TASK:
            raise ValueError(f"--episodes-per-task must be 1..{INIT_STATES_PER_TASK}, got {count}")
        init_states = list(range(count))
    for i in init_states:
        if not 0 <= i < INIT_STATES_PER_TASK:
            raise ValueError(f"init state {i} does not exist (each task has {INIT_STATES_PER_TASK}: 0..49)")
    return [PlannedEpisode(suite.name, t, i) for t in task_list for i in init_states]
