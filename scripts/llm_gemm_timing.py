"""How fast the LLM's linear products run at the token counts that matter: OFT's 599 and
LightVLA's 165 at 78 kept tokens, and a few counts around them. At batch 1 and 165 tokens each
product is bound by reading its weight, so the figure of merit is the weight bytes read per
second; the script prints it next to the time, for PyTorch's default GEMM and, where
torch.compile works, for Triton GEMMs autotuned for that shape.

    python scripts/llm_gemm_timing.py --device cuda [--save gemm.json]
    python scripts/llm_gemm_timing.py --device cpu --dims tiny   # the same steps, small weights

Each timing cycles through enough copies of the weight to overflow the GPU's L2 cache, so every
call reads its weight from memory as a query does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from policies.vla.config import preset  # noqa: E402

LAYER = ("q/k/v fused", "o", "gate/up fused", "down")  # one layer's products as run below 300 tokens
ROTATE_BYTES = 256 * 2**20  # larger than any GPU's L2


def products(size: str) -> tuple[tuple[str, int, int], ...]:
    """(name, in features, out features) of one LLM layer's products in the ``size`` preset, with
    q/k/v and gate/up fused as below 300 tokens (policies/vla/llama.py), and the gate alone."""
    llm = preset(size).llm
    d, ff, hd = llm.hidden_size, llm.intermediate_size, llm.head_dim
    return (("q/k/v fused", d, (llm.num_heads + 2 * llm.num_kv_heads) * hd), ("o", llm.num_heads * hd, d),
            ("gate/up fused", d, 2 * ff), ("gate alone", d, ff), ("down", ff, d))


def time_product(fn, x, weights, device: str, repeats: int) -> float:
    """Median milliseconds of one call, cycling through ``weights``."""
    for w in weights[:3]:
        fn(x, w)
    times = []
    for i in range(repeats):
        w = weights[i % len(weights)]
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x, w)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(x, w)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def linear(x, w):
    return F.linear(x, w)


def autotuned():
    """A GEMM chosen by autotuning for each shape, among Triton templates and cuBLAS."""
    return torch.compile(linear, mode="max-autotune-no-cudagraphs", dynamic=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dims", choices=["full", "tiny"], default="full", help="the model preset's sizes")
    parser.add_argument("--tokens", type=int, nargs="+", default=[165, 176, 192, 256, 599])
    parser.add_argument("--autotune-tokens", type=int, nargs="*", default=[165],
                        help="token counts also timed with autotuned Triton GEMMs (minutes of compiling each)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()

    dtype = torch.bfloat16
    rows = []
    tuned = autotuned() if args.autotune_tokens else None
    for name, k, n in products(args.dims):
        weight_bytes = k * n * 2
        copies = max(1, math.ceil(ROTATE_BYTES / weight_bytes)) if args.device.startswith("cuda") else 2
        weights = [torch.randn(n, k, device=args.device, dtype=dtype) * 0.02 for _ in range(copies)]
        for tokens in args.tokens:
            x = torch.randn(tokens, k, device=args.device, dtype=dtype)
            kinds = [("default", linear)] + ([("autotuned", tuned)] if tuned and tokens in args.autotune_tokens else [])
            for kind, fn in kinds:
                row = {"product": name, "in": k, "out": n, "tokens": tokens, "gemm": kind}
                try:
                    ms = time_product(fn, x, weights, args.device, args.repeats)
                except Exception as error:  # a failed compilation must not lose the other rows
                    row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                    print(f"{name} at {tokens} tokens, {kind}: failed: {row['error']}", flush=True)
                else:
                    row.update(ms=ms, weight_tb_per_s=weight_bytes / ms / 1e9,
                               tflop_per_s=2 * tokens * k * n / ms / 1e9)
                    print(f"{name:14s} {tokens:4d} tokens {kind:9s} {ms:7.4f} ms  "
                          f"{row['weight_tb_per_s']:5.2f} TB/s of weights  {row['tflop_per_s']:6.1f} TFLOP/s", flush=True)
                rows.append(row)
                if args.save:
                    args.save.write_text(json.dumps({"device": args.device, "rows": rows}, indent=1))
        del weights
    depth = preset(args.dims).llm.num_layers
    for tokens in args.tokens:  # a whole layer's products, and every layer's
        for kind in ("default", "autotuned"):
            layer = [r for r in rows if r["tokens"] == tokens and r["gemm"] == kind and r["product"] in LAYER
                     and "ms" in r]
            if len(layer) == len(LAYER):
                ms = sum(r["ms"] for r in layer)
                print(f"one layer's products at {tokens} tokens, {kind}: {ms:.4f} ms; {depth} layers {depth * ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
