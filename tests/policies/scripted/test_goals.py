from collections import Counter
from pathlib import Path

import pytest

from policies.scripted.goals import Predicate, UnsupportedGoalError, parse_goal, read_goal
from suites import get_suite

FOUR_SUITES = ["libero_spatial", "libero_object", "libero_goal", "libero_10"]


@pytest.mark.parametrize("suite", FOUR_SUITES + ["libero_90"])
def test_every_goal_of_the_suites_parses(suite):
    counts = Counter()
    for task in get_suite(suite).tasks:
        goal = read_goal(task.bddl_file)
        assert goal, task.name
        counts.update(p.name for p in goal)
        for predicate in goal:
            assert all(arg in Path(task.bddl_file).read_text() for arg in predicate.args)
    assert counts  # every suite has goals, all of them among the supported predicates


def test_goal_predicates_used_by_the_four_suites():
    used = Counter(p.name for s in FOUR_SUITES for t in get_suite(s).tasks for p in read_goal(t.bddl_file))
    assert set(used) == {"on", "in", "open", "close", "turnon"}
    assert used["on"] == 10 + 7 + 7 and used["in"] == 10 + 1 + 9


def test_parse_goal_shapes():
    text = "(define (problem x) (:goal (And (On bowl_1 plate_1) (Turnon stove_1))) )"
    assert parse_goal(text) == [Predicate("on", ("bowl_1", "plate_1")), Predicate("turnon", ("stove_1",))]
    assert parse_goal("(:goal (Open drawer_1))") == [Predicate("open", ("drawer_1",))]


@pytest.mark.parametrize(
    "text, message",
    [
        ("(:goal (And (Stack a b)))", "'Stack' is not supported"),
        ("(:goal (And (Or (On a b) (On a c))))", "'Or' is not supported"),
        ("(:goal (And (On a)))", "takes 2 names"),
        ("(:objects a b)", "no \\(:goal"),
    ],
)
def test_unsupported_goals_name_the_problem(text, message):
    with pytest.raises(UnsupportedGoalError, match=message):
        parse_goal(text)
