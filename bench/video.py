"""Per-episode MP4: third-person and wrist views side by side, one frame per control step."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

FPS = 20  # the control frequency, so the video plays in real time


class EpisodeVideo:
    """Streams frames to a temporary file; ``finish`` names it after the outcome."""

    def __init__(self, directory: Path, stem: str):
        import imageio.v2 as imageio

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stem = stem
        self._tmp = self.directory / f".{stem}.partial.mp4"
        self._writer = imageio.get_writer(self._tmp, fps=FPS, codec="libx264", quality=7, macro_block_size=8)

    def add(self, observation: dict) -> None:
        images = observation["images"]
        self._writer.append_data(np.concatenate([images["agentview"], images["wrist"]], axis=1))

    def finish(self, outcome: str) -> Path | None:
        """The video's final path; None where the episode ended before its first frame (the
        writer creates its file at the first frame)."""
        self._writer.close()
        if not self._tmp.exists():
            return None
        path = self.directory / f"{self.stem}--{outcome}.mp4"
        os.replace(self._tmp, path)
        return path

    def discard(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)


def video_stem(episode) -> str:
    """An episode's video name, before its outcome: suite, task and init state."""
    return f"{episode.suite}--task{episode.task_index}--init{episode.init_state_index}"


def finish_video(video: EpisodeVideo | None, outcome: str) -> str | None:
    """The video's file name; a video that cannot be written costs the video, not the record."""
    if video is None:
        return None
    try:
        path = video.finish(outcome)
    except Exception as exc:  # noqa: BLE001
        print(f"warning: the video of this episode was not saved: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return path.name if path else None
