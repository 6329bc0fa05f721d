"""A run's configuration, and which parts of it decide whether two runs are comparable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Settings that change nothing about what is measured; a resumed run may change them.
NON_PROTOCOL_FIELDS = ("watchdog_s", "video", "workers", "max_batch")
# Policy options compared by what they resolve to (the policy's identity), not as written:
# device=auto and device=cpu are the same run on a machine without a GPU.
RESOLVED_POLICY_ARGS = ("device",)


@dataclass
class RunConfig:
    suite: str
    policy: str
    policy_args: dict[str, str] = field(default_factory=dict)
    tasks: list[int] | None = None
    episodes_per_task: int | None = None
    init_states: list[int] | None = None
    seed: int = 0
    chunk_length: int | None = None  # None: the policy's own chunk length
    max_steps: int | None = None  # None: the suite's protocol budget
    camera_size: int = 256
    watchdog_s: float = 900.0
    video: bool = False
    workers: int = 1  # env worker processes; 1 runs everything in this process
    max_batch: int = 0  # most observations per batched policy call; 0: one per worker

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def protocol_differences(self, other: "RunConfig") -> list[str]:
        """Human-readable list of the protocol settings in which two configs differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        for args in (mine, theirs):
            args["policy_args"] = {k: v for k, v in (args["policy_args"] or {}).items() if k not in RESOLVED_POLICY_ARGS}
        return [
            f"{name}: recorded {theirs[name]!r}, now {mine[name]!r}"
            for name in mine
            if name not in NON_PROTOCOL_FIELDS and mine[name] != theirs[name]
        ]
