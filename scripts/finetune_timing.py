"""Time fine-tuning steps as `bench finetune` takes them (batch preparation, forward, L1 loss,
backward, AdamW), with random weights on a generated demonstration file, and their peak memory.

    python scripts/finetune_timing.py --size tiny --device cpu
    python scripts/finetune_timing.py --size full --device cuda --policy lightvla --batch-size 8
    python scripts/finetune_timing.py --size full --device cuda --batch-size 64 --grad-accumulation 8
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.demos import IMAGE_ORIENTATION, LOW_DIM_KEYS, DemoWriter  # noqa: E402
from bench.finetune import FinetuneConfig, Trainer  # noqa: E402
from bench.profile import device_name, measurement_parser, percentiles, time_calls  # noqa: E402


def generated_demos(path: Path, steps: int, image_size: int = 256, seed: int = 0) -> Path:
    """One demonstration of random images, states and moving actions (no step is a no-op)."""
    rng = np.random.default_rng(seed)
    writer = DemoWriter(path, {"suite": "libero_spatial", "image_size": image_size,
                               "image_orientation": IMAGE_ORIENTATION})
    sizes = {"ee_pos": 3, "ee_ori": 3, "gripper_states": 2, "joint_states": 7}
    writer.add([{"action": np.r_[rng.uniform(-1, 1, 6), rng.choice([-1.0, 1.0])], "state": rng.normal(size=8),
                 "reward": 0.0, "agentview_rgb": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
                 "eye_in_hand_rgb": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
                 **{k: rng.normal(size=sizes[k]) for k in LOW_DIM_KEYS}} for _ in range(steps)],
               {"instruction": "put the bowl on the plate", "suite": "libero_spatial", "task_index": 0,
                "init_state_index": 0})
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = measurement_parser(__doc__.splitlines()[0], repeats=5, warmup=2)
    parser.add_argument("--policy", default="lightvla", choices=["oft", "lightvla", "lightvla_star"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per step")
    args = parser.parse_args(argv)

    import torch

    steps = args.warmup + args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        demos = generated_demos(Path(tmp) / "demos.hdf5", steps=args.batch_size + 16)
        config = FinetuneConfig(demos=[str(demos)], policy=args.policy, steps=steps, batch_size=args.batch_size,
                                grad_accumulation=args.grad_accumulation, lora_rank=args.lora_rank,
                                policy_args={"size": args.size, "device": args.device, "dtype": args.dtype})
        trainer = Trainer(config, Path(tmp) / "run")
        try:
            device = trainer.policy.device
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            step_ms = time_calls(trainer.train_step, device, args.repeats, args.warmup)
            if device.startswith("cuda"):
                peak_mb = torch.cuda.max_memory_allocated() / 2**20
            else:
                peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            result = {
                "policy": args.policy, "size": args.size, "device": device_name(device),
                "dtype": str(trainer.policy.dtype).removeprefix("torch."), "batch_size": args.batch_size,
                "grad_accumulation": args.grad_accumulation, "lora_rank": args.lora_rank, "trainable_parameters": sum(p.numel() for p in trainer.trainable.values()),
                "step_ms": percentiles(step_ms), "samples_per_s": 1e3 * args.batch_size / float(np.median(step_ms)),
                "peak_memory_mb": peak_mb,
            }
        finally:
            trainer.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.save:
        args.save.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
