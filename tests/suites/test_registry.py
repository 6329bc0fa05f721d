import numpy as np
import pytest

from suites import UnknownSuiteError, get_suite, list_suites
from suites.libero_env import quat_to_axis_angle


def test_suites_and_protocol_budgets():
    budgets = {s.name: s.max_steps for s in list_suites()}
    assert budgets == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                       "libero_90": 400}
    for suite in list_suites():
        assert suite.max_steps > suite.longest_demo
        assert suite.settle_steps == 10


def test_libero_long_is_libero_10():
    assert get_suite("libero_long").name == "libero_10"


def test_unknown_suite_lists_valid_names():
    with pytest.raises(UnknownSuiteError, match="valid suites: libero_spatial.*libero_long"):
        get_suite("libero_100")


@pytest.mark.parametrize("name", ["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"])
def test_tasks_and_init_states_load_from_libero(name):
    suite = get_suite(name)
    tasks = suite.tasks
    assert len(tasks) == suite.num_tasks
    assert len({t.name for t in tasks}) == suite.num_tasks
    task = tasks[-1]
    assert task.bddl_file.endswith(".bddl")
    states = task.init_states()
    assert states.shape[0] == 50 and states.ndim == 2 and np.all(np.isfinite(states))


def test_quat_to_axis_angle():
    np.testing.assert_allclose(quat_to_axis_angle([0, 0, 0, 1]), 0)
    half = np.sqrt(0.5)  # 90 degrees about z
    np.testing.assert_allclose(quat_to_axis_angle([0, 0, half, half]), [0, 0, np.pi / 2])
    np.testing.assert_allclose(quat_to_axis_angle([1, 0, 0, 0]), [np.pi, 0, 0])
    np.testing.assert_allclose(quat_to_axis_angle([0, 0, 0, 1.0000001]), 0)  # w clipped into [-1, 1]
