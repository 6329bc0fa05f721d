"""Training augmentation: one uniform number per image sets crop, brightness, contrast, saturation and hue."""

import colorsys

import numpy as np
import pytest

from policies.vla.augment import augment_image, hsv_to_rgb, rgb_to_hsv
from policies.vla.preprocess import center_crop, crop_and_resize


def test_hsv_conversions_agree_with_colorsys():
    rgb = np.random.default_rng(0).random((200, 3)).astype(np.float32)
    rgb[:3] = [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.2]]  # black, white, two equal channels
    h, s, v = rgb_to_hsv(rgb)
    expected = np.array([colorsys.rgb_to_hsv(*c) for c in rgb.astype(np.float64)])
    np.testing.assert_allclose(np.stack([h, s, v], axis=1), expected, atol=2e-6)
    np.testing.assert_allclose(hsv_to_rgb(h, s, v), rgb, atol=2e-6)


@pytest.mark.parametrize("u", [0.0, 0.25, 0.9])
def test_a_flat_colour_changes_as_the_reference_order_of_operations_says(u):
    colour = np.array([180, 90, 40], np.uint8)
    image = np.broadcast_to(colour, (32, 32, 3)).copy()
    # written out with colorsys: brightness + (-0.2 + 0.4u), contrast leaves a flat image alone,
    # saturation x (0.8 + 0.4u), hue + (-0.05 + 0.1u); clipped to [0, 1] after each
    x = np.clip(colour / 255 + (-0.2 + 0.4 * u), 0, 1)
    h, s, v = colorsys.rgb_to_hsv(*x)
    x = np.clip(colorsys.hsv_to_rgb(h, min(s * (0.8 + 0.4 * u), 1), v), 0, 1)
    h, s, v = colorsys.rgb_to_hsv(*x)
    x = np.clip(colorsys.hsv_to_rgb((h + (-0.05 + 0.1 * u)) % 1, s, v), 0, 1)
    expected = (x * 255.5).astype(np.uint8)
    out = augment_image(image, u)
    assert (out == out[0, 0]).all()
    np.testing.assert_allclose(out[0, 0].astype(int), expected.astype(int), atol=1)


def test_the_crop_slides_along_the_diagonal_with_u():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:8, :8] = 255  # a white top-left corner
    image[-8:, -8:] = 255  # and a white bottom-right one

    def widths(out):  # how many pixels of the first and last row and column are white
        mid = (int(out.max()) + int(out.min())) / 2
        edges = out[0, :, 0], out[-1, :, 0], out[:, 0, 0], out[:, -1, 0]
        return [int((edge > mid).sum()) for edge in edges]

    # the box (sides sqrt(0.9) = 0.949) starts at u * 0.051 on both axes: at u = 0 it holds all of
    # the top-left corner and 8 - 3.2 pixels of the other; at u -> 1 the other way round
    top_left, middle, bottom_right = (widths(augment_image(image, u)) for u in (0.0, 0.5, 0.999))
    assert top_left[0] == top_left[2] >= 8 and top_left[1] == top_left[3] <= 5
    assert bottom_right[0] == bottom_right[2] <= 5 and bottom_right[1] == bottom_right[3] >= 8
    assert top_left[0] > middle[0] > bottom_right[0] and top_left[1] < middle[1] < bottom_right[1]


def test_crop_and_resize_of_the_whole_image_is_the_image_and_the_centre_crop_is_its_centred_box():
    image = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(crop_and_resize(image, 0.0, 0.0, 1.0), image)
    side = np.float32(np.sqrt(np.float32(0.9)))
    start = (np.float32(1) - side) / np.float32(2)
    np.testing.assert_array_equal(center_crop(image), crop_and_resize(image, start, start, side))
    assert not np.array_equal(crop_and_resize(image, 0.0, 0.0, side), center_crop(image))


def test_u_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        augment_image(np.zeros((8, 8, 3), np.uint8), 1.0)
