"""Training-time image augmentation of OpenVLA-OFT's LIBERO fine-tuning, without TensorFlow.

The reference (its RLDS pipeline, with dlimp's ``augment_image``) applies to each camera image,
already resized to 224, in this order: a random crop of 90% of the area with aspect ratio 1
resized back (``crop_and_resize``, bilinear), brightness + U[-0.2, 0.2], contrast x U[0.8, 1.2]
about each channel's mean, saturation x U[0.8, 1.2], hue + U[-0.05, 0.05], clipping to [0, 1]
after each step, on [0, 1] floats converted back to uint8.

dlimp hands the SAME random seed to every step of an image (each image of a frame gets its
own), and each step draws its parameters with TensorFlow's stateless generator from that seed:
one uniform number ``u`` then sets them all. The crop's top and left offsets are both
``u * (1 - side)`` (the box slides along the diagonal), and a crop near the top left comes
with the darkest, flattest, least saturated colours. ``augment_image`` reproduces this coupling:
it takes ``u`` and derives every parameter from it.
"""

from __future__ import annotations

import numpy as np

from policies.vla.preprocess import crop_and_resize, to_uint8

CROP_SCALE = 0.9
BRIGHTNESS = 0.2  # delta in [-0.2, 0.2]
CONTRAST = (0.8, 1.2)
SATURATION = (0.8, 1.2)
HUE = 0.05  # delta in [-0.05, 0.05] of a full turn


def augment_image(image: np.ndarray, u: float) -> np.ndarray:
    """An HxWx3 uint8 image augmented with parameters set by ``u`` in [0, 1)."""
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must lie in [0, 1), got {u}")
    f32 = np.float32
    u = f32(u)
    side = f32(np.sqrt(f32(CROP_SCALE)))
    offset = u * (f32(1) - side)
    x = crop_and_resize(image, offset, offset, side).astype(np.float32) * f32(1.0 / 255)
    x = np.clip(x + lerp(-BRIGHTNESS, BRIGHTNESS, u), 0, 1)
    mean = x.mean(axis=(0, 1), keepdims=True, dtype=np.float32)
    x = np.clip((x - mean) * lerp(*CONTRAST, u) + mean, 0, 1)
    # Saturation then hue, each an HSV round trip in the reference, in one: scaling the
    # saturation leaves hue and value as they are (and every channel within [0, value]), so
    # the second conversion would give back the same hue and value and the scaled saturation.
    h, s, v = rgb_to_hsv(x)
    s = np.clip(s * lerp(*SATURATION, u), 0, 1)
    x = np.clip(hsv_to_rgb(np.mod(h + lerp(-HUE, HUE, u), f32(1)), s, v), 0, 1)
    return to_uint8(x.astype(np.float32))


def lerp(low: float, high: float, u: np.float32) -> np.float32:
    """A stateless uniform draw's value in [low, high) for the underlying number ``u``."""
    return np.float32(low) + u * np.float32(high - low)


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[0, 1] RGB -> hue, saturation, value in [0, 1] (hue a fraction of a turn)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    spread = value - rgb.min(axis=-1)
    saturation = np.where(value > 0, spread / np.where(value > 0, value, 1), 0)
    safe = np.where(spread > 0, spread, 1) * 6
    hue = np.where(r == value, (g - b) / safe,
                   np.where(g == value, (b - r) / safe + 1 / 3, (r - g) / safe + 2 / 3))
    hue = np.where(spread > 0, hue, 0)
    return np.where(hue < 0, hue + 1, hue), saturation, value


def hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    six = hue * 6
    channels = [np.clip(np.abs(six - 3) - 1, 0, 1), np.clip(2 - np.abs(six - 2), 0, 1),
                np.clip(2 - np.abs(six - 4), 0, 1)]
    return np.stack([value * (1 - saturation + saturation * c) for c in channels], axis=-1)
