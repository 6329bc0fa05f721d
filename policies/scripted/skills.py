"""Closed-loop manipulation skills built from motion primitives.

Each skill is a small state machine advanced once per policy query. It re-reads the scene
every time, so a slipped grasp or a moved object sends it back to an earlier phase instead
of executing a stale plan.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from policies.scripted.geometry import (
    closest_finger_axis,
    grip_rotation,
    horizontal,
    move_action,
    rotation_error,
    tilted_towards,
    unit,
    yaw_rotation,
)
from policies.scripted.scene import GRIPPER_MAX_OPENING, Body, Scene

OPEN, CLOSE = -1.0, 1.0
HOLLOW_OBJECTS = ("bowl", "mug", "ramekin", "cup")  # grasped by the rim, not across the middle
WIDE_VESSELS = ("frypan",)  # held by the handle, or else by the rim
# A dish (a plate) is wider than the open fingers on every side and lower than this; it is slid,
# not lifted: a grasp of the plate's 5 mm rim slips during the lift.
DISH_HEIGHT = 0.03
# Finger opening (m) below which a closed grasp holds nothing: closing on air reaches 0.0026 after
# 14 steps and 0.0018 after 20; a bowl's 3 mm rim keeps it at 0.004.
CLOSED_ON_NOTHING = 0.003
CLOSE_STEPS = 16
APPROACH_CLEARANCE = 0.10  # height above the grasp point before descending
HAND_HALF_WIDTH = 0.11
LINE_UP = 0.01  # how much further (m) than on its spot a held object may reach over a container's wall
FAR_REACH = 0.70  # horizontal distance from the shoulder beyond which the arm is nearly stretched
# How close (rad) the arm's last joint may be expected to come to its limit before a grasp turns the
# hand the other way round. The estimate (``wrist_turn_on_the_way``) came within 0.22 rad of the
# joint's position after 42 of 44 grasps (0.36 after the other two); grasps whose carry was
# estimated to come 0.12 rad from the limit succeeded.
WRIST_MARGIN = 0.1


class SkillFailed(RuntimeError):
    pass


class Skill(ABC):
    """A state machine over named phases; ``act`` returns None once the skill is finished."""

    def __init__(self, label: str):
        self.label = label  # the goal predicate it serves, for messages
        self.phase = "start"
        self.ticks = 0  # queries spent in the current phase
        self.attempts = 0
        self.max_attempts = 4

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label})"

    def goto(self, phase: str) -> None:
        self.phase, self.ticks = phase, 0

    def retry(self, scene: Scene) -> None:
        self.attempts += 1
        if self.attempts >= self.max_attempts:
            raise SkillFailed(f"{self} gave up after {self.attempts} attempts")
        self.goto("recover")

    @abstractmethod
    def act(self, scene: Scene, steps: int) -> np.ndarray | None:
        """The next action (repeated over the chunk), or None when the skill is done."""

    def run_phase(self, scene: Scene, body, steps: int) -> np.ndarray | None:
        """Call the current phase's method ``_<phase>(scene, body, eef, steps)``."""
        self.ticks += 1
        return getattr(self, f"_{self.phase}")(scene, body, scene.eef_pos, steps)

    def approach(self, scene: Scene, steps: int, point, gripper: float, then: str, tolerance: float) -> np.ndarray:
        """Phases ``above`` (over ``point``) and ``descend`` (onto it), then phase ``then``."""
        eef = scene.eef_pos
        if self.phase == "above":
            target = point + np.array([0, 0, APPROACH_CLEARANCE])
            if _near(eef, target, 0.015) or self.ticks > 12:
                self.goto("descend")
            return move_action(eef, scene.eef_mat, target, self.grip_mat, gripper, steps, speed=1.0)
        if _near(eef, point, tolerance) or self.ticks > 8:
            self.goto(then)
        return move_action(eef, scene.eef_mat, point, self.grip_mat, gripper, steps, speed=0.8)


def approach_speed(scene: Scene, target) -> float:
    """Full speed, except on the way out to a place more than 0.70 m from the shoulder (horizontally),
    where the hand slows down over its last 15 cm. Arriving at full speed over a bowl at the far end of
    the cabinet (0.73 m), the shoulder kept pitching forward and the elbow straightening (joints at
    1.5 rad/s); from that stretched posture the descent drifted 2.5 cm further out and the fingers came
    down on the rim."""
    shoulder = scene.shoulder_pos[:2]
    reach = np.linalg.norm(target[:2] - shoulder)
    if reach <= FAR_REACH or reach <= np.linalg.norm(scene.eef_pos[:2] - shoulder):
        return 1.0
    return float(np.clip(np.linalg.norm(target - scene.eef_pos) / 0.15, 0.3, 1.0))


def wrist_turn_on_the_way(scene: Scene, finger_axis, places, turn: float = 0.0) -> list[float]:
    """The arm's last joint (rad), estimated at each of ``places`` in turn, with the hand (pointing
    down) turned to close its fingers along ``finger_axis`` at the first and then carried, turned by
    ``turn`` more at the last. Swinging about the shoulder turns the hand with the arm; the last joint
    makes up the difference, so it moves by the swing minus the hand's own turn."""
    def heading(v) -> float:  # of a horizontal direction, about the vertical
        return float(np.arctan2(v[1], v[0]))

    joint = scene.wrist_turn - _wrap(heading(finger_axis) - heading(scene.eef_mat[:, 0]))
    turns, here = [], scene.eef_pos
    for place in places:
        joint += _wrap(heading(place - scene.shoulder_pos) - heading(here - scene.shoulder_pos))  # the arm's swing
        turns.append(joint)
        here = place
    turns[-1] -= turn
    return turns


