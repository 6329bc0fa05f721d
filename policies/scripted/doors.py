"""Hinged doors (a microwave's): where the door and its doorway are, pushing the door shut, and
carrying an object in through the doorway."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.scripted.geometry import closest_finger_axis, grip_rotation, horizontal, move_action, unit
from policies.scripted.scene import GRIPPER_MAX_OPENING, Body, Scene
from policies.scripted.skills import (
    APPROACH_CLEARANCE,
    CLOSE,
    HAND_HALF_WIDTH,
    PickPlace,
    Skill,
    SkillFailed,
    _near,
    is_closed,
    opens_negative,
)


def rotate(v, axis, angle: float) -> np.ndarray:
    """``v`` turned by ``angle`` radians about the unit ``axis`` (right-handed)."""
    v = np.asarray(v, dtype=float)
    c, s = np.cos(angle), np.sin(angle)
    return v * c + np.cross(axis, v) * s + axis * float(axis @ v) * (1 - c)


@dataclass
class Door:
    """A door's panel seen from its hinge, at the joint position ``qpos``."""

    anchor: np.ndarray  # a point on the hinge axis
    axis: np.ndarray  # unit; a growing joint position turns the door right-handedly about it
    radial: np.ndarray  # unit, from the hinge towards the free edge, now
    closing: float  # +1 if closing makes the joint position grow, else -1
    reach: float  # hinge to the free edge
    outer: float  # where the panel's side that a closing push meets lies, along the closing motion (< 0)
    inner: float  # where the side that an opening push meets lies, along the closing motion
    top: float
    qpos: float
    closed_qpos: float

    def radial_at(self, qpos: float) -> np.ndarray:
        return rotate(self.radial, self.axis, qpos - self.qpos)

    def motion(self, radial) -> np.ndarray:
        """Where a point of the panel moves as the door closes."""
        return self.closing * np.cross(self.axis, radial)

    def push_point(self, qpos: float, radius: float, clearance: float, shut: bool = True) -> np.ndarray:
        """``clearance`` off the side of the panel that a push shutting (or opening) the door meets,
        ``radius`` from the hinge, with the door at ``qpos``."""
        radial = self.radial_at(qpos)
        offset = self.outer - clearance if shut else self.inner + clearance
        return self.anchor + radial * radius + self.motion(radial) * offset

    @property
    def entry(self) -> np.ndarray:
        """Horizontal direction into the container through the doorway: the closed door's closing motion."""
        return horizontal(self.motion(self.radial_at(self.closed_qpos)))

    @property
    def doorway_centre(self) -> np.ndarray:
        """Middle of the doorway, on its front plane (the hinge's), at the hinge's height."""
        return self.anchor + self.radial_at(self.closed_qpos) * self.reach / 2


def door(scene: Scene, joint_name: str) -> Door:
    """The door behind a hinge joint, from the snapshot's corners of its panel (its largest part)."""
    joint = scene.joint(joint_name)
    articulation = scene.articulation(joint["owner"])
    axis, anchor = unit(joint["axis"]), np.asarray(joint["anchor"], dtype=float)
    panel = np.asarray(joint["panel"], dtype=float) - anchor
    flat = panel - np.outer(panel @ axis, axis)  # seen along the hinge
    centre = flat.mean(axis=0)
    # the panel's long side: the principal direction of its box's corners, turned away from the hinge
    radial = np.linalg.eigh(np.cov((flat - centre).T))[1][:, -1]
    radial = radial if radial @ centre > 0 else -radial
    closing = 1.0 if opens_negative(articulation) else -1.0
    motion = closing * np.cross(axis, radial)
    return Door(anchor=anchor, axis=axis, radial=radial, closing=closing, reach=float(np.max(panel @ radial)),
                outer=float(np.min(panel @ motion)), inner=float(np.max(panel @ motion)),
                top=float(np.max(panel[:, 2]) + anchor[2]),
                qpos=float(joint["qpos"]), closed_qpos=float(np.mean(articulation["default_close_ranges"])))


# Push the panel this far out from the hinge, as a fraction of its reach: clear of a handle at the
# free edge, and far enough out that little force turns it.
PUSH_RADIUS = 0.6
PUSH_BELOW_TOP = 0.03  # fingertips this far below the panel's top: the hand stays above the door
FINGER_CLEARANCE = 0.012  # grip site to the face of the closed fingers
PUSH_AHEAD = 0.4  # rad: the push aims at where the contact point will be this much further on


