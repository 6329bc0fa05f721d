"""Run a benchmark: plan, resume, drive episodes, append records.

Episodes run in plan order (grouped by task) so one env serves all episodes of its task;
an episode that ends in ``error`` gets a freshly built env for the next one.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bench.config import RunConfig
from bench.episode import ERROR, EpisodeResult, EpisodeSettings, end_episode, run_episode
from bench.plan import PlannedEpisode, plan_episodes
from bench.provenance import SIMULATOR_PACKAGES, code_revision, host_info, now_iso, package_versions
from bench.records import MANIFEST, EpisodeLog, RunDirError, read_manifest, write_json_atomic
from bench.video import EpisodeVideo, finish_video, video_stem
from policies import EpisodeInfo, Policy, make_policy
from suites import TaskSpec, get_suite

MANIFEST_FORMAT = 1


@dataclass
class RunSummary:
    run_dir: Path
    planned: int
    recorded: int
    ran_now: int
    outcomes: dict[str, int]
    worker_peak_rss_mb: float | None = None  # with a worker pool: the largest worker's peak
    worker_rss_mb: dict | None = None  # with a worker pool: each worker's RSS after each episode


def default_run_dir(config: RunConfig, root: Path = Path("results")) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    policy = config.policy.replace(":", ".")  # a policy given as module.path:ClassName
    return root / f"{config.suite}_{policy}_{stamp}"


def make_libero_env(task: TaskSpec, camera_size: int):
    from suites.libero_env import LiberoEnv  # imports the simulator only where an env is built

    return LiberoEnv(task, camera_size=camera_size)


def default_env_factory(config: RunConfig) -> Callable[[TaskSpec], object]:
    return functools.partial(make_libero_env, camera_size=config.camera_size)  # picklable, for workers


def execute(
    config: RunConfig,
    run_dir: Path,
    resume: bool = False,
    env_factory: Callable[[TaskSpec], object] | None = None,
    progress: bool = True,
    retry_errors: bool = False,
) -> RunSummary:
    """Run the planned episodes not yet recorded in ``run_dir`` (with ``retry_errors``, also
    those of a resumed run recorded as errors)."""
    if retry_errors and not resume:
        raise ValueError("retrying errors continues a run: give the run directory with --resume")
    suite = get_suite(config.suite)
    config.suite = suite.name  # record the real suite, never an alias
    plan = plan_episodes(suite, config.tasks, config.episodes_per_task, config.init_states)
    policy = make_policy(config.policy, config.policy_args, seed=config.seed)
    policy.select_suite(suite.name)
    if config.chunk_length is not None and not 1 <= config.chunk_length <= policy.chunk_length:
        raise ValueError(f"--chunk-length {config.chunk_length}: {config.policy} answers with chunks of "
                         f"{policy.chunk_length} actions, so 1..{policy.chunk_length} of them can be executed")
    settings = EpisodeSettings(
        max_steps=config.max_steps or suite.max_steps,
        settle_steps=suite.settle_steps,
        chunk_length=config.chunk_length or policy.chunk_length,
        watchdog_s=config.watchdog_s,
    )
    run_dir = Path(run_dir)
    manifest = _manifest_for(run_dir, config, policy, plan, settings, resume)
    env_factory = env_factory or default_env_factory(config)
    run_dir.mkdir(parents=True, exist_ok=True)

    with EpisodeLog(run_dir) as log:  # refuses a run directory another process is writing to
        if retry_errors:
            manifest["resumes"][-1]["retried_errors"] = [r["key"] for r in log.withdraw_errors()]
        write_json_atomic(run_dir / MANIFEST, manifest)
        todo = [ep for ep in plan if ep.key not in log.done_keys]
        bar = _progress(len(plan), len(plan) - len(todo), log.records, enabled=progress)
        pool = None
        try:
            if config.workers > 1 and len(todo) > 1:
                pool = _run_pool(todo, suite, policy, settings, env_factory, config, run_dir, log, bar)
            else:
                _run_serial(todo, suite, policy, settings, env_factory, config, run_dir, log, bar)
        finally:
            bar.close()
        outcomes = {k: sum(r["outcome"] == k for r in log.records) for k in ("success", "failure", "error")}
        summary = RunSummary(run_dir, len(plan), len(log.records), len(todo), outcomes)
        if pool is not None:
            summary.worker_peak_rss_mb = max(pool.peak_rss_mb.values(), default=None)
            summary.worker_rss_mb = pool.rss_after_episode_mb
        return summary


def _run_serial(todo, suite, policy, settings, env_factory, config, run_dir, log, bar) -> None:
    envs = TaskEnv(env_factory)
    warm = False  # the first query made in this process pays for lazy initialisation
    try:
        for planned in todo:
            task = suite.task(planned.task_index)
            record = _run_one(planned, task, policy, settings, envs, config, run_dir, warm)
            warm = warm or record["queries"] > 0
            log.append(record)
            bar.update(record)
    finally:
        envs.discard()


def _run_pool(todo, suite, policy, settings, env_factory, config, run_dir, log, bar) -> None:
    from bench.pool import EpisodeWork, Job, WorkerPool

    jobs, planned_by_key = [], {}
    for planned in todo:
        task = suite.task(planned.task_index)
        jobs.append(Job(planned.key, task, planned.init_state_index, episode_info(planned, task, config.seed),
                        task.init_states()[planned.init_state_index]))
        planned_by_key[planned.key] = planned

    def on_result(job, result, video):
        # warm: the pool itself marks its first answer as warm-up, in the episode that got it
        # (the first episode to finish is usually another one).
        record = make_record(planned_by_key[job.key], job.task, job.episode, result, True, video)
        log.append(record)
        bar.update(record)

    work = EpisodeWork(settings, policy, video_dir=Path(run_dir) / "videos" if config.video else None)
    pool = WorkerPool(config.workers, env_factory, work, policy, config.max_batch, settings.watchdog_s)
    pool.run(jobs, on_result)
    return pool


class TaskEnv:
    """The one live env, for the task being run: built when the task changes, rebuilt after an error.

    One at a time, because each holds a GL context and the simulator's memory.

    In the protocol one env runs a task's init states 0, 1, 2, ... in order, and LIBERO's
    scene at a reset depends on how many resets the env has had. So an env that counts its
    resets (``resets``, ``skip_resets``) is brought to exactly i resets before init state i,
    built anew where it is past that: resumed runs, runs of some init states only, episodes after
    an error and a task shared by pool workers then see the scenes of the reference loop.
    """

    def __init__(self, factory: Callable[[TaskSpec], object]):
        self.factory = factory
        self.key: str | None = None
        self.env = None

    def get(self, task: TaskSpec, init_state_index: int | None = None):
        """The env of ``task``, ready for ``init_state_index`` (None: as it is)."""
        if self.key != task.key or (init_state_index is not None and getattr(self.env, "resets", 0) > init_state_index):
            self.discard()
            self.env = self.factory(task)
            self.key = task.key
        if init_state_index is not None and hasattr(self.env, "skip_resets"):
            self.env.skip_resets(init_state_index - self.env.resets)
        return self.env

    def discard(self) -> None:
        env, self.env, self.key = self.env, None, None
        _close_quietly(env)


def episode_info(planned: PlannedEpisode, task: TaskSpec, run_seed: int) -> EpisodeInfo:
    return EpisodeInfo(
        episode_id=planned.key,
        suite=planned.suite,
        task_index=planned.task_index,
        task_name=task.name,
        instruction=task.instruction,
        init_state_index=planned.init_state_index,
        seed=planned.seed(run_seed),
    )


def run_task_episode(suite, task_index: int, policy: Policy, chunk_length: int,
                     init_state_index: int = 0) -> EpisodeResult:
    """One episode of a task under the suite's protocol, outside a run (nothing is recorded):
    for measurement scripts that watch a policy's observations."""
    task = suite.task(task_index)
    planned = PlannedEpisode(suite.name, task_index, init_state_index)
    settings = EpisodeSettings(max_steps=suite.max_steps, settle_steps=suite.settle_steps, chunk_length=chunk_length)
    env = make_libero_env(task, RunConfig.camera_size)  # cameras render only for policies that read images
    try:
        return run_episode(env, policy, episode_info(planned, task, 0), task.init_states()[init_state_index], settings)
    finally:
        env.close()


