"""OpenVLA-OFT assembled: vision backbone, projectors, bidirectional Llama, L1 action head.

One query's LLM input (OFT's layout, reference openvla-oft.md item 5):

    [BOS] [visual tokens: camera 1 patches, camera 2 patches] [proprio] [prompt after BOS,
    ending with the empty piece] [chunk x action_dim zeroed action slots] [stop]

The action head reads the hidden states of the token before each action slot (training's
shift by one): ``hidden[:, T-58:T-2]`` for 56 slots; ``action_slice="release"`` reads
``hidden[:, -56:]`` as LightVLA's released inference code does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch
from torch import nn

from policies.vla.config import VLAConfig
from policies.vla.graphs import Graphs, graphable
from policies.vla.heads import FusedProjector, L1ActionHead, ProprioProjector
from policies.vla.hooks import Hooks, QueryTrace, StreamSizes, TokenStream
from policies.vla.llama import LanguageModel

ACTION_SLICES = ("train", "release")


@dataclass(frozen=True)
class Speedups:
    """Ways to run the same computation in fewer or overlapping GPU kernels. Compiled kernels and
    fused products may round bf16 intermediates differently (on an H100, OFT's actions moved by
    at most 3.5e-2, the size of the change between a padded batch and one query at a time);
    parallel towers compute exactly the same. Compiled code serves the calls that record a CUDA
    graph only (``graphs.recording``). By default ("auto") a CUDA device uses every speedup it
    can, a CPU none (docs/performance.md has the measurements behind both)."""

    compile_kernels: bool = False  # the LLM's element-wise chains compiled by torch.compile
    compile_towers: bool = False  # every vision block compiled by torch.compile
    parallel_towers: bool = False  # the two vision towers on two CUDA streams at once
    fuse_gate_up: bool = False  # the MLP's gate and up products as one below 300 tokens

    @classmethod
    def parse(cls, text: str, device: str = "cpu") -> "Speedups":
        """'auto' (what ``device`` can use), 'none' or '' (none), 'all', or names separated by
        commas: 'compile_kernels,parallel_towers'."""
        text = text.strip()
        if text == "auto":
            return cls.auto(device)
        known = [f.name for f in fields(cls)]
        names = known if text == "all" else [] if text == "none" else [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown speedup {', '.join(map(repr, unknown))}; known: {', '.join(known)}, "
                             "or all, none, auto")
        return cls(**{n: True for n in names})

    @classmethod
    def auto(cls, device: str) -> "Speedups":
        """Every speedup on a CUDA device, less compilation where Triton or a C compiler is
        missing; none elsewhere (on a CPU, compiled tiny models measured slower)."""
        if not str(device).startswith("cuda"):
            return cls()
        compiles = can_compile()
        return cls(compile_kernels=compiles, compile_towers=compiles, parallel_towers=True, fuse_gate_up=True)

    def enabled(self) -> list[str]:
        return [name for name, on in asdict(self).items() if on]


def can_compile() -> bool:
    """Whether torch.compile can build GPU kernels here: Triton, and a C compiler for its launchers."""
    import importlib.util
    import os
    import shutil

    compilers = (os.environ.get("CC", ""), "cc", "gcc", "clang")
    return importlib.util.find_spec("triton") is not None and any(shutil.which(c) for c in compilers if c)


def prompt_margins(config: VLAConfig) -> tuple[int, int]:
    """Tokens after the visual block that come before the prompt's text (the proprio token) and
    after it (the action slots and the stop token), in the layout ``OFTModel.assemble`` builds."""
    return 1, config.action_tokens + 1


class OFTModel(nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        from policies.vla.vision import VisionBackbone  # timm is imported only when a model is built

        self.config = config
        self.vision_backbone = VisionBackbone(config)
        d = config.llm.hidden_size
        self.projector = FusedProjector(self.vision_backbone.embed_dim, d)
        self.language_model = LanguageModel(config.llm)
        self.proprio_projector = ProprioProjector(config.proprio_dim, d)
        self.action_head = L1ActionHead(d, config.action_dim, config.chunk_length, config.head_blocks)
        self.graphs: Graphs | None = None
        self.speedups = Speedups()

    def use_speedups(self, speedups: Speedups) -> None:
        from policies.vla.llama import EAGER, compiled_kernels

        self.language_model.use_kernels(compiled_kernels() if speedups.compile_kernels else EAGER)
        self.vision_backbone.compile_blocks(speedups.compile_towers)
        self.vision_backbone.parallel_towers = speedups.parallel_towers
        self.language_model.fuse_gate_up(speedups.fuse_gate_up)
        if self.graphs is not None and speedups != self.speedups:
            self.graphs.clear()  # graphs captured before would replay the old kernels
        self.speedups = speedups

    def use_cuda_graphs(self, enabled: bool = True, limit: int = 64) -> None:
        """Replay the fixed-shape parts of inference queries (vision towers with projector, runs
        of LLM layers no hook touches) as CUDA graphs, at most ``limit`` shapes, and fuse the
        LLM's q, k, v projections. Call it once the model is on its device with its weights: graphs read
        the weights where they were."""
        self.graphs = Graphs(limit) if enabled else None
        if enabled:
            self.language_model.fuse_projections()

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens (B, V, D) of unpruned towers: a pure function (graphable)."""
        return self.projector(self.vision_backbone(pixel_values).features)

    def replay_encode_images(self, pixel_values: torch.Tensor, graphs: Graphs | None) -> torch.Tensor:
        """``encode_images`` through the one graph a query without vision hooks replays (called
        directly where ``graphs`` is None)."""
        if graphs is None:
            return self.encode_images(pixel_values)
        return graphs.run("vision and projector", self.encode_images, pixel_values)

    @property
    def visual_tokens(self) -> int:
        return self.vision_backbone.patches_per_image * self.config.num_images

    def embed_text(self, prompts: Sequence[Sequence[int]], stop_id: int, device, dtype):
        """Each prompt's token embeddings and the stop token's, from one host-to-device copy.

        The copy waits for the GPU, so ``forward`` makes it before launching the towers: made
        between the towers and the LLM, the wait would leave the GPU idle while the host then
        assembles the sequence and launches the LLM."""
        ids = torch.tensor([i for p in prompts for i in p] + [stop_id], dtype=torch.long).to(device)
        embedded = self.language_model.embed(ids).to(dtype)
        return list(embedded[:-1].split([len(p) for p in prompts])), embedded[-1:]

    def assemble(self, visual: torch.Tensor, proprio: torch.Tensor, prompts: Sequence[Sequence[int]],
                 stop_id: int, index: torch.Tensor | None = None, visual_padding: torch.Tensor | None = None,
                 total_visual: int | None = None, text=None) -> TokenStream:
        """The LLM input stream; samples of unequal length are left-padded.

        ``index`` (B, V) gives each visual token's patch slot and so its RoPE position (1 + slot),
        for visual tokens pruned inside the vision towers; the tokens after the visual block are
        numbered as if all ``total_visual`` patches were there (positions are never renumbered).
        ``text`` is ``embed_text``'s result for ``prompts`` where the caller made it already.
        """
        b, v, d = visual.shape
        if len(prompts) != b:
            raise ValueError(f"{len(prompts)} prompts for a batch of {b}")
        total_visual = total_visual or v
        device = visual.device
        # Masks are small; on the meta device (cost counting) they stay on the CPU so that
        # token counts remain readable.
        mask_device = torch.device("cpu") if device.type == "meta" else device
        if index is None:
            index = torch.arange(v, device=mask_device).expand(b, v)
        real = [v if visual_padding is None else v - int(visual_padding[i].sum()) for i in range(b)]
        slots = self.config.action_tokens
        lengths = [1 + n + 1 + (len(p) - 1) + slots + 1 for n, p in zip(real, prompts)]
        total = max(lengths)
        hidden = visual.new_zeros(b, total, d)
        position_ids = torch.zeros(b, total, dtype=torch.long, device=device)
        is_visual = torch.zeros(b, total, dtype=torch.bool, device=mask_device)
        is_task = torch.zeros(b, total, dtype=torch.bool, device=mask_device)
        padding = torch.zeros(b, total, dtype=torch.bool, device=mask_device)
        texts, stop = text or self.embed_text(prompts, stop_id, device, visual.dtype)
        for i, (words, n, length) in enumerate(zip(texts, real, lengths)):
            pad = total - length
            sample = torch.cat([
                words[:1], visual[i, v - n:], proprio[i:i + 1], words[1:],
                visual.new_zeros(slots, d),  # action slots: zeroed embeddings
                stop,
            ])
            hidden[i, pad:] = sample
            after = length - 1 - n  # tokens after the visual block
            position_ids[i, pad + 1:pad + 1 + n] = 1 + index[i, v - n:].to(device)
            position_ids[i, pad + 1 + n:] = torch.arange(1 + total_visual, 1 + total_visual + after, device=device)
            is_visual[i, pad + 1:pad + 1 + n] = True
            is_task[i, pad + 1 + n:] = True
            padding[i, :pad] = True
        sizes = StreamSizes(tuple(lengths), tuple(real), tuple(length - 1 - n for length, n in zip(lengths, real)))
        return TokenStream(hidden, position_ids, is_visual, is_task, padding if len(set(lengths)) > 1 else None, sizes)

    def forward(self, pixel_values: torch.Tensor, proprio: torch.Tensor, prompts: Sequence[Sequence[int]],
                stop_id: int, hooks: Hooks | None = None, action_slice: str = "train",
                traces: list[QueryTrace] | None = None) -> torch.Tensor:
        """Normalised action chunks (B, chunk, action_dim) in fp32."""
        if action_slice not in ACTION_SLICES:
            raise ValueError(f"action_slice must be one of {ACTION_SLICES}, got {action_slice!r}")
        hooks = hooks or Hooks()
        dtype = self.projector.fc1.weight.dtype
        b = pixel_values.shape[0]
        hooks.start(b)
        graphs = self.graphs if self.graphs is not None and graphable() else None
        hooks.graphs = graphs
        if proprio.shape != (b, self.config.proprio_dim):
            raise ValueError(f"proprio has shape {tuple(proprio.shape)}; expected ({b}, {self.config.proprio_dim})")
        text = self.embed_text(prompts, stop_id, pixel_values.device, dtype)  # before the towers: see there
        if graphs is not None and hooks.plain_vision():
            pixels = pixel_values.to(dtype)
            self.vision_backbone.check_channels(pixels)
            visual = self.replay_encode_images(pixels, graphs)
            tokens = self.vision_backbone.unpruned_layout(b, visual.device, traces)
        else:
            tokens = self.vision_backbone(pixel_values.to(dtype), hooks, traces)
            visual = self.projector(tokens.features) if graphs is None else graphs.run(
                "projector", self.projector, tokens.features)
        if traces is not None:
            for i, trace in enumerate(traces):
                padded = 0 if tokens.padding is None else int(tokens.padding[i].sum())
                trace.projector_tokens = visual.shape[1] - padded
        proprio_token = self.proprio_projector(proprio.to(dtype))
        stream = self.assemble(visual, proprio_token, prompts, stop_id, tokens.index, tokens.padding, tokens.total, text)
        hidden = self.language_model(stream, hooks, traces=traces, graphs=graphs)
        if traces is not None:
            for trace, cost in zip(traces, hooks.cost()):
                trace.plugin_flops = cost
        t, slots = hidden.shape[1], self.config.action_tokens
        if action_slice == "train":
            action_hidden = hidden[:, t - slots - 2:t - 2]
        else:
            action_hidden = hidden[:, t - slots:]
        return self.action_head(action_hidden).float()