def keep_wrist_in_range(scene: Scene, finger_axis, places, turn: float = 0.0) -> np.ndarray:
    """``finger_axis`` (the smaller turn of the hand), or ``-finger_axis`` (the gripper is symmetric)
    when the first would bring the last joint within WRIST_MARGIN of its limit on the way and the
    other moves the joint less to the grasp.

    At its limit the joint holds the hand back: at libero_spatial task 1, init state 33, the hand
    closed 3 cm off its aim on the bowl's rim, the bowl slipped out in the lift, and the second try
    never reached its place above the bowl; turned the other way round, the joint moves 0.9 rad
    instead of 2.3 (estimated). A joint already near its limit stays there: after opening the drawer in
    libero_goal task 3 it stands at 2.87 rad, 0.16 rad short of the bowl's grasp; the other way round
    took 3 rad of travel, and the hand, still turning as it closed, missed the rim (27 of 50
    successes, 49 without turning it round)."""
    low, high = scene.wrist_turn_range

    def room(axis):
        return min(min(q - low, high - q) for q in wrist_turn_on_the_way(scene, axis, places, turn))

    def travel(axis):
        return abs(wrist_turn_on_the_way(scene, axis, places[:1])[0] - scene.wrist_turn)

    if room(finger_axis) >= WRIST_MARGIN or travel(-finger_axis) >= travel(finger_axis):
        return finger_axis
    return -finger_axis


def _wrap(angle: float) -> float:
    return float((angle + np.pi) % (2 * np.pi) - np.pi)


def _near(a, b, tol: float) -> bool:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b))) < tol


def plan_grasp(body: Body, scene: Scene, others: list[Body]) -> tuple[np.ndarray, np.ndarray]:
    """Grasp point (world) and finger axis for a top-down grasp of ``body``."""
    height = body.top - body.bottom
    axes = body.horizontal_axes() or [(np.array([1.0, 0, 0]), body.aabb_max[0] - body.aabb_min[0])]
    if any(word in body.name for word in HOLLOW_OBJECTS):
        return _rim_grasp(body, scene, others)
    graspable = [(axis, extent) for axis, extent in axes if extent < GRIPPER_MAX_OPENING]
    if not graspable and body.top - body.bottom > DISH_HEIGHT:  # a pan, a moka pot: by the handle
        if handle := _handle_grasp(body, scene, others):
            return handle
        if any(word in body.name for word in WIDE_VESSELS):
            return _rim_grasp(body, scene, others)
    axis, _ = min(graspable or axes, key=lambda item: item[1])
    point = body.center.copy()
    point[2] = max(body.top - min(0.03, 0.45 * height), body.bottom + 0.01)
    point[:2] = _roomiest_along(body, point, axis, others)
    return point, closest_finger_axis(axis, scene.eef_mat)


def _roomiest_along(body: Body, point, finger_axis, others: list[Body]) -> np.ndarray:
    """Where along the object's long side, within 2 cm of either end, the open fingers and the hand
    have most room (``room_for_hand``); the middle unless something stands within 3 cm of them there
    (libero_10 task 1: a milk carton beside the cream cheese box stopped a finger 6 cm up)."""
    across = horizontal(finger_axis)[:2]
    along = np.array([-across[1], across[0]])
    length = max((extent for axis, extent in body.horizontal_axes() if abs(axis[:2] @ along) > 0.7), default=0.0)
    reach = max(0.0, length / 2 - 0.02)
    reached = [o for o in others if o.top > point[2] - 0.02]
    tall = [o for o in others if o.top > body.top + 0.03]
    spots = [point[:2] + t * along for t in np.linspace(-reach, reach, 9)]
    return _roomiest(spots, point[:2], across, reached, tall)


def _roomiest(spots, middle, across, reached: list[Body], tall: list[Body]) -> np.ndarray:
    """Of ``spots`` (xy), the one with most ``room_for_hand``; ties go to the one nearest ``middle``."""
    return max(spots, key=lambda xy: room_for_hand(xy, across, reached, tall) - 0.01 * np.linalg.norm(xy - middle))


def room_for_hand(xy, across, reached: list[Body], tall: list[Body]) -> float:
    """Horizontal room, up to 3 cm, around the open fingers at ``xy`` (closing along the horizontal
    unit ``across``) from what their tips come down to (``reached``), and around the hand above them
    from what stands tall enough to meet it (``tall``)."""
    finger = across * (GRIPPER_MAX_OPENING / 2 + 0.01)
    hand = across * (HAND_HALF_WIDTH - 0.04)
    fingers = min(gap(xy + finger, reached), gap(xy - finger, reached))
    return min(fingers, gap(xy + hand, tall), gap(xy - hand, tall), 0.03)


