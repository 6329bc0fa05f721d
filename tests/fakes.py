"""A simulator-free env and policies for testing the harness logic quickly."""

from __future__ import annotations

import time

import numpy as np

from policies.base import Policy, PolicyOutput
from suites.registry import TaskSpec


class FakeEnv:
    """Counts steps; reports success after ``succeed_after`` policy steps (None: never).

    Records every action and whether it was asked to render, so tests can check the loop.
    """

    def __init__(self, task: TaskSpec | None = None, succeed_after: int | None = None, fail_on_step: int | None = None,
                 step_seconds: float = 0.0):
        self.task = task
        self.succeed_after = succeed_after
        self.fail_on_step = fail_on_step
        self.step_seconds = step_seconds
        self.actions: list[np.ndarray] = []
        self.render_flags: list[bool] = []
        self.resets = 0
        self.reset_counts: list[int] = []
        self.closed = False
        self._rendered_last = False
        self._t = 0

    def reset(self, init_state) -> None:
        self.resets += 1
        self.reset_counts.append(self.resets - 1)  # resets before this episode's
        self.actions.clear()
        self.render_flags.clear()
        self._t = 0
        self._rendered_last = False

    def skip_resets(self, count: int) -> None:
        self.resets += count

    def step(self, action, render: bool) -> bool:
        if self.fail_on_step is not None and len(self.actions) == self.fail_on_step:
            raise RuntimeError("simulated physics failure")
        if self.step_seconds:
            time.sleep(self.step_seconds)
        self.actions.append(np.array(action))
        self.render_flags.append(render)
        self._rendered_last = render
        self._t += 1
        return self.succeed_after is not None and self._t >= self.succeed_after

    def observe(self, images: bool, privileged: bool = False) -> dict:
        obs = {"proprio": np.full(8, float(self._t)), "instruction": "do the thing"}
        if images:
            if not self._rendered_last:
                raise RuntimeError("images requested but the last step did not render them")
            obs["images"] = {"agentview": np.zeros((4, 4, 3), np.uint8), "wrist": np.zeros((4, 4, 3), np.uint8)}
        return obs

    def sim_state(self) -> np.ndarray:
        return np.array([float(self._t)])

    def robot_state(self) -> dict:
        return {"ee_pos": np.full(3, self._t), "ee_ori": np.zeros(3), "gripper_states": np.zeros(2),
                "joint_states": np.zeros(7)}

    def close(self) -> None:
        self.closed = True


class CountingPolicy(Policy):
    """Chunk i holds actions whose first component encodes (query, position) = 10*i + j."""

    name = "counting"
    needs_images = True

    def __init__(self, chunk: int = 8, stats: dict | None = None, bad_output=None, needs_images: bool = True):
        super().__init__(Policy.Options(chunk_length=chunk))
        self.queries = 0
        self.stats = stats or {}
        self.bad_output = bad_output
        self.needs_images = needs_images
        self.seen: list = []
        self.ended: list[str] = []

    def end(self, episode):
        self.ended.append(episode.episode_id)

    def act(self, observations):
        outputs = []
        for obs in observations:
            self.seen.append(obs)
            if self.bad_output is not None and self.queries == 1:
                chunk = self.bad_output
            else:
                chunk = np.zeros((self.chunk_length, 7))
                chunk[:, 0] = 10 * self.queries + np.arange(self.chunk_length)
            self.queries += 1
            outputs.append(PolicyOutput(chunk, dict(self.stats)))
        return outputs


# Module-level env factories: worker processes receive them by reference (pickled by name).

def fake_env(task: TaskSpec) -> FakeEnv:
    """Succeeds after a task-dependent number of policy steps (10 settle steps come first)."""
    return FakeEnv(task, succeed_after=10 + 12 + 3 * task.index)


