"""What serving a policy adds to a query: the round trip of ``remote`` to ``bench serve`` on this
machine, with a policy that computes nothing (``noop``), so all of it is messages and sockets.

    python scripts/serve_overhead.py [--repeats 300] [--image-size 256]

Prints the median and 90th percentile per query, in ms, for a proprio-only observation, one
with two camera images (as a VLA policy reads them), and batches of them.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.profile import percentiles, time_calls
from bench.serve import ServerThread
from policies import EpisodeInfo, Observation, make_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    size = args.image_size
    images = {name: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for name in ("agentview", "wrist")}
    with ServerThread(make_policy("noop")) as server:
        client = make_policy("remote", {"address": server.address})
        cases = [("proprio only", 1, None), (f"two {size}x{size} images", 1, images),
                 (f"two {size}x{size} images, batch of 4", 4, images)]
        print("| observation | median ms | p90 ms |\n|---|---|---|")
        for label, batch, shown in cases:
            observations = []
            for i in range(batch):
                key = f"{label}/{i}"
                client.reset(EpisodeInfo(key, "libero_spatial", 0, "task", "do it", i, 0))
                observations.append(Observation(np.zeros(8), "do it", key, shown))
            times = percentiles(time_calls(lambda: client.act(observations), "cpu", args.repeats, warmup=10))
            print(f"| {label} | {times['p50']:.2f} | {times['p90']:.2f} |")
        client.close()


if __name__ == "__main__":
    main()