def _handle_grasp(body: Body, scene: Scene, others: list[Body]) -> tuple[np.ndarray, np.ndarray] | None:
    """An object too wide for the fingers every way (a frying pan, a moka pot) is held by its
    handle: of the parts furthest out along +-x and +-y, the one longest along its way out and
    narrow enough across it for the fingers (the pan's other ends are pieces of its rim, 4 cm
    long). Along the handle, where the open fingers and the hand have most room (a moka pot can
    stand beside it); None if they have none."""
    best = None
    for label, (lo, hi) in body.ends.items():
        lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
        out = 0 if label[1] == "x" else 1
        length, width = hi[out] - lo[out], hi[1 - out] - lo[1 - out]
        if width < GRIPPER_MAX_OPENING - 0.02 and length > 2 * width and (best is None or length > best[0]):
            best = (length, lo, hi, 1 - out)
    if best is None:
        return None
    _, lo, hi, across = best
    z = max(hi[2] - 0.015, (lo[2] + hi[2]) / 2)
    reached = [o for o in others if o.top > z - 0.02]  # what the fingertips come down to
    tall = [o for o in others if o.top > hi[2] + 0.03]  # what the hand, above the fingers, can hit
    middle = (lo[:2] + hi[:2]) / 2
    along = []
    for f in np.linspace(0.1, 0.9, 9):
        xy = middle.copy()
        xy[1 - across] = lo[1 - across] + f * (hi[1 - across] - lo[1 - across])
        along.append(xy)
    finger_axis = np.eye(2)[across]
    xy = _roomiest(along, middle, finger_axis, reached, tall)
    if room_for_hand(xy, finger_axis, reached, tall) <= 0.0:
        return None  # the hand would come down on something standing beside the handle
    return np.array([*xy, z]), closest_finger_axis(np.eye(3)[across], scene.eef_mat)


def gap(point, bodies: list[Body]) -> float:
    """Horizontal distance from ``point`` to the nearest of ``bodies``' footprints (0 inside one)."""
    distances = (np.linalg.norm(np.clip(point, o.aabb_min[:2], o.aabb_max[:2]) - point) for o in bodies)
    return min(distances, default=1.0)


def _rim_grasp(body: Body, scene: Scene, others: list[Body]) -> tuple[np.ndarray, np.ndarray]:
    """Straddle the wall of a bowl or mug: one finger inside, one outside, fingers radial.

    Works in the vessel's own frame (its z axis is the vessel's axis), so a tilted bowl is
    grasped where its rim really is. A side reaching much further out than the others holds a
    handle and is skipped; of the remaining sides the one with most room for the outer finger wins.
    """
    sides = []
    for k in (0, 1):
        for sign, bound in ((1.0, body.box_max[k]), (-1.0, body.box_min[k])):
            local = np.zeros(3)
            local[k] = sign
            sides.append((local, abs(bound)))
    radius = min(r for _, r in sides)
    rim_height = body.box_max[2]

    def world(local_point):
        return body.pos + body.mat @ local_point

    tall = [o for o in others if o.top > body.top + 0.03]  # what the hand, above the fingers, can hit

    def room(side):
        local, r = side
        outer_finger = world(local * (r + 0.04))[:2]
        hand_edge = world(local * (r + HAND_HALF_WIDTH - 0.04))[:2]
        facing_robot = -(body.mat @ local)[0]  # ties: the side facing the robot (at -x)
        return min(gap(outer_finger, others), 0.05) + min(gap(hand_edge, tall), 0.05) + 0.001 * facing_robot

    local, r = max((side for side in sides if side[1] <= radius + 0.01), key=room)
    depth = min(0.015, 0.3 * rim_height)  # the inner finger must stay clear of the floor
    point = world(local * (r - 0.006) + np.array([0.0, 0.0, rim_height - depth]))
    return point, closest_finger_axis(body.mat @ local, scene.eef_mat)


