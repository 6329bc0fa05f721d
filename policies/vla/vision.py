"""The fused vision backbone: DINOv2 and SigLIP ViTs from timm, features of the second-to-last block.

The towers are created without pretrained weights (weights come from the checkpoint). Each
keeps all its timm parameters (last block, final norm, SigLIP's pooling head) so checkpoint
keys match one to one, but only the blocks up to the second-to-last are run, with no final
norm, and the prefix tokens (class token, registers) are dropped: OpenVLA's
``get_intermediate_layers(n={depth - 2})``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from policies.vla.config import VLAConfig
from policies.vla.graphs import is_recording
from policies.vla.hooks import Hooks, QueryTrace, VisionSlots, right_aligned


def create_tower(model_id: str, image_size: int, overrides: dict) -> nn.Module:
    import timm

    return timm.create_model(model_id, pretrained=False, num_classes=0, img_size=image_size, **overrides)


def tower_blocks(config: VLAConfig) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Blocks, embedding widths and prefix tokens of the two towers (built on the meta device)."""
    with torch.device("meta"):
        towers = [create_tower(m, s, o) for m, s, o in
                  zip(config.timm_model_ids, config.image_sizes, config.timm_model_overrides)]
    return (tuple(len(t.blocks) for t in towers), tuple(t.embed_dim for t in towers),
            tuple(t.num_prefix_tokens for t in towers))


def visual_token_count(config: VLAConfig) -> int:
    """Visual tokens a query of this model has before any pruning (built on the meta device)."""
    with torch.device("meta"):
        tower = create_tower(config.timm_model_ids[0], config.image_sizes[0], config.timm_model_overrides[0])
    return tower.patch_embed.num_patches * config.num_images


@dataclass
class VisualTokens:
    """The fused visual tokens of a batch, with where each came from."""

    features: torch.Tensor | None  # (B, V, C); None where the caller computed them (a replayed graph)
    index: torch.Tensor  # (B, V) patch index over all images (image * patches + patch): its RoPE slot
    padding: torch.Tensor | None = None  # (B, V) bool: left padding when samples keep different counts
    total: int = 0  # visual tokens before any pruning (images * patches)


@dataclass
class TowerOutput:
    features: list[torch.Tensor] | torch.Tensor  # per image (P_i, C), or (N, P, C) when all have P tokens
    patches: list[torch.Tensor] | None  # per image, the patch index of every token (None: all, in order)
    counts: list[list[int]]  # per block run, tokens entering it per image


