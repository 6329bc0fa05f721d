"""A soft reset of a LIBERO env that reproduces a hard reset bit for bit.

LIBERO's default reset rebuilds the MuJoCo model from XML (2-4 s on a CPU); robosuite's soft
reset (``hard_reset=False``) only clears MjData (5-70 ms) but leaves behind state that changes
later episodes. What survives, and is restored here (each measured by removing it alone):

1. The gripper's target (``gripper.current_action``, moved by 0.01 per step): a rebuilt gripper
   starts at 0, a kept one at last episode's value (states then differ by up to 19).
2. LIBERO appends the task's open/close and turn-on/off samplers to
   ``object_property_initializers`` (and visual sites to ``visualization_sites_list``) at every
   model load and never clears them, so each hard reset draws one more random number per such
   predicate than the one before. A soft reset must grow the lists the same way, or the global
   numpy RNG falls out of step and every later placement differs (up to 8.6 in libero_10 task 9).
3. A recompiled model has the fixtures at their XML poses while the reset samples placements;
   a kept model has last episode's poses (a 1e-15 difference in the solver's warm start).
4. A fresh MjData is forwarded twice at qpos0 before the controller runs, which seeds the warm
   start; repeated here so the chain is the hard reset's by construction.

Installed once per env, right after construction and seeding, by replacing ``sim.reset`` (the
first thing a soft reset calls): two of the causes act inside ``env.reset()`` itself. Depends
on robosuite 1.4.0's reset; ``tests/suites/test_soft_reset.py`` compares it with hard resets
step by step and turns red if an upgrade changes that.
"""

from __future__ import annotations

import numpy as np

_SMALL = 1 << 16  # model arrays up to this size are restored (meshes, textures: never written)
_WRITTEN = ("body_pos", "body_quat", "site_rgba")  # arrays LIBERO and robosuite write at run time


def install_exact_soft_reset(env) -> None:
    """Make ``env.reset()`` of a robosuite/LIBERO env a soft reset equivalent to a hard one."""
    import mujoco
    from robosuite.utils.binding_utils import MjSim

    env.hard_reset = False
    sim = env.sim
    model, data = sim.model._model, sim.data._data
    fresh = MjSim.from_xml_string(env.model.get_xml()).model._model  # what a hard reset compiles
    pristine = {}
    for name in dir(fresh):
        value = getattr(fresh, name, None) if not name.startswith("_") else None
        if isinstance(value, np.ndarray) and (value.nbytes <= _SMALL or name in _WRITTEN):
            pristine[name] = value.copy()
    per_load_initializers = list(getattr(env, "object_property_initializers", []))
    per_load_sites = list(getattr(env, "visualization_sites_list", []))

    def reset_like_hard() -> None:
        mujoco.mj_resetData(model, data)
        for name, value in pristine.items():
            getattr(model, name)[...] = value
        for robot in env.robots:
            robot.gripper.current_action = np.zeros(robot.gripper.dof)
        if hasattr(env, "object_property_initializers"):
            env.object_property_initializers.extend(per_load_initializers)
        if hasattr(env, "visualization_sites_list"):
            env.visualization_sites_list.extend(per_load_sites)
        mujoco.mj_forward(model, data)
        mujoco.mj_forward(model, data)

    sim.reset = reset_like_hard
