"""Map observations to action chunks: the Policy interface, registry and policies.

Nothing here imports a simulator. Heavy policies (the VLA models) are imported only when
they are asked for by name.
"""

from policies.base import EpisodeInfo, Observation, Policy, PolicyOutput
from policies.registry import UnknownPolicyError, list_policies, make_policy

__all__ = [
    "EpisodeInfo",
    "Observation",
    "Policy",
    "PolicyOutput",
    "UnknownPolicyError",
    "list_policies",
    "make_policy",
]
