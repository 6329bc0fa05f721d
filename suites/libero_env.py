"""The LIBERO simulator behind the evaluation protocol's conventions.

Construction, seeding, reset/init state, rotated images and 8-D proprio follow
the published OpenVLA-OFT / LightVLA evaluation. Cameras are rendered only for steps
whose observation will be looked at: rendering two 256x256 cameras costs ~10x a
physics step on a CPU. Physics does not depend on it (tests/suites prove it).
No torch here.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import glob
import importlib.util
import logging
import os

import numpy as np

from suites.registry import TaskSpec

os.environ.setdefault("MUJOCO_GL", "egl")
# robosuite warns on import that it has no private macro file; that is expected here.
logging.getLogger("robosuite_logs").setLevel(logging.ERROR)

CAMERA_SIZE = 256
ENV_SEED = 0  # the protocol seeds every env with 0: the seed moves objects even with a fixed init state
CAMERAS = {"agentview": "agentview_image", "wrist": "robot0_eye_in_hand_image"}
# An always-enabled observable with the cameras' sampling rate. Its sampling clock is the one
# the cameras would have had if they had never been switched off.
_CLOCK_REFERENCE = "robot0_eef_pos"


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion to axis-angle, as the reference evaluation computes it."""
    q = np.asarray(quat, dtype=np.float64).copy()
    q[3] = np.clip(q[3], -1.0, 1.0)
    den = np.sqrt(1.0 - q[3] * q[3])
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * np.arccos(q[3]) / den


