import pytest

from bench.plan import parse_index_list, plan_episodes
from suites import get_suite


def test_default_plan_is_the_standard_evaluation():
    plan = plan_episodes(get_suite("libero_spatial"))
    assert len(plan) == 500
    assert plan[0].key == "libero_spatial/0/0" and plan[-1].key == "libero_spatial/9/49"


def test_first_n_init_states_and_named_ones():
    suite = get_suite("libero_long")
    plan = plan_episodes(suite, tasks=[0, 3], episodes_per_task=2)
    assert [p.key for p in plan] == ["libero_10/0/0", "libero_10/0/1", "libero_10/3/0", "libero_10/3/1"]
    plan = plan_episodes(suite, tasks=[1], init_states=[7, 12])
    assert [p.init_state_index for p in plan] == [7, 12]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tasks": [10]}, "task 10 does not exist"),
        ({"episodes_per_task": 51}, "1..50"),
        ({"init_states": [50]}, "init state 50"),
        ({"episodes_per_task": 2, "init_states": [1]}, "not both"),
    ],
)
def test_bad_selection_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_episodes(get_suite("libero_goal"), **kwargs)


def test_episode_seeds_are_stable_and_distinct():
    plan = plan_episodes(get_suite("libero_goal"), episodes_per_task=3)
    seeds = [p.seed(0) for p in plan]
    assert len(set(seeds)) == len(seeds)
    assert seeds == [p.seed(0) for p in plan_episodes(get_suite("libero_goal"), episodes_per_task=3)]
    assert seeds != [p.seed(1) for p in plan]


def test_parse_index_list():
    assert parse_index_list("0,3,5-7", "task") == [0, 3, 5, 6, 7]
    assert parse_index_list(None, "task") is None
    with pytest.raises(ValueError, match="bad task list"):
        parse_index_list("a,b", "task")
    with pytest.raises(ValueError, match="twice"):
        parse_index_list("1,1", "task")