class PickPlace(Skill):
    """Pick ``obj`` and put it so that its body origin lands on ``dest_xy`` at ``dest_z``.

    ``dest`` is recomputed every query from the scene (the destination may move when bumped).
    """

    def __init__(self, obj: str, destination, label: str, fit_into: str | None = None):
        super().__init__(label)
        self.obj = obj
        self.destination = destination  # callable(scene) -> (xy target of body origin, bottom z)
        self.fit_into = fit_into  # a region the object goes into: turned on the way to lie along it
        self.grasp_point = None
        self.finger_axis = None
        self.hold_offset = None  # eef minus object origin once grasped
        self.leaving = -np.inf  # top of what the hand started over
        self.last_eef_z = None
        self.last_object_pos = None

    def act(self, scene: Scene, steps: int) -> np.ndarray | None:
        return self.run_phase(scene, scene.body(self.obj), steps)

    # -- phases ---------------------------------------------------------------------------
    def plan_grasp(self, scene: Scene, body: Body) -> tuple[np.ndarray, np.ndarray]:
        """Grasp point and finger axis."""
        return plan_grasp(body, scene, [b for b in scene.bodies() if b.name != self.obj])

    def _start(self, scene, body, eef, steps):
        self.grasp_point, finger_axis = self.plan_grasp(scene, body)
        dest_xy, dest_bottom = self.destination(scene)
        turn = turn_to_fit(body, scene.site(self.fit_into)) if self.fit_into else 0.0
        places = [self.grasp_point, np.array([*dest_xy, dest_bottom])]
        self.finger_axis = keep_wrist_in_range(scene, finger_axis, places, turn)
        self.grip_mat = grip_rotation(self.finger_axis)
        self.leaving = self._under_hand(scene)
        self.safe_z = max(eef[2], self.grasp_point[2] + APPROACH_CLEARANCE, self.leaving + 0.04)
        self.goto("rise")
        return self._rise(scene, body, eef, steps)

    def _under_hand(self, scene) -> float:
        """Top of the tallest movable thing (other than the object) under the fingers: the basket the
        hand has just put something into, whose wall it would drag along (libero_10 task 1). Fixtures
        do not move; rising above a cabinet after opening its drawer would only cost steps."""
        return scene.highest_top_along(scene.eef_pos, scene.eef_pos, exclude={self.obj} | scene.fixtures(), margin=0.04)

    def _rise(self, scene, body, eef, steps):
        target = np.array([eef[0], eef[1], self.safe_z])
        if eef[2] > self.safe_z - 0.02 or self.ticks > 6:
            self.goto("above")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, OPEN, steps, speed=1.0)

    def _above(self, scene, body, eef, steps):
        target = self.grasp_point + [0, 0, APPROACH_CLEARANCE]
        target[2] = max(target[2], min(self.safe_z, target[2] + 0.05))
        if self.leaving > target[2] - 0.04 and self._under_hand(scene) >= self.leaving:
            target[2] = max(target[2], self.safe_z)  # still over the basket it started in: stay up
        if _near(eef, target, 0.015) or self.ticks > 12:
            self.goto("descend")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, OPEN, steps, speed=approach_speed(scene, target))

    def _descend(self, scene, body, eef, steps):
        target = self.grasp_point
        stalled = self.last_eef_z is not None and abs(self.last_eef_z - eef[2]) < 0.002 and self.ticks > 2
        self.last_eef_z = eef[2]
        if _near(eef, target, 0.008) or stalled or self.ticks > 10:
            self.last_eef_z = None
            self.goto("close")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, OPEN, steps, speed=0.8)

    def _close(self, scene, body, eef, steps):
        if self.ticks > max(2, CLOSE_STEPS // steps):
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
        # generous: an object held by its rim hangs tilted and reaches lower than it did on the table
        object_clear = max(clear, dest_bottom) + (eef[2] - body.bottom) + 0.08
        # the hand is ~20 cm wide and starts ~6 cm above the grip site
        hand_clear = scene.highest_top_along(eef, dest_xy, exclude={self.obj}, margin=HAND_HALF_WIDTH) - 0.04
        return max(object_clear, hand_clear)

    def _lift(self, scene, body, eef, steps):
        if self.ticks == 1:
            self.carry_z = self._carry_height(scene, body, eef)
        if self._dropped(scene, body, eef):
            self.retry(scene)
            return self._recover(scene, body, eef, steps)
        target = np.array([eef[0], eef[1], self.carry_z])
        if eef[2] > self.carry_z - 0.02 or self.ticks > 12:
            self.goto("carry")
        # The first 2 cm slowly: a bowl held by its lip, lifted from one side, slipped out of a fast start.
        speed = 0.25 if eef[2] < self.lift_start[0] + 0.02 else 1.0
        return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=speed)

    def _dropped(self, scene, body, eef) -> bool:
        if scene.gripper_width < CLOSED_ON_NOTHING:
            return True
        return not _near(eef - body.pos, self.hold_offset, 0.04)

    def _carry(self, scene, body, eef, steps):
        if self._dropped(scene, body, eef):
            self.retry(scene)
            return self._recover(scene, body, eef, steps)
        if self.ticks == 1 and self.fit_into:
            self.grip_mat = yaw_rotation(turn_to_fit(body, scene.site(self.fit_into))) @ self.grip_mat
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
        lining_up = self._over_a_wall(scene, body, dest_xy)
        if lining_up:
            target[2] = eef[2]  # across first: the hand may still be sliding on from the carry
        stalled = self.last_eef_z is not None and self.last_eef_z - eef[2] < 0.002 and self.ticks > 2
        self.last_eef_z = None if lining_up else eef[2]  # not going down is no stall
        if body.bottom - dest_bottom < 0.006 or stalled or self.ticks > 15:
            self.last_eef_z = None
            self.goto("release")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=0.6)

    def _over_a_wall(self, scene, body, dest_xy) -> bool:
        """Whether the object, still above the rim of the container it goes into, reaches more than
        LINE_UP further out over one of the container's walls than it will on its spot. Arriving at
        full speed over the basket, the hand slid on 1.7 cm, and the tomato sauce, lowered at once,
        came down on the basket's wall (libero_10 task 0). Sliding on along a drawer's width is
        harmless, and the bowl in libero_goal task 3 has no steps to spare for lining up."""
        if not self.fit_into:
            return False
        region = scene.site(self.fit_into)
        if body.bottom < region.hi[2]:
            return False

        def beyond_walls(shift):  # how far the footprint, moved by shift, reaches past each side
            return np.concatenate([region.lo[:2] - (body.aabb_min[:2] + shift), body.aabb_max[:2] + shift - region.hi[:2]])

        on_spot = np.maximum(beyond_walls(dest_xy - body.pos[:2]), 0.0)
        return bool(np.any(beyond_walls(np.zeros(2)) > on_spot + LINE_UP))

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
        """Open, back off upwards, and plan again once the object has come to rest."""
        resting = self.last_object_pos is not None and _near(body.pos, self.last_object_pos, 0.003)
        self.last_object_pos = body.pos.copy()
        if self.ticks > 3 and resting:
            self.last_object_pos = None
            self.goto("start")
        target = np.array([eef[0], eef[1], max(eef[2], body.top + 0.06)])
        return move_action(eef, scene.eef_mat, target, self.grip_mat, OPEN, steps, speed=0.5)

    def _done(self, scene, body, eef, steps):
        return None


