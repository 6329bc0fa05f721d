"""scripts/adp_gate.py: the gate's states along an episode's query positions, and the costs of
a query that prunes and of one that does not."""

import numpy as np
import pytest

from tests.scripts import load_script

pytest.importorskip("torch")


def test_a_fresh_gate_per_episode_and_the_two_query_costs():
    script = load_script("adp_gate")
    speeding_up = [np.array([0.01 * q * q, 0.0, 0.0]) for q in range(11)]
    states = script.gate_states(speeding_up)
    assert states == [False] * 3 + [True] * 3 + [False] + [True] * 3 + [False]
    assert script.gate_states(speeding_up[:4]) == states[:4]  # nothing carries over between episodes
    costs = script.query_costs(0.5)
    assert (costs["pruned_tokens"], costs["full_tokens"]) == (256, 512)
    assert costs["pruned_tflops"] < costs["full_tflops"]
