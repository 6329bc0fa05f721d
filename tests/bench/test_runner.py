import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.config import RunConfig
from bench.records import EPISODES, RunDirError, read_episodes, read_manifest
from bench.runner import execute
from tests.fakes import FakeEnv

REPO = Path(__file__).resolve().parents[2]


class EnvFactory:
    def __init__(self, **env_kwargs):
        self.env_kwargs = env_kwargs
        self.built: list[FakeEnv] = []

    def __call__(self, task):
        env = FakeEnv(task, **self.env_kwargs)
        self.built.append(env)
        return env


def config(**overrides):
    base = dict(suite="libero_long", policy="random", tasks=[0, 1], episodes_per_task=2, max_steps=20)
    base.update(overrides)
    return RunConfig(**base)


def test_run_records_every_planned_episode(tmp_path):
    factory = EnvFactory()
    summary = execute(config(), tmp_path / "run", env_factory=factory, progress=False)
    records = read_episodes(tmp_path / "run")
    assert [r["key"] for r in records] == ["libero_10/0/0", "libero_10/0/1", "libero_10/1/0", "libero_10/1/1"]
    assert all(r["outcome"] == "failure" and r["steps"] == 20 for r in records)
    assert summary.outcomes == {"success": 0, "failure": 4, "error": 0}
    assert len(factory.built) == 2  # one env per task, reused across its episodes
    assert factory.built[0].closed and factory.built[0].resets == 2
    manifest = read_manifest(tmp_path / "run")
    assert manifest["config"]["suite"] == "libero_10"  # the alias is resolved before recording
    assert manifest["plan"] == [r["key"] for r in records]
    assert manifest["protocol"]["max_steps"] == 20 and manifest["protocol"]["chunk_length"] == 8
    for key in ("python", "numpy", "mujoco", "robosuite", "libero"):
        assert key in manifest["versions"]
    assert "commit" in manifest["code"] and "dirty" in manifest["code"]
    assert len(records[0]["warmup_latency_ms"]) == 1 and records[1]["warmup_latency_ms"] == []


def test_alias_long_means_libero_10_not_90(tmp_path):
    execute(config(suite="libero_long", tasks=[0], episodes_per_task=1), tmp_path / "r", env_factory=EnvFactory(),
            progress=False)
    record = read_episodes(tmp_path / "r")[0]
    assert record["suite"] == "libero_10"
    assert record["task_name"].startswith("LIVING_ROOM_SCENE2_put_both_the_alphabet_soup")


def test_errors_are_recorded_env_rebuilt_and_run_goes_on(tmp_path):
    factory = EnvFactory(fail_on_step=15)
    summary = execute(config(), tmp_path / "run", env_factory=factory, progress=False)
    records = read_episodes(tmp_path / "run")
    assert [r["outcome"] for r in records] == ["error"] * 4
    assert "simulated physics failure" in records[0]["error"]
    assert len(factory.built) == 4  # a fresh env after every error
    assert summary.outcomes["error"] == 4


def test_every_init_state_runs_after_as_many_resets_as_in_one_ordered_loop(tmp_path):
    # LIBERO's scene at a reset depends on the resets before it: init state i must come after i.
    factory = EnvFactory()
    execute(config(tasks=[0], episodes_per_task=None, init_states=[2, 5, 6]), tmp_path / "subset", env_factory=factory, progress=False)
    assert [env.reset_counts for env in factory.built] == [[2, 5, 6]]

    factory = EnvFactory(fail_on_step=15)  # every episode fails, so each finds a rebuilt env
    execute(config(tasks=[0], episodes_per_task=3), tmp_path / "errors", env_factory=factory, progress=False)
    assert [env.reset_counts for env in factory.built] == [[0], [1], [2]]

    run = tmp_path / "resumed"
    execute(config(tasks=[0], episodes_per_task=4), run, env_factory=EnvFactory(), progress=False)
    lines = (run / EPISODES).read_text().splitlines(keepends=True)
    (run / EPISODES).write_text("".join(lines[:2]))  # as if stopped after two episodes
    factory = EnvFactory()
    execute(config(tasks=[0], episodes_per_task=4), run, resume=True, env_factory=factory, progress=False)
    assert [env.reset_counts for env in factory.built] == [[2, 3]]


def test_env_construction_failure_is_an_error(tmp_path, monkeypatch):
    import bench.runner
    from tests.fakes import CountingPolicy

    def factory(task):
        raise OSError("no GL context")

    policy = CountingPolicy()
    monkeypatch.setattr(bench.runner, "make_policy", lambda *args, **kwargs: policy)
    execute(config(tasks=[0], episodes_per_task=1), tmp_path / "run", env_factory=factory, progress=False)
    (record,) = read_episodes(tmp_path / "run")
    assert record["outcome"] == "error" and "no GL context" in record["error"]
    assert policy.ended == [record["key"]]  # its end is told to the policy all the same


