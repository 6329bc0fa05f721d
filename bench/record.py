"""``bench record-demos``: run a policy and keep its successful episodes as demonstrations.

``resume`` continues a file: episodes it holds, and those that failed (a seeded episode fails
again), are not run again; those that ended in an error are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.demos import FAILED_ATTR, IMAGE_ORIENTATION, DemoWriter, RecordingEnv, settled_attempts
from bench.episode import SUCCESS, EpisodeSettings, run_episode
from bench.plan import plan_episodes
from bench.provenance import now_iso, package_versions
from bench.runner import TaskEnv, episode_info
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
) -> RecordSummary:
    from tqdm import tqdm

    suite = get_suite(suite_name)
    plan = plan_episodes(suite, tasks, episodes_per_task, init_states)
    policy = make_policy(policy_name, policy_args, seed=seed)
    policy.select_suite(suite.name)
    settings = EpisodeSettings(max_steps or suite.max_steps, suite.settle_steps, policy.chunk_length, watchdog_s=900.0)
    if env_factory is None:
        from suites.libero_env import LiberoEnv

        def env_factory(task):
            return LiberoEnv(task, camera_size=image_size)

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
    }, append=resume)
    if not resume:
        writer.set_file_attr("created_at", now_iso())
    failed = {key: why for key, why in settled.items() if why != "recorded"}
    todo = [planned for planned in plan if planned.key not in settled]
    envs = TaskEnv(lambda task: RecordingEnv(env_factory(task), suite.settle_steps))
    not_recorded, recorded_before = {}, writer.count
    try:
        for planned in tqdm(todo, unit="ep", disable=not progress):
            task = suite.task(planned.task_index)
            episode = episode_info(planned, task, seed)
            init_state = task.init_states()[planned.init_state_index]
            try:
                env = envs.get(task, planned.init_state_index)
                result = run_episode(env, policy, episode, init_state, settings)
            except Exception as exc:  # noqa: BLE001 - env construction failed: not a demonstration
                not_recorded[planned.key] = f"error: {type(exc).__name__}: {exc}"
                envs.discard()
                continue
            if result.outcome != SUCCESS:
                not_recorded[planned.key] = result.outcome + (f": {result.error}" if result.error else "")
                if result.error:
                    envs.discard()
                else:  # a failure is settled: the seeded episode would fail again
                    failed[planned.key] = result.outcome
                    writer.set_file_attr(FAILED_ATTR, json.dumps(failed))
                continue
            writer.add(env.steps, {
                "suite": suite.name,
                "task_index": planned.task_index,
                "task_name": task.name,
                "instruction": task.instruction,
                "init_state_index": planned.init_state_index,
                "init_state": init_state,
                "seed": episode.seed,
            })
    finally:
        envs.discard()
        writer.close()
    return RecordSummary(Path(out), len(todo), writer.count - recorded_before, not_recorded, len(plan) - len(todo))
