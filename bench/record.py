"""``bench record-demos``: run a policy and keep its successful episodes as demonstrations.

``resume`` continues a file: episodes it holds, and those that failed (a seeded episode fails
again), are not run again; those that ended in an error are.

With ``workers`` > 1 the episodes run in env worker processes (``bench.pool``), the policy
answering in this process. Whatever order they end in, and however often the run was resumed,
the file numbers its demonstrations by task and init state.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.demos import FAILED_ATTR, IMAGE_ORIENTATION, DemoWriter, RecordingFactory, settled_attempts
from bench.episode import ERROR, SUCCESS, EpisodeResult, EpisodeSettings
from bench.plan import plan_episodes
from bench.pool import EpisodeWork, Job, WorkerPool, run_here
from bench.provenance import now_iso, package_versions
from bench.runner import episode_info, make_libero_env
from policies import make_policy
from suites import TaskSpec, get_suite


@dataclass
class RecordSummary:
    path: Path
    attempted: int
    recorded: int
    not_recorded: dict[str, str]  # episode key -> outcome (and error)
    already_done: int = 0  # planned episodes a resumed file had settled


COMMAND = "record-demos"  # the output's "command" attribute, checked by --resume


def record_demos(
    suite_name: str,
    out: Path,
    policy_name: str = "scripted",
    policy_args: dict | None = None,
    tasks: list[int] | None = None,
    episodes_per_task: int | None = None,
    init_states: list[int] | None = None,
    image_size: int = 128,
    seed: int = 0,
    max_steps: int | None = None,
    env_factory: Callable[[TaskSpec], object] | None = None,
    progress: bool = True,
    resume: bool = False,
    workers: int = 1,
) -> RecordSummary:
    from tqdm import tqdm

    suite = get_suite(suite_name)
    plan = plan_episodes(suite, tasks, episodes_per_task, init_states)
    policy = make_policy(policy_name, policy_args, seed=seed)
    policy.select_suite(suite.name)
    settings = EpisodeSettings(max_steps or suite.max_steps, suite.settle_steps, policy.chunk_length, watchdog_s=900.0)
    env_factory = env_factory or functools.partial(make_libero_env, camera_size=image_size)  # picklable
    file_settings = {"suite": suite.name, "policy": policy_name, "image_size": image_size, "seed": seed,
                     "policy_args": json.dumps(policy_args or {}, sort_keys=True), "max_steps": settings.max_steps}
    settled: dict[str, str] = {}
    if resume:
        settled = settled_attempts(out, COMMAND, file_settings,
                                   lambda a: f"{a['suite']}/{a['task_index']}/{a['init_state_index']}")
    elif Path(out).exists():
        raise FileExistsError(f"{out} already exists; continue it with --resume, or choose another --out")
    writer = DemoWriter(out, {
        **file_settings,
        "command": COMMAND,
        "image_orientation": IMAGE_ORIENTATION,
        "versions": str(package_versions()),
        "updated_at": now_iso(),
    }, append=resume, order_key=lambda a: (a["task_index"], a["init_state_index"]))
    if not resume:
        writer.set_file_attr("created_at", now_iso())
    failed = {key: why for key, why in settled.items() if why != "recorded"}
    jobs = []
    for planned in plan:
        if planned.key not in settled:
            task = suite.task(planned.task_index)
            jobs.append(Job(planned.key, task, planned.init_state_index, episode_info(planned, task, seed),
                            task.init_states()[planned.init_state_index]))
    not_recorded, recorded_before = {}, writer.count
    bar = tqdm(total=len(jobs), unit="ep", disable=not progress)

    def finish(job: Job, result: EpisodeResult, steps) -> None:
        bar.update()
        if result.outcome == SUCCESS:
            writer.add(steps, {
                "suite": suite.name,
                "task_index": job.task.index,
                "task_name": job.task.name,
                "instruction": job.task.instruction,
                "init_state_index": job.episode.init_state_index,
                "init_state": job.init_state,
                "seed": job.episode.seed,
            })
            return
        not_recorded[job.key] = result.outcome + (f": {result.error}" if result.error else "")
        if result.outcome != ERROR:  # a failure is settled: the seeded episode would fail again
            failed[job.key] = result.outcome
            writer.set_file_attr(FAILED_ATTR, json.dumps(failed))

    factory = RecordingFactory(env_factory, suite.settle_steps)
    try:
        if workers > 1 and len(jobs) > 1:
            WorkerPool(workers, factory, EpisodeWork(settings, policy, keep_recording=True), policy,
                       hang_limit_s=settings.watchdog_s).run(jobs, finish)
        else:
            run_here(jobs, factory, EpisodeWork(settings, policy, keep_recording=True, here=True), finish)
    finally:
        bar.close()
        writer.close()
    return RecordSummary(Path(out), len(jobs), writer.count - recorded_before, not_recorded, len(plan) - len(jobs))
