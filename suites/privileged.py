"""A plain-data snapshot of the simulator for policies that declare they need it.

Everything is numpy arrays and names: policies read poses and extents, never the simulator.
Frames are world frames; rotation matrices are 3x3.
"""

from __future__ import annotations

import numpy as np

_HORIZONTAL = {"+x": np.array([1.0, 0, 0]), "-x": np.array([-1.0, 0, 0]),
               "+y": np.array([0, 1.0, 0]), "-y": np.array([0, -1.0, 0])}
_CORNERS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)


class SceneIndex:
    """Which MuJoCo bodies, geoms and joints belong to which LIBERO object; rebuilt per model."""

    def __init__(self, env):
        import mujoco

        self.model = env.sim.model._model
        m = self.model
        names = {**env.objects_dict, **env.fixtures_dict}
        self.fixtures = set(env.fixtures_dict)
        self.object_geoms = {name: self._subtree_geoms(env.obj_body_id[name]) for name in names}
        self.object_bodies = {name: env.obj_body_id[name] for name in names}
        self.joints: dict[str, dict] = {}
        for name, obj in names.items():
            for joint in getattr(obj, "joints", None) or []:
                jid = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, joint)
                self.joints[joint] = {
                    "owner": name,
                    "id": jid,
                    "qposadr": int(m.jnt_qposadr[jid]),
                    "type": {2: "slide", 3: "hinge"}.get(int(m.jnt_type[jid]), "other"),
                    "range": np.array(m.jnt_range[jid]),
                    "geoms": self._subtree_geoms(int(m.jnt_bodyid[jid])),
                }
                half = m.geom_aabb[self.joints[joint]["geoms"], 3:]
                self.joints[joint]["volumes"] = np.prod(half, axis=1)
        self.grip_site = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, "gripper0_grip_site")
        # the Panda's shoulder pitch joint sits at link 2's origin: how far the hand reaches is measured from it
        self.shoulder = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "robot0_link2")
        # the Panda's last joint turns the hand about its own axis, within +-2.90 rad
        wrist = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, "robot0_joint7")
        self.wrist_qposadr = int(m.jnt_qposadr[wrist])
        self.wrist_range = np.array(m.jnt_range[wrist])
        self.finger_tips = [
            mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, name)
            for name in ("gripper0_finger_joint1_tip", "gripper0_finger_joint2_tip")
        ]

    def _collides(self, geom: int) -> bool:
        return bool(self.model.geom_contype[geom] or self.model.geom_conaffinity[geom])

    def _subtree_geoms(self, root: int) -> np.ndarray:
        m = self.model
        inside = np.zeros(m.nbody, dtype=bool)
        for body in range(m.nbody):  # parents precede children in MuJoCo's body order
            inside[body] = body == root or (body > 0 and inside[m.body_parentid[body]])
        geoms = [g for g in range(m.ngeom) if inside[m.geom_bodyid[g]] and self._collides(g)]
        return np.array(geoms, dtype=int)


def _geom_corners(model, data, geoms: np.ndarray) -> np.ndarray:
    """World coordinates of the corners of each geom's local bounding box, (8 * len(geoms), 3)."""
    centre, half = model.geom_aabb[geoms, :3], model.geom_aabb[geoms, 3:]
    local = centre[:, None, :] + _CORNERS[None, :, :] * half[:, None, :]  # (g, 8, 3)
    rot = data.geom_xmat[geoms].reshape(-1, 3, 3)
    world = np.einsum("gij,gkj->gki", rot, local) + data.geom_xpos[geoms][:, None, :]
    return world.reshape(-1, 3)


