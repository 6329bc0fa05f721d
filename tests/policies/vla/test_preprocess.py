"""Image and proprio preprocessing, and action post-processing, against hand-computed values."""

import numpy as np
import pytest

from policies.vla import preprocess as pp
from policies.vla.postprocess import gripper_to_env, unnormalize_actions


def test_lanczos_weights_are_normalised_and_local():
    w = pp.lanczos_weights(256, 224)
    assert w.shape == (224, 256)
    assert np.allclose(w.sum(axis=1), 1.0)
    # Shrinking by 224/256 widens the 3-lobe kernel to a radius of 3 * 256/224 source pixels.
    centre = (100 + 0.5) * 256 / 224
    taps = np.nonzero(w[100])[0]
    assert taps.min() >= np.ceil(centre - 3 * 256 / 224 - 0.5) and taps.max() <= np.floor(centre + 3 * 256 / 224 - 0.5)
    assert w[100].argmax() == int(centre)


def test_resize_keeps_constant_images_and_rounds_half_to_even():
    flat = np.full((256, 256, 3), 77, np.uint8)
    assert (pp.lanczos_resize(flat) == 77).all()
    ramp = np.tile(np.linspace(0, 255, 256).astype(np.uint8)[None, :, None], (256, 1, 3))
    out = pp.lanczos_resize(ramp)
    assert out.shape == (224, 224, 3) and (np.diff(out[0, 10:-10, 0].astype(int)) >= 0).all()


def _direct_resize(image, size):
    """TensorFlow's resize written out: rows then columns, each output the float32 sum of
    weight x source taken one source at a time in order."""
    def along_rows(data, weights):
        out = np.zeros((weights.shape[0],) + data.shape[1:], np.float32)
        for i, row in enumerate(weights):
            for k in np.nonzero(row)[0]:
                out[i] = out[i] + row[k] * data[k]
        return out

    h, w = image.shape[:2]
    tall = along_rows(image.astype(np.float32), pp.lanczos_weights(h, size))
    wide = along_rows(tall.transpose(1, 0, 2), pp.lanczos_weights(w, size)).transpose(1, 0, 2)
    return np.clip(np.round(wide), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape, size", [((37, 53), 24), ((20, 31), 24), ((64, 48), 64)])
def test_resize_equals_the_direct_sums_on_non_square_images(shape, size):
    # Square inputs use the same taps for rows and columns; these would show a mix-up.
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape + (3,), dtype=np.uint8)
    assert np.array_equal(pp.lanczos_resize(image, size), _direct_resize(image, size))


def test_center_crop_equals_the_four_corner_formula_on_a_non_square_image():
    image = np.random.default_rng(5).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    f32 = np.float32
    img = image.astype(f32) * f32(1.0 / 255)
    side = f32(np.sqrt(f32(0.9)))
    start = (f32(1) - side) / f32(2)

    def points(n):
        p = start * f32(n - 1) + np.arange(n, dtype=f32) * ((start + side - start) * f32(n - 1) / f32(n - 1))
        return np.floor(p).astype(int), np.ceil(p).astype(int), (p - np.floor(p)).astype(f32)

    (t, b, yl), (left, right, xl) = points(30), points(45)
    xl = xl[None, :, None]
    top = img[t][:, left] + (img[t][:, right] - img[t][:, left]) * xl
    bottom = img[b][:, left] + (img[b][:, right] - img[b][:, left]) * xl
    out = np.clip(top + (bottom - top) * yl[:, None, None], 0, 1)
    expected = np.clip(np.trunc(out * f32(255.5)), 0, 255).astype(np.uint8)
    assert np.array_equal(pp.center_crop(image), expected)


def test_center_crop_samples_the_central_90_percent_of_the_area():
    # A horizontal ramp: after the crop, column j shows the source position
    # x1 * 223 + j * (x2 - x1) * 223 / 223 with x1 = (1 - sqrt(0.9)) / 2.
    source = np.tile(np.arange(224, dtype=np.uint8)[None, :, None], (224, 1, 3))
    out = pp.center_crop(source)
    side = np.float32(np.sqrt(np.float32(0.9)))
    x1 = (1 - side) / 2
    expected = x1 * 223 + np.arange(224) * side
    # convert_image_dtype back to uint8: floor(value / 255 * 255.5)
    assert np.abs(out[0, :, 0].astype(float) - np.floor(expected / 255 * 255.5)).max() <= 1
    assert out[0, 0, 0] == 5 and out[0, -1, 0] == 217  # 223 * x1 = 5.72, 223 * (1 - x1) = 217.28
    assert (pp.center_crop(np.full((224, 224, 3), 200, np.uint8)) == 200).all()


