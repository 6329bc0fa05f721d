"""Which speedups pay: OFT and LightVLA at 78 tokens under each speedup of
``policies.vla.model.Speedups`` alone and all together, replayed as CUDA graphs on one model in
one run. Per variant: the p50 latency of a query and of the vision towers with
projector alone, LightVLA relative to OFT, and the largest action difference from the plain
variant (compiled kernels may round bf16 intermediates differently; parallel towers must not
change anything).

    python scripts/speedup_variants.py --size full --device cuda
    python scripts/speedup_variants.py --size tiny --device cpu   # the same steps, no streams
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.profile import (ProfileSettings, build_hooks, build_model, device_name, example_inputs,  # noqa: E402
                           measurement_parser, percentiles, settings_from, time_calls, time_vision)
from policies.vla.model import Speedups  # noqa: E402
from policies.vla.tokenizer import ByteTokenizer  # noqa: E402

# Uncompiled variants first: compiling takes minutes and needs a working Triton, and a run cut
# short or a failed compilation should still leave them measured.
VARIANTS = {
    "plain": "",
    "parallel towers": "parallel_towers",
    "fused gate/up": "fuse_gate_up",
    "both uncompiled": "parallel_towers,fuse_gate_up",
    "compiled LLM chains": "compile_kernels",
    "compiled towers": "compile_towers",
    "all": "all",
}
POLICIES = (("oft", None), ("lightvla", 78))


def measure(model, device, dtype, base: ProfileSettings, speedups: Speedups) -> dict:
    model.use_speedups(speedups)
    model.use_cuda_graphs()
    pixels, proprio, prompts = example_inputs(model, base, device)
    row = {"speedups": speedups.enabled(), "latency_ms": {}, "actions": {}}
    for policy, keep in POLICIES:
        hooks = build_hooks(ProfileSettings(**{**base.__dict__, "policy": policy, "keep": keep}), model.config)

        def query():
            with torch.inference_mode():
                return model(pixels, proprio, prompts, ByteTokenizer.stop_id, hooks=hooks)

        row["latency_ms"][policy] = percentiles(time_calls(query, device, base.repeats, base.warmup))
        row["actions"][policy] = query().cpu()
    row["vision_ms"] = time_vision(model, pixels.to(dtype), device, base)
    row["graph_failures"] = list(model.graphs.failures)
    return row


def report(rows: dict) -> str:
    lines = ["| variant | OFT p50 ms | LightVLA keep=78 p50 ms | LightVLA / OFT | towers + projector p50 ms "
             "| largest action difference from plain (OFT, LightVLA) |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | |")
            continue
        oft, light = r["latency_ms"]["oft"]["p50"], r["latency_ms"]["lightvla"]["p50"]
        diffs = ", ".join(f"{d:.2e}" for d in r["max_abs_diff"].values())
        lines.append(f"| {name} | {oft:.2f} | {light:.2f} | {light / oft:.3f} | {r['vision_ms']['p50']:.2f} | {diffs} |")
        if r["graph_failures"]:
            lines.append(f"|  capture failures: {'; '.join(r['graph_failures'])} | | | | | |")
    return "\n".join(lines)


def main() -> int:
    parser = measurement_parser(__doc__.splitlines()[0], repeats=30, warmup=5)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()

    base = settings_from(args)
    model, device, dtype = build_model(base)
    rows, reference = {}, None
    failed = False
    for name in args.variants:
        try:
            row = measure(model, device, dtype, base, Speedups.parse(VARIANTS[name]))
        except Exception as error:  # one variant's failure (e.g. compilation) must not lose the others
            rows[name] = {"speedups": Speedups.parse(VARIANTS[name]).enabled(),
                          "error": f"{type(error).__name__}: {str(error)[:300]}"}
            failed = True
            print(f"{name}: failed: {rows[name]['error']}", flush=True)
        else:
            actions = row.pop("actions")
            reference = reference or actions  # the first variant (plain, by default) is the reference
            row["max_abs_diff"] = {p: float((actions[p] - reference[p]).abs().max()) for p in actions}
            rows[name] = row
            print(f"{name}: OFT {row['latency_ms']['oft']['p50']:.2f} ms, LightVLA "
                  f"{row['latency_ms']['lightvla']['p50']:.2f} ms, towers {row['vision_ms']['p50']:.2f} ms", flush=True)
        if args.save:  # after every variant, so that a run cut short keeps what it measured
            args.save.write_text(json.dumps({"device_name": device_name(device), "dtype": str(dtype),
                                             "variants": rows}, indent=1))
    text = report(rows)
    print(f"size {args.size}  device {device_name(device)}  dtype {str(dtype).removeprefix('torch.')}  "
          f"batch 1, CUDA graphs where the device has them\n{text}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
