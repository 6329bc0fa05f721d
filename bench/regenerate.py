"""``bench regenerate-demos``: LIBERO's own demonstrations replayed into training files.

LIBERO ships its demonstrations as one HDF5 file per task, ``{task name}_demo.hdf5``, with
128x128 images rendered upside down and the pauses of teleoperation left in. OpenVLA-OFT made
its LIBERO training data by replaying each of them in the simulator (``regenerate_libero_dataset.py``
in its repository), and this does the same:

- one env per task, seeded as for evaluation; the task's demonstrations are replayed in order,
  demonstration i after i resets, from the first of its recorded states, after the evaluation's
  settling steps;
- no-op actions (the first six values' norm below 1e-4, and the gripper command of the last kept
  action) are skipped: neither executed nor recorded (``drop_noops=False`` replays every action);
- both cameras are rendered at ``image_size`` (OFT: 256) for every kept step and stored upright;
- a demonstration is kept only if the task's goal holds after its last action.

With ``workers`` > 1 the replays run in env worker processes (``bench.pool``), each
demonstration still after as many resets as its index. Whatever order they end in, and however
often the run was resumed, the file numbers its demonstrations by task and source demonstration.

The output is in ``bench record-demos``' layout, so ``bench finetune`` trains on it. One
difference from OFT's script: the state stored with the first step is the simulator's after
settling (OFT copies the original's first state there), so each stored state is the one its
observation was rendered from.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench.demos import (FAILED_ATTR, IMAGE_ORIENTATION, DemoWriter, RecordingEnv, RecordingFactory, demo_number,
                         settled_attempts)
from bench.episode import ERROR, FAILURE, SUCCESS, EpisodeResult, watchdog
from bench.pool import Job, WorkerPool, run_here
from bench.provenance import file_sha256, now_iso, package_versions
from bench.runner import make_libero_env
from bench.training_data import kept_steps
from suites import SuiteSpec, TaskSpec, get_suite
from suites.registry import SETTLE_ACTION

SOURCE_SUFFIX = "_demo.hdf5"  # LIBERO names a task's file after the task
WATCHDOG_S = 900.0
COMMAND = "regenerate-demos"  # the output's "command" attribute, checked by --resume


@dataclass
class SourceDemo:
    file: Path
    name: str  # demo_i in the source file
    index: int  # i: the resets before its replay
    actions: np.ndarray  # (T, 7)
    init_state: np.ndarray  # the first recorded simulator state

    def key(self, task_index: int) -> str:
        return f"task{task_index}/{self.name}"


@dataclass
class RegenerateSummary:
    path: Path
    attempted: int  # replays in this call
    recorded: int  # demonstrations written in this call
    skipped_noops: int  # no-op actions left out of the recorded demonstrations
    not_recorded: dict[str, str] = field(default_factory=dict)  # this call's: key -> why
    already_done: int = 0  # replays a resumed file had already settled


def source_task(path: Path, suite: SuiteSpec) -> TaskSpec:
    """The suite's task a LIBERO demonstration file belongs to: by its name, else by the task file it records."""
    import h5py

    names = {task.name: task for task in suite.tasks}
    if path.name.endswith(SOURCE_SUFFIX) and path.name[: -len(SOURCE_SUFFIX)] in names:
        return names[path.name[: -len(SOURCE_SUFFIX)]]
    with h5py.File(path, "r") as f:
        bddl = f["data"].attrs.get("bddl_file_name") if "data" in f else None
    stem = Path(str(bddl)).stem if bddl is not None else None
    if stem in names:
        return names[stem]
    raise ValueError(f"{path.name} is not a demonstration file of a {suite.name} task: its name is not "
                     f"'<task name>{SOURCE_SUFFIX}' and it records no task file of the suite")


def source_files(suite: SuiteSpec, sources: list[Path]) -> dict[int, Path]:
    """Task index -> its LIBERO file, from files and directories of files."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(source.glob("*.hdf5"))
        elif source.is_file():
            files.append(source)
        else:
            raise FileNotFoundError(f"demonstration source {source} does not exist")
    if not files:
        raise ValueError(f"no .hdf5 files in {', '.join(map(str, sources))}")
    by_task: dict[int, Path] = {}
    for path in files:
        task = source_task(path, suite)
        if task.index in by_task:
            raise ValueError(f"two files hold task {task.index} ({task.name}): {by_task[task.index]} and {path}")
        by_task[task.index] = path
    return dict(sorted(by_task.items()))


def read_source(path: Path, task: TaskSpec, limit: int | None = None) -> list[SourceDemo]:
    """The first ``limit`` (all: None) demonstrations of a LIBERO file, in the order OFT replays them."""
    import h5py

    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path} is not a demonstration file: it has no 'data' group")
        data = f["data"]
        if str(data.attrs.get("image_orientation", "")).startswith("upright"):
            raise ValueError(f"{path} was written by bench record-demos or regenerate-demos: train on it as it is")
        _check_instruction(path, data.attrs.get("problem_info"), task)
        names = sorted(data, key=demo_number)[:limit]
        demos = []
        for name in names:
            group = data[name]
            actions = np.asarray(group["actions"][()], dtype=np.float64)
            if actions.ndim != 2 or actions.shape[1] != 7 or not len(actions):
                raise ValueError(f"{path}: {name}'s actions have shape {actions.shape}, expected (T, 7) with T > 0")
            if not np.isfinite(actions).all():
                raise ValueError(f"{path}: {name}'s actions hold NaN or infinite values")
            demos.append(SourceDemo(path, name, demo_number(name), actions, np.asarray(group["states"][0])))
    return demos


def _check_instruction(path: Path, problem_info, task: TaskSpec) -> None:
    if problem_info is None:
        return
    instruction = json.loads(problem_info).get("language_instruction")
    if instruction is not None and get_suite(task.suite).task_with_instruction(str(instruction)) != task:
        raise ValueError(f"{path.name} records the instruction {instruction!r}, task {task.index} of {task.suite} "
                         f"is {task.instruction!r}")


def replay(env: RecordingEnv, demo: SourceDemo, steps: np.ndarray, settle_steps: int) -> bool:
    """Replay ``demo``'s actions at ``steps``; whether the goal holds after the last one."""
    env.reset(demo.init_state)
    for _ in range(settle_steps):
        env.step(np.asarray(SETTLE_ACTION), render=False)  # RecordingEnv renders the last one
    done = False
    for step in steps:
        done = env.step(demo.actions[step], render=False)
    return done