def slow_fake_env(task: TaskSpec) -> FakeEnv:
    """A slow env that notes its process id in $FAKE_ENV_PID_FILE, so tests can look for orphans."""
    import os

    path = os.environ.get("FAKE_ENV_PID_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
    return FakeEnv(task, step_seconds=0.01)


class ResetLoggingEnv(FakeEnv):
    """Writes, at every reset, its task and the resets before it to $FAKE_ENV_RESET_LOG."""

    def reset(self, init_state) -> None:
        import os

        super().reset(init_state)
        with open(os.environ["FAKE_ENV_RESET_LOG"], "a") as f:
            f.write(f"{self.task.key} {self.reset_counts[-1]}\n")


def reset_logging_env(task: TaskSpec) -> FakeEnv:
    """Writes, at every episode's reset, its task and the resets before it to $FAKE_ENV_RESET_LOG
    (from whichever worker process runs it)."""
    return ResetLoggingEnv(task, step_seconds=0.002)


class _SelfKillingEnv(FakeEnv):
    def step(self, action, render: bool) -> bool:
        import os
        import signal
        from pathlib import Path

        flag = Path(os.environ["FAKE_ENV_KILLED_FLAG"])
        if len(self.actions) == 15 and not flag.exists():
            flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-episode
        return super().step(action, render)


def self_killing_env(task: TaskSpec) -> FakeEnv:
    """Task 1's env kills its worker process in the middle of an episode, once
    (the file $FAKE_ENV_KILLED_FLAG remembers it across processes)."""
    return _SelfKillingEnv(task) if task.index == 1 else FakeEnv(task)


def _fail_to_load():
    raise RuntimeError("this env factory cannot be loaded in a worker")


class UnloadableEnvFactory:
    """Pickles fine, but unpickling it (in a freshly spawned worker) raises: the worker dies at start."""

    def __reduce__(self):
        return (_fail_to_load, ())

    def __call__(self, task):
        return FakeEnv(task)


def write_demo_file(path, episodes, image_size=32, suite="libero_spatial", seed=0, orientation=True):
    """A demonstration file in ``bench record-demos``' layout. ``episodes``: per demonstration its
    (T, 7) environment actions; the third-person image's brightness encodes the first action value,
    so that a model can learn the actions from the images."""
    import numpy as np

    from bench.demos import IMAGE_ORIENTATION, DemoWriter

    rng = np.random.default_rng(seed)
    attrs = {"suite": suite, "image_size": image_size}
    if orientation:
        attrs["image_orientation"] = IMAGE_ORIENTATION
    writer = DemoWriter(path, attrs)
    for d, actions in enumerate(episodes):
        steps = []
        for action in np.asarray(actions, dtype=np.float64):
            level = int(np.clip(128 + 127 * action[0], 0, 255))
            steps.append({
                "action": action, "state": rng.normal(size=6), "reward": 0.0,
                "agentview_rgb": np.full((image_size, image_size, 3), level, np.uint8),
                "eye_in_hand_rgb": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
                "ee_pos": rng.normal(size=3), "ee_ori": rng.normal(size=3),
                "gripper_states": rng.normal(size=2) * 0.01, "joint_states": rng.normal(size=7),
            })
        steps[-1]["reward"] = 1.0
        writer.add(steps, {"instruction": f"put object {d} on the plate", "suite": suite, "task_index": d,
                           "init_state_index": 0})
    writer.close()
    return path


def write_libero_source_file(path, demos, instruction="do the thing", bddl_file_name=None, image_size=16, seed=0):
    """A demonstration file in LIBERO's own layout, as its datasets ship: ``demos`` holds per
    demonstration its (T, 7) actions and (T, S) simulator states. Images are upside down, as
    LIBERO rendered them ("opengl" convention)."""
    import json

    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_name"] = "Libero_Tabletop_Manipulation"
        data.attrs["problem_info"] = json.dumps({"problem_name": "libero_tabletop_manipulation",
                                                 "domain_name": "robosuite", "language_instruction": instruction})
        data.attrs["bddl_file_name"] = bddl_file_name or "chiliocosm/bddl_files/unknown.bddl"
        data.attrs["env_args"] = json.dumps({"type": 1, "env_name": "Libero_Tabletop_Manipulation"})
        data.attrs["macros_image_convention"] = "opengl"
        data.attrs["tag"] = "libero-v1"
        data.attrs["num_demos"] = len(demos)
        data.attrs["total"] = sum(len(actions) for actions, _ in demos)
        for i, (actions, states) in enumerate(demos):
            group = data.create_group(f"demo_{i}")
            steps = len(actions)
            group.create_dataset("actions", data=np.asarray(actions, dtype=np.float64))
            group.create_dataset("states", data=np.asarray(states, dtype=np.float64))
            group.create_dataset("robot_states", data=rng.normal(size=(steps, 9)))
            rewards = np.zeros(steps, np.uint8)
            rewards[-1] = 1
            group.create_dataset("rewards", data=rewards)
            group.create_dataset("dones", data=rewards)
            obs = group.create_group("obs")
            for key in ("agentview_rgb", "eye_in_hand_rgb"):
                obs.create_dataset(key, data=rng.integers(0, 256, (steps, image_size, image_size, 3), dtype=np.uint8))
            ee = rng.normal(size=(steps, 6))
            obs.create_dataset("ee_states", data=ee)
            obs.create_dataset("ee_pos", data=ee[:, :3])
            obs.create_dataset("ee_ori", data=ee[:, 3:])
            obs.create_dataset("gripper_states", data=rng.normal(size=(steps, 2)) * 0.01)
            obs.create_dataset("joint_states", data=rng.normal(size=(steps, 7)))
            group.attrs["init_state"] = np.asarray(states[0], dtype=np.float64)
            group.attrs["model_file"] = "<mujoco model=\"base\"/>"
            group.attrs["num_samples"] = steps
    return path
