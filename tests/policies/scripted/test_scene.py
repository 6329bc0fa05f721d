import numpy as np
import pytest

from tests.policies.scripted.synthetic_scenes import box, scene


@pytest.mark.parametrize("yaw, along_x, diagonal", [
    (0.0, 0.04, (0.04 + 0.02) / np.sqrt(2)),
    (np.pi / 2, 0.02, (0.04 + 0.02) / np.sqrt(2)),
    (np.pi / 4, (0.04 + 0.02) / np.sqrt(2), 0.04),
])
def test_half_extent_along_a_direction_follows_the_bodys_own_box(yaw, along_x, diagonal):
    body = scene({"b": box([0.1, 0.2, 0.9], [0.04, 0.02, 0.01], yaw=yaw)}).body("b")
    assert body.half_extent_along([1.0, 0.0]) == pytest.approx(along_x)
    assert body.half_extent_along(np.array([1.0, 1.0]) / np.sqrt(2)) == pytest.approx(diagonal)
