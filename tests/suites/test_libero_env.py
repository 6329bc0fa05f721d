"""The env wrapper against the plain LIBERO env, on the real simulator."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from suites import get_suite
from suites.libero_env import CAMERAS, LiberoEnv, load_triton_before_gl

pytestmark = pytest.mark.sim

QUERY_EVERY = 8
STEPS = 24


@pytest.fixture(scope="module")
def task():
    return get_suite("libero_spatial").task(0)


def _actions():
    return np.random.default_rng(0).uniform(-1, 1, size=(STEPS, 7))


def test_on_demand_rendering_matches_an_always_rendering_loop(task):
    """Physics bit-identical, and the images at query steps identical to plain LIBERO's,
    over two episodes on one env (the cameras' sampling clock carries across episodes)."""
    from libero.libero.envs import OffScreenRenderEnv

    load_triton_before_gl()  # as LiberoEnv does: this plain env's GL context comes first in a lone run
    inits, actions = task.init_states(), _actions()
    reference = OffScreenRenderEnv(bddl_file_name=task.bddl_file, camera_heights=256, camera_widths=256)
    reference.seed(0)
    ref_images, ref_states = [], []
    for episode in range(2):
        reference.reset()
        reference.set_init_state(inits[episode])
        for i, action in enumerate(actions):
            raw, _, _, _ = reference.step(action)
            ref_states.append(reference.get_sim_state().copy())
            if i % QUERY_EVERY == QUERY_EVERY - 1:
                ref_images.append({k: raw[v][::-1, ::-1].copy() for k, v in CAMERAS.items()})
    reference.close()

    env = LiberoEnv(task)
    images, states, rendered = [], [], 0
    for episode in range(2):
        env.reset(inits[episode])
        for i, action in enumerate(actions):
            render = i % QUERY_EVERY == QUERY_EVERY - 1
            env.step(action, render=render)
            rendered += render
            states.append(env.sim_state())
            if render:
                images.append(env.observe(images=True)["images"])
    env.close()

    assert rendered == len(ref_images) == 2 * STEPS // QUERY_EVERY
    for ours, theirs in zip(states, ref_states):
        np.testing.assert_array_equal(ours, theirs)
    for ours, theirs in zip(images, ref_images):
        for camera in CAMERAS:
            assert ours[camera].shape == (256, 256, 3) and ours[camera].dtype == np.uint8
            np.testing.assert_array_equal(ours[camera], theirs[camera])


def test_observation_conventions(task):
    env = LiberoEnv(task)
    try:
        env.reset(task.init_states()[0])
        env.step(np.array([0, 0, 0, 0, 0, 0, -1.0]), render=False)
        obs = env.observe(images=False)
        assert obs["proprio"].shape == (8,) and "images" not in obs
        assert obs["instruction"] == task.instruction
        with pytest.raises(RuntimeError, match="did not render"):
            env.observe(images=True)
        env.step(np.array([0, 0, 0, 0, 0, 0, -1.0]), render=True)
        raw = env._raw
        images = env.observe(images=True, privileged=True)
        np.testing.assert_array_equal(images["images"]["agentview"], np.rot90(raw["agentview_image"], 2))
        np.testing.assert_allclose(images["proprio"][:3], raw["robot0_eef_pos"])
        state = images["privileged"]
        assert set(state["objects"]) >= {"akita_black_bowl_1", "plate_1", "wooden_cabinet_1"}
        np.testing.assert_allclose(state["wrist_turn_range"], [-2.8973, 2.8973])  # the Panda's last joint
        robot, sim = env._robosuite_env.robots[0], env._robosuite_env.sim
        assert state["wrist_turn"] == sim.data.qpos[robot._ref_joint_pos_indexes[6]]
        bowl = state["objects"]["akita_black_bowl_1"]
        assert np.all(bowl["aabb_min"] < bowl["pos"] + 0.01) and np.all(bowl["pos"] < bowl["aabb_max"])
        top = state["joints"]["wooden_cabinet_1_top_level"]
        assert top["type"] == "slide"
        # the part at each end of its travel, inside the drawer's box; at the front, the handle bar
        for end in "+-":
            lo, hi = top["ends"][end]
            assert np.all(lo >= np.asarray(top["aabb_min"]) - 1e-9) and np.all(hi <= np.asarray(top["aabb_max"]) + 1e-9)
        lo, hi = top["ends"]["-"]  # LIBERO's cabinets open towards negative qpos
        assert hi[2] - lo[2] == pytest.approx(0.0163, abs=0.002)  # the bar's height (the cabinet is turned about z)
        out = -np.asarray(top["axis"])
        assert (lo + hi) / 2 @ out > (np.asarray(top["aabb_min"]) + top["aabb_max"]) / 2 @ out + 0.08  # at the front
        assert state["bddl_file"] == task.bddl_file
    finally:
        env.close()


def test_snapshot_gives_a_doors_panel_and_an_objects_far_ends():
    """libero_10 task 9: the microwave's door is open (its free edge towards -y); the mug's handle
    points -y."""
    microwave = get_suite("libero_10").task(9)
    env = LiberoEnv(microwave)
    try:
        env.reset(microwave.init_states()[0])
        env.step(np.array([0, 0, 0, 0, 0, 0, -1.0]), render=False)
        state = env.observe(images=False, privileged=True)["privileged"]
        door = state["joints"]["microwave_1_microjoint"]
        assert door["type"] == "hinge" and door["panel"].shape == (8, 3)
        extent = np.sort(door["panel"].max(axis=0) - door["panel"].min(axis=0))
        assert extent[0] < 0.03 and extent[1] > 0.15  # a slab: the panel, 2.6 cm thick
        # the handle sticks out of the panel's outer side (towards the robot, -x), so is not part of it
        assert door["aabb_min"][0] < door["panel"].min(axis=0)[0] - 0.03
        mug = state["objects"]["white_yellow_mug_1"]
        lo, hi = mug["ends"]["-y"]
        assert lo[1] == pytest.approx(mug["aabb_min"][1], abs=0.002) and hi[1] - lo[1] < 0.025  # the handle's outer bar
        assert hi[0] - lo[0] < 0.03 < mug["aabb_max"][0] - mug["aabb_min"][0] - 0.05  # narrow, unlike the cup
        for end, (lo, hi) in mug["ends"].items():  # each within the mug's box
            assert np.all(lo >= mug["aabb_min"] - 1e-9) and np.all(hi <= mug["aabb_max"] + 1e-9), end
    finally:
        env.close()


def test_each_env_renders_in_its_own_gl_context(task):
    """robosuite renders in whichever GL context is current, and closing an env releases it:
    with two envs in one process, each must make its own context current to render."""
    import os

    if os.environ.get("MUJOCO_GL", "egl") != "egl":
        pytest.skip("checks EGL contexts")

    def own(env):
        return env._robosuite_env.sim._render_context_offscreen.gl_ctx._context.address

    def render_step(env):
        env.reset(task.init_states()[0])
        env.step(np.zeros(7), render=True)
        current = EGL.eglGetCurrentContext()
        return current.address if current else None

    first, second = LiberoEnv(task), LiberoEnv(task)  # the second's context is current now
    from OpenGL import EGL  # after robosuite chose the EGL platform

    try:
        assert own(first) != own(second)
        for env in (first, second, first):
            assert render_step(env) == own(env)
        second.close()  # releases the current context
        assert render_step(first) == own(first)
        assert first.observe(images=True)["images"]["agentview"].mean() > 20  # a scene, not an empty buffer
    finally:
        first.close()
        second.close()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton (torch's compiler backend) is not installed")
def test_a_model_can_be_loaded_after_an_env_rendered_in_the_same_process(task):
    # Triton's LLVM loaded after Mesa's (software EGL) used to crash the process.
    code = (
        "import sys; from suites import get_suite; from suites.libero_env import LiberoEnv\n"
        "env = LiberoEnv(get_suite('libero_spatial').task(0))\n"
        "env.reset(get_suite('libero_spatial').task(0).init_states()[0]); env.step([0] * 6 + [-1], render=True)\n"
        "import torch._dynamo, triton\n"
        "print('alive')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and "alive" in done.stdout, done.stderr[-2000:]


def test_init_state_one_after_a_skipped_reset_has_the_scene_of_the_ordered_loop():
    """LIBERO draws fixture poses at every reset (set_init_state keeps them), so the second
    episode's scene is not the first's; a skipped reset gives it bit for bit, steps or not."""
    task = get_suite("libero_10").task(9)  # the microwave moves with the draw
    inits = task.init_states()

    def scene(env):
        return np.concatenate([env.sim_state(), np.asarray(env._robosuite_env.sim.model.body_pos).ravel()])

    # One env at a time: the draws come from numpy's global RNG, which every env seeds when built.
    scenes = {}
    for name, skip, episodes in (("ordered", 0, [0, 1]), ("skipped", 1, [1]), ("first", 0, [1])):
        env = LiberoEnv(task)
        env.skip_resets(skip)
        for episode in episodes:
            env.reset(inits[episode])
            if episode == 0:
                for action in _actions():
                    env.step(action, render=False)
        scenes[name] = (scene(env), env.resets)
        env.close()
    assert scenes["ordered"][1] == scenes["skipped"][1] == 2
    assert np.array_equal(scenes["ordered"][0], scenes["skipped"][0])
    assert not np.allclose(scenes["ordered"][0], scenes["first"][0], atol=1e-3)
