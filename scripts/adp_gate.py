"""How often ADP's motion gate would prune along real manipulation, and what that costs per query.

The scripted expert runs one episode per task (init state 0, 8-action chunks, a query per
chunk). The end effector's position at each query goes through ADP's gate (its default
settings), which decides, as in a run of ``--policy adp``, whether that query prunes. A
query that prunes costs what ``bench profile --policy adp`` counts, one that does not what
OFT's counts (full size, meta device), so the mean cost per query follows from the share.
The expert moves as a planner does, not as a trained VLA: the shares show how the gate
responds to stop-and-go manipulation, not what a given checkpoint's episodes would give.

    python scripts/adp_gate.py --suite libero_spatial --tasks 0,1,2
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.runner import run_task_episode
from policies.pruning.adp import MotionGate
from policies.registry import make_policy
from suites.registry import get_suite

CHUNK = 8


def recorded_positions(policy) -> list[np.ndarray]:
    """Wrap ``policy.act`` so that the end effector's position at every query is kept."""
    positions: list[np.ndarray] = []
    act = policy.act

    def recording(observations):
        positions.extend(np.asarray(obs.proprio[:3], dtype=np.float64) for obs in observations)
        return act(observations)

    policy.act = recording
    return positions


def gate_states(positions: list[np.ndarray]) -> list[bool]:
    """Whether each query of an episode prunes, by a fresh gate with the default settings."""
    gate = MotionGate()
    return [gate.prunes(p) for p in positions]


def query_costs(ratio: float) -> dict[str, float]:
    """TFLOPs and visual tokens of a full-size query that prunes and of one that does not."""
    from bench.profile import ProfileSettings, profile

    costs = {}
    for name, policy, args in (("pruned", "adp", {"ratio": str(ratio)}), ("full", "oft", {})):
        result = profile(ProfileSettings(policy=policy, policy_args=args, size="full", device="meta", count=False))
        costs[f"{name}_tflops"], costs[f"{name}_tokens"] = result["tflops_per_query"], result["visual_tokens_llm"]
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--tasks", default="0", help="comma-separated task indices")
    parser.add_argument("--ratio", type=float, default=0.75, help="ADP's keep ratio on a query that prunes")
    args = parser.parse_args()

    costs = query_costs(args.ratio)
    print(f"a query that prunes: {costs['pruned_tokens']} visual tokens, {costs['pruned_tflops']:.4f} T; "
          f"one that does not: {costs['full_tokens']}, {costs['full_tflops']:.4f} T", flush=True)
    suite = get_suite(args.suite)
    policy = make_policy("scripted", {"chunk_length": str(CHUNK)})
    positions = recorded_positions(policy)
    shares = []
    for index in (int(t) for t in args.tasks.split(",")):
        positions.clear()
        result = run_task_episode(suite, index, policy, CHUNK)
        states = gate_states(positions)
        share = float(np.mean(states))
        shares.append(share)
        tflops = share * costs["pruned_tflops"] + (1 - share) * costs["full_tflops"]
        print(f"{suite.name} task {index}: {result.outcome} in {result.steps} steps, {len(states)} queries, "
              f"{sum(states)} pruned ({share:.1%}): mean {tflops:.4f} T per query "
              f"({tflops / costs['full_tflops']:.3f}x OFT)", flush=True)
    if len(shares) > 1:
        print(f"mean over {len(shares)} tasks: {np.mean(shares):.1%} of queries pruned", flush=True)


if __name__ == "__main__":
    main()
