"""The serving overhead script runs and prints a time for every kind of observation (a smoke run)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_prints_a_round_trip_for_every_observation():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "serve_overhead.py"), "--repeats", "2",
                           "--image-size", "32"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines()[2:]]
    assert [row[0].strip() for row in rows] == ["proprio only", "two 32x32 images", "two 32x32 images, batch of 4"]
    assert all(0 < float(row[1]) <= float(row[2]) for row in rows)
