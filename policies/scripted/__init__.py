"""The privileged-state scripted expert (policy ``scripted``)."""

from policies.scripted.policy import ScriptedPolicy

__all__ = ["ScriptedPolicy"]