def test_resume_runs_only_missing_episodes(tmp_path):
    run = tmp_path / "run"
    execute(config(episodes_per_task=1), run, env_factory=EnvFactory(), progress=False)
    first = read_episodes(run)
    factory = EnvFactory()
    summary = execute(config(episodes_per_task=1), run, resume=True, env_factory=factory, progress=False)
    assert summary.ran_now == 0 and factory.built == []
    assert read_episodes(run) == first
    (resume,) = read_manifest(run)["resumes"]
    assert set(resume) == {"at", "code", "host", "versions"} and resume["host"]["cpus"] >= 1


def test_resume_with_a_different_config_is_refused(tmp_path):
    run = tmp_path / "run"
    execute(config(episodes_per_task=1), run, env_factory=EnvFactory(), progress=False)
    with pytest.raises(RunDirError, match=r"max_steps: recorded 20, now 30"):
        execute(config(episodes_per_task=1, max_steps=30), run, resume=True, env_factory=EnvFactory(), progress=False)
    with pytest.raises(RunDirError, match="policy"):
        execute(config(episodes_per_task=1, policy="noop"), run, resume=True, env_factory=EnvFactory(),
                progress=False)
    assert len(read_episodes(run)) == 2  # nothing recorded is lost


def test_new_run_into_an_existing_run_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    execute(config(episodes_per_task=1), run, env_factory=EnvFactory(), progress=False)
    with pytest.raises(RunDirError, match="--resume"):
        execute(config(episodes_per_task=1), run, env_factory=EnvFactory(), progress=False)


def test_torn_last_line_is_dropped_and_its_episode_rerun(tmp_path):
    run = tmp_path / "run"
    execute(config(), run, env_factory=EnvFactory(), progress=False)
    path = run / EPISODES
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]) + lines[2][:40])  # as if killed while writing the third record
    assert len(read_episodes(run)) == 2
    summary = execute(config(), run, resume=True, env_factory=EnvFactory(), progress=False)
    assert summary.ran_now == 2
    keys = [r["key"] for r in read_episodes(run)]
    assert keys == ["libero_10/0/0", "libero_10/0/1", "libero_10/1/0", "libero_10/1/1"]
    assert all(line.endswith("\n") for line in path.read_text().splitlines(keepends=True))


_KILLABLE_RUN = """
import sys
from bench.config import RunConfig
from bench.runner import execute
from tests.fakes import FakeEnv
cfg = RunConfig(suite="libero_spatial", policy="random", tasks=[0], episodes_per_task=6, max_steps=40)
execute(cfg, sys.argv[1], resume=len(sys.argv) > 2, progress=False,
        env_factory=lambda task: FakeEnv(task, step_seconds=0.01))
"""


def test_sigkill_mid_episode_loses_only_that_episode(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE_RUN, str(run)], cwd=REPO, env=env)
    deadline = time.time() + 60
    while len(read_episodes(run)) < 2 and time.time() < deadline:  # each episode takes ~0.5 s
        time.sleep(0.05)
    time.sleep(0.2)  # now in the middle of an episode
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_episodes(run))
    assert 2 <= done_before < 6
    subprocess.run([sys.executable, "-c", _KILLABLE_RUN, str(run), "resume"], cwd=REPO, env=env, check=True)
    keys = [r["key"] for r in read_episodes(run)]
    assert keys == [f"libero_spatial/0/{i}" for i in range(6)]


def test_records_are_plain_json_lines(tmp_path):
    execute(config(tasks=[0], episodes_per_task=1), tmp_path / "r", env_factory=EnvFactory(), progress=False)
    line = (tmp_path / "r" / EPISODES).read_text().splitlines()[0]
    record = json.loads(line)
    for field in ("suite", "task_index", "task_name", "init_state_index", "outcome", "steps", "queries", "wall_s",
                  "latency_ms", "policy_stats", "error"):
        assert field in record


def test_summarize_stats_means_numbers_and_keeps_the_last_text():
    from bench.runner import summarize_stats

    summary = summarize_stats([
        {"visual_tokens": 80, "tokens_per_layer": [512, 80], "phase": "lift"},
        {"visual_tokens": 90, "tokens_per_layer": [512, 90], "phase": "carry"},
    ])
    assert summary == {"visual_tokens": 85.0, "tokens_per_layer": [512.0, 85.0], "phase": "carry"}