def _box(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounding box of points (n, 3); NaN for none."""
    if len(points) == 0:
        return np.full(3, np.nan), np.full(3, np.nan)
    return points.min(axis=0), points.max(axis=0)


def snapshot(env, index: SceneIndex, bddl_file: str) -> dict:
    m, d = index.model, env.sim.data._data
    objects = {}
    for name, geoms in index.object_geoms.items():
        body = index.object_bodies[name]
        mat = d.xmat[body].reshape(3, 3).copy()
        corners = _geom_corners(m, d, geoms)
        lo, hi = _box(corners)
        local_lo, local_hi = _box((corners - d.xpos[body]) @ mat)
        by_geom = corners.reshape(len(geoms), 8, 3)
        ends = {label: _end_part(by_geom, direction) for label, direction in _HORIZONTAL.items()} if len(geoms) else {}
        objects[name] = {
            "pos": d.xpos[body].copy(),
            "mat": mat,
            "aabb_min": lo,
            "aabb_max": hi,
            "box_min": local_lo,  # extent in the object's own frame, tight for rotated objects
            "box_max": local_hi,
            "ends": ends,  # "+x", "-x", "+y", "-y": (min, max) of the part furthest that way (a mug's handle)
            "fixture": name in index.fixtures,
        }
    sites = {}
    for name, site in env.object_sites_dict.items():
        sites[name] = {
            "pos": env.sim.data.get_site_xpos(name).copy(),
            "mat": env.sim.data.get_site_xmat(name).copy(),
            "size": np.asarray(getattr(site, "size", np.zeros(3)), dtype=np.float64),
            "parent": getattr(site, "parent_name", None),
            "joints": list(getattr(site, "joints", None) or []),
        }
    joints = {}
    for name, info in index.joints.items():
        if info["type"] == "other":  # free joints of movable objects: their poses are above
            continue
        corners = _geom_corners(m, d, info["geoms"]).reshape(len(info["geoms"]), 8, 3)
        lo, hi = _box(corners.reshape(-1, 3))
        handle_lo, handle_hi = _upper_part(corners, lo[2], hi[2])
        axis = d.xaxis[info["id"]].copy()
        ends, panel = {}, None
        if info["type"] == "slide":  # a drawer: what sticks out at each end of its travel (a handle bar)
            ends = {"+": _end_part(corners, axis), "-": _end_part(corners, -axis)}
        elif len(corners):  # a door (or a knob): its largest part, the door's panel without its handle
            panel = corners[int(np.argmax(index.joints[name]["volumes"]))]
        joints[name] = {
            "owner": info["owner"],
            "type": info["type"],
            "qpos": float(d.qpos[info["qposadr"]]),
            "range": info["range"].copy(),
            "axis": axis,
            "anchor": d.xanchor[info["id"]].copy(),
            "aabb_min": lo,
            "aabb_max": hi,
            "upper_min": handle_lo,  # the part sticking up (a knob's ridge), to grasp it by
            "upper_max": handle_hi,
            "ends": ends,  # "+"/"-": (min, max) of the part furthest along +axis / -axis
            "panel": panel,  # hinges: (8, 3) world corners of the largest geom's box
        }
    articulation = {
        name: obj.object_properties.get("articulation")
        for name, obj in {**env.objects_dict, **env.fixtures_dict}.items()
        if obj.object_properties.get("articulation")
    }
    return {
        "bddl_file": bddl_file,
        "eef_pos": d.site_xpos[index.grip_site].copy(),
        "eef_mat": d.site_xmat[index.grip_site].reshape(3, 3).copy(),
        "gripper_qpos": _gripper_qpos(env),
        "shoulder_pos": d.xpos[index.shoulder].copy(),
        "wrist_turn": float(d.qpos[index.wrist_qposadr]),
        "wrist_turn_range": index.wrist_range.copy(),
        "finger_tips": np.array([d.xpos[b] for b in index.finger_tips]),
        "objects": objects,
        "sites": sites,
        "joints": joints,
        "articulation": articulation,
        "time": float(d.time),
    }


def _upper_part(corners: np.ndarray, bottom: float, top: float):
    """Bounding box of the geoms (their corners, (g, 8, 3)) reaching into the top 40% of the part's height."""
    tops = corners[:, :, 2].max(axis=1)
    return _box(corners[tops > top - 0.4 * (top - bottom)].reshape(-1, 3))


def _end_part(corners: np.ndarray, direction, depth: float = 0.025):
    """Bounding box of the geoms (their corners, (g, 8, 3)) lying wholly within ``depth`` of the
    part's far end along ``direction``: a drawer's handle bar, without the standoffs that hold it."""
    if len(corners) == 0:
        return _box(corners.reshape(-1, 3))
    along = corners @ direction  # (g, 8)
    within = along.min(axis=1) >= along.max() - depth
    if not within.any():  # no geom is that thin (a table's single box): the one reaching furthest
        within = along.max(axis=1) >= along.max()
    return _box(corners[within].reshape(-1, 3))


def _gripper_qpos(env) -> np.ndarray:
    robot = env.robots[0]
    return np.array([env.sim.data.qpos[i] for i in robot._ref_gripper_joint_pos_indexes])