def _run_one(planned: PlannedEpisode, task, policy: Policy, settings, envs: TaskEnv, config, run_dir, warm):
    episode = episode_info(planned, task, config.seed)
    video = None
    try:
        env = envs.get(task, planned.init_state_index)
        init_state = task.init_states()[planned.init_state_index]
        if config.video:
            video = EpisodeVideo(run_dir / "videos", video_stem(episode))
        result = run_episode(env, policy, episode, init_state, settings, on_frame=video.add if video else None)
    except Exception as exc:  # noqa: BLE001 - env construction or video set-up failed
        result = EpisodeResult(outcome=ERROR, error=f"{type(exc).__name__}: {exc}")
        end_episode(policy, episode, result)  # as run_episode does for the episodes it runs
    if result.outcome == ERROR:
        envs.discard()  # rebuilt for the next episode
    return make_record(planned, task, episode, result, warm, finish_video(video, result.outcome))


def make_record(planned, task, episode, result: EpisodeResult, warm: bool, video: str | None) -> dict:
    # Left out of the latency summary: the run's first query (lazy initialisation) and queries
    # whose policy reports a one-time cost (a CUDA graph captured for a new shape).
    latencies, warmup, steady = [], [], []
    for i, ms in enumerate(result.query_latency_ms):
        stats = result.query_stats[i] if i < len(result.query_stats) else {}
        is_warmup = (i == 0 and not warm) or stats.get("warmup")
        (warmup if is_warmup else latencies).append(ms)
        if not is_warmup:
            steady.append(stats)
    return {
        "key": planned.key,
        "suite": planned.suite,
        "task_index": planned.task_index,
        "task_name": task.name,
        "instruction": task.instruction,
        "init_state_index": planned.init_state_index,
        "seed": episode.seed,
        "outcome": result.outcome,
        "steps": result.steps,
        "queries": result.queries,
        "wall_s": round(result.wall_s, 4),
        "latency_ms": latency_summary(latencies),
        "query_latency_ms": [round(x, 4) for x in latencies],
        "warmup_latency_ms": [round(x, 4) for x in warmup],
        "policy_stats": summarize_stats(result.query_stats, steady),
        "error": result.error,
        "video": video,
        "finished_at": now_iso(),
    }


