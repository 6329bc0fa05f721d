"""scripts/adp_gate.py: the gate's states along an episode's query positions, and the costs of
a query that prunes and of one that does not."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "adp_gate.py"


def load_script():
    spec = importlib.util.spec_from_file_location("adp_gate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_fresh_gate_per_episode_and_the_two_query_costs():
    script = load_script()
    speeding_up = [np.array([0.01 * q * q, 0.0, 0.0]) for q in range(11)]
    states = script.gate_states(speeding_up)
    assert states == [False] * 3 + [True] * 3 + [False] + [True] * 3 + [False]
    assert script.gate_states(speeding_up[:4]) == states[:4]  # nothing carries over between episodes
    costs = script.query_costs(0.5)
    assert (costs["pruned_tokens"], costs["full_tokens"]) == (256, 512)
    assert costs["pruned_tflops"] < costs["full_tflops"]
