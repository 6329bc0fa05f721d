import h5py
import numpy as np
import pytest

from bench.demos import LOW_DIM_KEYS, DemoWriter, RecordingEnv, read_demos
from bench.episode import SUCCESS, EpisodeSettings, run_episode
from policies import EpisodeInfo, make_policy
from tests.fakes import CountingPolicy, FakeEnv

EPISODE = EpisodeInfo("s/2/7", "s", 2, "task", "do the thing", 7, seed=1)


def test_recording_env_keeps_policy_steps_with_images_and_rewards():
    env = RecordingEnv(FakeEnv(succeed_after=10 + 13), settle_steps=10)
    result = run_episode(env, CountingPolicy(needs_images=False), EPISODE, None,
                         EpisodeSettings(max_steps=40, settle_steps=10, chunk_length=8))
    assert result.outcome == SUCCESS and result.steps == 13
    assert len(env.steps) == 13
    # the state before each policy step: settle steps are not recorded
    assert [s["state"][0] for s in env.steps] == list(range(10, 23))
    assert [s["action"][0] for s in env.steps[:3]] == [0, 1, 2]
    assert [s["reward"] for s in env.steps] == [0.0] * 12 + [1.0]
    assert all(s["agentview_rgb"].shape == (4, 4, 3) for s in env.steps)
    # images were rendered for every recorded step although the policy reads none
    assert env.env.render_flags == [False] * 9 + [True] * 14


def test_writer_and_reader_round_trip(tmp_path):
    path = tmp_path / "demos.hdf5"
    writer = DemoWriter(path, {"suite": "libero_goal", "image_size": 4})
    steps = [{"action": np.full(7, t / 10), "state": np.full(5, t), "reward": float(t == 2),
              "agentview_rgb": np.full((4, 4, 3), t, np.uint8), "eye_in_hand_rgb": np.zeros((4, 4, 3), np.uint8),
              **{k: np.full(3 if k != "gripper_states" else 2, t) for k in LOW_DIM_KEYS}} for t in range(3)]
    writer.add(steps, {"task_index": 4, "init_state_index": 9, "instruction": "put it there"})
    writer.close()
    (demo,) = read_demos(path)
    assert demo.key == "task4_init9" and demo.attrs["num_samples"] == 3
    np.testing.assert_array_equal(demo.actions[:, 0], [0, 0.1, 0.2])
    np.testing.assert_array_equal(demo.dones, [0, 0, 1])
    assert demo.obs["agentview_rgb"].dtype == np.uint8 and demo.obs["agentview_rgb"][2, 0, 0, 0] == 2
    assert "agentview_rgb" not in read_demos(path, images=False)[0].obs
    with h5py.File(path) as f:
        assert f["data"].attrs["num_demos"] == 1 and f["data"].attrs["suite"] == "libero_goal"
        # a frame is read without decompressing its neighbours (training reads frames at random)
        assert f["data/demo_0/obs/agentview_rgb"].chunks == f["data/demo_0/obs/eye_in_hand_rgb"].chunks == (1, 4, 4, 3)
    replay = make_policy("replay", {"path": str(path)})
    replay.reset(EpisodeInfo("e", "libero_goal", 4, "t", "i", 9, 0))
    with pytest.raises(FileExistsError, match="already exists"):  # recorded demonstrations are kept
        DemoWriter(path, {"suite": "libero_goal", "image_size": 4})
    assert len(read_demos(path)) == 1


def few_steps(value: float) -> list[dict]:
    return [{"action": np.full(7, value), "state": np.zeros(5), "reward": 1.0,
             "agentview_rgb": np.zeros((4, 4, 3), np.uint8), "eye_in_hand_rgb": np.zeros((4, 4, 3), np.uint8),
             **{k: np.zeros(3 if k != "gripper_states" else 2) for k in LOW_DIM_KEYS}}]


def test_the_writer_numbers_demonstrations_by_its_order_key_across_resumed_runs(tmp_path):
    path = tmp_path / "demos.hdf5"
    key = lambda attrs: (attrs["task_index"], attrs["init_state_index"])  # noqa: E731
    writer = DemoWriter(path, {"suite": "libero_goal"}, order_key=key)
    for task, init in [(1, 0), (0, 2)]:  # ended out of order
        writer.add(few_steps(10 * task + init), {"task_index": task, "init_state_index": init})
    writer.close()
    writer = DemoWriter(path, {"suite": "libero_goal"}, append=True, order_key=key)  # resumed
    writer.add(few_steps(1), {"task_index": 0, "init_state_index": 1})
    writer.close()
    demos = read_demos(path)
    assert [d.name for d in demos] == ["demo_0", "demo_1", "demo_2"]
    assert [key(d.attrs) for d in demos] == [(0, 1), (0, 2), (1, 0)]
    assert [d.actions[0, 0] for d in demos] == [1, 2, 10]  # each group moved with its data
    with h5py.File(path) as f:
        assert f["data"].attrs["num_demos"] == 3 and sorted(f["data"]) == ["demo_0", "demo_1", "demo_2"]


def test_a_renumbering_cut_short_loses_nothing_and_the_next_run_completes_it(tmp_path):
    path = tmp_path / "demos.hdf5"
    key = lambda attrs: attrs["task_index"]  # noqa: E731
    writer = DemoWriter(path, {"suite": "libero_goal"})
    for task in (2, 1, 0):
        writer.add(few_steps(task), {"task_index": task, "init_state_index": 0})
    writer.close()
    with h5py.File(path, "r+") as f:  # killed after the first pass's first move
        f["data"].move("demo_2", "demo_2_as_0")
    assert sorted(d.attrs["task_index"] for d in read_demos(path)) == [0, 1, 2]
    writer = DemoWriter(path, {"suite": "libero_goal"}, append=True, order_key=key)
    writer.add(few_steps(3), {"task_index": 3, "init_state_index": 0})  # demo_3: a free name
    writer.close()
    demos = read_demos(path)
    assert [d.name for d in demos] == [f"demo_{i}" for i in range(4)]
    assert [d.attrs["task_index"] for d in demos] == [d.actions[0, 0] for d in demos] == [0, 1, 2, 3]


def test_reading_a_file_that_is_no_demo_file(tmp_path):
    path = tmp_path / "other.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(ValueError, match="no 'data' group"):
        read_demos(path)
