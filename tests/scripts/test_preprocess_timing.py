"""The preprocessing timing script runs and prints every stage (a smoke run; it times nothing here)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_prints_a_time_for_every_stage():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "preprocess_timing.py"), "--repeats", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stages = [line.split()[0] for line in done.stdout.splitlines()]
    assert stages == ["jpeg_roundtrip", "lanczos_resize", "center_crop", "prepare_image", "pixel_values"]
    assert all(float(line.split()[-2]) > 0 for line in done.stdout.splitlines())
