"""``scripted``: a privileged-state expert that solves LIBERO tasks with motion primitives.

It reads object and site poses from the simulator snapshot (never images), turns the task's
BDDL goal into a sequence of skills, and emits OSC_POSE delta actions in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from policies.base import EpisodeInfo, Observation, Policy, PolicyOutput
from policies.scripted.doors import PushDoor, PutThroughDoor
from policies.scripted.geometry import unit
from policies.scripted.goals import Predicate, read_goal
from policies.scripted.scene import Scene
from policies.scripted.skills import (
    CloseDrawer,
    OpenDrawer,
    PickPlace,
    PushAside,
    Skill,
    SkillFailed,
    SlideDish,
    TurnKnob,
    dish_radius,
    is_dish,
    is_open,
    opening_direction,
    opens_negative,
)

HOLD = np.array([0, 0, 0, 0, 0, 0, -1.0])


def destination_for(predicate: Predicate, scene: Scene, slot: float = 0.0):
    """Where the moved object's origin must go, as a function of the current scene.

    ``slot`` shifts the spot along x inside a region, so that several objects bound for one
    region (two moka pots on one burner area) do not land on each other.
    """
    obj, target = predicate.args
    if scene.has_object(target):
        # On(a, b) for objects: b's origin below a's, within 3 cm horizontally, touching.
        return lambda s: (s.body(target).pos[:2], s.body(target).top + 0.005)
    if not scene.has_site(target):
        raise SkillFailed(f"goal names {target!r}, which is neither an object nor a region in the scene")
    if predicate.name == "in":
        # In(a, region): a's origin inside the region's box; drop it from just above the floor.
        # In a drawer, aim at the part of the region that is pulled out of the cabinet: the
        # object as close to the drawer's front wall as its footprint allows, so that it goes
        # down past the cabinet's face and does not rest on the wall. The footprint is taken
        # now, upright on the table: held by its rim the object hangs tilted and its box grows.
        held = scene.body(obj) if scene.has_object(obj) else None
        extent = (held.aabb_min - held.pos, held.aabb_max - held.pos) if held else (np.zeros(3), np.zeros(3))

        def inside(s):
            site = s.site(target)
            xy = site.pos[:2] + [slot, 0.0]
            if site.joints:
                open_dir = opening_direction(s.joint(site.joints[0]), opens_negative(s.articulation(site.parent)))
                reach = float(np.sum(np.maximum(open_dir * extent[0], open_dir * extent[1])))  # origin to its front
                from_wall = max(reach + 0.005, 0.025)
                xy = xy + open_dir[:2] * max(float(np.abs(open_dir) @ site.half_extent) - from_wall, 0.0)
            elif held is not None:
                # the object's middle on the spot, not its origin (a book's is 1.2 cm off its middle, which
                # put its end on a caddy's wall), as long as the origin, which LIBERO tests, stays inside
                body = s.body(obj)
                margin = np.minimum(0.01, site.half_extent[:2] / 2)
                xy = np.clip(xy - (body.center - body.pos)[:2], site.lo[:2] + margin, site.hi[:2] - margin)
            return xy, site.lo[2] + 0.01

        return inside
    # On(a, region): a's origin just above the region's top face, inside its footprint.
    return lambda s: (s.site(target).pos[:2] + [slot, 0.0], s.site(target).pos[2] + s.site(target).size[2])


def _slots(goal: list[Predicate], scene: Scene) -> dict[Predicate, float]:
    """Spread the objects bound for the same region evenly along x, within the region.

    On a surface (two moka pots on one burner area) they may use the whole region; in a
    container (a basket) they stay 3 cm either side of its centre: spots near the walls put
    cans on the rim, one spot for both stacks flat boxes so that one sticks out.
    """
    by_region: dict[tuple[str, str], list[Predicate]] = {}
    for p in goal:
        if p.name in ("on", "in") and scene.has_site(p.args[1]):
            by_region.setdefault((p.name, p.args[1]), []).append(p)
    slots = {}
    for (relation, region), preds in by_region.items():
        half = scene.site(region).half_extent[0]
        widest = 0.09 if relation == "on" else 0.06
        spacing = min(widest, 2 * max(half - 0.02, 0.0) / max(len(preds) - 1, 1))
        for i, p in enumerate(preds):
            slots[p] = (i - (len(preds) - 1) / 2) * spacing
    return slots


def knob_skill(predicate: Predicate, scene: Scene) -> Skill:
    (fixture,) = predicate.args
    ranges = scene.articulation(fixture).get(f"default_{predicate.name}_ranges")
    joints = [j for j, info in scene.state["joints"].items() if info["owner"] == fixture and info["type"] == "hinge"]
    if not joints or not ranges:
        raise SkillFailed(f"{fixture!r} has no knob to turn ({predicate.name})")
    label = f"{predicate.name} {fixture}"
    if predicate.name == "turnon":  # LIBERO: on once qpos >= min(turnon range); aim a little past it
        return TurnKnob(joints[0], min(ranges) + 0.15, increase=True, label=label)
    return TurnKnob(joints[0], max(ranges), increase=False, label=label)  # off once qpos < max(turnoff range)



def articulated_joint(name: str, scene: Scene) -> tuple[str, str]:
    """(joint, owning object) behind a region (a drawer) or an articulated object (a microwave)."""
    if scene.has_site(name) and scene.site(name).joints:
        return scene.site(name).joints[0], scene.site(name).parent
    joints = [j for j, info in scene.state["joints"].items() if info["owner"] == name]
    if not joints:
        raise SkillFailed(f"{name!r} has no joint to open or close")
    return joints[0], name


def articulation_skill(predicate: Predicate, scene: Scene) -> Skill:
    """Open or Close of a drawer (a slide joint), or Close of a door (a hinge)."""
    joint, owner = articulated_joint(predicate.args[0], scene)
    label = f"{predicate.name} {predicate.args[0]}"
    if scene.joint(joint)["type"] == "slide":
        skill = OpenDrawer if predicate.name == "open" else CloseDrawer
        return skill(joint, scene.articulation(owner), label)
    if predicate.name == "close":
        return PushDoor(joint, scene.articulation(owner), label, shut=True)
    raise SkillFailed(f"{predicate.name} {predicate.args[0]!r} needs a door-opening skill, "
                      "which the expert does not have")


def door_of(region: str, scene: Scene) -> str | None:
    """The hinge joint of the door in front of a region inside an object (a microwave's), if any."""
    if not scene.has_site(region) or scene.site(region).joints or not scene.site(region).parent:
        return None
    owner = scene.site(region).parent
    if "default_open_ranges" not in scene.articulation(owner):  # a stove's hinges are its knobs
        return None
    hinges = [j for j, info in scene.state["joints"].items() if info["owner"] == owner and info["type"] == "hinge"]
    return hinges[0] if hinges else None


def shut_drawer(predicate: Predicate, scene: Scene) -> bool:
    """In(x, region of a drawer that is shut): the drawer must be opened first."""
    target = predicate.args[1]
    if predicate.name != "in" or not scene.has_site(target) or not scene.site(target).joints:
        return False
    joint, owner = articulated_joint(target, scene)
    return not is_open(scene.articulation(owner), scene.joint(joint)["qpos"])


# What must stay clear of an opened drawer around an object that goes into it: the hand picking
# the object reaches this far beyond it (its palm), and would otherwise be under the drawer.
HAND_ROOM = 0.04


def drawer_sweep(opening: OpenDrawer, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Footprint (xy box) of a drawer over its whole travel out of the cabinet."""
    joint = scene.joint(opening.joint)
    open_dir = opening_direction(joint, opening.opens_negative)
    low, high = joint["range"]
    travel = abs((low if opening.opens_negative else high) - joint["qpos"])
    lo, hi = np.asarray(joint["aabb_min"])[:2], np.asarray(joint["aabb_max"])[:2]
    return np.minimum(lo, lo + open_dir[:2] * travel), np.maximum(hi, hi + open_dir[:2] * travel)


def make_room(obj: str, opening: OpenDrawer, scene: Scene) -> PushAside | None:
    """A push that takes ``obj`` out of the drawer's travel, by the shortest way along x or y
    (None if it is clear already)."""
    body = scene.body(obj)
    sweep_lo, sweep_hi = drawer_sweep(opening, scene)
    lo, hi = body.aabb_min[:2] - HAND_ROOM, body.aabb_max[:2] + HAND_ROOM
    if not (np.all(lo < sweep_hi) and np.all(sweep_lo < hi)):
        return None
    moves = []  # (distance, direction) out of the sweep on each side
    for axis in (0, 1):
        moves.append((sweep_hi[axis] - lo[axis], np.eye(2)[axis]))
        moves.append((hi[axis] - sweep_lo[axis], -np.eye(2)[axis]))
    distance, direction = min(moves, key=lambda move: move[0])
    return PushAside(obj, direction, distance, f"push {obj} out of the drawer's way")


def slides_over_the_table(predicate: Predicate, scene: Scene) -> bool:
    """On(dish, region of the table): the dish cannot be lifted, but it stands on the surface
    the region marks, so it can be slid there. Regions of other objects (a stove's burner)
    stand above the table and need a lift."""
    obj, target = predicate.args
    if predicate.name != "on" or not scene.has_object(obj) or not scene.has_site(target):
        return False
    site, body = scene.site(target), scene.body(obj)
    return site.parent is None and abs(site.hi[2] - body.bottom) < 0.015 and is_dish(body)


# How far clear of a dish's way an object is pushed.
WAY_MARGIN = 0.01


def clear_the_way(slide: SlideDish, scene: Scene) -> list[PushAside]:
    """Pushes that take every movable object out of the band a dish sweeps on its straight way
    to the region's centre, each across the way, on the side it already lies. A dish sliding into
    an object shoves it along, and the pair jams against whatever stands beyond (the cream cheese
    against the stove in libero_goal task 5)."""
    dish = scene.body(slide.obj)
    start, goal = dish.center[:2], scene.site(slide.region).pos[:2]
    way, length = unit(goal - start), float(np.linalg.norm(goal - start))
    across = np.array([-way[1], way[0]])
    radius = dish_radius(dish)
    pushes, fixtures = [], scene.fixtures()
    for body in scene.bodies():
        if body.name == slide.obj or body.name in fixtures:
            continue
        offset = body.center[:2] - start
        along, aside = float(offset @ way), float(offset @ across)
        reach = body.half_extent_along(way)
        if not -radius - reach < along < length + radius + reach:
            continue  # behind the dish or beyond where it stops
        distance = radius + body.half_extent_along(across) + WAY_MARGIN - abs(aside)
        if distance > 0:
            side = 1.0 if aside >= 0 else -1.0
            label = f"clear {body.name} from the {slide.obj}'s way"
            pushes.append(PushAside(body.name, across * side, distance, label))
    return pushes


def plan_skills(goal: list[Predicate], scene: Scene) -> list[Skill]:
    """Knobs first (the arm is free and nothing stands on the stove yet), then closing the
    drawers nothing goes into, opening drawers, placements (some into those drawers), and
    closing the drawers something went into."""
    knobs, pushes, opens, placements, closes = [], [], [], [], []
    slots = _slots(goal, scene)
    for predicate in goal:
        label = f"{predicate.name} {' '.join(predicate.args)}"
        if predicate.name in ("on", "in"):
            if shut_drawer(predicate, scene):  # LIBERO's goals leave it implicit ("open ... and put the bowl inside")
                opens.append(articulation_skill(Predicate("open", (predicate.args[1],)), scene))
                room = make_room(predicate.args[0], opens[-1], scene) if scene.has_object(predicate.args[0]) else None
                if room:
                    pushes.append(room)
            door_joint = door_of(predicate.args[1], scene) if predicate.name == "in" else None
            if door_joint is not None:
                joint = scene.joint(door_joint)
                if not is_open(scene.articulation(joint["owner"]), joint["qpos"]):
                    raise SkillFailed(f"{label}: the door is shut, and the expert has no door-opening skill")
                # swung clear of the doorway first: a door open 76 degrees stopped the hand (libero_10 task 9, init 11)
                placements.append(PushDoor(door_joint, scene.articulation(joint["owner"]), f"{label}: clear the door",
                                           shut=False))
                placements.append(PutThroughDoor(*predicate.args, door_joint, label))
            elif slides_over_the_table(predicate, scene):
                slide = SlideDish(*predicate.args, label)
                placements.extend(clear_the_way(slide, scene) + [slide])
            else:
                destination = destination_for(predicate, scene, slots.get(predicate, 0.0))
                fit_into = predicate.args[1] if predicate.name == "in" and scene.has_site(predicate.args[1]) else None
                placements.append(PickPlace(predicate.args[0], destination, label, fit_into))
        elif predicate.name in ("turnon", "turnoff"):
            knobs.append(knob_skill(predicate, scene))
        elif predicate.name == "open":
            opens.append(articulation_skill(predicate, scene))
        elif predicate.name == "close":
            closes.append(articulation_skill(predicate, scene))
        else:
            raise SkillFailed(f"the expert has no skill for ({predicate.name} {' '.join(predicate.args)})")
    opening = {}  # one OpenDrawer per drawer, however many predicates need it open
    for skill in opens:
        opening.setdefault(skill.joint, skill)
    # a drawer that nothing goes into is shut first: pushed later, the hand would meet (and shut)
    # a drawer opened above it
    filled = {articulated_joint(p.args[1], scene)[0] for p in goal
              if p.name == "in" and scene.has_site(p.args[1]) and scene.site(p.args[1]).joints}
    filled |= {door_of(p.args[1], scene) for p in goal if p.name == "in"} - {None}
    early = [c for c in closes if c.joint not in filled]
    late = [c for c in closes if c.joint in filled]
    return knobs + early + pushes + list(opening.values()) + supports_first(placements, goal) + late


def supports_first(placements: list[Skill], goal: list[Predicate]) -> list[Skill]:
    """An object that another goes onto, and that is itself moved ("stack the left bowl on the
    right bowl and place them in the tray"), is moved first: carrying the stack took the whole
    budget (libero_90 task 63)."""
    supports = {p.args[1] for p in goal if p.name in ("on", "in")}
    return sorted(placements, key=lambda skill: getattr(skill, "obj", None) not in supports)


class _Episode:
    def __init__(self):
        self.skills: list[Skill] | None = None
        self.failed: str | None = None


class ScriptedPolicy(Policy):
    name = "scripted"
    needs_images = False
    needs_privileged = True

    @dataclass
    class Options(Policy.Options):
        chunk_length: int = 4
        # ask for camera images at every query, as a vision policy would (it ignores them):
        # for measuring what rendering costs a run
        with_images: bool = False

    def __init__(self, options: Options, seed: int = 0):
        super().__init__(options, seed)
        self.needs_images = options.with_images
        self._episodes: dict[str, _Episode] = {}

    def reset(self, episode: EpisodeInfo) -> None:
        self._episodes[episode.episode_id] = _Episode()

    def act(self, observations: Sequence[Observation]) -> list[PolicyOutput]:
        return [self._act_one(obs) for obs in observations]

    def _act_one(self, obs: Observation) -> PolicyOutput:
        if obs.privileged is None:
            raise ValueError("the scripted policy needs privileged simulator state in its observations")
        state = self._episodes[obs.episode_id]
        scene = Scene(obs.privileged)
        action = HOLD
        try:
            if state.skills is None:
                state.skills = plan_skills(read_goal(obs.privileged["bddl_file"]), scene)
            while state.skills and state.failed is None:
                step = state.skills[0].act(scene, self.chunk_length)
                if step is not None:
                    action = step
                    break
                state.skills.pop(0)
        except SkillFailed as exc:
            state.failed = str(exc)  # give up cleanly: hold still until the budget runs out
        chunk = np.tile(np.clip(action, -1.0, 1.0), (self.chunk_length, 1))
        skill = state.skills[0] if state.skills else None
        stats = {"phase": f"{skill!r}:{skill.phase}" if skill else "done"}
        if state.failed:
            stats["gave_up"] = state.failed
        return PolicyOutput(chunk, stats)
