import json
import os
import signal

import h5py
import numpy as np
import pytest

from bench.cli import main
from bench.demos import read_demos
from bench.regenerate import regenerate_demos, source_files
from bench.training_data import TrainingSet
from suites import get_suite
from tests.fakes import FakeEnv, ResetLoggingEnv, write_demo_file, write_libero_source_file

SUITE = get_suite("libero_spatial")
SETTLE = SUITE.settle_steps
STILL_OPEN = [0, 0, 0, 0, 0, 0, -1.0]


def moves(n, start=0.0):
    """n actions that move the arm, each distinct."""
    return [[start + 0.01 * (i + 1), 0, 0, 0, 0, 0, -1.0] for i in range(n)]


# A teleoperated demonstration: a pause before the operator starts, a pause mid-way, the gripper
# closing while the arm stands still (kept: the gripper command changes) and holding shut.
TELEOP = np.array([STILL_OPEN] * 3 + moves(4) + [STILL_OPEN] * 2 + [[0, 0, 0, 0, 0, 0, 1.0]]
                  + [[0, 0, 0, 0, 0, 0, 1.0]] * 2 + [[0.05, 0, 0.02, 0, 0, 0, 1.0]] * 3)
KEPT = [3, 4, 5, 6, 9, 12, 13, 14]


def source_dir(tmp_path, task_actions, task_index=0, name=None):
    """LIBERO's file for a task of libero_spatial, named as LIBERO names it."""
    task = SUITE.task(task_index)
    folder = tmp_path / "libero_spatial"
    folder.mkdir(exist_ok=True)
    demos = [(actions, np.full((len(actions), 5), float(d))) for d, actions in enumerate(task_actions)]
    write_libero_source_file(folder / (name or f"{task.name}_demo.hdf5"), demos, instruction=task.instruction)
    return folder


class Envs:
    """The env factory: FakeEnvs that reach the goal after ``kept`` policy steps, kept for inspection."""

    def __init__(self, succeed_after_policy_steps=None, fail_on_step=None, env_class=FakeEnv):
        self.succeed_after = succeed_after_policy_steps
        self.fail_on_step = fail_on_step
        self.env_class = env_class
        self.built = []

    def __call__(self, task):
        after = None if self.succeed_after is None else SETTLE + self.succeed_after
        env = self.env_class(task, succeed_after=after, fail_on_step=self.fail_on_step)
        self.built.append(env)
        return env


def run(sources, out, envs, **kwargs):
    return regenerate_demos("libero_spatial", [sources], out, env_factory=envs, progress=False, **kwargs)


def test_noops_are_neither_executed_nor_recorded(tmp_path):
    envs = Envs(succeed_after_policy_steps=len(KEPT))
    summary = run(source_dir(tmp_path, [TELEOP]), tmp_path / "out.hdf5", envs)
    assert (summary.attempted, summary.recorded, summary.skipped_noops) == (1, 1, len(TELEOP) - len(KEPT))
    executed = np.array(envs.built[0].actions)
    assert np.array_equal(executed[:SETTLE], [STILL_OPEN] * SETTLE)
    assert np.array_equal(executed[SETTLE:], TELEOP[KEPT])
    (demo,) = read_demos(tmp_path / "out.hdf5")
    assert np.array_equal(demo.actions, TELEOP[KEPT])
    # each step keeps the observation before it: the fake env's proprio counts the steps taken
    assert demo.obs["ee_pos"][:, 0].tolist() == list(range(SETTLE, SETTLE + len(KEPT)))
    assert demo.obs["agentview_rgb"].shape == (len(KEPT), 4, 4, 3)
    assert demo.attrs["source_demo"] == "demo_0" and demo.attrs["skipped_noops"] == len(TELEOP) - len(KEPT)
    assert demo.attrs["instruction"] == SUITE.task(0).instruction and demo.attrs["task_index"] == 0
    assert np.array_equal(demo.attrs["init_state"], np.zeros(5))


def test_keep_noops_replays_every_action(tmp_path):
    envs = Envs(succeed_after_policy_steps=len(TELEOP))
    summary = run(source_dir(tmp_path, [TELEOP]), tmp_path / "out.hdf5", envs, drop_noops=False)
    assert (summary.recorded, summary.skipped_noops) == (1, 0)
    assert np.array_equal(np.array(envs.built[0].actions)[SETTLE:], TELEOP)
    with h5py.File(tmp_path / "out.hdf5") as f:
        assert not f["data"].attrs["drop_noops"]


