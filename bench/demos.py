"""Demonstrations in LIBERO's HDF5 layout: record a policy's successful episodes, read them back.

    data/                      attrs: suite, policy, image_size, image_orientation, versions, created_at
      demo_0/                  attrs: instruction, suite, task_index, task_name, init_state_index,
                                      init_state, seed, num_samples
        actions  (T, 7)        action executed at step t
        states   (T, S)        flattened simulator state before step t
        rewards  (T,)          1 at the step the goal holds, else 0
        dones    (T,)
        obs/agentview_rgb      (T, H, W, 3) uint8, before step t
        obs/eye_in_hand_rgb    (T, H, W, 3) uint8
        obs/ee_pos (T, 3), obs/ee_ori (T, 3, axis-angle), obs/gripper_states (T, 2), obs/joint_states (T, 7)

Images are stored upright (rotated 180 degrees from the raw render), as the policies see them.
Only the steps that are recorded render images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

IMAGE_ORIENTATION = "upright (raw robosuite render rotated 180 degrees)"
LOW_DIM_KEYS = ("ee_pos", "ee_ori", "gripper_states", "joint_states")
JPEG_IMAGE_SOURCE = "jpeg"  # file attribute image_source: images decoded from stored JPEG files (bench.rlds)
FAILED_ATTR = "failed"  # file attribute: JSON {attempt: why} of the attempts that gave no demonstration


@dataclass
class Demo:
    attrs: dict
    actions: np.ndarray
    states: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    obs: dict[str, np.ndarray] = field(default_factory=dict)
    name: str = ""  # its group in the file, e.g. demo_3

    @property
    def key(self) -> str:
        return f"task{self.attrs['task_index']}_init{self.attrs['init_state_index']}"


class RecordingEnv:
    """Wraps an env and keeps, for every policy step, the state and observation before it and the action.

    It renders the cameras for every recorded step (and the last settling step, whose
    observation is the first recorded one), whatever the episode loop asks for.
    """

    def __init__(self, env, settle_steps: int):
        self.env = env
        self.settle_steps = settle_steps
        self.steps: list[dict] = []
        self._t = 0

    def reset(self, init_state) -> None:
        self.env.reset(init_state)
        self.steps = []
        self._t = 0

    @property
    def resets(self) -> int:
        return getattr(self.env, "resets", 0)

    def skip_resets(self, count: int) -> None:
        """As the wrapped env (demonstrations start from the evaluation's scenes)."""
        if hasattr(self.env, "skip_resets"):
            self.env.skip_resets(count)

    def step(self, action, render: bool) -> bool:
        recorded = self._t >= self.settle_steps
        if recorded:
            obs = self.env.observe(images=True)
            self.steps.append({
                "action": np.asarray(action, dtype=np.float64),
                "state": self.env.sim_state(),
                "agentview_rgb": obs["images"]["agentview"],
                "eye_in_hand_rgb": obs["images"]["wrist"],
                **self.env.robot_state(),
            })
        done = self.env.step(action, render=render or self._t >= self.settle_steps - 1)
        if recorded:
            self.steps[-1]["reward"] = float(done)
        self._t += 1
        return done

    def observe(self, images: bool, privileged: bool = False) -> dict:
        return self.env.observe(images=images, privileged=privileged)

    def close(self) -> None:
        self.env.close()


class RecordingFactory:
    """Builds ``factory``'s envs wrapped in ``RecordingEnv``; picklable (for worker processes)
    where ``factory`` is."""

    def __init__(self, factory, settle_steps: int):
        self.factory = factory
        self.settle_steps = settle_steps

    def __call__(self, task) -> RecordingEnv:
        return RecordingEnv(self.factory(task), self.settle_steps)


class DemoWriter:
    """Writes demonstrations one by one, flushed after each. ``append``: add to an existing file
    (a resumed run), whose attributes ``file_attrs`` then update.

    With ``order_key`` (a demonstration's attributes -> a sort key), ``close`` numbers the
    demonstrations in that order: worker processes end them in an order that depends on timing,
    and a resumed run appends, yet the file should not depend on either."""

    def __init__(self, path: Path, file_attrs: dict, append: bool = False,
                 order_key: Callable[[dict], tuple] | None = None):
        import h5py

        self.path = Path(path)
        self.order_key = order_key
        if append:
            self._file = h5py.File(self.path, "r+")
            self._data = self._file["data"]
        else:
            if self.path.exists():  # demonstrations take long to record: never overwrite them
                raise FileExistsError(f"{self.path} already exists; choose another --out or remove it first")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self.path, "w-")
            self._data = self._file.create_group("data")
        for key, value in file_attrs.items():
            self._data.attrs[key] = value
        self.count = len(self._data)

    def add(self, steps: list[dict], attrs: dict) -> None:
        if not steps:
            raise ValueError("a demonstration needs at least one step")
        group = self._data.create_group(f"demo_{self.count}")
        rewards = np.array([s["reward"] for s in steps])
        group.create_dataset("actions", data=np.stack([s["action"] for s in steps]))
        group.create_dataset("states", data=np.stack([s["state"] for s in steps]))
        group.create_dataset("rewards", data=rewards)
        group.create_dataset("dones", data=(rewards > 0).astype(np.uint8))
        obs = group.create_group("obs")
        for key in ("agentview_rgb", "eye_in_hand_rgb"):
            frames = np.stack([s[key] for s in steps])
            # a chunk per frame: training reads single frames in random order (13x faster than
            # h5py's default chunks of 17 frames' tiles at 256x256, for a 50% larger file)
            obs.create_dataset(key, data=frames, chunks=(1, *frames.shape[1:]), compression="gzip",
                               compression_opts=4)
        for key in LOW_DIM_KEYS:
            obs.create_dataset(key, data=np.stack([s[key] for s in steps]))
        for key, value in {**attrs, "num_samples": len(steps)}.items():
            group.attrs[key] = value
        self._file.flush()
        self.count += 1

    def set_file_attr(self, key: str, value) -> None:
        self._data.attrs[key] = value
        self._file.flush()

    def close(self) -> None:
        if self.order_key is not None:
            self._renumber()
        self._data.attrs["num_demos"] = self.count
        self._file.close()

    def _renumber(self) -> None:
        """demo_0, demo_1, ... in ``order_key`` order. Renaming moves links, not data; the names
        in between (demo_3_as_0) stay unique, so a process killed halfway leaves every
        demonstration readable and a resumed run's next name (demo_<count>) free."""
        names = sorted(self._data, key=demo_number)
        wanted = sorted(names, key=lambda name: self.order_key(dict(self._data[name].attrs)))
        if wanted == names:
            return
        for i, name in enumerate(wanted):
            self._data.move(name, f"{name}_as_{i}")
        for i, name in enumerate(wanted):
            self._data.move(f"{name}_as_{i}", f"demo_{i}")
        self._file.flush()


