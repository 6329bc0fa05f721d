"""The speedups that gave the fastest OFT query in ``scripts/speedup_variants.py``'s results,
among the variants whose actions stay within a tolerance of the plain variant's. Prints them as
``--speedups`` takes them (comma-separated; an empty line when plain was fastest), and the reason
on stderr.

    python scripts/best_speedups.py results/device/variants.json [--tolerance 0.05]

The default tolerance, 0.05 on normalised actions in [-1, 1], is the size of the differences seen
between two evaluations of the same query in bf16 that are equal in exact arithmetic (padded
batch against one at a time: 3.5e-2 on the H100): smaller differences are rounding, not a change.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def best_variant(variants: dict, tolerance: float) -> tuple[str, dict] | None:
    """(name, row) of the variant with the lowest OFT p50 among those measured within
    ``tolerance``; None when no variant was measured."""
    measured = [(name, row) for name, row in variants.items()
                if "error" not in row and max(row["max_abs_diff"].values()) <= tolerance]
    if not measured:
        return None
    return min(measured, key=lambda item: item[1]["latency_ms"]["oft"]["p50"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", type=Path, help="the JSON file speedup_variants.py saved")
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args()
    if not args.variants.exists():
        print(f"no such file: {args.variants}; using no speedups", file=sys.stderr)
        print("")
        return 0
    best = best_variant(json.loads(args.variants.read_text())["variants"], args.tolerance)
    if best is None:
        print("no variant was measured within the tolerance; using no speedups", file=sys.stderr)
        print("")
        return 0
    name, row = best
    print(f"fastest OFT within {args.tolerance}: {name}, p50 {row['latency_ms']['oft']['p50']:.2f} ms",
          file=sys.stderr)
    print(",".join(row["speedups"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
