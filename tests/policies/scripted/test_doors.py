"""Doors on a synthetic microwave laid out as libero_10 task 9's (no simulator)."""

import numpy as np
import pytest

from policies.scripted.doors import PushDoor, PutThroughDoor, door, doorway_clear, rotate
from policies.scripted.goals import Predicate
from policies.scripted.policy import plan_skills
from policies.scripted.scene import Scene
from policies.scripted.skills import PickPlace, SkillFailed
from tests.policies.scripted.synthetic_scenes import box, scene

ANCHOR = np.array([-0.182, 0.269, 1.016])
REACH, THICKNESS = 0.259, 0.026
JOINT = "microwave_1_microjoint"
HEATING = "microwave_1_heating_region"


def panel_at(qpos):
    """Corners of the door's panel: shut (qpos 0) it runs along +x from the hinge, in front of it (-y)."""
    shut = np.array([[x, y, z] for x in (0.0, REACH) for y in (-THICKNESS, 0.0) for z in (-0.093, 0.093)])
    return np.array([rotate(c, np.array([0, 0, 1.0]), qpos) for c in shut]) + ANCHOR


def microwave_scene(qpos=-1.579, eef=(-0.2, 0.0, 1.2)):
    panel = panel_at(qpos)
    mug = box([-0.02, -0.019, 0.9], [0.053, 0.053, 0.0515])
    mug["ends"] = {"-y": (np.array([-0.028, -0.088, 0.927]), np.array([-0.011, -0.079, 0.985]))}  # its handle
    joint = {"owner": "microwave_1", "type": "hinge", "qpos": qpos, "range": np.array([-2.094, 0.0]),
             "axis": np.array([0, 0, 1.0]), "anchor": ANCHOR, "aabb_min": panel.min(0), "aabb_max": panel.max(0),
             "panel": panel}
    heating = {"pos": np.array([-0.01, 0.367, 1.016]), "mat": np.eye(3), "size": np.array([0.12, 0.084, 0.08]),
               "parent": "microwave_1", "joints": []}
    s = scene({"white_yellow_mug_1": mug, "microwave_1": box([-0.01, 0.357, 0.92], [0.17, 0.1, 0.095], fixture=True)},
              sites={HEATING: heating}, joints={JOINT: joint},
              articulation={"microwave_1": {"default_open_ranges": [-2.094, -1.3],
                                            "default_close_ranges": [-0.005, 0.0]}})
    return Scene(s.state | {"eef_pos": np.asarray(eef, dtype=float)})


def test_door_geometry_comes_from_its_panel_and_hinge():
    d = door(microwave_scene(), JOINT)
    np.testing.assert_allclose(d.radial, [0, -1, 0], atol=0.01)  # open: the free edge points to -y
    # in through the doorway: where the shut door (LIBERO: qpos -0.0025, the middle of its close range) moves
    np.testing.assert_allclose(d.entry, [0, 1, 0], atol=0.003)
    assert d.reach == pytest.approx(REACH) and d.outer == pytest.approx(-THICKNESS) and d.inner == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(d.doorway_centre[:2], ANCHOR[:2] + [REACH / 2, 0], atol=1e-3)
    # shut, the point pushed lies in front of the panel's outer side, past the hinge along the panel
    point = d.push_point(0.0, 0.15, 0.01)
    np.testing.assert_allclose(point[:2], [ANCHOR[0] + 0.15, ANCHOR[1] - THICKNESS - 0.01], atol=1e-9)


def test_the_mug_goes_in_by_its_handle_before_the_door_is_pushed_shut():
    s = microwave_scene()
    goal = [Predicate("in", ("white_yellow_mug_1", HEATING)), Predicate("close", ("microwave_1",))]
    clear, put, close = plan_skills(goal, s)
    assert isinstance(put, PutThroughDoor) and isinstance(close, PushDoor) and close.shut
    assert isinstance(clear, PushDoor) and not clear.shut
    assert clear.act(s, 4) is None  # open 90 degrees: already out of the way
    point, axis = put.plan_grasp(s, s.body("white_yellow_mug_1"))
    np.testing.assert_allclose(point[:2], [-0.0195, -0.0835])  # the handle, which faces the doorway
    np.testing.assert_allclose(np.abs(axis), [1, 0, 0], atol=0.003)  # fingers close across the way in