def test_the_training_set_reads_a_regenerated_file_and_drops_nothing_more(tmp_path):
    run(source_dir(tmp_path, [TELEOP]), tmp_path / "out.hdf5", Envs(len(KEPT)))
    data = TrainingSet([tmp_path / "out.hdf5"], chunk_length=4)
    try:
        assert data.dropped_noops == 0 and len(data) == len(KEPT) - 3
    finally:
        data.close()


def test_a_replay_whose_goal_does_not_hold_after_its_last_action_is_left_out(tmp_path):
    # the goal holds after 4 of 8 kept actions, as in a demonstration whose objects move again
    class GoalLost(Envs):
        def __call__(self, task):
            env = super().__call__(task)
            env.step = lambda action, render, step=env.step: step(action, render) and len(env.actions) == SETTLE + 4
            return env

    out = tmp_path / "out.hdf5"
    summary = run(source_dir(tmp_path, [TELEOP, TELEOP[3:]]), out, GoalLost(4))
    assert summary.recorded == 0 and set(summary.not_recorded) == {"task0/demo_0", "task0/demo_1"}
    assert all(why.startswith("failure") for why in summary.not_recorded.values())
    with h5py.File(out) as f:
        assert set(json.loads(f["data"].attrs["failed"])) == {"task0/demo_0", "task0/demo_1"}


def test_demonstration_i_is_replayed_after_i_resets_even_after_a_crash(tmp_path, monkeypatch):
    envs = Envs(len(KEPT))
    folder = source_dir(tmp_path, [TELEOP] * 4)
    with h5py.File(next(folder.glob("*.hdf5")), "r+") as f:  # demo_1's first action crashes the fake env
        f["data/demo_1/actions"][0, 0] = 0.5
    step = FakeEnv.step

    def crash(self, action, render):
        if action[0] == 0.5:
            raise RuntimeError("simulated physics failure")
        return step(self, action, render)

    monkeypatch.setattr(FakeEnv, "step", crash)
    summary = run(folder, tmp_path / "out.hdf5", envs)
    assert summary.recorded == 3 and list(summary.not_recorded) == ["task0/demo_1"]
    assert summary.not_recorded["task0/demo_1"].startswith("error: RuntimeError: simulated physics failure")
    assert [count for env in envs.built for count in env.reset_counts] == [0, 1, 2, 3]
    assert len(envs.built) == 2  # rebuilt after the crash
    assert [d.attrs["source_demo"] for d in read_demos(tmp_path / "out.hdf5")] == ["demo_0", "demo_2", "demo_3"]