def test_jpeg_roundtrip_is_lossy_but_close():
    y, x = np.mgrid[0:256, 0:256]
    smooth = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    out = pp.jpeg_roundtrip(smooth)
    assert out.shape == smooth.shape and out.dtype == np.uint8
    assert 0 < np.abs(out.astype(int) - smooth).mean() < 3


def test_prepare_image_validates_and_skips_resize_at_model_size():
    with pytest.raises(ValueError, match="uint8"):
        pp.prepare_image(np.zeros((256, 256, 3), np.float32))
    image = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert np.array_equal(pp.prepare_image(image, crop=False), image)


def test_pixel_values_normalise_each_image_for_each_tower():
    images = [np.full((224, 224, 3), 255, np.uint8), np.zeros((224, 224, 3), np.uint8)]
    means, stds = ((0.485, 0.456, 0.406), (0.5, 0.5, 0.5)), ((0.229, 0.224, 0.225), (0.5, 0.5, 0.5))
    px = pp.pixel_values(images, means, stds)
    assert px.shape == (12, 224, 224) and px.dtype == np.float32
    assert np.isclose(px[0, 0, 0], (1 - 0.485) / 0.229) and np.isclose(px[3, 0, 0], 1.0)
    assert np.isclose(px[6, 0, 0], -0.485 / 0.229) and np.isclose(px[9, 0, 0], -1.0)


def test_proprio_normalisation_bounds_q99():
    stats = {"q01": [0.0, -1.0, 2.0], "q99": [1.0, 1.0, 4.0], "mask": [True, True, False]}
    out = pp.normalize_proprio(np.array([0.25, 5.0, 3.0]), stats)
    assert np.allclose(out, [2 * 0.25 / (1 + 1e-8) - 1, 1.0, 1.0])  # clipped; unmasked passes, then clip
    with pytest.raises(ValueError, match="proprio has shape"):
        pp.normalize_proprio(np.zeros(2), stats)


def test_action_unnormalisation_and_gripper_rule():
    stats = {"q01": [-1.0, 0.0, 0.5, 0, 0, 0, 0], "q99": [1.0, 2.0, 1.5, 1, 1, 1, 1],
             "mask": [True, True, True, True, True, True, False]}
    chunk = np.array([[0.0, -1.0, 1.0, 0.5, 0.0, -0.5, 0.9], [1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.1]])
    out = gripper_to_env(unnormalize_actions(chunk, stats))
    # 0.5 * (a + 1) * (q99 - q01 + 1e-8) + q01
    assert np.allclose(out[0, :6], [1e-8 * 0.5, 0.0, 1.5 + 1e-8, 0.75 + 0.75e-8, 0.5 + 0.5e-8, 0.25 + 0.25e-8])
    assert out[0, 6] == -1.0  # 0.9 -> 0.8 -> sign +1 -> inverted: open
    assert out[1, 6] == 1.0  # 0.1 -> close


def test_pipeline_equals_tensorflow_on_real_libero_frames():
    """Reference outputs of TensorFlow 2.21 (encode_jpeg/decode_image, resize lanczos3 with
    antialias, crop_and_resize) for two rendered LIBERO frames, saved once as test data."""
    from pathlib import Path

    data = np.load(Path(__file__).parent / "data" / "tf_preprocess_reference.npz")
    for i in range(2):
        frame = data[f"frame{i}"]
        assert frame.shape == (256, 256, 3)
        assert np.array_equal(pp.jpeg_roundtrip(frame), data[f"frame{i}_tf_jpeg"])
        assert np.array_equal(pp.prepare_image(frame), data[f"frame{i}_tf_final"])


def test_jpeg_files_without_chroma_subsampling_decode_as_tensorflow_decodes_them():
    """Two real LIBERO frames encoded by tf.image.encode_jpeg at 4:4:4 and TensorFlow 2.21's
    decode of them (tests/bench/data/rlds/make_rlds_fixture.py)."""
    from pathlib import Path

    data = np.load(Path(__file__).parent / "data" / "jpeg_444_by_tf.npz")
    for i in range(2):
        assert np.array_equal(pp.decode_jpeg(data[f"frame{i}_444_jpeg"].tobytes()), data[f"frame{i}_444_tf"])


def test_an_image_decoded_from_a_stored_jpeg_is_resized_without_a_second_round_trip():
    frame = np.load(__import__("pathlib").Path(__file__).parent / "data" / "tf_preprocess_reference.npz")["frame0"]
    assert np.array_equal(pp.prepare_image(frame, crop=False, from_jpeg=True), pp.lanczos_resize(frame))
    assert not np.array_equal(pp.prepare_image(frame, crop=False, from_jpeg=True), pp.prepare_image(frame, crop=False))
    with pytest.raises(ValueError, match="expected an RGB JPEG image, got PNG"):
        from PIL import Image
        import io

        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        pp.decode_jpeg(buffer.getvalue())
