"""Closed-loop manipulation skills built from motion primitives.

Each skill is a small state machine advanced once per policy query. It re-reads the scene
every time, so a slipped grasp or a moved object sends it back to an earlier phase instead
of executing a stale plan.
"""

from __future__ import annotations

import numpy as np

from policies.scripted.geometry import closest_finger_axis, grip_rotation, move_action
from policies.scripted.scene import GRIPPER_MAX_OPENING, Body, Scene

OPEN, CLOSE = -1.0, 1.0
HOLLOW_OBJECTS = ("bowl", "mug", "ramekin", "cup")  # grasped by the rim, not across the middle
CLOSED_ON_NOTHING = 0.004  # finger opening (m) below which a grasp holds nothing
APPROACH_CLEARANCE = 0.10  # height above the grasp point before descending


class SkillFailed(RuntimeError):
    pass


class Skill:
    """A state machine over named phases; ``act`` returns None once the skill is finished."""

    def __init__(self):
        self.phase = "start"
        self.ticks = 0  # queries spent in the current phase
        self.attempts = 0
        self.max_attempts = 4

    def goto(self, phase: str) -> None:
        self.phase, self.ticks = phase, 0

    def retry(self, scene: Scene) -> None:
        self.attempts += 1
        if self.attempts >= self.max_attempts:
            raise SkillFailed(f"{self} gave up after {self.attempts} attempts")
        self.goto("recover")

    def act(self, scene: Scene, steps: int) -> np.ndarray | None:
        raise NotImplementedError


def _near(a, b, tol: float) -> bool:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b))) < tol


def plan_grasp(body: Body, scene: Scene, others: list[Body]) -> tuple[np.ndarray, np.ndarray]:
    """Grasp point (world) and finger axis for a top-down grasp of ``body``."""
    height = body.top - body.bottom
    axes = body.horizontal_axes() or [(np.array([1.0, 0, 0]), body.aabb_max[0] - body.aabb_min[0])]
    if any(word in body.name for word in HOLLOW_OBJECTS):
        # Straddle the wall: one finger inside, one outside, on the rim side with most free space.
        radius = min(extent for _, extent in axes) / 2
        candidates = []
        for axis, extent in axes:
            for sign in (1.0, -1.0):
                if extent / 2 <= radius + 0.01:  # skips a mug's handle side
                    candidates.append(sign * axis)
        centre = body.center

        def clearance(direction):
            outer_finger = centre[:2] + direction[:2] * (radius + 0.04)
            gaps = [np.linalg.norm(np.clip(outer_finger, o.aabb_min[:2], o.aabb_max[:2]) - outer_finger) for o in others]
            return min(min(gaps, default=1.0), 0.05) - 0.001 * direction[0]  # ties: the side facing the robot

        direction = max(candidates, key=clearance)
        point = centre + direction * (radius - 0.006)
        point[2] = body.top - min(0.015, 0.3 * height)  # the inner finger must stay clear of the floor
        return point, closest_finger_axis(direction, scene.eef_mat)
    graspable = [(axis, extent) for axis, extent in axes if extent < GRIPPER_MAX_OPENING] or axes
    axis, _ = min(graspable, key=lambda item: item[1])
    point = body.center.copy()
    point[2] = max(body.top - min(0.03, 0.45 * height), body.bottom + 0.01)
    return point, closest_finger_axis(axis, scene.eef_mat)