class ReplayWork:
    """A job of regeneration (``bench.pool``): replay the job's demonstration (``job.data``); its
    recorded steps are the output where the goal holds after the last action."""

    def __init__(self, settle_steps: int, drop_noops: bool):
        self.settle_steps = settle_steps
        self.drop_noops = drop_noops

    def __call__(self, env: RecordingEnv, job: Job, conn=None) -> tuple[EpisodeResult, list | None]:
        steps = kept_steps(job.data.actions, self.drop_noops)
        with watchdog(WATCHDOG_S):
            done = replay(env, job.data, steps, self.settle_steps)
        return EpisodeResult(SUCCESS if done else FAILURE, steps=len(steps)), (env.steps if done else None)


def regenerate_demos(
    suite_name: str,
    sources: list[Path],
    out: Path,
    tasks: list[int] | None = None,
    demos_per_task: int | None = None,
    image_size: int = 256,
    drop_noops: bool = True,
    resume: bool = False,
    env_factory: Callable[[TaskSpec], object] | None = None,
    progress: bool = True,
    workers: int = 1,
) -> RegenerateSummary:
    from tqdm import tqdm

    suite = get_suite(suite_name)
    files = source_files(suite, sources)
    if tasks is not None:
        missing = [t for t in tasks if t not in files]
        if missing:
            raise ValueError(f"no demonstration file for task(s) {missing} of {suite.name} in the sources")
        files = {t: files[t] for t in tasks}
    plan = [(suite.task(t), demo) for t, path in files.items() for demo in read_source(path, suite.task(t), demos_per_task)]

    settings = {"suite": suite.name, "image_size": image_size, "drop_noops": drop_noops}
    sources = {p.name: file_sha256(p) for p in files.values()}
    settled: dict[str, str] = {}
    if resume:
        settled = settled_attempts(out, COMMAND, settings,
                                   lambda attrs: f"task{attrs['task_index']}/{attrs['source_demo']}")
        sources = _same_sources(out, sources)
    elif Path(out).exists():
        raise FileExistsError(f"{out} already exists; continue it with --resume, or choose another --out")
    env_factory = env_factory or functools.partial(make_libero_env, camera_size=image_size)  # picklable
    writer = DemoWriter(out, {
        **settings,
        "command": COMMAND,
        "policy": "replay of LIBERO demonstrations",
        "image_orientation": IMAGE_ORIENTATION,
        "sources": json.dumps(sources),
        "versions": str(package_versions()),
        "updated_at": now_iso(),
    }, append=resume, order_key=lambda a: (a["task_index"], demo_number(a["source_demo"])))
    if not resume:
        writer.set_file_attr("created_at", now_iso())
    jobs = [Job(demo.key(task.index), task, demo.index, data=demo) for task, demo in plan
            if demo.key(task.index) not in settled]
    summary = RegenerateSummary(Path(out), len(jobs), 0, 0, already_done=len(plan) - len(jobs))
    failures = {k: why for k, why in settled.items() if why != "recorded"}
    bar = tqdm(total=len(jobs), unit="demo", disable=not progress)

    def finish(job: Job, result: EpisodeResult, steps) -> None:
        bar.update()
        demo, task = job.data, job.task
        if result.outcome == SUCCESS:
            skipped = len(demo.actions) - len(steps)
            writer.add(steps, {
                "suite": suite.name, "task_index": task.index, "task_name": task.name,
                "instruction": task.instruction, "init_state": demo.init_state,
                "source_file": demo.file.name, "source_demo": demo.name,
                "source_steps": len(demo.actions), "skipped_noops": skipped,
            })
            summary.recorded += 1
            summary.skipped_noops += skipped
        elif result.outcome == ERROR:  # a replay that crashed is reported (and tried again on --resume)
            summary.not_recorded[job.key] = f"error: {result.error}"
        else:
            summary.not_recorded[job.key] = failures[job.key] = "failure: the goal does not hold after the last action"
            writer.set_file_attr(FAILED_ATTR, json.dumps(failures))

    factory, work = RecordingFactory(env_factory, suite.settle_steps), ReplayWork(suite.settle_steps, drop_noops)
    try:
        if workers > 1 and len(jobs) > 1:
            WorkerPool(workers, factory, work, hang_limit_s=WATCHDOG_S).run(jobs, finish)
        else:
            run_here(jobs, factory, work, finish)
    finally:
        bar.close()
        writer.close()
    return summary


def _same_sources(out: Path, sources: dict[str, str]) -> dict[str, str]:
    """The SHA-256 of every source file a resumed output was made from, refusing files that
    changed since (their demonstrations are already in it)."""
    import h5py

    with h5py.File(out, "r") as f:
        recorded = json.loads(f["data"].attrs.get("sources", "{}"))
    changed = sorted(name for name, digest in sources.items() if recorded.get(name, digest) != digest)
    if changed:
        raise ValueError(f"--resume: source files changed since {out} was begun: {', '.join(changed)}")
    return {**recorded, **sources}