# An object or a region counts as elongated when its longer horizontal side is this many times
# its shorter one: only then is there a way round that fits better.
ELONGATED = 1.3


def turn_to_fit(body: Body, region) -> float:
    """Turn (rad, about the vertical) that lays an elongated object along an elongated region
    (a book into a caddy's narrow compartment); 0 when either is about square."""
    axes = body.horizontal_axes()
    half = region.half_extent[:2]
    if len(axes) < 2 or max(half) < ELONGATED * min(half):
        return 0.0
    ordered = sorted(axes, key=lambda axis: axis[1])
    short, (long_dir, long) = ordered[0][1], ordered[-1]
    if long < ELONGATED * short:
        return 0.0
    along = np.eye(3)[int(np.argmax(half))]
    angle = np.arctan2(along[1], along[0]) - np.arctan2(long_dir[1], long_dir[0])
    return float((angle + np.pi / 2) % np.pi - np.pi / 2)  # either end first: at most a quarter turn


# The plate stands on a floor reaching 45% of its radius; beyond, its rim rises at 20 degrees.
# The fingers press at 30% of the radius: at 60% they tipped the 12 g plate up and slid out.
FINGERS_AT_RADIUS = 0.3
SLIDE_STEP = 0.05  # how far (m) the fingers lead the dish's remaining way per query
# The slide aims at the region's centre and stops once the origin is this far inside its border
# (LIBERO wants it strictly inside).
ARRIVAL_MARGIN = 0.01
# The pads' bottom is 9 mm below the grip site: aiming the grip site this high above the dish's
# bottom presses them on its floor with the remaining 1 cm of position error.
PRESS_HEIGHT = 0.008


def is_dish(body: Body) -> bool:
    """Too wide for the fingers on every horizontal side and too flat to hold by its rim."""
    axes = body.horizontal_axes()
    too_wide = bool(axes) and all(extent > GRIPPER_MAX_OPENING for _, extent in axes)
    return too_wide and body.top - body.bottom < DISH_HEIGHT


def dish_radius(dish: Body) -> float:
    """Half the dish's narrower horizontal extent: where its rim ends, whichever way it is turned."""
    return min(extent for _, extent in dish.horizontal_axes()) / 2