def demo_number(name: str) -> int:
    """i of a group demo_i (or of demo_i_as_j, a name a renumbering was interrupted in)."""
    return int(name.split("_")[1])


def settled_attempts(path: Path, command: str, settings: dict, key_of: Callable[[dict], str]) -> dict[str, str]:
    """What a resumed recording into ``path`` need not try again: its demonstrations (keyed by
    ``key_of(their attributes)``) and its failures, which would fail again; attempts that crashed
    are not in the file and are tried again. Refuses a file ``command`` did not write, or wrote
    with other ``settings`` (file attributes)."""
    import h5py

    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist")
    with h5py.File(path, "r") as f:
        if "data" not in f or f["data"].attrs.get("command") != command:
            raise ValueError(f"--resume: {path} was not written by bench {command}")
        data = f["data"]
        plain = lambda v: v.item() if isinstance(v, np.generic) else v  # noqa: E731
        differing = [f"{k} {plain(data.attrs.get(k))!r} (now {v!r})" for k, v in settings.items()
                     if plain(data.attrs.get(k)) != v]
        if differing:
            raise ValueError(f"--resume: {path} was written with other settings: {', '.join(differing)}")
        settled = {key_of(dict(g.attrs)): "recorded" for g in data.values()}
        settled.update(json.loads(data.attrs.get(FAILED_ATTR, "{}")))
    return settled


def read_demos(path: str | Path, images: bool = True) -> list[Demo]:
    """Every demonstration in the file; ``images=False`` skips the (large) camera arrays."""
    import h5py

    demos = []
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path} is not a demonstration file: it has no 'data' group")
        names = sorted(f["data"], key=demo_number)
        for name in names:
            g = f["data"][name]
            demos.append(Demo(
                attrs=dict(g.attrs),
                actions=g["actions"][()],
                states=g["states"][()],
                rewards=g["rewards"][()],
                dones=g["dones"][()],
                obs={key: g["obs"][key][()] for key in g["obs"] if images or not key.endswith("_rgb")},
                name=name,
            ))
    return demos
