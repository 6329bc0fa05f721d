"""The static-patch count of scripts/static_patches.py: an unchanged frame is static everywhere,
a changed region is not, and both cameras are counted apart."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "static_patches.py"


def load_script():
    spec = importlib.util.spec_from_file_location("static_patches", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_changed_patches_of_one_camera_are_not_static():
    script = load_script()
    rng = np.random.default_rng(0)
    first = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)]
    second = [image.copy() for image in first]
    second[1][:28, :42] = 255 - second[1][:28, :42]  # 2 x 3 patches of the wrist camera inverted
    counts, patches = script.static_counts([first, first, second], 0.996)
    assert patches == 256
    assert counts.tolist() == [[256, 256], [256, 250]]
