"""``bench record-demos``: run a policy and keep its successful episodes as demonstrations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.demos import IMAGE_ORIENTATION, DemoWriter, RecordingEnv
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

    writer = DemoWriter(out, {
        "suite": suite.name,
        "policy": policy_name,
        "image_size": image_size,
        "image_orientation": IMAGE_ORIENTATION,
        "versions": str(package_versions()),
        "created_at": now_iso(),
    })
    envs = TaskEnv(lambda task: RecordingEnv(env_factory(task), suite.settle_steps))
    not_recorded = {}
    try:
        for planned in tqdm(plan, unit="ep", disable=not progress):
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
    return RecordSummary(Path(out), len(plan), writer.count, not_recorded)
