import time

import numpy as np
import pytest

from bench.episode import ERROR, FAILURE, SUCCESS, EpisodeSettings, run_episode, validate_chunk
from policies.base import EpisodeInfo
from suites.registry import SETTLE_ACTION
from tests.fakes import CountingPolicy, FakeEnv

EPISODE = EpisodeInfo("s/0/0", "s", 0, "task", "do the thing", 0, seed=1)


def settings(max_steps=40, settle=10, chunk=8, watchdog=None):
    return EpisodeSettings(max_steps=max_steps, settle_steps=settle, chunk_length=chunk, watchdog_s=watchdog)


def test_settle_steps_are_noops_without_queries_and_failure_at_budget():
    env, policy = FakeEnv(), CountingPolicy()
    result = run_episode(env, policy, EPISODE, None, settings(max_steps=24))
    assert result.outcome == FAILURE
    assert result.steps == 24
    assert len(env.actions) == 10 + 24
    for action in env.actions[:10]:
        np.testing.assert_array_equal(action, SETTLE_ACTION)
    assert result.queries == 3 and policy.queries == 3


def test_executes_first_k_actions_of_each_chunk():
    env, policy = FakeEnv(), CountingPolicy(chunk=8)
    result = run_episode(env, policy, EPISODE, None, settings(max_steps=12, chunk=5))
    executed = [a[0] for a in env.actions[10:]]
    # chunks of 8, only the first 5 of each executed: 0..4, 10..14, 20..21
    assert executed == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 20, 21]
    assert result.queries == 3


def test_success_stops_at_the_step_the_goal_holds_and_ignores_settling():
    # FakeEnv counts settle steps too: success after 10 settle + 13 policy steps
    result = run_episode(FakeEnv(succeed_after=10 + 13), CountingPolicy(), EPISODE, None, settings(max_steps=40))
    assert result.outcome == SUCCESS
    assert result.steps == 13
    # "done" already during settling (step 3) does not end the episode there
    result = run_episode(FakeEnv(succeed_after=3), CountingPolicy(), EPISODE, None, settings(max_steps=40))
    assert result.outcome == SUCCESS and result.steps == 1


def test_renders_only_steps_whose_observation_is_queried():
    env, policy = FakeEnv(), CountingPolicy(chunk=8)
    run_episode(env, policy, EPISODE, None, settings(max_steps=24))
    rendered = [i for i, flag in enumerate(env.render_flags) if flag]
    # last settle step (index 9) and the step before each later query: 10 + 8k - 1; not the final step
    assert rendered == [9, 17, 25]
    assert all(obs.images is not None for obs in policy.seen)


def test_policy_without_images_never_renders():
    env, policy = FakeEnv(), CountingPolicy(needs_images=False)
    run_episode(env, policy, EPISODE, None, settings(max_steps=24))
    assert not any(env.render_flags)
    assert all(obs.images is None for obs in policy.seen)


def test_video_frames_render_every_step():
    env, policy, frames = FakeEnv(), CountingPolicy(needs_images=False), []
    run_episode(env, policy, EPISODE, None, settings(max_steps=6), on_frame=frames.append)
    assert len(frames) == 1 + 6  # initial frame after settling, then one per step
    assert env.render_flags == [False] * 9 + [True] * 7


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((8, 7), np.nan), "non-finite"),
        (np.zeros((8, 6)), "shape"),
        (np.zeros(7), "shape"),
        (np.zeros((0, 7)), "shape"),
    ],
)
def test_bad_actions_are_errors_not_failures(bad, message):
    env, policy = FakeEnv(), CountingPolicy(bad_output=bad)
    result = run_episode(env, policy, EPISODE, None, settings())
    assert result.outcome == ERROR
    assert message in result.error
    assert result.steps == 8  # the first chunk ran


def test_env_and_policy_exceptions_are_errors():
    result = run_episode(FakeEnv(fail_on_step=15), CountingPolicy(), EPISODE, None, settings())
    assert result.outcome == ERROR and "simulated physics failure" in result.error

    class Broken(CountingPolicy):
        def act(self, observations):
            raise ZeroDivisionError("policy bug")

    result = run_episode(FakeEnv(), Broken(), EPISODE, None, settings())
    assert result.outcome == ERROR and "ZeroDivisionError: policy bug" in result.error


def test_watchdog_stops_a_slow_episode():
    env = FakeEnv(step_seconds=0.01)
    result = run_episode(env, CountingPolicy(), EPISODE, None, settings(max_steps=1000, watchdog=0.3))
    assert result.outcome == ERROR and "watchdog" in result.error
    assert result.wall_s < 2


def test_watchdog_interrupts_a_hanging_policy():
    class Hangs(CountingPolicy):
        def act(self, observations):
            while True:
                time.sleep(0.01)

    result = run_episode(FakeEnv(), Hangs(), EPISODE, None, settings(watchdog=0.3))
    assert result.outcome == ERROR and "watchdog" in result.error


def test_latency_and_stats_recorded_per_query():
    policy = CountingPolicy(stats={"visual_tokens": 78, "tflops": 3.1})
    result = run_episode(FakeEnv(), policy, EPISODE, None, settings(max_steps=16))
    assert len(result.query_latency_ms) == result.queries == 2
    assert result.query_stats == [{"visual_tokens": 78, "tflops": 3.1}] * 2


def test_validate_chunk_accepts_lists():
    assert validate_chunk([[0] * 7]).shape == (1, 7)