class SlideDish(Skill):
    """Slide a dish (a plate) over the table until its origin is inside a region of the table.

    Closed fingers go down inside the dish, on its floor, on the side facing the destination,
    press, and move on: the pads' friction (2) against the plate's on the table (0.95) drags the
    dish along, and the rim ahead of the pads stops them slipping through. Pushing from outside
    fails on the plate: the cabinet behind it leaves no room for the hand, and the rim's
    underside slopes up, so a finger low enough to catch it wedges underneath. The fingers are
    lined up along the way: the hand's narrow side leads, its long side stays over the dish,
    clear of its neighbours.

    Closed loop: every query the fingers are sent on by the dish's remaining way (at most
    ``SLIDE_STEP``), re-aimed from where the dish now is; fingers that reach the dish's rim (the
    dish stuck against something) or rise above it lift and go down again where they should be.
    """

    def __init__(self, obj: str, region: str, label: str):
        super().__init__(label)
        self.obj = obj
        self.region = region
        self.last_eef_z = None

    def act(self, scene: Scene, steps: int) -> np.ndarray | None:
        return self.run_phase(scene, scene.body(self.obj), steps)

    def remaining(self, scene: Scene, dish: Body) -> np.ndarray:
        """Horizontal vector from the dish's origin to the region's centre."""
        return scene.site(self.region).pos[:2] - dish.pos[:2]

    def arrived(self, scene: Scene, dish: Body) -> bool:
        region = scene.site(self.region)
        margin = np.minimum(ARRIVAL_MARGIN, region.half_extent[:2] / 2)
        return bool(np.all((dish.pos[:2] > region.lo[:2] + margin) & (dish.pos[:2] < region.hi[:2] - margin)))

    def finger_point(self, scene: Scene, dish: Body) -> np.ndarray:
        """Where the closed fingers go down: on the floor, on the side facing the destination."""
        xy = dish.center[:2] + unit(self.remaining(scene, dish)) * FINGERS_AT_RADIUS * dish_radius(dish)
        return np.array([xy[0], xy[1], dish.bottom + PRESS_HEIGHT])

    def fingers_in_dish(self, dish: Body, eef: np.ndarray) -> bool:
        """Grip site well inside the dish's rim and not lifted above it."""
        inside = np.linalg.norm(eef[:2] - dish.center[:2]) < dish_radius(dish) - 0.01
        return bool(inside) and eef[2] < dish.top + 0.005

    # -- phases ---------------------------------------------------------------------------
    def _start(self, scene, dish, eef, steps):
        if self.arrived(scene, dish):
            return None
        self.point = self.finger_point(scene, dish)
        heading = unit(self.remaining(scene, dish))
        self.grip_mat = grip_rotation(closest_finger_axis(heading, scene.eef_mat))
        # the hand is ~20 cm wide and starts ~4 cm above the grip site
        hand_clear = scene.highest_top_along(eef, self.point, exclude={self.obj}, margin=HAND_HALF_WIDTH) - 0.02
        self.travel_z = max(dish.top + APPROACH_CLEARANCE / 2, hand_clear)
        self.goto("above")
        return self._above(scene, dish, eef, steps)

    def _above(self, scene, dish, eef, steps):
        target = np.array([self.point[0], self.point[1], self.travel_z])
        if _near(eef, target, 0.015) or self.ticks > 12:
            self.goto("descend")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=1.0)

    def _descend(self, scene, dish, eef, steps):
        stalled = self.last_eef_z is not None and abs(self.last_eef_z - eef[2]) < 0.002 and self.ticks > 2
        self.last_eef_z = eef[2]
        if stalled or self.ticks > 10:
            self.last_eef_z = None
            self.goto("slide")
        return move_action(eef, scene.eef_mat, self.point, self.grip_mat, CLOSE, steps, speed=1.0)

    def _slide(self, scene, dish, eef, steps):
        if self.arrived(scene, dish):
            self.goto("retreat")
            return self._retreat(scene, dish, eef, steps)
        if not self.fingers_in_dish(dish, eef) or self.ticks > 40:
            self.retry(scene)
            return self._recover(scene, dish, eef, steps)
        remaining = self.remaining(scene, dish)
        step = remaining * min(1.0, SLIDE_STEP / max(float(np.linalg.norm(remaining)), 1e-9))
        target = np.array([eef[0] + step[0], eef[1] + step[1], dish.bottom + PRESS_HEIGHT])
        return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=1.0)

    def _retreat(self, scene, dish, eef, steps):
        target = np.array([eef[0], eef[1], dish.top + 0.08])
        if eef[2] > target[2] - 0.02 or self.ticks > 6:
            self.goto("done")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=0.6)

    def _recover(self, scene, dish, eef, steps):
        """Lift clear of the rim, then aim again from where the dish now is."""
        target = np.array([eef[0], eef[1], dish.top + 0.04])
        if eef[2] > target[2] - 0.015 or self.ticks > 6:
            self.goto("start")
        return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=1.0)

    def _done(self, scene, dish, eef, steps):
        return None


