"""Observation preprocessing of OpenVLA-OFT's LIBERO evaluation, without TensorFlow.

The reference pipeline (TensorFlow) per camera image: JPEG encode/decode at quality 95,
``tf.image.resize(method="lanczos3", antialias=True)`` to 224, round and clip to uint8, then
for checkpoints trained with crop augmentation a centre crop of 90% of the area resized
back to 224 with ``tf.image.crop_and_resize`` (bilinear) on [0, 1] floats, converted back to
uint8 with ``convert_image_dtype`` (scale by 255.5, truncate). The functions below
implement the same arithmetic: libjpeg's decoding as TensorFlow configures it (fast integer
IDCT, fancy chroma upsampling), TensorFlow's separable Lanczos-3 kernel with antialiasing in
float32 and its summation order, and crop_and_resize's corner-aligned bilinear sampling.
On 12 real LIBERO camera frames the output equals TensorFlow 2.21's bit for bit at every
stage (docs/performance.md); Pillow's default JPEG decoder alone differs in 63% of values.
"""

from __future__ import annotations

import functools
import io
from typing import Sequence

import numpy as np

IMAGE_SIZE = 224
CROP_AREA = 0.9
JPEG_QUALITY = 95  # tf.image.encode_jpeg's default


def jpeg_roundtrip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """tf.image.encode_jpeg (quality 95, 4:2:0) then tf.io.decode_image, bit for bit.

    TensorFlow decodes with libjpeg's fast integer IDCT (JDCT_IFAST) and "fancy" (triangle)
    chroma upsampling; Pillow's normal decode uses the slow integer IDCT. Pillow's draft flag
    selects JDCT_IFAST but also turns fancy upsampling off, so decode to YCbCr with plain 2x2
    replication, take the subsampled chroma planes back and redo libjpeg's fancy upsampling
    and YCbCr->RGB conversion here in integer arithmetic.
    """
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=2)  # 2 = 4:2:0
    buffer.seek(0)
    decoded = Image.open(buffer)
    decoded.draft("YCbCr", None)  # keep libjpeg's output in YCbCr
    decoded.decoderconfig = (1, 1)  # (scale 1, draft): dct_method = JDCT_IFAST, no fancy upsampling
    ycc = np.asarray(decoded).astype(np.int32)
    if ycc.shape != image.shape or not (ycc[1::2, 1::2, 1:] == ycc[: ycc.shape[0] // 2 * 2 : 2, : ycc.shape[1] // 2 * 2 : 2, 1:]).all():
        raise RuntimeError("Pillow's JPEG draft decode no longer gives replicated 4:2:0 chroma")
    h, w = ycc.shape[:2]
    cb = _fancy_upsample_h2v2(ycc[::2, ::2, 1], h, w)
    cr = _fancy_upsample_h2v2(ycc[::2, ::2, 2], h, w)
    return _ycc_to_rgb(ycc[..., 0], cb, cr)


def _fancy_upsample_h2v2(plane: np.ndarray, h: int, w: int) -> np.ndarray:
    """libjpeg's h2v2_fancy_upsample: 9/3/3/1 triangle filter with its integer rounding."""
    above = np.vstack([plane[:1], plane[:-1]])  # edge rows replicated
    below = np.vstack([plane[1:], plane[-1:]])
    colsum = np.empty((2 * plane.shape[0], plane.shape[1]), np.int32)
    colsum[0::2] = 3 * plane + above
    colsum[1::2] = 3 * plane + below
    left = np.hstack([colsum[:, :1], colsum[:, :-1]])  # edge columns: 4 * colsum, as libjpeg
    right = np.hstack([colsum[:, 1:], colsum[:, -1:]])
    out = np.empty((colsum.shape[0], 2 * colsum.shape[1]), np.int32)
    out[:, 0::2] = (3 * colsum + left + 8) >> 4
    out[:, 1::2] = (3 * colsum + right + 7) >> 4
    return out[:h, :w]


def _ycc_tables() -> tuple[np.ndarray, ...]:
    """libjpeg's jdcolor.c build_ycc_rgb_table (16-bit fixed point)."""
    fix = lambda v: int(v * (1 << 16) + 0.5)  # noqa: E731
    x = np.arange(256, dtype=np.int64) - 128
    half = 1 << 15
    return ((fix(1.40200) * x + half) >> 16, (fix(1.77200) * x + half) >> 16,
            -fix(0.71414) * x, -fix(0.34414) * x + half)


_CR_R, _CB_B, _CR_G, _CB_G = _ycc_tables()


def _ycc_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    r = y + _CR_R[cr]
    g = y + ((_CB_G[cb] + _CR_G[cr]) >> 16)
    b = y + _CB_B[cb]
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _sinf():
    """sin in float32 as TensorFlow's kernel gets it (std::sin(float) = libm sinf); else float64 rounded."""
    try:
        import ctypes
        import ctypes.util

        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        libm.sinf.restype, libm.sinf.argtypes = ctypes.c_float, [ctypes.c_float]
        return np.vectorize(lambda v: libm.sinf(float(v)), otypes=[np.float32])
    except (OSError, AttributeError):
        return lambda v: np.sin(np.asarray(v, np.float64)).astype(np.float32)


def _lanczos3(x: np.ndarray) -> np.ndarray:
    """sampling_kernels.h LanczosKernelFunc(3), float32 throughout, same operation order."""
    f32 = np.float32
    pi, radius = f32(3.14159265359), f32(3.0)
    x = np.abs(x).astype(f32)
    sinf = _sinf()
    with np.errstate(divide="ignore", invalid="ignore"):
        out = radius * sinf(pi * x) * sinf(pi * x / radius) / (pi * pi * x * x)
    out = np.where(x <= f32(1e-3), f32(1.0), out)
    return np.where(x > radius, f32(0.0), out).astype(f32)


def lanczos_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float32 matrix of scale_and_translate_op.cc ComputeSpansCore (lanczos3, antialias)."""
    f32 = np.float32
    scale = f32(out_size) / f32(in_size)
    inv_scale = f32(1.0 / float(scale))
    kernel_scale = max(inv_scale, f32(1.0))  # antialias: widen the kernel when shrinking
    radius = f32(3.0) * kernel_scale
    one_over_kernel_scale = f32(1.0) / kernel_scale
    weights = np.zeros((out_size, in_size), f32)
    for i in range(out_size):
        sample = (f32(i) + f32(0.5)) * inv_scale
        start = min(max(int(np.ceil(sample - radius - f32(0.5))), 0), in_size - 1)
        end = min(max(int(np.floor(sample + radius - f32(0.5))), 0), in_size - 1) + 1
        w = _lanczos3((np.arange(start, end).astype(f32) + f32(0.5) - sample) * one_over_kernel_scale)
        total = f32(0.0)
        for v in w:  # sequential float32 sum, as the kernel
            total = f32(total + v)
        if abs(total) >= 1000.0 * np.finfo(f32).tiny:
            weights[i, start:end] = w * (f32(1.0) / total)
    return weights


_WEIGHTS: dict[tuple[int, int], np.ndarray] = {}


def lanczos_resize(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8 (rounded half to even, clipped), as TensorFlow.

    float32 throughout and TensorFlow's order: rows (GatherRows) then columns (GatherColumns),
    each output the taps summed one at a time in source order.
    """
    h, w = image.shape[:2]
    rows, cols = _weights(h, size), _weights(w, size)
    tall = _gather(rows, image.astype(np.float32), axis=0)  # (size, w, 3)
    out = _gather(cols, tall, axis=1)  # (size, size, 3)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _weights(in_size: int, out_size: int) -> np.ndarray:
    if (in_size, out_size) not in _WEIGHTS:  # not setdefault: that would rebuild the matrix every call
        _WEIGHTS[(in_size, out_size)] = lanczos_weights(in_size, out_size)
    return _WEIGHTS[(in_size, out_size)]


def _gather(weights: np.ndarray, data: np.ndarray, axis: int) -> np.ndarray:
    nonzero = weights != 0
    starts = nonzero.argmax(axis=1)
    span = int((weights.shape[1] - nonzero[:, ::-1].argmax(axis=1) - starts).max())
    shape = list(data.shape)
    shape[axis] = weights.shape[0]
    out = np.zeros(shape, np.float32)
    for k in range(span):
        src = np.minimum(starts + k, weights.shape[1] - 1)
        w = weights[np.arange(weights.shape[0]), src] * (starts + k < weights.shape[1])
        w = w[:, None, None] if axis == 0 else w[None, :, None]
        out += w * np.take(data, src, axis=axis)
    return out


def center_crop(image: np.ndarray, area: float = CROP_AREA) -> np.ndarray:
    """Crop the central ``area`` fraction and resize back (tf.image.crop_and_resize, bilinear)."""
    h, w = image.shape[:2]
    f32 = np.float32
    img = image.astype(f32) * f32(1.0 / 255)  # convert_image_dtype multiplies by 1/255
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
