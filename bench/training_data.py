"""Training samples from demonstration files, as OpenVLA-OFT's LIBERO data pipeline makes them.

- No-op steps are left out, as OFT's regenerated LIBERO datasets leave them out: an action whose
  first six values have a norm below 1e-4 and whose gripper value equals the previous kept
  action's (the first step of a demonstration: the norm alone).
- Actions are the environment's with the gripper mapped from -1 (open) / +1 (close) to 1 (open) /
  0 (close): ``1 - clip(g, 0, 1)``.
- A sample is a step's observation with the chunk of actions from that step on; the last
  ``chunk - 1`` steps of a demonstration start no sample (as OFT's ``chunk_act_obs``).
- Statistics (``dataset_statistics.json``'s entry) are over every kept step: mean, std, max, min,
  q01 and q99 of actions and proprio; actions and proprio are scaled to [-1, 1] by q01 and q99
  (BOUNDS_Q99) where the mask says so (not the gripper action), clipped, and a dimension whose
  min equals its max becomes 0.

The camera images stay in the file and are read per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.demos import JPEG_IMAGE_SOURCE, read_demos

NOOP_THRESHOLD = 1e-4
CAMERA_KEYS = ("agentview_rgb", "eye_in_hand_rgb")  # third-person first, as the policies' cameras
PROPRIO_KEYS = ("ee_pos", "ee_ori", "gripper_states")  # 3 + 3 + 2 = the 8-D proprio


def is_noop(action: np.ndarray, previous: np.ndarray | None) -> bool:
    still = float(np.linalg.norm(action[:-1])) < NOOP_THRESHOLD
    return still if previous is None else still and action[-1] == previous[-1]


def kept_steps(actions: np.ndarray, drop_noops: bool = True) -> np.ndarray:
    """Indices of the steps a demonstration keeps."""
    if not drop_noops:
        return np.arange(len(actions))
    kept: list[int] = []
    for t, action in enumerate(actions):
        if not is_noop(action, actions[kept[-1]] if kept else None):
            kept.append(t)
    return np.array(kept, dtype=int)


def training_actions(actions: np.ndarray) -> np.ndarray:
    """Environment actions -> the gripper convention OFT trains with (1 open, 0 close)."""
    out = np.array(actions, dtype=np.float64)
    out[:, -1] = 1.0 - np.clip(out[:, -1], 0.0, 1.0)
    return out


def statistics(values: np.ndarray, mask: list[bool]) -> dict:
    return {
        "mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
        "max": values.max(0).tolist(), "min": values.min(0).tolist(),
        "q01": np.quantile(values, 0.01, axis=0).tolist(), "q99": np.quantile(values, 0.99, axis=0).tolist(),
        "mask": mask,
    }


def normalize(values: np.ndarray, stats: dict) -> np.ndarray:
    """BOUNDS_Q99 where the mask is set (clipped to [-1, 1]); dimensions that never vary -> 0."""
    low, high = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    mask = np.asarray(stats["mask"], dtype=bool)
    scaled = np.where(mask, np.clip(2 * (values - low) / (high - low + 1e-8) - 1, -1, 1), values)
    return np.where(np.asarray(stats["min"]) == np.asarray(stats["max"]), 0.0, scaled)


@dataclass
class Episode:
    file: int  # index into the set's files
    name: str  # the demonstration's group, e.g. demo_3
    steps: np.ndarray  # kept step indices into the file's arrays
    actions: np.ndarray  # (kept, 7), training convention, not normalised
    proprio: np.ndarray  # (kept, 8)
    instruction: str
    suite: str
    recorded_steps: int  # before no-ops were dropped
    from_jpeg: bool = False  # images decoded from stored JPEG files (bench.rlds), not rendered


class TrainingSet:
    """Samples of every demonstration in ``paths`` (files written by ``bench record-demos``,
    ``regenerate-demos`` or ``import-rlds``). Holds the files open for reading images; ``close`` when done."""

    def __init__(self, paths: list[Path], chunk_length: int, drop_noops: bool = True, stats: dict | None = None):
        """``stats``: normalise with these (a validation set takes its training set's)."""
        import h5py

        if not paths:
            raise ValueError("no demonstration files given")
        self.chunk_length = chunk_length
        self.drop_noops = drop_noops
        self.paths = [Path(p) for p in paths]
        self.files = []
        self.episodes: list[Episode] = []
        for index, path in enumerate(self.paths):
            if not path.is_file():
                raise FileNotFoundError(f"demonstration file {path} does not exist")
            self.episodes += self._read_episodes(path, index)
            self.files.append(h5py.File(path, "r"))  # the images, read per sample
        self.dropped_noops = sum(e.recorded_steps - len(e.steps) for e in self.episodes)
        if not self.episodes:
            raise ValueError("the demonstration files hold no demonstrations")
        self.samples = [(i, t) for i, e in enumerate(self.episodes) for t in range(len(e.steps) - chunk_length + 1)]
        if not self.samples:
            raise ValueError(f"no demonstration is {chunk_length} steps long (after dropping no-ops): nothing to train on")
        self.stats = stats or {
            "action": statistics(np.concatenate([e.actions for e in self.episodes]), [True] * 6 + [False]),
            "proprio": statistics(np.concatenate([e.proprio for e in self.episodes]), [True] * 8),
            "num_transitions": int(sum(len(e.steps) for e in self.episodes)),
            "num_trajectories": len(self.episodes),
        }

    def _read_episodes(self, path: Path, index: int) -> list[Episode]:
        import h5py

        demos = read_demos(path, images=False)  # refuses a file that is no demonstration file
        with h5py.File(path, "r") as f:
            orientation = f["data"].attrs.get("image_orientation")
            from_jpeg = f["data"].attrs.get("image_source") == JPEG_IMAGE_SOURCE
            cameras = [[key in f["data"][demo.name]["obs"] for key in CAMERA_KEYS] for demo in demos]
        if orientation is None or not str(orientation).startswith("upright"):
            # LIBERO's original files hold raw (upside-down) renders and another proprio layout.
            raise ValueError(f"{path}: its images are not marked upright (attribute data.image_orientation); "
                             "train on files written by bench record-demos, or make them from LIBERO's own "
                             "files with bench regenerate-demos")
        episodes = []
        for demo, has_camera in zip(demos, cameras):
            missing = [k for k, has in zip(CAMERA_KEYS, has_camera) if not has]
            missing += [k for k in PROPRIO_KEYS if k not in demo.obs]
            if missing:
                raise ValueError(f"{path}: {demo.name} lacks {', '.join(missing)}")
            steps = kept_steps(demo.actions, self.drop_noops)
            proprio = np.concatenate([demo.obs[k] for k in PROPRIO_KEYS], axis=1)
            episodes.append(Episode(index, demo.name, steps, training_actions(demo.actions[steps]), proprio[steps],
                                    str(demo.attrs["instruction"]), str(demo.attrs.get("suite", "")),
                                    len(demo.actions), from_jpeg))
        return episodes

    @property
    def suites(self) -> list[str]:
        return sorted({e.suite for e in self.episodes})

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, index: int) -> dict:
        """Raw camera images, normalised proprio and action chunk (chunk, 7) and the instruction."""
        e, t = self.samples[index]
        episode = self.episodes[e]
        group = self.files[episode.file]["data"][episode.name]["obs"]
        step = int(episode.steps[t])
        return {
            "images": [group[key][step] for key in CAMERA_KEYS],
            "from_jpeg": episode.from_jpeg,
            "proprio": normalize(episode.proprio[t], self.stats["proprio"]),
            "actions": normalize(episode.actions[t:t + self.chunk_length], self.stats["action"]),
            "instruction": episode.instruction,
        }

    def close(self) -> None:
        for f in self.files:
            f.close()
