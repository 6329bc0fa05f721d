import numpy as np
import pytest

from policies.scripted.geometry import (
    closest_finger_axis,
    grip_rotation,
    move_action,
    rotation_error,
    rotation_to_axis_angle,
    tilted_towards,
)
from policies.scripted.geometry import TRACKING_GAIN


def rot_z(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def test_grip_rotation_points_down_with_fingers_along_axis():
    r = grip_rotation([0, 2, 0.3])
    np.testing.assert_allclose(r[:, 2], [0, 0, -1])
    np.testing.assert_allclose(r[:, 0], [0, 1, 0])
    np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)


def test_a_tilted_grip_leans_its_approach_towards_the_direction_about_its_finger_axis():
    upright = grip_rotation([1, 0, 0])
    r = tilted_towards(upright, [0, 3, 0.5], 0.7)  # the direction's height is ignored
    np.testing.assert_allclose(r[:, 0], upright[:, 0])
    np.testing.assert_allclose(r[:, 2], [0, np.sin(0.7), -np.cos(0.7)], atol=1e-12)
    np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    assert np.linalg.norm(rotation_error(r, upright)) == pytest.approx(0.7)


@pytest.mark.parametrize("angle", [0.0, 0.3, -1.2, np.pi - 1e-3, np.pi])
def test_axis_angle_round_trip(angle):
    aa = rotation_to_axis_angle(rot_z(angle))
    assert np.linalg.norm(aa) == pytest.approx(abs(angle), abs=1e-6)
    if angle:
        np.testing.assert_allclose(abs(aa[2]), abs(angle), atol=1e-6)


def test_rotation_error_is_world_frame():
    current = grip_rotation([1, 0, 0])
    target = rot_z(0.4) @ current
    np.testing.assert_allclose(rotation_error(target, current), [0, 0, 0.4], atol=1e-9)


def test_closest_finger_axis_avoids_half_turns():
    eef = grip_rotation([0, 1, 0])
    np.testing.assert_allclose(closest_finger_axis([0, -1, 0], eef), [0, 1, 0])
    np.testing.assert_allclose(closest_finger_axis([1, 0.1, 0], eef)[:2], np.array([1, 0.1]) / np.hypot(1, 0.1))


def test_move_action_splits_the_way_over_the_chunk_and_caps_speed():
    eef_mat = grip_rotation([0, 1, 0])
    a = move_action(np.zeros(3), eef_mat, [0.01, 0, 0], eef_mat, gripper=-1, steps=4, speed=1.0)
    # 4 steps x 0.05 x 5 cm = 1 cm commanded, times the tracking gain
    np.testing.assert_allclose(a[:3], [0.05 * TRACKING_GAIN, 0, 0])
    np.testing.assert_allclose(a[3:6], 0, atol=1e-12)
    assert a[6] == -1
    far = move_action(np.zeros(3), eef_mat, [1.0, 1.0, 0], eef_mat, gripper=1, steps=4, speed=0.5)
    assert np.linalg.norm(far[:3]) == pytest.approx(0.5)
