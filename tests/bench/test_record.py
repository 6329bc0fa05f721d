"""bench record-demos with a fake simulator: what is kept, and resumed recordings."""

import json

import h5py
import pytest

from bench.demos import read_demos
from bench.record import record_demos
from tests.fakes import FakeEnv, write_demo_file

SETTLE = 10


class Envs:
    """Episodes of even tasks succeed after 3 policy steps, of odd tasks never; ``crash`` makes every step fail."""

    def __init__(self, crash=False):
        self.crash = crash

    def __call__(self, task):
        succeed = SETTLE + 3 if task.index % 2 == 0 else None
        return FakeEnv(task, succeed_after=succeed, fail_on_step=SETTLE + 1 if self.crash else None)


def record(out, envs, **kwargs):
    return record_demos("libero_spatial", out, "noop", tasks=[0, 1], max_steps=5, image_size=4, env_factory=envs,
                        progress=False, **kwargs)


def keys(path):
    return [(d.attrs["task_index"], d.attrs["init_state_index"]) for d in read_demos(path, images=False)]


def test_successes_are_recorded_and_failures_listed(tmp_path):
    summary = record(tmp_path / "demos.hdf5", Envs(), init_states=[0, 1])
    assert (summary.attempted, summary.recorded) == (4, 2)
    assert summary.not_recorded == {"libero_spatial/1/0": "failure", "libero_spatial/1/1": "failure"}
    assert keys(tmp_path / "demos.hdf5") == [(0, 0), (0, 1)]
    with h5py.File(tmp_path / "demos.hdf5") as f:
        assert set(json.loads(f["data"].attrs["failed"])) == {"libero_spatial/1/0", "libero_spatial/1/1"}
    with pytest.raises(FileExistsError, match="--resume"):
        record(tmp_path / "demos.hdf5", Envs(), init_states=[0])


def test_a_resumed_recording_runs_only_what_it_lacks_and_ends_as_an_uninterrupted_one(tmp_path):
    whole = tmp_path / "whole.hdf5"
    record(whole, Envs(), init_states=[0, 1, 2])
    out = tmp_path / "out.hdf5"
    first = record(out, Envs(), init_states=[0])
    crashed = record(out, Envs(crash=True), init_states=[0, 1], resume=True)
    assert (crashed.already_done, crashed.attempted, crashed.recorded) == (2, 2, 0)
    assert all(why.startswith("error") for why in crashed.not_recorded.values())
    again = record(out, Envs(), init_states=[0, 1, 2], resume=True)
    # the crashed episodes run again; the failed one of the first call does not
    assert (first.attempted, again.already_done, again.attempted, again.recorded) == (2, 2, 4, 2)
    assert keys(out) == keys(whole) == [(0, 0), (0, 1), (0, 2)]
    for a, b in zip(read_demos(out), read_demos(whole)):
        assert (a.actions == b.actions).all() and a.attrs["seed"] == b.attrs["seed"]


def test_workers_record_what_one_process_records(tmp_path):
    one = record(tmp_path / "one.hdf5", Envs(), init_states=[0, 1, 2])
    two = record(tmp_path / "two.hdf5", Envs(), init_states=[0, 1, 2], workers=2)
    assert (two.attempted, two.recorded, two.not_recorded) == (one.attempted, one.recorded, one.not_recorded)
    # numbered alike, whatever order the workers ended them in
    assert keys(tmp_path / "two.hdf5") == keys(tmp_path / "one.hdf5") == [(0, 0), (0, 1), (0, 2)]
    ours = {(d.attrs["task_index"], d.attrs["init_state_index"]): d for d in read_demos(tmp_path / "two.hdf5")}
    for theirs in read_demos(tmp_path / "one.hdf5"):
        mine = ours[theirs.attrs["task_index"], theirs.attrs["init_state_index"]]
        assert (mine.actions == theirs.actions).all() and (mine.states == theirs.states).all()
        assert mine.attrs["seed"] == theirs.attrs["seed"]
    with h5py.File(tmp_path / "two.hdf5") as f:
        assert set(json.loads(f["data"].attrs["failed"])) == {f"libero_spatial/1/{i}" for i in range(3)}


def test_resume_refuses_other_settings_and_other_files(tmp_path):
    out = tmp_path / "out.hdf5"
    record(out, Envs(), init_states=[0])
    with pytest.raises(ValueError, match="image_size 4 .now 8."):
        record_demos("libero_spatial", out, "noop", tasks=[0], max_steps=5, image_size=8, env_factory=Envs(),
                     progress=False, resume=True)
    with pytest.raises(ValueError, match="seed 0 .now 1."):
        record(out, Envs(), init_states=[0], seed=1, resume=True)
    other = write_demo_file(tmp_path / "other.hdf5", [[[0.1] * 6 + [-1.0]] * 3])
    with pytest.raises(ValueError, match="not written by bench record-demos"):
        record(other, Envs(), init_states=[0], resume=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        record(tmp_path / "none.hdf5", Envs(), init_states=[0], resume=True)
