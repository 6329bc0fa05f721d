"""The GPU targets, read from the results ``scripts/device_check.sh`` saved: one line each,
with the figure, the target and whether it is met.

    python scripts/device_targets.py results/device
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OFT_TARGET_MS = 20.0  # one full-size query, bf16, batch 1
LIGHTVLA_RATIO_TARGET = 0.6  # LightVLA at 78 tokens against OFT, same run
OVERHEAD_TARGET_MS = 0.5  # LightVLA's scoring and gather


def _load(directory: Path, name: str):
    path = directory / name
    return json.loads(path.read_text()) if path.exists() else None


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def _lightvla(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["policy"] == "lightvla" and "error" not in r), None)


def target_lines(directory: Path) -> list[str]:
    lines = []
    oft = _load(directory, "oft.json")
    if oft:
        where = f"size {oft['size']}, {oft['device_name']}, {oft['dtype']}, batch {oft['batch']}"
        if oft["size"] != "full" or not oft["device"].startswith("cuda"):
            where += " (the targets are for the full size on a GPU: verdicts here only test the script)"
        lines.append(where)
    if oft and oft.get("latency_ms"):
        p50 = oft["latency_ms"]["p50"]
        lines.append(f"OFT one query p50 {p50:.2f} ms (target <= {OFT_TARGET_MS:.0f}): {_verdict(p50 <= OFT_TARGET_MS)}")
        if oft.get("vision_latency_ms"):
            lines.append(f"towers with projector alone p50 {oft['vision_latency_ms']['p50']:.2f} ms (shared by every method)")
        if oft.get("yardstick") and oft.get("llm_latency_ms"):
            ours = oft["llm_latency_ms"]["p50"]
            theirs = min(oft["yardstick"]["bidirectional_ms"]["p50"], oft["yardstick"]["causal_ms"]["p50"])
            lines.append(f"our LLM p50 {ours:.2f} ms against transformers' {theirs:.2f} ms: {_verdict(ours <= theirs)}")
    for name in ("sweep.json", "sweep_plain.json"):
        rows = _load(directory, name)
        light = _lightvla(rows) if rows else None
        if not light or light.get("latency_vs_oft") is None:
            continue
        label = "speedups " + ",".join(rows[0]["speedups"]) if rows[0].get("speedups") else "no speedups"
        ratio, base = light["latency_vs_oft"], rows[0]["latency_ms"]["p50"]
        lines.append(f"{label}: OFT p50 {base:.2f} ms, LightVLA keep=78 {light['latency_ms']['p50']:.2f} ms = "
                     f"{ratio:.3f}x (target <= {LIGHTVLA_RATIO_TARGET}): {_verdict(ratio <= LIGHTVLA_RATIO_TARGET)}")
        if light.get("plugin_ms"):
            overhead = light["plugin_ms"]["p50"]
            lines.append(f"{label}: LightVLA scoring and gather p50 {overhead:.3f} ms (target < {OVERHEAD_TARGET_MS}): "
                         f"{_verdict(overhead < OVERHEAD_TARGET_MS)}")
    lines += graph_warnings(directory)
    variants = _load(directory, "variants.json")
    if variants:
        for name, row in variants["variants"].items():
            if "error" in row:
                lines.append(f"variant {name}: failed: {row['error']}")
                continue
            oft_ms, light_ms = row["latency_ms"]["oft"]["p50"], row["latency_ms"]["lightvla"]["p50"]
            lines.append(f"variant {name}: OFT {oft_ms:.2f} ms, LightVLA {light_ms:.2f} ms ({light_ms / oft_ms:.3f}x), "
                         f"towers {row['vision_ms']['p50']:.2f} ms, largest action difference "
                         f"{max(row['max_abs_diff'].values()):.2e}")
    return lines or [f"no results in {directory}"]


def graph_warnings(directory: Path) -> list[str]:
    """A row whose CUDA graphs failed to capture, or ran past their limit, timed eager code for
    part of each query: its latency is not the replayed figure the targets are about."""
    lines = []
    for name in ("oft.json", "sweep.json", "sweep_plain.json"):
        loaded = _load(directory, name)
        rows = loaded if isinstance(loaded, list) else [loaded] if loaded else []
        for row in rows:
            graphs = row.get("cuda_graphs") or {}
            failures, eager = len(graphs.get("failures") or []), graphs.get("eager_calls") or 0
            if failures or eager:
                lines.append(f"WARNING {name} {row['policy']} {row.get('policy_args', '')}: {failures} graph "
                             f"captures failed, {eager} calls past the graph limit; its latency is partly eager")
    return lines


def main() -> int:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results/device")
    print("\n".join(target_lines(directory)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
