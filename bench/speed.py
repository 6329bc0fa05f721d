"""``bench speed``: the same episodes three ways, to measure what rendering on demand and a
worker pool buy, and to check that neither changes a single outcome.

(a) reference-style: one env, cameras rendered at every step (as the published evaluation
    scripts do); (b) our serial loop, rendering only observations a policy reads;
(c) our worker pool. The policy is the scripted expert asking for images at each query, as a
vision policy would, so that rendering costs what it costs for a VLA.
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

from bench.config import RunConfig
from bench.pool import peak_rss_mb
from bench.records import read_episodes
from bench.runner import execute, make_libero_env
from suites import get_suite


class RenderEveryStep:
    """An env that renders both cameras at every step, whatever the loop asks for."""

    def __init__(self, env):
        self.env = env

    def reset(self, init_state) -> None:
        self.env.reset(init_state)

    def step(self, action, render: bool) -> bool:
        return self.env.step(action, render=True)

    def observe(self, images: bool, privileged: bool = False) -> dict:
        return self.env.observe(images=images, privileged=privileged)

    def close(self) -> None:
        self.env.close()


def make_reference_env(task, camera_size: int):
    return RenderEveryStep(make_libero_env(task, camera_size))


def _timed_run(config: RunConfig, run_dir: Path, env_factory=None) -> dict:
    start = time.perf_counter()
    summary = execute(config, run_dir, env_factory=env_factory, progress=False)
    wall = time.perf_counter() - start
    records = read_episodes(run_dir)
    settle = get_suite(config.suite).settle_steps
    steps = sum(r["steps"] + settle for r in records)
    return {
        "wall_s": wall,
        "env_steps": steps,
        "steps_per_s": steps / wall,
        "episodes_per_hour": 3600 * len(records) / wall,
        "outcomes": {r["key"]: (r["outcome"], r["steps"]) for r in records},
        "peak_rss_mb": summary.worker_peak_rss_mb,
    }


def measure(suite: str = "libero_spatial", tasks: int = 2, episodes_per_task: int = 2, workers: int = 2,
            chunk_length: int = 8) -> dict:
    # The expert asks for images at every query, as a vision policy would, and plans chunks of
    # the measured length (its own default is 4), so queries come every chunk_length steps.
    policy_args = {"with_images": "true", "chunk_length": str(chunk_length)}
    base = dict(suite=suite, policy="scripted", policy_args=policy_args, tasks=list(range(tasks)),
                episodes_per_task=episodes_per_task, chunk_length=chunk_length)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference = _timed_run(RunConfig(**base, workers=1), tmp / "a",
                               env_factory=functools.partial(make_reference_env, camera_size=256))
        serial = _timed_run(RunConfig(**base, workers=1), tmp / "b")
        serial_rss = peak_rss_mb()  # this process ran (a) and (b)
        pool = _timed_run(RunConfig(**base, workers=workers), tmp / "c")
    same = reference["outcomes"] == serial["outcomes"] == pool["outcomes"]
    return {
        "suite": suite,
        "episodes": len(reference["outcomes"]),
        "chunk_length": chunk_length,
        "workers": workers,
        "steps_per_s": {k: round(v["steps_per_s"], 2) for k, v in
                        (("reference", reference), ("serial", serial), ("pool", pool))},
        "episodes_per_hour": {k: round(v["episodes_per_hour"], 1) for k, v in
                              (("reference", reference), ("serial", serial), ("pool", pool))},
        "wall_s": {k: round(v["wall_s"], 1) for k, v in (("reference", reference), ("serial", serial), ("pool", pool))},
        "ratio_serial": round(serial["steps_per_s"] / reference["steps_per_s"], 2),
        "ratio_pool": round(pool["steps_per_s"] / reference["steps_per_s"], 2),
        "peak_rss_mb": {"main_process_serial": round(serial_rss, 1), "per_worker": pool["peak_rss_mb"]},
        "same_outcomes": same,
        "outcomes": {k: list(v) for k, v in reference["outcomes"].items()},
        "mismatches": {k: [reference["outcomes"].get(k), serial["outcomes"].get(k), pool["outcomes"].get(k)]
                       for k in reference["outcomes"]
                       if not reference["outcomes"][k] == serial["outcomes"].get(k) == pool["outcomes"].get(k)},
    }
