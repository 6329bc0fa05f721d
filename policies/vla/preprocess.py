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
    """tf.image.encode_jpeg (quality 95, 4:2:0) then tf.io.decode_image, bit for bit."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=2)  # 2 = 4:2:0
    return decode_jpeg(buffer.getvalue())


def decode_jpeg(data: bytes) -> np.ndarray:
    """A JPEG file's pixels (HxWx3 uint8) as tf.io.decode_image gives them, bit for bit.

    TensorFlow decodes with libjpeg's fast integer IDCT (JDCT_IFAST) and "fancy" (triangle)
    chroma upsampling; Pillow's normal decode uses the slow integer IDCT. Pillow's draft flag
    selects JDCT_IFAST but also turns fancy upsampling off, so decode to YCbCr with plain 2x2
    replication, take the subsampled chroma planes back and redo libjpeg's fancy upsampling
    and YCbCr->RGB conversion here in integer arithmetic. 4:2:0 and 4:4:4 colour JPEGs only.
    """
    from PIL import Image, JpegImagePlugin

    decoded = Image.open(io.BytesIO(data))
    if decoded.format != "JPEG" or decoded.mode != "RGB":
        raise ValueError(f"expected an RGB JPEG image, got {decoded.format} {decoded.mode}")
    sampling = JpegImagePlugin.get_sampling(decoded)  # 2: 4:2:0, 0: 4:4:4
    if sampling not in (0, 2):
        raise ValueError(f"JPEG chroma subsampling {sampling} is not decoded here (4:2:0 and 4:4:4 are)")
    decoded.draft("YCbCr", None)  # keep libjpeg's output in YCbCr
    decoded.decoderconfig = (1, 1)  # (scale 1, draft): dct_method = JDCT_IFAST, no fancy upsampling
    ycc = np.asarray(decoded)
    if sampling == 0:
        return _ycc_to_rgb(ycc[..., 0], ycc[..., 1].astype(np.int32), ycc[..., 2].astype(np.int32))
    if not (ycc[1::2, 1::2, 1:] == ycc[: ycc.shape[0] // 2 * 2 : 2, : ycc.shape[1] // 2 * 2 : 2, 1:]).all():
        raise RuntimeError("Pillow's JPEG draft decode no longer gives replicated 4:2:0 chroma")
    h, w = ycc.shape[:2]
    cb = _fancy_upsample_h2v2(ycc[::2, ::2, 1].astype(np.int32), h, w)
    cr = _fancy_upsample_h2v2(ycc[::2, ::2, 2].astype(np.int32), h, w)
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
    """libjpeg's jdcolor.c build_ycc_rgb_table (16-bit fixed point), as lookup tables of each
    channel's offset from Y: red's by Cr, blue's by Cb, green's by (Cb << 8) | Cr."""
    fix = lambda v: int(v * (1 << 16) + 0.5)  # noqa: E731
    x = np.arange(256, dtype=np.int64) - 128
    half = 1 << 15
    cr_r, cb_b = (fix(1.40200) * x + half) >> 16, (fix(1.77200) * x + half) >> 16
    cr_g, cb_g = -fix(0.71414) * x, -fix(0.34414) * x + half
    green = (cb_g[:, None] + cr_g[None, :]) >> 16
    return cr_r.astype(np.int16), cb_b.astype(np.int16), green.ravel().astype(np.int16)


_CR_R, _CB_B, _GREEN = _ycc_tables()


def _ycc_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    rgb = np.empty(y.shape + (3,), np.int16)  # Y + offset lies within -227..480
    np.add(y, np.take(_CR_R, cr), out=rgb[..., 0])
    np.add(y, np.take(_GREEN, (cb << 8) | cr), out=rgb[..., 1])
    np.add(y, np.take(_CB_B, cb), out=rgb[..., 2])
    np.clip(rgb, 0, 255, out=rgb)  # libjpeg's range limit
    return rgb.astype(np.uint8)


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


def lanczos_resize(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8 (rounded half to even, clipped), as TensorFlow.

    float32 throughout and TensorFlow's order: rows (GatherRows) then columns (GatherColumns),
    each output the taps summed one at a time in source order.
    """
    h, w = image.shape[:2]
    tall = _resample_rows(_taps(h, size), image.astype(np.float32))  # (size, w, 3)
    # Columns as rows of the transposed image: row gathers copy contiguous memory.
    wide = _resample_rows(_taps(w, size), _transpose_pixels(tall))  # (size, size, 3), transposed
    np.round(wide, out=wide)
    np.clip(wide, 0, 255, out=wide)
    return _transpose_pixels(wide.astype(np.uint8))


