"""Policies without a model: lower bounds, timing runs and deterministic replays."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from policies.base import ACTION_DIM, EpisodeInfo, Observation, Policy, PolicyOptionError, PolicyOutput

_OPEN_GRIPPER_NOOP = np.array([0, 0, 0, 0, 0, 0, -1.0])


class NoopPolicy(Policy):
    name = "noop"
    needs_images = False

    def act(self, observations: Sequence[Observation]) -> list[PolicyOutput]:
        chunk = np.tile(_OPEN_GRIPPER_NOOP, (self.chunk_length, 1))
        return [PolicyOutput(chunk.copy()) for _ in observations]


class RandomPolicy(Policy):
    """Uniform translation/rotation deltas in [-scale, scale], gripper open or closed at random."""

    name = "random"
    needs_images = False

    @dataclass
    class Options(Policy.Options):
        scale: float = 1.0

    def __init__(self, options: Options, seed: int = 0):
        super().__init__(options, seed)
        self._rngs: dict[str, np.random.Generator] = {}

    def reset(self, episode: EpisodeInfo) -> None:
        # Seeded from the episode, so results do not depend on the order episodes run in.
        self._rngs[episode.episode_id] = np.random.default_rng(episode.seed)

    def act(self, observations: Sequence[Observation]) -> list[PolicyOutput]:
        outputs = []
        for obs in observations:
            rng = self._rngs[obs.episode_id]
            chunk = rng.uniform(-self.options.scale, self.options.scale, size=(self.chunk_length, ACTION_DIM))
            chunk[:, 6] = np.where(rng.random(self.chunk_length) < 0.5, -1.0, 1.0)
            outputs.append(PolicyOutput(chunk))
        return outputs


class ReplayPolicy(Policy):
    """Replays recorded actions open loop.

    ``path`` is a ``.npy`` array (T, 7) used for every episode, a ``.npz`` whose arrays are
    named ``task{t}_init{i}`` (one episode) or ``task{t}`` (every episode of a task), or a
    demonstration file (``.hdf5``, see ``bench record-demos``), replayed by task and init state.
    After the recording ends the arm holds still and keeps the last gripper command.
    """

    name = "replay"
    needs_images = False

    @dataclass
    class Options(Policy.Options):
        path: str = ""

    def __init__(self, options: Options, seed: int = 0):
        super().__init__(options, seed)
        if not options.path:
            raise PolicyOptionError("policy 'replay' needs --policy-arg path=FILE (.npy or .npz)")
        path = Path(options.path)
        if not path.is_file():
            raise PolicyOptionError(f"replay file not found: {path}")
        self._recordings = _load_recordings(path)
        self._episodes: dict[str, tuple[np.ndarray, int]] = {}

    def reset(self, episode: EpisodeInfo) -> None:
        keys = (f"task{episode.task_index}_init{episode.init_state_index}", f"task{episode.task_index}", "")
        actions = next((self._recordings[k] for k in keys if k in self._recordings), None)
        if actions is None:
            raise KeyError(f"replay file has no actions for {keys[0]} (nor {keys[1]})")
        self._episodes[episode.episode_id] = (actions, 0)

    def act(self, observations: Sequence[Observation]) -> list[PolicyOutput]:
        outputs = []
        for obs in observations:
            actions, cursor = self._episodes[obs.episode_id]
            chunk = actions[cursor : cursor + self.chunk_length]
            if len(chunk) < self.chunk_length:
                hold = _OPEN_GRIPPER_NOOP.copy()
                hold[6] = actions[-1, 6] if len(actions) else -1.0
                chunk = np.vstack([chunk, np.tile(hold, (self.chunk_length - len(chunk), 1))])
            self._episodes[obs.episode_id] = (actions, cursor + self.chunk_length)
            outputs.append(PolicyOutput(chunk.copy()))
        return outputs

    def identity(self) -> dict:
        digest = hashlib.sha256(Path(self.options.path).read_bytes()).hexdigest()
        return {**super().identity(), "sha256": digest}


def _demo_actions(path: Path) -> dict[str, np.ndarray]:
    """Actions of each demonstration in a LIBERO-layout HDF5 file, keyed task{t}_init{i}. Only
    demonstrations recorded from an evaluation init state have one (not those replayed from
    LIBERO's own files, which start from their own states)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise PolicyOptionError(f"{path.name} has no 'data' group: not a demonstration file")
        recordings = {
            f"task{g.attrs['task_index']}_init{g.attrs['init_state_index']}": g["actions"][()]
            for g in f["data"].values() if "init_state_index" in g.attrs
        }
    if not recordings:
        raise PolicyOptionError(f"{path.name} holds no demonstration recorded from an evaluation init state")
    return recordings


def _load_recordings(path: Path) -> dict[str, np.ndarray]:
    try:
        recordings = _read_recordings(path)
    except PolicyOptionError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy and h5py raise many types for a damaged file
        raise PolicyOptionError(f"replay file {path} cannot be read ({type(exc).__name__}: {exc})") from None
    for key, actions in recordings.items():
        if actions.ndim != 2 or actions.shape[1] != ACTION_DIM:
            raise PolicyOptionError(f"replay actions {key or path.name!r} have shape {actions.shape}, expected (T, 7)")
    return {key: np.asarray(actions, dtype=np.float64) for key, actions in recordings.items()}


def _read_recordings(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npy":
        recordings = {"": np.load(path)}
    elif path.suffix == ".npz":
        with np.load(path) as data:
            recordings = {key: data[key] for key in data.files}
    elif path.suffix in (".hdf5", ".h5"):
        recordings = _demo_actions(path)
    else:
        raise PolicyOptionError(f"replay file must be .npy, .npz or .hdf5, got {path.name}")
    return recordings
