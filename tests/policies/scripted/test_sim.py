"""The scripted expert on the real simulator: the project's regression test for the physics stack.

If a MuJoCo, robosuite or LIBERO change breaks contacts, grasping or the controller, these
episodes stop succeeding.
"""

import json

import pytest

from bench.cli import main
from bench.demos import read_demos

pytestmark = pytest.mark.sim

EPISODES = [
    ("libero_spatial", 0, 0),  # bowl by the rim onto the plate
    ("libero_spatial", 9, 28),  # a bowl at the far end of the cabinet: the hand slows down arriving over it
    ("libero_spatial", 1, 33),  # the hand turns the other way round: the smaller turn takes the wrist to its limit
    ("libero_object", 1, 0),  # cream cheese box into the basket
    ("libero_goal", 7, 0),  # turn the stove's knob
    ("libero_goal", 0, 0),  # drag a drawer open by its handle bar
    ("libero_10", 0, 37),  # the second can into the basket: lined up over its spot before going down
    ("libero_10", 5, 0),  # book into the caddy's back compartment
    ("libero_10", 3, 0),  # bowl into an open drawer, then push the drawer shut
    ("libero_10", 9, 0),  # mug into the microwave by its handle, then push the door shut
]


@pytest.mark.parametrize("suite, task, init", EPISODES)
def test_scripted_expert_succeeds(tmp_path, suite, task, init):
    out = tmp_path / "run"
    assert main(["run", "--suite", suite, "--policy", "scripted", "--tasks", str(task), "--init-states", str(init),
                 "--out", str(out), "--no-progress", "--json"]) == 0
    record = json.loads((out / "episodes.jsonl").read_text().splitlines()[0])
    assert record["outcome"] == "success", record["error"] or record["policy_stats"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    demos = tmp_path_factory.mktemp("recorded") / "demos.hdf5"
    assert main(["record-demos", "--suite", "libero_object", "--tasks", "1", "--init-states", "0",
                 "--image-size", "64", "--out", str(demos), "--no-progress"]) == 0
    return demos


def test_recorded_demo_replays_to_the_same_success(recorded, tmp_path):
    demos = recorded
    (demo,) = read_demos(demos)
    assert demo.obs["agentview_rgb"].shape == (len(demo.actions), 64, 64, 3)
    assert demo.rewards[-1] == 1 and demo.rewards[:-1].sum() == 0
    out = tmp_path / "replay"
    assert main(["run", "--suite", "libero_object", "--policy", "replay", "--policy-arg", f"path={demos}",
                 "--tasks", "1", "--init-states", "0", "--out", str(out), "--no-progress", "--json"]) == 0
    record = json.loads((out / "episodes.jsonl").read_text().splitlines()[0])
    assert record["outcome"] == "success" and record["steps"] == len(demo.actions)


def test_a_model_fine_tuned_on_the_recorded_demo_runs_in_the_simulator(recorded, tmp_path, capsys):
    out = tmp_path / "finetune"
    assert main(["finetune", "--demos", str(recorded), "--policy", "lightvla", "--policy-arg", "size=tiny",
                 "--out", str(out), "--steps", "2", "--batch-size", "2", "--lora-rank", "2", "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["run", "--suite", "libero_object", "--policy", "lightvla", "--checkpoint", str(out / "checkpoint"),
                 "--tasks", "1", "--init-states", "0", "--max-steps", "16", "--out", str(run), "--no-progress",
                 "--json"]) == 0
    record = json.loads((run / "episodes.jsonl").read_text().splitlines()[0])
    # two steps of training cannot do the task, but the episode runs to its budget with real queries
    assert record["outcome"] == "failure" and record["steps"] == 16, record["error"]
    assert record["queries"] == 2 and 0 < record["policy_stats"]["visual_tokens"] < 512
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["policy"]["unnorm_key"] == "libero_object_no_noops"


def test_a_demonstration_in_liberos_own_layout_regenerates_to_the_recorded_episode(recorded, tmp_path):
    """The expert's episode written as LIBERO ships its demonstrations (with a teleoperator's
    pauses added) and replayed by `bench regenerate-demos`: the pauses are skipped, and the replay
    is the recorded episode, state for state and image for image."""
    import numpy as np

    from suites import get_suite
    from tests.fakes import write_libero_source_file

    (demo,) = read_demos(recorded)
    task = get_suite("libero_object").task(1)
    pause = np.array([0, 0, 0, 0, 0, 0, demo.actions[20, 6]])
    actions = np.concatenate([[[0, 0, 0, 0, 0, 0, -1.0]] * 3, demo.actions[:21], [pause] * 2, demo.actions[21:]])
    states = np.repeat(demo.attrs["init_state"][None], len(actions), axis=0)  # LIBERO's first state: the scene's
    source = tmp_path / "libero_object"
    source.mkdir()
    write_libero_source_file(source / f"{task.name}_demo.hdf5", [(actions, states)], instruction=task.instruction)
    out = tmp_path / "regenerated.hdf5"
    assert main(["regenerate-demos", "--suite", "libero_object", "--source", str(source), "--image-size", "64",
                 "--out", str(out), "--no-progress"]) == 0
    (replayed,) = read_demos(out)
    assert replayed.attrs["skipped_noops"] == 5
    np.testing.assert_array_equal(replayed.actions, demo.actions)
    np.testing.assert_array_equal(replayed.states, demo.states)
    for key in ("agentview_rgb", "eye_in_hand_rgb", "ee_pos", "gripper_states"):
        np.testing.assert_array_equal(replayed.obs[key], demo.obs[key])
    assert replayed.rewards[-1] == 1
