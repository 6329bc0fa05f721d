"""LightVLA keeps a different number of tokens per observation: one left-padded batch with a
key mask, or one call per observation? Times both on the same observations and compares
their outputs (equal in fp32; in bf16 the batch's rounding can change a selection).

    python scripts/lightvla_batching.py --size tiny --device cpu
    python scripts/lightvla_batching.py --size full --device cuda --batch 4
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.profile import build_model, device_name, measurement_parser, percentiles, settings_from, time_calls  # noqa: E402
from policies.pruning.lightvla import LightVLAPruner  # noqa: E402
from policies.vla.hooks import QueryTrace  # noqa: E402
from policies.vla.tokenizer import ByteTokenizer  # noqa: E402


def observations(model, batch: int, seed: int, device: str):
    """``batch`` different images and proprio states, prompts of 25, 27, ... tokens (LIBERO's range)."""
    gen = torch.Generator().manual_seed(seed)
    size = model.config.image_sizes[0]
    pixels = torch.randn(batch, 6 * model.config.num_images, size, size, generator=gen)
    proprio = torch.rand(batch, model.config.proprio_dim, generator=gen) * 2 - 1
    prompts = [[1] + torch.randint(3, model.config.llm.vocab_size, (24 + 2 * i,), generator=gen).tolist()
               for i in range(batch)]
    return pixels.to(device), proprio.to(device), prompts


def main() -> int:
    parser = measurement_parser(__doc__.splitlines()[0], repeats=20, warmup=3)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    settings = settings_from(args)
    model, device, dtype = build_model(settings)
    pixels, proprio, prompts = observations(model, args.batch, settings.seed, device)
    pixels, proprio = pixels.to(dtype), proprio.to(dtype)
    pruner, stop = LightVLAPruner(), ByteTokenizer.stop_id

    def padded(traces=None):
        return model(pixels, proprio, prompts, stop, hooks=pruner, traces=traces)

    def one_by_one(traces=None):
        return torch.cat([model(pixels[i:i + 1], proprio[i:i + 1], prompts[i:i + 1], stop, hooks=pruner,
                                traces=None if traces is None else traces[i:i + 1]) for i in range(args.batch)])

    with torch.inference_mode():
        batched, single = [QueryTrace() for _ in prompts], [QueryTrace() for _ in prompts]
        a, b = padded(batched).float(), one_by_one(single).float()
        result = {
            "size": args.size, "device": device, "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
            "device_name": device_name(device),
            "kept_tokens": [t.llm_visual_tokens[0] for t in batched],
            "kept_tokens_one_by_one": [t.llm_visual_tokens[0] for t in single],
            "max_abs_difference": float((a - b).abs().max()),
            "padded_ms": percentiles(time_calls(padded, device, args.repeats, args.warmup)),
            "one_by_one_ms": percentiles(time_calls(one_by_one, device, args.repeats, args.warmup)),
        }
    print(f"{args.size} {result['device_name']} {result['dtype']}: {args.batch} observations keeping "
          f"{result['kept_tokens']} visual tokens ({result['kept_tokens_one_by_one']} one by one)")
    for name in ("padded", "one_by_one"):
        r = result[f"{name}_ms"]
        print(f"  {name:<11} mean {r['mean']:.2f} ms  p50 {r['p50']:.2f}  p90 {r['p90']:.2f}  ({r['n']} runs)")
    print(f"  largest difference between the two ways' normalised actions: {result['max_abs_difference']:.2e}")
    # In fp32 both ways must agree; in bf16 a batch rounds differently, which can flip an argmax.
    same = dtype != torch.float32 or result["max_abs_difference"] < 1e-5
    if args.save:
        args.save.write_text(json.dumps(result, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
