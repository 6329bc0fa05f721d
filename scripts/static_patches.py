"""How much of a LIBERO frame VLA-Cache could reuse: static patches between consecutive queries.

The scripted expert runs one episode per task (init state 0, 8-action chunks, images asked
for at every query as a vision policy would). Each query's two camera images are prepared as
for OFT and compared patch by patch with the previous query's, as VLA-Cache compares them
(8-bit values, cosine similarity >= the threshold).

    python scripts/static_patches.py --suite libero_spatial --tasks 0,1,2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.runner import run_task_episode
from policies.pruning.vla_cache import patch_similarity, patch_vectors
from policies.registry import make_policy
from policies.vla.config import preset
from policies.vla.policy import CAMERAS
from policies.vla.preprocess import pixel_values, prepare_image
from suites.registry import get_suite

CHUNK = 8


def recorded_frames(policy) -> list[list[np.ndarray]]:
    """Wrap ``policy.act`` so that every query's prepared camera images are kept."""
    frames: list[list[np.ndarray]] = []
    act = policy.act

    def recording(observations):
        for obs in observations:
            frames.append([prepare_image(obs.images[camera]) for camera in CAMERAS])
        return act(observations)

    policy.act = recording
    return frames


def static_counts(frames: list[list[np.ndarray]], threshold: float) -> tuple[np.ndarray, int]:
    """(queries - 1, cameras) static patches of each query against the one before, and the
    patches per camera image."""
    config = preset("full")
    levels = (config.image_means[0], config.image_stds[0])
    vectors = [patch_vectors(torch.from_numpy(pixel_values(f, config.image_means, config.image_stds)),
                             len(CAMERAS), levels) for f in frames]
    counts = []
    for before, now in zip(vectors, vectors[1:]):
        static = (patch_similarity(now, before) >= threshold).reshape(len(CAMERAS), -1)
        counts.append(static.sum(axis=1))
    return np.array(counts), vectors[0].shape[0] // len(CAMERAS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--tasks", default="0", help="comma-separated task indices")
    parser.add_argument("--threshold", type=float, default=0.996)
    args = parser.parse_args()

    suite = get_suite(args.suite)
    policy = make_policy("scripted", {"with_images": "true", "chunk_length": str(CHUNK)})
    frames = recorded_frames(policy)
    for index in (int(t) for t in args.tasks.split(",")):
        frames.clear()
        result = run_task_episode(suite, index, policy, CHUNK)
        counts, patches = static_counts(frames, args.threshold)
        print(f"{suite.name} task {index}: {result.outcome} in {result.steps} steps, {len(frames)} queries; "
              f"static patches of {patches} per camera {CAMERAS}: "
              f"mean {counts.mean(axis=0).round(1).tolist()}, "
              f"10th percentile {np.percentile(counts, 10, axis=0).round(1).tolist()}, "
              f"90th {np.percentile(counts, 90, axis=0).round(1).tolist()}", flush=True)


if __name__ == "__main__":
    main()
