"""Operators a query launches outside CUDA graphs, per method.

On a GPU at batch 1 the host is the bottleneck: each operator outside a graph is a launch the
host issues one by one (microseconds each), while a replayed graph is one launch. Counted here
on the CPU, where graphs call their functions as a recording would (``policies.vla.graphs``),
on the tiny model given the full model's 32 LLM layers: the count depends on the depth, the
stages and the batch, not on the widths. Each method's fifth query on one observation is
counted: two without graphs (VLA-Cache then reuses as it does after an identical frame), two
that capture its graphs, as ``bench profile`` times them.

Of these, the operators launched while the GPU waits are those at the query's start or after a
read of tensor values on the host, before the next graph: the GPU has run everything queued by
then, so each such launch adds its whole host time to the query's. The others are issued while
earlier work runs, and cost time only where the host falls behind the GPU.

    python scripts/eager_operators.py
    python scripts/eager_operators.py --methods oft,sparsevlm --prompt-tokens 29
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench.profile import DEFAULT_PROMPT_TOKENS, ProfileSettings, build_hooks, example_inputs, sweep_methods  # noqa: E402
from policies.vla.config import replace_llm, tiny_config  # noqa: E402
from policies.vla.graphs import HostReads, is_recording  # noqa: E402
from policies.vla.model import OFTModel  # noqa: E402
from policies.vla.tokenizer import ByteTokenizer  # noqa: E402

LAYERS = 32  # the full model's


class EagerOperators(TorchDispatchMode):
    """Counts the operators dispatched outside graph recordings, and of them those dispatched
    while the GPU would wait: before the first recording, and after a host read (``read``) until
    the next recording."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.while_waiting = 0
        self.reads = 0
        self._waiting = True

    def read(self) -> None:
        self.reads += 1
        self._waiting = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_recording():
            self._waiting = False
        else:
            self.count += 1
            self.while_waiting += self._waiting
        return func(*args, **(kwargs or {}))


class ReadsOf(HostReads):
    """Tells ``operators`` of every host read."""

    def __init__(self, operators: EagerOperators):
        super().__init__()
        self.operators = operators

    def _read(self, tensor: torch.Tensor, what) -> None:
        self.operators.read()


def count(model: OFTModel, policy: str, options: dict, prompt_tokens: int) -> dict:
    """One method's operators outside graphs in its fifth query, and the model's graphs by then."""
    settings = ProfileSettings(policy=policy, policy_args=options, prompt_tokens=prompt_tokens)
    pixels, proprio, prompts = example_inputs(model, settings, "cpu")
    hooks = build_hooks(settings, model.config)
    counter = EagerOperators()
    for query in range(5):
        if query in (0, 2):  # none, then a fresh set: no graphs of the method before
            model.use_cuda_graphs(query == 2)
        if hasattr(hooks, "begin"):
            hooks.begin("count", pixels[0])
        counted = query == 4
        # counter innermost: it sees each operator first (inside inference mode, which restores
        # the dispatch keys it found on entry)
        with (torch.inference_mode(), ReadsOf(counter) if counted else contextlib.nullcontext(),
              counter if counted else contextlib.nullcontext()):
            model(pixels, proprio, prompts, ByteTokenizer.stop_id, hooks=hooks)
    return {"policy": policy, "options": options, "eager_operators": counter.count,
            "while_waiting": counter.while_waiting, "host_reads": counter.reads, "graphs": len(model.graphs)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="", help="comma-separated policies (default: those of bench profile --sweep)")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = replace_llm(tiny_config(), num_layers=LAYERS)
    model = OFTModel(config).eval()
    wanted = [m for m in args.methods.split(",") if m]
    rows = []
    for policy, options in sweep_methods(config):
        if wanted and policy not in wanted:
            continue
        row = count(model, policy, options, args.prompt_tokens)
        rows.append(row)
        label = " ".join([policy] + [f"{k}={v}" for k, v in options.items()])
        print(f"{label:48s} {row['eager_operators']:5d} operators outside graphs ({row['while_waiting']:3d} while "
              f"the GPU waits)   {row['host_reads']} host reads   {row['graphs']:3d} graphs", flush=True)
    return rows


if __name__ == "__main__":
    main()