def _transpose_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W, C) -> contiguous (W, H, C), each pixel's C values moved as one item (twice as fast)."""
    image = np.ascontiguousarray(image)
    pixel = np.dtype((np.void, image.shape[2] * image.itemsize))
    return np.ascontiguousarray(image.view(pixel)[..., 0].T)[..., None].view(image.dtype)


@functools.lru_cache(maxsize=8)
def _taps(in_size: int, out_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The resampling matrix as taps: for tap k, each output's k-th source index and weight
    (weight 0 past the last source). Outputs have at most as many taps as the widest row."""
    weights = lanczos_weights(in_size, out_size)
    nonzero = weights != 0
    starts = nonzero.argmax(axis=1)
    span = int((in_size - nonzero[:, ::-1].argmax(axis=1) - starts).max())
    rows = np.arange(out_size)
    taps = []
    for k in range(span):
        src = np.minimum(starts + k, in_size - 1)
        weight = weights[rows, src] * (starts + k < in_size)
        taps.append((src, weight.astype(np.float32)[:, None, None]))
    return taps


def _resample_rows(taps: list[tuple[np.ndarray, np.ndarray]], data: np.ndarray) -> np.ndarray:
    """(in, W, C) float32 -> (out, W, C): each output row the sum of weight x source row, tap by tap."""
    out = np.zeros((taps[0][0].shape[0],) + data.shape[1:], np.float32)
    term = np.empty_like(out)
    for src, weight in taps:
        np.take(data, src, axis=0, out=term, mode="clip")  # "clip": not buffered; indices are in range
        term *= weight
        out += term
    return out


def center_crop(image: np.ndarray, area: float = CROP_AREA) -> np.ndarray:
    """Crop the central ``area`` fraction and resize back (tf.image.crop_and_resize, bilinear)."""
    return _resample(image, _center_grid(*image.shape[:2], area))


def crop_and_resize(image: np.ndarray, top: float, left: float, side: float) -> np.ndarray:
    """The square box from (``top``, ``left``) with sides ``side`` (fractions of the image) resized
    back to the image's size, as ``tf.image.crop_and_resize`` on [0, 1] floats, back to uint8."""
    f32 = np.float32
    return _resample(image, _crop_grid(*image.shape[:2], f32(top), f32(left), f32(side)))


def _resample(image: np.ndarray, grid: tuple[np.ndarray, ...]) -> np.ndarray:
    """Bilinear sampling of ``image`` at a crop's grid, as crop_and_resize computes it."""
    top_rows, bottom_rows, y_lerp, left_cols, right_cols, x_lerp = grid
    img = image.astype(np.float32) * np.float32(1.0 / 255)  # convert_image_dtype multiplies by 1/255
    # TensorFlow computes top = tl + (tr - tl) * x_lerp on the corners' rows, bottom likewise,
    # then top + (bottom - top) * y_lerp. Interpolating along x on every row first gives the
    # same float32 values (each is computed from the same two pixels); the row pairs are then
    # picked from the result, so only two column gathers are needed instead of four.
    across = np.take(img, right_cols, axis=1)
    left_values = np.take(img, left_cols, axis=1)
    across -= left_values
    across *= x_lerp
    across += left_values
    upper, lower = across[top_rows], across[bottom_rows]
    lower -= upper
    lower *= y_lerp
    upper += lower
    np.clip(upper, 0.0, 1.0, out=upper)
    return to_uint8(upper)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float32 -> uint8 as convert_image_dtype: scale by 255.5 and truncate."""
    return (image * np.float32(255.5)).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _center_grid(h: int, w: int, area: float) -> tuple[np.ndarray, ...]:
    """The centre crop's grid, computed once per image size (every evaluation query uses it)."""
    side = np.float32(np.sqrt(np.float32(area)))
    start = (np.float32(1) - side) / np.float32(2)
    return _crop_grid(h, w, start, start, side)


def _crop_grid(h: int, w: int, top: np.float32, left: np.float32, side: np.float32) -> tuple[np.ndarray, ...]:
    """crop_and_resize's sample rows and columns: the two neighbours of each and the weight of the second."""
    f32 = np.float32

    def sample_points(start, in_size, out_size):
        end = start + side
        step = (end - start) * f32(in_size - 1) / f32(out_size - 1)
        points = start * f32(in_size - 1) + np.arange(out_size, dtype=f32) * step
        low = np.floor(points).astype(int)
        high = np.minimum(np.ceil(points).astype(int), in_size - 1)
        return low, high, (points - low).astype(f32)

    top_rows, bottom_rows, y_lerp = sample_points(top, h, h)
    left_cols, right_cols, x_lerp = sample_points(left, w, w)
    # x_lerp as a whole (h, w, 3) array: numpy multiplies by it faster than by a broadcast row.
    return top_rows, bottom_rows, y_lerp[:, None, None], left_cols, right_cols, np.ascontiguousarray(np.broadcast_to(x_lerp[None, :, None], (h, w, 3)))


def prepare_image(image: np.ndarray, size: int = IMAGE_SIZE, crop: bool = True, from_jpeg: bool = False) -> np.ndarray:
    """A rotated camera image (HxWx3 uint8) -> the model's size x size x 3 uint8 input.

    ``from_jpeg``: the image was decoded from a stored JPEG file (OFT's training data), so it is
    resized without the round trip that stands in for that storage."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    if image.shape[:2] != (size, size):
        image = lanczos_resize(image if from_jpeg else jpeg_roundtrip(image), size)
    return center_crop(image) if crop else image


def pixel_values(images: Sequence[np.ndarray], means: Sequence[Sequence[float]],
                 stds: Sequence[Sequence[float]]) -> np.ndarray:
    """Prepared images -> (6 * len(images), H, W) float32: per image, one normalised copy per tower
    ((u / 255 - mean) / std in float32, looked up per 8-bit value)."""
    tables = _normalise_tables(tuple(map(tuple, means)), tuple(map(tuple, stds)))  # (towers, 3, 256)
    h, w = images[0].shape[:2]
    planes = np.empty((len(images) * tables.shape[0] * 3, h, w), np.float32)
    k = 0
    for image in images:
        for tower in tables:
            for channel in range(3):
                np.take(tower[channel], image[..., channel], out=planes[k])
                k += 1
    return planes


@functools.lru_cache(maxsize=8)
def _normalise_tables(means: tuple, stds: tuple) -> np.ndarray:
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    return np.stack([(levels[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
                     for mean, std in zip(means, stds)])


def normalize_proprio(proprio: np.ndarray, stats: dict) -> np.ndarray:
    """BOUNDS_Q99: 2 (x - q01) / (q99 - q01 + 1e-8) - 1 where the mask is set, then clip to [-1, 1]."""
    low, high = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    proprio = np.asarray(proprio, np.float64)
    if proprio.shape != low.shape:
        raise ValueError(f"proprio has shape {proprio.shape}; the checkpoint's statistics have {low.shape}")
    return np.clip(np.where(mask, 2 * (proprio - low) / (high - low + 1e-8) - 1, proprio), -1.0, 1.0)
