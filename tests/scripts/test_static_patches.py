"""The static-patch count of scripts/static_patches.py: an unchanged frame is static everywhere,
a changed region is not, and both cameras are counted apart."""

import numpy as np
import pytest

from tests.scripts import load_script

pytest.importorskip("torch")


def test_changed_patches_of_one_camera_are_not_static():
    script = load_script("static_patches")
    rng = np.random.default_rng(0)
    first = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)]
    second = [image.copy() for image in first]
    second[1][:28, :42] = 255 - second[1][:28, :42]  # 2 x 3 patches of the wrist camera inverted
    counts, patches = script.static_counts([first, first, second], 0.996)
    assert patches == 256
    assert counts.tolist() == [[256, 256], [256, 250]]
