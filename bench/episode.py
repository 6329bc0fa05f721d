"""One episode under the evaluation protocol, for any env and policy.

The loop: reset to the init state, settle with no-op steps, then query the policy whenever
the action queue is empty, execute the FIRST k actions of each chunk, and stop on success
or at the step budget. The env renders cameras only for observations the policy (or the
video) will read. Everything that goes wrong becomes an ``error`` outcome with its message;
it is never counted as a failure.

The env is duck-typed: ``reset(init_state)``, ``step(action, render) -> done``,
``observe(images, privileged) -> dict`` (see ``suites.libero_env.LiberoEnv``).
"""

from __future__ import annotations

import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from policies.base import ACTION_DIM, EpisodeInfo, Observation, Policy
from suites.registry import SETTLE_ACTION

SUCCESS, FAILURE, ERROR = "success", "failure", "error"


class EpisodeTimeout(Exception):
    pass


class BadActionError(ValueError):
    pass


class DescribedError(RuntimeError):
    """An error described where it happened (in another process): its message is the record's."""


@dataclass
class EpisodeResult:
    outcome: str
    steps: int = 0
    queries: int = 0
    wall_s: float = 0.0
    query_latency_ms: list[float] = field(default_factory=list)
    query_stats: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class EpisodeSettings:
    max_steps: int
    settle_steps: int
    chunk_length: int
    watchdog_s: float | None = None  # wall-clock limit for the whole episode


def run_episode(
    env,
    policy: Policy,
    episode: EpisodeInfo,
    init_state: np.ndarray,
    settings: EpisodeSettings,
    on_frame: Callable[[dict], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> EpisodeResult:
    """Run one episode; never raises for env, policy or watchdog failures."""
    result = EpisodeResult(outcome=FAILURE)
    start = clock()
    try:
        with watchdog(settings.watchdog_s):
            _loop(env, policy, episode, init_state, settings, on_frame, clock, start, result)
    except Exception as exc:  # noqa: BLE001 - every failure of env or policy is an error outcome
        result.outcome = ERROR
        result.error = describe_error(exc)
    end_episode(policy, episode, result)
    result.wall_s = clock() - start
    return result


def end_episode(policy: Policy, episode: EpisodeInfo, result: EpisodeResult) -> None:
    """Tell the policy its episode is over (it frees per-episode state); a failure to do so
    makes an episode that had not already failed an error."""
    try:
        policy.end(episode)
    except Exception as exc:  # noqa: BLE001
        if result.outcome != ERROR:
            result.outcome, result.error = ERROR, describe_error(exc)


def _loop(env, policy, episode, init_state, settings, on_frame, clock, start, result) -> None:
    wants_images = policy.needs_images
    video = on_frame is not None
    env.reset(init_state)
    policy.reset(episode)
    settle = np.asarray(SETTLE_ACTION)
    for i in range(settings.settle_steps):
        last = i == settings.settle_steps - 1
        env.step(settle, render=last and (video or wants_images))  # success during settling does not count
    if video:
        on_frame(env.observe(images=True))

    queue: list[np.ndarray] = []
    while result.steps < settings.max_steps:
        if not queue:
            queue = _query(env, policy, episode, settings.chunk_length, clock, result)
        action = queue.pop(0)
        last_step = result.steps + 1 == settings.max_steps
        render = video or (wants_images and not queue and not last_step)
        done = env.step(action, render=render)
        result.steps += 1
        if video:
            on_frame(env.observe(images=True))
        if done:
            result.outcome = SUCCESS
            return
        _check_deadline(settings.watchdog_s, clock() - start)


def _query(env, policy, episode, chunk_length, clock, result) -> list[np.ndarray]:
    raw = env.observe(images=policy.needs_images, privileged=policy.needs_privileged)
    obs = Observation(
        proprio=raw["proprio"],
        instruction=raw["instruction"],
        episode_id=episode.episode_id,
        images=raw.get("images"),
        privileged=raw.get("privileged"),
    )
    t0 = clock()
    outputs = policy.act([obs])
    policy.synchronize()
    result.query_latency_ms.append((clock() - t0) * 1000.0)
    result.queries += 1
    if len(outputs) != 1:
        raise BadActionError(f"policy returned {len(outputs)} outputs for 1 observation")
    result.query_stats.append(dict(outputs[0].stats))
    actions = validate_chunk(outputs[0].actions)
    return list(actions[:chunk_length])


def validate_chunk(actions) -> np.ndarray:
    """A chunk must be a finite (n >= 1, 7) array; anything else is an error, not a failure."""
    arr = np.asarray(actions, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != ACTION_DIM or arr.shape[0] < 1:
        raise BadActionError(f"action chunk has shape {arr.shape}, expected (n, {ACTION_DIM}) with n >= 1")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise BadActionError(f"action chunk has a non-finite value {arr[tuple(bad)]} at action {bad[0]}, dim {bad[1]}")
    return arr


def _check_deadline(limit_s: float | None, elapsed_s: float) -> None:
    if limit_s is not None and elapsed_s > limit_s:
        raise EpisodeTimeout(f"episode exceeded the {limit_s:g} s watchdog ({elapsed_s:.1f} s)")


class _Deferral:
    """Whether the watchdog is held (``held_watchdog``), and the expiry it held back."""
    depth = 0
    expired: str | None = None


@contextmanager
def watchdog(limit_s: float | None):
    """Interrupt a call that hangs in Python code (env or policy) once the episode's time is up.

    The step loop also checks the deadline itself. A hang inside C code that never returns
    to Python cannot be interrupted in-process; the worker pool handles that by killing it.
    """
    usable = limit_s is not None and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def _expired(signum, frame):
        message = f"episode exceeded the {limit_s:g} s watchdog (interrupted)"
        if _Deferral.depth:
            _Deferral.expired = message
        else:
            raise EpisodeTimeout(message)

    previous = signal.signal(signal.SIGALRM, _expired)
    _Deferral.expired = None
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def held_watchdog():
    """Keep the watchdog from cutting a section in two (a query's round trip to another
    process, whose answer would otherwise arrive later and be taken for the next message);
    an expiry during the section raises at its end."""
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
    if not _Deferral.depth and _Deferral.expired:
        message, _Deferral.expired = _Deferral.expired, None
        raise EpisodeTimeout(message)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, DescribedError):
        return str(exc)
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    location = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{location}"