class PickPlace(Skill):
    """Pick ``obj`` and put it so that its body origin lands on ``dest_xy`` at ``dest_z``.

    ``dest`` is recomputed every query from the scene (the destination may move when bumped).
    """

    def __init__(self, obj: str, destination, label: str):
        super().__init__()
        self.obj = obj
        self.destination = destination  # callable(scene) -> (xy target of body origin, bottom z)
        self.label = label
        self.grasp_point = None
        self.finger_axis = None
        self.hold_offset = None  # eef minus object origin once grasped
        self.last_eef_z = None

    def __repr__(self) -> str:
        return f"PickPlace({self.label})"

    def act(self, scene: Scene, steps: int) -> np.ndarray | None:
        self.ticks += 1
        body = scene.body(self.obj)
        eef = scene.eef_pos
        handler = getattr(self, f"_{self.phase}")
        return handler(scene, body, eef, steps)

    # -- phases ---------------------------------------------------------------------------
    def _start(self, scene, body, eef, steps):
        others = [b for b in scene.movable_bodies() if b.name != self.obj]
        self.grasp_point, self.finger_axis = plan_grasp(body, scene, others)
        self.grip_mat = grip_rotation(self.finger_axis)
        self.safe_z = max(eef[2], self.grasp_point[2] + APPROACH_CLEARANCE)
        self.goto("rise")
        return self._rise(scene, body, eef, steps)

    def _rise(self, scene, body, eef, steps):
        target = np.array([eef[0], eef[1], self.safe_z])
        if eef[2] > self.safe_z - 0.02 or self.ticks > 6:
            self.goto("above")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, OPEN, steps, speed=1.0)

    def _above(self, scene, body, eef, steps):
        target = self.grasp_point + [0, 0, APPROACH_CLEARANCE]
        target[2] = max(target[2], min(self.safe_z, target[2] + 0.05))
        if _near(eef, target, 0.015) or self.ticks > 12:
            self.goto("descend")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, OPEN, steps, speed=1.0)

    def _descend(self, scene, body, eef, steps):
        target = self.grasp_point
        stalled = self.last_eef_z is not None and abs(self.last_eef_z - eef[2]) < 0.002 and self.ticks > 2
        self.last_eef_z = eef[2]
        if _near(eef, target, 0.008) or stalled or self.ticks > 10:
            self.last_eef_z = None
            self.goto("close")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, OPEN, steps, speed=0.8)

    def _close(self, scene, body, eef, steps):
        if self.ticks > max(2, 12 // steps):
            if scene.gripper_width < CLOSED_ON_NOTHING:
                self.retry(scene)
                return self._recover(scene, body, eef, steps)
            self.hold_offset = eef - body.pos
            self.lift_start = (eef[2], body.pos[2])
            self.goto("lift")
        return move_action(eef, scene.eef_mat, self.grasp_point, self.grip_mat, CLOSE, steps, speed=0.2)

    def _carry_height(self, scene, body, eef):
        """Gripper height at which the held object's bottom clears everything on the way."""
        dest_xy, dest_bottom = self.destination(scene)
        clear = scene.highest_top_along(body.pos, dest_xy, exclude={self.obj})
        return max(clear, dest_bottom) + (eef[2] - body.bottom) + 0.04

    def _lift(self, scene, body, eef, steps):
        if self.ticks == 1:
            self.carry_z = self._carry_height(scene, body, eef)
        if self._dropped(scene, body, eef):
            self.retry(scene)
            return self._recover(scene, body, eef, steps)
        target = np.array([eef[0], eef[1], self.carry_z])
        if eef[2] > self.carry_z - 0.02 or self.ticks > 12:
            self.goto("carry")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=1.0)

    def _dropped(self, scene, body, eef) -> bool:
        if scene.gripper_width < CLOSED_ON_NOTHING:
            return True
        return not _near(eef - body.pos, self.hold_offset, 0.04)

    def _carry(self, scene, body, eef, steps):
        if self._dropped(scene, body, eef):
            self.retry(scene)
            return self._recover(scene, body, eef, steps)
        dest_xy, _ = self.destination(scene)
        offset = eef - body.pos
        target = np.array([dest_xy[0] + offset[0], dest_xy[1] + offset[1], self.carry_z])
        if _near(eef[:2], target[:2], 0.008) or self.ticks > 25:
            self.goto("lower")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=1.0)

    def _lower(self, scene, body, eef, steps):
        if self._dropped(scene, body, eef):
            self.goto("release")
            return self._release(scene, body, eef, steps)
        dest_xy, dest_bottom = self.destination(scene)
        offset = eef - body.pos
        target = np.array([dest_xy[0] + offset[0], dest_xy[1] + offset[1], eef[2] + dest_bottom - body.bottom])
        stalled = self.last_eef_z is not None and self.last_eef_z - eef[2] < 0.002 and self.ticks > 2
        self.last_eef_z = eef[2]
        if body.bottom - dest_bottom < 0.006 or stalled or self.ticks > 15:
            self.last_eef_z = None
            self.goto("release")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=0.6)

    def _release(self, scene, body, eef, steps):
        if self.ticks > max(2, 8 // steps):
            self.goto("retreat")
        return move_action(eef, scene.eef_mat, eef, self.grip_mat, OPEN, steps, speed=0.1)

    def _retreat(self, scene, body, eef, steps):
        target = eef.copy()
        target[2] = self.grasp_point[2] + 0.12 if self.grasp_point is not None else eef[2] + 0.1
        target[2] = max(target[2], body.top + 0.08)
        if eef[2] > target[2] - 0.02 or self.ticks > 6:
            self.goto("done")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, OPEN, steps, speed=0.6)

    def _recover(self, scene, body, eef, steps):
        """Open, back off upwards, and plan the grasp again from the current scene."""
        target = eef + [0, 0, 0.05]
        if self.ticks > 3:
            self.goto("start")
        return move_action(eef, scene.eef_mat, target, scene.eef_mat, OPEN, steps, speed=0.5)

    def _done(self, scene, body, eef, steps):
        return None
