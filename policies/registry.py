"""Policies by name. A new adapter is one module plus one line here.

Entries name the class by import path so that listing policies, or running a light one,
never imports the heavy model code. Policies that live elsewhere need no change here: give
``module.path:ClassName`` as the name, or declare it in the package that holds it under the
entry point group ``vla_bench.policies`` (``name = module.path:ClassName``).
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


ENTRY_POINT_GROUP = "vla_bench.policies"


class UnknownPolicyError(ValueError):
    pass


def installed_policies() -> dict[str, tuple[str, str]]:
    """Policies other installed packages declare (name -> (module:Class, summary)); a built-in
    name is not taken over."""
    from importlib.metadata import entry_points

    return {ep.name: (ep.value, f"installed by {ep.dist.name if ep.dist else 'a package'} ({ep.value})")
            for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in POLICIES}


def policy_class(name: str) -> type[Policy]:
    """The class of a registered or installed policy, or of ``module.path:ClassName``."""
    if name in POLICIES:
        target = POLICIES[name][0]
    elif name in (installed := installed_policies()):
        target = installed[name][0]
    elif ":" in name:
        target = name
    else:
        raise UnknownPolicyError(f"unknown policy {name!r}; valid policies: {', '.join([*POLICIES, *installed])}, "
                                 "or module.path:ClassName for a Policy of your own")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if target != name:  # a registered policy whose dependencies are missing: the error says which
            raise
        raise UnknownPolicyError(f"policy {name!r}: module {module_name!r} cannot be imported ({exc})") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise UnknownPolicyError(f"policy {name!r}: {module_name} has no Policy subclass {class_name!r} "
                                 "(see policies.base.Policy)")
    return cls


def make_policy(name: str, args: dict[str, str] | None = None, seed: int = 0) -> Policy:
    return policy_class(name).from_args(dict(args or {}), seed=seed)


def list_policies() -> list[tuple[str, str]]:
    return [(name, summary) for name, (_, summary) in {**POLICIES, **installed_policies()}.items()]