class TurnKnob(Skill):
    """Grasp a knob's ridge from above and turn the wrist until its joint passes ``threshold``.

    ``increase``: turn until qpos >= threshold (LIBERO's turn-on test), else until qpos < threshold.
    """

    def __init__(self, joint: str, threshold: float, increase: bool, label: str):
        super().__init__(label)
        self.joint = joint
        self.threshold = threshold
        self.increase = increase
        self.turned = 0.0

    def _done_turning(self, qpos: float) -> bool:
        return qpos >= self.threshold if self.increase else qpos < self.threshold

    def act(self, scene: Scene, steps: int) -> np.ndarray | None:
        self.ticks += 1
        joint = scene.joint(self.joint)
        eef = scene.eef_pos
        if self.phase == "start":
            if self._done_turning(joint["qpos"]):
                return None
            lo, hi = joint["upper_min"], joint["upper_max"]
            extent = hi[:2] - lo[:2]
            self.grasp_point = np.array([*(lo[:2] + hi[:2]) / 2, hi[2] - 0.015])
            finger_axis = np.array([1.0, 0, 0]) if extent[0] < extent[1] else np.array([0, 1.0, 0])
            self.grip_mat = grip_rotation(closest_finger_axis(finger_axis, scene.eef_mat))
            # turning the wrist about +z turns the knob about its axis; pick the direction
            self.direction = (1.0 if self.increase else -1.0) * np.sign(joint["axis"][2] or 1.0)
            self.goto("above")
        if self.phase in ("above", "descend"):
            return self.approach(scene, steps, self.grasp_point, OPEN, then="close", tolerance=0.008)
        if self.phase == "close":
            if self.ticks > max(2, CLOSE_STEPS // steps):
                self.goto("turn")
            return move_action(eef, scene.eef_mat, self.grasp_point, self.grip_mat, CLOSE, steps, speed=0.3)
        if self.phase == "turn":
            if self._done_turning(joint["qpos"]) or abs(self.turned) > 2.5:
                self.goto("release")
            else:
                self.turned += self.direction * 0.25
            c, s_ = np.cos(self.turned), np.sin(self.turned)
            rot = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]])
            return move_action(eef, scene.eef_mat, self.grasp_point, rot @ self.grip_mat, CLOSE, steps, speed=0.3)
        if self.phase == "release":
            if self.ticks > max(2, 8 // steps):
                self.goto("retreat")
            return move_action(eef, scene.eef_mat, eef, scene.eef_mat, OPEN, steps, speed=0.1)
        if self.phase == "retreat":
            target = self.grasp_point + [0, 0, APPROACH_CLEARANCE]
            if eef[2] > target[2] - 0.02 or self.ticks > 6:
                if not self._done_turning(scene.joint(self.joint)["qpos"]):
                    self.retry(scene)
                    self.goto("start")
                    return move_action(eef, scene.eef_mat, target, scene.eef_mat, OPEN, steps, speed=0.6)
                return None
            return move_action(eef, scene.eef_mat, target, scene.eef_mat, OPEN, steps, speed=0.6)
        return None



def opens_negative(articulation: dict) -> bool:
    """Whether opening moves the joint towards negative qpos (LIBERO's cabinets do)."""
    return np.mean(articulation["default_open_ranges"]) < np.mean(articulation["default_close_ranges"])


def is_open(articulation: dict, qpos: float) -> bool:
    """LIBERO's test: open once past the near end of the open range."""
    open_range = articulation["default_open_ranges"]
    return qpos < max(open_range) if opens_negative(articulation) else qpos > min(open_range)


def is_closed(articulation: dict, qpos: float) -> bool:
    """LIBERO's test: closed once past the far end of the close range, seen from the open side."""
    close_range = articulation["default_close_ranges"]
    return qpos > min(close_range) if opens_negative(articulation) else qpos < max(close_range)


# The fingers push leaning 40 degrees into the closing direction, the wrist held back: upright,
# the forearm (link 5) meets the cabinet with a low drawer still 6 cm open.
PUSH_TILT = 0.7
PRESS_DEPTH = 0.02  # how far below the handle bar's top the fingertips are aimed while dragging it
DRAG_LEAD = 0.05  # how far ahead of the bar, along the opening direction, the drag aims
DRAG_MARGIN = 0.01  # pulled this far past LIBERO's open threshold
DRAG_SPEED = 1.0  # action units (5 cm a step at most): 5/5 on libero_goal task 0 at 0.3, 0.6 and 1.0


class PushAside(Skill):
    """Push an object along the table by ``distance`` in the horizontal ``direction``: closed
    fingers lowered beside it (on the side it moves away from), 1.5 cm above its bottom, then
    moved through where it stood. Cheaper than a pick and place when it only has to make room."""

    def __init__(self, obj: str, direction, distance: float, label: str):
        super().__init__(label)
        self.obj = obj
        self.direction = np.array([direction[0], direction[1], 0.0]) / np.linalg.norm(direction[:2])
        self.distance = distance

    def act(self, scene: Scene, steps: int) -> np.ndarray | None:
        return self.run_phase(scene, scene.body(self.obj), steps)

    def _start(self, scene, body, eef, steps):
        centre = (body.aabb_min + body.aabb_max) / 2
        reach = float(np.abs(self.direction) @ (body.aabb_max - body.aabb_min)) / 2  # centre to its back side
        self.contact = np.array([*(centre[:2] - self.direction[:2] * (reach + 0.02)), body.bottom + 0.015])
        self.goal = self.contact + self.direction * (self.distance + 0.02)
        side = np.array([-self.direction[1], self.direction[0], 0.0])  # fingers side by side across the push
        self.grip_mat = grip_rotation(closest_finger_axis(side, scene.eef_mat))
        self.goto("above")
        return self._above(scene, body, eef, steps)

    def _above(self, scene, body, eef, steps):
        return self.approach(scene, steps, self.contact, CLOSE, then="push", tolerance=0.01)

    _descend = _above

    def _push(self, scene, body, eef, steps):
        if _near(eef[:2], self.goal[:2], 0.01) or self.ticks > 12:
            return None  # the next skill moves the hand on, away from the object
        return move_action(eef, scene.eef_mat, self.goal, self.grip_mat, CLOSE, steps, speed=1.0)


def opening_direction(joint: dict, negative: bool) -> np.ndarray:
    """World direction a drawer slides when it opens; ``negative``: towards negative joint positions."""
    axis = np.asarray(joint["axis"], dtype=float)
    return -axis if negative else axis


def drawer_hand(joint: dict, negative: bool, eef_mat) -> tuple[np.ndarray, np.ndarray]:
    """(world direction the drawer slides out, the hand's pose for working it): closed fingers
    side by side across that direction (a wider contact), leaning into the drawer. ``negative``:
    the drawer opens towards negative joint positions."""
    open_dir = opening_direction(joint, negative)
    side = np.array([-open_dir[1], open_dir[0], 0.0])
    return open_dir, tilted_towards(grip_rotation(closest_finger_axis(side, eef_mat)), -open_dir, PUSH_TILT)


class OpenDrawer(Skill):
    """Pull a drawer open by friction: closed fingertips pressed down on its handle bar (the hand
    leaning into the drawer, as for pushing) and dragged along the opening direction.

    Gripping the bar fails: from above the fingers do not fit between bar and drawer front, and
    from the front the arm runs into its joint limits (docs/scripted-expert.md).
    """

    def __init__(self, joint: str, articulation: dict, label: str):
        super().__init__(label)
        self.joint = joint
        self.opens_negative = opens_negative(articulation)
        self.articulation = articulation
        self.target = None  # the joint position to drag it to, set at the start

    def pulled(self, qpos: float) -> bool:
        return qpos <= self.target if self.opens_negative else qpos >= self.target

    def bar_top(self, scene: Scene) -> np.ndarray:
        """Centre of the top of the handle bar: the part sticking out where the drawer slides out."""
        lo, hi = scene.joint(self.joint)["ends"]["-" if self.opens_negative else "+"]
        return np.array([*(np.asarray(lo[:2]) + hi[:2]) / 2, hi[2]])

    def act(self, scene: Scene, steps: int) -> np.ndarray | None:
        self.ticks += 1
        joint = scene.joint(self.joint)
        eef, bar = scene.eef_pos, self.bar_top(scene)
        if self.phase == "start":
            if is_open(self.articulation, joint["qpos"]):
                return None
            self.open_dir, self.grip_mat = drawer_hand(joint, self.opens_negative, scene.eef_mat)
            # past LIBERO's threshold by a centimetre (room for what goes inside), within the travel
            ranges, (low, high) = self.articulation["default_open_ranges"], joint["range"]
            self.target = (max(max(ranges) - DRAG_MARGIN, low + 0.005) if self.opens_negative
                           else min(min(ranges) + DRAG_MARGIN, high - 0.005))
            self.goto("above")
        if self.phase == "above":  # in front of the bar and above it, clear of the drawer above
            target = bar + self.open_dir * 0.06 + [0, 0, 0.08]
            turned = np.linalg.norm(rotation_error(self.grip_mat, scene.eef_mat)) < 0.15
            if (_near(eef, target, 0.02) and turned) or self.ticks > 14:
                self.goto("down")
            return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=1.0)
        if self.phase == "down":
            target = bar + [0, 0, 0.005]
            if _near(eef, target, 0.008) or self.ticks > 10:
                self.goto("drag")
            return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=0.8)
        if self.phase == "drag":
            ahead = float((eef - bar)[:2] @ self.open_dir[:2])
            if self.pulled(joint["qpos"]):
                return None  # the next skill lifts the hand off the bar
            if self.ticks > 40:
                self.goto("retreat")
            elif ahead > 0.03 or eef[2] < bar[2] - 0.01:  # slipped off the bar
                self.retry(scene)
                self.goto("above")
                return move_action(eef, scene.eef_mat, eef + [0, 0, 0.05], self.grip_mat, CLOSE, steps, speed=0.6)
            # pressed into the bar (the pads' friction drags it) and led along the opening direction
            target = bar + self.open_dir * DRAG_LEAD + [0, 0, -PRESS_DEPTH]
            return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=DRAG_SPEED)
        if self.phase == "retreat":
            if self.ticks > 3:
                if is_open(self.articulation, joint["qpos"]):
                    return None
                self.retry(scene)
                self.goto("above")
            return move_action(eef, scene.eef_mat, eef + [0, 0, 0.08], self.grip_mat, CLOSE, steps, speed=0.6)
        return None


