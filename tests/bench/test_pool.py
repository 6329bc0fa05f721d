import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.config import RunConfig
from bench.records import read_episodes
from bench.runner import execute
from tests.fakes import fake_env, reset_logging_env, self_killing_env

REPO = Path(__file__).resolve().parents[2]


def config(**overrides):
    base = dict(suite="libero_goal", policy="random", tasks=[0, 1, 2], episodes_per_task=2, max_steps=40)
    base.update(overrides)
    return RunConfig(**base)


def outcomes(run_dir):
    return sorted((r["key"], r["outcome"], r["steps"]) for r in read_episodes(run_dir))


def test_pool_gives_the_serial_outcomes_and_batches_queries(tmp_path):
    execute(config(workers=1), tmp_path / "serial", env_factory=fake_env, progress=False)
    summary = execute(config(workers=2), tmp_path / "pool", env_factory=fake_env, progress=False)
    assert outcomes(tmp_path / "pool") == outcomes(tmp_path / "serial")
    assert {o for _, o, _ in outcomes(tmp_path / "pool")} == {"success"}
    records = read_episodes(tmp_path / "pool")
    assert all(1 <= r["policy_stats"]["batch_size"] <= 2 for r in records)
    assert all(len(r["query_latency_ms"]) + len(r["warmup_latency_ms"]) == r["queries"] for r in records)
    assert summary.worker_peak_rss_mb > 0


def test_workers_sharing_a_task_run_each_init_state_after_as_many_resets_as_its_index(tmp_path, monkeypatch):
    # LIBERO's scene at a reset depends on the resets before it (bench.runner.TaskEnv).
    log = tmp_path / "resets"
    monkeypatch.setenv("FAKE_ENV_RESET_LOG", str(log))
    execute(config(workers=2, tasks=[0], episodes_per_task=6), tmp_path / "run", env_factory=reset_logging_env,
            progress=False)
    resets = sorted(int(line.split()[1]) for line in log.read_text().splitlines())
    assert resets == list(range(6))


def test_the_pools_first_answer_is_warmup_in_the_episode_that_got_it(tmp_path, monkeypatch):
    import bench.runner
    from tests.fakes import CountingPolicy

    class SlowFirstCall(CountingPolicy):
        def act(self, observations):
            if not self.queries:
                time.sleep(0.3)  # lazy initialisation
            return super().act(observations)

    monkeypatch.setattr(bench.runner, "make_policy", lambda *args, **kwargs: SlowFirstCall())
    execute(config(workers=2), tmp_path / "run", env_factory=fake_env, progress=False)
    records = read_episodes(tmp_path / "run")
    kept = [ms for r in records for ms in r["query_latency_ms"]]
    warmup = [ms for r in records for ms in r["warmup_latency_ms"]]
    assert max(kept) < 250 and len(warmup) >= 1 and max(warmup) >= 300


def test_only_the_pools_first_answer_is_marked_warmup():
    # Whichever episode gets the first answer, it carries the mark (the first episode to finish
    # is often another one, and taking its first query out would keep the slow one in).
    from types import SimpleNamespace

    from bench.episode import EpisodeSettings
    from bench.pool import EpisodeWork, WorkerPool
    from tests.fakes import CountingPolicy

    policy = CountingPolicy()
    pool = WorkerPool(2, fake_env, EpisodeWork(EpisodeSettings(max_steps=10, settle_steps=0, chunk_length=8), policy),
                      policy)
    sent = []
    workers = [SimpleNamespace(latencies=[], conn=SimpleNamespace(send=sent.append)) for _ in range(2)]
    pool._answer([(workers[1], {"t": 0})])
    pool._answer([(workers[0], {"t": 0}), (workers[1], {"t": 1})])
    assert [output.stats.get("warmup", False) for output in sent] == [True, False, False]


