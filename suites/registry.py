"""The LIBERO suites: names, aliases, tasks, init states and episode lengths.

Step budgets and settle steps follow the published evaluation protocol (OpenVLA-OFT,
LightVLA, openpi): a suite's max steps is a little above its longest training demo.
Task lists and init states come from the installed LIBERO package, loaded on first use.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from dataclasses import dataclass

import numpy as np

SETTLE_STEPS = 10
SETTLE_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # no motion, gripper open
INIT_STATES_PER_TASK = 50


class UnknownSuiteError(ValueError):
    pass


@dataclass(frozen=True)
class TaskSpec:
    suite: str
    index: int
    name: str
    instruction: str
    bddl_file: str
    init_states_file: str

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.index}"

    def init_states(self) -> np.ndarray:
        return _load_init_states(self.suite, self.index)


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    max_steps: int
    longest_demo: int
    num_tasks: int
    aliases: tuple[str, ...] = ()
    settle_steps: int = SETTLE_STEPS

    @property
    def tasks(self) -> list[TaskSpec]:
        return _load_tasks(self.name)

    def task_with_instruction(self, instruction: str) -> TaskSpec | None:
        """The task given this instruction, ignoring case and spacing (None: no task of the suite)."""
        words = " ".join(instruction.lower().split())
        return next((t for t in self.tasks if " ".join(t.instruction.lower().split()) == words), None)

    def task(self, index: int) -> TaskSpec:
        if not 0 <= index < self.num_tasks:
            raise ValueError(f"task index {index} is out of range for {self.name} (0..{self.num_tasks - 1})")
        return self.tasks[index]


SUITES: dict[str, SuiteSpec] = {
    spec.name: spec
    for spec in (
        SuiteSpec("libero_spatial", max_steps=220, longest_demo=193, num_tasks=10),
        SuiteSpec("libero_object", max_steps=280, longest_demo=254, num_tasks=10),
        SuiteSpec("libero_goal", max_steps=300, longest_demo=270, num_tasks=10),
        SuiteSpec("libero_10", max_steps=520, longest_demo=505, num_tasks=10, aliases=("libero_long",)),
        SuiteSpec("libero_90", max_steps=400, longest_demo=373, num_tasks=90),
    )
}
_ALIASES = {alias: spec.name for spec in SUITES.values() for alias in spec.aliases}


def get_suite(name: str) -> SuiteSpec:
    """Resolve a suite name or alias; ``libero_long`` is ``libero_10`` (never ``libero_90``)."""
    key = _ALIASES.get(name, name)
    if key not in SUITES:
        valid = ", ".join(list(SUITES) + list(_ALIASES))
        raise UnknownSuiteError(f"unknown suite {name!r}; valid suites: {valid}")
    return SUITES[key]


def list_suites() -> list[SuiteSpec]:
    return list(SUITES.values())


@contextlib.contextmanager
def _quiet():
    # LIBERO's benchmark classes print their task order on construction.
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@functools.lru_cache(maxsize=None)
def _benchmark(suite: str):
    with _quiet():
        from libero.libero import benchmark

        return benchmark.get_benchmark_dict()[suite]()


@functools.lru_cache(maxsize=None)
def _load_tasks(suite: str) -> list[TaskSpec]:
    from libero.libero import get_libero_path

    bench = _benchmark(suite)
    spec = SUITES[suite]
    if bench.n_tasks != spec.num_tasks:
        raise RuntimeError(f"installed LIBERO has {bench.n_tasks} tasks in {suite}, expected {spec.num_tasks}")
    bddl_root = get_libero_path("bddl_files")
    tasks = []
    for i in range(bench.n_tasks):
        t = bench.get_task(i)
        tasks.append(
            TaskSpec(
                suite=suite,
                index=i,
                name=t.name,
                instruction=t.language,
                bddl_file=os.path.join(bddl_root, t.problem_folder, t.bddl_file),
                init_states_file=t.init_states_file,
            )
        )
    return tasks


@functools.lru_cache(maxsize=64)
def _load_init_states(suite: str, index: int) -> np.ndarray:
    states = np.asarray(_benchmark(suite).get_task_init_states(index))
    states.setflags(write=False)
    return states
