import numpy as np
import pytest

from policies import EpisodeInfo, Observation, make_policy
from policies.base import PolicyOptionError
from policies.registry import UnknownPolicyError, list_policies


def episode(task=0, init=0, seed=5, eid=None):
    return EpisodeInfo(eid or f"s/{task}/{init}", "s", task, "t", "i", init, seed)


def obs(eid="s/0/0"):
    return Observation(proprio=np.zeros(8), instruction="i", episode_id=eid)


def test_noop_holds_still_with_open_gripper():
    policy = make_policy("noop", {"chunk_length": "4"})
    (out,) = policy.act([obs()])
    assert out.actions.shape == (4, 7)
    np.testing.assert_array_equal(out.actions[:, :6], 0)
    np.testing.assert_array_equal(out.actions[:, 6], -1)
    assert not policy.needs_images


def test_random_is_reproducible_per_episode_and_bounded():
    a, b = make_policy("random", {"scale": "0.5"}), make_policy("random", {"scale": "0.5"})
    a.reset(episode(seed=1))
    b.reset(episode(seed=1))
    chunk_a, chunk_b = a.act([obs()])[0].actions, b.act([obs()])[0].actions
    np.testing.assert_array_equal(chunk_a, chunk_b)
    assert np.all(np.abs(chunk_a[:, :6]) <= 0.5)
    assert set(np.unique(chunk_a[:, 6])) <= {-1.0, 1.0}
    b.reset(episode(seed=2))
    assert not np.array_equal(chunk_a, b.act([obs()])[0].actions)


def test_replay_npz_by_task_and_init(tmp_path):
    actions = np.arange(10 * 7, dtype=float).reshape(10, 7) / 100
    path = tmp_path / "demos.npz"
    np.savez(path, task3_init2=actions, task3=-actions)
    policy = make_policy("replay", {"path": str(path), "chunk_length": "4"})
    policy.reset(episode(task=3, init=2))
    chunks = [policy.act([obs("s/3/2")])[0].actions for _ in range(3)]
    np.testing.assert_array_equal(np.vstack(chunks)[:10], actions)
    # after the recording: hold still, keep the last gripper command
    np.testing.assert_array_equal(chunks[2][2:, :6], 0)
    np.testing.assert_array_equal(chunks[2][2:, 6], actions[-1, 6])
    policy.reset(episode(task=3, init=9, eid="s/3/9"))
    np.testing.assert_array_equal(policy.act([obs("s/3/9")])[0].actions, -actions[:4])
    with pytest.raises(KeyError, match="task4_init0"):
        policy.reset(episode(task=4))
    assert len(policy.identity()["sha256"]) == 64


def test_replay_errors_name_the_problem(tmp_path):
    with pytest.raises(PolicyOptionError, match="needs --policy-arg path"):
        make_policy("replay")
    with pytest.raises(PolicyOptionError, match="not found"):
        make_policy("replay", {"path": str(tmp_path / "missing.npy")})
    np.save(tmp_path / "bad.npy", np.zeros((5, 6)))
    with pytest.raises(PolicyOptionError, match=r"shape \(5, 6\)"):
        make_policy("replay", {"path": str(tmp_path / "bad.npy")})
    for name in ("junk.npy", "junk.npz", "junk.hdf5"):
        (tmp_path / name).write_text("not an array file")
        with pytest.raises(PolicyOptionError, match=f"replay file .*{name} cannot be read"):
            make_policy("replay", {"path": str(tmp_path / name)})


def test_registry_and_option_parsing():
    names = [name for name, _ in list_policies()]
    assert {"noop", "random", "replay"} <= set(names)
    with pytest.raises(UnknownPolicyError, match="valid policies: noop"):
        make_policy("openvla-9000")
    with pytest.raises(PolicyOptionError, match="option chunk_length='x'"):
        make_policy("noop", {"chunk_length": "x"})
    with pytest.raises(PolicyOptionError, match="its options are: chunk_length, scale"):
        make_policy("random", {"speed": "1"})
    assert make_policy("random", {"scale": "0.25"}).identity() == {
        "name": "random", "options": {"chunk_length": 8, "scale": 0.25}}