def doorway_clear(d: Door, panel) -> bool:
    """Whether the open panel (its corners) stays out of the way of a hand carrying something in
    through the doorway: the hand, 22 cm wide across the way in, is centred on the doorway."""
    across = horizontal(d.radial_at(d.closed_qpos))
    lane_edge = d.reach / 2 - HAND_HALF_WIDTH - 0.01  # from the hinge, across the doorway
    return float(np.max((np.asarray(panel) - d.anchor) @ across)) <= lane_edge


class PushDoor(Skill):
    """Push a hinged door shut, or (``shut=False``) further open until it is clear of the doorway:
    closed fingers against the side of the panel the push meets, near its top, moved along the arc
    the contact point travels, re-aimed from the door's angle every query. The hand rises above the
    door before going round it."""

    def __init__(self, joint: str, articulation: dict, label: str, shut: bool = True):
        super().__init__(label)
        self.joint = joint
        self.articulation = articulation
        self.shut = shut

    def done(self, scene: Scene, d: Door) -> bool:
        if self.shut:
            return is_closed(self.articulation, d.qpos)
        return doorway_clear(d, scene.joint(self.joint)["panel"])

    def act(self, scene: Scene, steps: int) -> np.ndarray | None:
        self.ticks += 1
        d = door(scene, self.joint)
        eef = scene.eef_pos
        if self.phase == "start":
            if self.done(scene, d):
                return None
            self.radius, self.height = PUSH_RADIUS * d.reach, d.top - PUSH_BELOW_TOP
            self.clear_z = max(d.top + APPROACH_CLEARANCE, eef[2])
            # the hand keeps its turn about the vertical: turned the 90 degrees to put the fingers side by
            # side along the panel, it stayed 0.9 rad short and 3-4 cm off its aim (libero_10 task 9, init 3)
            self.grip_mat = grip_rotation(horizontal(scene.eef_mat[:, 0]))
            self.goto("rise")
        contact = self._contact(d, d.qpos)
        grip_mat = self.grip_mat
        if self.phase == "rise":
            target = np.array([eef[0], eef[1], self.clear_z])
            if eef[2] > self.clear_z - 0.02 or self.ticks > 6:
                self.goto("above")
            return move_action(eef, scene.eef_mat, target, grip_mat, CLOSE, steps, speed=1.0)
        way = 1.0 if self.shut else -1.0  # along the closing motion
        outside = contact - way * d.motion(d.radial) * 0.03
        if self.phase == "above":
            target = np.array([outside[0], outside[1], self.clear_z])
            if _near(eef, target, 0.02) or self.ticks > 12:
                self.goto("down")
            return move_action(eef, scene.eef_mat, target, grip_mat, CLOSE, steps, speed=1.0)
        if self.phase == "down":
            if _near(eef, outside, 0.01) or self.ticks > 10:
                self.goto("push")
            return move_action(eef, scene.eef_mat, outside, grip_mat, CLOSE, steps, speed=0.8)
        if self.phase == "push":
            if self.done(scene, d):
                return None  # left pressing on the door; the next skill moves the hand on
            if self.ticks > 40:
                self.retry(scene)
                self.goto("rise")
            target = self._contact(d, d.qpos + way * d.closing * PUSH_AHEAD)
            return move_action(eef, scene.eef_mat, target, grip_mat, CLOSE, steps, speed=1.0)
        return None

    def _contact(self, d: Door, qpos: float) -> np.ndarray:
        point = d.push_point(qpos, self.radius, FINGER_CLEARANCE, self.shut)
        point[2] = self.height
        return point


# The hand's side facing the doorway lies this far from the grip site (the Panda hand is about 7 cm
# thick across its fingers' closing direction): the grip site stops this far short of the doorway.
HAND_CLEARANCE = 0.045
INSERT_ABOVE_FLOOR = 0.025  # the object's bottom this far above the container's floor on the way in


