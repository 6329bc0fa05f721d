"""Privileged snapshots built by hand, in the simulator's layout, for the expert's unit tests."""

import numpy as np

from policies.scripted.scene import Scene


def box(pos, half, fixture=False, yaw=0.0):
    c, s = np.cos(yaw), np.sin(yaw)
    mat = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    half = np.asarray(half, dtype=float)
    pos = np.asarray(pos, dtype=float)
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (0, 2)]) * half
    world = corners @ mat.T + pos
    return {"pos": pos, "mat": mat, "box_min": np.array([-half[0], -half[1], 0]),
            "box_max": np.array([half[0], half[1], 2 * half[2]]),
            "aabb_min": world.min(0), "aabb_max": world.max(0), "fixture": fixture}


def scene(objects, sites=None, joints=None, articulation=None):
    return Scene({"eef_pos": np.array([-0.2, 0, 1.2]), "eef_mat": np.diag([1.0, -1.0, -1.0]),
                  "shoulder_pos": np.array([-0.66, 0.0, 1.245]),
                  "wrist_turn": 0.0, "wrist_turn_range": np.array([-2.8973, 2.8973]),
                  "gripper_qpos": np.array([0.04, -0.04]), "objects": objects, "sites": sites or {},
                  "joints": joints or {}, "articulation": articulation or {}, "bddl_file": ""})
