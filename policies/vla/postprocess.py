"""From the model's normalised outputs to LIBERO actions (OpenVLA-OFT's conventions)."""

from __future__ import annotations

import numpy as np


def unnormalize_actions(actions: np.ndarray, stats: dict) -> np.ndarray:
    """BOUNDS_Q99: 0.5 (a + 1) (q99 - q01 + 1e-8) + q01 where the mask is set; others pass through."""
    low, high = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    actions = np.asarray(actions, np.float64)
    return np.where(mask, 0.5 * (actions + 1) * (high - low + 1e-8) + low, actions)


def gripper_to_env(actions: np.ndarray) -> np.ndarray:
    """Gripper in [0, 1] (training data: 0 = close, 1 = open) -> env's -1 = open, +1 = close.

    Map to [-1, 1] with 2x - 1, binarise with sign, then invert.
    """
    out = np.array(actions, dtype=np.float64, copy=True)
    out[..., -1] = -np.sign(2 * out[..., -1] - 1)
    return out