def test_the_object_is_carried_in_front_of_the_doorway_then_in_up_to_the_hand():
    s = microwave_scene(eef=(-0.0195, -0.0835, 0.97))  # holding the handle
    put = PutThroughDoor("white_yellow_mug_1", HEATING, JOINT, "in")
    mug = s.body("white_yellow_mug_1")
    put._plan_insertion(s, mug, s.eef_pos)
    far = mug.aabb_max[1] - s.eef_pos[1]  # the mug reaches this far past the grip, towards the doorway
    assert put.staging[1] + far < ANCHOR[1]  # wholly outside in front of the doorway
    assert put.inside[1] == pytest.approx(ANCHOR[1] - 0.045, abs=1e-3)  # the hand stops short of the doorway
    centre_x = put.inside[0] + (mug.aabb_min[0] + mug.aabb_max[0]) / 2 - s.eef_pos[0]
    assert centre_x == pytest.approx(ANCHOR[0] + REACH / 2, abs=1e-3)  # the mug centred across the doorway
    bottom = put.insert_z - (s.eef_pos[2] - mug.bottom)
    assert bottom == pytest.approx(s.site(HEATING).lo[2] + 0.025)  # just above the floor


@pytest.mark.parametrize("qpos", [-1.579, -0.6])
def test_close_door_pushes_the_panel_along_its_arc_until_it_is_shut(qpos):
    s = microwave_scene(qpos)
    skill = PushDoor(JOINT, s.articulation("microwave_1"), "close")
    skill.act(s, 4)
    d = door(s, JOINT)
    contact = skill._contact(d, qpos)
    pressing = Scene(s.state | {"eef_pos": contact})
    skill.goto("push")
    action = skill.act(pressing, 4)
    motion = d.motion(d.radial)
    assert action[:3] @ motion > 0.5 * np.linalg.norm(action[:3])  # mostly along where the panel moves
    assert contact[2] == pytest.approx(ANCHOR[2] + 0.093 - 0.03)  # near the top: the hand stays above the door
    shut = microwave_scene(-0.002)
    assert PushDoor(JOINT, shut.articulation("microwave_1"), "close").act(shut, 4) is None


def test_a_shut_door_or_an_open_goal_is_beyond_the_expert():
    s = microwave_scene(qpos=0.0)
    with pytest.raises(SkillFailed, match="door-opening"):
        plan_skills([Predicate("in", ("white_yellow_mug_1", HEATING))], s)
    with pytest.raises(SkillFailed, match="door-opening"):
        plan_skills([Predicate("open", ("microwave_1",))], s)


def test_a_region_on_an_object_whose_hinge_is_a_knob_is_reached_from_above():
    knob = {"owner": "flat_stove_1", "type": "hinge", "qpos": 0.0, "range": np.array([-0.5, 2.1]),
            "axis": np.array([0, 0, 1.0]), "anchor": np.array([-0.3, 0.2, 0.92]), "panel": panel_at(0.0)}
    burner = {"pos": np.array([-0.25, 0.2, 0.905]), "mat": np.eye(3), "size": np.array([0.075, 0.075, 0.003]),
              "parent": "flat_stove_1", "joints": []}
    s = scene({"moka_pot_1": box([0, 0, 0.9], [0.03, 0.03, 0.05]),
               "flat_stove_1": box([-0.3, 0.2, 0.885], [0.15, 0.1, 0.035])},
              sites={"flat_stove_1_cook_region": burner}, joints={"flat_stove_1_knob": knob},
              articulation={"flat_stove_1": {"default_turnon_ranges": [0.5, 2.1],
                                             "default_turnoff_ranges": [-0.005, 0.0]}})
    (skill,) = plan_skills([Predicate("in", ("moka_pot_1", "flat_stove_1_cook_region"))], s)
    assert type(skill) is PickPlace


def test_a_door_open_76_degrees_is_pushed_further_open_from_the_doorway_side():
    """libero_10 task 9, init state 11: the door starts at -1.333, and the hand carrying the mug in
    ran into it."""
    s = microwave_scene(-1.333)
    assert not doorway_clear(door(s, JOINT), s.joint(JOINT)["panel"])
    assert doorway_clear(door(microwave_scene(-1.579), JOINT), panel_at(-1.579))
    skill = PushDoor(JOINT, s.articulation("microwave_1"), "clear", shut=False)
    skill.act(s, 4)
    d = door(s, JOINT)
    contact = skill._contact(d, d.qpos)
    assert (contact - ANCHOR) @ d.motion(d.radial) > 0  # on the panel's inner side, the doorway's
    skill.goto("push")
    action = skill.act(Scene(s.state | {"eef_pos": contact}), 4)
    assert action[:3] @ d.motion(d.radial) < -0.5 * np.linalg.norm(action[:3])  # opening it further