def test_workers_record_what_one_process_records_each_replay_after_as_many_resets_as_its_index(tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setenv("FAKE_ENV_RESET_LOG", str(tmp_path / "resets"))
    sources = tmp_path / "sources"
    sources.mkdir()
    for task in (0, 1):  # demo_2 of each stops before the goal holds
        source_dir(sources, [TELEOP, TELEOP, TELEOP[:12], TELEOP], task_index=task)
    folder = sources / "libero_spatial"
    one = run(folder, tmp_path / "one.hdf5", Envs(len(KEPT)))
    two = run(folder, tmp_path / "two.hdf5", Envs(len(KEPT), env_class=ResetLoggingEnv), workers=2)
    assert (two.attempted, two.recorded, two.skipped_noops) == (one.attempted, one.recorded, one.skipped_noops) == (
        8, 6, 6 * (len(TELEOP) - len(KEPT)))
    assert two.not_recorded == one.not_recorded and set(two.not_recorded) == {"task0/demo_2", "task1/demo_2"}
    resets = sorted(tuple(line.split()) for line in (tmp_path / "resets").read_text().splitlines())
    assert resets == sorted((SUITE.task(t).key, str(i)) for t in (0, 1) for i in range(4))

    def by_key(path):
        return {(d.attrs["task_index"], d.attrs["source_demo"]): d for d in read_demos(path)}

    ours, theirs = by_key(tmp_path / "two.hdf5"), by_key(tmp_path / "one.hdf5")
    assert list(ours) == list(theirs) and len(ours) == 6  # numbered alike, whatever order they ended in
    for key, demo in ours.items():
        assert np.array_equal(demo.actions, theirs[key].actions)
        assert np.array_equal(demo.obs["ee_pos"], theirs[key].obs["ee_pos"])
    with h5py.File(tmp_path / "two.hdf5") as f:
        assert set(json.loads(f["data"].attrs["failed"])) == {"task0/demo_2", "task1/demo_2"}


class KillsItsProcessInDemo1(FakeEnv):
    """Dies (SIGKILL) in the middle of the replay that follows one reset: demo_1's."""

    def step(self, action, render):
        if self.reset_counts[-1] == 1 and len(self.actions) == 15:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(action, render)


def test_a_worker_that_dies_costs_its_replay_only_and_resume_replays_it(tmp_path):
    folder = source_dir(tmp_path, [TELEOP] * 4)
    out = tmp_path / "out.hdf5"
    summary = run(folder, out, Envs(len(KEPT), env_class=KillsItsProcessInDemo1), workers=2)
    assert summary.recorded == 3 and summary.not_recorded == {"task0/demo_1": "error: worker process died (exit code -9)"}
    again = run(folder, out, Envs(len(KEPT)), resume=True, workers=2)
    assert (again.already_done, again.attempted, again.recorded) == (3, 1, 1)
    assert [d.attrs["source_demo"] for d in read_demos(out)] == [f"demo_{i}" for i in range(4)]


def test_resume_adds_what_is_missing_and_tries_crashed_replays_again(tmp_path):
    folder = source_dir(tmp_path, [TELEOP, TELEOP, TELEOP[:12]])  # demo_2 stops before the goal
    whole = tmp_path / "whole.hdf5"
    run(folder, whole, Envs(len(KEPT)))

    out = tmp_path / "out.hdf5"
    first = run(folder, out, Envs(len(KEPT)), demos_per_task=1)
    assert (first.attempted, first.recorded) == (1, 1)
    crashed = run(folder, out, Envs(len(KEPT), fail_on_step=SETTLE + 2), resume=True)
    assert crashed.already_done == 1 and crashed.recorded == 0
    assert crashed.not_recorded["task0/demo_1"].startswith("error") and crashed.not_recorded["task0/demo_2"].startswith("error")
    again = run(folder, out, Envs(len(KEPT)), resume=True)
    assert (again.already_done, again.attempted, again.recorded) == (1, 2, 1)
    assert list(again.not_recorded) == ["task0/demo_2"]
    last = run(folder, out, Envs(len(KEPT)), resume=True)  # the failed replay is not tried again
    assert (last.already_done, last.attempted) == (3, 0)
    ours, theirs = read_demos(out), read_demos(whole)
    assert [d.attrs["source_demo"] for d in ours] == [d.attrs["source_demo"] for d in theirs] == ["demo_0", "demo_1"]
    for a, b in zip(ours, theirs):
        assert np.array_equal(a.actions, b.actions) and np.array_equal(a.obs["ee_pos"], b.obs["ee_pos"])


def test_resume_refuses_other_settings_and_other_files(tmp_path):
    folder = source_dir(tmp_path, [TELEOP])
    out = tmp_path / "out.hdf5"
    run(folder, out, Envs(len(KEPT)), image_size=64)
    with pytest.raises(FileExistsError, match="--resume"):
        run(folder, out, Envs(len(KEPT)), image_size=64)
    with pytest.raises(ValueError, match="image_size 64 .now 128"):
        run(folder, out, Envs(len(KEPT)), image_size=128, resume=True)
    with pytest.raises(ValueError, match="drop_noops True .now False"):
        run(folder, out, Envs(len(KEPT)), image_size=64, drop_noops=False, resume=True)
    source = next(folder.glob("*.hdf5"))
    with h5py.File(source, "r+") as f:  # the source changes after its replays were recorded
        f["data/demo_0/actions"][5, 0] = 0.07
    with pytest.raises(ValueError, match="source files changed since .*out.hdf5 was begun: " + source.name):
        run(folder, out, Envs(len(KEPT)), image_size=64, resume=True)
    recorded = write_demo_file(tmp_path / "recorded.hdf5", [TELEOP])
    with pytest.raises(ValueError, match="not written by bench regenerate-demos"):
        run(folder, recorded, Envs(len(KEPT)), resume=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(folder, tmp_path / "none.hdf5", Envs(len(KEPT)), resume=True)


def test_files_are_matched_to_tasks_by_name_or_by_the_task_file_they_record(tmp_path):
    folder = source_dir(tmp_path, [TELEOP], task_index=3)
    task = SUITE.task(5)
    write_libero_source_file(folder / "renamed.hdf5", [(TELEOP, np.zeros((len(TELEOP), 5)))],
                             instruction=task.instruction,
                             bddl_file_name=f"chiliocosm/bddl_files/libero_spatial/{task.name}.bddl")
    files = source_files(SUITE, [folder])
    assert list(files) == [3, 5] and files[5].name == "renamed.hdf5"
    summary = run(folder, tmp_path / "out.hdf5", Envs(len(KEPT)), tasks=[5])
    assert summary.recorded == 1 and read_demos(tmp_path / "out.hdf5")[0].attrs["task_index"] == 5
    with pytest.raises(ValueError, match=r"no demonstration file for task\(s\) \[4\]"):
        run(folder, tmp_path / "other.hdf5", Envs(len(KEPT)), tasks=[4, 5])


def test_sources_that_cannot_be_used_are_refused_by_name(tmp_path):
    stray = tmp_path / "stray"
    stray.mkdir()
    write_libero_source_file(stray / "open_the_door_demo.hdf5", [(TELEOP, np.zeros((len(TELEOP), 5)))])
    with pytest.raises(ValueError, match="open_the_door_demo.hdf5 is not a demonstration file of a libero_spatial task"):
        source_files(SUITE, [stray])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        source_files(SUITE, [tmp_path / "missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .hdf5 files"):
        source_files(SUITE, [empty])

    folder = source_dir(tmp_path, [TELEOP])
    name = f"{SUITE.task(0).name}_demo.hdf5"
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ValueError, match="two files hold task 0"):
        source_files(SUITE, [folder, twin / name])

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    write_libero_source_file(wrong / name, [(TELEOP, np.zeros((len(TELEOP), 5)))], instruction="stack the cups")
    with pytest.raises(ValueError, match="records the instruction 'stack the cups'"):
        run(wrong, tmp_path / "out.hdf5", Envs(len(KEPT)))

    ours = tmp_path / "ours"
    ours.mkdir()
    write_demo_file(ours / name, [TELEOP])
    with pytest.raises(ValueError, match="train on it as it is"):
        run(ours, tmp_path / "out.hdf5", Envs(len(KEPT)))

    nan = tmp_path / "nan"
    nan.mkdir()
    bad = TELEOP.copy()
    bad[5, 2] = np.nan
    write_libero_source_file(nan / name, [(bad, np.zeros((len(bad), 5)))], instruction=SUITE.task(0).instruction)
    with pytest.raises(ValueError, match="demo_0's actions hold NaN"):
        run(nan, tmp_path / "out.hdf5", Envs(len(KEPT)))
    assert not (tmp_path / "out.hdf5").exists()


def test_the_cli_names_a_missing_source(tmp_path, capsys):
    assert main(["regenerate-demos", "--suite", "libero_spatial", "--source", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "out.hdf5"), "--no-progress"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_the_replay_policy_refuses_a_regenerated_file_by_name(tmp_path):
    from policies import make_policy
    from policies.base import PolicyOptionError

    run(source_dir(tmp_path, [TELEOP]), tmp_path / "out.hdf5", Envs(len(KEPT)))
    # its demonstrations start from LIBERO's recorded states, not from an evaluation init state
    with pytest.raises(PolicyOptionError, match="no demonstration recorded from an evaluation init state"):
        make_policy("replay", {"path": str(tmp_path / "out.hdf5")})


def test_an_interrupted_regeneration_says_how_to_continue(tmp_path, capsys, monkeypatch):
    import bench.regenerate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.regenerate, "regenerate_demos", interrupted)
    assert main(["regenerate-demos", "--suite", "libero_spatial", "--source", str(tmp_path),
                 "--out", str(tmp_path / "out.hdf5"), "--no-progress"]) == 130
    assert "Continue with: the same command with --resume" in capsys.readouterr().err
