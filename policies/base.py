"""The policy interface the harness drives.

A policy is reset once per episode and then asked, for a batch of observations, for one
action chunk each. It declares what it reads (images, privileged simulator state) so the
harness renders and gathers only that.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

ACTION_DIM = 7  # [dx, dy, dz, dax, day, daz, gripper], gripper -1 = open, +1 = close


@dataclass(frozen=True)
class EpisodeInfo:
    episode_id: str
    suite: str
    task_index: int
    task_name: str
    instruction: str
    init_state_index: int
    seed: int


@dataclass
class Observation:
    proprio: np.ndarray  # (8,) eef pos, eef axis-angle, gripper finger positions
    instruction: str
    episode_id: str
    images: dict[str, np.ndarray] | None = None  # rotated HxWx3 uint8 by camera: "agentview", "wrist"
    privileged: dict[str, Any] | None = None  # only for policies that declare needs_privileged


@dataclass
class PolicyOutput:
    actions: np.ndarray  # (n, 7): the chunk, executed first action first
    # Per-query figures: visual tokens, FLOPs, ... ``warmup: True`` marks a query that paid a
    # one-time cost (a CUDA graph capture), so its latency is kept out of the latency summary.
    stats: dict[str, Any] = field(default_factory=dict)


class PolicyOptionError(ValueError):
    pass


class Policy(ABC):
    """Base class; subclasses set ``name`` and an ``Options`` dataclass of their settings."""

    name: ClassVar[str]
    needs_images: ClassVar[bool] = True
    needs_privileged: ClassVar[bool] = False
    # What a reader of this policy's results must know (an approximation, say); reports print it.
    caveat: ClassVar[str | None] = None
    # Raised when the policy's behaviour changes under the same options, so that a run recorded
    # before cannot be resumed with episodes of the new behaviour (part of the identity).
    revision: ClassVar[int | None] = None

    @dataclass
    class Options:
        chunk_length: int = 8

    def __init__(self, options: "Policy.Options", seed: int = 0):
        self.options = options
        self.seed = seed

    @property
    def chunk_length(self) -> int:
        return self.options.chunk_length

    @classmethod
    def from_args(cls, args: dict[str, str], seed: int = 0) -> "Policy":
        return cls(parse_options(cls.Options, args, cls.name), seed=seed)

    def select_suite(self, suite: str) -> None:
        """The suite a run evaluates, given before its first episode. A policy that depends on
        it (a checkpoint's statistics per suite) settles that here, or raises
        ``PolicyOptionError`` before anything runs."""

    def reset(self, episode: EpisodeInfo) -> None:
        """Start an episode; policies with per-episode state clear it here."""

    def end(self, episode: EpisodeInfo) -> None:
        """An episode is over (whatever its outcome); policies free its state here. One policy
        serves a whole run, so state kept per episode would otherwise grow with every episode."""

    @abstractmethod
    def act(self, observations: Sequence[Observation]) -> list[PolicyOutput]:
        """One action chunk per observation."""

    def synchronize(self) -> None:
        """Wait for queued device work, so the caller's latency measurement is honest."""

    def identity(self) -> dict[str, Any]:
        """What makes two runs of this policy comparable (options, checkpoint hashes...)."""
        ident = {"name": self.name, "options": dataclasses.asdict(self.options)}
        if self.revision is not None:
            ident["revision"] = self.revision
        return ident

    def provenance(self) -> dict[str, Any] | None:
        """Where the policy runs when that is not this process (a served policy's host, package
        versions and code), for the run's manifest; None when it runs here."""
        return None


def parse_options(options_cls: type, args: dict[str, str], policy_name: str):
    """Build an options dataclass from ``key=value`` strings, by the fields' declared types."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    types = typing.get_type_hints(options_cls)
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise PolicyOptionError(
            f"policy {policy_name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(fields) or 'none'}"
        )
    values = {}
    for key, text in args.items():
        try:
            values[key] = _convert(text, types[key])
        except ValueError as exc:
            raise PolicyOptionError(f"policy {policy_name!r} option {key}={text!r}: {exc}") from None
    return options_cls(**values)


def _convert(text: str, kind: type):
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if kind in (int, float, str):
        return kind(text)
    raise ValueError(f"options of type {kind} cannot be given on the command line")
