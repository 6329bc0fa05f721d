"""Training samples from demonstration files: no-ops dropped, gripper convention, chunks, statistics."""

import numpy as np
import pytest

from bench.training_data import TrainingSet, is_noop, kept_steps, normalize, training_actions
from tests.fakes import write_demo_file


def moving(t, gripper=-1.0):
    return [0.1 * np.sin(t), 0.2, -0.3 + 0.01 * t, 0.0, 0.05, 0.0, gripper]


def still(gripper=-1.0):
    return [0, 0, 0, 0, 0, 0, gripper]


def test_noops_are_dropped_by_the_reference_rule():
    actions = np.array([still(), moving(1), still(), still(+1.0), still(+1.0), [3e-5] * 6 + [1.0], moving(2, 1.0)])
    # the first step: the norm alone; later: still AND the gripper as the last kept step's
    assert is_noop(actions[0], None) and not is_noop(actions[3], actions[1])
    np.testing.assert_array_equal(kept_steps(actions), [1, 3, 6])
    np.testing.assert_array_equal(kept_steps(actions, drop_noops=False), np.arange(7))


def test_gripper_actions_become_one_for_open_and_zero_for_close():
    actions = np.array([moving(0, -1.0), moving(1, 1.0), moving(2, 0.3)])
    np.testing.assert_array_equal(training_actions(actions)[:, -1], [1.0, 0.0, 0.7])
    np.testing.assert_array_equal(training_actions(actions)[:, :6], actions[:, :6])


def test_samples_chunks_and_statistics(tmp_path):
    episodes = [[moving(t) for t in range(12)] + [still()] + [moving(t, 1.0) for t in range(12, 20)],
                [still()] * 3 + [moving(t) for t in range(9)]]
    path = write_demo_file(tmp_path / "demos.hdf5", episodes)
    data = TrainingSet([path], chunk_length=8)
    try:
        assert data.dropped_noops == 1 + 3 and [len(e.steps) for e in data.episodes] == [20, 9]
        assert len(data) == (20 - 7) + (9 - 7)  # the last 7 steps of a demonstration start no sample
        kept = np.concatenate([training_actions(np.array(e)[kept_steps(np.array(e))]) for e in episodes])
        stats = data.stats["action"]
        np.testing.assert_allclose(stats["q01"], np.quantile(kept, 0.01, axis=0))
        np.testing.assert_allclose(stats["q99"], np.quantile(kept, 0.99, axis=0))
        assert stats["mask"] == [True] * 6 + [False] and data.stats["num_transitions"] == 29
        assert data.suites == ["libero_spatial"]

        sample = data.sample(len(data) - 1)  # the second demonstration's last chunk: its steps 4..11 of 12
        chunk = training_actions(np.array(episodes[1][4:12]))
        np.testing.assert_allclose(sample["actions"], normalize(chunk, stats))
        assert sample["actions"].shape == (8, 7) and np.abs(sample["actions"]).max() <= 1
        assert sample["instruction"] == "put object 1 on the plate"
        # images of the kept step: its brightness encodes the first action value
        assert sample["images"][0][0, 0, 0] == int(np.clip(128 + 127 * episodes[1][4][0], 0, 255))
        # never-varying action dimensions (here the 4th and 6th) become 0; the gripper stays 0/1
        assert (sample["actions"][:, [3, 5]] == 0).all() and set(sample["actions"][:, 6]) == {1.0}
    finally:
        data.close()


def test_files_that_cannot_be_trained_on_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TrainingSet([tmp_path / "missing.hdf5"], chunk_length=8)
    raw = write_demo_file(tmp_path / "raw.hdf5", [[moving(t) for t in range(10)]], orientation=False)
    with pytest.raises(ValueError, match="not marked upright"):
        TrainingSet([raw], chunk_length=8)
    short = write_demo_file(tmp_path / "short.hdf5", [[moving(t) for t in range(5)]])
    with pytest.raises(ValueError, match="no demonstration is 8 steps long"):
        TrainingSet([short], chunk_length=8)