def proprio_from_obs(raw: dict) -> np.ndarray:
    """8-D proprio: eef position, eef axis-angle, two gripper finger positions."""
    return np.concatenate(
        [raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
    ).astype(np.float64)


@functools.cache
def load_triton_before_gl() -> None:
    """Load Triton's library, when installed, before the first GL context is made.

    Without a GPU, EGL renders with Mesa's llvmpipe, which carries its own LLVM; so does
    Triton, which torch loads for torch.compile and which timm imports through torchvision.
    Triton's library loaded into a process that has made a GL context crashes it (a
    segmentation fault), so a model built after an env in one process would. Loaded first,
    both live together. Only the shared library is loaded here, not Triton or torch.
    """
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return
    for library in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C", "libtriton*.so")):
        ctypes.CDLL(library)


class LiberoEnv:
    """One LIBERO task's simulator, reused across that task's episodes."""

    def __init__(self, task: TaskSpec, camera_size: int = CAMERA_SIZE, env_seed: int = ENV_SEED,
                 soft_reset: bool = True):
        from libero.libero.envs import OffScreenRenderEnv

        from suites.soft_reset import install_exact_soft_reset

        self.task = task
        load_triton_before_gl()
        gc.collect()  # see _use_own_gl_context: dead envs' render contexts are freed now, not mid-build
        self._env = OffScreenRenderEnv(
            bddl_file_name=task.bddl_file, camera_heights=camera_size, camera_widths=camera_size
        )
        self._env.seed(env_seed)
        self._robosuite_env = self._env.env
        self._soft_reset = soft_reset
        if soft_reset:  # bit-identical to LIBERO's hard reset, 30-100x cheaper (suites/soft_reset.py)
            install_exact_soft_reset(self._robosuite_env)
        self._cameras_on = True
        self._set_cameras(False)
        self._raw: dict | None = None
        self._scene_index = None  # built on demand, again after a hard reset (it rebuilds the MuJoCo model)
        # Every reset draws fixture placements, which set_init_state does not restore, from the
        # global numpy RNG seeded above, so an episode's scene depends on how many resets came
        # before it (libero_10 task 9, init state 1: the microwave 1.18 cm apart as first or
        # second episode). Steps draw nothing. The protocol runs init state i after i resets.
        # The RNG is the process's: envs that reset in turn in one process disturb each other.
        self.resets = 0

    def reset(self, init_state: np.ndarray) -> None:
        self._bare_reset()
        self._raw = self._env.set_init_state(np.asarray(init_state))

    def skip_resets(self, count: int) -> None:
        """``count`` resets without an episode: the scene the next reset draws is then the one it
        draws after ``count`` episodes (bit for bit, tests/suites/test_libero_env.py)."""
        for _ in range(count):
            self._bare_reset()

    def _bare_reset(self) -> None:
        self._set_cameras(False)
        self._use_own_gl_context()  # a hard reset frees this env's render context
        self._env.reset()
        self.resets += 1
        if not self._soft_reset:
            self._scene_index = None

    def step(self, action: np.ndarray, render: bool) -> bool:
        """Advance one control step; ``render`` says whether its observation needs images."""
        self._set_cameras(render)
        if render:
            self._use_own_gl_context()
        self._raw, _reward, done, _info = self._env.step(np.asarray(action, dtype=np.float64))
        return bool(done)

    def observe(self, images: bool, privileged: bool = False) -> dict:
        """The last step's observation in the policy's conventions."""
        raw = self._raw
        if raw is None:
            raise RuntimeError("observe() called before reset()")
        obs = {"proprio": proprio_from_obs(raw), "instruction": self.task.instruction}
        if images:
            missing = [key for key in CAMERAS.values() if key not in raw]
            if missing:
                raise RuntimeError(f"images requested but the last step did not render {missing}")
            # The cameras render upside down: rotate 180 degrees before anything else.
            obs["images"] = {name: np.ascontiguousarray(raw[key][::-1, ::-1]) for name, key in CAMERAS.items()}
        if privileged:
            obs["privileged"] = self.privileged_state()
        return obs

    def robot_state(self) -> dict:
        """The robot's low-dimensional state, named as in LIBERO's demonstration files."""
        raw = self._raw
        return {
            "ee_pos": np.array(raw["robot0_eef_pos"]),
            "ee_ori": quat_to_axis_angle(raw["robot0_eef_quat"]),
            "gripper_states": np.array(raw["robot0_gripper_qpos"]),
            "joint_states": np.array(raw["robot0_joint_pos"]),
        }

    def privileged_state(self) -> dict:
        """Poses, extents, joint states and the task file, for policies that declare the need."""
        from suites.privileged import SceneIndex, snapshot

        if self._scene_index is None:
            self._scene_index = SceneIndex(self._robosuite_env)
        return snapshot(self._robosuite_env, self._scene_index, self.task.bddl_file)

    def sim_state(self) -> np.ndarray:
        return np.array(self._env.get_sim_state())

    def close(self) -> None:
        if self._env is None:
            return
        self._use_own_gl_context()  # its GL objects are freed in its own context
        env, self._env = self._env, None
        env.close()

    def __del__(self):
        # An env dropped without close() would otherwise be freed by the garbage collector at
        # an arbitrary moment, in whichever GL context is current then.
        try:
            self.close()
        except Exception:  # at interpreter exit EGL may already be gone; nothing is left to free
            pass

    def _use_own_gl_context(self) -> None:
        """Make this env's GL context current.

        robosuite renders, and frees a render context, in whichever GL context is current, and
        freeing one releases the current context. With two envs in a process (or after one was
        closed) the other env's images were rendered in the wrong context: measured on
        libero_spatial task 0, 1.8 levels mean absolute difference, and 83 after the other env
        closed. A render context freed by the garbage collector while a new env builds its own
        crashed in MjrContext.
        """
        sim = getattr(self._robosuite_env, "sim", None)
        context = getattr(sim, "_render_context_offscreen", None)
        if context is not None:
            context.gl_ctx.make_current()

    def _set_cameras(self, on: bool) -> None:
        if on == self._cameras_on:
            return
        env = self._robosuite_env
        clock = env._observables[_CLOCK_REFERENCE]
        for key in CAMERAS.values():
            camera = env._observables[key]
            camera.set_enabled(on)
            if on:
                # Re-enabling restarts the camera's sampling clock; give it the clock it would
                # have had, so images are those of an always-rendering loop.
                camera._time_since_last_sample = clock._time_since_last_sample
                camera._sampled = clock._sampled
        self._cameras_on = on
