"""Read-only views over the privileged simulator snapshot (see ``suites.privileged``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from policies.scripted.geometry import horizontal

GRIPPER_MAX_OPENING = 0.075  # m between the finger pads, with some margin


@dataclass
class Body:
    name: str
    pos: np.ndarray  # body origin: what LIBERO's predicates test
    mat: np.ndarray
    box_min: np.ndarray  # in the body frame
    box_max: np.ndarray
    aabb_min: np.ndarray  # world, axis aligned
    aabb_max: np.ndarray
    ends: dict = field(default_factory=dict)  # "+x", ...: (min, max) of the part furthest out that way

    @property
    def center(self) -> np.ndarray:
        return self.pos + self.mat @ ((self.box_min + self.box_max) / 2)

    @property
    def top(self) -> float:
        return float(self.aabb_max[2])

    @property
    def bottom(self) -> float:
        return float(self.aabb_min[2])

    def half_extent_along(self, direction) -> float:
        """Half the extent of the body's own box along a horizontal world direction (tighter than
        the world-aligned box's for a box turned across it)."""
        d = np.array([direction[0], direction[1], 0.0])
        return float(np.abs(self.mat.T @ d) @ (self.box_max - self.box_min)) / 2

    def horizontal_axes(self) -> list[tuple[np.ndarray, float]]:
        """(world direction, full extent) of each body axis lying roughly horizontal."""
        axes = []
        for i in range(3):
            axis = self.mat[:, i]
            if abs(axis[2]) < 0.5:
                axes.append((horizontal(axis), float(self.box_max[i] - self.box_min[i])))
        return axes


@dataclass
class Site:
    name: str
    pos: np.ndarray
    mat: np.ndarray
    size: np.ndarray
    parent: str | None
    joints: list[str]

    @property
    def half_extent(self) -> np.ndarray:
        """World half extent as LIBERO's containment test computes it."""
        return np.abs(self.mat @ self.size)

    @property
    def lo(self) -> np.ndarray:
        return self.pos - self.half_extent

    @property
    def hi(self) -> np.ndarray:
        return self.pos + self.half_extent


class Scene:
    def __init__(self, state: dict):
        self.state = state
        self.eef_pos = np.asarray(state["eef_pos"])
        self.eef_mat = np.asarray(state["eef_mat"])
        self.shoulder_pos = np.asarray(state["shoulder_pos"])
        self.wrist_turn = float(state["wrist_turn"])  # the arm's last joint (rad), which turns the hand
        self.wrist_turn_range = np.asarray(state["wrist_turn_range"])
        qpos = np.asarray(state["gripper_qpos"])
        self.gripper_width = float(qpos[0] - qpos[1])

    def has_object(self, name: str) -> bool:
        return name in self.state["objects"]

    def has_site(self, name: str) -> bool:
        return name in self.state["sites"]

    def body(self, name: str) -> Body:
        o = self.state["objects"][name]
        return Body(name, o["pos"], o["mat"], o["box_min"], o["box_max"], o["aabb_min"], o["aabb_max"],
                    o.get("ends", {}))

    def site(self, name: str) -> Site:
        s = self.state["sites"][name]
        return Site(name, s["pos"], s["mat"], s["size"], s["parent"], s["joints"])

    def fixtures(self) -> set[str]:
        """Names of the objects that do not move (cabinets, stoves): only their joints do."""
        return {name for name, o in self.state["objects"].items() if o.get("fixture")}

    def bodies(self) -> list[Body]:
        return [self.body(n) for n in self.state["objects"]]

    def joint(self, name: str) -> dict:
        return self.state["joints"][name]

    def articulation(self, owner: str) -> dict:
        return self.state["articulation"].get(owner) or {}

    def highest_top_along(self, start, end, exclude: set[str], margin: float = 0.06) -> float:
        """Top of the tallest thing whose footprint comes within ``margin`` of the segment start-end."""
        a, b = np.asarray(start, dtype=float)[:2], np.asarray(end, dtype=float)[:2]
        tops = []
        for name, o in self.state["objects"].items():
            if name in exclude:
                continue
            lo, hi = np.asarray(o["aabb_min"])[:2] - margin, np.asarray(o["aabb_max"])[:2] + margin
            if _segment_hits_box(a, b, lo, hi):
                tops.append(o["aabb_max"][2])
        return float(max(tops)) if tops else -np.inf


def _segment_hits_box(a, b, lo, hi, samples: int = 20) -> bool:
    points = a + np.linspace(0, 1, samples)[:, None] * (b - a)
    return bool(np.any(np.all((points >= lo) & (points <= hi), axis=1)))
