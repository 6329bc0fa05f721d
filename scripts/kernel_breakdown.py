"""Where a query's time goes on a GPU: wall time against the time the device spends in kernels
(a large gap means the query is bound by the host launching kernels, not by the device), the
number of kernels launched, and the kernels that take the most time, for OFT and LightVLA at
78 tokens, replaying CUDA graphs, plain and with every speedup (``policies.vla.model.Speedups``).

    python scripts/kernel_breakdown.py --size full --device cuda
    python scripts/kernel_breakdown.py --size tiny --device cpu   # host operators only
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.profile import (ProfileSettings, build_hooks, build_model, device_name, example_inputs,  # noqa: E402
                           measurement_parser, percentiles, settings_from, time_calls)
from policies.vla.model import Speedups  # noqa: E402
from policies.vla.tokenizer import ByteTokenizer  # noqa: E402


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    if any(s in name for s in ("flash", "fmha", "attention", "efficient_attention")):
        return "attention"
    if any(s in name for s in ("gemm", "xmma", "cutlass", "nvjet", "matmul", "cublas")):
        return "matmul"
    return "other"


def short_name(kernel: str, limit: int = 200) -> str:
    """A kernel's name without the template noise that hides what it computes: PyTorch's
    element-wise kernels name their functor (MulFunctor, CUDAFunctor_add, copy ...) deep inside."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::", "c10::"):
        kernel = kernel.replace(noise, "")
    return kernel[:limit]


def breakdown(model, device, dtype, settings: ProfileSettings, queries: int) -> dict:
    model.use_speedups(Speedups.parse(settings.speedups))
    model.use_cuda_graphs()
    hooks = build_hooks(settings, model.config)
    if isinstance(hooks, torch.nn.Module):
        hooks.to(device=device, dtype=dtype)
    pixels, proprio, prompts = example_inputs(model, settings, device)

    def query():
        with torch.inference_mode():
            model(pixels, proprio, prompts, ByteTokenizer.stop_id, hooks=hooks)

    wall = percentiles(time_calls(query, device, settings.repeats, settings.warmup))
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(queries):
            query()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernels only: an operator's entry repeats the device time of the kernels it launched.
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / queries
    by_kind: dict[str, float] = {}
    for e in kernels:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.self_device_time_total / 1e3 / queries
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]
    host_ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return {
        "policy": settings.policy,
        "keep": settings.keep,
        "speedups": Speedups.parse(settings.speedups).enabled(),
        "wall_ms": wall,
        "device_busy_ms": busy_ms if cuda else None,
        "kernels_per_query": sum(e.count for e in kernels) / queries if cuda else None,
        "device_ms_by_kind": by_kind,
        "top_kernels": [{"name": short_name(e.key), "calls": e.count // queries,
                         "ms_per_query": e.self_device_time_total / 1e3 / queries} for e in top],
        "top_host_ops": [{"name": e.key, "calls": e.count // queries,
                          "self_cpu_ms_per_query": e.self_cpu_time_total / 1e3 / queries} for e in host_ops],
    }


def report(r: dict) -> str:
    name = r["policy"] if r["keep"] is None else f"{r['policy']} keep={r['keep']}"
    name += f", speedups: {', '.join(r['speedups'])}" if r["speedups"] else ", plain"
    lines = [f"{name}: wall mean {r['wall_ms']['mean']:.2f} ms, p50 {r['wall_ms']['p50']:.2f}"]
    if r["device_busy_ms"] is not None:
        lines.append(f"  device busy {r['device_busy_ms']:.2f} ms per query ({r['kernels_per_query']:.0f} kernels); "
                     + ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(r["device_ms_by_kind"].items())))
        for k in r["top_kernels"]:
            lines.append(f"    {k['ms_per_query']:7.3f} ms  x{k['calls']:<4} {k['name']}")
    lines.append("  host operators by own CPU time: " + ", ".join(
        f"{h['name']} {h['self_cpu_ms_per_query']:.2f} ms x{h['calls']}" for h in r["top_host_ops"]))
    return "\n".join(lines)


def main() -> int:
    parser = measurement_parser(__doc__.splitlines()[0], repeats=20, warmup=3)
    parser.add_argument("--queries", type=int, default=5, help="queries under the profiler")
    args = parser.parse_args()

    base = settings_from(args)
    model, device, dtype = build_model(base)
    results, failed = [], False
    for policy, keep in (("oft", None), ("lightvla", 78)):
        for speedups in ("", "all"):
            settings = ProfileSettings(**{**base.__dict__, "policy": policy, "keep": keep, "speedups": speedups})
            try:
                results.append(breakdown(model, device, dtype, settings, args.queries))
                print(report(results[-1]), flush=True)
            except Exception as error:  # a compilation failure must not lose the other breakdowns
                failed = True
                results.append({"policy": policy, "speedups": Speedups.parse(speedups).enabled(),
                                "error": f"{type(error).__name__}: {str(error)[:300]}"})
                print(f"{policy} speedups={speedups or 'none'}: failed: {results[-1]['error']}", flush=True)
            if args.save:  # after each, so that a run cut short keeps what it measured
                args.save.write_text(json.dumps({"device_name": device_name(device), "dtype": str(dtype),
                                                 "results": results}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