class CloseDrawer(Skill):
    """Push a drawer shut: closed fingers in front of its front face, then along the closing direction."""

    def __init__(self, joint: str, articulation: dict, label: str):
        super().__init__(label)
        self.joint = joint
        self.opens_negative = opens_negative(articulation)
        self.articulation = articulation

    def closed(self, qpos: float) -> bool:
        return is_closed(self.articulation, qpos)

    def act(self, scene: Scene, steps: int) -> np.ndarray | None:
        self.ticks += 1
        joint = scene.joint(self.joint)
        eef = scene.eef_pos
        if self.phase == "start":
            if self.closed(joint["qpos"]):
                return None
            self.open_dir, self.grip_mat = drawer_hand(joint, self.opens_negative, scene.eef_mat)
            lo, hi = np.asarray(joint["aabb_min"]), np.asarray(joint["aabb_max"])
            centre, half = (lo + hi) / 2, (hi - lo) / 2
            front = centre + self.open_dir * float(np.abs(self.open_dir) @ half)
            self.contact = np.array([*(front[:2] + self.open_dir[:2] * 0.03), centre[2]])  # mid-height of the front
            self.goto("above")
        if self.phase in ("above", "descend"):
            return self.approach(scene, steps, self.contact, CLOSE, then="push", tolerance=0.01)
        if self.phase == "push":
            if self.closed(joint["qpos"]) or self.ticks > 20:
                self.goto("retreat")
            target = eef - self.open_dir * 0.2  # far ahead: the controller's pull grows with the error
            target[2] = self.contact[2]
            return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=1.0)
        if self.phase == "retreat":
            target = eef + self.open_dir * 0.03 + [0, 0, 0.06]
            if self.ticks > 3:
                if not self.closed(joint["qpos"]):
                    self.retry(scene)
                    self.goto("start")
                return None if self.closed(joint["qpos"]) else move_action(
                    eef, scene.eef_mat, target, self.grip_mat, OPEN, steps, speed=0.5)
            return move_action(eef, scene.eef_mat, target, self.grip_mat, CLOSE, steps, speed=0.5)
        return None