def test_queries_that_paid_a_one_time_cost_stay_out_of_the_latency_summary():
    from types import SimpleNamespace

    from bench.episode import EpisodeResult
    from bench.runner import make_record

    planned = SimpleNamespace(key="libero_10/0/0", suite="libero_10", task_index=0, init_state_index=0)
    task = SimpleNamespace(name="task", instruction="do it")
    result = EpisodeResult("success", steps=4, queries=4, query_latency_ms=[30.0, 900.0, 20.0, 22.0],
                           query_stats=[{}, {"warmup": True}, {"warmup": False}, {}])
    warm = make_record(planned, task, SimpleNamespace(seed=1), result, True, None)
    assert warm["query_latency_ms"] == [30.0, 20.0, 22.0] and warm["warmup_latency_ms"] == [900.0]
    assert warm["latency_ms"]["max"] == 30.0
    first = make_record(planned, task, SimpleNamespace(seed=1), result, False, None)
    assert first["query_latency_ms"] == [20.0, 22.0] and first["warmup_latency_ms"] == [30.0, 900.0]


def test_timings_in_the_policy_stats_average_the_queries_kept_in_the_latency_summary():
    from types import SimpleNamespace

    from bench.episode import EpisodeResult
    from bench.runner import make_record

    planned = SimpleNamespace(key="libero_10/0/0", suite="libero_10", task_index=0, init_state_index=0)
    task = SimpleNamespace(name="task", instruction="do it")
    stats = [{"model_ms": 500.0, "tflops": 2.0}, {"model_ms": 800.0, "warmup": True, "tflops": 2.0},
             {"model_ms": 20.0, "tflops": 3.0}, {"model_ms": 24.0, "tflops": 3.0}]
    result = EpisodeResult("success", steps=4, queries=4, query_latency_ms=[510.0, 810.0, 25.0, 30.0],
                           query_stats=stats)
    record = make_record(planned, task, SimpleNamespace(seed=1), result, False, None)
    assert record["policy_stats"]["model_ms"] == 22.0  # the first query and the capture left out
    assert record["policy_stats"]["tflops"] == 2.5  # other statistics: every query


def test_statistics_that_are_not_finite_are_recorded_as_null(tmp_path, monkeypatch):
    import bench.runner
    from tests.fakes import CountingPolicy

    monkeypatch.setattr(bench.runner, "make_policy", lambda *args, **kwargs: CountingPolicy(
        needs_images=False, stats={"tokens": float("nan"), "per_layer": [1.0, float("inf")], "score": None}))
    execute(config(tasks=[0], episodes_per_task=2), tmp_path / "run", env_factory=EnvFactory(), progress=False)
    records = read_episodes(tmp_path / "run")
    assert len(records) == 2 and {r["outcome"] for r in records} == {"failure"}
    assert records[0]["policy_stats"] == {"tokens": None, "per_layer": [1.0, None], "score": None}


def test_an_episode_that_errs_before_its_first_video_frame_is_recorded(tmp_path):
    def factory(task):
        env = FakeEnv(task)
        env.reset = lambda init_state: (_ for _ in ()).throw(RuntimeError("reset failed"))
        return env

    execute(config(tasks=[0], episodes_per_task=2, video=True), tmp_path / "run", env_factory=factory, progress=False)
    records = read_episodes(tmp_path / "run")
    assert [r["outcome"] for r in records] == ["error", "error"] and "reset failed" in records[0]["error"]
    assert [r["video"] for r in records] == [None, None]
    assert not list((tmp_path / "run" / "videos").glob("*.mp4"))


def test_options_given_on_resume_join_the_recorded_ones_and_the_device_counts_as_resolved(tmp_path):
    from bench.cli import _config_from_args, build_parser
    from bench.records import write_json_atomic

    run = tmp_path / "run"
    run.mkdir()
    recorded = config(policy="oft", policy_args={"size": "tiny", "device": "cpu"})
    write_json_atomic(run / "manifest.json", {"config": recorded.to_dict()})
    args = build_parser().parse_args(["run", "--resume", str(run), "--device", "auto"])
    resumed = _config_from_args(args)
    assert resumed.policy_args == {"size": "tiny", "device": "auto"}
    assert resumed.protocol_differences(recorded) == []  # the policy's identity compares the resolved device
    args = build_parser().parse_args(["run", "--resume", str(run), "--policy-arg", "size=full"])
    assert "policy_args" in _config_from_args(args).protocol_differences(recorded)[0]


