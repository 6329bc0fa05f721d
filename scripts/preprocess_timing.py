"""Host time of OpenVLA-OFT's image preprocessing, stage by stage, on the two rendered LIBERO
frames the tests keep (256x256 camera images): JPEG round trip, Lanczos resize to 224, centre
crop, and the normalisation of a query's two images for both towers. Single-threaded.

    python scripts/preprocess_timing.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from policies.vla import preprocess as pp  # noqa: E402
from policies.vla.config import preset  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()  # caches (resampling taps, lookup tables) are built once per process
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    data = np.load(ROOT / "tests" / "policies" / "vla" / "data" / "tf_preprocess_reference.npz")
    frames = [data["frame0"], data["frame1"]]
    config = preset("full")
    decoded = [pp.jpeg_roundtrip(f) for f in frames]
    resized = [pp.lanczos_resize(d) for d in decoded]
    prepared = [pp.center_crop(r) for r in resized]
    stages = {
        "jpeg_roundtrip (per image)": lambda: [pp.jpeg_roundtrip(f) for f in frames],
        "lanczos_resize (per image)": lambda: [pp.lanczos_resize(d) for d in decoded],
        "center_crop (per image)": lambda: [pp.center_crop(r) for r in resized],
        "prepare_image (per image)": lambda: [pp.prepare_image(f) for f in frames],
    }
    for name, fn in stages.items():
        print(f"{name:32s} {median_ms(fn, args.repeats) / len(frames):7.3f} ms")
    normalise = lambda: pp.pixel_values(prepared, config.image_means, config.image_stds)  # noqa: E731
    print(f"{'pixel_values (2 images)':32s} {median_ms(normalise, args.repeats):7.3f} ms")


if __name__ == "__main__":
    main()