class VisionBackbone(nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        self.featurizer = create_tower(config.timm_model_ids[0], config.image_sizes[0], config.timm_model_overrides[0])
        self.fused_featurizer = create_tower(config.timm_model_ids[1], config.image_sizes[1], config.timm_model_overrides[1])
        self.num_images = config.num_images
        self.embed_dim = self.featurizer.embed_dim + self.fused_featurizer.embed_dim
        self.parallel_towers = False  # set by ``OFTModel.use_speedups``
        self._side_streams: dict = {}
        self._kept: tuple | None = None  # the last patch mask a hook gave, and its kept indices
        self._compiled_blocks: list[list] | None = None  # per tower, torch.compile'd blocks (a plain
        # list, so they are not registered as submodules and checkpoint keys stay the same)

    def compile_blocks(self, enabled: bool = True) -> None:
        """Run every tower block compiled by torch.compile where a CUDA graph is recorded: its
        LayerNorms, LayerScales, residual adds, bias and GELU fuse into fewer kernels.
        Compilation happens at the first recording."""
        if not enabled:
            self._compiled_blocks = None
        elif self._compiled_blocks is None:
            self._compiled_blocks = [[torch.compile(block) for block in tower.blocks] for tower in self.towers]

    def _block(self, tower: int, index: int) -> nn.Module:
        if self._compiled_blocks is None or not is_recording():  # compiled where a graph records
            return self.towers[tower].blocks[index]
        return self._compiled_blocks[tower][index]

    @property
    def towers(self) -> tuple[nn.Module, nn.Module]:
        return self.featurizer, self.fused_featurizer

    @property
    def patches_per_image(self) -> int:
        return self.featurizer.patch_embed.num_patches

    def tower_features(self, index: int, x: torch.Tensor, hooks: Hooks, head: int = 0) -> TowerOutput:
        """One tower through its second-to-last block, prefix tokens dropped.

        ``x``: the pixels, or with ``head`` > 0 the output of the tower's first ``head`` blocks,
        after none but the last of which a hook acts (``_heads``).

        Until a hook prunes, all images run as one batch; after it, still as one batch when
        every image keeps the same number of tokens, else image by image (so no padding enters
        the tower's attention). Hooks are not consulted after a pruning. With ``hooks.graphs``
        (CUDA graphs), each run of blocks after which no hook acts is replayed as one graph per
        input shape, the embedding with the first run.
        """
        prefix = self.towers[index].num_prefix_tokens
        depth = len(self.towers[index].blocks) - 1  # through the second-to-last block
        graphs = hooks.graphs
        counts, patches, parts, pruned = [[x.shape[1]] * x.shape[0] for _ in range(head)], None, None, False
        start = head
        while True:
            if start > 0 and not pruned:  # the hook after the block just run
                change = hooks.on_vision_block(index, start - 1, x)
                if isinstance(change, VisionSlots):
                    if change.tokens.shape[1] - prefix != change.patches.shape[1]:
                        raise ValueError("vision slots need one patch index per slot after the prefix tokens")
                    x, patches = change.tokens, list(change.patches.cpu())
                elif change is not None:
                    pruned = True
                    kept, patches = self._keep_patches(x, change, prefix)
                    if len({k.shape[0] for k in kept}) == 1:
                        x = torch.stack(kept)
                    else:
                        parts = kept
            if start >= depth:
                break
            end = start + 1
            if graphs is not None:
                while end < depth and (pruned or hooks.plain_vision_block(index, end - 1)):
                    end += 1
            if parts is None:
                x = self._run_blocks(index, start, end, x, graphs)
                counts += [[x.shape[1]] * x.shape[0] for _ in range(start, end)]
            else:
                parts = [self._run_blocks(index, start, end, p[None], graphs)[0] for p in parts]
                counts += [[p.shape[0] for p in parts] for _ in range(start, end)]
            start = end
        if parts is None:
            return TowerOutput(x[:, prefix:], patches, counts)
        return TowerOutput([p[prefix:] for p in parts], patches, counts)

    def _run_blocks(self, index: int, start: int, end: int, x: torch.Tensor, graphs) -> torch.Tensor:
        run = functools.partial(self._blocks, index, start, end)
        return run(x) if graphs is None else graphs.run(f"tower {index} blocks {start}-{end - 1}", run, x)

    def _blocks(self, index: int, start: int, end: int, x: torch.Tensor) -> torch.Tensor:
        """Blocks ``start`` to ``end - 1`` of a tower; from block 0, ``x`` is the pixels, embedded first."""
        tower = self.towers[index]
        if start == 0:
            x = tower.norm_pre(tower.patch_drop(tower._pos_embed(tower.patch_embed(x))))
        for block in range(start, end):
            x = self._block(index, block)(x)
        return x

    def _keep_patches(self, x: torch.Tensor, mask: torch.Tensor,
                      prefix: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image, the tokens left (the prefix tokens and the patches ``mask`` keeps) and the
        kept patch indices."""
        images, patches = x.shape[0], x.shape[1] - prefix
        if mask.dtype != torch.bool or tuple(mask.shape) != (images, patches):
            raise ValueError(f"a vision hook keeps patches with a ({images}, {patches}) bool mask "
                             f"(images, patches), got {mask.dtype} {tuple(mask.shape)}")
        kept = self._kept_patches(mask)
        head = torch.arange(prefix, device=x.device)  # the prefix tokens, then the kept patches
        rows = [torch.cat([head, k.to(x.device) + prefix]) if prefix else k.to(x.device) for k in kept]
        return [x[i].index_select(0, r) for i, r in enumerate(rows)], kept

    def _kept_patches(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """Per image, the indices of the patches ``mask`` keeps. Their counts are read on the
        host once per mask (on a GPU, a wait): the second tower, handed the same mask, reads nothing."""
        if self._kept is not None and self._kept[0] is mask:
            return self._kept[1]
        counts = mask.sum(dim=1).tolist()
        order = right_aligned(mask, max(counts))
        kept = [order[i, order.shape[1] - n:] for i, n in enumerate(counts)]
        self._kept = (mask, kept)
        return kept

    def forward(self, pixel_values: torch.Tensor, hooks: Hooks | None = None,
                traces: list[QueryTrace] | None = None) -> VisualTokens:
        """pixel_values (B, 6 * images, H, W) -> fused visual tokens (B, V, 2176), V = images x patches
        unless a hook pruned inside the towers.

        Channels per image: 3 normalised for DINOv2, then 3 for SigLIP; images third-person first.
        """
        hooks = hooks or Hooks()
        self.check_channels(pixel_values)
        self._kept = None  # no mask is shared with an earlier query
        b = pixel_values.shape[0]
        images = self.num_images
        # All images of the batch go through each tower in one call: (B*images, 3, H, W).
        per_image = pixel_values.reshape(b * images, 6, *pixel_values.shape[2:])
        outs = self._both_towers(per_image, hooks)
        if traces is not None:
            for s, trace in enumerate(traces):
                trace.vision_tokens = [[c[s * images:(s + 1) * images] for c in out.counts] for out in outs]
        if outs[0].patches is None and outs[1].patches is None:
            fused = torch.cat([outs[0].features, outs[1].features], dim=2)  # (B*images, P, 2176)
            layout = self.unpruned_layout(b, fused.device)
            layout.features = fused.reshape(b, images * fused.shape[1], fused.shape[2])
            return layout
        return self._fuse_pruned(outs, b)

    def _both_towers(self, per_image: torch.Tensor, hooks: Hooks) -> list[TowerOutput]:
        """Both towers' outputs; with ``parallel_towers`` on a GPU, DINOv2 on a side stream while
        SigLIP runs on the current one. At a few images each tower's products are too small to
        fill a large GPU, and the towers do not depend on each other. Where a hook acts inside
        the towers (it may read back to the host, and SigLIP's waits for DINOv2's choice), only
        the blocks up to the first hook point run side by side, as one graph (``_heads``)."""
        dino, siglip = per_image[:, :3], per_image[:, 3:6]
        if hooks.plain_vision():
            return list(self._side_by_side(functools.partial(self.tower_features, 0, dino, hooks),
                                           functools.partial(self.tower_features, 1, siglip, hooks),
                                           per_image, lambda out: out.features))
        lengths = (self._plain_head(0, hooks), self._plain_head(1, hooks))
        heads = functools.partial(self._heads, lengths)
        graphs = hooks.graphs
        if graphs is None:
            first, second = heads(dino, siglip)
        else:
            first, second = graphs.run(f"towers 0 and 1 blocks to {lengths[0] - 1} and {lengths[1] - 1}",
                                       heads, dino, siglip)
        return [self.tower_features(0, first, hooks, lengths[0]), self.tower_features(1, second, hooks, lengths[1])]

    def _plain_head(self, tower: int, hooks: Hooks) -> int:
        """How many of a tower's first blocks run before a hook may act: through the first block
        after which one does (or the last block run)."""
        depth, n = len(self.towers[tower].blocks) - 1, 1
        while n < depth and hooks.plain_vision_block(tower, n - 1):
            n += 1
        return n

    def _heads(self, lengths: tuple[int, int], dino: torch.Tensor, siglip: torch.Tensor):
        """Each tower's first ``lengths`` blocks (a pure function of the pixels: graphable)."""
        return self._side_by_side(functools.partial(self._blocks, 0, 0, lengths[0], dino),
                                  functools.partial(self._blocks, 1, 0, lengths[1], siglip), dino, lambda x: x)

    def _side_by_side(self, first: Callable, second: Callable, like: torch.Tensor, tensor_of: Callable):
        """``first()`` and ``second()``; with ``parallel_towers`` on a GPU, ``first`` on a side
        stream while ``second`` runs on the current one (``tensor_of`` names what ``first``
        gives back to the current stream)."""
        if not (self.parallel_towers and like.is_cuda):
            return first(), second()
        main = torch.cuda.current_stream(like.device)
        side = self._side_stream(like.device)
        side.wait_stream(main)  # the inputs are ready; under graph capture this forks the capture
        with torch.cuda.stream(side):
            out = first()
        other = second()
        main.wait_stream(side)  # ... and this joins it again
        tensor_of(out).record_stream(main)  # allocated on the side stream, read on the main one
        return out, other

    def _side_stream(self, device: torch.device):
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device=device)
        return self._side_streams[device]

    def check_channels(self, pixel_values: torch.Tensor) -> None:
        channels, images = pixel_values.shape[1], self.num_images
        if channels != 6 * images:
            raise ValueError(
                f"pixel_values has {channels} channels; expected {6 * images} (6 per image for {images} images)"
            )

    def unpruned_layout(self, b: int, device: torch.device, traces: list[QueryTrace] | None = None) -> VisualTokens:
        """What ``forward`` reports besides the features when no hook prunes: every patch in
        order, and in ``traces`` each block's token count (patches plus prefix tokens)."""
        images, per = self.num_images, self.patches_per_image
        if traces is not None:
            counts = [[[per + t.num_prefix_tokens] * images for _ in range(len(t.blocks) - 1)] for t in self.towers]
            for trace in traces:
                trace.vision_tokens = [[list(c) for c in tower] for tower in counts]
        index = torch.arange(images * per, device=device).expand(b, -1)
        return VisualTokens(None, index, None, images * per)

    def _fuse_pruned(self, outs: list[TowerOutput], b: int) -> VisualTokens:
        images, per = self.num_images, self.patches_per_image
        if not _same_patches(outs[0].patches, outs[1].patches):
            raise ValueError("vision hooks must keep the same patches in both towers")
        device = outs[0].features[0].device
        mask_device = torch.device("cpu") if device.type == "meta" else device
        samples, indices = [], []
        for s in range(b):
            rows = range(s * images, (s + 1) * images)
            samples.append(torch.cat([torch.cat([outs[0].features[r], outs[1].features[r]], dim=1) for r in rows]))
            indices.append(torch.cat([outs[0].patches[r].to(mask_device) + (r - s * images) * per for r in rows]))
        longest = max(x.shape[0] for x in samples)
        features = samples[0].new_zeros(b, longest, samples[0].shape[1])
        index = torch.zeros(b, longest, dtype=torch.long, device=mask_device)
        padding = torch.ones(b, longest, dtype=torch.bool, device=mask_device)
        for s, (x, ix) in enumerate(zip(samples, indices)):
            features[s, longest - x.shape[0]:] = x
            index[s, longest - x.shape[0]:] = ix
            padding[s, longest - x.shape[0]:] = False
        uneven = any(x.shape[0] < longest for x in samples)
        return VisualTokens(features, index, padding if uneven else None, images * per)


def _same_patches(a: list[torch.Tensor] | None, b: list[torch.Tensor] | None) -> bool:
    """Whether two towers kept the same patches of every image (one read on the host, unless
    both kept those of one mask)."""
    if a is b and a is not None:
        return True
    if a is None or b is None or [len(p) for p in a] != [len(p) for p in b]:
        return False
    return torch.equal(torch.cat(list(a)), torch.cat(list(b)))
