"""``scripted``: a privileged-state expert that solves LIBERO tasks with motion primitives.

It reads object and site poses from the simulator snapshot (never images), turns the task's
BDDL goal into a sequence of skills, and emits OSC_POSE delta actions in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from policies.base import EpisodeInfo, Observation, Policy, PolicyOutput
from policies.scripted.goals import Predicate, read_goal
from policies.scripted.scene import Scene
from policies.scripted.skills import PickPlace, Skill, SkillFailed, TurnKnob

HOLD = np.array([0, 0, 0, 0, 0, 0, -1.0])


def destination_for(predicate: Predicate, scene: Scene):
    """Where the moved object's origin must go, as a function of the current scene."""
    _, target = predicate.args
    if scene.has_object(target):
        # On(a, b) for objects: b's origin below a's, within 3 cm horizontally, touching.
        return lambda s: (s.body(target).pos[:2], s.body(target).top + 0.005)
    if not scene.has_site(target):
        raise SkillFailed(f"goal names {target!r}, which is neither an object nor a region in the scene")
    if predicate.name == "in":
        # In(a, region): a's origin inside the region's box; drop it from just above the floor.
        return lambda s: (s.site(target).pos[:2], s.site(target).lo[2] + 0.01)
    # On(a, region): a's origin just above the region's top face, inside its footprint.
    return lambda s: (s.site(target).pos[:2], s.site(target).pos[2] + s.site(target).size[2])


def knob_skill(predicate: Predicate, scene: Scene) -> Skill:
    (fixture,) = predicate.args
    ranges = scene.articulation(fixture).get(f"default_{predicate.name}_ranges")
    joints = [j for j, info in scene.state["joints"].items() if info["owner"] == fixture and info["type"] == "hinge"]
    if not joints or not ranges:
        raise SkillFailed(f"{fixture!r} has no knob to turn ({predicate.name})")
    return TurnKnob(joints[0], (min(ranges), max(ranges)), f"{predicate.name} {fixture}")


def plan_skills(goal: list[Predicate], scene: Scene) -> list[Skill]:
    """Knobs first (the arm is free and nothing stands on the stove yet), then placements."""
    knobs, placements = [], []
    for predicate in goal:
        label = f"{predicate.name} {' '.join(predicate.args)}"
        if predicate.name in ("on", "in"):
            placements.append(PickPlace(predicate.args[0], destination_for(predicate, scene), label))
        elif predicate.name in ("turnon", "turnoff"):
            knobs.append(knob_skill(predicate, scene))
        else:
            raise SkillFailed(f"no skill for goal predicate {predicate.name!r} yet")
    return knobs + placements


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

    def __init__(self, options: Options, seed: int = 0):
        super().__init__(options, seed)
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
        stats = {"skills_left": len(state.skills or []), "phase": f"{skill!r}:{skill.phase}" if skill else "done"}
        if state.failed:
            stats["gave_up"] = state.failed
        return PolicyOutput(chunk, stats)
