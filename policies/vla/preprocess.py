"""Observation preprocessing of OpenVLA-OFT's LIBERO evaluation, without TensorFlow.

The reference pipeline (TensorFlow) per camera image: JPEG encode/decode at quality 95,
``tf.image.resize(method="lanczos3", antialias=True)`` to 224, round and clip to uint8, then
for checkpoints trained with crop augmentation a centre crop of 90% of the area resized
back to 224 with ``tf.image.crop_and_resize`` (bilinear) on [0, 1] floats, converted back to
uint8 with ``convert_image_dtype`` (scale by 255.5, truncate). The functions below
implement the same arithmetic: TensorFlow's separable Lanczos-3 kernel with antialiasing
and normalised weights, and crop_and_resize's corner-aligned bilinear sampling in float32.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

IMAGE_SIZE = 224
CROP_AREA = 0.9
JPEG_QUALITY = 95  # tf.image.encode_jpeg's default


def jpeg_roundtrip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _lanczos3(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    out = np.where(x <= 1e-3, 1.0, 3.0 * np.sin(np.pi * x) * np.sin(np.pi * x / 3.0) / np.maximum(np.pi * np.pi * x * x, 1e-30))
    return np.where(x > 3.0, 0.0, out)


def lanczos_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) resampling matrix of TensorFlow's scale_and_translate with lanczos3 and antialias."""
    scale = out_size / in_size
    kernel_scale = max(1.0 / scale, 1.0)  # antialias: widen the kernel when shrinking
    radius = 3.0 * kernel_scale
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        sample = (i + 0.5) / scale
        start = max(int(np.ceil(sample - radius - 0.5)), 0)
        end = min(int(np.floor(sample + radius - 0.5)), in_size - 1) + 1
        sources = np.arange(start, end)
        w = _lanczos3((sources + 0.5 - sample) / kernel_scale)
        total = w.sum()
        weights[i, start:end] = w / total if abs(total) > 0 else w
    return weights


_WEIGHTS: dict[tuple[int, int], np.ndarray] = {}


def lanczos_resize(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8 (rounded half to even, clipped), as TensorFlow."""
    h, w = image.shape[:2]
    rows = _WEIGHTS.setdefault((h, size), lanczos_weights(h, size))
    cols = _WEIGHTS.setdefault((w, size), lanczos_weights(w, size))
    tall = (rows @ image.astype(np.float64).reshape(h, -1)).reshape(size, w, 3)  # resample rows
    out = cols @ tall  # then columns: (size, w) @ (size, w, 3) -> (size, size, 3)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def center_crop(image: np.ndarray, area: float = CROP_AREA) -> np.ndarray:
    """Crop the central ``area`` fraction and resize back (tf.image.crop_and_resize, bilinear)."""
    h, w = image.shape[:2]
    f32 = np.float32
    img = image.astype(f32) / f32(255.0)
    side = f32(np.sqrt(f32(area)))
    offset = (f32(1) - side) / f32(2)
    y1 = x1 = offset
    y2 = x2 = offset + side

    def sample_points(start, end, in_size, out_size):
        step = (end - start) * f32(in_size - 1) / f32(out_size - 1)
        points = start * f32(in_size - 1) + np.arange(out_size, dtype=f32) * step
        low = np.floor(points).astype(int)
        high = np.ceil(points).astype(int)
        return low, high, (points - low).astype(f32)

    top, bottom, y_lerp = sample_points(y1, y2, h, h)
    left, right, x_lerp = sample_points(x1, x2, w, w)
    x_lerp = x_lerp[None, :, None]
    top_row = img[top][:, left] + (img[top][:, right] - img[top][:, left]) * x_lerp
    bottom_row = img[bottom][:, left] + (img[bottom][:, right] - img[bottom][:, left]) * x_lerp
    out = top_row + (bottom_row - top_row) * y_lerp[:, None, None]
    out = np.clip(out, 0.0, 1.0)
    return np.clip(np.trunc(out * f32(255.5)), 0, 255).astype(np.uint8)


def prepare_image(image: np.ndarray, size: int = IMAGE_SIZE, crop: bool = True) -> np.ndarray:
    """A rotated camera image (HxWx3 uint8) -> the model's size x size x 3 uint8 input."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    if image.shape[:2] != (size, size):
        image = lanczos_resize(jpeg_roundtrip(image), size)
    return center_crop(image) if crop else image


def pixel_values(images: Sequence[np.ndarray], means: Sequence[Sequence[float]],
                 stds: Sequence[Sequence[float]]) -> np.ndarray:
    """Prepared images -> (6 * len(images), H, W) float32: per image, one normalised copy per tower."""
    planes = []
    for image in images:
        x = image.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
        for mean, std in zip(means, stds):
            planes.append((x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None])
    return np.concatenate(planes, axis=0)


def normalize_proprio(proprio: np.ndarray, stats: dict) -> np.ndarray:
    """BOUNDS_Q99: 2 (x - q01) / (q99 - q01 + 1e-8) - 1 where the mask is set, then clip to [-1, 1]."""
    low, high = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    proprio = np.asarray(proprio, np.float64)
    if proprio.shape != low.shape:
        raise ValueError(f"proprio has shape {proprio.shape}; the checkpoint's statistics have {low.shape}")
    return np.clip(np.where(mask, 2 * (proprio - low) / (high - low + 1e-8) - 1, proprio), -1.0, 1.0)