def test_workers_write_each_episodes_video_as_one_process_does(tmp_path):
    import imageio.v2 as imageio

    for workers in (1, 2):
        execute(config(workers=workers, video=True, episodes_per_task=1), tmp_path / f"w{workers}",
                env_factory=fake_env, progress=False)
    serial, pooled = (sorted((r["key"], r["video"], r["steps"]) for r in read_episodes(tmp_path / f"w{w}"))
                      for w in (1, 2))
    assert pooled == serial and [v for _, v, _ in pooled] == [f"libero_goal--task{t}--init0--success.mp4"
                                                               for t in range(3)]
    for _, video, steps in pooled:  # a frame per control step and the first observation
        assert len(imageio.mimread(tmp_path / "w2" / "videos" / video)) == steps + 1
    assert not list((tmp_path / "w2" / "videos").glob(".*"))  # no partial file left


def test_a_worker_killed_mid_episode_is_one_error_and_the_run_completes(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ENV_KILLED_FLAG", str(tmp_path / "killed"))
    summary = execute(config(workers=2), tmp_path / "run", env_factory=self_killing_env, progress=False)
    records = {r["key"]: r for r in read_episodes(tmp_path / "run")}
    assert len(records) == 6 and summary.outcomes["error"] == 1
    (error,) = [r for r in records.values() if r["outcome"] == "error"]
    assert error["task_index"] == 1 and "worker process died (exit code -9)" in error["error"]


_INTERRUPTED_RUN = """
import sys
from bench.config import RunConfig
from bench.runner import execute
from tests.fakes import slow_fake_env
cfg = RunConfig(suite="libero_goal", policy="random", tasks=[0, 1], episodes_per_task=8, max_steps=40, workers=2)
execute(cfg, sys.argv[1], resume=len(sys.argv) > 2, progress=False, env_factory=slow_fake_env)
"""


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_during_a_pool_run_leaves_a_resumable_run_and_no_orphans(tmp_path):
    run, pids = tmp_path / "run", tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_ENV_PID_FILE": str(pids)}
    # A shell's background jobs inherit an ignored SIGINT, and Python then never raises
    # KeyboardInterrupt: give the run the default disposition, as a terminal would.
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_RUN, str(run)], cwd=REPO, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while len(read_episodes(run)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    done = read_episodes(run)
    assert 2 <= len(done) < 16  # 16 episodes leave a wide window for the interrupt on a loaded machine
    assert (run / "episodes.jsonl").read_text().endswith("\n")
    alive = {int(p) for p in pids.read_text().split()}
    deadline = time.time() + 10  # workers get a moment to exit on a loaded machine, not forever
    while alive and time.time() < deadline:
        alive = {pid for pid in alive if _running(pid)}
        time.sleep(0.1)
    assert not alive, f"workers {sorted(alive)} outlived the interrupted run"
    subprocess.run([sys.executable, "-c", _INTERRUPTED_RUN, str(run), "resume"], cwd=REPO, env=env, check=True)
    keys = sorted(r["key"] for r in read_episodes(run))
    assert keys == sorted(f"libero_goal/{t}/{i}" for t in (0, 1) for i in range(8))


def test_workers_that_cannot_start_stop_the_run_with_an_explanation(tmp_path):
    import pytest

    from bench.pool import PoolStartError
    from tests.fakes import UnloadableEnvFactory

    with pytest.raises(PoolStartError, match="exit before they start"):
        execute(config(workers=2), tmp_path / "run", env_factory=UnloadableEnvFactory(), progress=False)
    assert read_episodes(tmp_path / "run") == []  # nothing recorded: the episodes can run later


def test_a_watchdog_expiring_while_workers_wait_for_an_answer_costs_only_the_waiting_episodes(tmp_path, monkeypatch):
    # The answer to the interrupted query must not be taken for the worker's next job.
    import bench.runner
    from tests.fakes import CountingPolicy

    class SlowOnce(CountingPolicy):
        slept = False

        def act(self, observations):
            # The second call, whatever the first answered: both workers' first queries may
            # arrive together and be answered in one call.
            if self.queries >= 1 and not self.slept:
                self.slept = True
                time.sleep(2.5)  # past the 1 s watchdog, while the worker waits
            return super().act(observations)

    monkeypatch.setattr(bench.runner, "make_policy", lambda *args, **kwargs: SlowOnce())
    execute(config(workers=2, tasks=[0, 1], episodes_per_task=3, watchdog_s=1.0), tmp_path / "run",
            env_factory=fake_env, progress=False)
    records = {r["key"]: r for r in read_episodes(tmp_path / "run")}
    assert len(records) == 6
    errors = [key for key, r in records.items() if r["outcome"] == "error"]
    assert len(errors) in (1, 2)  # the slow answer held up both workers' episodes
    assert all("watchdog" in records[key]["error"] for key in errors)
    assert all(r["outcome"] == "success" and r["steps"] == 12 + 3 * r["task_index"]
               for key, r in records.items() if key not in errors)


def test_a_policy_exception_that_cannot_be_pickled_is_the_waiting_episodes_error(tmp_path, monkeypatch):
    import threading

    import bench.runner
    from tests.fakes import CountingPolicy

    class UnpicklableFailure(Exception):
        def __init__(self):
            super().__init__("no GPU memory left", threading.Lock())  # a lock cannot be pickled

    class FailsOnce(CountingPolicy):
        def act(self, observations):
            if self.queries == 1:
                self.queries += 1
                raise UnpicklableFailure()
            return super().act(observations)

    monkeypatch.setattr(bench.runner, "make_policy", lambda *args, **kwargs: FailsOnce())
    # One observation per call, so that the failing call is the second query's alone (both
    # workers' queries could otherwise arrive together and fail together).
    execute(config(workers=2, tasks=[0], episodes_per_task=3, max_batch=1), tmp_path / "run", env_factory=fake_env,
            progress=False)
    records = read_episodes(tmp_path / "run")
    assert sorted(r["outcome"] for r in records) == ["error", "success", "success"]
    (error,) = [r["error"] for r in records if r["outcome"] == "error"]
    assert error.startswith("UnpicklableFailure: ('no GPU memory left'")


def test_every_episode_ends_on_the_real_policy_in_serial_and_pool_runs(tmp_path, monkeypatch):
    # Policies free per-episode state at the end (VLA-Cache's keys and values), errors included.
    import bench.runner
    from tests.fakes import CountingPolicy, self_killing_env

    for workers, factory in ((1, fake_env), (2, fake_env), (2, self_killing_env)):
        policy = CountingPolicy()
        monkeypatch.setattr(bench.runner, "make_policy", lambda *args, **kwargs: policy)
        monkeypatch.setenv("FAKE_ENV_KILLED_FLAG", str(tmp_path / f"killed{workers}{factory.__name__}"))
        run = tmp_path / f"run{workers}{factory.__name__}"
        execute(config(workers=workers), run, env_factory=factory, progress=False)
        assert sorted(policy.ended) == sorted(r["key"] for r in read_episodes(run))
        assert len(policy.ended) == 6


def test_a_policy_that_cannot_start_an_episode_makes_it_an_error_and_the_run_goes_on(tmp_path, monkeypatch):
    # As in the serial loop (a served policy whose server went away fails at the reset).
    import bench.runner
    from tests.fakes import CountingPolicy

    class FailsToReset(CountingPolicy):
        def reset(self, episode):
            if episode.episode_id.startswith("libero_goal/1/"):
                raise ConnectionError("no policy server answers")

    for workers in (1, 2):
        policy = FailsToReset()
        monkeypatch.setattr(bench.runner, "make_policy", lambda *args, **kwargs: policy)
        run = tmp_path / f"run{workers}"
        execute(config(workers=workers), run, env_factory=fake_env, progress=False)
        records = {r["key"]: r for r in read_episodes(run)}
        assert len(records) == 6 and sorted(policy.ended) == sorted(records)
        failed = sorted(k for k, r in records.items() if r["outcome"] == "error")
        assert failed == ["libero_goal/1/0", "libero_goal/1/1"]
        assert all(records[k]["error"].startswith("ConnectionError: no policy server answers") for k in failed)

