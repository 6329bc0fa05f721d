"""Policies by name. A new adapter is one module plus one line here.

Entries name the class by import path so that listing policies, or running a light one,
never imports the heavy model code.
"""

from __future__ import annotations

import importlib

from policies.base import Policy

POLICIES: dict[str, tuple[str, str]] = {
    "noop": ("policies.simple:NoopPolicy", "holds still with the gripper open (lower bound, timing)"),
    "random": ("policies.simple:RandomPolicy", "uniform random actions, seeded per episode"),
    "replay": ("policies.simple:ReplayPolicy", "replays recorded actions from a .npy/.npz file"),
    "scripted": ("policies.scripted:ScriptedPolicy", "privileged-state expert: motion primitives from the BDDL goal"),
    "remote": ("policies.remote:RemotePolicy", "a policy answered by 'bench serve' on this or another machine (address=HOST:PORT)"),
    "oft": ("policies.vla.policy:OFTPolicy", "OpenVLA-OFT from a local checkpoint (--checkpoint DIR or cached Hub REPO), or random weights"),
    "lightvla": ("policies.pruning.adapters:LightVLAPolicy", "OpenVLA-OFT + LightVLA query-based visual token selection"),
    "lightvla_star": ("policies.pruning.adapters:LightVLAStarPolicy", "LightVLA with learnable queries, after LLM layer L (llm:L) or vision block B (vision:B)"),
    "fastv": ("policies.pruning.adapters:FastVPolicy", "OpenVLA-OFT + FastV: drop visual tokens after layer k-1 (k, r)"),
    "pyramiddrop": ("policies.pruning.adapters:PyramidDropPolicy", "OpenVLA-OFT + PyramidDrop: staged drops ranked by the instruction's last token (layers, ratios)"),
    "divprune": ("policies.pruning.adapters:DivPrunePolicy", "OpenVLA-OFT + DivPrune: keep the most diverse visual tokens (max-min, ratio or keep)"),
    "adp": ("policies.pruning.adapters:ADPPolicy", "OpenVLA-OFT + ADP: text-relevant visual tokens on the queries the end effector's motion selects (ratio, gate)"),
    "vla_cache": ("policies.pruning.adapters:VLACachePolicy", "OpenVLA-OFT + VLA-Cache: reuse static visual tokens' K/V across steps"),
    "sparsevlm": ("policies.pruning.adapters:SparseVLMPolicy", "OpenVLA-OFT + SparseVLM: text-rated progressive pruning with recycling (budget)"),
}


class UnknownPolicyError(ValueError):
    pass


def policy_class(name: str) -> type[Policy]:
    if name not in POLICIES:
        raise UnknownPolicyError(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}")
    module_name, class_name = POLICIES[name][0].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_policy(name: str, args: dict[str, str] | None = None, seed: int = 0) -> Policy:
    return policy_class(name).from_args(dict(args or {}), seed=seed)


def list_policies() -> list[tuple[str, str]]:
    return [(name, summary) for name, (_, summary) in POLICIES.items()]