def test_model_flags_are_policy_options():
    from bench.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["run", "--suite", "libero_10", "--policy", "lightvla", "--checkpoint", "ckpt",
                                      "--unnorm-key", "libero_10_no_noops", "--action-slice", "release"])
    assert _config_from_args(args).policy_args == {"checkpoint": "ckpt", "unnorm_key": "libero_10_no_noops",
                                                   "action_slice": "release"}
    with pytest.raises(SystemExit):  # argparse names the choices
        build_parser().parse_args(["run", "--action-slice", "last"])


def test_a_run_of_an_earlier_revision_of_its_policy_is_not_resumed_and_a_resumed_run_gains_its_caveat(
        tmp_path, monkeypatch):
    import bench.runner
    from tests.fakes import CountingPolicy

    class WithCaveat(CountingPolicy):
        caveat = "an approximation"

    class Revised(WithCaveat):
        revision = 2

    def run(policy_class):
        monkeypatch.setattr(bench.runner, "make_policy", lambda *args, **kwargs: policy_class(needs_images=False))
        execute(config(tasks=[0], episodes_per_task=1), tmp_path / "run", env_factory=EnvFactory(),
                progress=False, resume=(tmp_path / "run").exists())
        return read_manifest(tmp_path / "run")

    first = run(CountingPolicy)
    assert "revision" not in first["policy"] and first["policy_caveat"] is None
    assert run(WithCaveat)["policy_caveat"] == "an approximation"  # same identity: resumed
    with pytest.raises(RunDirError, match="policy identity"):
        run(Revised)
    assert len(read_episodes(tmp_path / "run")) == 1


def test_retrying_errors_runs_them_again_and_keeps_their_records(tmp_path):
    from bench.analysis import load_results
    from bench.records import RETRIED_ERRORS
    from bench.report import markdown_report

    run = tmp_path / "run"
    execute(config(), run, env_factory=EnvFactory(fail_on_step=15), progress=False)  # every episode an error
    errors = read_episodes(run)
    assert [r["outcome"] for r in errors] == ["error"] * 4
    with pytest.raises(ValueError, match="--resume"):
        execute(config(), tmp_path / "other", env_factory=EnvFactory(), progress=False, retry_errors=True)

    execute(config(), run, resume=True, env_factory=EnvFactory(), progress=False)  # without retrying: nothing runs
    assert read_episodes(run) == errors and not (run / RETRIED_ERRORS).exists()

    summary = execute(config(), run, resume=True, env_factory=EnvFactory(), progress=False, retry_errors=True)
    assert summary.ran_now == 4 and summary.outcomes == {"success": 0, "failure": 4, "error": 0}
    assert [r["key"] for r in read_episodes(run)] == [r["key"] for r in errors]
    assert [json.loads(line) for line in (run / RETRIED_ERRORS).read_text().splitlines()] == errors
    assert read_manifest(run)["resumes"][-1]["retried_errors"] == [r["key"] for r in errors]

    summary = execute(config(), run, resume=True, env_factory=EnvFactory(), progress=False, retry_errors=True)
    assert summary.ran_now == 0 and read_manifest(run)["resumes"][-1]["retried_errors"] == []
    assert len((run / RETRIED_ERRORS).read_text().splitlines()) == 4
    report = markdown_report(load_results(run))
    assert "## Errors run again" in report and "run: 4 episode(s) that ended as errors were run again" in report


def test_errors_retried_again_add_to_the_kept_records(tmp_path):
    from bench.records import RETRIED_ERRORS

    run = tmp_path / "run"
    execute(config(tasks=[0], episodes_per_task=1), run, env_factory=EnvFactory(fail_on_step=15), progress=False)
    for _ in range(2):
        execute(config(tasks=[0], episodes_per_task=1), run, resume=True, env_factory=EnvFactory(fail_on_step=15),
                progress=False, retry_errors=True)
    kept = [json.loads(line) for line in (run / RETRIED_ERRORS).read_text().splitlines()]
    assert [r["key"] for r in kept] == ["libero_10/0/0"] * 2  # the first and the second attempt
    assert [r["outcome"] for r in read_episodes(run)] == ["error"]  # the third


def test_a_run_whose_errors_were_withdrawn_stays_locked(tmp_path):
    from bench.records import EpisodeLog

    run = tmp_path / "run"
    execute(config(tasks=[0], episodes_per_task=1), run, env_factory=EnvFactory(fail_on_step=15), progress=False)
    with EpisodeLog(run) as log:
        assert [r["key"] for r in log.withdraw_errors()] == ["libero_10/0/0"]
        with pytest.raises(RunDirError, match="in use"):
            EpisodeLog(run)
    assert read_episodes(run) == []
