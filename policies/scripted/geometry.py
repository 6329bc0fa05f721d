"""Poses and OSC_POSE delta actions for a top-down gripper."""

from __future__ import annotations

import numpy as np

# OSC_POSE maps an action in [-1, 1] to at most 5 cm and 0.5 rad per control step.
POS_PER_UNIT = 0.05
ROT_PER_UNIT = 0.5
# The controller sets its goal to the current pose plus the delta and covers only part of the
# way within one 50 ms step (about a quarter under sustained motion): command more than the error.
TRACKING_GAIN = 3.0
DOWN = np.array([0.0, 0.0, -1.0])


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v)
    return v / n if n > 1e-9 else v


def horizontal(v) -> np.ndarray:
    return unit(np.array([v[0], v[1], 0.0]))


def grip_rotation(finger_axis) -> np.ndarray:
    """Gripper pointing down with the fingers closing along ``finger_axis`` (horizontal).

    The grip site's x axis is the line between the fingers and its z axis the approach direction.
    """
    x = horizontal(finger_axis)
    z = DOWN
    return np.column_stack([x, np.cross(z, x), z])


def tilted_towards(grip_mat: np.ndarray, direction, angle: float) -> np.ndarray:
    """``grip_mat`` (pointing down) with its approach axis leaning ``angle`` radians towards the
    horizontal ``direction``, turned about its finger axis (which must be perpendicular to it)."""
    x = grip_mat[:, 0]
    z = np.cos(angle) * DOWN + np.sin(angle) * horizontal(direction)
    return np.column_stack([x, np.cross(z, x), z])


def yaw_rotation(angle: float) -> np.ndarray:
    """Rotation by ``angle`` radians about the vertical."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def closest_finger_axis(axis, eef_mat) -> np.ndarray:
    """The gripper is symmetric: of ``axis`` and ``-axis`` take the one needing less wrist turn."""
    axis = horizontal(axis)
    return axis if np.dot(axis, eef_mat[:, 0]) >= 0 else -axis


def rotation_to_axis_angle(rot: np.ndarray) -> np.ndarray:
    cos = np.clip((np.trace(rot) - 1) / 2, -1.0, 1.0)
    angle = np.arccos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    if np.pi - angle < 1e-4:  # 180 degrees: axis from the symmetric part
        diag = np.sqrt(np.clip((np.diag(rot) + 1) / 2, 0, None))
        k = int(np.argmax(diag))
        axis = rot[:, k] + np.eye(3)[k]
        return unit(axis) * angle
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]]) / (2 * np.sin(angle))
    return axis * angle


def rotation_error(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """World-frame axis-angle that turns ``current`` into ``target`` (OSC applies deltas in world frame)."""
    return rotation_to_axis_angle(target @ current.T)


def move_action(eef_pos, eef_mat, target_pos, target_mat, gripper: float, steps: int, speed: float) -> np.ndarray:
    """One action that, repeated ``steps`` times, brings the gripper to the target pose.

    ``speed`` caps the translation per step in action units (1 = 5 cm per step).
    """
    dpos = TRACKING_GAIN * (np.asarray(target_pos) - eef_pos) / (POS_PER_UNIT * steps)
    norm = np.linalg.norm(dpos)
    if norm > speed:
        dpos *= speed / norm
    drot = np.clip(TRACKING_GAIN * rotation_error(target_mat, eef_mat) / (ROT_PER_UNIT * steps), -0.5, 0.5)
    return np.concatenate([dpos, drot, [gripper]])