class PutThroughDoor(PickPlace):
    """Put an object into a container through its open door (a mug into a microwave).

    A top-down hand cannot go in: the container's top is lower than the hand over the object. So
    the object is held from above by its part that faces the doorway (a mug's handle, turned
    towards it), fingers closing across the way in; carried to the doorway, lowered to just above
    the container's floor, moved in until the hand reaches the doorway, and put down. What is left
    sticking out (the handle), the door pushes in as it closes.
    """

    def __init__(self, obj: str, region: str, joint: str, label: str):
        super().__init__(obj, self._put_down_here, label)
        self.region = region
        self.joint = joint
        self.last_progress = None

    def _put_down_here(self, scene: Scene):
        """For the final lowering inside: straight down to the region's floor."""
        return scene.body(self.obj).pos[:2], scene.site(self.region).lo[2]

    def plan_grasp(self, scene: Scene, body: Body) -> tuple[np.ndarray, np.ndarray]:
        entry = door(scene, self.joint).entry
        axis = int(np.argmax(np.abs(entry[:2])))  # the snapshot's end ("+x", "-y", ...) facing the doorway
        facing = ("-" if entry[axis] > 0 else "+") + "xy"[axis]
        lo, hi = (np.asarray(v, dtype=float) for v in body.ends[facing])
        finger_axis = np.array([-entry[1], entry[0], 0.0])  # across the way in
        if float(np.abs(finger_axis) @ (hi - lo)) > GRIPPER_MAX_OPENING - 0.02:
            raise SkillFailed(f"{self}: {self.obj}'s side facing the doorway is too wide to hold")
        point = np.array([*(lo[:2] + hi[:2]) / 2, max(hi[2] - 0.015, lo[2] + 0.005)])
        return point, closest_finger_axis(finger_axis, scene.eef_mat)

    def _lift(self, scene, body, eef, steps):
        if self.ticks == 1:
            self._plan_insertion(scene, body, eef)
        return super()._lift(scene, body, eef, steps)

    def _plan_insertion(self, scene: Scene, body: Body, eef) -> None:
        """Grip-site waypoints: in front of the doorway (the object clear of it), then inside (the
        hand just short of it), with the object centred across the doorway, just above the floor."""
        d = door(scene, self.joint)
        entry, across = d.entry, horizontal(d.radial_at(d.closed_qpos))
        centre = (body.aabb_min + body.aabb_max) / 2 - eef
        corners = np.array([[x, y] for x in (body.aabb_min[0], body.aabb_max[0])
                            for y in (body.aabb_min[1], body.aabb_max[1])]) - eef[:2]
        ahead = float(np.max(corners @ entry[:2]))  # how far the object reaches past the grip site
        doorway = d.doorway_centre - across * float(centre @ across)
        self.insert_z = scene.site(self.region).lo[2] + INSERT_ABOVE_FLOOR + (eef[2] - body.bottom)
        self.entry = entry
        self.staging = doorway - entry * (ahead + 0.03)
        self.inside = doorway - entry * HAND_CLEARANCE
        self.staging[2] = self.inside[2] = self.insert_z

    def _carry_height(self, scene, body, eef):
        """Clear of what stands on the way to the doorway (not the container: it is entered from the side)."""
        exclude = {self.obj, scene.joint(self.joint)["owner"]}
        clear = scene.highest_top_along(body.pos, self.staging - (eef - body.pos), exclude=exclude)
        object_clear = clear + (eef[2] - body.bottom) + 0.03
        hand_clear = scene.highest_top_along(eef, self.staging, exclude=exclude, margin=HAND_HALF_WIDTH) - 0.04
        return max(object_clear, hand_clear, self.insert_z)

    def _carry(self, scene, body, eef, steps):
        if self._dropped(scene, body, eef):
            self.retry(scene)
            return self._recover(scene, body, eef, steps)
        target = np.array([self.staging[0], self.staging[1], self.carry_z])
        if _near(eef[:2], target[:2], 0.01) or self.ticks > 25:
            self.goto("front")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=1.0)

    def _front(self, scene, body, eef, steps):
        """Down to the height of the way in, in front of the doorway."""
        if self._dropped(scene, body, eef):
            self.retry(scene)
            return self._recover(scene, body, eef, steps)
        if _near(eef, self.staging, 0.01) or self.ticks > 12:
            self.goto("insert")
        return move_action(eef, scene.eef_mat, self.staging, self.grip_mat, CLOSE, steps, speed=0.8)

    def _insert(self, scene, body, eef, steps):
        if self._dropped(scene, body, eef):
            self.retry(scene)
            return self._recover(scene, body, eef, steps)
        progress = float(eef[:2] @ self.entry[:2])  # how far in the hand has come
        stalled = self.ticks > 2 and self.last_progress is not None and abs(progress - self.last_progress) < 0.002
        self.last_progress = progress
        if _near(eef, self.inside, 0.01) or stalled or self.ticks > 15:
            self.last_progress = None
            self.goto("lower")
        return move_action(eef, scene.eef_mat, self.inside, self.grip_mat, CLOSE, steps, speed=0.6)