def latency_summary(latencies_ms: list[float]) -> dict | None:
    if not latencies_ms:
        return None
    arr = np.asarray(latencies_ms)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"n": int(arr.size), "mean": float(arr.mean()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": float(arr.max())}


def summarize_stats(per_query: list[dict], steady: list[dict] | None = None) -> dict:
    """Mean over the episode's queries of each numeric statistic (element-wise for lists);
    the last value of a text statistic (where a scripted policy ended up, why it gave up).
    Timings (names ending in ``_ms``) average the ``steady`` queries only, those kept in the
    latency summary, when given."""
    summary = {}
    keys = sorted({k for stats in per_query for k in stats} - {"warmup"})  # a mark, not a figure
    for key in keys:
        source = steady if steady is not None and key.endswith("_ms") else per_query
        values = [stats[key] for stats in source if key in stats]
        if not values:
            continue
        if isinstance(values[-1], str):
            summary[key] = values[-1]
            continue
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            continue  # ragged: not summarised
        mean = arr.mean(axis=0)
        summary[key] = _finite_or_none(mean.tolist())
    return summary


def _finite_or_none(value):
    """A statistic that is not finite (or was None) is recorded as null: JSON has no NaN."""
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value if math.isfinite(value) else None


def _manifest_for(run_dir: Path, config: RunConfig, policy: Policy, plan, settings, resume: bool) -> dict:
    """The manifest to write: a new run's, or a resumed run's after checking that it may go on."""
    manifest_path = run_dir / MANIFEST
    versions = package_versions()
    if resume:
        recorded = read_manifest(run_dir)
        problems = config.protocol_differences(RunConfig.from_dict(recorded["config"]))
        problems += [
            f"{pkg} version: recorded {recorded['versions'].get(pkg)!r}, now {versions.get(pkg)!r}"
            for pkg in SIMULATOR_PACKAGES
            if recorded["versions"].get(pkg) != versions.get(pkg)
        ]
        if recorded.get("policy") != policy.identity():
            problems.append(f"policy identity: recorded {recorded.get('policy')}, now {policy.identity()}")
        if problems:
            raise RunDirError(
                f"cannot resume {run_dir}: its episodes were recorded under a different setup, and mixing "
                "them would make the results incomparable:\n  - " + "\n  - ".join(problems)
                + "\nStart a new run directory instead."
            )
        # Each resumption's own code, machine and packages: episodes of several sessions mix.
        resumed = {"at": now_iso(), "code": code_revision(), "host": host_info(), "versions": versions}
        if (provenance := policy.provenance()) is not None:
            resumed["policy_provenance"] = provenance
        recorded.setdefault("resumes", []).append(resumed)
        recorded["config"] = config.to_dict()  # non-protocol settings may change
        recorded["policy_caveat"] = policy.caveat  # runs recorded before caveats were kept gain theirs
        return recorded
    if manifest_path.exists():
        raise RunDirError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a run directory")
    return {
        "format": MANIFEST_FORMAT,
        "run_id": run_dir.name,
        "config": config.to_dict(),
        "protocol": {
            "suite": config.suite,
            "max_steps": settings.max_steps,
            "settle_steps": settings.settle_steps,
            "chunk_length": settings.chunk_length,
            "executes": "first k actions of each chunk",
            "env_seed": 0,
            "camera_size": config.camera_size,
        },
        "policy": policy.identity(),
        "policy_caveat": policy.caveat,
        "policy_provenance": policy.provenance(),
        "plan": [ep.key for ep in plan],
        "versions": versions,
        "code": code_revision(),
        "host": host_info(),
        "started_at": now_iso(),
    }


def _close_quietly(env) -> None:
    if env is None:
        return
    try:
        env.close()
    except Exception:  # noqa: BLE001 - an env that fails to close is discarded anyway
        pass


class _progress:
    """tqdm bar with the running success rate (errors shown apart, not counted as failures)."""

    def __init__(self, total: int, done: int, records: list[dict], enabled: bool):
        from tqdm import tqdm

        self._counts = {"success": 0, "failure": 0, "error": 0}
        for r in records:
            self._counts[r["outcome"]] += 1
        self._bar = tqdm(total=total, initial=done, unit="ep", disable=not enabled, dynamic_ncols=True)
        self._refresh()

    def update(self, record: dict) -> None:
        self._counts[record["outcome"]] += 1
        self._bar.update(1)
        self._refresh()

    def _refresh(self) -> None:
        judged = self._counts["success"] + self._counts["failure"]
        rate = f"{100 * self._counts['success'] / judged:.1f}%" if judged else "-"
        self._bar.set_postfix(success=rate, errors=self._counts["error"], refresh=False)

    def close(self) -> None:
        self._bar.close()
